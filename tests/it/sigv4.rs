//! The `aws-sigv4` credential kind against a fake Bedrock runtime (tests/it/py/fake_bedrock.py)
//! that recomputes every signature with botocore's signer and the keys keyward holds, with
//! boto3's stock `bedrock-runtime` client as the agent (tests/it/py/bedrock_agent.py): its access
//! key id is its agent key and its secret key a dummy. Plain and streaming (event-stream) calls
//! work, the upstream never sees what the agent signed with, and the agent, the audit trail and
//! the logs never see the real keys or a signature.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::process::Spawned;
use common::*;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// The keys keyward signs with: canaries, so a leak anywhere is found.
const ACCESS_KEY_ID: &str = "AKIACANARYSIGV4KEY01";
const SECRET_ACCESS_KEY: &str = "sigv4-canary-SECRET-wJalrXUtnFEMIK7MDENGbPxRfiCY";
const SESSION_TOKEN: &str = "sigv4-canary-TOKEN-IQoJb3JpZ2luX2VjEJr0123456789";

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/py").join(name)
}

fn python() -> Command {
    let mut command = Command::new("python3");
    // Loopback only, and no AWS settings of the machine's may change what boto3 does.
    command.env("NO_PROXY", "127.0.0.1,localhost").env_remove("HTTP_PROXY").env_remove("HTTPS_PROXY");
    command.env_remove("ALL_PROXY").env("PYTHONDONTWRITEBYTECODE", "1").kill_on_drop(true);
    for name in ["AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"] {
        command.env_remove(name);
    }
    command.env("AWS_EC2_METADATA_DISABLED", "true").env("AWS_CONFIG_FILE", "/dev/null");
    command.env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    command
}

/// The fake Bedrock runtime, expecting signatures by `keys` (id, secret, token).
struct FakeBedrock {
    _child: Child,
    url: String,
    log: PathBuf,
}

impl FakeBedrock {
    async fn start(dir: &Path, keys: (&str, &str, Option<&str>)) -> FakeBedrock {
        Self::start_with_sts(dir, keys, None).await
    }

    /// Also STS, for `root` keys that assume a role whose temporary keys are `keys`.
    async fn start_with_sts(dir: &Path, keys: (&str, &str, Option<&str>), root: Option<(&str, &str)>) -> FakeBedrock {
        let log = dir.join("bedrock-requests.jsonl");
        let mut command = python();
        if let Some((id, secret)) = root {
            command.env("ROOT_ACCESS_KEY_ID", id).env("ROOT_SECRET_ACCESS_KEY", secret);
        }
        command.arg(script("fake_bedrock.py")).arg(&log).args(["us-east-1", "bedrock"]);
        command.env("EXPECT_ACCESS_KEY_ID", keys.0).env("EXPECT_SECRET_ACCESS_KEY", keys.1);
        if let Some(token) = keys.2 {
            command.env("EXPECT_SESSION_TOKEN", token);
        }
        let mut child = command.stdout(Stdio::piped()).spawn().expect("python3 runs (scripts/test.sh installs boto3)");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the fake Bedrock starts within 30 s")
            .unwrap()
            .expect("the fake Bedrock prints its port (needs botocore)");
        FakeBedrock { _child: child, url: format!("http://127.0.0.1:{}", port.trim()), log }
    }

    /// Every request the fake received, with its verdict.
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// Runs the boto3 agent (bounded to 90 s) and returns its JSON output.
async fn agent(args: &[&str]) -> (serde_json::Value, String) {
    let script = script("bedrock_agent.py");
    let output =
        tokio::time::timeout(Duration::from_secs(90), python().arg(&script).args(args).stdout(Stdio::piped()).output())
            .await
            .unwrap_or_else(|_| panic!("bedrock_agent.py {args:?} did not finish within 90 s"))
            .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "bedrock_agent.py {args:?} failed ({}):\n{stdout}\n{stderr}", output.status);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("no JSON ({e}):\n{stdout}\n{stderr}"));
    (json, format!("{stdout}\n{stderr}"))
}

