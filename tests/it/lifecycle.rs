//! Hot reload (admin API and SIGHUP) and file-source rotation, against the real binary: a valid
//! config is swapped in, an invalid one is refused while the last good one keeps serving,
//! in-flight requests finish on the config they started with, and cached secrets carry over.

use crate::common;

use std::time::{Duration, Instant};

use common::process::Spawned;
use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::{Value, json};

struct Rig {
    upstream: FakeUpstream,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    keyward: Spawned,
    client: reqwest::Client,
}

impl Rig {
    async fn start() -> Rig {
        Rig::start_with(|text| text).await
    }

    async fn start_with(edit: impl Fn(String) -> String) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let upstream = FakeUpstream::start().await.unwrap();
        write_secrets(dir.path());
        let path = dir.path().join("keyward.toml");
        std::fs::write(&path, edit(config_text(dir.path(), &upstream.url(), &admin_block()))).unwrap();
        let keyward = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap()], &[]);
        Rig { upstream, dir, path, keyward, client: common::client() }
    }

    async fn call(&self, key: &str, method: reqwest::Method, path: &str) -> (u16, String) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.keyward.proxy))
            .bearer_auth(key)
            .body("{}")
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn reader_models(&self) -> u16 {
        self.call(READER_KEY, reqwest::Method::GET, "/openai/v1/models").await.0
    }

    async fn admin_post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.post(format!("{}{path}", self.keyward.admin)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Rewrites the config file with `edit` applied to the test config.
    fn write_config(&self, edit: impl Fn(String) -> String) {
        let text = config_text(self.dir.path(), &self.upstream.url(), &admin_block());
        std::fs::write(&self.path, edit(text)).unwrap();
    }

    async fn fetches(&self, source: &str) -> u64 {
        let metrics = self.client.get(format!("{}/metrics", self.keyward.admin)).send().await.unwrap().text().await;
        fetch_count(&metrics.unwrap(), source)
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        read_audit(&self.dir.path().join("audit.jsonl")).into_iter().filter(|e| e["type"] == kind).collect()
    }
}

