//! The agent key where today's clients put it, and no agent credential upstream: several
//! accepted places per route, every credential header the agent sent removed, the key refused in
//! the URL, and the headers and parameters that would change the authorized call removed or refused.

use crate::common;

use common::*;
use keyward::fake_upstream::Recorded;

/// Every agent key the tests use: none may reach the upstream in any form.
const AGENT_KEYS: [&str; 3] = [WORKER_KEY, READER_KEY, RANGER_KEY];
const RANGER_KEY: &str = "kw_testRangerKey0123456789abcdefghijklmnopqrs";

/// Panics if `recorded` (a request as the upstream saw it) holds an agent key anywhere.
fn assert_no_agent_key(recorded: &Recorded) {
    let mut head = format!("{} {}\n", recorded.method, recorded.target);
    for (name, value) in &recorded.headers {
        head.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
    }
    for key in AGENT_KEYS {
        assert!(!head.contains(key), "an agent key reached the upstream:\n{head}");
        assert!(!head.contains(&key[3..]), "part of an agent key reached the upstream:\n{head}");
    }
}

/// Headers an agent sends, as (name, value) pairs.
type Sent<'a> = Vec<(&'a str, &'a str)>;

fn header<'r>(recorded: &'r Recorded, name: &str) -> Vec<&'r str> {
    recorded.headers.get_all(name).iter().map(|v| v.to_str().unwrap()).collect()
}

