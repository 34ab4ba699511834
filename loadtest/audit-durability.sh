#!/usr/bin/env bash
# The audit trail's cost: throughput through keyward (1 KiB JSON responses) with
# audit.durability = "os" and "fsync", each as a ratio to "none", in one run with
# interleaved rounds (median of ROUNDS). Target: "os" costs at most 10% of throughput.
# Writes loadtest/results/audit-durability.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}

need_oha
build_release
start_upstream 18281
declare -A PORT=([none]=18280 [os]=18282 [fsync]=18284)
for mode in none os fsync; do
  keyward_config "${PORT[$mode]}" $((PORT[$mode] + 10)) 18281 true "$mode" > "$WORK/$mode.toml"
  start_keyward "$WORK/$mode.toml" $((PORT[$mode] + 10))
done

for round in $(seq "$ROUNDS"); do
  for mode in none os fsync; do
    echo "round $round/$ROUNDS: durability $mode (-z $DURATION -c $CONNECTIONS)"
    oha_json "$mode-$round" "http://127.0.0.1:${PORT[$mode]}/bench/json1k" -z "$DURATION" -c "$CONNECTIONS" \
      -H "authorization: Bearer $BENCH_KEY"
  done
done

MACHINE=$(machine_json) WORK="$WORK" ROUNDS="$ROUNDS" DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" RESULTS="$RESULTS" python3 - <<'PY'
import json, os, statistics
work, rounds = os.environ["WORK"], int(os.environ["ROUNDS"])
rps = {m: [json.load(open(f"{work}/{m}-{r}.json"))["summary"]["requestsPerSec"] for r in range(1, rounds + 1)] for m in ("none", "os", "fsync")}
med = {m: statistics.median(v) for m, v in rps.items()}
result = {
  "scenario": "1 KiB JSON responses through keyward with the full pipeline; audit.durability none vs os vs fsync",
  "duration_per_run": os.environ["DURATION"], "connections": int(os.environ["CONNECTIONS"]), "rounds": rounds,
  "rps": rps, "median_rps": med,
  "ratio_os_to_none": med["os"] / med["none"], "ratio_fsync_to_none": med["fsync"] / med["none"],
  "target": "os >= 0.90 x none", "target_met": med["os"] / med["none"] >= 0.90,
  "machine": json.loads(os.environ["MACHINE"]),
}
json.dump(result, open(f"{os.environ['RESULTS']}/audit-durability.json", "w"), indent=2)
rows = "\n".join(f"| {m} | {med[m]:.0f} | {med[m] / med['none']:.3f} | {', '.join(f'{x:.0f}' for x in rps[m])} |" for m in ("none", "os", "fsync"))
md = f"""# Audit durability cost

{result['scenario']}; {rounds} interleaved rounds of {result['duration_per_run']} at {result['connections']} connections.

| durability | median req/s | ratio to none | runs |
|---|---|---|---|
{rows}

Target: "os" costs at most 10% (ratio >= 0.90): **{'met' if result['target_met'] else 'missed'}**.

Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; {result['machine']['rustc']}; {result['machine']['oha']}.
"""
open(f"{os.environ['RESULTS']}/audit-durability.md", "w").write(md)
print(md)
PY
