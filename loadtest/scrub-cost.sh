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

run_rounds /bench/stream16k on=18180 off=18182
export TITLE="Scrubber cost" SCENARIO="16 KiB streamed response (16 x 1 KiB chunks) through keyward, scrubber on vs off"
summarise scrub-cost off on off
