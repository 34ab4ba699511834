# Shared helpers for the load tests: build, start loopback servers, run oha, summarise.
# Every server binds to 127.0.0.1 and is stopped on exit; every load run is bounded by -z.

set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS:-"$ROOT/loadtest/results"}
mkdir -p "$RESULTS"
WORK=$(mktemp -d)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

need_oha() {
  command -v oha >/dev/null 2>&1 || { echo "installing oha (cargo install oha --locked)"; cargo install oha --locked; }
}

build_release() {
  echo "building keyward and bench_upstream (release)"
  (cd "$ROOT" && cargo build --release --locked --bin keyward --example bench_upstream)
  KEYWARD="$ROOT/target/release/keyward"
  UPSTREAM="$ROOT/target/release/examples/bench_upstream"
}

# wait_http URL: up to 30 s for a 200.
wait_http() {
  for _ in $(seq 300); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

start_upstream() { # PORT
  "$UPSTREAM" "127.0.0.1:$1" 2>"$WORK/upstream-$1.log" &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$1/json1k"
}

# A 51-character demo credential and the benchmark agent's key.
BENCH_SECRET="sk-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
BENCH_KEY="kw_benchAgentKey0123456789abcdefghijklmnopqrstu"

# keyward_config PORT ADMIN UPSTREAM_PORT SCRUB(true|false) [DURABILITY] [GRANT_EXTRA] [LIMITS_TOML] > file
keyward_config() {
  local hash
  hash=$(printf '%s' "$BENCH_KEY" | sha256sum | cut -d' ' -f1)
  printf '{"BENCH_KEY": "%s"}\n' "$BENCH_SECRET" > "$WORK/secrets.json"
  chmod 600 "$WORK/secrets.json"
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
[audit]
path = "$WORK/audit-$1.jsonl"
durability = "${5:-os}"
[[sources]]
name = "bench"
provider = "file"
path = "$WORK/secrets.json"
[[routes]]
name = "bench"
prefix = "/bench"
upstream = "http://127.0.0.1:$3"
scrub_responses = $4
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }
[roles.bench]
grants = [{ route = "bench", secret = "BENCH_KEY", methods = ["GET", "POST"], paths = ["/**"]${6:-} }]
[[agents]]
id = "bench-agent"
role = "bench"
key_sha256 = "$hash"
${7:-}
TOML
}

start_keyward() { # CONFIG_FILE ADMIN_PORT
  "$KEYWARD" --log warn serve --config "$1" 2>"$1.log" &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$2/readyz"
}

# oha_json NAME URL [oha args...]: one bounded run, JSON kept in $WORK/NAME.json
oha_json() {
  local name=$1 url=$2
  shift 2
  oha --no-tui --output-format json "$@" "$url" > "$WORK/$name.json"
}

# run_rounds PATH MODE=PORT...: ROUNDS interleaved oha runs of PATH against each mode's port.
run_rounds() {
  local path=$1
  shift
  for round in $(seq "$ROUNDS"); do
    for pair in "$@"; do
      echo "round $round/$ROUNDS: ${pair%%=*} (-z $DURATION -c $CONNECTIONS)"
      oha_json "${pair%%=*}-$round" "http://127.0.0.1:${pair#*=}$path" -z "$DURATION" -c "$CONNECTIONS" \
        -H "authorization: Bearer $BENCH_KEY"
    done
  done
}

# summarise NAME BASELINE MODE...: medians and ratios into $RESULTS/NAME.{json,md}
# (SCENARIO and TITLE must be set; TARGET_MODE/TARGET_RATIO optionally).
summarise() {
  MACHINE=$(machine_json) WORK="$WORK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" \
    RESULTS="$RESULTS" python3 "$ROOT/loadtest/summarise.py" "$@"
}

machine_json() {
  python3 - <<PY
import json, platform, subprocess
def run(*a):
    try: return subprocess.run(a, capture_output=True, text=True).stdout.strip()
    except Exception: return ""
cpu = next((l.split(":",1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
print(json.dumps({"cpu": cpu, "cores": int(run("nproc") or 0), "kernel": platform.release(),
  "rustc": run("rustc", "--version"), "oha": run("oha", "--version"),
  "keyward": run("$KEYWARD", "--version")}))
PY
}
