//! Minted credentials (`[secrets.NAME] kind = ...`): GitHub App installation tokens narrowed per
//! grant, OAuth2 client credentials and Google service-account tokens, against fake mint
//! endpoints (tests/it/py/fake_mint.py) that verify every JWT with PyJWT and the public key.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::common::process::{Spawned, keyward};
use crate::common::{ADMIN_TOKEN, WORKER_KEY, admin_block, admin_get, client, closed_port, read_audit, sha};

const OAUTH_SECRET: &str = "oauth-client-secret-canary-5b7d9f1e3a";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/fake_mint.py")
}

fn python() -> Command {
    let mut command = Command::new("python3");
    command.env("NO_PROXY", "127.0.0.1,localhost").env_remove("HTTP_PROXY").env_remove("HTTPS_PROXY");
    command.env_remove("ALL_PROXY").env("PYTHONDONTWRITEBYTECODE", "1").kill_on_drop(true);
    command
}

/// The fake mint endpoints and the keys they verify with, in their own directory.
struct Fake {
    _server: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Fake {
    async fn start() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let keys = python().args([script().to_str().unwrap(), "keys", dir.path().to_str().unwrap()]).status();
        assert!(tokio::time::timeout(Duration::from_secs(60), keys).await.unwrap().unwrap().success());
        let port = closed_port();
        let server = python()
            .args([script().to_str().unwrap(), "serve", &port.to_string(), dir.path().to_str().unwrap()])
            .spawn()
            .expect("python3 runs the fake mint endpoints");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "the fake mint endpoints did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Fake { _server: server, url: format!("http://127.0.0.1:{port}"), dir }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap()
    }

    async fn control(&self, change: Value) {
        let answer = client().post(format!("{}/_control", self.url)).json(&change).send().await.unwrap();
        assert!(answer.status().is_success());
    }

    /// Every mint request the fake saw, of `kind` (`github`, `oauth2`, `google`).
    async fn mints(&self, kind: &str) -> Vec<Value> {
        let log: Vec<Value> = client().get(format!("{}/_log", self.url)).send().await.unwrap().json().await.unwrap();
        log.into_iter().filter(|e| e["kind"] == kind).collect()
    }

    /// Every token it minted and every JWT keyward sent it: none may appear anywhere else.
    async fn secrets(&self) -> Vec<String> {
        let all: Value = client().get(format!("{}/_secrets", self.url)).send().await.unwrap().json().await.unwrap();
        let mut out: Vec<String> = Vec::new();
        for list in ["tokens", "jwts"] {
            out.extend(all[list].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()));
        }
        out
    }
}

/// The roots keyward holds (a file source) and a config with a route per kind, all pointed at the
/// fake; `extra` is appended.
fn config(fake: &Fake, dir: &Path, extra: &str) -> String {
    let roots = json!({
        "GH_APP_KEY": fake.read("app.pem"),
        "GH_BY_OWNER": fake.read("app.pem"),
        "OAUTH_SECRET": OAUTH_SECRET,
        "OAUTH_BODY": OAUTH_SECRET,
        "OAUTH_WRONG": "not-the-client-secret-000000",
        "GCP_KEY": fake.read("sa.json"),
    });
    std::fs::write(dir.join("roots.json"), roots.to_string()).unwrap();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
header_read_timeout_ms = 2000

[forward]
connect_timeout_ms = 1000
read_timeout_ms = 5000
total_timeout_ms = 20000

[audit]
path = "{dir}/audit.jsonl"

[[sources]]
name = "roots"
provider = "file"
path = "{dir}/roots.json"

[secrets.GH_APP_KEY]
kind = "github-app"
app_id = 12345
installation_id = 678

[secrets.GH_BY_OWNER]
kind = "github-app"
app_id = "12345"
owner = "octo-org"

[secrets.OAUTH_SECRET]
kind = "oauth2-client-credentials"
token_url = "{fake}/oauth/token"
client_id = "keyward-client"
scope = ["read:items", "write:items"]
audience = "https://api.example"

[secrets.OAUTH_BODY]
kind = "oauth2-client-credentials"
token_url = "{fake}/oauth/token"
client_id = "keyward-client"
client_auth = "body"

[secrets.OAUTH_WRONG]
kind = "oauth2-client-credentials"
token_url = "{fake}/oauth/token"
client_id = "keyward-client"

[secrets.GCP_KEY]
kind = "gcp-service-account"
token_uri = "{fake}/google/token"

[[routes]]
name = "github"
prefix = "/github"
upstream = "{fake}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "token {{{{secret}}}}" }}

[[routes]]
name = "api"
prefix = "/api"
upstream = "{fake}/api"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[[routes]]
name = "vertex"
prefix = "/vertex"
upstream = "{fake}/vertex"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[roles.worker]
grants = [
  {{ route = "github", secret = "GH_APP_KEY", methods = ["GET"], paths = ["/repos/octo/alpha/**"], repositories = ["alpha"], permissions = {{ contents = "read" }} }},
  {{ route = "github", secret = "GH_APP_KEY", methods = ["GET"], paths = ["/repos/octo/beta/**"], repositories = ["beta", "gamma"], permissions = {{ issues = "write", contents = "read" }} }},
  {{ route = "github", secret = "GH_BY_OWNER", methods = ["GET"], paths = ["/orgs/**"] }},
  {{ route = "api", secret = "OAUTH_SECRET", methods = ["GET"], paths = ["/items/**"] }},
  {{ route = "api", secret = "OAUTH_BODY", methods = ["GET"], paths = ["/body/**"] }},
  {{ route = "api", secret = "OAUTH_WRONG", methods = ["GET"], paths = ["/wrong/**"] }},
  {{ route = "vertex", secret = "GCP_KEY", methods = ["GET"], paths = ["/**"] }},
]

[[agents]]
id = "worker-1"
role = "worker"
key_sha256 = "{worker}"
{admin}
{extra}
"#,
        dir = dir.display(),
        fake = fake.url,
        worker = sha(WORKER_KEY),
        admin = admin_block(),
    )
}

