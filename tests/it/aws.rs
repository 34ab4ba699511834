//! The AWS Secrets Manager provider through the real `aws-sdk-secretsmanager` against a real
//! `moto_server` on loopback, with keyward run as its own process using the standard chain.

use crate::common;

use std::time::{Duration, Instant};

use common::moto::{aws_env, sdk_client, start_moto};
use common::process::Spawned;
use common::*;
use keyward::fake_upstream::FakeUpstream;

fn config(dir: &std::path::Path, upstream: &str, endpoint_line: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[audit]
path = "{dir}/audit.jsonl"
[[sources]]
name = "prod"
provider = "aws-secrets-manager"
region = "ap-southeast-1"
secret_name = "openclaw-prod-credentials"
{endpoint_line}
mapping = {{ OPENAI_API_KEY = "{{{{OPENAI_API_KEY}}}}", GITHUB_TOKEN = "{{{{GITHUB_TOKEN}}}}" }}
cache = {{ ttl_seconds = 300, max_size = 10 }}
[[sources]]
name = "plain"
provider = "aws-secrets-manager"
region = "ap-southeast-1"
secret_name = "plain-anthropic-key"
{endpoint_line}
mapping = {{ ANTHROPIC_API_KEY = "{{{{.}}}}" }}
[[routes]]
name = "openai"
prefix = "/openai"
upstream = "{upstream}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}
[[routes]]
name = "anthropic"
prefix = "/anthropic"
upstream = "{upstream}"
agent_key = {{ header = "x-api-key" }}
inject = {{ header = "x-api-key", value = "{{{{secret}}}}" }}
[roles.worker]
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }},
  {{ route = "anthropic", secret = "ANTHROPIC_API_KEY", methods = ["POST"], paths = ["/v1/messages"] }},
]
[[agents]]
id = "subagent-abc123"
role = "worker"
key_sha256 = "{hash}"
"#,
        dir = dir.display(),
        hash = sha(WORKER_KEY),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_secret_reaches_the_upstream_once_per_ttl_and_never_the_agent() {
    let moto = start_moto().await;
    let sdk = sdk_client(&moto.url);
    let created = sdk
        .create_secret()
        .name("openclaw-prod-credentials")
        .secret_string(
            serde_json::json!({ "OPENAI_API_KEY": CANARY_OPENAI, "GITHUB_TOKEN": CANARY_GITHUB }).to_string(),
        )
        .send()
        .await
        .unwrap();
    let version = created.version_id().unwrap().to_string();
    sdk.create_secret().name("plain-anthropic-key").secret_string(CANARY_ANTHROPIC).send().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    // The endpoint comes from the standard chain (AWS_ENDPOINT_URL), as in production.
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(dir.path(), &upstream.url(), "")).unwrap();
    let env = aws_env(Some(&moto.url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spawned = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap()], &env);
    let client = common::client();

    // 100 concurrent requests as soon as keyward listens: one GetSecretValue serves them all.
    let chat = format!("{}/openai/v1/chat/completions", spawned.proxy);
    let calls = (0..100).map(|_| {
        let (client, chat) = (client.clone(), chat.clone());
        async move {
            let r = client.post(&chat).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
            (r.status(), r.text().await.unwrap())
        }
    });
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200, "{body}");
        assert_no_canary("a response", &body);
    }
    assert_eq!(upstream.count(), 100);
    assert!(
        upstream.requests().iter().all(|r| r.headers["authorization"] == format!("Bearer {CANARY_OPENAI}").as_str())
    );

    let anthropic = client
        .post(format!("{}/anthropic/v1/messages", spawned.proxy))
        .header("x-api-key", WORKER_KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic.status(), 200);
    assert_eq!(upstream.last().unwrap().headers["x-api-key"], CANARY_ANTHROPIC);

    let metrics = client.get(format!("{}/metrics", spawned.admin)).send().await.unwrap().text().await.unwrap();
    assert_eq!(fetch_count(&metrics, "prod"), 1, "{metrics}");
    assert_eq!(fetch_count(&metrics, "plain"), 1, "{metrics}");
    assert_no_canary("metrics", &metrics);
    let ready = client.get(format!("{}/readyz", spawned.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let logs = spawned.terminate();
    assert_no_canary("logs", &logs);
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let records = outcomes(&dir.path().join("audit.jsonl"));
    assert_eq!(records.len(), 101);
    assert_no_canary("the audit file", &audit);
    let first = &records[0];
    assert_eq!(first["secretSource"], "prod");
    assert_eq!(first["secretVersion"], version.as_str());
    assert_eq!(first["credential"], "OPENAI_API_KEY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_secret_store_fails_closed_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let endpoint = format!("endpoint_url = \"http://127.0.0.1:{}\"", closed_port());
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(dir.path(), &upstream.url(), &endpoint)).unwrap();
    let env = aws_env(None);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spawned = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap()], &env);
    let client = common::client();
    let started = Instant::now();
    let r = client
        .post(format!("{}/openai/v1/chat/completions", spawned.proxy))
        .bearer_auth(WORKER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "secret_store_unavailable");
    assert_eq!(
        body["error"]["message"],
        "credential 'OPENAI_API_KEY' is unavailable: secret source 'prod' cannot be reached"
    );
    assert_eq!(upstream.count(), 0);
    let ready = client.get(format!("{}/readyz", spawned.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let logs = spawned.terminate();
    assert!(logs.contains("secret store fetch failed"), "{logs}");
    for line in logs.lines().filter(|l| l.contains("secret store fetch failed")) {
        // The causes' messages, not the SDK's nested Debug output.
        assert!(line.contains("GetSecretValue: dispatch failure") && !line.contains("{ source:"), "{line}");
    }
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains(r#""outcome":"secret_error""#), "{audit}");
}

/// The article's external-secrets JSON, unchanged, loaded with `sources_from`: it reads AWS, and
/// falls back to "staging" while AWS has no such secret (audited as a fallback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_articles_json_loads_as_is_and_falls_back_to_staging() {
    let moto = start_moto().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    std::fs::write(dir.path().join("openclaw-prod.json"), include_str!("../../config/examples/openclaw-prod.json"))
        .unwrap();
    std::fs::write(dir.path().join("staging.json"), format!("{{\"OPENAI_API_KEY\": \"{CANARY_GITHUB}\"}}")).unwrap();
    let text = config(dir.path(), &upstream.url(), "");
    let start = text.find("[[sources]]").unwrap();
    let end = text.find("[[routes]]").unwrap();
    let sources = "[[sources]]\nname = \"staging\"\nprovider = \"file\"\npath = \"staging.json\"\n\n";
    let text = format!("sources_from = [\"openclaw-prod.json\"]\n{}{sources}{}", &text[..start], &text[end..]);
    std::fs::write(dir.path().join("keyward.toml"), text).unwrap();
    let check = common::process::keyward().args(["check", "--config", "keyward.toml"]).current_dir(dir.path()).output();
    let check = check.unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let env = aws_env(Some(&moto.url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spawned = Spawned::serve(dir.path(), &["--config", "keyward.toml"], &env);
    let client = common::client();
    let chat = format!("{}/openai/v1/chat/completions", spawned.proxy);
    let response = client.post(&chat).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_GITHUB}").as_str());

    // Once AWS has the secret, new requests use it.
    sdk_client(&moto.url)
        .create_secret()
        .name("openclaw-prod-credentials")
        .secret_string(serde_json::json!({ "OPENAI_API_KEY": CANARY_OPENAI }).to_string())
        .send()
        .await
        .unwrap();
    let response = client.post(&chat).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());

    let logs = spawned.terminate();
    assert_no_canary("logs", &logs);
    let records = outcomes(&dir.path().join("audit.jsonl"));
    assert_eq!(
        (records[0]["secretSource"].as_str(), records[0]["fallbackFrom"].as_str()),
        (Some("staging"), Some("openclaw-prod"))
    );
    assert_eq!(
        (records[1]["secretSource"].as_str(), records[1]["fallbackFrom"].as_str()),
        (Some("openclaw-prod"), None)
    );
}

/// A source whose entries name several AWS secrets reads them with one BatchGetSecretValue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_secrets_of_one_source_are_read_in_one_batch() {
    let moto = start_moto().await;
    let sdk = sdk_client(&moto.url);
    sdk.create_secret().name("team/openai").secret_string(CANARY_OPENAI).send().await.unwrap();
    sdk.create_secret()
        .name("team/anthropic")
        .secret_string(serde_json::json!({ "key": CANARY_ANTHROPIC }).to_string())
        .send()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let text = config(dir.path(), &upstream.url(), "");
    let start = text.find("[[sources]]").unwrap();
    let end = text.find("[[routes]]").unwrap();
    let source = r#"[[sources]]
name = "team"
provider = "aws-secrets-manager"
region = "ap-southeast-1"
mapping = { OPENAI_API_KEY = "team/openai#{{.}}", ANTHROPIC_API_KEY = "team/anthropic#{{key}}" }
"#;
    std::fs::write(dir.path().join("keyward.toml"), format!("{}{source}{}", &text[..start], &text[end..])).unwrap();
    let env = aws_env(Some(&moto.url));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spawned = Spawned::serve(dir.path(), &["--config", "keyward.toml"], &env);
    let client = common::client();
    for _ in 0..3 {
        let r = client.post(format!("{}/openai/v1/chat/completions", spawned.proxy)).bearer_auth(WORKER_KEY).send();
        assert_eq!(r.await.unwrap().status(), 200);
        assert_eq!(upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
        let r = client.post(format!("{}/anthropic/v1/messages", spawned.proxy)).header("x-api-key", WORKER_KEY).send();
        assert_eq!(r.await.unwrap().status(), 200);
        assert_eq!(upstream.last().unwrap().headers["x-api-key"], CANARY_ANTHROPIC);
    }
    let metrics = client.get(format!("{}/metrics", spawned.admin)).send().await.unwrap().text().await.unwrap();
    assert_eq!(fetch_count(&metrics, "team"), 1, "one batch call served both secrets: {metrics}");
    let logs = spawned.terminate();
    assert_no_canary("logs", &logs);
}

/// No AWS credentials anywhere (no environment keys, no profile files, instance metadata not
/// answering on a loopback port): each failed fetch logs one readable line saying what was tried
/// and what to set, not the SDK's Debug dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_aws_credentials_log_one_readable_line() {
    let moto = start_moto().await;
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(dir.path(), &upstream.url(), &format!("endpoint_url = \"{}\"", moto.url))).unwrap();
    let imds = format!("http://127.0.0.1:{}", closed_port());
    let home = tempfile::tempdir().unwrap();
    let env = [("HOME", home.path().to_str().unwrap()), ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str())];
    let unset = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_EC2_METADATA_DISABLED",
    ];
    let spawned = Spawned::serve_without(dir.path(), &["--config", path.to_str().unwrap()], &env, &unset);
    let client = common::client();
    let r = client
        .post(format!("{}/openai/v1/chat/completions", spawned.proxy))
        .bearer_auth(WORKER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let logs = spawned.terminate();
    let failures: Vec<&str> = logs.lines().filter(|l| l.contains("secret store fetch failed")).collect();
    assert!(!failures.is_empty(), "{logs}");
    for line in &failures {
        assert!(line.contains("no AWS credentials"), "{line}");
        assert!(line.contains("AWS_ACCESS_KEY_ID"), "says what to set: {line}");
        assert!(line.contains("instance metadata"), "says what was tried: {line}");
        assert!(line.len() < 800, "one readable line, not a Debug dump ({} chars): {line}", line.len());
        assert!(!line.contains("Some(") && !line.contains("{ source:"), "Debug output: {line}");
    }
}
