//! Test harness: a fake upstream, canary secrets, and keyward started in-process on loopback.
#![allow(dead_code)]

#[cfg(feature = "aws")]
pub mod moto;
pub mod process;
pub mod raw;

use std::path::{Path, PathBuf};
use std::time::Duration;

use keyward::fake_upstream::FakeUpstream;
use keyward::instance::Running;

/// Canary credentials: none of these may ever appear in a response, audit line or log.
pub const CANARY_OPENAI: &str = "sk-canary-OPENAI-7f3a9c1e5b2d4068a1c3e5f7";
pub const CANARY_ANTHROPIC: &str = "sk-ant-canary-ANTH-0a1b2c3d4e5f60718293";
pub const CANARY_GITHUB: &str = "ghp_canaryGITHUB9b8a7c6d5e4f3a2b1c0d";
pub const CANARY_AZURE: &str = "azure-canary-AZURE-5e6f7a8b9c0d1e2f3a4b";
pub const CANARY_GEMINI: &str = "AIza-canary-GEMINI-c3d4e5f60718293a4b5c";
pub const CANARIES: [&str; 5] = [CANARY_OPENAI, CANARY_ANTHROPIC, CANARY_GITHUB, CANARY_AZURE, CANARY_GEMINI];

pub const WORKER_KEY: &str = "kw_testWorkerKey0123456789abcdefghijklmnopqrs";
pub const READER_KEY: &str = "kw_testReaderKey0123456789abcdefghijklmnopqrs";
pub const DISABLED_KEY: &str = "kw_testDisabledKey23456789abcdefghijklmnopqrs";

/// The admin API token of the tests that use one, and the config block that enables it.
pub const ADMIN_TOKEN: &str = "kwadm_testAdminToken0123456789abcdefghijklmnop";

pub fn admin_block() -> String {
    format!("\n[admin]\ntoken_sha256 = \"{}\"\n", sha(ADMIN_TOKEN))
}

/// Successful secret-store fetches of `source`, from a /metrics text.
pub fn fetch_count(metrics: &str, source: &str) -> u64 {
    let prefix = format!("keyward_secret_fetches_total{{source=\"{source}\",result=\"ok\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

/// The HTTP client tests talk to keyward with: no redirects followed, and idle pooled connections
/// dropped well before keyward closes them (the test configs' `header_read_timeout_ms` is 2 s).
/// On a loaded machine a request sent on a connection the server is just closing fails in the
/// client (`IncompleteMessage`) and never reaches keyward, so it would flake a test.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_idle_timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap()
}

pub fn sha(key: &str) -> String {
    hex::encode(keyward::identity::hash_key(key))
}

/// A loopback port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub fn write_secrets(dir: &Path) -> PathBuf {
    let path = dir.join("secrets.json");
    let doc = serde_json::json!({
        "OPENAI_API_KEY": CANARY_OPENAI,
        "ANTHROPIC_API_KEY": CANARY_ANTHROPIC,
        "GITHUB_TOKEN": CANARY_GITHUB,
        "AZURE_OPENAI_API_KEY": CANARY_AZURE,
        "GEMINI_API_KEY": CANARY_GEMINI,
    });
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

/// The test config: every route of the product example, pointed at the fake upstream, plus a
/// route to a closed port and one whose secret source is missing.
pub fn config_text(dir: &Path, upstream: &str, extra: &str) -> String {
    let dead = closed_port();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
header_read_timeout_ms = 2000

[forward]
connect_timeout_ms = 1000
read_timeout_ms = 1500
total_timeout_ms = 10000
max_request_body_bytes = 65536

[audit]
path = "{dir}/audit.jsonl"
metadata = {{ env = "test" }}

[[sources]]
name = "files"
provider = "file"
path = "{dir}/secrets.json"

[[sources]]
name = "gone"
provider = "file"
path = "{dir}/no-such-file.json"
mapping = {{ GONE_SECRET = "{{{{GONE_SECRET}}}}" }}

[[sources]]
name = "envsrc"
provider = "env"
mapping = {{ UNSET_SECRET = "{{{{KEYWARD_TEST_VARIABLE_THAT_IS_NEVER_SET}}}}" }}

{routes}
[[routes]]
name = "deadend"
prefix = "/deadend"
upstream = "http://127.0.0.1:{dead}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[roles.worker]
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions", "/v1/responses"] }},
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET", "POST", "HEAD"], paths = ["/_fake/**"] }},
  {{ route = "anthropic", secret = "ANTHROPIC_API_KEY", methods = ["POST"], paths = ["/v1/messages"] }},
  {{ route = "github", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/repos/**", "/user"] }},
  {{ route = "github", secret = "GONE_SECRET", methods = ["GET"], paths = ["/gone"] }},
  {{ route = "github", secret = "UNSET_SECRET", methods = ["GET"], paths = ["/unset"] }},
  {{ route = "deadend", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/**"] }},
  {{ route = "azure-openai", secret = "AZURE_OPENAI_API_KEY", methods = ["POST"], paths = ["/openai/deployments/*/chat/completions", "/openai/v1/chat/completions", "/openai/v1/responses"] }},
  {{ route = "gemini", secret = "GEMINI_API_KEY", methods = ["POST"], paths = ["/v1beta/models/*"] }},
]

[roles.reader]
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/v1/models"] }}]

[[agents]]
id = "worker-1"
role = "worker"
key_sha256 = "{worker}"

[[agents]]
id = "reader-1"
role = "reader"
key_sha256 = "{reader}"

[[agents]]
id = "retired-1"
role = "worker"
key_sha256 = "{disabled}"
disabled = true
{extra}
"#,
        dir = dir.display(),
        routes = keyward::demo::shipped_routes_to(upstream),
        worker = sha(WORKER_KEY),
        reader = sha(READER_KEY),
        disabled = sha(DISABLED_KEY),
    )
}