/// keyward in-process, over `config`.
struct Proxy {
    running: Option<keyward::instance::Running>,
    base: String,
    admin: String,
    dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(fake: &Fake) -> Proxy {
        Proxy::start_with(fake, "").await
    }

    async fn start_with(fake: &Fake, extra: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let text = config(fake, dir.path(), extra);
        let config = keyward::config::load_str(&text, "minted.toml", false).unwrap_or_else(|e| panic!("{e}"));
        let running = keyward::instance::start(config).await.unwrap();
        let base = format!("http://{}", running.proxy_addr.unwrap());
        let admin = format!("http://{}", running.admin_addr);
        Proxy { running: Some(running), base, admin, dir }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        client().get(format!("{}{path}", self.base)).bearer_auth(WORKER_KEY).send().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    fn audit(&self) -> Vec<Value> {
        if let Some(running) = &self.running {
            running.state.audit.flush();
        }
        read_audit(&self.dir.path().join("audit.jsonl"))
    }

    fn audit_text(&self) -> String {
        self.audit().iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
    }

    /// The outcome record of the last request to `path` (below the route prefix).
    async fn outcome(&self, path: &str) -> Value {
        for _ in 0..100 {
            let found = self.audit().into_iter().rev().find(|r| r["type"] == "request" && r["path"] == path);
            if let Some(found) = found {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no outcome record for {path}");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.state.audit.flush();
        }
    }
}

fn assert_none_of(what: &str, text: &str, values: &[String]) {
    for value in values {
        assert!(!text.contains(value.as_str()), "a minted token, JWT or root leaked into {what}");
    }
}

#[tokio::test]
async fn github_app_tokens_are_narrowed_to_each_grant_and_verified_by_the_fake() {
    let fake = Fake::start().await;
    let proxy = Proxy::start(&fake).await;

    let (status, alpha) = proxy.get_json("/github/repos/octo/alpha/contents").await;
    assert_eq!(status, 200, "{alpha}");
    // The API call carried the token the fake minted for this grant's scope.
    assert_eq!(alpha["kind"], "github");
    assert_eq!(alpha["scope"], json!({"repositories": ["alpha"], "permissions": {"contents": "read"}}));
    let (status, beta) = proxy.get_json("/github/repos/octo/beta/issues").await;
    assert_eq!(status, 200, "{beta}");
    assert_eq!(
        beta["scope"],
        json!({"repositories": ["beta", "gamma"], "permissions": {"contents": "read", "issues": "write"}})
    );
    // A second call on a grant is a cache hit.
    assert_eq!(proxy.get_json("/github/repos/octo/alpha/readme").await.0, 200);
    let mints = fake.mints("github").await;
    assert_eq!(mints.len(), 2, "{mints:#?}");
    assert!(mints.iter().all(|m| m["status"] == 201 && m["installation"] == 678), "{mints:#?}");
    assert!(mints.iter().all(|m| m["api_version"] == "2022-11-28" && m["accept"] == "application/vnd.github+json"));
    assert_eq!(mints[0]["repositories"], json!(["alpha"]));
    assert_eq!(mints[1]["repositories"], json!(["beta", "gamma"]));

    // The installation looked up by owner.
    let (status, by_owner) = proxy.get_json("/github/orgs/octo-org/repos").await;
    assert_eq!(status, 200, "{by_owner}");
    assert_eq!(by_owner["scope"], json!({"repositories": null, "permissions": null}));
    assert_eq!(fake.mints("github-lookup").await.len(), 1);

    // A token the upstream echoes is scrubbed from the answer.
    let echoed = proxy.get("/github/repos/octo/alpha/echo").await.text().await.unwrap();
    assert!(echoed.contains("[REDACTED:GH_APP_KEY]"), "{echoed}");

    // The audit names the kind, the scope and the expiry, never a value.
    let record = proxy.outcome("/repos/octo/beta/issues").await;
    assert_eq!(record["credential"], "GH_APP_KEY");
    assert_eq!(record["minted"]["kind"], "github-app");
    assert_eq!(record["minted"]["repositories"], json!(["beta", "gamma"]));
    assert_eq!(record["minted"]["permissions"], json!({"contents": "read", "issues": "write"}));
    assert!(record["minted"]["expiresAt"].as_str().unwrap().ends_with('Z'), "{record}");
    let released = proxy.audit().into_iter().find(|r| r["type"] == "request.released").unwrap();
    assert_eq!(released["minted"]["kind"], "github-app");

    // The admin API shows each kind and each token's expiry.
    let secrets = admin_get(&client(), &format!("{}/admin/secrets", proxy.admin)).await;
    let gh = secrets["secrets"].as_array().unwrap().iter().find(|s| s["name"] == "GH_APP_KEY").unwrap().clone();
    assert_eq!(gh["kind"], "github-app");
    let minted = gh["minted"].as_array().unwrap();
    assert_eq!(minted.len(), 2, "{gh}");
    assert!(minted.iter().all(|m| m["expires_at"].is_string()), "{gh}");
    let oauth = secrets["secrets"].as_array().unwrap().iter().find(|s| s["name"] == "OAUTH_SECRET").unwrap().clone();
    assert_eq!(oauth["kind"], "oauth2-client-credentials");

    let metrics = client().get(format!("{}/metrics", proxy.admin)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("keyward_credential_mints_total{secret=\"GH_APP_KEY\",kind=\"github-app\",result=\"ok\"} 2"),
        "{metrics}"
    );

    let mut secret_values = fake.secrets().await;
    secret_values.push(fake.read("app.pem"));
    assert!(secret_values.len() >= 6, "tokens and JWTs were collected");
    assert_none_of("the audit trail", &proxy.audit_text(), &secret_values);
    assert_none_of("the admin API", &secrets.to_string(), &secret_values);
    assert_none_of("the metrics", &metrics, &secret_values);
    assert_none_of("an agent response", &format!("{alpha}{beta}{by_owner}{echoed}"), &secret_values);
}

#[tokio::test]
async fn a_hundred_concurrent_cold_calls_make_one_mint() {
    let fake = Fake::start().await;
    fake.control(json!({"delay": 0.3})).await;
    let proxy = std::sync::Arc::new(Proxy::start(&fake).await);
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let path = if i % 2 == 0 { "/api/items/1" } else { "/github/repos/octo/alpha/x" };
                proxy.get(path).await.status().as_u16()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(tokio::time::timeout(Duration::from_secs(60), call).await.unwrap().unwrap(), 200);
    }
    assert_eq!(fake.mints("github").await.len(), 1, "one mint per (secret, scope)");
    assert_eq!(fake.mints("oauth2").await.len(), 1, "one mint per (secret, scope)");
}

/// Across replicas sharing Redis for limits, each replica mints its own tokens (documented in
/// docs/minted-credentials.md): one mint per replica however many calls, and no token in Redis.
#[tokio::test]
async fn each_replica_mints_its_own_token_with_redis() {
    let fake = Fake::start().await;
    fake.control(json!({"delay": 0.2})).await;
    let port = closed_port();
    let _redis = crate::redis::start_redis(port);
    let limits = format!("\n[limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\n");
    let replicas = [Proxy::start_with(&fake, &limits).await, Proxy::start_with(&fake, &limits).await];
    let calls = replicas.iter().flat_map(|replica| (0..20).map(move |_| replica.get("/github/repos/octo/alpha/x")));
    for response in futures_util::future::join_all(calls).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(fake.mints("github").await.len(), 2, "one mint per replica");
    // Redis holds counters only: no key or value there is a token.
    let mut redis = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut redis, b"KEYS *\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    redis.set_nonblocking(true).unwrap();
    let mut keys = vec![0u8; 65536];
    let read = std::io::Read::read(&mut redis, &mut keys).unwrap_or(0);
    let keys = String::from_utf8_lossy(&keys[..read]).to_string();
    assert_none_of("redis", &keys, &fake.secrets().await);
}

#[tokio::test]
async fn an_expired_token_is_reminted() {
    let fake = Fake::start().await;
    // Tokens that live 4 s are renewed at half their life.
    fake.control(json!({"ttl": 4})).await;
    let proxy = Proxy::start(&fake).await;
    assert_eq!(proxy.get("/github/repos/octo/alpha/a").await.status(), 200);
    assert_eq!(proxy.get("/api/items/a").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(proxy.get("/github/repos/octo/alpha/b").await.status(), 200);
    assert_eq!(proxy.get("/api/items/b").await.status(), 200);
    assert_eq!(fake.mints("github").await.len(), 2, "re-minted after its renewal time");
    assert_eq!(fake.mints("oauth2").await.len(), 2, "re-minted after its renewal time");
}

#[tokio::test]
async fn a_refused_token_is_reminted_once() {
    let fake = Fake::start().await;
    let proxy = Proxy::start(&fake).await;
    assert_eq!(proxy.get("/github/repos/octo/alpha/a").await.status(), 200);
    assert_eq!(proxy.get("/api/items/a").await.status(), 200);
    // The upstream stops accepting the current tokens: a 401 re-mints once and the call succeeds.
    fake.control(json!({"revoke_all": true})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let concurrent: Vec<_> = (0..10).map(|_| proxy.get("/github/repos/octo/alpha/c")).collect();
    for response in futures_util::future::join_all(concurrent).await {
        assert_eq!(response.status(), 200);
    }
    assert_eq!(fake.mints("github").await.len(), 2, "ten refused calls re-mint once");
    let record = proxy.outcome("/repos/octo/alpha/c").await;
    assert_eq!(record["status"], 200, "{record}");
    let retried =
        proxy.audit().into_iter().filter(|r| r["type"] == "request" && r["invalidated"]["retry"] == "reminted").count();
    assert!(retried >= 1, "the re-mint is audited");
    assert_eq!(proxy.get("/api/items/c").await.status(), 200);
    assert_eq!(fake.mints("oauth2").await.len(), 2, "the OAuth2 token is refreshed once on a 401");
}

#[tokio::test]
async fn a_mint_endpoint_that_refuses_gives_503_audited_and_backs_off() {
    let fake = Fake::start().await;
    fake.control(json!({"fail": 503})).await;
    let proxy = Proxy::start(&fake).await;
    let response = proxy.get("/github/repos/octo/alpha/x").await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "credential_mint_failed", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("'GH_APP_KEY' (github-app)") && message.contains("answered 503"), "{message}");
    let record = proxy.outcome("/repos/octo/alpha/x").await;
    assert_eq!(
        (record["outcome"].as_str(), record["errorCode"].as_str()),
        (Some("secret_error"), Some("credential_mint_failed"))
    );
    assert_eq!(
        record["minted"],
        json!({"kind": "github-app", "mintStatus": 503, "repositories": ["alpha"], "permissions": {"contents": "read"}})
    );
    // Not retried in a tight loop: calls during the backoff do not reach the mint endpoint.
    for _ in 0..20 {
        assert_eq!(proxy.get("/github/repos/octo/alpha/y").await.status(), 503);
    }
    assert_eq!(fake.mints("github").await.len(), 1);
    let metrics = client().get(format!("{}/metrics", proxy.admin)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .contains("keyward_credential_mints_total{secret=\"GH_APP_KEY\",kind=\"github-app\",result=\"error\"} 1"),
        "{metrics}"
    );
    // Once it answers again, the next call after the backoff mints.
    fake.control(json!({"fail": null})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(proxy.get("/github/repos/octo/alpha/z").await.status(), 200);
    assert_eq!(fake.mints("github").await.len(), 2);

    // A client secret the token endpoint refuses: 503 with the endpoint's 401 in the record.
    let (status, body) = proxy.get_json("/api/wrong/x").await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("credential_mint_failed")));
    assert_eq!(proxy.outcome("/wrong/x").await["minted"]["mintStatus"], 401);
    assert!(!proxy.audit_text().contains("not-the-client-secret"));
}

#[tokio::test]
async fn an_unreachable_mint_endpoint_gives_503_without_a_status() {
    let fake = Fake::start().await;
    let proxy = {
        let dir = tempfile::tempdir().unwrap();
        let dead = format!("http://127.0.0.1:{}", closed_port());
        let text =
            config(&fake, dir.path(), "").replace(&format!("{}/oauth/token", fake.url), &format!("{dead}/oauth/token"));
        let config = keyward::config::load_str(&text, "minted.toml", false).unwrap_or_else(|e| panic!("{e}"));
        let running = keyward::instance::start(config).await.unwrap();
        let base = format!("http://{}", running.proxy_addr.unwrap());
        let admin = format!("http://{}", running.admin_addr);
        Proxy { running: Some(running), base, admin, dir }
    };
    let (status, body) = proxy.get_json("/api/items/1").await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("credential_mint_failed")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("could not be reached"), "{body}");
    let record = proxy.outcome("/items/1").await;
    assert_eq!(record["minted"], json!({"kind": "oauth2-client-credentials"}));
}