/// The config: one Bedrock route with no inject, its secret of kind aws-sigv4 with `secret_lines`.
fn config(dir: &Path, upstream: &str, source: &str, secret_lines: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[forward]
max_request_body_bytes = 65536
[audit]
path = "{dir}/audit.jsonl"
{admin}
{source}
[secrets.BEDROCK]
kind = "aws-sigv4"
service = "bedrock"
region = "us-east-1"
{secret_lines}

[[routes]]
name = "bedrock"
prefix = "/bedrock"
upstream = "{upstream}"
agent_key = {{ header = "authorization", scheme = "AWS4-HMAC-SHA256" }}

[roles.worker]
grants = [
  {{ route = "bedrock", secret = "BEDROCK", methods = ["POST"], paths = ["/model/*/invoke", "/model/*/converse", "/model/*/invoke-with-response-stream", "/model/*/converse-stream"] }},
]
[roles.reader]
grants = [{{ route = "bedrock", secret = "BEDROCK", methods = ["POST"], paths = ["/model/*/converse"] }}]

[[agents]]
id = "bedrock-agent"
role = "worker"
key_sha256 = "{worker}"
[[agents]]
id = "reader-1"
role = "reader"
key_sha256 = "{reader}"
"#,
        dir = dir.display(),
        admin = admin_block(),
        worker = sha(WORKER_KEY),
        reader = sha(READER_KEY),
    )
}

/// keyward in-process, with the secret BEDROCK read from a file source holding `keys`.
async fn start_with_source(dir: &Path, upstream: &str, keys: &str, secret_lines: &str) -> keyward::instance::Running {
    let path = write_with_source(dir, upstream, keys, secret_lines);
    let config = keyward::config::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    keyward::instance::start(config).await.unwrap()
}

/// Writes `keyward.toml`, with the secret BEDROCK read from a file source holding `keys`.
fn write_with_source(dir: &Path, upstream: &str, keys: &str, secret_lines: &str) -> PathBuf {
    std::fs::write(dir.join("aws.json"), serde_json::json!({ "BEDROCK": keys }).to_string()).unwrap();
    let source = format!(
        "[[sources]]\nname = \"aws-root\"\nprovider = \"file\"\npath = \"{}/aws.json\"\nmapping = {{ BEDROCK = \"{{{{BEDROCK}}}}\" }}\n",
        dir.display()
    );
    let path = dir.join("keyward.toml");
    std::fs::write(&path, config(dir, upstream, &source, secret_lines)).unwrap();
    path
}

/// A SigV4 `Authorization` header as an AWS SDK writes it, with `key` as the access key id and a
/// signature keyward neither checks nor forwards.
fn agent_authorization(key: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={key}/20260101/us-east-1/bedrock/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, Signature={}",
        "a".repeat(64)
    )
}

const INVOKE_BODY: &str =
    r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":8,"messages":[{"role":"user","content":"raw"}]}"#;

