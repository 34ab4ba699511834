//! The audit trail you can trust: a released record before every credential (even across
//! kill -9), fail-closed on an unwritable trail, `keyward audit verify` against each kind of
//! tampering, `report`, and the admin API.

use crate::common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{Spawned, keyward};
use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::Value;

/// Writes a config with `[audit]` settings replaced by `audit`.
fn write_config(dir: &Path, upstream: &str, audit: &str) -> std::path::PathBuf {
    write_secrets(dir);
    let text = config_text(dir, upstream, &admin_block()).replace(
        &format!("[audit]\npath = \"{}/audit.jsonl\"", dir.display()),
        &format!("[audit]\npath = \"{}\"\n{audit}", dir.join("audit.jsonl").display()),
    );
    let path = dir.join("keyward.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn kill_nine_under_load(durability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let config = write_config(dir.path(), &upstream.url(), &format!("durability = \"{durability}\""));
    let mut spawned = Spawned::serve(dir.path(), &["--config", config.to_str().unwrap()], &[]);
    let client = common::client();
    let proxy = spawned.proxy.clone();
    // A bounded load: 400 requests, 16 at a time, each to its own path so it can be traced.
    let load = tokio::spawn(async move {
        use futures_util::StreamExt;
        futures_util::stream::iter(0..400)
            .map(|i| {
                let (client, proxy) = (client.clone(), proxy.clone());
                async move {
                    let _ = client
                        .get(format!("{proxy}/openai/_fake/echo-headers/req-{i}"))
                        .bearer_auth(WORKER_KEY)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
    });
    let started = Instant::now();
    while upstream.count() < 60 && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    spawned.child.kill().unwrap(); // SIGKILL: no shutdown, no flush
    spawned.child.wait().unwrap();
    let _ = load.await;

    let released: HashSet<String> = read_audit(&dir.path().join("audit.jsonl"))
        .into_iter()
        .filter(|r| r["type"] == "request.released")
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .collect();
    let received: Vec<String> = upstream
        .requests()
        .into_iter()
        .filter(|r| r.headers.get("authorization").is_some())
        .map(|r| r.target)
        .collect();
    assert!(received.len() >= 60, "the load did not get going: {}", received.len());
    assert!(received.len() < 400, "keyward was not killed mid-run");
    for target in &received {
        assert!(
            released.contains(target),
            "{durability}: upstream got {target} with a credential but no released record"
        );
    }
    // What is on disk is an intact chain, even after a kill -9.
    let verify = keyward().args(["audit", "verify"]).arg(dir.path().join("audit.jsonl")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    eprintln!(
        "{durability}: {} credentialed requests reached the upstream, each with a released record",
        received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_loses_no_released_record_os() {
    kill_nine_under_load("os").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_loses_no_released_record_fsync() {
    kill_nine_under_load("fsync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_trail_fails_closed_or_is_counted() {
    for (policy, expected) in [("deny", 503), ("allow", 200)] {
        let dir = tempfile::tempdir().unwrap();
        let upstream = FakeUpstream::start().await.unwrap();
        write_secrets(dir.path());
        // /dev/full accepts the open and fails every write with ENOSPC: a full disk.
        let text = config_text(dir.path(), &upstream.url(), "").replace(
            &format!("path = \"{}/audit.jsonl\"", dir.path().display()),
            &format!("path = \"/dev/full\"\non_failure = \"{policy}\""),
        );
        let config = keyward::config::load_str(&text, "t.toml", false).unwrap();
        let running = keyward::instance::start(config).await.unwrap();
        let client = common::client();
        let r = client
            .post(format!("http://{}/openai/v1/chat/completions", running.proxy_addr.unwrap()))
            .bearer_auth(WORKER_KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), expected, "on_failure = {policy}");
        let body = r.text().await.unwrap();
        let metrics =
            client.get(format!("http://{}/metrics", running.admin_addr)).send().await.unwrap().text().await.unwrap();
        let errors: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("keyward_audit_write_errors_total "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        assert!(errors >= 1, "{metrics}");
        if policy == "deny" {
            assert!(body.contains("audit_unavailable"), "{body}");
            assert_eq!(upstream.count(), 0, "a credential left without a record");
        } else {
            assert_eq!(upstream.count(), 1);
        }
        running.shutdown().await;
    }
}

fn verify_output(path: &Path) -> (bool, String) {
    let out = keyward().args(["audit", "verify"]).arg(path).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_every_kind_of_tampering_on_a_real_trail() {
    let h = Harness::start().await;
    for path in ["/openai/v1/chat/completions", "/openai/v1/files", "/github/user", "/openai/v1/chat/completions"] {
        let r = h.client.post(h.url(path)).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
        let _ = r.text().await;
    }
    let dir = h.stop().await;
    let path = dir.path().join("audit.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&path).unwrap().lines().map(str::to_string).collect();
    assert!(lines.len() >= 6);
    let (ok, out) = verify_output(&path);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("intact: {} records", lines.len())), "{out}");

    let write = |lines: &[String]| std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "edit",
            {
                let mut l = lines.clone();
                l[2] = l[2].replace("\"worker-1\"", "\"reader-1\"");
                l
            },
            ":3: seq 2:",
        ),
        (
            "delete",
            {
                let mut l = lines.clone();
                l.remove(1);
                l
            },
            ":2: seq 2: expected seq 1",
        ),
        (
            "swap",
            {
                let mut l = lines.clone();
                l.swap(3, 4);
                l
            },
            ":4: seq 4:",
        ),
        (
            "insert",
            {
                let mut l = lines.clone();
                l.insert(2, l[1].clone());
                l
            },
            ":3: seq 1:",
        ),
    ];
    for (what, tampered, place) in cases {
        write(&tampered);
        let (ok, out) = verify_output(&path);
        assert!(!ok, "{what} was not caught");
        assert!(out.contains("BROKEN") && out.contains(place), "{what}: expected {place} in {out}");
    }
    write(&lines);
    assert!(verify_output(&path).0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_and_admin_api_read_the_trail_without_secrets() {
    let h = Harness::start_with(&admin_block()).await;
    for (key, path) in
        [(WORKER_KEY, "/openai/v1/chat/completions"), (WORKER_KEY, "/openai/v1/files"), (READER_KEY, "/github/user")]
    {
        let r = h.client.post(h.url(path)).bearer_auth(key).body("{}").send().await.unwrap();
        let _ = r.text().await;
    }
    let admin = |path: &str| h.client.get(format!("{}{path}", h.admin));
    let denied = admin("/admin/audit").send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let denied = admin("/admin/audit").bearer_auth("kwadm_wrong").send().await.unwrap();
    assert_eq!(denied.status(), 401);

    let page: Value =
        admin("/admin/audit?type=request&limit=2").bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["records"].as_array().unwrap().len(), 2);
    let next = page["next_after_seq"].as_u64().unwrap();
    let rest: Value = admin(&format!("/admin/audit?type=request&limit=2&after_seq={next}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["records"].as_array().unwrap().len(), 1);
    assert!(rest["next_after_seq"].is_null());
    let forbidden: Value = admin("/admin/audit?decision=denied&agent=reader-1")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(forbidden["records"].as_array().unwrap().len(), 1);
    let bad = admin("/admin/audit?since=whenever").bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let secrets = admin("/admin/secrets").bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(secrets.contains("\"OPENAI_API_KEY\"") && secrets.contains("\"fetched_at\""), "{secrets}");
    let report =
        admin("/admin/report?format=text").bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(report.contains("attempts: 3 (allowed 1, successful 1, denied 2"), "{report}");
    assert!(report.contains("chain: intact"), "{report}");
    let summary = admin("/admin/audit/summary").bearer_auth(ADMIN_TOKEN).send().await.unwrap().text().await.unwrap();
    for text in [&secrets, &report, &summary, &page.to_string()] {
        assert_no_canary("the admin API", text);
    }

    let dir = h.stop().await;
    let out = keyward()
        .args(["audit", "report", "--since", "1h", "--format", "json"])
        .arg(dir.path().join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["attempts"], 3);
    assert_eq!(json["denials"]["forbidden"], 2);
    assert_no_canary("the report", &String::from_utf8_lossy(&out.stdout));
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_no_canary("the audit file", &audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_separators_and_display_controls_never_reach_an_audit_line_raw() {
    let h = Harness::start().await;
    // U+2028, U+2029, U+0085, U+202E (and a bidi isolate), in granted and refused paths.
    let tricky = ["%E2%80%A8", "%E2%80%A9", "%C2%85", "%E2%80%AE", "%E2%81%A6"];
    for (i, t) in tricky.iter().enumerate() {
        for path in [format!("/openai/_fake/echo-headers/{t}x"), format!("/openai/v1/files/{t}{i}")] {
            h.client.get(h.url(&path)).bearer_auth(WORKER_KEY).send().await.unwrap();
        }
    }
    let dir = h.stop().await;
    let path = dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let records = text.split('\n').filter(|l| !l.is_empty()).count();
    assert!(records >= 2 * tricky.len(), "{records} records");
    let raw: Vec<char> =
        text.chars().filter(|c| ['\u{2028}', '\u{2029}', '\u{85}', '\u{202e}', '\u{2066}'].contains(c)).collect();
    assert!(raw.is_empty(), "raw characters in the audit file: {raw:?}");
    assert!(text.contains("\\u2028") && text.contains("\\u202e"), "the decoded paths were recorded escaped");
    // Line-based tools count one line per record (Python's splitlines splits on U+2028 and U+0085).
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(len(open(sys.argv[1], encoding='utf-8').read().splitlines()))"])
        .arg(&path)
        .output()
        .unwrap();
    let lines: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(lines, records, "splitlines sees {lines} lines for {records} records");
    let (ok, report) = verify_output(&path);
    assert!(ok, "{report}");
}

#[test]
fn a_trail_written_before_separators_were_escaped_still_verifies() {
    use sha2::Digest;
    // Two records as the previous release sealed them: serde_json's escaping, U+2028, U+0085
    // and U+202E raw in the path, each hash over the line without its hash.
    let dir = tempfile::tempdir().unwrap();
    let mut prev = "0".repeat(64);
    let mut lines = Vec::new();
    for (seq, path) in ["/v1/a\u{2028}b", "/v1/\u{85}c\u{202e}fdp.exe"].into_iter().enumerate() {
        let body = format!(
            "\"path\":{},\"prev_hash\":\"{prev}\",\"seq\":{seq},\"type\":\"request\"",
            serde_json::to_string(path).unwrap()
        );
        let hash = hex::encode(sha2::Sha256::digest(format!("{{{body}}}").as_bytes()));
        lines.push(format!("{{\"hash\":\"{hash}\",{body}}}"));
        prev = hash;
    }
    let path = dir.path().join("audit.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let (ok, report) = verify_output(&path);
    assert!(ok, "{report}");
    // An edit is still caught.
    std::fs::write(&path, lines.join("\n").replace("fdp", "fdx") + "\n").unwrap();
    let (ok, report) = verify_output(&path);
    assert!(!ok, "{report}");
}
