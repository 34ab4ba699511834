#!/usr/bin/env python3
"""Summarises interleaved oha runs into RESULTS/NAME.json and RESULTS/NAME.md (and prints the markdown).

usage:
  summarise.py NAME BASELINE MODE...   median req/s per mode and its ratio to BASELINE
  summarise.py NAME --bench DIRECT KEYWARD PROXY...
                                       saturation req/s and, from the fixed-rate runs (rate-MODE-ROUND),
                                       p50/p99/p99.9; ratios to DIRECT and KEYWARD's to the best PROXY
  summarise.py NAME --samples FILE     FILE (JSON) holds {"metrics": {NAME: {"unit", "samples", "target"?}},
                                       "added": {NAME: [A, B, target?]}?, "notes": [..]?}: median, p90, min and
                                       max of each metric, median(A) - median(B) for each added one, and
                                       whether each target ("<= X" or "== X" on the median) is met

env: WORK, ROUNDS, DURATION, CONNECTIONS, RESULTS, MACHINE, SCENARIO, TITLE; optional TARGET_MODE and
TARGET_RATIO (first form) and RATE (--bench). Reads WORK/[TAG]MODE-ROUND.json. --samples needs only RESULTS,
MACHINE, SCENARIO and TITLE.
"""
import json
import os
import statistics
import sys

env = os.environ
machine = json.loads(env["MACHINE"])
work, rounds = env.get("WORK", ""), int(env.get("ROUNDS", "1"))


def run(mode, r):
    return json.load(open(f"{work}/{mode}-{r}.json"))


def per_round(mode, pick):
    return [pick(run(mode, r)) for r in range(1, rounds + 1)]


def codes(mode):
    """Status codes summed over every round: a proxy that answered errors fast must show it."""
    total = {}
    for r in range(1, rounds + 1):
        for code, n in run(mode, r).get("statusCodeDistribution", {}).items():
            total[code] = total.get(code, 0) + n
    return total


def rps(mode):
    return per_round(mode, lambda d: d["summary"]["requestsPerSec"])


def header():
    return {
        "scenario": env["SCENARIO"],
        "duration_per_run": env["DURATION"],
        "connections": int(env["CONNECTIONS"]),
        "rounds": rounds,
        "machine": machine,
    }


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def meets(value, target):
    op, bound = target.split()
    return value <= float(bound) if op == "<=" else value == float(bound) if op == "==" else value >= float(bound)


def samples(name, path):
    data = json.load(open(path))
    stats, rows, checks = {}, [], []
    for metric, m in data["metrics"].items():
        v = m["samples"]
        st = {"unit": m["unit"], "n": len(v), "median": statistics.median(v), "p90": percentile(v, 0.9),
              "min": min(v), "max": max(v), "samples": v}
        if "target" in m:
            st["target"], st["target_met"] = m["target"], meets(st["median"], m["target"])
            checks.append(f"- {metric}: median {st['median']:.3f} {m['unit']}, target {m['target']}: "
                          f"**{'met' if st['target_met'] else 'missed'}**")
        stats[metric] = st
        rows.append(f"| {metric} | {st['n']} | {st['median']:.3f} | {st['p90']:.3f} | {st['min']:.3f} | "
                    f"{st['max']:.3f} | {m['unit']} |")
    added = {}
    for metric, (a, b, *target) in data.get("added", {}).items():
        value = stats[a]["median"] - stats[b]["median"]
        added[metric] = {"value": value, "unit": stats[a]["unit"], "of": [a, b]}
        line = f"- {metric} (median {a} − median {b}): {value:+.3f} {stats[a]['unit']}"
        if target:
            added[metric] |= {"target": target[0], "target_met": meets(value, target[0])}
            line += f", target {target[0]}: **{'met' if added[metric]['target_met'] else 'missed'}**"
        checks.append(line)
    notes = "".join(f"\n{n}\n" for n in data.get("notes", []))
    result = {"scenario": env["SCENARIO"], "metrics": stats, "added": added, "notes": data.get("notes", []),
              "machine": machine}
    table = "\n".join(rows)
    write(name, result, f"""# {env['TITLE']}

{env['SCENARIO']}.

| metric | n | median | p90 | min | max | unit |
|---|---|---|---|---|---|---|
{table}

{chr(10).join(checks)}
{notes}
{footer()}""")


def footer():
    versions = "; ".join(f"{k} {v}" for k, v in machine.items() if k not in ("cpu", "cores", "kernel") and v)
    return f"Machine: {machine['cpu']}, {machine['cores']} cores, Linux {machine['kernel']}; {versions}.\n"


def write(name, result, md):
    json.dump(result, open(f"{env['RESULTS']}/{name}.json", "w"), indent=2)
    open(f"{env['RESULTS']}/{name}.md", "w").write(md)
    print(md)


def ratios(name, baseline, modes):
    runs = {m: rps(m) for m in modes}
    med = {m: statistics.median(v) for m, v in runs.items()}
    ratio = {m: med[m] / med[baseline] for m in modes}
    result = header() | {
        "baseline": baseline,
        "rps": runs,
        "median_rps": med,
        "ratio_to_baseline": ratio,
        "status_codes": {m: codes(m) for m in modes},
    }
    target = ""
    if env.get("TARGET_MODE"):
        mode, wanted = env["TARGET_MODE"], float(env["TARGET_RATIO"])
        result["target"] = f"{mode} >= {wanted} x {baseline}"
        result["target_met"] = ratio[mode] >= wanted
        target = f"\nTarget: {result['target']}: **{'met' if result['target_met'] else 'missed'}**.\n"
    rows = "\n".join(
        f"| {m} | {med[m]:.0f} | {ratio[m]:.3f} | {', '.join(f'{x:.0f}' for x in runs[m])} |" for m in modes
    )
    write(name, result, f"""# {env['TITLE']}

{env['SCENARIO']}; {rounds} interleaved rounds of {env['DURATION']} at {env['CONNECTIONS']} connections.

| mode | median req/s | ratio to {baseline} | runs |
|---|---|---|---|
{rows}
{target}
Status codes over all rounds: {result['status_codes']}.

{footer()}""")


