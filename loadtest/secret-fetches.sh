#!/usr/bin/env bash
# Secret-store traffic: GetSecretValue calls per secret per TTL during DURATION (60 s) of steady
# load (RATE req/s on each of two routes, each granted a secret from its own AWS Secrets Manager
# source with a TTL-second cache) against moto's server on loopback. Counted by keyward's
# keyward_secret_fetches_total{source,result}. Target: 1 fetch per secret per TTL.
# Writes loadtest/results/secret-fetches.{json,md}.
source "$(dirname "$0")/lib.sh"
DURATION=${DURATION:-60}
TTL=${TTL:-10}
RATE=${RATE:-200}
MOTO_PORT=18975

need_oha
need_tool moto_server
build_release
moto_server -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$MOTO_PORT/moto-api/"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
python3 - "$MOTO_PORT" "$BENCH_SECRET" <<'PY'
import json, sys, boto3
client = boto3.client("secretsmanager", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}")
for name in ("alpha", "beta"):
    client.create_secret(Name=f"bench/{name}", SecretString=json.dumps({"KEY": sys.argv[2] + name}))
PY
start_upstream 18981
hash=$(printf '%s' "$BENCH_KEY" | sha256sum | cut -d' ' -f1)
cat > "$WORK/keyward.toml" <<TOML
[server]
listen = "127.0.0.1:18980"
admin_listen = "127.0.0.1:18990"
[audit]
path = "$WORK/audit.jsonl"
$(for s in alpha beta; do printf '[[sources]]\nname = "%s"\nprovider = "aws-secrets-manager"\nregion = "us-east-1"\nsecret_name = "bench/%s"\nendpoint_url = "http://127.0.0.1:%s"\nmapping = { %s = "{{KEY}}" }\ncache = { ttl_seconds = %s }\n' "$s" "$s" "$MOTO_PORT" "${s^^}" "$TTL"; done)
$(for s in alpha beta; do printf '[[routes]]\nname = "%s"\nprefix = "/%s"\nupstream = "http://127.0.0.1:18981"\nagent_key = { header = "authorization", scheme = "Bearer" }\ninject = { header = "authorization", value = "Bearer {{secret}}" }\n' "$s" "$s"; done)
[roles.bench]
grants = [{ route = "alpha", secret = "ALPHA", methods = ["GET"], paths = ["/**"] }, { route = "beta", secret = "BETA", methods = ["GET"], paths = ["/**"] }]
[[agents]]
id = "bench-agent"
role = "bench"
key_sha256 = "$hash"
TOML
start_keyward "$WORK/keyward.toml" 18990 || { cat "$WORK/keyward.toml.log" "$WORK/keyward.toml" >&2; exit 1; }
curl -fsS "http://127.0.0.1:18990/metrics" >"$WORK/metrics-before.txt"
LOAD=()
for s in alpha beta; do
  oha --no-tui --output-format json -z "${DURATION}s" -q "$RATE" -c 8 -H "authorization: Bearer $BENCH_KEY" \
    "http://127.0.0.1:18980/$s/json1k" >"$WORK/oha-$s.json" &
  LOAD+=($!)
done
wait "${LOAD[@]}"
curl -fsS "http://127.0.0.1:18990/metrics" >"$WORK/metrics.txt"
python3 - "$WORK" "$DURATION" "$TTL" <<'PY'
import json, re, sys
work, duration, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def counts(path):
    out = {}
    for line in open(path):
        m = re.match(r'keyward_secret_fetches_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(labels["source"], labels["result"])] = float(m.group(2))
    return out
before, after = counts(f"{work}/metrics-before.txt"), counts(f"{work}/metrics.txt")
fetches = {}
for (source, result), n in after.items():
    fetches.setdefault(source, {})[result] = n - before.get((source, result), 0)
codes = {s: json.load(open(f"{work}/oha-{s}.json")).get("statusCodeDistribution", {}) for s in ("alpha", "beta")}
windows = duration / ttl
metrics = {}
for source, results in sorted(fetches.items()):
    total = sum(results.values())
    metrics[f"{source}_fetches"] = {"unit": "calls", "samples": [total]}
    metrics[f"{source}_fetches_per_ttl"] = {"unit": "calls/TTL", "samples": [total / windows], "target": "<= 1"}
json.dump({"metrics": metrics, "notes": [
    f"Fetch results by source: {fetches}. Status codes seen by the load: {codes}.",
    f"Only fetches during the load are counted (the metric is read before and after). {duration} s is {windows:g} TTL "
    f"windows: one fetch after each expiry is {windows:g} fetches, 1 per TTL (the fetch at start-up, before the "
    f"load, is not counted)."]},
    open(f"{work}/samples.json", "w"))
PY
export TITLE="Secret-store traffic" SCENARIO="GetSecretValue calls against moto during $DURATION s at $RATE req/s on each of two routes (two AWS sources, cache ttl $TTL s), counted by keyward_secret_fetches_total"
MACHINE=$(machine_json) RESULTS="$RESULTS" python3 "$ROOT/loadtest/summarise.py" secret-fetches --samples "$WORK/samples.json"
