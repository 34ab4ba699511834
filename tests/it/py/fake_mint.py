"""Fake mint endpoints for keyward's minted-credential tests (tests/it/minted.rs), on loopback.

    fake_mint.py keys DIR      writes test keys: app.pem (a GitHub App key, PKCS#1), app.pub.pem,
                               sa.json (a service-account JSON key, PKCS#8) and sa.pub.pem
    fake_mint.py serve PORT DIR   serves, reading the public keys from DIR

Every signature is verified with independent code (PyJWT over `cryptography`) against the public
key: a GitHub that checks the App JWT (RS256, iss, an exp window of at most 10 minutes) and mints
installation tokens; an OAuth2 token endpoint that checks client authentication (basic or body);
a Google-style token endpoint that checks the service account's JWT assertion. An API on the same
server accepts only live tokens and says what each was minted for. `/_control` changes behaviour
and `/_log` lists every mint request.
"""

import base64
import json
import secrets
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

APP_ID = "12345"
INSTALLATION_ID = 678
CLIENT_ID = "keyward-client"
CLIENT_SECRET = "oauth-client-secret-canary-5b7d9f1e3a"
SA_EMAIL = "keyward-test@example-project.iam.gserviceaccount.com"


def write_keys(directory):
    def pair(name, private_format):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, private_format, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        with open(f"{directory}/{name}.pub.pem", "w") as f:
            f.write(public)
        return pem

    with open(f"{directory}/app.pem", "w") as f:
        f.write(pair("app", serialization.PrivateFormat.TraditionalOpenSSL))
    sa_pem = pair("sa", serialization.PrivateFormat.PKCS8)
    with open(f"{directory}/sa.json", "w") as f:
        json.dump(
            {
                "type": "service_account",
                "project_id": "example-project",
                "private_key_id": "kid-0001",
                "private_key": sa_pem,
                "client_email": SA_EMAIL,
                "client_id": "1000000000",
                "token_uri": "https://oauth2.googleapis.com/token",
            },
            f,
        )


