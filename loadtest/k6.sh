#!/usr/bin/env bash
# Runs the k6 scripts in loadtest/k6/ against keyward on loopback: starts the upstream and keyward
# with the agents, roles and quotas the scripts expect, and keeps k6's summary (JSON and text) in
# loadtest/results/k6-NAME.{json,txt}. Exits non-zero when a script's thresholds fail.
# usage: loadtest/k6.sh [NAME...]   (default: every script)
source "$(dirname "$0")/lib.sh"

need_tool k6
build_release
start_upstream 19081
key() { printf 'kw_k6%s%040d' "$1" 0 | head -c 46; }
CHAT1_KEY=$(key chat1) CHAT2_KEY=$(key chat2) READER_KEY=$(key reader) BATCH_KEY=$(key batch)
ADMIN_TOKEN=$(key admin)
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
printf '{"OPENAI_KEY": "sk-k6-%s", "GITHUB_TOKEN": "ghp_k6%s"}\n' "$(printf 'o%.0s' {1..40})" "$(printf 'g%.0s' {1..36})" >"$WORK/secrets.json"
chmod 600 "$WORK/secrets.json"
cat >"$WORK/keyward.toml" <<TOML
[server]
listen = "127.0.0.1:19080"
admin_listen = "127.0.0.1:19090"
[admin]
token_sha256 = "$(sha "$ADMIN_TOKEN")"
[audit]
path = "$WORK/audit.jsonl"
[[sources]]
name = "local"
provider = "file"
path = "$WORK/secrets.json"
[[routes]]
name = "llm"
prefix = "/llm"
upstream = "http://127.0.0.1:19081"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }
[[routes]]
name = "gh"
prefix = "/gh"
upstream = "http://127.0.0.1:19081"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "token {{secret}}" }
[roles.chat]
grants = [{ route = "llm", secret = "OPENAI_KEY", methods = ["GET", "POST"], paths = ["/v1/**"], rate = "1000/s", burst = 1000 }]
[roles.reader]
grants = [{ route = "gh", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/repos/**"] }]
[roles.batch]
grants = [{ route = "llm", secret = "OPENAI_KEY", methods = ["POST"], paths = ["/v1/batch/**"], rate = "5/s", burst = 5 }]
$(for agent in chat-1:chat:"$CHAT1_KEY" chat-2:chat:"$CHAT2_KEY" reader-1:reader:"$READER_KEY" batch-1:batch:"$BATCH_KEY"; do
  IFS=: read -r id role key <<<"$agent"
  printf '[[agents]]\nid = "%s"\nrole = "%s"\nkey_sha256 = "%s"\n' "$id" "$role" "$(sha "$key")"
done)
TOML
start_keyward "$WORK/keyward.toml" 19090

status=0
scripts=("$@")
[ ${#scripts[@]} -gt 0 ] || scripts=($(cd "$ROOT/loadtest/k6" && ls *.js | sed 's/\.js$//'))
rotated_secrets() {
  printf '{"OPENAI_KEY": "sk-k6-%s", "GITHUB_TOKEN": "ghp_k6%s"}\n' "$(printf 'r%.0s' {1..40})" "$(printf 'g%.0s' {1..36})"
}
for name in "${scripts[@]}"; do
  echo "k6: $name"
  # The mix rotates OPENAI_KEY at 15 s: the file gets its new value just before (written aside,
  # then renamed, as docs/secrets.md advises), so the rotation has something to test and promote.
  (sleep 13 && rotated_secrets >"$WORK/secrets.json.new" && chmod 600 "$WORK/secrets.json.new" \
    && mv "$WORK/secrets.json.new" "$WORK/secrets.json") &
  k6 run --no-color --quiet --summary-export "$RESULTS/k6-$name.json" \
    -e CHAT1_KEY="$CHAT1_KEY" -e CHAT2_KEY="$CHAT2_KEY" -e READER_KEY="$READER_KEY" -e BATCH_KEY="$BATCH_KEY" \
    -e ADMIN_TOKEN="$ADMIN_TOKEN" "$ROOT/loadtest/k6/$name.js" 2>&1 | tee "$RESULTS/k6-$name.txt" || status=1
done
exit $status
