#!/usr/bin/env bash
# SSE through keyward: the upstream streams 50 events over 2 s; the time to the first event,
# directly and through keyward (full pipeline, scrubbing on), and the first-to-last spread that
# shows events are passed on as they come, not buffered. ROUNDS interleaved rounds of STREAMS
# concurrent streams per target. Target: keyward adds at most 1 ms to the median time to first event.
# Writes loadtest/results/sse-ttfb.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-10}
STREAMS=${STREAMS:-10}

build_release
start_upstream 18681
# The metered row: a streamed chat completion under a local token budget, which keyward asks
# for usage, reads event by event and settles.
BUDGET=$(printf '[[budgets]]\nname = "bench-day"\nagent = "bench-agent"\ntokens = 1000000000000\nwindow = "day"\n')
keyward_config 18680 18690 18681 true os "" "$BUDGET" > "$WORK/keyward.toml"
start_keyward "$WORK/keyward.toml" 18690
SSE="/bench/sse?events=50&interval_ms=40"
CHAT="/bench/v1/chat/completions?events=50&interval_ms=40"
python3 "$ROOT/loadtest/sse_client.py" "$WORK/samples.json" "$ROUNDS" "$STREAMS" "$BENCH_KEY" \
  "direct=http://127.0.0.1:18681$SSE" "keyward=http://127.0.0.1:18680$SSE" \
  "direct_chat=POST:http://127.0.0.1:18681$CHAT" "keyward_metered=POST:http://127.0.0.1:18680$CHAT"
python3 - "$WORK/samples.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["metrics"]["keyward_spread"]["target"] = ">= 1900"
data["metrics"]["keyward_metered_spread"]["target"] = ">= 1900"
data["added"] = {"ttfb added by keyward": ["keyward_ttfb", "direct_ttfb", "<= 1"],
                 "ttfb added by keyward, metered with a budget": ["keyward_metered_ttfb", "direct_chat_ttfb", "<= 1"]}
data["notes"] = ["ttfb: request written (connection already open) to the first `data:` event. spread: first to "
                 "last event; about 1,960 ms means the 50 events arrived as the upstream sent them (no buffering)."]
json.dump(data, open(sys.argv[1], "w"))
PY
export TITLE="SSE time to first event" SCENARIO="upstream streams 50 events over 2 s; $ROUNDS interleaved rounds of $STREAMS concurrent streams, direct and through keyward (full pipeline, scrubbing on, audit os), and a streamed chat completion direct and through keyward metered under a local budget"
MACHINE=$(machine_json) RESULTS="$RESULTS" python3 "$ROOT/loadtest/summarise.py" sse-ttfb --samples "$WORK/samples.json"