pub struct Harness {
    pub upstream: FakeUpstream,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub admin: String,
    pub client: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with("").await
    }

    pub async fn start_with(extra: &str) -> Harness {
        Self::start_edited(extra, |text| text).await
    }

    /// `start_with`, with `edit` applied to the whole config text (for `[server]` settings).
    pub async fn start_edited(extra: &str, edit: impl Fn(String) -> String) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let upstream = FakeUpstream::start().await.unwrap();
        write_secrets(dir.path());
        let text = edit(config_text(dir.path(), &upstream.url(), extra));
        let config = keyward::config::load_str(&text, "test.toml", false).unwrap_or_else(|e| panic!("{e}"));
        let running = keyward::instance::start(config).await.unwrap();
        let base = format!("http://{}", running.proxy_addr.expect("the test config listens on TCP"));
        let admin = format!("http://{}", running.admin_addr);
        let client = client();
        Harness { upstream, running: Some(running), dir, base, admin, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// Every audit record written so far, of every type.
    pub fn audit_all(&self) -> Vec<serde_json::Value> {
        if let Some(running) = &self.running {
            running.state.audit.flush();
        }
        read_audit(&self.audit_path())
    }

    /// The outcome records (`type = "request"`): exactly one per attempt.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        self.audit_all().into_iter().filter(|r| r["type"] == "request").collect()
    }

    /// Waits (bounded) until an audit record matches, for outcomes recorded after the response.
    pub async fn wait_for_audit(&self, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..100 {
            if let Some(found) = self.audit().into_iter().find(|r| matches(r)) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no matching audit record; have: {:#?}", self.audit());
    }

    /// Waits (bounded) for an audit record of `kind`, for events written by background tasks.
    pub async fn wait_for_audit_event(&self, kind: &str) -> serde_json::Value {
        for _ in 0..100 {
            if let Some(found) = self.audit_all().into_iter().find(|r| r["type"] == kind) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {kind} audit record");
    }

    pub async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap()
    }

    /// Shuts keyward down (flushing its audit file) and hands back the directory holding it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self.dir
    }
}

pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("audit lines are JSON"))
        .collect()
}

/// Outcome records in an audit file.
pub fn outcomes(path: &Path) -> Vec<serde_json::Value> {
    read_audit(path).into_iter().filter(|r| r["type"] == "request").collect()
}

pub fn assert_no_canary(what: &str, text: &str) {
    for canary in CANARIES {
        assert!(!text.contains(canary), "a canary credential leaked into {what}");
    }
}

/// A config for the real binary: one route whose credential comes from the environment
/// (`KW_TEST_OPENAI_KEY`), the worker agent, and `server_extra` in `[server]`.
pub fn binary_config(dir: &std::path::Path, upstream: &str, server_extra: &str) -> std::path::PathBuf {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
{server_extra}
[audit]
path = "{dir}/audit.jsonl"
[[sources]]
name = "environment"
provider = "env"
mapping = {{ OPENAI_API_KEY = "{{{{KW_TEST_OPENAI_KEY}}}}" }}
[[routes]]
name = "openai"
prefix = "/openai/v1"
upstream = "{upstream}/v1"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}
[roles.worker]
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/chat/completions"] }}]
[[agents]]
id = "subagent-abc123"
role = "worker"
key_sha256 = "{hash}"
"#,
        dir = dir.display(),
        hash = sha(WORKER_KEY)
    );
    let path = dir.join("keyward.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// A GET on the admin API with the admin token, answered as JSON.
pub async fn admin_get(client: &reqwest::Client, url: &str) -> serde_json::Value {
    client.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap()
}
