"""A fake Amazon Bedrock runtime on loopback that checks every request's SigV4 signature with
botocore's own signer (botocore.auth.SigV4Auth) and the keys it expects, and answers 403 on any
mismatch, as AWS does.

    python3 fake_bedrock.py LOG_PATH REGION SERVICE

The expected keys come from the environment: EXPECT_ACCESS_KEY_ID, EXPECT_SECRET_ACCESS_KEY and,
optionally, EXPECT_SESSION_TOKEN. It prints its port on the first line of stdout, then serves
until killed.

With ROOT_ACCESS_KEY_ID and ROOT_SECRET_ACCESS_KEY set it is also STS: a POST / with
Action=AssumeRole, signed by the root keys for service "sts" (checked with botocore the same way),
returns the expected keys above as the role's temporary credentials, valid for an hour. Every request it receives (method, path, headers, body) is appended to LOG_PATH as a
JSON line, with the verdict, so the test can check what reached the upstream.

Models (the path's model id):
- /model/{id}/invoke, /model/{id}/converse: a JSON answer.
- /model/{id}/invoke-with-response-stream, /model/{id}/converse-stream: an
  application/vnd.amazon.eventstream answer framed with CRCs. The first event is sent at once;
  the rest waits (at most 20 s) for POST /__release, which the agent sends after it has read the
  first event: so an agent only gets its first event in time if the answer streams through.
- the model id "echo-keys": an answer that holds the secret key and session token, to check the
  scrubber removes them.
"""

import base64
import binascii
import datetime
import json
import os
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

LOG_PATH, REGION, SERVICE = sys.argv[1], sys.argv[2], sys.argv[3]
ACCESS_KEY_ID = os.environ["EXPECT_ACCESS_KEY_ID"]
SECRET_ACCESS_KEY = os.environ["EXPECT_SECRET_ACCESS_KEY"]
SESSION_TOKEN = os.environ.get("EXPECT_SESSION_TOKEN") or None
ROOT_ACCESS_KEY_ID = os.environ.get("ROOT_ACCESS_KEY_ID")
ROOT_SECRET_ACCESS_KEY = os.environ.get("ROOT_SECRET_ACCESS_KEY")

released = threading.Event()
log_lock = threading.Lock()


def verify(method, path, headers, body, keys=None, service=None):
    """None when the request carries a valid SigV4 signature by the expected keys (or `keys`, for
    `service`), else why not."""
    access_key_id, secret_access_key, session_token = keys or (ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN)
    service = service or SERVICE
    authorization = headers.get("authorization", "")
    if not authorization.startswith("AWS4-HMAC-SHA256 "):
        return "no SigV4 Authorization header"
    params = dict(
        part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 "):].split(",")
    )
    scope = params.get("Credential", "").split("/")
    if len(scope) != 5 or scope[0] != access_key_id:
        return "signed by an unexpected access key id"
    if scope[2] != REGION or scope[3] != service or scope[4] != "aws4_request":
        return "signed for the wrong region or service: %s" % "/".join(scope[2:])
    amz_date = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return "no valid X-Amz-Date"
    if abs((datetime.datetime.now(datetime.timezone.utc) - signed_at).total_seconds()) > 300:
        return "X-Amz-Date is more than 5 minutes off"
    if scope[1] != amz_date[:8]:
        return "the credential scope's date is not X-Amz-Date's"
    signed_names = params.get("SignedHeaders", "").split(";")
    for required in ("host", "x-amz-date", "content-type"):
        if required in headers and required not in signed_names:
            return "header %s is not signed" % required
    if session_token is not None:
        if headers.get("x-amz-security-token") != session_token:
            return "the session token is missing or wrong"
        if "x-amz-security-token" not in signed_names:
            return "the session token is not signed"
    # botocore recomputes the signature over exactly the headers the request says it signed.
    signed_headers = {name: headers[name] for name in signed_names if name in headers}
    if len(signed_headers) != len(signed_names):
        return "a signed header is missing from the request"
    request = AWSRequest(method=method, url="http://%s%s" % (headers["host"], path), data=body,
                         headers=signed_headers)
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key_id, secret_access_key, session_token), service, REGION)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != params.get("Signature"):
        return "The request signature we calculated does not match the signature you provided."
    return None


def header(name, value):
    name = name.encode()
    value = value.encode()
    return struct.pack("!B", len(name)) + name + struct.pack("!BH", 7, len(value)) + value