/// Waits (bounded) until the audit file holds `count` outcome records: one is written when its
/// response ends, which can be after the client has read it.
async fn outcome_records(path: &Path, count: usize) -> Vec<serde_json::Value> {
    let started = std::time::Instant::now();
    loop {
        let records = outcomes(path);
        if records.len() >= count || started.elapsed() > Duration::from_secs(10) {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_no_aws_secret(what: &str, text: &str) {
    for secret in [SECRET_ACCESS_KEY, SESSION_TOKEN] {
        assert!(!text.contains(secret), "an AWS secret reached {what}:\n{text}");
    }
    assert!(!text.contains("Signature="), "a signature reached {what}:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_bedrock_calls_are_signed_with_the_sources_keys_and_stream_through() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start(dir.path(), (ACCESS_KEY_ID, SECRET_ACCESS_KEY, Some(SESSION_TOKEN))).await;
    let keys = serde_json::json!({
        "access_key_id": ACCESS_KEY_ID,
        "secret_access_key": SECRET_ACCESS_KEY,
        "session_token": SESSION_TOKEN,
    });
    let running = start_with_source(dir.path(), &bedrock.url, &keys.to_string(), "credentials = \"source\"").await;
    let endpoint = format!("http://{}/bedrock", running.proxy_addr.unwrap());

    let (out, printed) = agent(&["all", &endpoint, WORKER_KEY, &bedrock.url]).await;
    assert_eq!(out["invoke"], "Bedrock says hi to: hello bedrock", "{out}");
    assert_eq!(out["converse"], "Converse reply to: hello converse", "{out}");
    assert_eq!(out["invoke_stream"]["text"], "stream-0 stream-1 stream-2 ", "{out}");
    assert_eq!(out["invoke_stream"]["content_type"], "application/json", "{out}");
    assert_eq!(
        out["invoke_stream"]["released_early"], true,
        "the first event reached the agent while the upstream held the rest back: {out}"
    );
    assert_eq!(out["converse_stream"]["text"], "conv-0 conv-1 ", "{out}");
    assert_eq!(
        out["converse_stream"]["events"],
        serde_json::json!(["messageStart", "contentBlockDelta", "contentBlockDelta", "messageStop", "metadata"])
    );
    assert_eq!(out["converse_stream"]["released_early"], true, "{out}");

    // Every request upstream passed botocore's check, and carried nothing the agent signed with.
    let requests = bedrock.requests();
    assert_eq!(requests.len(), 4, "{requests:#?}");
    for request in &requests {
        assert_eq!(request["verdict"], serde_json::Value::Null, "{request:#}");
        let authorization = request["headers"]["authorization"].as_str().unwrap();
        assert!(authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY_ID}/")), "{authorization}");
        assert!(authorization.contains("/us-east-1/bedrock/aws4_request"), "{authorization}");
        let text = request.to_string();
        assert!(!text.contains(WORKER_KEY) && !text.contains(&WORKER_KEY[3..]), "the agent key went upstream: {text}");
        assert!(!text.contains("dummy-agent-secret"), "{text}");
    }
    assert!(requests[0]["path"].as_str().unwrap().contains("v1%3A0/invoke"), "the model id stays encoded");

    // The agent saw no key; the audit trail names the secret, the kind, region and service only.
    assert_no_aws_secret("the agent", &printed);
    let outcomes = outcome_records(&dir.path().join("audit.jsonl"), 4).await;
    assert_eq!(outcomes.len(), 4, "{outcomes:#?}");
    let records = read_audit(&dir.path().join("audit.jsonl"));
    for record in &outcomes {
        assert_eq!(record["outcome"], "success", "{record:#}");
        assert_eq!(record["credential"], "BEDROCK");
        assert_eq!(record["secretSource"], "aws-root");
        assert_eq!(
            record["signed"],
            serde_json::json!({ "kind": "aws-sigv4", "region": "us-east-1", "service": "bedrock" })
        );
        assert_eq!(record["agentId"], "bedrock-agent");
    }
    let released: Vec<&serde_json::Value> = records.iter().filter(|r| r["type"] == "request.released").collect();
    assert_eq!(released.len(), 4, "{released:#?}");
    assert!(released.iter().all(|r| r["signed"]["kind"] == "aws-sigv4"), "{released:#?}");
    assert_no_aws_secret("the audit trail", &std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap());

    // An upstream that echoes the keys: the agent gets them scrubbed.
    let (echo, printed) = agent(&["echo", &endpoint, WORKER_KEY]).await;
    assert!(echo["echo"].as_str().unwrap().starts_with("keys: "), "{echo}");
    assert_no_aws_secret("the agent (echo)", &printed);

    // A call outside the grant, and an unknown key, are refused before anything is signed.
    let (refused, _) = agent(&["refused", &endpoint, READER_KEY]).await;
    assert_eq!(refused["status"], 403, "{refused}");
    let (unknown, _) = agent(&["refused", &endpoint, "kw_notAnAgentKey0123456789abcdefghijklmnopq"]).await;
    assert_eq!(unknown["status"], 401, "{unknown}");
    assert_eq!(bedrock.requests().len(), 5, "only the echo call went upstream");

    // /admin/secrets shows the kind, never a key.
    let secrets = admin_get(&client(), &format!("http://{}/admin/secrets", running.admin_addr)).await;
    let entry = secrets["secrets"].as_array().unwrap().iter().find(|s| s["name"] == "BEDROCK").unwrap().clone();
    assert_eq!(entry["kind"], "aws-sigv4", "{entry}");
    assert_eq!(
        entry["signing"],
        serde_json::json!({
            "kind": "aws-sigv4", "service": "bedrock", "region": "us-east-1", "credentials": "source",
            "assume_role_arn": null, "keys_expire_at": null,
        })
    );
    assert_no_aws_secret("/admin/secrets", &secrets.to_string());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_value_that_is_not_a_key_pair_is_a_clear_503() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start(dir.path(), (ACCESS_KEY_ID, SECRET_ACCESS_KEY, None)).await;
    let not_a_pair = format!("{{\"access_key_id\":\"{ACCESS_KEY_ID}\",\"secret\":\"{SECRET_ACCESS_KEY}\"}}");
    let running = start_with_source(dir.path(), &bedrock.url, &not_a_pair, "").await;
    let endpoint = format!("http://{}/bedrock", running.proxy_addr.unwrap());
    let (out, printed) = agent(&["refused", &endpoint, WORKER_KEY]).await;
    assert_eq!(out["status"], 503, "{out}");
    assert_no_aws_secret("the agent", &printed);
    assert!(bedrock.requests().is_empty(), "nothing went upstream unsigned");
    let outcomes = outcome_records(&dir.path().join("audit.jsonl"), 1).await;
    let outcome = &outcomes[0];
    assert_eq!(outcome["outcome"], "secret_error", "{outcome:#}");
    assert_eq!(outcome["errorCode"], "signing_credentials_unavailable");
    running.shutdown().await;
}

/// The verifier is not a formality: signed with other keys than it expects, every call is 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_refuses_a_signature_by_other_keys() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start(dir.path(), (ACCESS_KEY_ID, "a-different-secret-key-0123456789", None)).await;
    let keys = serde_json::json!({ "access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY });
    let running = start_with_source(dir.path(), &bedrock.url, &keys.to_string(), "credentials = \"source\"").await;
    let endpoint = format!("http://{}/bedrock", running.proxy_addr.unwrap());
    let (out, printed) = agent(&["refused", &endpoint, WORKER_KEY]).await;
    assert_eq!(out["status"], 403, "{out}");
    assert_no_aws_secret("the agent", &printed);
    let requests = bedrock.requests();
    assert!(!requests.is_empty() && requests.iter().all(|r| r["verdict"].as_str().unwrap().contains("does not match")));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_credentials_come_from_the_keyward_processs_environment() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start(dir.path(), (ACCESS_KEY_ID, SECRET_ACCESS_KEY, None)).await;
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config(dir.path(), &bedrock.url, "", "credentials = \"chain\"")).unwrap();
    let keyward = Spawned::serve_without(
        dir.path(),
        &["--config", path.to_str().unwrap(), "--log", "trace"],
        &[
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
        &["AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI"],
    );
    let endpoint = format!("{}/bedrock", keyward.proxy);
    for _ in 0..2 {
        let (out, printed) = agent(&["invoke", &endpoint, WORKER_KEY]).await;
        assert_eq!(out["invoke"], "Bedrock says hi to: hello bedrock", "{out}");
        assert_no_aws_secret("the agent", &printed);
    }
    let requests = bedrock.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|r| r["verdict"].is_null()), "{requests:#?}");
    assert!(requests.iter().all(|r| r["headers"].get("x-amz-security-token").is_none()));
    let secrets = admin_get(&client(), &format!("{}/admin/secrets", keyward.admin)).await;
    let entry = secrets["secrets"].as_array().unwrap().iter().find(|s| s["name"] == "BEDROCK").unwrap().clone();
    assert_eq!(entry["source"], "aws-credential-chain");
    assert_eq!(entry["signing"]["credentials"], "chain");
    let outcomes = outcome_records(&dir.path().join("audit.jsonl"), 1).await;
    let outcome = &outcomes[0];
    assert_eq!(outcome["secretSource"], "aws-credential-chain", "{outcome:#}");
    let logs = keyward.terminate();
    assert_no_aws_secret("keyward's TRACE log", &logs);
    assert_no_aws_secret("the audit trail", &std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assumed_role_with_a_session_policy_signs_and_is_assumed_once() {
    const ROOT_ID: &str = "AKIAROOTCANARYKEY001";
    const ROOT_SECRET: &str = "sigv4-canary-ROOT-SECRET-9f8e7d6c5b4a39281706";
    let dir = tempfile::tempdir().unwrap();
    // STS hands out the canary keys as the role's temporary keys; Bedrock expects them.
    let bedrock = FakeBedrock::start_with_sts(
        dir.path(),
        (ACCESS_KEY_ID, SECRET_ACCESS_KEY, Some(SESSION_TOKEN)),
        Some((ROOT_ID, ROOT_SECRET)),
    )
    .await;
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"bedrock:InvokeModel","Resource":"arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0"}]}"#;
    let lines = format!(
        "credentials = \"source\"\nassume_role_arn = \"arn:aws:iam::123456789012:role/bedrock-invoke\"\n\
         session_policy = '{policy}'\nrole_session_name = \"keyward-test\"\nsts_endpoint_url = \"{}\"\n",
        bedrock.url
    );
    let root = serde_json::json!({ "access_key_id": ROOT_ID, "secret_access_key": ROOT_SECRET });
    // The real binary, logging everything (the AWS SDK's STS call included) at TRACE.
    let path = write_with_source(dir.path(), &bedrock.url, &root.to_string(), &lines);
    let keyward = Spawned::serve_without(
        dir.path(),
        &["--config", path.to_str().unwrap(), "--log", "trace"],
        &[
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ],
        &[
            "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_STS",
        ],
    );
    let endpoint = format!("{}/bedrock", keyward.proxy);
    // Twenty calls at once on a cold cache: one AssumeRole.
    let client = client();
    let calls = (0..20).map(|_| {
        client
            .post(format!("{endpoint}/model/m1/invoke"))
            .header("authorization", agent_authorization(WORKER_KEY))
            .header("content-type", "application/json")
            .body(INVOKE_BODY)
            .send()
    });
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer.unwrap().status(), 200);
    }
    for _ in 0..3 {
        let (out, printed) = agent(&["invoke", &endpoint, WORKER_KEY]).await;
        assert_eq!(out["invoke"], "Bedrock says hi to: hello bedrock", "{out}");
        assert_no_aws_secret("the agent", &printed);
        assert!(!printed.contains(ROOT_SECRET));
    }
    let requests = bedrock.requests();
    let sts: Vec<&serde_json::Value> = requests.iter().filter(|r| r["path"] == "/").collect();
    assert_eq!(sts.len(), 1, "one AssumeRole for all 23 calls: {requests:#?}");
    assert!(sts[0]["verdict"].is_null(), "{:#}", sts[0]);
    assert_eq!(sts[0]["sts"]["RoleArn"], "arn:aws:iam::123456789012:role/bedrock-invoke");
    assert_eq!(sts[0]["sts"]["RoleSessionName"], "keyward-test");
    assert_eq!(sts[0]["sts"]["Policy"], policy, "the session policy narrows the session");
    let invokes: Vec<&serde_json::Value> = requests.iter().filter(|r| r["path"] != "/").collect();
    assert_eq!(invokes.len(), 23);
    assert!(invokes.iter().all(|r| r["verdict"].is_null()), "signed with the role's keys: {invokes:#?}");
    // /admin/secrets shows the role and when its current keys expire (the fake gives an hour).
    let secrets = admin_get(&client, &format!("{}/admin/secrets", keyward.admin)).await;
    let entry = secrets["secrets"].as_array().unwrap().iter().find(|s| s["name"] == "BEDROCK").unwrap().clone();
    assert_eq!(entry["signing"]["assume_role_arn"], "arn:aws:iam::123456789012:role/bedrock-invoke");
    let expires = entry["signing"]["keys_expire_at"].as_str().unwrap_or_else(|| panic!("{entry:#}"));
    let expires = humantime::parse_rfc3339(expires).unwrap();
    let left = expires.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(50 * 60) && left <= Duration::from_secs(3600), "{entry:#}");
    assert_no_aws_secret("/admin/secrets", &secrets.to_string());
    let logs = keyward.terminate();
    assert!(logs.contains("TRACE"), "the log is at TRACE");
    for (what, text) in
        [("the TRACE log", logs), ("the audit trail", std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap())]
    {
        assert_no_aws_secret(what, &text);
        assert!(!text.contains(ROOT_SECRET), "the root secret key reached {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_agent_signed_with_never_goes_upstream_and_bodies_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start(dir.path(), (ACCESS_KEY_ID, SECRET_ACCESS_KEY, None)).await;
    let keys = serde_json::json!({ "access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY });
    let running = start_with_source(dir.path(), &bedrock.url, &keys.to_string(), "").await;
    let base = format!("http://{}/bedrock", running.proxy_addr.unwrap());
    let client = client();

    // The agent's SigV4 headers and presigned parameters are removed; the query it keeps is signed.
    let answer = client
        .post(format!(
            "{base}/model/m1/invoke?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=agentsig0123&keep=1&\
             x-amz-credential=agentcred0123&X-Amz-Security-Token=agent-query-token"
        ))
        .header("authorization", agent_authorization(WORKER_KEY))
        .header("x-amz-date", "19990101T000000Z")
        .header("x-amz-security-token", "agent-header-token-0123")
        .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        .header("content-type", "application/json")
        .body(INVOKE_BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    let requests = bedrock.requests();
    assert_eq!(requests.len(), 1);
    assert!(requests[0]["verdict"].is_null(), "{:#}", requests[0]);
    assert_eq!(requests[0]["path"], "/model/m1/invoke?keep=1");
    let upstream = requests[0].to_string();
    for agent_value in
        ["agentsig0123", "agentcred0123", "agent-query-token", "agent-header-token-0123", "UNSIGNED", "19990101"]
    {
        assert!(!upstream.contains(agent_value), "{agent_value} went upstream: {upstream}");
    }
    assert!(!upstream.contains(&WORKER_KEY[3..]));

    // A body over forward.max_request_body_bytes (sent chunked, so no length gives it away) is
    // refused before anything is signed or sent.
    let chunks = (0..70).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024]));
    let answer = client
        .post(format!("{base}/model/m1/invoke"))
        .header("authorization", agent_authorization(WORKER_KEY))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");
    assert_eq!(bedrock.requests().len(), 1, "nothing more went upstream");
    running.shutdown().await;
}

/// `keyward check` reports each wrong field of a `[secrets.NAME]` table at its line, and lists a
/// valid one.
#[test]
fn keyward_check_validates_the_kinds_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyward.toml");
    let source = "[[sources]]\nname = \"env\"\nprovider = \"env\"\nmapping = { BEDROCK = \"{{AWS_KEYS}}\" }\n";
    let good = config(dir.path(), "https://bedrock-runtime.us-east-1.amazonaws.com", source, "");
    std::fs::write(&path, &good).unwrap();
    let output = common::process::keyward().arg("check").arg("--config").arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.contains("secret 'BEDROCK': aws-sigv4, signs for bedrock in us-east-1 with keys from source 'env'"),
        "{stdout}"
    );

    let bad = good.replace("region = \"us-east-1\"\n", "region = \"Frankfurt\"\nassume_role_arn = \"role/x\"\n");
    std::fs::write(&path, &bad).unwrap();
    let output = common::process::keyward().arg("check").arg("--config").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let line = |field: &str| bad.lines().position(|l| l.starts_with(field)).unwrap() + 1;
    assert!(
        stderr.contains(&format!(
            "keyward.toml:{}: secrets.BEDROCK.region: 'Frankfurt' is not an AWS region",
            line("region =")
        )),
        "{stderr}"
    );
    assert!(
        stderr
            .contains(&format!("keyward.toml:{}: secrets.BEDROCK.assume_role_arn: 'role/x'", line("assume_role_arn"))),
        "{stderr}"
    );
}