#[tokio::test]
async fn oauth2_clients_authenticate_by_basic_auth_or_in_the_body() {
    let fake = Fake::start().await;
    let proxy = Proxy::start(&fake).await;
    let (status, basic) = proxy.get_json("/api/items/1").await;
    assert_eq!(status, 200, "{basic}");
    assert_eq!(basic["scope"], json!({"scope": "read:items write:items"}));
    let (status, body) = proxy.get_json("/api/body/1").await;
    assert_eq!(status, 200, "{body}");
    let mints = fake.mints("oauth2").await;
    assert_eq!(mints.len(), 2, "{mints:#?}");
    assert_eq!(
        (mints[0]["auth"].as_str(), mints[0]["audience"].as_str()),
        (Some("basic"), Some("https://api.example"))
    );
    assert_eq!((mints[1]["auth"].as_str(), mints[1]["scope"].as_str()), (Some("body"), None));
    let record = proxy.outcome("/items/1").await;
    assert_eq!(record["minted"]["kind"], "oauth2-client-credentials");
    let mut values = fake.secrets().await;
    values.push(OAUTH_SECRET.to_string());
    assert_none_of("the audit trail", &proxy.audit_text(), &values);
    assert_none_of("an agent response", &format!("{basic}{body}"), &values);
}

#[tokio::test]
async fn gcp_service_account_assertions_are_verified_with_the_public_key() {
    let fake = Fake::start().await;
    let proxy = Proxy::start(&fake).await;
    let (status, answer) = proxy.get_json("/vertex/v1/projects/p/locations/us/models").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["kind"], "google");
    let mints = fake.mints("google").await;
    assert_eq!(mints.len(), 1);
    assert_eq!(mints[0]["status"], 200, "{mints:#?}");
    assert_eq!(mints[0]["kid"], "kid-0001");
    assert_eq!(mints[0]["scope"], "https://www.googleapis.com/auth/cloud-platform");
    assert_eq!(proxy.get("/vertex/v1/other").await.status(), 200);
    assert_eq!(fake.mints("google").await.len(), 1, "the access token is cached");
    let record = proxy.outcome("/v1/other").await;
    assert_eq!(record["minted"]["kind"], "gcp-service-account");
    let mut values = fake.secrets().await;
    let key: Value = serde_json::from_str(&fake.read("sa.json")).unwrap();
    values.push(key["private_key"].as_str().unwrap().lines().nth(1).unwrap().to_string());
    assert_none_of("the audit trail", &proxy.audit_text(), &values);
}

