"""A real MCP server (the `mcp` SDK's MCPServer, formerly FastMCP) on streamable HTTP, on
127.0.0.1, that requires the credential keyward injects.

Usage: mcp_server.py PORT TOKEN HEADERS_LOG
Every request's headers are appended to HEADERS_LOG as one JSON line, so the test can check
that no agent key reached this upstream. A request without `Authorization: Bearer TOKEN` gets
the SDK's own 401.
"""

import asyncio
import json
import sys

import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer

port, token, headers_log = int(sys.argv[1]), sys.argv[2], sys.argv[3]


class InjectedTokenOnly:
    """Accepts exactly the token keyward injects."""

    async def verify_token(self, presented: str) -> AccessToken | None:
        if presented == token:
            return AccessToken(token=presented, client_id="keyward", scopes=[])
        return None


server = MCPServer(
    "keyward-test",
    log_level="WARNING",
    token_verifier=InjectedTokenOnly(),
    auth=AuthSettings(
        issuer_url="http://127.0.0.1/issuer",
        resource_server_url=f"http://127.0.0.1:{port}/mcp",
        # The verifier above compares the whole token; there is no audience to check.
        validate_token_resource=False,
    ),
)


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


app = server.streamable_http_app()


async def recording(scope, receive, send):
    """Records each request's head, and ends an event stream's body a moment after its last
    event, as it reaches a client across a network: the client has its answer and closes first."""
    if scope["type"] != "http":
        return await app(scope, receive, send)
    if True:
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
        with open(headers_log, "a", encoding="utf-8") as log:
            log.write(json.dumps({"method": scope["method"], "target": target, "headers": headers}) + "\n")
    streaming = False

    async def lingering(message):
        nonlocal streaming
        if message["type"] == "http.response.start":
            streaming = any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in message["headers"])
        elif message["type"] == "http.response.body" and streaming and not message.get("more_body", False):
            await asyncio.sleep(0.3)
        await send(message)

    await app(scope, receive, lingering)


uvicorn.run(recording, host="127.0.0.1", port=port, log_level="warning")
