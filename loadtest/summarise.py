#!/usr/bin/env python3
"""Summarises interleaved oha runs into RESULTS/NAME.json and RESULTS/NAME.md (and prints the markdown).

usage:
  summarise.py NAME BASELINE MODE...   median req/s per mode and its ratio to BASELINE
  summarise.py NAME --bench DIRECT KEYWARD PROXY...
                                       saturation req/s and, from the fixed-rate runs (rate-MODE-ROUND),
                                       p50/p99/p99.9; ratios to DIRECT, to the floor (REFERENCE) and to the
                                       best PROXY; CPU per request (cpu-MODE-ROUND.json and .cpu_ns); issue
                                       20's targets; the new-path rows (SIGNED, FORWARD, CHAT)
  summarise.py NAME --samples FILE     FILE (JSON) holds {"metrics": {NAME: {"unit", "samples", "target"?}},
                                       "added": {NAME: [A, B, target?]}?, "notes": [..]?}: median, p90, min and
                                       max of each metric, median(A) - median(B) for each added one, and
                                       whether each target ("<= X" or "== X" on the median) is met

env: WORK, ROUNDS, DURATION, CONNECTIONS, RESULTS, MACHINE, SCENARIO, TITLE; optional TARGET_MODE and
TARGET_RATIO (first form); RATE and optionally REFERENCE, SIGNED, FORWARD ("DIRECT_TLS FORWARD"), CHAT
("DIRECT UNMETERED METERED"), CPU (modes with CPU runs), CPU_RATE, CPU_REQUESTS (--bench). Reads WORK/[TAG]MODE-ROUND.json. --samples needs only RESULTS,
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


def cpu_us(mode):
    """µs on CPU per answered request in each round: cpu-MODE-ROUND.cpu_ns over the answers in cpu-MODE-ROUND.json."""
    out = []
    for r in range(1, rounds + 1):
        ns = int(open(f"{work}/cpu-{mode}-{r}.cpu_ns").read())
        answered = sum(run(f"cpu-{mode}", r).get("statusCodeDistribution", {}).values())
        out.append(ns / 1000 / answered if answered else float("nan"))
    return out


def verdict(ok):
    return f"**{'met' if ok else 'missed'}**"


def bench(name, direct, keyward, proxies):
    # REFERENCE: keyward's floor (bare_proxy: its stack doing only the injection); the first one is
    # what the saturation target is a ratio of.
    references = env.get("REFERENCE", "").split()
    # SIGNED: keyward on a route whose secret signs (aws-sigv4), measured in the same run.
    signed = env.get("SIGNED", "").split()
    # FORWARD: "DIRECT_TLS FORWARD": HTTPS directly and through keyward's forward proxy (with rate- runs).
    forward = env.get("FORWARD", "").split()
    # CHAT: "DIRECT UNMETERED METERED": a streamed chat completion, saturation only.
    chat = env.get("CHAT", "").split()
    # CPU: modes with cpu-MODE-ROUND runs (CPU per request at CPU_RATE).
    cpu_modes = env.get("CPU", "").split()
    modes = [direct, keyward, *references, *proxies, *signed]
    rate = int(env["RATE"])
    cpu_rate = int(env.get("CPU_RATE", "4000"))
    timed = modes + forward
    sat = {m: rps(m) for m in timed + chat}
    sat_med = {m: statistics.median(v) for m, v in sat.items()}
    lat = {
        m: {p: statistics.median(per_round(f"rate-{m}", lambda d: d["latencyPercentiles"][p] * 1000)) for p in
            ("p50", "p99", "p99.9")}
        for m in timed
    }
    achieved = {m: statistics.median(rps(f"rate-{m}")) for m in timed}
    best = max(proxies, key=lambda m: sat_med[m])
    added_p99 = {m: lat[m]["p99"] - lat[direct]["p99"] for m in modes}
    if forward:
        added_p99 |= {m: lat[m]["p99"] - lat[forward[0]]["p99"] for m in forward}
    cpu = {m: cpu_us(m) for m in cpu_modes}
    cpu_med = {m: statistics.median(v) for m, v in cpu.items()}
    floor = references[0] if references else None

    targets, target_values = {}, {}
    if floor:
        t = f"keyward saturation ≥ 0.80 × bare_proxy (row {floor})"
        target_values[t] = sat_med[keyward] / sat_med[floor]
        targets[t] = target_values[t] >= 0.80
    t = f"keyward added p99 at {rate:,} req/s ≤ 0.25 ms over direct"
    target_values[t], targets[t] = added_p99[keyward], added_p99[keyward] <= 0.25
    if keyward in cpu_med:
        t = f"keyward CPU per request at {cpu_rate:,} req/s ≤ 50 µs"
        target_values[t], targets[t] = cpu_med[keyward], cpu_med[keyward] <= 50

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
        "status_codes": {m: codes(m) for m in timed + chat},
        "status_codes_at_rate": {m: codes(f"rate-{m}") for m in timed},
        "targets_met": targets,
        "target_values": target_values,
    }
    if floor:
        result["saturation_ratio_to_floor"] = {m: sat_med[m] / sat_med[floor] for m in modes}
    if cpu:
        result |= {
            "cpu_rate_rps": cpu_rate,
            "cpu_requests_per_run": int(env.get("CPU_REQUESTS", "0")),
            "cpu_us_per_request": cpu,
            "cpu_us_per_request_median": cpu_med,
            "status_codes_cpu": {m: codes(f"cpu-{m}") for m in cpu_modes},
        }
        if floor in cpu_med and keyward in cpu_med:
            result["keyward_cpu_ratio_to_floor"] = cpu_med[keyward] / cpu_med[floor]
    if forward:
        result["forward"] = {"direct_tls": forward[0], "forward": forward[1],
                             "ratio_to_direct_tls": sat_med[forward[1]] / sat_med[forward[0]]}
    if chat:
        result["chat"] = {"direct": chat[0], "unmetered": chat[1], "metered": chat[2],
                          "metered_ratio_to_unmetered": sat_med[chat[2]] / sat_med[chat[1]],
                          "metered_ratio_to_direct": sat_med[chat[2]] / sat_med[chat[0]]}

    def cpu_cell(m):
        return f"{cpu_med[m]:.1f}" if m in cpu_med else "–"

    best_label = f"best proxy ({best})" if len(proxies) > 1 else best
    floor_col = f" × bare_proxy ({floor}) |" if floor else ""
    rows = "\n".join(
        f"| {m} | {sat_med[m]:.0f} | {sat_med[m] / sat_med[direct]:.3f} |"
        + (f" {sat_med[m] / sat_med[floor]:.3f} |" if floor else "")
        + f" {sat_med[m] / sat_med[best]:.3f} | {lat[m]['p50']:.3f} | {lat[m]['p99']:.3f} | {lat[m]['p99.9']:.3f} "
        f"| {added_p99[m]:+.3f} | {achieved[m]:.0f} | {cpu_cell(m)} | {', '.join(f'{x:.0f}' for x in sat[m])} |"
        for m in modes
    )
    checks = "\n".join(
        f"- {t}: {target_values[t]:+.3f} ms, {verdict(ok)}" if "p99" in t else
        f"- {t}: {target_values[t]:.1f} µs, {verdict(ok)}" if "CPU" in t else
        f"- {t}: {target_values[t]:.3f} ×, {verdict(ok)}"
        for t, ok in targets.items()
    )
    if floor in cpu_med and keyward in cpu_med:
        checks += (f"\n\nkeyward's CPU per request is {cpu_med[keyward] / cpu_med[floor]:.2f} × bare_proxy's "
                   f"({cpu_med[keyward]:.1f} vs {cpu_med[floor]:.1f} µs).")
    text = [f"keyward: {sat_med[keyward] / sat_med[floor]:.3f} × bare_proxy, " if floor else "keyward: ",
            f"{sat_med[keyward] / sat_med[direct]:.3f} × direct, {sat_med[keyward] / sat_med[best]:.3f} × "
            f"{'the best of ' + ', '.join(proxies) + f' ({best})' if len(proxies) > 1 else best}.\n"]
    for r in references:
        text.append(
            f"\nReference row `{r}` (the floor): `examples/bare_proxy.rs`, the same header injection on keyward's "
            f"own stack (tokio, hyper-util server and pooled client, mimalloc) with nothing else: "
            f"{sat_med[r] / sat_med[direct]:.3f} × direct, {sat_med[r] / sat_med[best]:.3f} × {best}, added p99 "
            f"{added_p99[r]:+.3f} ms" + (f", {cpu_med[r]:.1f} µs CPU per request" if r in cpu_med else "") + ".\n")
    if len(proxies) == 1 and best in cpu_med and keyward in cpu_med:
        text.append(f"\n{keyward} uses {cpu_med[keyward] / cpu_med[best]:.3f} × {best}'s CPU per request "
                    f"({cpu_med[keyward]:.1f} vs {cpu_med[best]:.1f} µs).\n")
    if len(proxies) > 1:
        text.append("\nReference rows (other proxies doing only the injection, not targets):\n")
        for p in proxies:
            text.append(
                f"- {p}: {sat_med[p] / sat_med[direct]:.3f} × direct"
                + (f", {sat_med[p] / sat_med[floor]:.3f} × bare_proxy" if floor else "")
                + f", added p99 {added_p99[p]:+.3f} ms"
                + (f", {cpu_med[p]:.1f} µs CPU per request" if p in cpu_med else "")
                + f"; keyward reaches {sat_med[keyward] / sat_med[p]:.3f} × it"
                + (f" and uses {cpu_med[keyward] / cpu_med[p]:.2f} × its CPU" if p in cpu_med and keyward in cpu_med
                   else "") + ".\n")

    new_paths = []
    if forward or signed or chat:
        new_paths.append("\n## New paths (no target stated yet)\n")
    if forward:
        d, f = forward
        frows = "\n".join(
            f"| {m} | {sat_med[m]:.0f} | {sat_med[m] / sat_med[d]:.3f} | {lat[m]['p50']:.3f} | {lat[m]['p99']:.3f} "
            f"| {lat[m]['p99.9']:.3f} | {added_p99[m]:+.3f} | {achieved[m]:.0f} | {cpu_cell(m)} "
            f"| {', '.join(f'{x:.0f}' for x in sat[m])} |"
            for m in forward)
        new_paths.append(f"""
