//! The canary suite: thousands of random requests (routes, methods, paths, headers, agent keys
//! and upstream behaviours) with canary credentials, and no canary, in any encoding, may appear
//! in a response, the TRACE log, the audit file or the metrics.
//!
//! The seed is printed; rerun one with `KEYWARD_CANARY_SEED=<seed> cargo test --test canary`.

use crate::common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::raw::*;
use common::*;
use futures_util::StreamExt;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REQUESTS: usize = 1500;
const CONCURRENCY: usize = 16;

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn leak_forms() -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = Vec::new();
    for canary in CANARIES {
        forms.push(canary.to_string());
        forms.push(utf8_percent_encode(canary, NON_ALPHANUMERIC).to_string());
        forms.push(canary.bytes().map(|b| format!("{b:02x}")).collect());
        for wrapped in [canary.to_string(), format!("Bearer {canary}"), format!("user:{canary}")] {
            let encoded = b64.encode(&wrapped);
            forms.push(encoded[encoded.len() - canary.len() * 4 / 3 + 4..encoded.len() - 4].to_string());
        }
    }
    forms
}

/// Compared case-insensitively: a header name carries a credential lower-cased.
fn find_leak(text: &str, forms: &[String]) -> Option<String> {
    let text = text.to_ascii_lowercase();
    forms.iter().find(|f| text.contains(f.to_ascii_lowercase().as_str())).cloned()
}

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

struct Plan {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    /// For the raw hostile upstream: how its body encodes the credential, to undo it.
    encoding: Option<&'static str>,
}

/// A call to the raw hostile upstream: a random reason phrase, header names, framing (transfer
/// codings included) and body encoding, each built from the credential it received.
fn hostile(rng: &mut StdRng) -> Plan {
    let encoding = *pick(rng, &ENCODINGS);
    let path = format!(
        "/{}/{}/{}/{}/{encoding}/{}",
        pick(rng, &RAW_ROUTES),
        pick(rng, &REASONS),
        pick(rng, &NAMES),
        pick(rng, &FRAMINGS),
        rng.random_range(0..160)
    );
    let headers = vec![("authorization".to_string(), format!("Bearer {WORKER_KEY}"))];
    Plan { method: "GET".to_string(), path, headers, body: String::new(), encoding: Some(encoding) }
}

/// Upstream behaviours, as paths below a route prefix.
fn behaviour(rng: &mut StdRng) -> String {
    match rng.random_range(0..10) {
        0 => "/_fake/echo-headers".to_string(),
        1 => format!("/_fake/echo-headers?chunk={}", rng.random_range(1..48)),
        2 => "/_fake/echo-encoded".to_string(),
        3 => "/_fake/leak-headers".to_string(),
        4 => "/_fake/gzip-echo".to_string(),
        5 => "/_fake/error-echo".to_string(),
        6 => "/_fake/redirect?to=http://127.0.0.1:9/x".to_string(),
        7 => format!("/_fake/status/{}", pick(rng, &[200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 503])),
        8 => format!("/_fake/sse?events={}&interval_ms={}", rng.random_range(0..5), rng.random_range(0..4)),
        _ => "/_fake/brotli".to_string(),
    }
}

/// A call the worker role is granted, so the credential is injected and the upstream misbehaves.
fn granted(rng: &mut StdRng) -> Plan {
    let (path, headers) = match rng.random_range(0..3) {
        0 => {
            (format!("/openai{}", behaviour(rng)), vec![("authorization".to_string(), format!("Bearer {WORKER_KEY}"))])
        }
        1 => (
            format!("/github/repos/o/r{}", behaviour(rng)),
            vec![("authorization".to_string(), format!("token {WORKER_KEY}"))],
        ),
        _ => ("/anthropic/v1/messages".to_string(), vec![("x-api-key".to_string(), WORKER_KEY.to_string())]),
    };
    let method = if path.starts_with("/openai") {
        pick(rng, &["GET", "POST", "HEAD"])
    } else if path.starts_with("/github") {
        &"GET"
    } else {
        &"POST"
    };
    Plan { method: method.to_string(), path, headers, body: String::new(), encoding: None }
}

