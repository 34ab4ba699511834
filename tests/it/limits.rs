//! Limits through the real flow: quotas answer 429 with draft RateLimit headers before the
//! secret store or upstream is touched, in-flight caps, quarantine and release through the admin
//! API, and an anomaly detector that quarantines and notifies a webhook.

use crate::common;

use std::time::Duration;

use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::Value;

const LIMITED_KEY: &str = "kw_testLimitedAgentKey456789abcdefghijklmnopq";

fn extra(webhook: &str) -> String {
    format!(
        r#"
[roles.limited]
max_in_flight = 2
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"], rate = "60/min", burst = 5 }},
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/_fake/**"] }},
]

[roles.limited.anomaly]
failure_burst = {{ threshold = 3, window_seconds = 60, action = "quarantine", cooldown_seconds = 600 }}
first_use = {{ enabled = false }}

[[agents]]
id = "limited-1"
role = "limited"
key_sha256 = "{key}"

[limits]
notify = "{webhook}/hook"

[admin]
token_sha256 = "{admin}"
"#,
        key = sha(LIMITED_KEY),
        admin = sha(ADMIN_TOKEN)
    )
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

async fn wait_ready(h: &Harness) {
    for _ in 0..100 {
        let ready: Value = h.client.get(format!("{}/readyz", h.admin)).send().await.unwrap().json().await.unwrap();
        if ready["waiting_for_sources"] == serde_json::json!(["gone"]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_answers_429_with_headers_and_never_touches_the_store() {
    let webhook = FakeUpstream::start().await.unwrap();
    let h = Harness::start_with(&extra(&webhook.url())).await;
    wait_ready(&h).await;
    let mut statuses = Vec::new();
    let mut throttled = None;
    for _ in 0..8 {
        let r = h
            .client
            .post(h.url("/openai/v1/chat/completions"))
            .bearer_auth(LIMITED_KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            throttled = Some(r);
        }
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429, 429, 429]);
    let r = throttled.unwrap();
    let header = |name: &str| r.headers()[name].to_str().unwrap().to_string();
    assert_eq!(header("ratelimit-limit"), "60");
    assert_eq!(header("ratelimit-remaining"), "0");
    assert_eq!(header("ratelimit-policy"), "60;w=60");
    assert!(header("retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(header("retry-after"), header("ratelimit-reset"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    assert_eq!(h.upstream.count(), 5, "throttled calls reached the upstream");
    let metrics = h.metrics().await;
    // Every allowed call was a cache hit; no throttled call asked the secret store anything.
    assert_eq!(metric(&metrics, "keyward_secret_cache_hits_total{source=\"files\"} "), 5, "{metrics}");
    assert_eq!(metric(&metrics, "keyward_secret_fetches_total{source=\"files\",result=\"ok\"} "), 1, "{metrics}");
    let records = h.audit();
    assert_eq!(records.iter().filter(|r| r["decision"] == "throttled" && r["status"] == 429).count(), 3);
    // Another agent's allowance is its own.
    let r =
        h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_caps_concurrent_calls() {
    let webhook = FakeUpstream::start().await.unwrap();
    let h = Harness::start_with(&extra(&webhook.url())).await;
    let calls = (0..3).map(|_| async {
        let r = h.client.get(h.url("/openai/_fake/slow?ms=600")).bearer_auth(LIMITED_KEY).send().await.unwrap();
        r.status().as_u16()
    });
    let mut statuses = futures_util::future::join_all(calls).await;
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 429]);
    // Slots come back when the responses finish.
    let r = h.client.get(h.url("/openai/_fake/slow?ms=10")).bearer_auth(LIMITED_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_and_release_through_the_admin_api() {
    let webhook = FakeUpstream::start().await.unwrap();
    let h = Harness::start_with(&extra(&webhook.url())).await;
    let admin = |path: &str| h.client.post(format!("{}{path}", h.admin)).bearer_auth(ADMIN_TOKEN);
    assert_eq!(admin("/admin/agents/limited-1/quarantine").send().await.unwrap().status(), 200);
    let r = h.client.get(h.url("/openai/_fake/status/200")).bearer_auth(LIMITED_KEY).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "agent_quarantined");
    let agents: Value = admin_get(&h.client, &format!("{}/admin/agents", h.admin)).await;
    let limited = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == "limited-1").unwrap();
    assert_eq!(limited["status"], "quarantined");
    assert_eq!(admin("/admin/agents/limited-1/release").send().await.unwrap().status(), 200);
    let r = h.client.get(h.url("/openai/_fake/status/200")).bearer_auth(LIMITED_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(admin("/admin/agents/nobody/quarantine").send().await.unwrap().status(), 404);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_burst_quarantines_the_agent_and_notifies() {
    let webhook = FakeUpstream::start().await.unwrap();
    let h = Harness::start_with(&extra(&webhook.url())).await;
    // Probing: three calls the role does not grant.
    for path in ["/openai/v1/files", "/openai/v1/models", "/openai/v1/embeddings"] {
        let r = h.client.post(h.url(path)).bearer_auth(LIMITED_KEY).send().await.unwrap();
        assert_eq!(r.status(), 403);
    }
    let r = h.client.get(h.url("/openai/_fake/status/200")).bearer_auth(LIMITED_KEY).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "agent_quarantined");
    let event = h.wait_for_audit_event("anomaly.failure_burst").await;
    assert_eq!(event["agentId"], "limited-1");
    assert_eq!(event["action"], "quarantine");
    assert_eq!(event["value"], 3.0);
    for _ in 0..100 {
        if webhook.count() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hook = webhook.last().expect("the notify webhook received nothing");
    assert_eq!(hook.target, "/hook");
    let body: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(body["type"], "anomaly.failure_burst");
    assert_no_canary("the webhook", &String::from_utf8_lossy(&hook.body));
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("keyward_anomalies_total{detector=\"failure_burst\",action=\"quarantine\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}
