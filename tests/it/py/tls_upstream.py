"""A local TLS upstream for the forward-proxy tests: a fake of the GitHub API, the OpenAI API and
github.com's smart-HTTP git (the real `git http-backend`, run as CGI), on 127.0.0.1 only.

Usage: tls_upstream.py CERT KEY LOG GIT_ROOT TOKEN
Prints the port it listens on. Every request is appended to LOG as one JSON line (method, path,
host, headers), so a test can see what reached the upstream. Git requests must carry
basic auth x-access-token:TOKEN (else 401), as github.com checks a token.
"""

import base64
import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CERT, KEY, LOG, GIT_ROOT, TOKEN = sys.argv[1:6]
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def record(self, body):
        entry = {
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": len(body),
        }
        with LOCK, open(LOG, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status, body, content_type="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        body = self.body()
        self.record(body)
        path = self.path.split("?")[0]
        if ".git/" in path:
            return self.git(body)
        if path == "/redirect":
            return self.send(302, b"{}", extra=[("Location", "https://evil.example/steal")])
        if path == "/v1/models":
            models = {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "created": 0, "owned_by": "test"}]}
            return self.send(200, json.dumps(models).encode())
        if path == "/user":
            # The real API does not echo the token; this fake does, so the test sees the scrubber work.
            user = {"login": "octocat", "id": 1, "echo": self.headers.get("Authorization", "")}
            return self.send(200, json.dumps(user).encode())
        echo = {"method": self.command, "path": self.path, "host": self.headers.get("Host")}
        return self.send(200, json.dumps(echo).encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any

    def git(self, body):
        expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            return self.send(401, b"unauthorized\n", "text/plain", [("WWW-Authenticate", 'Basic realm="GitHub"')])
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": GIT_ROOT,
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
        }
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name, value.strip()))
        content_type = dict((k.lower(), v) for k, v in headers).get("content-type", "application/octet-stream")
        extra = [(k, v) for k, v in headers if k.lower() not in ("content-type", "content-length")]
        return self.send(status, payload, content_type, extra)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
context.set_alpn_protocols(["http/1.1"])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
