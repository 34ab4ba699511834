//! Credential rotation against a real `moto_server`: scheduled and manual runs, validation
//! probes against a fake upstream whose accepted key changes, the grace period, invalidation on
//! 401 with one retry, and rotation under load. keyward runs as its own process.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::moto::{Moto, aws_env, sdk_client, start_moto};
use common::process::Spawned;
use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::{Value, json};

const OLD_KEY: &str = "sk-canary-ROTATE-OLD-5c1d9e2f7a3b8c4d6e0f";
const NEW_KEY: &str = "sk-canary-ROTATE-NEW-0a9b8c7d6e5f4a3b2c1d";
const BAD_KEY: &str = "sk-canary-ROTATE-BAD-1f2e3d4c5b6a79880796";
const KEYS: [&str; 3] = [OLD_KEY, NEW_KEY, BAD_KEY];
const SECRET_ID: &str = "openclaw-prod-credentials";

/// keyward with one rotating AWS source, a probe on the openai route, and an admin token.
fn config(dir: &Path, upstream: &str, webhook: &str, rotation: &str, forward: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[forward]
{forward}
[audit]
path = "{dir}/audit.jsonl"
[admin]
token_sha256 = "{admin}"
[[sources]]
name = "prod"
provider = "aws-secrets-manager"
region = "ap-southeast-1"
secret_name = "{SECRET_ID}"
mapping = {{ OPENAI_API_KEY = "{{{{OPENAI_API_KEY}}}}" }}
cache = {{ ttl_seconds = 300, max_size = 10 }}
rotation = {{ notify = "{webhook}/hook", {rotation} }}
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{upstream}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}
validate = {{ method = "GET", path = "/v1/models", expect = [200] }}
[roles.worker]
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }}]
[[agents]]
id = "worker-1"
role = "worker"
key_sha256 = "{hash}"
"#,
        dir = dir.display(),
        admin = sha(ADMIN_TOKEN),
        hash = sha(WORKER_KEY),
    )
}

struct Rig {
    _moto: Moto,
    sdk: aws_sdk_secretsmanager::Client,
    upstream: FakeUpstream,
    webhook: FakeUpstream,
    dir: tempfile::TempDir,
    keyward: Spawned,
    client: reqwest::Client,
}

