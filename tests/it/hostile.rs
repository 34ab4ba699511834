//! Hostile upstreams and hostile agents: echoed credentials in every encoding are scrubbed,
//! framing tricks are not smuggled upstream, and malformed requests get a clear 4xx.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use keyward::fake_upstream::FakeUpstream;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

/// The forms an upstream could echo a canary in; none may reach the agent.
fn leak_forms(canary: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = vec![canary.to_string(), utf8_percent_encode(canary, NON_ALPHANUMERIC).to_string()];
    for wrapped in [canary.to_string(), format!("Bearer {canary}"), format!("user:{canary}")] {
        let encoded = b64.encode(&wrapped);
        // The part of the encoding that comes from the canary itself, whatever its alignment.
        forms.push(encoded[encoded.len() - canary.len() * 4 / 3 + 4..encoded.len() - 4].to_string());
    }
    forms
}

fn assert_clean(what: &str, text: &str) {
    for canary in CANARIES {
        for form in leak_forms(canary) {
            assert!(!text.contains(&form), "{what} leaked a canary form {form:?}:\n{text}");
        }
    }
}

async fn fetch(h: &Harness, method: &str, path: &str) -> (u16, String, String) {
    let response = h
        .client
        .request(method.parse().unwrap(), h.url(path))
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = format!("{:?}", response.headers());
    let body = response.text().await.unwrap();
    (status, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoing_upstreams_never_hand_back_the_credential() {
    let h = Harness::start().await;
    // Without keyward in between, these upstream behaviours do leak every form checked below,
    // so the assertions further down can fail.
    for path in ["/_fake/echo-encoded", "/_fake/leak-headers"] {
        let direct = h
            .client
            .get(format!("{}{path}", h.upstream.url()))
            .header("authorization", format!("Bearer {CANARY_OPENAI}"))
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", direct.headers());
        let text = format!("{headers}{}", direct.text().await.unwrap());
        let caught = leak_forms(CANARY_OPENAI).iter().filter(|f| text.contains(f.as_str())).count();
        assert!(caught >= 2, "{path} direct: only {caught} forms present:\n{text}");
    }
    let direct = h
        .client
        .get(format!("{}/_fake/echo-encoded", h.upstream.url()))
        .header("authorization", format!("Bearer {CANARY_OPENAI}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for form in leak_forms(CANARY_OPENAI) {
        assert!(direct.contains(&form), "the fake upstream does not produce {form:?}");
    }
    let mut paths = vec![
        "/openai/_fake/echo-headers".to_string(),
        "/openai/_fake/echo-encoded".to_string(),
        "/openai/_fake/leak-headers".to_string(),
        "/openai/_fake/gzip-echo".to_string(),
        "/openai/_fake/error-echo".to_string(),
    ];
    for chunk in [1, 2, 3, 5, 7, 13, 64] {
        paths.push(format!("/openai/_fake/echo-headers?chunk={chunk}"));
    }
    for path in &paths {
        let (status, headers, body) = fetch(&h, "GET", path).await;
        assert!(status == 200 || status == 302 || status == 401, "{path}: {status}");
        assert_clean(&format!("{path} headers"), &headers);
        assert_clean(&format!("{path} body"), &body);
        if path.contains("echo-headers") || path.contains("gzip") {
            // The echo itself still arrives, with the credential masked.
            assert!(body.contains("[REDACTED:OPENAI_API_KEY]"), "{path}: {body}");
            let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(parsed["target"], path.trim_start_matches("/openai"));
        }
    }
    // The upstream really did receive, and try to echo, the credential each time.
    assert!(
        h.upstream.requests().iter().all(|r| r.headers["authorization"] == format!("Bearer {CANARY_OPENAI}").as_str())
    );
    let dir = h.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.lines().count() >= paths.len());
    assert_clean("the audit file", &audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answers_are_decoded_or_refused() {
    let h = Harness::start().await;
    let response = h
        .client
        .get(h.url("/openai/_fake/gzip-echo"))
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .header("accept-encoding", "gzip, br")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-encoding").is_none());
    let body = response.text().await.unwrap();
    assert!(body.contains("[REDACTED:OPENAI_API_KEY]"));
    // keyward asked the upstream for identity, whatever the agent asked for.
    assert_eq!(h.upstream.last().unwrap().headers["accept-encoding"], "identity");

    let (status, _, body) = fetch(&h, "GET", "/openai/_fake/brotli").await;
    assert_eq!(status, 502);
    assert!(body.contains("upstream_encoding_unsupported"), "{body}");
    let record = h.wait_for_audit(|r| r["path"] == "/_fake/brotli").await;
    assert_eq!(record["outcome"], "upstream_error");
    h.stop().await;
}

fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

async fn raw_async(addr: SocketAddr, request: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || raw(addr, &request)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_tricks_are_refused_or_reframed_never_smuggled() {
    let h = Harness::start().await;
    let addr = h.running.as_ref().unwrap().proxy_addr.unwrap();
    let auth = format!("Authorization: Bearer {WORKER_KEY}\r\n");

    // CL + TE: the chunked body wins, the connection is not reused, and what follows the body is
    // never read as part of it.
    let smuggle = format!(
        "POST /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /openai/_fake/smuggled HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
    );
    let answer = raw_async(addr, smuggle.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 400"), "{answer}");
    for seen in h.upstream.requests() {
        assert!(!String::from_utf8_lossy(&seen.body).contains("smuggled"), "a second request rode in a body");
        if seen.target == "/_fake/echo-headers" {
            // The agent's conflicting Content-Length is dropped; keyward's client re-frames
            // the 5 decoded bytes itself.
            assert_eq!(&seen.body[..], b"hello");
            assert!(seen.headers.get("content-length").is_none_or(|v| v == "5"));
        }
    }

    let before = h.upstream.count();
    let cases: Vec<(&str, String)> = vec![
        (
            "duplicate content-length",
            format!(
                "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
            ),
        ),
        ("obs-fold", format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}X-Folded: a\r\n b\r\n\r\n")),
        ("NUL in a header", format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}X-Nul: a\0b\r\n\r\n")),
        (
            "space before colon",
            format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}X-Bad : 1\r\n\r\n"),
        ),
        (
            "oversized headers",
            format!(
                "GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}X-Big: {}\r\n\r\n",
                "a".repeat(100_000)
            ),
        ),
    ];
    for (what, request) in cases {
        let answer = raw_async(addr, request.into_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{what}: {answer}");
    }
    assert_eq!(h.upstream.count(), before, "a malformed request reached the upstream");

    // Bytes that are not UTF-8 in an ordinary header are passed on as opaque bytes; in the agent
    // key header they make the key malformed.
    let mut request =
        format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nX-Data: ")
            .into_bytes();
    request.extend_from_slice(b"\xff\xfe\r\n\r\n");
    assert!(raw_async(addr, request).await.starts_with("HTTP/1.1 200"));
    let request = b"GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer kw_\xff\r\n\r\n".to_vec();
    assert!(raw_async(addr, request).await.starts_with("HTTP/1.1 401"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let h = Harness::start().await;
    let addr = h.running.as_ref().unwrap().proxy_addr.unwrap();
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n").unwrap();
        let mut buf = Vec::new();
        // keyward closes the connection once header_read_timeout_ms (2 s here) has passed.
        let _ = stream.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
    .await
    .unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8), "{waited:?}");
    assert!(outcome.is_empty() || outcome.starts_with("HTTP/1.1 408"), "{outcome}");
    assert_eq!(h.upstream.count(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_several_places_and_a_foreign_host_header() {
    let h = Harness::start().await;
    let chat = h.url("/openai/v1/chat/completions");
    let twice = h
        .client
        .post(&chat)
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .header("authorization", format!("Bearer {READER_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 401);
    let split = h
        .client
        .post(&chat)
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .header("proxy-authorization", format!("Bearer {READER_KEY}"))
        .send()
        .await
        .unwrap();
    assert_eq!(split.status(), 401);
    // Whitespace inside the credential (trailing whitespace is HTTP's optional whitespace).
    let padded = h.client.post(&chat).header("authorization", format!("Bearer  {WORKER_KEY}")).send().await.unwrap();
    assert_eq!(padded.status(), 401);
    let empty = h.client.post(&chat).header("authorization", "Bearer").send().await.unwrap();
    assert_eq!(empty.status(), 401);
    assert_eq!(h.upstream.count(), 0);

    // A Host header naming another upstream changes nothing: the route decides.
    let other = FakeUpstream::start().await.unwrap();
    let r = h
        .client
        .post(&chat)
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .header("host", other.addr.to_string())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(other.count(), 0);
    assert_eq!(h.upstream.last().unwrap().headers["host"], h.upstream.addr.to_string().as_str());
    h.stop().await;
}
