#!/usr/bin/env python3
"""Cold start: from spawning `keyward serve` to its first `GET /readyz` answered 200.

usage: cold_start.py OUT RUNS ADMIN_PORT COMMAND...
Polls readiness every millisecond over a fresh connection; each run is bounded by 10 s, and the
process is stopped (SIGTERM, then SIGKILL) before the next. Writes the samples file that
`summarise.py --samples` reads.
"""
import json
import socket
import subprocess
import sys
import time


def ready(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def once(port, command):
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready(port):
            if time.perf_counter() - start > 10 or process.poll() is not None:
                raise RuntimeError(f"not ready within 10 s (exit code {process.poll()})")
            time.sleep(0.001)
        return (time.perf_counter() - start) * 1000
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    out, runs, port, *command = sys.argv[1:]
    samples = [once(int(port), command) for _ in range(int(runs))]
    json.dump({"metrics": {"start_to_ready": {"unit": "ms", "samples": samples, "target": "<= 200"}}}, open(out, "w"))
