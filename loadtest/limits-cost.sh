#!/usr/bin/env bash
# The limiters' cost per request: throughput through keyward (1 KiB responses) with limits off,
# with a local (governor) quota, and with a Redis quota, in one run with interleaved rounds
# (median of ROUNDS). The quota is set high enough never to throttle, so only its cost shows.
# Writes loadtest/results/limits-cost.{json,md}.
source "$(dirname "$0")/lib.sh"
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-6s}
CONNECTIONS=${CONNECTIONS:-32}
REDIS_PORT=18399

need_oha
build_release
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)"; exit 1; }
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
PIDS+=($!)
start_upstream 18381
QUOTA=', rate = "1000000/s", burst = 1000000'
declare -A PORT=([off]=18380 [local]=18382 [redis]=18384)
keyward_config 18380 18390 18381 true os "" "" > "$WORK/off.toml"
keyward_config 18382 18392 18381 true os "$QUOTA" "" > "$WORK/local.toml"
keyward_config 18384 18394 18381 true os "$QUOTA" "$(printf '[limits]\nbackend = "redis"\nredis_url = "redis://127.0.0.1:%s"' "$REDIS_PORT")" > "$WORK/redis.toml"
for mode in off local redis; do
  start_keyward "$WORK/$mode.toml" $((PORT[$mode] + 10))
done

run_rounds /bench/json1k off=18380 local=18382 redis=18384
export TITLE="Limiter cost" SCENARIO="1 KiB JSON responses through keyward; limits off vs a local governor quota vs a Redis GCRA quota (never throttling); Redis on loopback"
summarise limits-cost off off local redis
