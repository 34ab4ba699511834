"""Real Python clients through keyward's forward proxy, configured only by the environment an
agent gets from `keyward agent-env` (HTTPS_PROXY, SSL_CERT_FILE, REQUESTS_CA_BUNDLE): requests,
httpx over HTTP/1.1 and HTTP/2, the OpenAI SDK with no base URL, and Python's ssl with
VERIFY_X509_STRICT on a tunnel opened by hand (the leaf it got is written to LEAF_OUT as PEM).

Usage: forward_clients.py LEAF_OUT. Prints one JSON object with what each client received.
"""

import json
import os
import socket
import ssl
import sys
import base64
from urllib.parse import urlsplit

import httpx
import requests
from openai import OpenAI

out = {}

r = requests.get("https://api.github.com/user", timeout=30)
out["requests"] = {"status": r.status_code, "body": r.text}
r = requests.get("https://api.github.com/orgs/acme/members", timeout=30)
out["requests_forbidden"] = {"status": r.status_code, "body": r.text}
r = requests.get("https://api.github.com/redirect", timeout=30, allow_redirects=False)
out["requests_redirect"] = {"status": r.status_code, "location": r.headers.get("location")}

with httpx.Client(timeout=30) as client:
    answers = [client.get("https://api.github.com/user") for _ in range(3)]
    out["httpx_h1"] = {"statuses": [a.status_code for a in answers], "version": answers[0].http_version, "body": answers[0].text}
with httpx.Client(http2=True, timeout=30) as client:
    answers = [client.get("https://api.github.com/user") for _ in range(3)]
    out["httpx_h2"] = {"statuses": [a.status_code for a in answers], "version": answers[0].http_version, "body": answers[0].text}

# The SDK with no base URL: it calls https://api.openai.com, and the api key is a placeholder.
client = OpenAI(api_key="sk-placeholder-not-a-credential", max_retries=0)
out["openai"] = [m.id for m in client.models.list().data]

# A tunnel by hand, verified strictly (OpenSSL's X509_V_FLAG_X509_STRICT).
proxy = urlsplit(os.environ["HTTPS_PROXY"])
auth = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
sock = socket.create_connection((proxy.hostname, proxy.port), timeout=30)
sock.sendall(f"CONNECT api.github.com:443 HTTP/1.1\r\nHost: api.github.com:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += sock.recv(1)
out["strict_connect"] = head.split(b"\r\n")[0].decode()
context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
context.verify_flags |= ssl.VERIFY_X509_STRICT
tls = context.wrap_socket(sock, server_hostname="api.github.com")
out["strict_tls"] = tls.version()
with open(sys.argv[1], "w") as leaf:
    leaf.write(ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)))
tls.close()

print(json.dumps(out))