def bench(name, direct, keyward, proxies):
    # REFERENCE: rows measured like the rest but not competitors (keyward's own stack, bare).
    references = env.get("REFERENCE", "").split()
    # SIGNED: keyward on a route whose secret signs (aws-sigv4), measured in the same run.
    signed = env.get("SIGNED", "").split()
    modes = [direct, keyward, *proxies, *signed, *references]
    rate = int(env["RATE"])
    sat = {m: rps(m) for m in modes}
    sat_med = {m: statistics.median(v) for m, v in sat.items()}
    lat = {
        m: {p: statistics.median(per_round(f"rate-{m}", lambda d: d["latencyPercentiles"][p] * 1000)) for p in
            ("p50", "p99", "p99.9")}
        for m in modes
    }
    achieved = {m: statistics.median(rps(f"rate-{m}")) for m in modes}
    best = max(proxies, key=lambda m: sat_med[m])
    added_p99 = {m: lat[m]["p99"] - lat[direct]["p99"] for m in modes}
    targets = {
        "keyward saturation >= 0.45 x direct": sat_med[keyward] / sat_med[direct] >= 0.45,
        f"keyward saturation >= 1.0 x best proxy ({best})": sat_med[keyward] / sat_med[best] >= 1.0,
        f"keyward added p99 at {rate} rps <= 0.25 ms": added_p99[keyward] <= 0.25,
    }
    result = header() | {
        "rate_rps": rate,
        "saturation_rps": sat,
        "saturation_median_rps": sat_med,
        "saturation_ratio_to_direct": {m: sat_med[m] / sat_med[direct] for m in modes},
        "best_proxy": best,
        "keyward_ratio_to_best_proxy": sat_med[keyward] / sat_med[best],
        "references": references,
        "signed": signed,
        "latency_ms_at_rate": lat,
        "achieved_rps_at_rate": achieved,
        "added_p99_ms": added_p99,
        "status_codes": {m: codes(m) for m in modes},
        "status_codes_at_rate": {m: codes(f"rate-{m}") for m in modes},
        "targets_met": targets,
    }
    rows = "\n".join(
        f"| {m} | {sat_med[m]:.0f} | {sat_med[m] / sat_med[direct]:.3f} | {sat_med[m] / sat_med[best]:.3f} "
        f"| {lat[m]['p50']:.3f} | {lat[m]['p99']:.3f} | {lat[m]['p99.9']:.3f} | {added_p99[m]:+.3f} "
        f"| {achieved[m]:.0f} | {', '.join(f'{x:.0f}' for x in sat[m])} |"
        for m in modes
    )
    checks = "\n".join(f"- {t}: **{'met' if ok else 'missed'}**" for t, ok in targets.items())
    reference_text = "".join(
        f"\nReference row `{r}` (not a competitor): `examples/bare_proxy.rs`, the same header injection on "
        f"keyward's own stack (tokio, hyper-util server and pooled client, mimalloc) with nothing else: "
        f"{sat_med[r] / sat_med[direct]:.3f} × direct, {sat_med[r] / sat_med[best]:.3f} × {best}, added p99 "
        f"{added_p99[r]:+.3f} ms. keyward reaches {sat_med[keyward] / sat_med[r]:.3f} × it.\n"
        for r in references
    ) + "".join(
        f"\nRow `{s}`: keyward on a route whose secret is kind `aws-sigv4`: the agent's auth removed, the body "
        f"read whole, the request signed with SigV4 (keys parsed once from the cached secret, the signing key "
        f"derived per request): {sat_med[s] / sat_med[keyward]:.3f} × keyward injecting a header, added p99 "
        f"{added_p99[s]:+.3f} ms ({added_p99[s] - added_p99[keyward]:+.3f} ms over keyward).\n"
        for s in signed
    )
    write(name, result, f"""# {env['TITLE']}

{env['SCENARIO']}. {rounds} rounds, targets in a rotating order each round; each run {env['DURATION']} at
{env['CONNECTIONS']} connections: saturation (as fast as possible) and a fixed {rate} req/s (`-q`, latency
corrected). Medians over the rounds.

| target | saturation req/s | × direct | × best proxy ({best}) | p50 ms @{rate} | p99 ms | p99.9 ms | added p99 ms | achieved req/s | saturation runs |
|---|---|---|---|---|---|---|---|---|---|
{rows}

keyward: {sat_med[keyward] / sat_med[direct]:.3f} × direct, {sat_med[keyward] / sat_med[best]:.3f} × the best of
{', '.join(proxies)} ({best}).
{reference_text}
{checks}

Status codes over all saturation runs: {result['status_codes']}.

{footer()}""")


if __name__ == "__main__":
    if sys.argv[2] == "--samples":
        samples(sys.argv[1], sys.argv[3])
    elif sys.argv[2] == "--bench":
        bench(sys.argv[1], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        ratios(sys.argv[1], sys.argv[2], sys.argv[3:])
