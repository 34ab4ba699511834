//! Operations conventions: `/metrics` in the format the scraper asks for, checked by Prometheus's
//! own `promtool`, and the one-line access log per attempt (text and JSON, switchable off).

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::process;
use common::*;

/// Runs `promtool check metrics` (Debian package `prometheus`, installed by scripts/test.sh) on
/// `text`: its exit code and what it printed.
fn promtool_check(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test.sh installs the Debian package `prometheus`)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_negotiate_the_format_and_pass_promtool() {
    let h = Harness::start().await;
    let ok = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).body("{}").send().await;
    assert_eq!(ok.unwrap().status(), 200);
    let denied = h.client.post(h.url("/openai/v1/files")).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(denied.status(), 403);
    let metrics_url = format!("{}/metrics", h.admin);

    // No Accept (curl, a classic scraper): Prometheus text 0.0.4.
    let plain = h.client.get(&metrics_url).send().await.unwrap();
    assert_eq!(plain.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = plain.text().await.unwrap();
    let (code, said) = promtool_check(&text);
    assert_eq!(code, 0, "promtool check metrics: {said}\n{text}");
    assert!(text.contains("# TYPE keyward_requests_total counter\n"), "{text}");
    assert!(text.contains("# HELP keyward_requests_total "), "{text}");
    assert!(
        text.contains("keyward_requests_total{route=\"openai\",status=\"200\",decision=\"allowed\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert_no_canary("metrics", &text);

    // What Prometheus itself sends: OpenMetrics preferred.
    let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                  text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let open = h.client.get(&metrics_url).header("accept", accept).send().await.unwrap();
    assert_eq!(open.headers()["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let openmetrics = open.text().await.unwrap();
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(openmetrics.contains("# HELP keyward_requests Requests by route"), "{openmetrics}");
    assert!(openmetrics.contains("# TYPE keyward_requests counter\n"), "{openmetrics}");

    // An explicit text/plain is honoured too.
    let asked_text = h.client.get(&metrics_url).header("accept", "text/plain").send().await.unwrap();
    assert_eq!(asked_text.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
}

/// Four attempts: allowed, not granted, unknown key, and a path carrying the credential and the
/// agent's own key.
async fn four_attempts(proxy: &str) {
    let client = common::client();
    let chat = format!("{proxy}/openai/v1/chat/completions");
    assert_eq!(client.post(&chat).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap().status(), 200);
    let files = format!("{proxy}/openai/v1/files");
    assert_eq!(client.post(&files).bearer_auth(WORKER_KEY).send().await.unwrap().status(), 403);
    assert_eq!(client.post(&chat).bearer_auth("kw_nobody").send().await.unwrap().status(), 401);
    let leaky = format!("{proxy}/openai/v1/files/{CANARY_OPENAI}/{WORKER_KEY}");
    assert_eq!(client.get(&leaky).bearer_auth(WORKER_KEY).send().await.unwrap().status(), 403);
}

fn access_lines(logs: &str) -> Vec<&str> {
    logs.lines().filter(|l| l.contains("keyward::access")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_attempt_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    let config = binary_config(dir.path(), &upstream.url(), "");
    let env = [("KW_TEST_OPENAI_KEY", CANARY_OPENAI)];
    let spawned = process::Spawned::serve(dir.path(), &["--config", config.to_str().unwrap()], &env);
    four_attempts(&spawned.proxy).await;
    let logs = spawned.terminate();
    let lines = access_lines(&logs);
    assert_eq!(lines.len(), 4, "{logs}");
    assert_eq!(outcomes(&dir.path().join("audit.jsonl")).len(), 4);
    for (line, (status, outcome, agent)) in lines.iter().zip([
        (200, "success", "subagent-abc123"),
        (403, "denied", "subagent-abc123"),
        (401, "denied", "-"),
        (403, "denied", "subagent-abc123"),
    ]) {
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains(&format!("status={status} ")), "{line}");
        assert!(
            line.contains(&format!("outcome=\"{outcome}\"")) || line.contains(&format!("outcome={outcome}")),
            "{line}"
        );
        assert!(line.contains(&format!("agent=\"{agent}\"")) || line.contains(&format!("agent={agent}")), "{line}");
        for field in ["request_id=", "route=", "method=", "path=", "duration_ms="] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }
    assert!(lines[0].contains("method=POST") && lines[0].contains("path=/chat/completions"), "{}", lines[0]);
    // The caller's own key is replaced in the record the line is made from.
    assert!(lines[3].contains("/[agent-key]"), "{}", lines[3]);
    assert_no_canary("the logs", &logs);
    assert!(!logs.contains(WORKER_KEY), "an agent key reached the logs:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_in_json_and_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    let config = binary_config(dir.path(), &upstream.url(), "");
    let env = [("KW_TEST_OPENAI_KEY", CANARY_OPENAI)];
    let args = ["--config", config.to_str().unwrap(), "--log-format", "json"];
    let spawned = process::Spawned::serve(dir.path(), &args, &env);
    four_attempts(&spawned.proxy).await;
    let logs = spawned.terminate();
    let records: Vec<serde_json::Value> = access_lines(&logs)
        .into_iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(records.len(), 4, "{logs}");
    let first = &records[0]["fields"];
    assert_eq!(records[0]["level"], "INFO");
    assert_eq!(first["agent"], "subagent-abc123");
    assert_eq!(first["route"], "openai");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/chat/completions");
    assert_eq!(first["status"], 200);
    assert_eq!(first["outcome"], "success");
    assert!(first["duration_ms"].is_u64() && first["request_id"].as_str().unwrap().len() == 32, "{first}");
    let audit = outcomes(&dir.path().join("audit.jsonl"));
    assert_eq!(first["request_id"], audit[0]["requestId"], "the access line and the audit record agree");
    let leaky_path = records[3]["fields"]["path"].as_str().unwrap();
    assert!(
        leaky_path.starts_with("/files/[REDACTED:OPENAI_API_KEY]") && leaky_path.ends_with("/[agent-key]"),
        "{leaky_path}"
    );
    assert_no_canary("the logs", &logs);
    assert!(!logs.contains(WORKER_KEY), "an agent key reached the logs");

    // access_log = false: nothing per request, the audit trail unchanged.
    let off_dir = tempfile::tempdir().unwrap();
    let config = binary_config(off_dir.path(), &upstream.url(), "access_log = false");
    let spawned = process::Spawned::serve(off_dir.path(), &["--config", config.to_str().unwrap()], &env);
    four_attempts(&spawned.proxy).await;
    let logs = spawned.terminate();
    assert!(access_lines(&logs).is_empty(), "{logs}");
    assert_eq!(outcomes(&off_dir.path().join("audit.jsonl")).len(), 4);

    // Or with a log filter, the config left as it is.
    let filtered_dir = tempfile::tempdir().unwrap();
    let config = binary_config(filtered_dir.path(), &upstream.url(), "");
    let args = ["--config", config.to_str().unwrap(), "--log", "keyward=info,keyward::access=off"];
    let spawned = process::Spawned::serve(filtered_dir.path(), &args, &env);
    four_attempts(&spawned.proxy).await;
    let logs = spawned.terminate();
    assert!(access_lines(&logs).is_empty(), "{logs}");
    assert!(logs.contains("keyward listening"), "other INFO lines stay: {logs}");
}