fn without_reader_grant(text: String) -> String {
    text.replace(r#"methods = ["GET"], paths = ["/v1/models"]"#, r#"methods = ["GET"], paths = ["/v1/other"]"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_a_valid_config_and_refuses_an_invalid_one() {
    let rig = Rig::start().await;
    assert_eq!(rig.reader_models().await, 200);
    let fetched = rig.fetches("files").await;
    assert_eq!(fetched, 1);

    // A slow call in flight keeps the config it started with.
    let slow = {
        let (client, url) = (rig.client.clone(), format!("{}/openai/_fake/slow?ms=1200", rig.keyward.proxy));
        tokio::spawn(async move { client.get(url).bearer_auth(WORKER_KEY).send().await.unwrap().status().as_u16() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Valid: the reader loses its grant at once; the unchanged sources stay cached.
    rig.write_config(|t| without_reader_grant(t).replace(r#"paths = ["/_fake/**"]"#, r#"paths = ["/_nothing"]"#));
    let (status, body) = rig.admin_post("/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"]["sources_kept_cached"], 3);
    assert_eq!(body["reloaded"]["restart_needed"], json!([]));
    assert_eq!(rig.reader_models().await, 403);
    assert_eq!(slow.await.unwrap(), 200, "the in-flight call finished on the old config");
    let (status, _) = rig.call(WORKER_KEY, reqwest::Method::GET, "/openai/_fake/slow?ms=1").await;
    assert_eq!(status, 403, "new calls use the new config");
    let (status, _) = rig.call(WORKER_KEY, reqwest::Method::POST, "/openai/v1/chat/completions").await;
    assert_eq!(status, 200);
    assert_eq!(rig.fetches("files").await, fetched, "a reload does not refetch unchanged sources");

    // Invalid: refused with file:line and field; the last good config keeps serving.
    rig.write_config(|t| without_reader_grant(t).replacen("upstream = \"http://", "upstream = \"ftp://", 1));
    let (status, body) = rig.admin_post("/admin/reload", None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let problem = body["error"]["problems"][0].as_str().unwrap();
    assert!(problem.contains("keyward.toml:") && problem.contains("routes[0].upstream"), "{problem}");
    assert_eq!(rig.reader_models().await, 403);
    let (status, _) = rig.call(WORKER_KEY, reqwest::Method::POST, "/openai/v1/chat/completions").await;
    assert_eq!(status, 200);

    // SIGHUP: the same reload, here restoring the reader's grant and adding a restart-only change.
    rig.write_config(|t| t.replace("header_read_timeout_ms = 2000", "header_read_timeout_ms = 3000"));
    let _ = std::process::Command::new("kill").arg("-HUP").arg(rig.keyward.child.id().to_string()).status();
    let started = Instant::now();
    while rig.reader_models().await != 200 {
        assert!(started.elapsed() < Duration::from_secs(10), "SIGHUP did not reload:\n{}", rig.keyward.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reloaded = rig.events("config.reloaded");
    assert_eq!(reloaded.len(), 2);
    assert_eq!(reloaded[1]["restartNeeded"], json!(["server"]));
    assert_eq!(rig.events("config.rejected").len(), 1);
    let logs = rig.keyward.terminate();
    assert!(logs.contains("config reload refused"), "{logs}");
    assert!(logs.contains("takes effect only after a restart"), "{logs}");
    assert_no_canary("logs", &logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_source_rotates_by_rereading_its_file() {
    let rig = Rig::start().await;
    let (status, _) = rig.call(WORKER_KEY, reqwest::Method::POST, "/openai/v1/chat/completions").await;
    assert_eq!(status, 200);
    let rotated = "sk-canary-OPENAI-rotated-in-the-file-0001";
    let path = rig.dir.path().join("secrets.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["OPENAI_API_KEY"] = json!(rotated);
    std::fs::write(&path, doc.to_string()).unwrap();
    // The cached value still serves until the rotation swaps the new one in.
    rig.call(WORKER_KEY, reqwest::Method::POST, "/openai/v1/chat/completions").await;
    assert_eq!(rig.upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());

    let (status, body) = rig.admin_post("/admin/secrets/OPENAI_API_KEY/rotate", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rotation"]["outcome"], "promoted");
    let (status, echoed) = rig.call(WORKER_KEY, reqwest::Method::GET, "/openai/_fake/echo-headers").await;
    assert_eq!(status, 200);
    assert_eq!(rig.upstream.last().unwrap().headers["authorization"], format!("Bearer {rotated}").as_str());
    assert!(!echoed.contains(rotated), "the rotated value is scrubbed too: {echoed}");
    // Nothing changed since: nothing to rotate. A file cannot take a value over the API.
    let (status, body) = rig.admin_post("/admin/secrets/OPENAI_API_KEY/rotate", None).await;
    assert_eq!((status, body["rotation"]["outcome"].as_str()), (200, Some("nothing_to_rotate")), "{body}");
    let (status, body) = rig.admin_post("/admin/secrets/OPENAI_API_KEY/rotate", Some(json!({ "value": "sk-x" }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("rotation_unsupported")), "{body}");
    let (status, body) = rig.admin_post("/admin/secrets/NOPE/rotate", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("unknown_secret")));
    let (status, body) = rig.admin_post("/admin/secrets/UNSET_SECRET/rotate", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("rotation_unsupported")), "{body}");
    let unauthorized = rig.client.post(format!("{}/admin/secrets/OPENAI_API_KEY/rotate", rig.keyward.admin)).send();
    assert_eq!(unauthorized.await.unwrap().status(), 401);
    // A malformed body is refused without echoing it.
    let bad = rig
        .client
        .post(format!("{}/admin/secrets/OPENAI_API_KEY/rotate", rig.keyward.admin))
        .bearer_auth(ADMIN_TOKEN)
        .body("sk-canary-not-json-body")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(!bad.text().await.unwrap().contains("canary"));

    let promoted = rig.events("rotation.promoted");
    assert_eq!(promoted.len(), 1);
    assert_eq!(promoted[0]["trigger"], "manual");
    let tested = rig.events("rotation.tested");
    assert_eq!(tested[0]["untested"], true, "no route has a probe: {tested:?}");
    let audit = std::fs::read_to_string(rig.dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains(rotated));
    assert_no_canary("the audit file", &audit);
    let logs = rig.keyward.terminate();
    assert!(!logs.contains(rotated));
    // The compliance report names the rotation.
    let report = common::process::keyward()
        .args(["audit", "report", "--config", rig.path.to_str().unwrap()])
        .current_dir(rig.dir.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("rotations: 8"), "{report}");
    let line = report.lines().find(|l| l.trim_start().starts_with("OPENAI_API_KEY") && l.contains("source")).unwrap();
    assert!(line.contains("last rotated 20"), "{report}");
}

/// A rotating file source is pinned: a changed file is not taken by a cache refresh, only by a
/// rotation that tests it, so a value that fails its probe never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_file_source_keeps_its_tested_value_until_a_rotation() {
    let rig = Rig::start_with(|text| {
        text.replacen(
            "secrets.json\"\n",
            "secrets.json\"\ncache = { ttl_seconds = 1, max_size = 10 }\nrotation = { grace_period_minutes = 0 }\n",
            1,
        )
    })
    .await;
    let chat = || rig.call(WORKER_KEY, reqwest::Method::POST, "/openai/v1/chat/completions");
    assert_eq!(chat().await.0, 200);
    let rotated = "sk-canary-OPENAI-pinned-until-rotated-02";
    let path = rig.dir.path().join("secrets.json");
    let mut doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    doc["OPENAI_API_KEY"] = json!(rotated);
    std::fs::write(&path, doc.to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(chat().await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chat().await.0, 200);
    let header = |rig: &Rig| rig.upstream.last().unwrap().headers["authorization"].to_str().unwrap().to_string();
    assert_eq!(header(&rig), format!("Bearer {CANARY_OPENAI}"), "the untested value is not used");
    let (status, body) = rig.admin_post("/admin/secrets/OPENAI_API_KEY/rotate", None).await;
    assert_eq!((status, body["rotation"]["outcome"].as_str()), (200, Some("promoted")), "{body}");
    assert_eq!(chat().await.0, 200);
    assert_eq!(header(&rig), format!("Bearer {rotated}"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(chat().await.0, 200);
    assert_eq!(header(&rig), format!("Bearer {rotated}"), "the promoted value survives a refresh");
    let logs = rig.keyward.terminate();
    assert!(logs.contains("used once a rotation has tested and promoted them"), "{logs}");
    assert!(!logs.contains(rotated));
}

#[test]
fn check_describes_rotation_and_warns_when_no_probe_tests_it() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let text = config_text(dir.path(), "http://127.0.0.1:9", "").replacen(
        "provider = \"file\"\n",
        "provider = \"file\"\nrotation = { schedule = \"0 0 * * 0\", grace_period_minutes = 30 }\n",
        1,
    );
    let path = dir.path().join("k.toml");
    std::fs::write(&path, text).unwrap();
    let out = common::process::keyward().args(["check", "--config", path.to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("source 'files': rotation schedule '0 0 * * 0' (UTC), grace 30 min"), "{stdout}");
    assert!(stdout.contains("warning: source 'files' rotates, but no route"), "{stdout}");
}

#[tokio::test]
async fn reload_refuses_when_running_on_the_embedded_config() {
    let h = Harness::start_with(&admin_block()).await;
    let response = h.client.post(format!("{}/admin/reload", h.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_config_file");
    h.stop().await;
}
