"""The real `mcp` SDK client: a streamable-HTTP session through keyward, one tool call.

Usage: mcp_client.py URL AGENT_KEY
Prints one JSON line: the tools listed and the tool call's result.
"""

import asyncio
import json
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

url, agent_key = sys.argv[1], sys.argv[2]


async def main():
    headers = {"Authorization": f"Bearer {agent_key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(url, http_client=http) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                result = await session.call_tool("add", {"a": 2, "b": 3})
                text = [c.text for c in result.content if getattr(c, "type", "") == "text"]
                print(json.dumps({"tools": [t.name for t in tools.tools], "result": text, "is_error": result.is_error}))


asyncio.run(main())
