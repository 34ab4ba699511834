#!/usr/bin/env bash
# The cost of metering: throughput through keyward on a ~16 KiB streamed chat completion (about
# 100 SSE events ending with a usage chunk), with usage parsing and a local token budget off
# (`GET /bench/v1/chat16k`: the same bytes on a path keyward does not meter) and on
# (`POST /bench/v1/chat/completions` with `include_usage`, a price table and a budget high
# enough never to refuse, so each call reserves, is read event by event, and settles), in one
# run with interleaved rounds (median of ROUNDS). Writes loadtest/results/budget-cost.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}

need_oha
build_release
start_upstream 18481
keyward_config 18480 18490 18481 true os "" "$BENCH_BUDGET" > "$WORK/keyward.toml"
start_keyward "$WORK/keyward.toml" 18490

for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS: off (-z $DURATION -c $CONNECTIONS)"
  oha_json "off-$round" "http://127.0.0.1:18480/bench/v1/chat16k" -z "$DURATION" -c "$CONNECTIONS" \
    -H "authorization: Bearer $BENCH_KEY"
  echo "round $round/$ROUNDS: on (-z $DURATION -c $CONNECTIONS)"
  oha_json "on-$round" "http://127.0.0.1:18480/bench/v1/chat/completions" -z "$DURATION" -c "$CONNECTIONS" \
    -m POST -T application/json -d "$CHAT_BODY" -H "authorization: Bearer $BENCH_KEY"
done
# Every metered call settled: the budget's account holds the tokens the upstream reported.
curl -s "http://127.0.0.1:18490/metrics" | grep -E '^keyward_(tokens_total|usage_missing_total)' || true
export TITLE="Metering cost" SCENARIO="~16 KiB streamed chat completion (about 100 SSE events and a usage chunk) through keyward; usage parsing and a local token and cost budget off vs on; same keyward, interleaved rounds"
summarise budget-cost off off on
