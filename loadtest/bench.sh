#!/usr/bin/env bash
# The side-by-side benchmark (issue 20), in one run on loopback. The fake upstream's 1 KiB JSON
# answered (a) directly, (b) through keyward with the whole pipeline on (identity, authorization,
# a quota, cache-hit secret resolution, injection, scrubbing, audit durability "os", and a token
# and cost budget on the agent, which this unmetered GET never touches), (c) through
# `examples/bare_proxy.rs` (row `hyper`): the same injection on keyward's own stack (tokio,
# hyper-util server and client, mimalloc) with nothing else, the floor keyward's targets are
# measured against, and through the reference proxies (d) nginx, (e) HAProxy and (f) Envoy doing
# only the header injection with upstream keep-alive; (g) keyward on a signed route: the same
# pipeline with an `aws-sigv4` secret, each request signed with SigV4 instead of a header injected.
# New paths, same run: (h) the forward proxy: HTTPS to bench.test through keyward's CONNECT
# listener (intercepted, the full pipeline, keyward's own TLS to the origin) against direct TLS to
# the same origin (nginx terminating TLS in front of the upstream); (i) metering: a ~16 KiB
# streamed chat completion directly, through keyward on a path it does not meter, and through
# keyward metered under the budget (reserve, every event read, settle).
# Each round measures every target with identical oha settings, in a rotating order: saturation
# (-c CONNECTIONS, as fast as possible) and, except for the chat rows, latency at a fixed RATE (-q,
# with latency correction). After the rounds, ROUNDS interleaved CPU measurements per proxy: its
# on-CPU time (threads and child processes, /proc/PID/task/*/schedstat) over CPU_REQUESTS requests
# at CPU_RATE req/s, divided by the requests answered. Figures are medians over ROUNDS; every
# run is bounded by -z DURATION or -n CPU_REQUESTS.
# Writes loadtest/results/bench.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
RATE=${RATE:-2000}

need_oha
for tool in nginx haproxy envoy; do need_tool "$tool"; done
build_release
ulimit -n "$(ulimit -Hn)"
make_test_ca
declare -A PROC # mode -> the PID whose CPU is measured
start_upstream 18481
QUOTA=', rate = "1000000/s", burst = 1000000'
keyward_config 18480 18490 18481 true os "$QUOTA" "$BENCH_BUDGET" > "$WORK/keyward.toml"
start_keyward "$WORK/keyward.toml" 18490
PROC[keyward]=${PIDS[-1]}
keyward_signed_config 18486 18496 18481 > "$WORK/keyward-signed.toml"
start_keyward "$WORK/keyward-signed.toml" 18496
PROC[keyward-signed]=${PIDS[-1]}
start_nginx 18482 18481
PROC[nginx]=${PIDS[-1]}
start_haproxy 18483 18481
PROC[haproxy]=${PIDS[-1]}
start_envoy 18484 18481
PROC[envoy]=${PIDS[-1]}
start_bare_proxy 18485 18481
PROC[hyper]=${PIDS[-1]}
# The forward-proxy rows: a third keyward with the forward listener on 18488 (its agent listener
# on 18487 is unused), and nginx terminating TLS for bench.test on 18489.
start_nginx_tls 18489 18481
keyward_forward_config 18487 18497 18488 18489 > "$WORK/keyward-forward.toml"
start_keyward "$WORK/keyward-forward.toml" 18497
PROC[forward]=${PIDS[-1]}

declare -A PORT=([direct]=18481 [keyward]=18480 [nginx]=18482 [haproxy]=18483 [envoy]=18484 [hyper]=18485
  [keyward-signed]=18486)
HTTP_MODES=(direct keyward nginx haproxy envoy hyper keyward-signed)
TLS_MODES=(direct-tls forward)
CHAT_MODES=(direct-chat keyward-chat keyward-metered)
CPU_MODES=(keyward hyper nginx haproxy envoy keyward-signed forward)
AUTH=(-H "authorization: Bearer $BENCH_KEY")
# The same POST for the three chat rows: keyward meters only .../chat/completions.
CHAT=(-m POST -T application/json -d "$CHAT_BODY" "${AUTH[@]}")
PROXY_AUTH="proxy-authorization: Basic $(printf 'bench-agent:%s' "$BENCH_KEY" | base64 -w0)"