class State:
    def __init__(self, directory):
        with open(f"{directory}/app.pub.pem") as f:
            self.app_public = f.read()
        with open(f"{directory}/sa.pub.pem") as f:
            self.sa_public = f.read()
        self.lock = threading.Lock()
        self.log = []
        # token -> {"kind", "expires", "scope"}
        self.tokens = {}
        self.fail = None  # a status every mint endpoint answers, while set
        self.ttl = 3600  # the lifetime of minted tokens, in seconds
        self.delay = 0.0  # seconds each mint takes
        self.seen = []  # every JWT and assertion keyward sent, for the canary checks

    def mint(self, kind, scope, prefix):
        token = prefix + secrets.token_hex(16)
        with self.lock:
            self.tokens[token] = {"kind": kind, "expires": time.time() + self.ttl, "scope": scope}
        return token


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/json"):
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def record(self, entry, status):
        entry["status"] = status
        entry["at"] = time.time()
        with STATE.lock:
            STATE.log.append(entry)

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/_log":
            with STATE.lock:
                return self.answer(200, STATE.log)
        if path == "/_secrets":
            with STATE.lock:
                return self.answer(200, {"tokens": list(STATE.tokens), "jwts": STATE.seen})
        if path.startswith("/orgs/") and path.endswith("/installation"):
            entry = {"kind": "github-lookup", "owner": path.split("/")[2]}
            ok, why = self.check_app_jwt()
            if not ok:
                self.record(entry, 401)
                return self.answer(401, {"message": why})
            self.record(entry, 200)
            return self.answer(200, {"id": INSTALLATION_ID, "account": {"login": entry["owner"]}})
        return self.api(path)

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        body = self.body()
        if path == "/_control":
            change = json.loads(body)
            with STATE.lock:
                for key in ("fail", "ttl", "delay"):
                    if key in change:
                        setattr(STATE, key, change[key])
                if change.get("revoke_all"):
                    for known in STATE.tokens.values():
                        known["revoked"] = True
            return self.answer(200, {"ok": True})
        if path.startswith("/app/installations/") and path.endswith("/access_tokens"):
            return self.github_mint(path, body)
        if path == "/oauth/token":
            return self.oauth2_mint(body)
        if path == "/google/token":
            return self.google_mint(body)
        return self.api(path)

    def check_app_jwt(self):
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False, "no bearer JWT"
        with STATE.lock:
            STATE.seen.append(auth[len("Bearer "):])
        try:
            claims = jwt.decode(
                auth[len("Bearer "):],
                STATE.app_public,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"], "verify_iat": False},
            )
        except jwt.PyJWTError as e:
            return False, f"JWT rejected: {type(e).__name__}"
        now = time.time()
        if str(claims["iss"]) != APP_ID:
            return False, "wrong iss"
        if claims["exp"] - now > 600 or claims["exp"] - claims["iat"] > 600:
            return False, "exp more than 10 minutes ahead"
        if claims["iat"] > now + 1 or claims["iat"] < now - 120:
            return False, "iat out of window"
        return True, ""

    def github_mint(self, path, body):
        installation = int(path.split("/")[3])
        request = json.loads(body or b"{}")
        entry = {
            "kind": "github",
            "installation": installation,
            "repositories": request.get("repositories"),
            "permissions": request.get("permissions"),
            "api_version": self.headers.get("X-GitHub-Api-Version"),
            "accept": self.headers.get("Accept"),
        }
        time.sleep(STATE.delay)
        if STATE.fail:
            self.record(entry, STATE.fail)
            return self.answer(STATE.fail, {"message": "mint refused by the test"})
        ok, why = self.check_app_jwt()
        if not ok:
            self.record(entry, 401)
            return self.answer(401, {"message": why})
        if installation != INSTALLATION_ID:
            self.record(entry, 404)
            return self.answer(404, {"message": "Not Found"})
        scope = {"repositories": request.get("repositories"), "permissions": request.get("permissions")}
        token = STATE.mint("github", scope, "ghs_")
        expires = datetime.fromtimestamp(STATE.tokens[token]["expires"], timezone.utc)
        self.record(entry, 201)
        return self.answer(
            201,
            {"token": token, "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"), "permissions": scope["permissions"] or {}},
        )

    def oauth2_mint(self, body):
        form = urllib.parse.parse_qs(body.decode(), keep_blank_values=True)
        one = lambda name: (form.get(name) or [None])[0]
        entry = {"kind": "oauth2", "scope": one("scope"), "audience": one("audience"), "auth": None}
        time.sleep(STATE.delay)
        if STATE.fail:
            self.record(entry, STATE.fail)
            return self.answer(STATE.fail, {"error": "temporarily_unavailable"})
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            client = (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password))
            entry["auth"] = "basic"
        else:
            client = (one("client_id"), one("client_secret"))
            entry["auth"] = "body" if client[0] else None
        if one("grant_type") != "client_credentials":
            self.record(entry, 400)
            return self.answer(400, {"error": "unsupported_grant_type"})
        if client != (CLIENT_ID, CLIENT_SECRET):
            self.record(entry, 401)
            return self.answer(401, {"error": "invalid_client"})
        token = STATE.mint("oauth2", {"scope": one("scope")}, "oat_")
        self.record(entry, 200)
        return self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": STATE.ttl})

    def google_mint(self, body):
        form = urllib.parse.parse_qs(body.decode())
        one = lambda name: (form.get(name) or [None])[0]
        entry = {"kind": "google", "scope": None, "kid": None}
        time.sleep(STATE.delay)
        if STATE.fail:
            self.record(entry, STATE.fail)
            return self.answer(STATE.fail, {"error": "temporarily_unavailable"})
        if one("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            self.record(entry, 400)
            return self.answer(400, {"error": "unsupported_grant_type"})
        token_url = f"http://{self.headers.get('Host')}/google/token"
        with STATE.lock:
            STATE.seen.append(one("assertion") or "")
        try:
            entry["kid"] = jwt.get_unverified_header(one("assertion")).get("kid")
            claims = jwt.decode(
                one("assertion"),
                STATE.sa_public,
                algorithms=["RS256"],
                audience=token_url,
                options={"require": ["iat", "exp", "iss", "aud", "scope"]},
            )
        except jwt.PyJWTError as e:
            self.record(entry, 400)
            return self.answer(400, {"error": "invalid_grant", "error_description": type(e).__name__})
        entry["scope"] = claims["scope"]
        if claims["iss"] != SA_EMAIL or claims["exp"] - claims["iat"] > 3600:
            self.record(entry, 400)
            return self.answer(400, {"error": "invalid_grant"})
        token = STATE.mint("google", {"scope": claims["scope"]}, "ya29.")
        self.record(entry, 200)
        return self.answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": STATE.ttl})

    def api(self, path):
        """The API behind the tokens: 200 with what the presented token was minted for, 401 for any
        other token. `/echo` also echoes the token, for the scrubber."""
        auth = self.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1] if " " in auth else ""
        with STATE.lock:
            known = STATE.tokens.get(token)
        if not known or known.get("revoked") or known["expires"] < time.time():
            return self.answer(401, {"message": "Bad credentials"})
        body = {"ok": True, "kind": known["kind"], "scope": known["scope"], "path": path}
        if path.endswith("/echo"):
            body["echo"] = token
        return self.answer(200, body)


if __name__ == "__main__":
    if sys.argv[1] == "keys":
        write_keys(sys.argv[2])
    else:
        STATE = State(sys.argv[3])
        # A deep accept queue: the tests make 100 calls at once.
        ThreadingHTTPServer.request_queue_size = 256
        server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
        server.daemon_threads = True
        server.serve_forever()
