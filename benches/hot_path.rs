//! Regression guards for the per-request work that involves no network: finding the route,
//! identifying the agent, authorizing the call, injecting the credential, scrubbing a 16 KiB
//! streamed body, and building, serialising, checking for secrets and hash-chaining the audit
//! records.
//!
//! `cargo bench --bench hot_path`; under `cargo test --all-targets` each runs once, as a smoke test.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use keyward::audit::chain::{ChainHead, Line};
use keyward::audit::{AuditRecord, Decision, Outcome};
use keyward::config::{Config, load_str};
use keyward::identity::{self, AgentDirectory};
use keyward::inject;
use keyward::policy::{self, RouteTable, Subject};
use keyward::scrub::{Scrubber, StreamScrubber};
use secrecy::SecretString;

const AGENT_KEY: &str = "kw_benchAgentKey0123456789abcdefghijklmnopqrstu";
const SECRET: &str = "sk-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

/// A config shaped like a real deployment: three routes, three roles, a hundred agents.
fn config() -> Config {
    let mut toml = String::from(
        r#"
[[sources]]
name = "env"
provider = "env"
mapping = { OPENAI = "{{OPENAI}}", GITHUB = "{{GITHUB}}", ANTHROPIC = "{{ANTHROPIC}}" }
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "https://api.openai.com"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }
[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "https://api.anthropic.com"
agent_key = { header = "x-api-key" }
inject = { header = "x-api-key", value = "{{secret}}" }
[[routes]]
name = "github"
prefix = "/github"
upstream = "https://api.github.com"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }
[roles.reader]
grants = [{ route = "github", secret = "GITHUB", methods = ["GET"], paths = ["/repos/**", "/user"] }]
[roles.admin]
grants = [{ route = "github", secret = "GITHUB", methods = ["*"], paths = ["/**"] }]
[roles.worker]
grants = [
  { route = "github", secret = "GITHUB", methods = ["GET"], paths = ["/repos/*/*/pulls", "/user"] },
  { route = "anthropic", secret = "ANTHROPIC", methods = ["POST"], paths = ["/v1/messages"] },
  { route = "openai", secret = "OPENAI", methods = ["POST"], paths = ["/v1/models/*", "/v1/chat/completions"] },
]
"#,
    );
    for i in 0..100 {
        let key = if i == 42 { AGENT_KEY.to_string() } else { format!("kw_otherAgent{i:031}") };
        let role = ["reader", "admin", "worker"][i % 3];
        toml.push_str(&format!(
            "[[agents]]\nid = \"agent-{i}\"\nrole = \"{role}\"\nkey_sha256 = \"{}\"\n",
            hex::encode(identity::hash_key(&key))
        ));
    }
    load_str(&toml, "bench.toml", false).unwrap_or_else(|e| panic!("bench config: {e}"))
}