async fn post(h: &Harness, path: &str, headers: &[(&str, &str)], body: &str) -> reqwest::Response {
    let mut request = h.client.post(h.url(path)).header("content-type", "application/json").body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_official_clients_key_placement_is_accepted_and_replaced() {
    let h = Harness::start().await;
    let bearer = format!("Bearer {WORKER_KEY}");
    let token = format!("token {WORKER_KEY}");
    let chat = r#"{"model":"m","messages":[]}"#;
    // (what sends it, path, agent headers, injected header, injected value)
    let cases: Vec<(&str, &str, Sent, &str, String)> = vec![
        (
            "openai",
            "/openai/v1/chat/completions",
            vec![("authorization", &bearer)],
            "authorization",
            format!("Bearer {CANARY_OPENAI}"),
        ),
        (
            "anthropic api_key (2.x)",
            "/anthropic/v1/messages",
            vec![("authorization", &bearer)],
            "x-api-key",
            CANARY_ANTHROPIC.into(),
        ),
        (
            "anthropic x-api-key",
            "/anthropic/v1/messages",
            vec![("x-api-key", WORKER_KEY)],
            "x-api-key",
            CANARY_ANTHROPIC.into(),
        ),
        (
            "anthropic both",
            "/anthropic/v1/messages",
            vec![("authorization", &bearer), ("x-api-key", WORKER_KEY)],
            "x-api-key",
            CANARY_ANTHROPIC.into(),
        ),
        (
            "azure openai",
            "/azure-openai/openai/deployments/gpt/chat/completions?api-version=2024-10-21",
            vec![("api-key", WORKER_KEY)],
            "api-key",
            CANARY_AZURE.into(),
        ),
        (
            "azure entra",
            "/azure-openai/openai/v1/chat/completions",
            vec![("authorization", &bearer)],
            "api-key",
            CANARY_AZURE.into(),
        ),
        (
            "google genai",
            "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
            vec![("x-goog-api-key", WORKER_KEY)],
            "x-goog-api-key",
            CANARY_GEMINI.into(),
        ),
    ];
    for (client, path, headers, injected, value) in &cases {
        let response = post(&h, path, headers, chat).await;
        assert_eq!(response.status(), 200, "{client}: {}", response.text().await.unwrap());
        let recorded = h.upstream.last().unwrap();
        assert_eq!(header(&recorded, injected), [value.as_str()], "{client}");
        assert_no_agent_key(&recorded);
        // Only the injected credential header arrives.
        for name in ["authorization", "x-api-key", "api-key", "x-goog-api-key"] {
            if name != *injected {
                assert!(header(&recorded, name).is_empty(), "{client}: {name} reached the upstream");
            }
        }
    }
    for github in [&bearer, &token] {
        let response =
            h.client.get(h.url("/github/user")).header("authorization", github.as_str()).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let recorded = h.upstream.last().unwrap();
        assert_eq!(header(&recorded, "authorization"), [format!("Bearer {CANARY_GITHUB}")]);
        assert_no_agent_key(&recorded);
    }
    let records = h.audit();
    assert_eq!(records.len(), cases.len() + 2);
    assert!(records.iter().all(|r| r["success"] == true && r["agentId"] == "worker-1"), "{records:#?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_keys_in_two_accepted_places_are_refused() {
    let h = Harness::start().await;
    let response = post(
        &h,
        "/anthropic/v1/messages",
        &[("authorization", &format!("Bearer {WORKER_KEY}")), ("x-api-key", READER_KEY)],
        "{}",
    )
    .await;
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "malformed_agent_key");
    assert!(!body.to_string().contains("kw_"), "{body}");
    // A missing key names every accepted place.
    let response = post(&h, "/anthropic/v1/messages", &[], "{}").await;
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("'x-api-key'") && message.contains("'authorization: Bearer <key>'"), "{message}");
    assert_eq!(h.upstream.count(), 0);
    let records = h.audit();
    assert_eq!(records[0]["errorCode"], "malformed_agent_key");
    assert_eq!(records[1]["errorCode"], "missing_agent_key");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_the_agent_presented_reaches_the_upstream() {
    let h = Harness::start().await;
    let bearer = format!("Bearer {WORKER_KEY}");
    let cookie = format!("theme=dark; session={WORKER_KEY}; kw=%6Bw_{}", &WORKER_KEY[3..]);
    let note = format!("my key is {WORKER_KEY}");
    let cases: Vec<(&str, &str, Sent)> = vec![
        // The key again in the route's second accepted header.
        (
            "second accepted header",
            "/anthropic/v1/messages",
            vec![("authorization", &bearer), ("x-api-key", WORKER_KEY)],
        ),
        // The key in credential headers this route does not read.
        (
            "non-accepted auth headers",
            "/openai/_fake/echo-headers",
            vec![
                ("authorization", &bearer),
                ("x-api-key", WORKER_KEY),
                ("api-key", WORKER_KEY),
                ("x-goog-api-key", WORKER_KEY),
                ("proxy-authorization", &bearer),
            ],
        ),
        // Other credentials the agent holds go nowhere either.
        (
            "someone else's credential",
            "/openai/_fake/echo-headers",
            vec![("authorization", &bearer), ("api-key", "sk-agent-own-other-key")],
        ),
        ("cookie", "/openai/_fake/echo-headers", vec![("authorization", &bearer), ("cookie", &cookie)]),
        ("any header", "/openai/_fake/echo-headers", vec![("authorization", &bearer), ("x-note", &note)]),
    ];
    for (case, path, headers) in &cases {
        let response = post(&h, path, headers, "{}").await;
        assert_eq!(response.status(), 200, "{case}");
        let body = response.text().await.unwrap();
        assert!(!body.contains(WORKER_KEY), "{case}: {body}");
        let recorded = h.upstream.last().unwrap();
        assert_no_agent_key(&recorded);
        assert!(header(&recorded, "api-key").is_empty(), "{case}");
        assert!(header(&recorded, "x-goog-api-key").is_empty(), "{case}");
        assert!(header(&recorded, "proxy-authorization").is_empty(), "{case}");
        assert!(header(&recorded, "x-note").is_empty(), "{case}");
    }
    assert_eq!(header(&h.upstream.requests()[3], "cookie"), ["theme=dark"]);

    // The key in the query or the path is refused before anything is sent, and audited.
    let before = h.upstream.count();
    for path in [
        format!("/openai/_fake/echo-headers?api_key={WORKER_KEY}"),
        format!("/openai/_fake/echo-headers?k=%6Bw%5F{}", &WORKER_KEY[3..]),
        format!("/openai/_fake/{WORKER_KEY}"),
        format!("/openai/_fake/%6Bw%5F{}", &WORKER_KEY[3..]),
    ] {
        let response = post(&h, &path, &[("authorization", &bearer)], "{}").await;
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "agent_key_in_url");
    }
    assert_eq!(h.upstream.count(), before, "nothing was forwarded");
    let refused: Vec<_> = h.audit().into_iter().filter(|r| r["errorCode"] == "agent_key_in_url").collect();
    assert_eq!(refused.len(), 4);
    for r in &refused {
        assert_eq!((r["status"].as_u64(), r["decision"].as_str()), (Some(400), Some("denied")), "{r}");
        assert!(r.get("secretSource").is_none(), "no credential was resolved: {r}");
    }
    for request in h.upstream.requests() {
        assert_no_agent_key(&request);
    }
    let audit = std::fs::read_to_string(h.audit_path()).unwrap();
    assert_no_canary("the audit file", &audit);
    // The key in the path is not written to the trail either (nor to the access log, made from it).
    assert!(!audit.contains(WORKER_KEY), "the audit file holds the agent key");
    assert!(!audit.contains(&WORKER_KEY[3..]), "the audit file holds the agent key, percent-encoded");
    assert!(refused.iter().any(|r| r["path"] == "/_fake/[agent-key]"), "{refused:?}");
    h.stop().await;
}

