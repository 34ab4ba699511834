//! Operations conventions: `/metrics` in the format the scraper asks for, checked by Prometheus's
//! own `promtool`, and the one-line access log per attempt (text and JSON, switchable off).

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};

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