fn agent_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {AGENT_KEY}")).unwrap());
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("user-agent", HeaderValue::from_static("OpenAI/Python 1.99.0"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    headers
}

fn stages(c: &mut Criterion) {
    let config = config();
    let routes = RouteTable::new(config.routes.iter().filter_map(|r| r.prefix.as_deref()));
    let agents = AgentDirectory::new(&config.agents);
    let route = &config.routes[0];
    let headers = agent_headers();
    let mut group = c.benchmark_group("stage");

    group.bench_function("route", |b| {
        b.iter(|| {
            let path = policy::check_path(black_box("/openai/v1/chat/completions")).unwrap();
            black_box(routes.find(&path).unwrap().route)
        })
    });
    group.bench_function("identify", |b| {
        b.iter(|| {
            let key = identity::extract_key(&route.agent_key, black_box(&headers), &route.name).unwrap();
            black_box(agents.identify(key, &route.name).unwrap())
        })
    });
    let agent = agents.identify(AGENT_KEY, &route.name).unwrap();
    let role = &config.roles[&agent.role];
    group.bench_function("authorize", |b| {
        let subject = Subject { agent: &agent.id, role };
        b.iter(|| {
            let grant = policy::authorize(&subject, "openai", &Method::POST, black_box("/v1/chat/completions"));
            black_box(grant.map(|g| g.secret.len()).unwrap_or(0))
        })
    });
    let secret = SecretString::from(SECRET);
    group.bench_function("inject", |b| {
        b.iter(|| {
            let mut outbound = headers.clone();
            let mut query = None;
            inject::apply(&route.inject, &secret, &mut outbound, &mut query).unwrap();
            black_box(outbound)
        })
    });
    group.finish();
}

fn scrubber(c: &mut Criterion) {
    let secret = SecretString::from(SECRET);
    let scrubber = Arc::new(Scrubber::new([("OPENAI", &secret)]));
    // 16 KiB of JSON-ish text in 1 KiB chunks, with the credential once, split across a chunk edge.
    let mut body = "{\"choices\":[{\"text\":\"".to_string();
    while body.len() < 16 * 1024 {
        body.push_str("the quick brown fox jumps over the lazy dog 0123456789 ");
    }
    body.truncate(16 * 1024 - SECRET.len());
    body.insert_str(1024 - 10, SECRET);
    let chunks: Vec<Bytes> = body.as_bytes().chunks(1024).map(Bytes::copy_from_slice).collect();
    let mut group = c.benchmark_group("scrub");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("stream_16k_in_1k_chunks", |b| {
        b.iter(|| {
            let mut stream = StreamScrubber::new(scrubber.clone());
            let mut out = 0;
            for chunk in &chunks {
                out += stream.push_bytes(chunk.clone()).len();
            }
            out += stream.finish().len();
            black_box(out)
        })
    });
    group.bench_function("whole_16k", |b| b.iter(|| black_box(scrubber.scrub(black_box(body.as_bytes())).len())));
    group.finish();
    // Built again whenever a held value changes (first fetch, rotation, a minted token).
    c.bench_function("scrub/new_one_secret", |b| {
        b.iter(|| black_box(Scrubber::new([("OPENAI", black_box(&secret))]).is_empty()))
    });
}

fn audit(c: &mut Criterion) {
    let metadata: BTreeMap<String, String> =
        [("team", "research"), ("env", "prod")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let record = AuditRecord {
        kind: "request",
        timestamp: "2026-01-01T00:00:00.000Z".to_string(),
        request_id: "0123456789abcdef0123456789abcdef".to_string(),
        agent_id: Some("agent-42".to_string()),
        operation: "openai POST /v1/chat/completions".to_string(),
        credential: Some("OPENAI".to_string()),
        success: true,
        duration_ms: 12,
        ip: "127.0.0.1".to_string(),
        metadata: Arc::new(metadata),
        route: Some("openai".to_string()),
        method: "POST".to_string(),
        path: "/v1/chat/completions".to_string(),
        status: 200,
        decision: Decision::Allowed,
        outcome: Outcome::Success,
        error_code: None,
        secret_source: Some("env".to_string()),
        secret_version: None,
        signed: None,
        key_fingerprint: None,
        bytes_sent: Some(1024),
        ended: None,
        delegated_by: None,
        label: None,
        fallback_from: None,
        invalidated: None,
        budgets: Vec::new(),
        usage: None,
        would_deny: Vec::new(),
        connect_host: None,
        via: None,
        minted: None,
    };
    let mut group = c.benchmark_group("audit");
    group.bench_function("to_json", |b| b.iter(|| black_box(black_box(&record).to_json())));
    group.bench_function("to_canonical", |b| b.iter(|| black_box(black_box(&record).to_canonical())));
    let scrubber = Scrubber::new([("OPENAI", &SecretString::from(SECRET))]);
    let canonical = record.to_canonical();
    group.bench_function("json_may_hold_a_secret", |b| b.iter(|| black_box(scrubber.may_appear_in_json(&canonical))));
    let mut head = ChainHead::genesis();
    group.bench_function("seal_value", |b| {
        b.iter_batched(|| record.to_json(), |value| black_box(head.seal(value)), criterion::BatchSize::SmallInput)
    });
    let line = Line::from_canonical(record.to_canonical());
    let mut out = Vec::with_capacity(2048);
    group.bench_function("seal_line", |b| {
        b.iter(|| {
            out.clear();
            head.seal_into(black_box(&line), &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

/// The usage meter over a 16 KiB chat completion stream, in the 1 KiB reads a socket gives:
/// passing it through while reading the final usage chunk, and with keyward's own
/// `include_usage` taken out again (every chunk edited, the usage chunk dropped).
fn usage_meter(c: &mut Criterion) {
    use keyward::usage::{Api, UsageMeter};
    let mut stream = String::new();
    let mut i = 0;
    while stream.len() < 16 * 1024 - 300 {
        stream.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
        i += 1;
    }
    stream.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":40,\"total_tokens\":49}}\n\ndata: [DONE]\n\n");
    let chunks: Vec<bytes::Bytes> = stream.as_bytes().chunks(1024).map(bytes::Bytes::copy_from_slice).collect();
    let mut group = c.benchmark_group("usage");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for (name, strip) in [("sse_16k_observe", false), ("sse_16k_strip_usage", true)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut meter = UsageMeter::new(Api::ChatCompletions, true, strip, false);
                let mut sent = 0;
                for chunk in &chunks {
                    sent += meter.push(chunk.clone(), &mut |_| false).0.len();
                }
                assert!(meter.usage().is_some());
                black_box(sent)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, stages, scrubber, audit, usage_meter);
criterion_main!(benches);
