//! Regression guard for the `aws-sigv4` credential kind's per-request work: signing a Bedrock
//! `InvokeModel` request (canonical request, SHA-256 of a 2 KiB JSON body, signing-key
//! derivation, signature) and reading the agent key out of a boto3-style SigV4 `Authorization`.
//!
//! `cargo bench --bench sigv4`; under `cargo test --all-targets` each runs once, as a smoke test.

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use keyward::config::AgentKeySpec;
use keyward::credentials::sigv4::{Keys, sign_parts};
use keyward::identity;

const AGENT_KEY: &str = "kw_benchAgentKey0123456789abcdefghijklmnopqrstu";

fn invoke_parts() -> http::request::Parts {
    let (parts, ()) = http::Request::post(
        "https://bedrock-runtime.us-east-1.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
    )
    .header("content-type", "application/json")
    .header("accept", "application/json")
    .header("accept-encoding", "identity")
    .header("user-agent", "Boto3/1.43 md/Botocore#1.43")
    .header("amz-sdk-invocation-id", "6c1d0b2c-5f63-4a3c-9b8e-0f1e2d3c4b5a")
    .header("amz-sdk-request", "attempt=1")
    .body(())
    .expect("a valid request")
    .into_parts();
    parts
}

fn signing(c: &mut Criterion) {
    let keys = Keys::new("AKIDBENCHEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYBENCHKEY", Some("bench-session-token"));
    let body = format!(
        r#"{{"anthropic_version":"bedrock-2023-05-31","max_tokens":256,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let template = invoke_parts();
    let mut group = c.benchmark_group("sigv4");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("sign_invoke_model_2k", |b| {
        b.iter_batched(
            || {
                let mut parts = invoke_parts();
                parts.headers = template.headers.clone();
                parts
            },
            |mut parts| {
                sign_parts(&mut parts, body.as_bytes(), &keys, "bedrock", "us-east-1", SystemTime::now())
                    .expect("signs");
                black_box(parts)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();

    let places = [AgentKeySpec { header: http::header::AUTHORIZATION, schemes: vec!["AWS4-HMAC-SHA256".to_string()] }];
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_static("authorization"),
        HeaderValue::from_str(&format!(
            "AWS4-HMAC-SHA256 Credential={AGENT_KEY}/20260101/us-east-1/bedrock/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={}",
            "0".repeat(64)
        ))
        .expect("a valid header"),
    );
    c.bench_function("sigv4/agent_key_from_authorization", |b| {
        b.iter(|| black_box(identity::extract_key(&places, black_box(&headers), "bedrock").expect("a key")))
    });
}

criterion_group!(benches, signing);
criterion_main!(benches);