const RANGED: &str = r#"
[[routes]]
name = "ranged"
prefix = "/ranged"
upstream = "UPSTREAM"
agent_key = { header = "authorization", scheme = "Bearer" }
pass_headers = ["range", "if-range", "x-api-key"]
inject = { header = "authorization", value = "Bearer {{secret}}" }

[roles.ranger]
grants = [{ route = "ranged", secret = "OPENAI_API_KEY", methods = ["GET", "POST"], paths = ["/**"] }]

[[agents]]
id = "ranger-1"
role = "ranger"
key_sha256 = "RANGER_SHA"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_override_headers_are_removed_unless_passed() {
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    let extra = RANGED.replace("UPSTREAM", &upstream.url()).replace("RANGER_SHA", &sha(RANGER_KEY));
    let h = Harness::start_with(&extra).await;
    let overrides = [
        ("x-forwarded-uri", "/orgs/x"),
        ("x-original-uri", "/orgs/x"),
        ("x-envoy-original-path", "/orgs/x"),
        ("forwarded", "for=1.2.3.4;host=evil.example"),
        ("x-http-method-override", "DELETE"),
        ("x-original-url", "/orgs/x"),
    ];
    let mut request = h
        .client
        .get(h.url("/openai/_fake/echo-headers"))
        .bearer_auth(WORKER_KEY)
        .header("range", "bytes=0-35")
        .header("if-range", "\"v1\"");
    for (name, value) in overrides {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.unwrap().status(), 200);
    let recorded = h.upstream.last().unwrap();
    for name in ["range", "if-range"].into_iter().chain(overrides.iter().map(|(n, _)| *n)) {
        assert!(header(&recorded, name).is_empty(), "{name} reached the upstream");
    }

    // A route that passes them through explicitly; the agent key is still never passed.
    let response = h
        .client
        .get(format!("{}/ranged/_fake/echo-headers", h.base))
        .bearer_auth(RANGER_KEY)
        .header("range", "bytes=0-35")
        .header("if-range", "\"v1\"")
        .header("x-api-key", "upstream-scoped-value")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = upstream.last().unwrap();
    assert_eq!(header(&recorded, "range"), ["bytes=0-35"]);
    assert_eq!(header(&recorded, "if-range"), ["\"v1\""]);
    assert_eq!(header(&recorded, "x-api-key"), ["upstream-scoped-value"]);
    let response = h
        .client
        .get(format!("{}/ranged/_fake/echo-headers", h.base))
        .bearer_auth(RANGER_KEY)
        .header("x-api-key", RANGER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = upstream.last().unwrap();
    assert!(header(&recorded, "x-api-key").is_empty(), "a passed header holding the agent key is removed");
    assert_no_agent_key(&recorded);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_parameter_is_refused_and_audited() {
    let h = Harness::start().await;
    let form = |body: &'static str| {
        h.client
            .post(h.url("/openai/_fake/echo-headers"))
            .bearer_auth(WORKER_KEY)
            .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
            .body(body)
    };
    for path in ["/openai/_fake/echo-headers?_method=DELETE", "/openai/_fake/echo-headers?x=1&%5FMethod=PUT"] {
        let response = h.client.post(h.url(path)).bearer_auth(WORKER_KEY).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_override_refused");
    }
    for body in ["a=1&_method=DELETE", "_method=patch", "a=1&.method=DELETE"] {
        assert_eq!(form(body).send().await.unwrap().status(), 400, "{body}");
    }
    assert_eq!(h.upstream.count(), 0, "nothing was forwarded");
    // An ordinary form post goes through whole.
    assert_eq!(form("a=1&method=x&b=%26").send().await.unwrap().status(), 200);
    assert_eq!(&h.upstream.last().unwrap().body[..], b"a=1&method=x&b=%26");
    let records = h.audit();
    assert_eq!(records.len(), 6);
    assert!(
        records[..5].iter().all(|r| r["errorCode"] == "method_override_refused" && r["status"] == 400),
        "{records:#?}"
    );
    h.stop().await;
}