fn plan(rng: &mut StdRng) -> Plan {
    if rng.random_bool(0.15) {
        return hostile(rng);
    }
    if rng.random_bool(0.6) {
        let mut p = granted(rng);
        if rng.random_bool(0.3) {
            p.headers.push(("accept-encoding".to_string(), "gzip, br".to_string()));
        }
        return p;
    }
    let prefix =
        *pick(rng, &["/openai", "/anthropic", "/github", "/deadend", "/nowhere", "/openai-evil", "/openai/v1/.."]);
    let tail = match rng.random_range(0..16) {
        0 => "/v1/chat/completions".to_string(),
        1 => "/v1/messages".to_string(),
        2 => "/user".to_string(),
        3 => format!("/repos/o{}/r/pulls", rng.random_range(0..9)),
        4 => "/_fake/echo-headers".to_string(),
        5 => format!("/_fake/echo-headers?chunk={}", rng.random_range(1..48)),
        6 => "/_fake/echo-encoded".to_string(),
        7 => "/_fake/leak-headers".to_string(),
        8 => "/_fake/gzip-echo".to_string(),
        9 => "/_fake/error-echo".to_string(),
        10 => "/_fake/redirect?to=http://127.0.0.1:9/x".to_string(),
        11 => format!("/_fake/status/{}", pick(rng, &[200, 201, 204, 301, 400, 401, 403, 404, 429, 500, 503])),
        12 => format!("/_fake/sse?events={}&interval_ms={}", rng.random_range(0..5), rng.random_range(0..4)),
        13 => "/_fake/brotli".to_string(),
        14 => pick(rng, &["/%2e%2e/x", "/a//b", "/a%2fb", "/%252e", "/a/./b", "/\u{1}"]).to_string(),
        _ => format!("/{}", (0..rng.random_range(1..12)).map(|_| rng.random_range('a'..='z')).collect::<String>()),
    };
    let method = pick(rng, &["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]).to_string();
    let key =
        pick(rng, &[WORKER_KEY, WORKER_KEY, WORKER_KEY, READER_KEY, DISABLED_KEY, "kw_unknown", "", CANARY_OPENAI])
            .to_string();
    let mut headers = Vec::new();
    match rng.random_range(0..6) {
        0 | 1 => headers.push(("authorization".to_string(), format!("Bearer {key}"))),
        2 => headers.push(("x-api-key".to_string(), key.clone())),
        3 => headers.push(("authorization".to_string(), format!("token {key}"))),
        4 => headers.push(("proxy-authorization".to_string(), format!("Bearer {key}"))),
        _ => {}
    }
    for _ in 0..rng.random_range(0..4) {
        let name = pick(
            rng,
            &["x-trace", "accept-encoding", "x-api-key", "connection", "x-http-method-override", "cookie", "accept"],
        );
        let value = pick(rng, &["gzip", "br", "keep-alive", "x-trace", "DELETE", "a=b", "text/event-stream", "*/*"]);
        headers.push((name.to_string(), value.to_string()));
    }
    let body = if rng.random_bool(0.5) {
        format!("{{\"stream\":{},\"n\":{}}}", rng.random_bool(0.3), rng.random::<u32>())
    } else {
        String::new()
    };
    Plan { method, path: format!("{prefix}{tail}"), headers, body, encoding: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_escapes_under_random_traffic() {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let writer = Capture(logs.clone());
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let seed: u64 = std::env::var("KEYWARD_CANARY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("canary suite seed: {seed} (rerun with KEYWARD_CANARY_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let plans: Vec<Plan> = (0..REQUESTS).map(|_| plan(&mut rng)).collect();

    let raw = raw_upstream(hostile_answer);
    let h = Harness::start_edited(&raw_routes(raw), grant_raw_routes).await;
    let forms = leak_forms();
    let results = futures_util::stream::iter(plans.iter().enumerate())
        .map(|(i, p)| {
            let h = &h;
            async move {
                let mut request = h.client.request(p.method.parse().unwrap(), h.url(&p.path)).body(p.body.clone());
                for (name, value) in &p.headers {
                    request = request.header(name, value);
                }
                let text = match request.send().await {
                    Ok(response) => {
                        let reason = response.extensions().get::<hyper::ext::ReasonPhrase>().cloned();
                        let reason = reason.map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
                        let head = format!("{} {reason:?} {:?}", response.status(), response.headers());
                        let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                        // What the agent could recover: the body, with compression and the
                        // hostile upstream's encoding undone.
                        let decoded = p.encoding.map(|e| decode(e, &inflate_all(body.clone()))).unwrap_or_default();
                        let body = String::from_utf8_lossy(&body);
                        format!("{head}\n{body}\n{}", String::from_utf8_lossy(&decoded))
                    }
                    Err(error) => format!("client error: {error}"),
                };
                (i, text)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let client_errors: Vec<&String> =
        results.iter().map(|(_, t)| t).filter(|t| t.starts_with("client error")).collect();
    assert!(client_errors.is_empty(), "seed {seed}: requests that never got an answer: {client_errors:?}");
    for (i, text) in &results {
        if let Some(form) = find_leak(text, &forms) {
            let p = &plans[*i];
            panic!("seed {seed}: request {i} ({} {} {:?}) leaked {form:?} in:\n{text}", p.method, p.path, p.headers);
        }
    }
    let metrics = h.metrics().await;
    assert!(find_leak(&metrics, &forms).is_none(), "seed {seed}: metrics leaked");
    let upstream_saw = h.upstream.count();
    let dir = h.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(
        outcomes(&dir.path().join("audit.jsonl")).len(),
        REQUESTS,
        "seed {seed}: one outcome record per request"
    );
    if let Some(form) = find_leak(&audit, &forms) {
        panic!("seed {seed}: the audit file leaked {form:?}");
    }
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("TRACE"), "TRACE output was not captured");
    if let Some(form) = find_leak(&logs, &forms) {
        let line = logs.lines().find(|l| l.contains(&form)).unwrap_or_default();
        panic!("seed {seed}: the TRACE log leaked {form:?}: {line}");
    }
    // The traffic really exercised the credential path.
    assert!(upstream_saw > REQUESTS / 10, "only {upstream_saw} requests reached the upstream");
    eprintln!("canary suite: {REQUESTS} requests, {upstream_saw} forwarded with a credential, no leak");
}
