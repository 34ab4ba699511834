#!/usr/bin/env bash
# The forward proxy's cost (issue 17): HTTPS through an intercepted tunnel against direct TLS to
# the same local upstream (nginx terminating TLS in front of bench_upstream), keep-alive, same
# run, ROUNDS interleaved rounds; the time to open a new tunnel (CONNECT, TLS handshake, one
# request) with a cached leaf and with a fresh one; keyward's RSS with TUNNELS (1,000) open
# tunnels. Writes loadtest/results/forward-proxy.{json,md}. Loopback only, every run bounded.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
TUNNELS=${TUNNELS:-1000}
FRESH=${FRESH:-200}

if [ -z "${NO_BUILD:-}" ]; then
  (cd "$ROOT" && nice cargo build --release --locked --example forward_bench)
fi
build_release
BENCH="$ROOT/target/release/examples/forward_bench"
need_tool nginx
ulimit -n "$(ulimit -Hn)"

# A test CA and a wildcard leaf for *.bench.test, for nginx terminating TLS in front of the upstream.
make_test_ca
start_upstream 18961
start_nginx_tls 18962 18961

# keyward: one route for bench.test, and FRESH routes h0..h(FRESH-1).bench.test, so every new
# tunnel to one of them needs a leaf signed on the spot.
hash=$(bench_secrets)
fresh_hosts=$(seq 0 $((FRESH - 1)) | sed 's/.*/"h&.bench.test"/' | paste -sd, -)
cat > "$WORK/keyward.toml" <<TOML
[server]
listen = "127.0.0.1:18960"
admin_listen = "127.0.0.1:18963"
max_connections = 16384
[forward_proxy]
listen = "127.0.0.1:18964"
[audit]
path = "$WORK/audit.jsonl"
[[sources]]
name = "bench"
provider = "file"
path = "$WORK/secrets.json"
[[routes]]
name = "bench"
hosts = ["bench.test"]
ports = [443]
connect_to = "127.0.0.1:18962"
upstream_ca_file = "$WORK/ca.pem"
inject = { header = "authorization", value = "Bearer {{secret}}" }
[[routes]]
name = "fresh"
hosts = [$fresh_hosts]
connect_to = "127.0.0.1:18962"
upstream_ca_file = "$WORK/ca.pem"
inject = { header = "authorization", value = "Bearer {{secret}}" }
[roles.bench]
grants = [
  { route = "bench", secret = "BENCH_KEY", methods = ["GET"], paths = ["/**"] },
  { route = "fresh", secret = "BENCH_KEY", methods = ["GET"], paths = ["/**"] },
]
[[agents]]
id = "bench-agent"
role = "bench"
key_sha256 = "$hash"
TOML
start_keyward "$WORK/keyward.toml" 18963
KEYWARD_PID=${PIDS[-1]}
KEYWARD_CA="$WORK/forward-ca.pem"
THROUGH=(--proxy 127.0.0.1:18964 --auth "bench-agent:$BENCH_KEY" --ca "$KEYWARD_CA")
DIRECT=(--connect 127.0.0.1:18962 --ca "$WORK/ca.pem")

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS: direct TLS, then through the forward proxy (-c $CONNECTIONS, ${DURATION}s each)"
  "$BENCH" rps --host bench.test "${DIRECT[@]}" --connections "$CONNECTIONS" --seconds "$DURATION" > "$WORK/direct-$round.json"
  "$BENCH" rps --host bench.test "${THROUGH[@]}" --connections "$CONNECTIONS" --seconds "$DURATION" > "$WORK/tunnel-$round.json"
