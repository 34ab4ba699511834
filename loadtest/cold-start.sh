#!/usr/bin/env bash
# Cold start: process start to /readyz answering 200, with the file provider and the bench
# config (audit on), RUNS times in a row. Target: median at most 200 ms.
# Writes loadtest/results/cold-start.{json,md}.
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-30}

build_release
keyward_config 18780 18790 18781 true os > "$WORK/keyward.toml"
python3 "$ROOT/loadtest/cold_start.py" "$WORK/samples.json" "$RUNS" 18790 \
  "$KEYWARD" --log warn serve --config "$WORK/keyward.toml"
export TITLE="Cold start" SCENARIO="keyward serve with the file provider (one route, one role, one agent, audit os) from spawn to the first GET /readyz answered 200; $RUNS runs in a row"
MACHINE=$(machine_json) RESULTS="$RESULTS" python3 "$ROOT/loadtest/summarise.py" cold-start --samples "$WORK/samples.json"