/// STS refuses the root keys: the agent gets 503 with a clear code, the failure is audited, and
/// calls right after it fail at once instead of calling STS again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_assume_role_is_a_503_and_not_retried_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let bedrock = FakeBedrock::start_with_sts(
        dir.path(),
        (ACCESS_KEY_ID, SECRET_ACCESS_KEY, Some(SESSION_TOKEN)),
        Some(("AKIAOTHERROOTKEY0001", "not-the-keys-keyward-holds-0123456789")),
    )
    .await;
    let lines = format!(
        "assume_role_arn = \"arn:aws:iam::123456789012:role/bedrock-invoke\"\nsts_endpoint_url = \"{}\"\n",
        bedrock.url
    );
    let root = serde_json::json!({ "access_key_id": "AKIAROOTCANARYKEY001", "secret_access_key": SECRET_ACCESS_KEY });
    let running = start_with_source(dir.path(), &bedrock.url, &root.to_string(), &lines).await;
    let endpoint = format!("http://{}/bedrock/model/m1/invoke", running.proxy_addr.unwrap());
    let client = client();
    for _ in 0..5 {
        let answer = client
            .post(&endpoint)
            .header("authorization", agent_authorization(WORKER_KEY))
            .header("content-type", "application/json")
            .body(INVOKE_BODY)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 503);
        let body = answer.text().await.unwrap();
        assert!(body.contains("\"code\":\"signing_credentials_unavailable\""), "{body}");
        assert!(body.contains("STS did not let the keys assume the role"), "{body}");
        assert_no_aws_secret("the agent", &body);
    }
    let requests = bedrock.requests();
    assert_eq!(requests.len(), 1, "one AssumeRole for five calls within 2 s, nothing signed upstream: {requests:#?}");
    assert_eq!(requests[0]["path"], "/");
    let outcomes = outcome_records(&dir.path().join("audit.jsonl"), 5).await;
    assert_eq!(outcomes.len(), 5);
    for outcome in outcomes {
        assert_eq!(outcome["outcome"], "secret_error", "{outcome:#}");
        assert_eq!(outcome["errorCode"], "signing_credentials_unavailable");
        assert_eq!(outcome["status"], 503);
        assert_eq!(outcome["signed"]["kind"], "aws-sigv4");
    }
    running.shutdown().await;
}
