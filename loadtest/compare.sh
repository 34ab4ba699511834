#!/usr/bin/env bash
# A/B of two keyward binaries (for a hot-path change): the bench.sh keyward config on 1 KiB JSON,
# both binaries running side by side, ROUNDS interleaved saturation rounds.
# usage: loadtest/compare.sh OLD_BINARY NEW_BINARY   Writes loadtest/results/compare.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-32}
OLD=$1 NEW=$2

NO_BUILD=1 build_release
start_upstream 19181
QUOTA=', rate = "1000000/s", burst = 1000000'
for side in old:19180 new:19182; do
  port=${side#*:}
  keyward_config "$port" $((port + 10)) 19181 true os "$QUOTA" > "$WORK/${side%%:*}.toml"
done
KEYWARD=$OLD start_keyward "$WORK/old.toml" 19190
KEYWARD=$NEW start_keyward "$WORK/new.toml" 19192
run_rounds /bench/json1k old=19180 new=19182
export TITLE="keyward A/B" SCENARIO="1 KiB JSON through keyward (bench.sh config), $OLD vs $NEW"
summarise compare old old new