def frame(event_type, payload):
    """One application/vnd.amazon.eventstream message: prelude, prelude CRC, headers, payload, CRC."""
    headers = (header(":event-type", event_type) + header(":content-type", "application/json")
               + header(":message-type", "event"))
    payload = json.dumps(payload).encode()
    total = 12 + len(headers) + len(payload) + 4
    prelude = struct.pack("!II", total, len(headers))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + headers + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


def chunk(obj):
    return frame("chunk", {"bytes": base64.b64encode(json.dumps(obj).encode()).decode()})


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, obj, content_type="application/json"):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        raw_path = self.path
        if raw_path == "/__release":
            released.set()
            return self.answer(200, {"released": True})
        headers = {name.lower(): value for name, value in self.headers.items()}
        if raw_path == "/" and ROOT_ACCESS_KEY_ID:
            return self.assume_role(headers, body)
        verdict = verify("POST", raw_path, headers, body)
        with log_lock, open(LOG_PATH, "a") as log:
            log.write(json.dumps({"path": raw_path, "headers": headers, "body": body.decode("utf-8", "replace"),
                                  "verdict": verdict}) + "\n")
        if verdict is not None:
            self.send_response(403)
            self.send_header("x-amzn-errortype", "InvalidSignatureException")
            payload = json.dumps({"message": verdict}).encode()
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        parts = urlsplit(raw_path).path.split("/")
        if len(parts) != 4 or parts[1] != "model":
            return self.answer(404, {"message": "unknown operation"})
        model, operation = unquote(parts[2]), parts[3]
        request = json.loads(body or b"{}")
        if model == "echo-keys":
            return self.answer(200, {"content": [{"type": "text", "text": "keys: %s %s" % (SECRET_ACCESS_KEY, SESSION_TOKEN)}]})
        if operation == "invoke":
            prompt = request["messages"][0]["content"]
            return self.answer(200, {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "Bedrock says hi to: %s" % prompt}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 6},
            })
        if operation == "converse":
            prompt = request["messages"][0]["content"][0]["text"]
            return self.answer(200, {
                "output": {"message": {"role": "assistant", "content": [{"text": "Converse reply to: %s" % prompt}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 5, "outputTokens": 6, "totalTokens": 11},
                "metrics": {"latencyMs": 7},
            })
        if operation in ("invoke-with-response-stream", "converse-stream"):
            return self.stream(operation)
        return self.answer(404, {"message": "unknown operation"})

    def assume_role(self, headers, body):
        verdict = verify("POST", "/", headers, body, (ROOT_ACCESS_KEY_ID, ROOT_SECRET_ACCESS_KEY, None), "sts")
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        with log_lock, open(LOG_PATH, "a") as log:
            log.write(json.dumps({"path": "/", "sts": form, "headers": headers, "verdict": verdict}) + "\n")
        if verdict is not None or form.get("Action") != "AssumeRole":
            self.send_response(403)
            payload = b"<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code>" \
                      b"<Message>refused</Message></Error><RequestId>1</RequestId></ErrorResponse>"
            self.send_header("content-type", "text/xml")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        payload = ("""<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><Credentials><AccessKeyId>%s</AccessKeyId><SecretAccessKey>%s</SecretAccessKey>
<SessionToken>%s</SessionToken><Expiration>%s</Expiration></Credentials>
<AssumedRoleUser><AssumedRoleId>AROAFAKE:%s</AssumedRoleId><Arn>%s</Arn></AssumedRoleUser>
</AssumeRoleResult><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></AssumeRoleResponse>""" % (
            ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN, expires, form.get("RoleSessionName"),
            form.get("RoleArn"))).encode()
        self.send_response(200)
        self.send_header("content-type", "text/xml")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def stream(self, operation):
        if operation == "invoke-with-response-stream":
            first = chunk({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "stream-0 "}})
            rest = [chunk({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "stream-%d " % i}})
                    for i in (1, 2)]
            tail = lambda early: chunk({"type": "message_stop", "released_early": early})
        else:
            first = frame("messageStart", {"role": "assistant"})
            rest = [frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "conv-%d " % i}})
                    for i in (0, 1)]
            rest.append(frame("messageStop", {"stopReason": "end_turn"}))
            tail = lambda early: frame("metadata", {
                "usage": {"inputTokens": 1, "outputTokens": 2, "totalTokens": 3},
                "metrics": {"latencyMs": 1 if early else 0},
            })
        self.send_response(200)
        self.send_header("content-type", "application/vnd.amazon.eventstream")
        self.send_header("x-amzn-bedrock-content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        released.clear()

        def send(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        send(first)
        # The agent releases the rest once it has the first event: it can only if the first
        # event was streamed through to it while this answer is still open.
        early = released.wait(20)
        for message in rest:
            send(message)
        send(tail(early))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
