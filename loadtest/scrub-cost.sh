#!/usr/bin/env bash
# The scrubber's cost: throughput through keyward on a 16 KiB streamed response with response
# scrubbing on versus off, measured in one run with interleaved rounds (median of ROUNDS).
# Writes loadtest/results/scrub-cost.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}

need_oha
build_release
start_upstream 18181
keyward_config 18180 18190 18181 true > "$WORK/on.toml"
keyward_config 18182 18192 18181 false > "$WORK/off.toml"
start_keyward "$WORK/on.toml" 18190
start_keyward "$WORK/off.toml" 18192

for round in $(seq "$ROUNDS"); do
  for mode in on off; do
    port=$([ "$mode" = on ] && echo 18180 || echo 18182)
    echo "round $round/$ROUNDS: scrubber $mode (-z $DURATION -c $CONNECTIONS)"
    oha_json "$mode-$round" "http://127.0.0.1:$port/bench/stream16k" -z "$DURATION" -c "$CONNECTIONS" \
      -H "authorization: Bearer $BENCH_KEY"
  done
done

MACHINE=$(machine_json) WORK="$WORK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" RESULTS="$RESULTS" python3 - <<'PY'
import json, os, statistics
work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
def runs(mode):
    out = []
    for r in range(1, rounds + 1):
        s = json.load(open(f"{work}/{mode}-{r}.json"))["summary"]
        out.append(s["requestsPerSec"])
    return out
on, off = runs("on"), runs("off")
result = {
  "scenario": "16 KiB streamed response (16 x 1 KiB chunks) through keyward, scrubber on vs off",
  "duration_per_run": os.environ["DURATION"], "connections": int(os.environ["CONNECTIONS"]), "rounds": rounds,
  "rps_on": on, "rps_off": off,
  "median_rps_on": statistics.median(on), "median_rps_off": statistics.median(off),
  "ratio_on_to_off": statistics.median(on) / statistics.median(off),
  "machine": json.loads(os.environ["MACHINE"]),
}
json.dump(result, open(f"{os.environ['RESULTS']}/scrub-cost.json", "w"), indent=2)
md = f"""# Scrubber cost

{result['scenario']}; {rounds} interleaved rounds of {result['duration_per_run']} at {result['connections']} connections.

| scrubber | median req/s | runs |
|---|---|---|
| on | {result['median_rps_on']:.0f} | {', '.join(f'{x:.0f}' for x in on)} |
| off | {result['median_rps_off']:.0f} | {', '.join(f'{x:.0f}' for x in off)} |

Throughput with the scrubber on is **{result['ratio_on_to_off']:.3f}x** that with it off.

Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; {result['machine']['rustc']}; {result['machine']['oha']}.
"""
open(f"{os.environ['RESULTS']}/scrub-cost.md", "w").write(md)
print(md)
PY