impl Rig {
    /// moto holds `OLD_KEY` as AWSCURRENT; keyward starts on it.
    async fn start(rotation: &str, forward: &str) -> Rig {
        let moto = start_moto().await;
        let sdk = sdk_client(&moto.url);
        sdk.create_secret()
            .name(SECRET_ID)
            .secret_string(json!({ "OPENAI_API_KEY": OLD_KEY }).to_string())
            .send()
            .await
            .unwrap();
        let upstream = FakeUpstream::start().await.unwrap();
        let webhook = FakeUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyward.toml");
        std::fs::write(&path, config(dir.path(), &upstream.url(), &webhook.url(), rotation, forward)).unwrap();
        let env = aws_env(Some(&moto.url));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let keyward = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap()], &env);
        Rig { _moto: moto, sdk, upstream, webhook, dir, keyward, client: common::client() }
    }

    async fn chat(&self, body: String) -> (u16, String) {
        let response = self
            .client
            .post(format!("{}/openai/v1/chat/completions", self.keyward.proxy))
            .bearer_auth(WORKER_KEY)
            .body(body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    fn last_key(&self) -> String {
        let last =
            self.upstream.requests().into_iter().rev().find(|r| r.target.ends_with("/chat/completions")).unwrap();
        last.headers["authorization"].to_str().unwrap().trim_start_matches("Bearer ").to_string()
    }

    async fn rotate(&self, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .client
            .post(format!("{}/admin/secrets/OPENAI_API_KEY/rotate", self.keyward.admin))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn put_pending(&self, key: &str) -> String {
        let put = self
            .sdk
            .put_secret_value()
            .secret_id(SECRET_ID)
            .secret_string(json!({ "OPENAI_API_KEY": key }).to_string())
            .version_stages("AWSPENDING")
            .send()
            .await
            .unwrap();
        put.version_id().unwrap().to_string()
    }

    async fn current(&self) -> (String, String) {
        let current =
            self.sdk.get_secret_value().secret_id(SECRET_ID).version_stage("AWSCURRENT").send().await.unwrap();
        let doc: Value = serde_json::from_str(current.secret_string().unwrap()).unwrap();
        (current.version_id().unwrap().to_string(), doc["OPENAI_API_KEY"].as_str().unwrap().to_string())
    }

    fn events(&self) -> Vec<Value> {
        read_audit(&self.dir.path().join("audit.jsonl"))
    }

    async fn wait_for_event(&self, kind: &str) -> Value {
        let started = Instant::now();
        loop {
            if let Some(event) = self.events().into_iter().find(|e| e["type"] == kind) {
                return event;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no {kind} event; audit: {:#?}", self.events());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The request outcome records, once there are `n` (they are written as bodies finish).
    async fn outcomes(&self, n: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let records: Vec<Value> = self.events().into_iter().filter(|e| e["type"] == "request").collect();
            if records.len() >= n {
                return records;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{} outcome records, not {n}", records.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn notifications(&self) -> Vec<Value> {
        self.webhook.requests().iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
    }

    /// No rotation key in any response, audit line, notification or log line.
    fn assert_no_key_leaked(self, responses: &[String]) {
        let audit = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
        let notes: Vec<String> =
            self.webhook.requests().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
        let logs = self.keyward.terminate();
        for key in KEYS {
            for (what, text) in [("audit", &audit), ("logs", &logs), ("notifications", &notes.join("\n"))] {
                assert!(!text.contains(key), "a rotation key leaked into {what}");
            }
            assert!(responses.iter().all(|r| !r.contains(key)), "a rotation key leaked into a response");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rotation_tests_and_promotes_the_pending_version() {
    // Every 2 seconds (a 6-field schedule); notices go out a day ahead, so at once.
    let rig = Rig::start(r#"schedule = "*/2 * * * * *", grace_period_minutes = 0"#, "").await;
    let (status, body) = rig.chat("{}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, OLD_KEY), "{body}");
    let (old_version, _) = rig.current().await;

    rig.upstream.accept_only(&[OLD_KEY, NEW_KEY]);
    let pending = rig.put_pending(NEW_KEY).await;
    let promoted = rig.wait_for_event("rotation.promoted").await;
    assert_eq!(promoted["toVersion"], pending.as_str());
    assert_eq!(promoted["fromVersion"], old_version.as_str());
    assert_eq!(promoted["trigger"], "scheduled");
    let tested = rig.events().into_iter().find(|e| e["type"] == "rotation.tested").unwrap();
    assert_eq!(tested["passed"], true);
    assert_eq!(tested["probes"][0]["route"], "openai");
    assert_eq!(tested["probes"][0]["status"], 200);
    // The probe carried the candidate, and AWS now has it as AWSCURRENT.
    let probe = rig.upstream.requests().into_iter().find(|r| r.target == "/v1/models").unwrap();
    assert_eq!(probe.headers["authorization"], format!("Bearer {NEW_KEY}").as_str());
    assert_eq!(rig.current().await, (pending.clone(), NEW_KEY.to_string()));

    // New requests use the new key at once; the old one is purged (no grace period).
    rig.upstream.accept_only(&[NEW_KEY]);
    let (status, body) = rig.chat("{}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, NEW_KEY), "{body}");
    rig.wait_for_event("rotation.purged").await;
    assert!(rig.events().iter().any(|e| e["type"] == "rotation.notified"));

    let secrets: Value = admin_get(&rig.client, &format!("{}/admin/secrets", rig.keyward.admin)).await;
    let entry = &secrets["secrets"][0];
    assert_eq!(entry["version"], pending.as_str());
    assert_eq!(entry["last_rotation"]["outcome"], "promoted");
    assert!(entry["next_rotation"].is_string(), "{entry}");

    let metrics = rig.client.get(format!("{}/metrics", rig.keyward.admin)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("keyward_rotations_total{source=\"prod\",outcome=\"promoted\"} 1"), "{metrics}");
    let kinds: Vec<String> = rig.notifications().iter().map(|n| n["type"].as_str().unwrap().to_string()).collect();
    for kind in ["rotation.notified", "rotation.tested", "rotation.promoted", "rotation.purged"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} notification in {kinds:?}");
    }
    rig.assert_no_key_leaked(&[body, secrets.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_validation_leaves_awscurrent_untouched_and_notifies() {
    let rig = Rig::start("grace_period_minutes = 5", "").await;
    rig.upstream.accept_only(&[OLD_KEY]);
    let (before_version, _) = rig.current().await;
    let (status, body) = rig.rotate(Some(json!({ "value": BAD_KEY }))).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "rotation_failed");
    // AWSCURRENT still holds the old version, and keyward keeps serving it.
    assert_eq!(rig.current().await, (before_version, OLD_KEY.to_string()));
    let (status, chat) = rig.chat("{}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, OLD_KEY), "{chat}");

    let failed = rig.wait_for_event("rotation.failed").await;
    assert_eq!(failed["currentUntouched"], true);
    let tested = rig.events().into_iter().find(|e| e["type"] == "rotation.tested").unwrap();
    assert_eq!((tested["passed"].as_bool(), tested["probes"][0]["status"].as_u64()), (Some(false), Some(401)));
    let started = Instant::now();
    while !rig.notifications().iter().any(|n| n["type"] == "rotation.failed") {
        assert!(started.elapsed() < Duration::from_secs(10), "no rotation.failed notification");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The refused candidate stays AWSPENDING (as a rotation Lambda leaves it): a second run
    // refuses it again, and once the stage is cleared there is nothing to rotate.
    let (status, _) = rig.rotate(None).await;
    assert_eq!(status, 422);
    let pending = rig.sdk.get_secret_value().secret_id(SECRET_ID).version_stage("AWSPENDING").send().await.unwrap();
    rig.sdk
        .update_secret_version_stage()
        .secret_id(SECRET_ID)
        .version_stage("AWSPENDING")
        .remove_from_version_id(pending.version_id().unwrap())
        .send()
        .await
        .unwrap();
    let (status, body) = rig.rotate(None).await;
    assert_eq!((status, body["rotation"]["outcome"].as_str()), (200, Some("nothing_to_rotate")), "{body}");
    let metrics = rig.client.get(format!("{}/metrics", rig.keyward.admin)).send().await.unwrap().text().await.unwrap();
    for line in [
        "keyward_rotations_total{source=\"prod\",outcome=\"failed\"} 2",
        "keyward_rotations_total{source=\"prod\",outcome=\"nothing_to_rotate\"} 1",
    ] {
        assert!(metrics.contains(line), "{metrics}");
    }
    rig.assert_no_key_leaked(&[chat, body.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_because_of_a_rotation_under_load() {
    let rig = Rig::start("grace_period_minutes = 1", "").await;
    rig.upstream.accept_only(&[OLD_KEY, NEW_KEY]);
    let rig = std::sync::Arc::new(rig);
    // Four workers, 150 calls each, bounded by count; the rotation lands in the middle.
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let rig = rig.clone();
            tokio::spawn(async move {
                let mut results = Vec::new();
                for i in 0..150 {
                    results.push(rig.chat(format!("{{\"worker\":{w},\"i\":{i}}}")).await);
                }
                results
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = rig.rotate(Some(json!({ "value": NEW_KEY }))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rotation"]["outcome"], "promoted");
    // The upstream now refuses the old key: calls still holding it are retried with the new one.
    rig.upstream.accept_only(&[NEW_KEY]);
    let mut bodies = Vec::new();
    for worker in workers {
        for (status, text) in worker.await.unwrap() {
            assert_eq!(status, 200, "{text}");
            bodies.push(text);
        }
    }
    assert_eq!(bodies.len(), 600);
    let (status, _) = rig.chat("{}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, NEW_KEY));
    // keyward wrote the new value as AWSPENDING and promoted it: AWS holds it as AWSCURRENT.
    assert_eq!(rig.current().await.1, NEW_KEY);
    let outcomes = rig.outcomes(601).await;
    assert_eq!(outcomes.len(), 601);
    assert!(outcomes.iter().all(|r| r["outcome"] == "success"));
    let rig = std::sync::Arc::into_inner(rig).unwrap();
    rig.assert_no_key_leaked(&bodies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_credential_is_invalidated_and_retried_once_with_the_new_version() {
    let rig = Rig::start("enabled = false", "retry_body_bytes = 1024").await;
    let (status, _) = rig.chat("{}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, OLD_KEY));

    // Rotated outside keyward: AWSCURRENT moves on and the upstream refuses the old key.
    let rotated = rig
        .sdk
        .put_secret_value()
        .secret_id(SECRET_ID)
        .secret_string(json!({ "OPENAI_API_KEY": NEW_KEY }).to_string())
        .send()
        .await
        .unwrap();
    rig.upstream.accept_only(&[NEW_KEY]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, body) = rig.chat("{\"retry\":true}".into()).await;
    assert_eq!((status, rig.last_key().as_str()), (200, NEW_KEY), "{body}");
    // The retry replayed the same body.
    assert_eq!(rig.upstream.last().unwrap().body, "{\"retry\":true}");
    let record = rig.outcomes(2).await[1].clone();
    assert_eq!(record["outcome"], "success");
    assert_eq!(record["secretVersion"], rotated.version_id().unwrap());
    assert_eq!(record["invalidated"]["status"], 401);
    assert_eq!(record["invalidated"]["retry"], "new_version");
    let released: Vec<Value> = rig
        .events()
        .into_iter()
        .filter(|e| e["type"] == "request.released" && e["requestId"] == record["requestId"])
        .collect();
    assert_eq!(released.len(), 2, "each credential sent is released on the record");

    // Refused again with no newer version, a body too large to replay: the 401 comes back.
    rig.upstream.accept_only(&["sk-nobody-has-this-key-000000"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, refused) = rig.chat(format!("{{\"pad\":\"{}\"}}", "x".repeat(2000))).await;
    assert_eq!(status, 401, "{refused}");
    let record = rig.outcomes(3).await[2].clone();
    assert_eq!(record["invalidated"]["retry"], "none");
    assert_eq!(record["outcome"], "upstream_status");
    rig.assert_no_key_leaked(&[body, refused]);
}
