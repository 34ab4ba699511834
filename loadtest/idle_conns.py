#!/usr/bin/env python3
"""Memory with many idle keep-alive agent connections.

usage: idle_conns.py OUT PID PORT PATH KEY CONNECTIONS
Reads the RSS of PID, then opens CONNECTIONS connections to 127.0.0.1:PORT (256 at a time), makes
one keep-alive request on each (so each is an agent connection that went through the pipeline),
leaves them all open and idle, and reads the RSS five times, a second apart. Counts the
connections the server closed meanwhile. Bounded: 120 s for the opening, then everything closes.
Writes the samples file that `summarise.py --samples` reads.
"""
import asyncio
import json
import resource
import sys


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def open_one(port, request, gate, conns):
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        length = next(int(h.split(b":")[1]) for h in head.lower().split(b"\r\n") if h.startswith(b"content-length:"))
        await reader.readexactly(length)
        conns.append((reader, writer))


async def main(out, pid, port, path, key, count):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < count + 100:
        raise SystemExit(f"ulimit -n is {hard}; {count} connections need more")
    request = f"GET {path} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    before = rss_mib(pid)
    conns, gate = [], asyncio.Semaphore(256)
    await asyncio.wait_for(asyncio.gather(*(open_one(port, request, gate, conns) for _ in range(count))), 120)
    await asyncio.sleep(1)
    readings = []
    for _ in range(5):
        readings.append(rss_mib(pid))
        await asyncio.sleep(1)
    closed = sum(1 for reader, _ in conns if reader.at_eof())
    for _, writer in conns:
        writer.close()
    metrics = {
        "rss_before": {"unit": "MiB", "samples": [before]},
        f"rss_with_{count}_idle": {"unit": "MiB", "samples": readings, "target": "<= 64"},
        "per_connection": {"unit": "KiB", "samples": [(r - before) * 1024 / count for r in readings]},
        "closed_by_server_while_idle": {"unit": "count", "samples": [closed]},
    }
    json.dump({"metrics": metrics}, open(out, "w"))


if __name__ == "__main__":
    out, pid, port, path, key, count = sys.argv[1:]
    asyncio.run(main(out, int(pid), int(port), path, key, int(count)))
