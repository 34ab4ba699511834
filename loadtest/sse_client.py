#!/usr/bin/env python3
"""Time to first SSE event, and whether events arrive as they are sent, for several targets.

usage: sse_client.py OUT ROUNDS STREAMS KEY MODE=URL...  (URL or POST:URL for a streamed chat completion)
Each round opens STREAMS concurrent streams to every MODE in turn (interleaved); each stream is
bounded by a 15 s timeout. Per stream: ttfb (request written to the first `data:` event, the
connection already open) and spread (first to last event: an upstream that streams 50 events over
2 s gives about 1,960 ms; a proxy that buffers gives about 0). Writes the samples file that
`summarise.py --samples` reads.
"""
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


# A streamed chat completion that does not ask for usage (keyward asks for it on a metered route).
CHAT = b'{"model":"gpt-4o","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"hello"}]}'


async def stream(url, key):
    # "POST:URL" posts CHAT (a metered call through keyward); a plain URL is a GET.
    post = url.startswith("POST:")
    parts = urlsplit(url.removeprefix("POST:"))
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    method, body = ("POST", CHAT) if post else ("GET", b"")
    extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if post else ""
    request = (f"{method} {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
               f"Accept: text/event-stream\r\n{extra}Connection: close\r\n\r\n").encode() + body
    start = time.perf_counter()
    writer.write(request)
    await writer.drain()
    events, status = [], b""
    while chunk := await reader.read(65536):
        status = status or chunk.split(b"\r\n", 1)[0]
        events += [time.perf_counter()] * chunk.count(b"data:")
    writer.close()
    if b" 200 " not in status or not events:
        raise RuntimeError(f"{url}: {status!r}, {len(events)} events")
    return (events[0] - start) * 1000, (events[-1] - events[0]) * 1000, len(events)


async def main(out, rounds, streams, key, targets):
    metrics = {}
    for mode, url in targets:
        await asyncio.wait_for(stream(url, key), 15)  # warm-up: open the upstream connection
    for _ in range(rounds):
        for mode, url in targets:
            results = await asyncio.gather(*(asyncio.wait_for(stream(url, key), 15) for _ in range(streams)))
            for name, unit, index in (("ttfb", "ms", 0), ("spread", "ms", 1), ("events", "count", 2)):
                metrics.setdefault(f"{mode}_{name}", {"unit": unit, "samples": []})["samples"] += [
                    r[index] for r in results]
    json.dump({"metrics": metrics}, open(out, "w"))


if __name__ == "__main__":
    out, rounds, streams, key, *pairs = sys.argv[1:]
    asyncio.run(main(out, int(rounds), int(streams), key, [tuple(p.split("=", 1)) for p in pairs]))