#[tokio::test]
async fn the_binary_leaks_no_token_jwt_or_key_into_its_logs() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(&fake, dir.path(), "")).unwrap();
    let spawned = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap(), "--log", "trace"], &[]);
    let http = client();
    for path in ["/github/repos/octo/alpha/x", "/api/items/1", "/vertex/v1/x", "/github/repos/octo/alpha/echo"] {
        let response = http.get(format!("{}{path}", spawned.proxy)).bearer_auth(WORKER_KEY).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    fake.control(json!({"fail": 500})).await;
    fake.control(json!({"revoke_all": true})).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Refused, then the re-mint fails: the agent gets the upstream's 401.
    let refused = http.get(format!("{}/api/items/2", spawned.proxy)).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let secrets = admin_get(&http, &format!("{}/admin/secrets", spawned.admin)).await;
    let logs = spawned.terminate();
    assert!(logs.contains("minted a credential"), "{logs}");
    let mut values = fake.secrets().await;
    values.push(fake.read("app.pem").lines().nth(1).unwrap().to_string());
    values.push(OAUTH_SECRET.to_string());
    assert_none_of("the logs", &logs, &values);
    assert_none_of("the admin API", &secrets.to_string(), &values);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_none_of("the audit file", &audit, &values);
}

/// A rotation of a minted secret's root is probed with a token minted from the candidate, never
/// with the candidate root itself.
#[tokio::test]
async fn a_rotation_probe_sends_a_token_minted_from_the_candidate_root() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&fake, dir.path(), "")
        .replace("path = \"{dir}/roots.json\"\n".replace("{dir}", &dir.path().display().to_string()).as_str(),
            &format!("path = \"{}/roots.json\"\nrotation = {{ enabled = true }}\n", dir.path().display()))
        .replace(
            "inject = { header = \"authorization\", value = \"token {{secret}}\" }",
            "inject = { header = \"authorization\", value = \"token {{secret}}\" }\nvalidate = { path = \"/repos/octo/alpha/probe\", expect = [200] }",
        );
    assert!(text.contains("rotation = { enabled = true }") && text.contains("validate = "), "{text}");
    let config = keyward::config::load_str(&text, "minted.toml", false).unwrap_or_else(|e| panic!("{e}"));
    let running = keyward::instance::start(config).await.unwrap();
    let admin = format!("http://{}", running.admin_addr);
    let base = format!("http://{}", running.proxy_addr.unwrap());
    let call = client().get(format!("{base}/github/repos/octo/alpha/x")).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(call.status(), 200);
    // The candidate: the same App key, written differently (a trailing line break).
    let path = dir.path().join("roots.json");
    let mut roots: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    roots["GH_APP_KEY"] = json!(format!("{}\n", roots["GH_APP_KEY"].as_str().unwrap()));
    std::fs::write(&path, roots.to_string()).unwrap();
    let answer: Value = client()
        .post(format!("{admin}/admin/secrets/GH_APP_KEY/rotate"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["rotation"]["outcome"], "promoted", "{answer}");
    // The probe was answered 200 by the API, which accepts only tokens it minted.
    let mints = fake.mints("github").await;
    // The call's token, then one per probed (route, secret): GH_APP_KEY with its grant's scope, and
    // GH_BY_OWNER (the same source) with the installation's own.
    assert_eq!(mints.len(), 3, "{mints:#?}");
    assert_eq!(mints[1]["repositories"], json!(["alpha"]), "the probe's token has the grant's scope");
    assert_eq!(mints[2]["repositories"], Value::Null);
    running.shutdown().await;
}

