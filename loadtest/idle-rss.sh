#!/usr/bin/env bash
# Memory: keyward's RSS with CONNECTIONS (10,000) idle keep-alive agent connections, each of
# which made one call through the full pipeline first. Target: at most 64 MiB.
# Writes loadtest/results/idle-rss.{json,md}.
source "$(dirname "$0")/lib.sh"
CONNECTIONS=${CONNECTIONS:-10000}

build_release
ulimit -n "$(ulimit -Hn)"
# keyward keeps 3 descriptors per agent connection (its own, an upstream one, the admin
# listener's share) and 64 aside (instance.rs, connections_that_fit): with a lower hard limit it
# would answer the connections beyond that 503, so measure as many as it can hold, and say so.
if [ "$(ulimit -Hn)" != unlimited ]; then
  FIT=$((($(ulimit -Hn) - 64) / 3 - 10))
  if [ "$FIT" -lt 100 ]; then
    echo "the hard limit on open files ($(ulimit -Hn)) is too low to measure idle connections" >&2
    exit 1
  fi
  if [ "$CONNECTIONS" -gt "$FIT" ]; then
    echo "the hard limit on open files ($(ulimit -Hn)) lets keyward hold about $FIT connections; measuring $FIT instead of $CONNECTIONS" >&2
    CONNECTIONS=$FIT
  fi
fi
start_upstream 18881
keyward_config 18880 18890 18881 true os > "$WORK/keyward.toml"
start_keyward "$WORK/keyward.toml" 18890
python3 "$ROOT/loadtest/idle_conns.py" "$WORK/samples.json" "${PIDS[-1]}" 18880 /bench/json1k "$BENCH_KEY" "$CONNECTIONS"
export TITLE="Memory with idle connections" SCENARIO="keyward RSS (VmRSS) before and with $CONNECTIONS idle keep-alive agent connections, each after one 1 KiB call through the full pipeline; five readings a second apart"
MACHINE=$(machine_json) RESULTS="$RESULTS" python3 "$ROOT/loadtest/summarise.py" idle-rss --samples "$WORK/samples.json"
