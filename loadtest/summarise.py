#!/usr/bin/env python3
"""Summarises interleaved oha runs: median req/s per mode and its ratio to a baseline mode.

usage: summarise.py NAME BASELINE MODE... (env: WORK, ROUNDS, DURATION, CONNECTIONS, RESULTS,
MACHINE, SCENARIO, TITLE, optional TARGET_MODE and TARGET_RATIO). Reads WORK/MODE-ROUND.json,
writes RESULTS/NAME.json and RESULTS/NAME.md, and prints the markdown.
"""
import json
import os
import statistics
import sys

name, baseline, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
env = os.environ
work, rounds = env["WORK"], int(env["ROUNDS"])


def summary(mode, r):
    return json.load(open(f"{work}/{mode}-{r}.json"))["summary"]


rps = {m: [summary(m, r)["requestsPerSec"] for r in range(1, rounds + 1)] for m in modes}
codes = {m: json.load(open(f"{work}/{m}-1.json")).get("statusCodeDistribution", {}) for m in modes}
med = {m: statistics.median(v) for m, v in rps.items()}
ratios = {m: med[m] / med[baseline] for m in modes}
result = {
    "scenario": env["SCENARIO"],
    "duration_per_run": env["DURATION"],
    "connections": int(env["CONNECTIONS"]),
    "rounds": rounds,
    "baseline": baseline,
    "rps": rps,
    "median_rps": med,
    "ratio_to_baseline": ratios,
    "status_codes_round_1": codes,
    "machine": json.loads(env["MACHINE"]),
}
target = ""
if env.get("TARGET_MODE"):
    mode, wanted = env["TARGET_MODE"], float(env["TARGET_RATIO"])
    result["target"] = f"{mode} >= {wanted} x {baseline}"
    result["target_met"] = ratios[mode] >= wanted
    target = f"\nTarget: {result['target']}: **{'met' if result['target_met'] else 'missed'}**.\n"
json.dump(result, open(f"{env['RESULTS']}/{name}.json", "w"), indent=2)
rows = "\n".join(f"| {m} | {med[m]:.0f} | {ratios[m]:.3f} | {', '.join(f'{x:.0f}' for x in rps[m])} |" for m in modes)
machine = result["machine"]
md = f"""# {env['TITLE']}

{env['SCENARIO']}; {rounds} interleaved rounds of {env['DURATION']} at {env['CONNECTIONS']} connections.

| mode | median req/s | ratio to {baseline} | runs |
|---|---|---|---|
{rows}
{target}
Status codes in round 1: {codes}.

Machine: {machine['cpu']}, {machine['cores']} cores; {machine['rustc']}; {machine['oha']}.
"""
open(f"{env['RESULTS']}/{name}.md", "w").write(md)
print(md)