# target MODE: sets URL and ARGS (oha's arguments other than the load's shape) for MODE.
target() {
  case $1 in
    direct-tls) URL=https://bench.test/json1k ARGS=(--cacert "$WORK/ca.pem" --connect-to bench.test:443:127.0.0.1:18489) ;;
    # oha's CONNECT goes to bench.test:443 through keyward; --no-pre-lookup, as bench.test is in no DNS.
    forward) URL=https://bench.test/json1k ARGS=(--no-pre-lookup -x http://127.0.0.1:18488 --proxy-header "$PROXY_AUTH"
      --cacert "$WORK/forward-ca.pem") ;;
    direct-chat) URL=http://127.0.0.1:18481/bench/v1/chat/completions ARGS=("${CHAT[@]}") ;;
    keyward-chat) URL=http://127.0.0.1:18480/bench/v1/chat16k ARGS=("${CHAT[@]}") ;;
    keyward-metered) URL=http://127.0.0.1:18480/bench/v1/chat/completions ARGS=("${CHAT[@]}") ;;
    *) URL=http://127.0.0.1:${PORT[$1]}/bench/json1k ARGS=("${AUTH[@]}") ;;
  esac
}

# measure ROUND TAG MODE LOAD...: one oha run of MODE with LOAD (its shape), kept as $WORK/TAGMODE-ROUND.json.
measure() {
  local round=$1 tag=$2 mode=$3
  shift 3
  target "$mode"
  echo "round $round/$ROUNDS: $tag$mode ($*)"
  oha_json "$tag$mode-$round" "$URL" "$@" "${ARGS[@]}"
}

# rotate ROUND MODE...: ORDER = the modes rotated by ROUND - 1, so no target always runs first or
# right after another.
rotate() {
  local round=$1
  shift
  local modes=("$@") k=$(((round - 1) % $#))
  ORDER=("${modes[@]:k}" "${modes[@]:0:k}")
}

SATURATION=(-z "$DURATION" -c "$CONNECTIONS")
AT_RATE=(-z "$DURATION" -c "$CONNECTIONS" -q "$RATE" --latency-correction)
echo "warm-up"
for mode in "${HTTP_MODES[@]}" "${TLS_MODES[@]}" "${CHAT_MODES[@]}"; do
  (ROUNDS=0 measure 0 warm- "$mode" -z 1s -c "$CONNECTIONS") >/dev/null
done
# both ROUND MODE...: saturation of each mode, then each at the fixed rate, in ROUND's order.
both() {
  local round=$1 mode
  shift
  rotate "$round" "$@"
  for mode in "${ORDER[@]}"; do measure "$round" "" "$mode" "${SATURATION[@]}"; done
  for mode in "${ORDER[@]}"; do measure "$round" rate- "$mode" "${AT_RATE[@]}"; done
}
for round in $(seq "$ROUNDS"); do
  both "$round" "${HTTP_MODES[@]}"
  both "$round" "${TLS_MODES[@]}"
  rotate "$round" "${CHAT_MODES[@]}"
  for mode in "${ORDER[@]}"; do measure "$round" "" "$mode" "${SATURATION[@]}"; done
done
for round in $(seq "$ROUNDS"); do
  rotate "$round" "${CPU_MODES[@]}"
  for mode in "${ORDER[@]}"; do
    target "$mode"
    echo "round $round/$ROUNDS: CPU of $mode (-n $CPU_REQUESTS -c $CONNECTIONS -q $CPU_RATE)"
    cpu_run "cpu-$mode-$round" "${PROC[$mode]}" "$URL" "${ARGS[@]}"
  done
done

[ -s "$WORK/audit-18480.jsonl" ] || { echo "keyward wrote no audit records" >&2; exit 1; }
grep -q '"signed":{"kind":"aws-sigv4"' "$WORK/audit-18486.jsonl" || { echo "the signed keyward signed nothing" >&2; exit 1; }
grep -q '"via":"forward"' "$WORK/audit-18487.jsonl" || { echo "nothing went through the forward proxy" >&2; exit 1; }
# The metered row was metered (tokens counted) and settled under the budget.
metrics=$(curl -fsS "http://127.0.0.1:18490/metrics")
grep -E '^keyward_(tokens_total|usage_missing_total)' <<<"$metrics" || true
grep -qE '^keyward_tokens_total.* [1-9]' <<<"$metrics" || { echo "keyward metered no tokens" >&2; exit 1; }

export TITLE="keyward against bare_proxy, with nginx, HAProxy and Envoy for reference" RATE CPU_RATE CPU_REQUESTS
export SCENARIO="1 KiB JSON from a hyper upstream on loopback; keyward with identity, authorization, a (never throttling) quota, cached secret, injection, scrubbing, audit durability os and a token and cost budget on the agent (this GET is not metered); bare_proxy (row hyper) doing only the injection on keyward's stack; nginx, HAProxy and Envoy with proxy_set_header-style injection and upstream keep-alive; 2 workers each"
REFERENCE=hyper SIGNED=keyward-signed FORWARD="${TLS_MODES[*]}" CHAT="${CHAT_MODES[*]}" CPU="${CPU_MODES[*]}" \
  summarise bench --bench direct keyward nginx haproxy envoy
