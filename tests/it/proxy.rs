//! End-to-end behaviour of the proxy on loopback: injection, identity, authorization, request
//! hygiene, streaming, and one audit record for every outcome.

use crate::common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use keyward::fake_upstream::FakeUpstream;
use serde_json::Value;

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_call_gets_the_real_credential_and_the_agent_never_sees_it() {
    let h = Harness::start().await;
    let response = h
        .client
        .post(h.url("/openai/v1/chat/completions"))
        .header("authorization", bearer(WORKER_KEY))
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-keyward-request-id"].to_str().unwrap().to_string();
    let headers = format!("{:?}", response.headers());
    let body = response.text().await.unwrap();
    assert!(body.contains("chat.completion"), "{body}");
    assert_no_canary("response headers", &headers);
    assert_no_canary("response body", &body);

    let seen = h.upstream.last().unwrap();
    assert_eq!(seen.target, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
    assert_eq!(seen.headers["host"], h.upstream.addr.to_string().as_str());
    assert!(!format!("{:?}", seen.headers).contains(WORKER_KEY), "the agent key was forwarded");
    assert!(seen.body.starts_with(b"{\"model\""));
    // Framing is rebuilt by keyward's client from the body it actually forwards.
    assert_eq!(seen.headers["content-length"], seen.body.len().to_string().as_str());

    let records = h.audit();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["requestId"], request_id.as_str());
    assert_eq!(r["agentId"], "worker-1");
    assert_eq!(r["operation"], "openai POST /v1/chat/completions");
    assert_eq!(r["credential"], "OPENAI_API_KEY");
    assert_eq!(r["success"], true);
    assert_eq!(r["status"], 200);
    assert_eq!(r["decision"], "allowed");
    assert_eq!(r["outcome"], "success");
    assert_eq!(r["ip"], "127.0.0.1");
    assert_eq!(r["metadata"]["env"], "test");
    assert_eq!(r["secretSource"], "files");
    assert!(r["timestamp"].as_str().unwrap().ends_with('Z'));
    assert!(r["durationMs"].is_u64());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_and_github_header_styles_work() {
    let h = Harness::start().await;
    let r =
        h.client.post(h.url("/anthropic/v1/messages")).header("x-api-key", WORKER_KEY).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = h.upstream.last().unwrap();
    assert_eq!(seen.headers["x-api-key"], CANARY_ANTHROPIC);

    for scheme in ["token", "Bearer"] {
        let r = h
            .client
            .get(h.url("/github/repos/octo/hello/pulls?state=open"))
            .header("authorization", format!("{scheme} {WORKER_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
        let seen = h.upstream.last().unwrap();
        assert_eq!(seen.target, "/repos/octo/hello/pulls?state=open");
        assert_eq!(seen.headers["authorization"], format!("Bearer {CANARY_GITHUB}").as_str());
    }
    // The agent key may also come in Proxy-Authorization, which is never forwarded.
    let r = h.client.get(h.url("/github/user")).header("proxy-authorization", bearer(WORKER_KEY)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(h.upstream.last().unwrap().headers.get("proxy-authorization").is_none());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_failures_are_401_and_never_reach_the_upstream() {
    let h = Harness::start().await;
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        ("/openai/v1/chat/completions", vec![], "missing_agent_key"),
        ("/openai/v1/chat/completions", vec![("authorization", bearer("kw_unknownKey"))], "unknown_agent_key"),
        ("/openai/v1/chat/completions", vec![("authorization", bearer(DISABLED_KEY))], "unknown_agent_key"),
        ("/openai/v1/chat/completions", vec![("authorization", WORKER_KEY.to_string())], "malformed_agent_key"),
        ("/openai/v1/chat/completions", vec![("authorization", "Bearer ".to_string())], "malformed_agent_key"),
        ("/openai/v1/chat/completions", vec![("authorization", format!("token {WORKER_KEY}"))], "malformed_agent_key"),
        // Right key, a header this route does not read it from.
        ("/anthropic/v1/messages", vec![("api-key", WORKER_KEY.to_string())], "missing_agent_key"),
        ("/openai/v1/chat/completions", vec![("x-api-key", WORKER_KEY.to_string())], "missing_agent_key"),
    ];
    for (path, headers, code) in &cases {
        let mut request = h.client.post(h.url(path)).body("{}");
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{path} {headers:?}");
        assert!(response.headers().contains_key("www-authenticate"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], *code, "{path} {headers:?}");
        assert!(body["error"]["message"].as_str().unwrap().contains("route"));
    }
    assert_eq!(h.upstream.count(), 0);
    let records = h.audit();
    assert_eq!(records.len(), cases.len());
    assert!(records.iter().all(|r| r["status"] == 401 && r["decision"] == "denied" && r["success"] == false));
    let unknown = records.iter().find(|r| r["errorCode"] == "unknown_agent_key").unwrap();
    assert_eq!(unknown["keyFingerprint"].as_str().unwrap().len(), 12);
    assert!(records.iter().all(|r| !r.to_string().contains("kw_")), "an agent key reached the audit trail");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_is_deny_by_default_with_useful_messages() {
    let h = Harness::start().await;
    let cases = [
        (WORKER_KEY, "PUT", "/openai/v1/chat/completions", 403, "is not granted method PUT on route 'openai'"),
        (WORKER_KEY, "GET", "/openai/v1/chat/completions", 403, "is not granted GET /v1/chat/completions on route"),
        (WORKER_KEY, "POST", "/openai/v1/files", 403, "is not granted POST /v1/files on route 'openai'"),
        (WORKER_KEY, "DELETE", "/github/repos/o/r", 403, "is not granted method DELETE"),
        (READER_KEY, "POST", "/anthropic/v1/messages", 401, ""),
        (READER_KEY, "GET", "/github/user", 403, "agent 'reader-1' (role 'reader') has no grant on route 'github'"),
        (READER_KEY, "GET", "/openai/v1/models", 200, ""),
        (WORKER_KEY, "GET", "/nowhere/v1", 404, "no route matches"),
        (WORKER_KEY, "GET", "/openai-evil/v1/models", 404, "no route matches"),
    ];
    for (key, method, path, status, message) in cases {
        let request = h
            .client
            .request(method.parse().unwrap(), h.url(path))
            .header("authorization", bearer(key))
            .header("x-api-key", "wrong-header-for-this-agent");
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body = response.text().await.unwrap();
        assert!(body.contains(message), "{method} {path}: {body}");
        assert_no_canary("an error body", &body);
    }
    assert_eq!(h.upstream.count(), 1, "only the granted call reaches the upstream");
    let denied: Vec<Value> = h.audit().into_iter().filter(|r| r["status"] == 403).collect();
    assert_eq!(denied.len(), 5);
    assert!(denied.iter().all(|r| r["decision"] == "denied" && r["errorCode"] == "forbidden"));
    h.stop().await;
}

/// Sends raw bytes and returns the status line and the whole answer.
fn raw_request(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_absolute_form_and_connect_are_400() {
    let h = Harness::start().await;
    let addr = h.running.as_ref().unwrap().proxy_addr.unwrap();
    let auth = format!("Authorization: Bearer {WORKER_KEY}\r\n");
    let targets = [
        "/openai/../github/user",
        "/openai/v1/%2e%2e/%2e%2e/github/user",
        "/openai/v1/%252e%252e/x",
        "/openai/v1/..%2fx",
        "/openai//v1/chat/completions",
        "/openai/v1\\..\\x",
        "/openai/%c0%ae%c0%ae/x",
        "http://evil.example/openai/v1/chat/completions",
        "http://127.0.0.1/openai/v1/chat/completions",
    ];
    for target in targets {
        let answer = tokio::task::spawn_blocking({
            let request = format!(
                "POST {target} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            );
            move || raw_request(addr, request.as_bytes())
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(answer.contains("invalid_"), "{target}: {answer}");
    }
    let answer = tokio::task::spawn_blocking(move || {
        raw_request(addr, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "CONNECT: {answer}");
    let trace = format!("TRACE /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let answer = tokio::task::spawn_blocking(move || raw_request(addr, trace.as_bytes())).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "TRACE: {answer}");
    assert_eq!(h.upstream.count(), 0);
    let records = h.audit();
    assert_eq!(records.len(), targets.len() + 2);
    assert!(records.iter().all(|r| r["status"] == 400 && r["decision"] == "denied"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_returned_not_followed() {
    let h = Harness::start().await;
    let elsewhere = FakeUpstream::start().await.unwrap();
    let target = format!("/openai/_fake/redirect?to={}/steal", elsewhere.url());
    let response = h.client.get(h.url(&target)).header("authorization", bearer(WORKER_KEY)).send().await.unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], format!("{}/steal", elsewhere.url()).as_str());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(elsewhere.count(), 0, "keyward followed a redirect with the credential");
    let r = h.wait_for_audit(|r| r["status"] == 302).await;
    assert_eq!(r["outcome"], "success");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_agent_keys_are_stripped() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/openai/_fake/echo-headers"))
        .header("authorization", bearer(WORKER_KEY))
        .header("proxy-authorization", bearer(WORKER_KEY))
        .header("connection", "x-private-hop")
        .header("x-private-hop", "do-not-forward")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("upgrade", "websocket")
        .header("x-forwarded-for", "10.9.8.7")
        .header("x-end-to-end", "kept")
        .header("x-http-method-override", "DELETE")
        .header("x-original-url", "/admin")
        .header("x-forwarded-host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = h.upstream.last().unwrap();
    for name in [
        "x-private-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "x-http-method-override",
        "x-original-url",
        "x-forwarded-host",
    ] {
        assert!(seen.headers.get(name).is_none(), "{name} was forwarded");
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    assert!(!format!("{:?}", seen.headers).contains(WORKER_KEY));
    // The spoofed X-Forwarded-For is not taken as the agent's address.
    let r = h.wait_for_audit(|r| r["path"] == "/_fake/echo-headers").await;
    assert_eq!(r["ip"], "127.0.0.1");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_while_the_upstream_is_still_sending() {
    let h = Harness::start().await;
    let started = Instant::now();
    let response = h
        .client
        .get(h.url("/openai/_fake/sse?events=5&interval_ms=300"))
        .header("authorization", bearer(WORKER_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let total = started.elapsed();
    // The upstream needs 1.5 s for all events; the first must arrive well before that.
    assert!(first_at < Duration::from_millis(1000), "first event after {first_at:?}");
    assert!(total >= Duration::from_millis(1400), "stream ended after {total:?}");
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    let r = h.wait_for_audit(|r| r["path"] == "/_fake/sse").await;
    assert_eq!(r["outcome"], "success");
    assert!(r["durationMs"].as_u64().unwrap() >= 1400);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_gets_exactly_one_audit_record() {
    let h = Harness::start().await;
    let call = |method: &str, path: &str| {
        h.client.request(method.parse().unwrap(), h.url(path)).header("authorization", bearer(WORKER_KEY))
    };
    let expectations: Vec<(reqwest::RequestBuilder, u16, &str, &str)> = vec![
        (call("POST", "/openai/v1/chat/completions").body("{}"), 200, "allowed", "success"),
        (call("GET", "/openai/_fake/status/429"), 429, "allowed", "upstream_status"),
        (call("GET", "/openai/_fake/status/500"), 500, "allowed", "upstream_status"),
        (call("GET", "/openai/_fake/slow?ms=3000"), 504, "error", "upstream_error"),
        (call("GET", "/deadend/anything"), 502, "error", "upstream_error"),
        (call("GET", "/github/gone"), 503, "error", "secret_error"),
        (call("GET", "/github/unset"), 503, "error", "secret_error"),
        (call("GET", "/github/nope"), 403, "denied", "denied"),
        (h.client.get(h.url("/github/user")), 401, "denied", "denied"),
        (call("POST", "/openai/v1/chat/completions").body(vec![b'x'; 70_000]), 413, "denied", "denied"),
    ];
    let count = expectations.len();
    for (request, status, _, _) in expectations.iter().map(|(r, s, d, o)| (r.try_clone().unwrap(), s, d, o)) {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), *status);
        let body = response.text().await.unwrap();
        assert_no_canary("a response", &body);
        // keyward's own 5xx answers (502/503/504) carry its JSON error shape.
        if *status > 500 {
            let parsed: Value = serde_json::from_str(&body).unwrap();
            assert!(parsed["error"]["code"].is_string(), "{body}");
        }
    }
    let records = h.audit();
    assert_eq!(records.len(), count, "{records:#?}");
    for ((_, status, decision, outcome), record) in expectations.iter().zip(&records) {
        assert_eq!(record["status"], *status, "{record}");
        assert_eq!(record["decision"], *decision, "{record}");
        assert_eq!(record["outcome"], *outcome, "{record}");
        assert_eq!(record["success"], *outcome == "success");
        assert_no_canary("an audit record", &record.to_string());
    }
    let store_down = &records[5];
    assert_eq!(store_down["errorCode"], "secret_store_unavailable");
    assert_eq!(store_down["credential"], "GONE_SECRET");
    assert_eq!(records[6]["errorCode"], "secret_not_found");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"keyward_requests_total{route="openai",status="200",decision="allowed"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"keyward_secret_fetches_total{source="gone",result="error"}"#), "{metrics}");
    assert_no_canary("metrics", &metrics);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_a_stream_after_the_head_is_a_success_it_ended() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/openai/_fake/sse?events=20&interval_ms=200"))
        .header("authorization", bearer(WORKER_KEY))
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    drop(stream);
    let r = h.wait_for_audit(|r| r["path"] == "/_fake/sse").await;
    assert_eq!(r["outcome"], "success", "{r}");
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["ended"], serde_json::json!({ "by": "agent", "at": "mid_body" }), "{r}");
    assert!(r["bytesSent"].as_u64().unwrap() >= first.len() as u64, "{r}");
    assert_eq!(r["credential"], "OPENAI_API_KEY");
    assert_eq!(h.audit().len(), 1);
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(r#"keyward_requests_total{route="openai",status="200",decision="allowed"} 1"#),
        "{metrics}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_to_done_and_closed_is_a_success() {
    // What the OpenAI SDK does: read up to `data: [DONE]` and close at once.
    let h = Harness::start().await;
    for _ in 0..4 {
        let response = h
            .client
            .get(h.url("/openai/_fake/sse?events=3&interval_ms=20&linger_ms=500"))
            .header("authorization", bearer(WORKER_KEY))
            .send()
            .await
            .unwrap();
        let mut stream = response.bytes_stream();
        let mut seen = Vec::new();
        while let Some(chunk) = stream.next().await {
            seen.extend_from_slice(&chunk.unwrap());
            if String::from_utf8_lossy(&seen).contains("data: [DONE]") {
                break;
            }
        }
        drop(stream);
    }
    for _ in 0..100 {
        if h.audit().len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records = h.audit();
    assert_eq!(records.len(), 4, "{records:#?}");
    for r in records {
        assert_eq!(
            (r["status"].as_u64(), r["outcome"].as_str(), r["success"].as_bool()),
            (Some(200), Some("success"), Some(true)),
            "{r}"
        );
        assert_eq!(r["ended"], serde_json::json!({ "by": "agent", "at": "mid_body" }), "{r}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_head_is_a_499() {
    let h = Harness::start().await;
    let result = h
        .client
        .get(h.url("/openai/_fake/slow?ms=1000"))
        .header("authorization", bearer(WORKER_KEY))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(result.is_err(), "the client gave up before the answer");
    let r = h.wait_for_audit(|r| r["path"] == "/_fake/slow").await;
    assert_eq!(r["outcome"], "client_disconnect", "{r}");
    assert_eq!(r["status"], 499, "{r}");
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(r["decision"], "allowed", "{r}");
    assert_eq!(r["ended"], serde_json::json!({ "by": "agent", "at": "before_head" }), "{r}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_keyward_cuts_off_says_so() {
    // The harness's read timeout is 1.5 s; events every 3 s stall the body past it.
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/openai/_fake/sse?events=3&interval_ms=3000"))
        .header("authorization", bearer(WORKER_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "the stalled body is cut off");
    let r = h.wait_for_audit(|r| r["path"] == "/_fake/sse").await;
    assert_eq!(r["outcome"], "upstream_error", "{r}");
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["ended"], serde_json::json!({ "by": "keyward", "at": "mid_body" }), "{r}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_reports_health_readiness_and_metrics() {
    let h = Harness::start().await;
    let health = h.client.get(format!("{}/healthz", h.admin)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // The "gone" source cannot be reached, so keyward is not ready, and says which source.
    let mut ready = Value::Null;
    for _ in 0..100 {
        ready = h.client.get(format!("{}/readyz", h.admin)).send().await.unwrap().json().await.unwrap();
        if ready["waiting_for_sources"] == serde_json::json!(["gone"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["waiting_for_sources"], serde_json::json!(["gone"]));
    h.client.get(h.url("/github/user")).header("authorization", bearer(WORKER_KEY)).send().await.unwrap();
    let metrics = h.metrics().await;
    assert!(metrics.contains("keyward_secret_cache_hits_total{source=\"files\"}"), "{metrics}");
    assert!(metrics.contains("keyward_request_duration_seconds"), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_ready_when_every_source_answers() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[audit]
path = "{dir}/audit.jsonl"
[[sources]]
name = "files"
provider = "file"
path = "{dir}/secrets.json"
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{upstream}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}
"#,
        dir = dir.path().display(),
        upstream = upstream.url()
    );
    let running = keyward::instance::start(keyward::config::load_str(&text, "t.toml", false).unwrap()).await.unwrap();
    let client = common::client();
    let mut ready = false;
    for _ in 0..50 {
        let r = client.get(format!("http://{}/readyz", running.admin_addr)).send().await.unwrap();
        if r.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "readyz never turned ready");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_clients_are_served() {
    let h = Harness::start().await;
    let client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    let response = client
        .post(h.url("/openai/v1/chat/completions"))
        .header("authorization", bearer(WORKER_KEY))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(h.upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
    h.stop().await;
}

/// `forward.read_timeout_ms` (1.5 s here) bounds the wait between two frames of an answer, not
/// the whole answer: a stream with shorter gaps runs to its end, one that stalls is cut off and
/// audited as an upstream error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_timeout_is_per_frame_and_a_stalled_stream_is_cut_off() {
    let h = Harness::start().await;
    let get = |path: &'static str| h.client.get(h.url(path)).header("authorization", bearer(WORKER_KEY)).send();
    let started = Instant::now();
    let body = get("/openai/_fake/sse?events=4&interval_ms=700").await.unwrap().text().await.unwrap();
    assert_eq!(body.matches("chat.completion.chunk").count(), 4, "{body}");
    assert!(started.elapsed() > Duration::from_millis(2000), "the stream ran longer than one read timeout");

    let response = get("/openai/_fake/sse?events=3&interval_ms=2500").await.unwrap();
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    assert!(response.text().await.is_err(), "a stalled body must end in an error, not a clean end");
    assert!(started.elapsed() < Duration::from_millis(2400), "cut off after the read timeout: {:?}", started.elapsed());
    let record =
        h.wait_for_audit(|r| r["type"] == "request" && r["path"] == "/_fake/sse" && r["outcome"] != "success").await;
    assert_eq!(record["outcome"], "upstream_error");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_forms_that_normalise_to_dots_or_slashes_are_400() {
    let h = Harness::start().await;
    // The worker holds GET /repos/** on github: an upstream applying NFKC would turn these
    // into /repos/../orgs/x (that is, /orgs/x) or into extra path segments.
    let paths = [
        "/github/repos/%E2%80%A5/orgs/x",
        "/github/repos/%EF%B8%B0/orgs/x",
        "/github/repos/o/%E2%84%80",
        "/github/repos/o/%E2%84%81",
        "/github/repos/o/%E2%84%85",
        "/github/repos/o/%E2%84%86",
        "/github/repos/%E2%80%A6/x",
    ];
    for path in paths {
        let r = h.client.get(h.url(path)).bearer_auth(WORKER_KEY).send().await.unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_path", "{path}");
    }
    assert_eq!(h.upstream.count(), 0, "a refused path reached the upstream");
    // Non-ASCII that cannot become a separator still passes.
    let r = h.client.get(h.url("/github/repos/o/caf%C3%A9")).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}
