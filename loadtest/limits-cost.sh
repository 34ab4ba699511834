#!/usr/bin/env bash
# The limiters' cost per request: throughput through keyward (1 KiB responses) with limits off,
# with a local (governor) quota, and with a Redis quota, in one run with interleaved rounds
# (median of ROUNDS). The quota is set high enough never to throttle, so only its cost shows.
# Writes loadtest/results/limits-cost.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}
REDIS_PORT=18399

need_oha
build_release
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)"; exit 1; }
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
PIDS+=($!)
start_upstream 18381
QUOTA=', rate = "1000000/s", burst = 1000000'
declare -A PORT=([off]=18380 [local]=18382 [redis]=18384)
keyward_config 18380 18390 18381 true os "" "" > "$WORK/off.toml"
keyward_config 18382 18392 18381 true os "$QUOTA" "" > "$WORK/local.toml"
keyward_config 18384 18394 18381 true os "$QUOTA" "$(printf '[limits]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:%s"' "$REDIS_PORT")" > "$WORK/redis.toml"
for mode in off local redis; do
  start_keyward "$WORK/$mode.toml" $((PORT[$mode] + 10))
done

for round in $(seq "$ROUNDS"); do
  for mode in off local redis; do
    echo "round $round/$ROUNDS: limits $mode (-z $DURATION -c $CONNECTIONS)"
    oha_json "$mode-$round" "http://127.0.0.1:${PORT[$mode]}/bench/json1k" -z "$DURATION" -c "$CONNECTIONS" \
      -H "authorization: Bearer $BENCH_KEY"
  done
done

MACHINE=$(machine_json) WORK="$WORK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" RESULTS="$RESULTS" python3 - <<'PY'
import json, os, statistics
work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
modes = ("off", "local", "redis")
rps = {m: [json.load(open(f"{work}/{m}-{r}.json"))["summary"]["requestsPerSec"] for r in range(1, rounds + 1)] for m in modes}
codes = {m: json.load(open(f"{work}/{m}-1.json")).get("statusCodeDistribution", {}) for m in modes}
med = {m: statistics.median(v) for m, v in rps.items()}
result = {
  "scenario": "1 KiB JSON responses through keyward; limits off vs a local governor quota vs a Redis GCRA quota (never throttling)",
  "duration_per_run": os.environ["DURATION"], "connections": int(os.environ["CONNECTIONS"]), "rounds": rounds,
  "rps": rps, "median_rps": med, "status_codes_round_1": codes,
  "ratio_local_to_off": med["local"] / med["off"], "ratio_redis_to_off": med["redis"] / med["off"],
  "machine": json.loads(os.environ["MACHINE"]),
}
json.dump(result, open(f"{os.environ['RESULTS']}/limits-cost.json", "w"), indent=2)
rows = "\n".join(f"| {m} | {med[m]:.0f} | {med[m] / med['off']:.3f} | {', '.join(f'{x:.0f}' for x in rps[m])} |" for m in modes)
md = f"""# Limiter cost

{result['scenario']}; {rounds} interleaved rounds of {result['duration_per_run']} at {result['connections']} connections; Redis on loopback.

| limits | median req/s | ratio to off | runs |
|---|---|---|---|
{rows}

Status codes in round 1: {codes}.

Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; {result['machine']['rustc']}; {result['machine']['oha']}.
"""
open(f"{os.environ['RESULTS']}/limits-cost.md", "w").write(md)
print(md)
PY