#[tokio::test]
async fn keyward_check_parses_each_root() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(&fake, dir.path(), "")).unwrap();
    let good = keyward().args(["check", "--config", path.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{stdout}{}", String::from_utf8_lossy(&good.stderr));
    assert!(stdout.contains("secret 'GH_APP_KEY': kind github-app"), "{stdout}");

    // A PEM that does not parse and a service-account key that is not one are refused, unquoted.
    let mut roots: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("roots.json")).unwrap()).unwrap();
    roots["GH_APP_KEY"] =
        json!("-----BEGIN RSA PRIVATE KEY-----\nbm90LWEta2V5LWNhbmFyeQ==\n-----END RSA PRIVATE KEY-----\n");
    roots["GCP_KEY"] = json!("{\"type\": \"authorized_user\", \"client_email\": \"x\", \"private_key\": \"canary\"}");
    std::fs::write(dir.path().join("roots.json"), roots.to_string()).unwrap();
    let bad = keyward().args(["check", "--config", path.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("secrets.GH_APP_KEY: the value of secret 'GH_APP_KEY' is not an RSA private key"),
        "{stderr}"
    );
    assert!(
        stderr.contains("secrets.GCP_KEY: the value of secret 'GCP_KEY' is a JSON key whose type is not"),
        "{stderr}"
    );
    assert!(!stderr.contains("bm90LWEta2V5") && !stderr.contains("canary"), "{stderr}");
}
