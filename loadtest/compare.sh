#!/usr/bin/env bash
# A/B of two keyward binaries (for a hot-path change): the bench.sh keyward config on 1 KiB JSON
# (budget included), both binaries running side by side, ROUNDS interleaved rounds (the order
# rotating) of saturation and of latency at a fixed RATE, with the upstream answered directly as the
# baseline for added p99; then ROUNDS interleaved CPU-per-request runs of each binary (CPU_REQUESTS
# at CPU_RATE, lib.sh's cpu_run).
# usage: loadtest/compare.sh OLD_BINARY NEW_BINARY   Writes loadtest/results/compare.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
RATE=${RATE:-2000}
OLD=$1 NEW=$2

NO_BUILD=1 build_release
start_upstream 19181
QUOTA=', rate = "1000000/s", burst = 1000000'
for side in old:19180 new:19182; do
  port=${side#*:}
  keyward_config "$port" $((port + 10)) 19181 true os "$QUOTA" "$BENCH_BUDGET" > "$WORK/${side%%:*}.toml"
done
declare -A PROC
KEYWARD=$OLD start_keyward "$WORK/old.toml" 19190
PROC[old]=${PIDS[-1]}
KEYWARD=$NEW start_keyward "$WORK/new.toml" 19192
PROC[new]=${PIDS[-1]}
declare -A PORT=([old]=19180 [new]=19182)
MODES=(direct=19181 old=19180 new=19182)
for round in $(seq "$ROUNDS"); do
  shift_by=$(((round - 1) % ${#MODES[@]}))
  order=("${MODES[@]:shift_by}" "${MODES[@]:0:shift_by}")
  TAG="" OHA_EXTRA=()
  run_round "$round" /bench/json1k "${order[@]}"
  TAG="rate-" OHA_EXTRA=(-q "$RATE" --latency-correction)
  run_round "$round" /bench/json1k "${order[@]}"
done
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then sides=(old new); else sides=(new old); fi
  for side in "${sides[@]}"; do
    echo "round $round/$ROUNDS: CPU of $side (-n $CPU_REQUESTS -c $CONNECTIONS -q $CPU_RATE)"
    cpu_run "cpu-$side-$round" "${PROC[$side]}" "http://127.0.0.1:${PORT[$side]}/bench/json1k" \
      -H "authorization: Bearer $BENCH_KEY"
  done
done
export CPU="new old" CPU_RATE CPU_REQUESTS
export TITLE="keyward A/B" RATE SCENARIO="1 KiB JSON through keyward (bench.sh config): old = $OLD, new = $NEW"
summarise compare --bench direct new old