done
echo "new tunnels: $FRESH with the cached leaf of bench.test, then $FRESH hosts with a fresh leaf each"
"$BENCH" tunnels --hosts bench.test "${THROUGH[@]}" > /dev/null # signs and caches its leaf
cached_hosts=$(seq "$FRESH" | sed "s/.*/bench.test/" | paste -sd, -)
"$BENCH" tunnels --hosts "$cached_hosts" "${THROUGH[@]}" > "$WORK/tunnels-cached.json"
"$BENCH" tunnels --hosts "$(seq 0 $((FRESH - 1)) | sed 's/.*/h&.bench.test/' | paste -sd, -)" "${THROUGH[@]}" > "$WORK/tunnels-fresh.json"
echo "RSS with $TUNNELS open tunnels"
"$BENCH" hold --host bench.test "${THROUGH[@]}" --count "$TUNNELS" --pid "$KEYWARD_PID" > "$WORK/hold.json"

MACHINE=$(machine_json) WORK="$WORK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" \
  FRESH="$FRESH" TUNNELS="$TUNNELS" RESULTS="$RESULTS" python3 - <<'PY'
import json, os, statistics
work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
load = lambda name: json.load(open(f"{work}/{name}.json"))
direct = [load(f"direct-{r}") for r in range(1, rounds + 1)]
tunnel = [load(f"tunnel-{r}") for r in range(1, rounds + 1)]
med = lambda runs, key: statistics.median(r[key] for r in runs)
result = {
    "machine": json.loads(os.environ["MACHINE"]),
    "rounds": rounds, "duration_s": int(os.environ["DURATION"]), "connections": int(os.environ["CONNECTIONS"]),
    "direct_tls": {"rps": med(direct, "rps"), "p50_ms": med(direct, "p50_ms"), "p99_ms": med(direct, "p99_ms"), "errors": sum(r["errors"] for r in direct)},
    "forward_proxy": {"rps": med(tunnel, "rps"), "p50_ms": med(tunnel, "p50_ms"), "p99_ms": med(tunnel, "p99_ms"), "errors": sum(r["errors"] for r in tunnel)},
    "new_tunnel_cached_leaf": load("tunnels-cached"),
    "new_tunnel_fresh_leaf": load("tunnels-fresh"),
    "open_tunnels": load("hold"),
}
result["ratio_rps"] = result["forward_proxy"]["rps"] / result["direct_tls"]["rps"]
out = os.environ["RESULTS"]
json.dump(result, open(f"{out}/forward-proxy.json", "w"), indent=2)
d, f, c, n, h = result["direct_tls"], result["forward_proxy"], result["new_tunnel_cached_leaf"], result["new_tunnel_fresh_leaf"], result["open_tunnels"]
md = f"""# Forward proxy

HTTPS GET /json1k (1 KiB) with HTTP/1.1 keep-alive, {result['connections']} connections, {rounds} interleaved rounds of {result['duration_s']} s (medians). The upstream is nginx terminating TLS in front of bench_upstream; "direct" is TLS straight to nginx, "forward proxy" is CONNECT through keyward, TLS to keyward's leaf, the full pipeline (identity, grant, cached secret, injection, scrubbing, audit `os`), and keyward's own TLS connection to nginx.

| target | req/s | p50 ms | p99 ms | errors |
|---|---|---|---|---|
| direct TLS | {d['rps']:.0f} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | {d['errors']} |
| through the forward proxy | {f['rps']:.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {f['errors']} |

Forward proxy / direct: {result['ratio_rps']:.2f}.

| new tunnel (CONNECT, TLS handshake, one request), one after another | tunnels | mean ms | p50 ms | p99 ms |
|---|---|---|---|---|
| cached leaf (same host) | {c['tunnels']} | {c['mean_ms']:.2f} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} |
| fresh leaf (a new host each time: key generation and signing) | {n['tunnels']} | {n['mean_ms']:.2f} | {n['p50_ms']:.2f} | {n['p99_ms']:.2f} |

RSS with {h['tunnels']} open tunnels (each after one request): {h['rss_before_kib'] / 1024:.1f} MiB before, {h['rss_with_kib'] / 1024:.1f} MiB with them ({h['per_tunnel_kib']:.1f} KiB per tunnel); opened in {h['opened_in_s']:.1f} s.

Machine: {result['machine'].get('cpu', '')}, {result['machine'].get('cores', '')} cores.
"""
open(f"{out}/forward-proxy.md", "w").write(md)
print(md)
PY