### Forward proxy: an intercepted tunnel against direct TLS (no target stated yet)

HTTPS GET https://bench.test/json1k with keep-alive. `{d}`: TLS straight to nginx terminating TLS in front of
the upstream; `{f}`: CONNECT through keyward's forward proxy (Proxy-Authorization Basic), TLS to keyward's
leaf, the pipeline (identity, grant, quota, cached secret, injection, scrubbing, audit `os`), keyward's own
TLS connection to nginx. CPU is keyward's process only. Each oha run opens its {env['CONNECTIONS']} connections (TCP,
CONNECT, TLS handshakes) at its start and those first requests count in its percentiles, so the TLS rows' p99.9
(and p99 in runs shorter than a few seconds) include connection setup.

| target | saturation req/s | × {d} | p50 ms @{rate} | p99 ms | p99.9 ms | added p99 ms over {d} | achieved req/s | CPU µs/req @{cpu_rate} | saturation runs |
|---|---|---|---|---|---|---|---|---|---|
{frows}

{f}: {sat_med[f] / sat_med[d]:.3f} × {d} at saturation, added p99 {added_p99[f]:+.3f} ms over {d}"""
                         + (f", {cpu_med[f]:.1f} µs CPU per request" if f in cpu_med else "") + ".\n")
    for s in signed:
        new_paths.append(
            f"\n### SigV4-signed route (no target stated yet)\n\nRow `{s}`: keyward on a route whose secret is kind "
            f"`aws-sigv4`: the agent's auth removed, the body read whole, the request signed with SigV4 (keys parsed "
            f"once from the cached secret, the signing key derived per request): {sat_med[s] / sat_med[keyward]:.3f} "
            f"× keyward injecting a header" + (f", {sat_med[s] / sat_med[floor]:.3f} × bare_proxy" if floor else "")
            + f", added p99 {added_p99[s]:+.3f} ms ({added_p99[s] - added_p99[keyward]:+.3f} ms over keyward)"
            + (f", {cpu_med[s]:.1f} µs CPU per request ({cpu_med[s] / cpu_med[keyward]:.2f} × keyward's)"
               if s in cpu_med and keyward in cpu_med else "") + ".\n")
    if chat:
        dc, un, me = chat
        crows = "\n".join(
            f"| {m} | {sat_med[m]:.0f} | {sat_med[m] / sat_med[dc]:.3f} | {sat_med[m] / sat_med[un]:.3f} "
            f"| {', '.join(f'{x:.0f}' for x in sat[m])} |" for m in chat)
        new_paths.append(f"""
