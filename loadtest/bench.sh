#!/usr/bin/env bash
# The side-by-side benchmark, in one run on loopback: the fake upstream's 1 KiB JSON answered
# (a) directly, (b) through keyward with the whole pipeline on (identity, authorization, a quota,
# cache-hit secret resolution, injection, scrubbing, audit durability "os"), and through (c) nginx,
# (d) HAProxy and (e) Envoy doing only the header injection with upstream keep-alive; plus, as a
# reference row, (f) `examples/bare_proxy.rs`: the same injection on keyward's own stack (tokio,
# hyper-util server and client, mimalloc) with nothing else, the floor under keyward's figures;
# and (g) keyward on a signed route: the same pipeline with an `aws-sigv4` secret, so each request
# is signed with SigV4 (keys parsed once from the cached secret) instead of a header injected.
# Each round measures every target twice with identical oha settings, in a rotating order:
# saturation (-c CONNECTIONS, as fast as possible) and latency at a fixed RATE (-q, with latency
# correction). Figures are medians over ROUNDS; every run is bounded by -z DURATION.
# Writes loadtest/results/bench.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
RATE=${RATE:-2000}

need_oha
for tool in nginx haproxy envoy; do need_tool "$tool"; done
build_release
start_upstream 18481
QUOTA=', rate = "1000000/s", burst = 1000000'
keyward_config 18480 18490 18481 true os "$QUOTA" > "$WORK/keyward.toml"
start_keyward "$WORK/keyward.toml" 18490
keyward_signed_config 18486 18496 18481 > "$WORK/keyward-signed.toml"
start_keyward "$WORK/keyward-signed.toml" 18496
start_nginx 18482 18481
start_haproxy 18483 18481
start_envoy 18484 18481
start_bare_proxy 18485 18481
MODES=(direct=18481 keyward=18480 nginx=18482 haproxy=18483 envoy=18484 hyper=18485 keyward-signed=18486)

echo "warm-up"
(ROUNDS=1 DURATION=1s run_round 0 /bench/json1k "${MODES[@]}") >/dev/null
for round in $(seq "$ROUNDS"); do
  # Rotate the order each round, so no target always runs first or right after another.
  shift_by=$(((round - 1) % ${#MODES[@]}))
  order=("${MODES[@]:shift_by}" "${MODES[@]:0:shift_by}")
  TAG="" OHA_EXTRA=()
  run_round "$round" /bench/json1k "${order[@]}"
  TAG="rate-" OHA_EXTRA=(-q "$RATE" --latency-correction)
  run_round "$round" /bench/json1k "${order[@]}"
done
[ -s "$WORK/audit-18480.jsonl" ] || { echo "keyward wrote no audit records" >&2; exit 1; }
grep -q '"signed":{"kind":"aws-sigv4"' "$WORK/audit-18486.jsonl" || { echo "the signed keyward signed nothing" >&2; exit 1; }

export TITLE="keyward against direct, nginx, HAProxy and Envoy" RATE
export SCENARIO="1 KiB JSON from a hyper upstream on loopback; keyward with identity, authorization, a (never throttling) quota, cached secret, injection, scrubbing and audit durability os; nginx, HAProxy and Envoy with proxy_set_header-style injection and upstream keep-alive; 2 workers each"
REFERENCE=hyper SIGNED=keyward-signed summarise bench --bench direct keyward nginx haproxy envoy
