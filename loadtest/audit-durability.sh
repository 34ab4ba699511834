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

run_rounds /bench/json1k none=18280 os=18282 fsync=18284
export TITLE="Audit durability cost" SCENARIO="1 KiB JSON responses through keyward with the full pipeline; audit.durability none vs os vs fsync"
TARGET_MODE=os TARGET_RATIO=0.90 summarise audit-durability none none os fsync