### Usage parsing with a budget (no target stated yet)

A ~16 KiB streamed chat completion (about 100 SSE events and a usage chunk), the same POST each time:
`{dc}` straight to the upstream, `{un}` through keyward on a path it does not meter (`/v1/chat16k`, the same
bytes), `{me}` through keyward on `/v1/chat/completions`, metered under the agent's token and cost budget
(priced model; reserve, every event read, settle). Saturation only.

| target | saturation req/s | × {dc} | × {un} | saturation runs |
|---|---|---|---|---|
{crows}

{me}: {sat_med[me] / sat_med[un]:.3f} × {un} (unmetered), {sat_med[me] / sat_med[dc]:.3f} × {dc}.
""")

    groups = [("saturation", result["status_codes"]), ("fixed rate", result["status_codes_at_rate"])]
    if cpu:
        groups.append(("CPU", result["status_codes_cpu"]))
    odd = [f"{g} {m}: {c}" for g, all_codes in groups for m, c in all_codes.items() if set(c) - {"200"}]
    status = ("Every answer in every run was 200." if not odd else "Answers other than 200: " + "; ".join(odd) + ".")
    cpu_text = (f" CPU per request: after the rounds, {rounds} interleaved runs per proxy of "
                f"{int(env.get('CPU_REQUESTS', '0')):,} requests at {cpu_rate:,} req/s (`-n -q`, latency corrected), "
                f"the proxy's on-CPU time (threads and child processes, `/proc/PID/task/*/schedstat`) over the "
                f"requests answered." if cpu else "")
    write(name, result, f"""# {env['TITLE']}

{env['SCENARIO']}. {rounds} rounds, targets in a rotating order each round; each run {env['DURATION']} at
{env['CONNECTIONS']} connections: saturation (as fast as possible) and a fixed {rate} req/s (`-q`, latency
corrected). Medians over the rounds.{cpu_text}

| target | saturation req/s | × direct |{floor_col} × {best_label} | p50 ms @{rate} | p99 ms | p99.9 ms | added p99 ms | achieved req/s | CPU µs/req @{cpu_rate} | saturation runs |
|---|---|---|{'---|' if floor else ''}---|---|---|---|---|---|---|---|
{rows}

{''.join(text)}
## Targets (issue 20)

{checks}
{''.join(new_paths)}
{status}

Status codes over all saturation runs: {result['status_codes']}.

{footer()}""")


if __name__ == "__main__":
    if sys.argv[2] == "--samples":
        samples(sys.argv[1], sys.argv[3])
    elif sys.argv[2] == "--bench":
        bench(sys.argv[1], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        ratios(sys.argv[1], sys.argv[2], sys.argv[3:])
