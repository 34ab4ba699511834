//! The official Python clients (`openai`, `anthropic`, `PyGithub`, `mcp`), at the versions
//! `scripts/test.sh` installs, against keyward with only their base URL and key changed: each
//! call works, every attempt is audited as a success, and no agent key reaches the upstream.
//! The scripts are in `tests/it/py/`.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use tokio::process::Command;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/py").join(name)
}

fn python() -> Command {
    let mut command = Command::new("python3");
    // Loopback only: no proxy from the environment may take the clients' requests elsewhere.
    command.env("NO_PROXY", "127.0.0.1,localhost").env_remove("HTTP_PROXY").env_remove("HTTPS_PROXY");
    command.env_remove("ALL_PROXY").env("PYTHONDONTWRITEBYTECODE", "1").kill_on_drop(true);
    command
}

/// Runs a client script (bounded to 60 s) and returns its one line of JSON output.
async fn run_client(args: &[&str]) -> serde_json::Value {
    let output = tokio::time::timeout(Duration::from_secs(60), python().args(args).output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within 60 s"))
        .expect("python3 runs (scripts/test.sh installs the clients)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{args:?} failed ({}); scripts/test.sh installs openai, anthropic, mcp and PyGithub:\n{stdout}\n{stderr}",
        output.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{stdout}"))
}

/// Waits (bounded) until there are `count` outcome records: a stream's record is written when
/// the client closes it, after the client's process may already have exited.
async fn outcome_records(h: &Harness, count: usize) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let records = h.audit();
        if records.len() >= count || started.elapsed() > Duration::from_secs(10) {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_no_agent_key(what: &str, text: &str) {
    for key in [WORKER_KEY, MCP_AGENT_KEY] {
        assert!(!text.contains(key) && !text.contains(&key[3..]), "an agent key reached {what}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_azure_anthropic_and_github_clients_work_unchanged() {
    let h = Harness::start().await;
    let cases = [
        ("openai-chat", "Hello from the fake upstream."),
        ("openai-stream", "tok0 tok1 tok2 tok3 tok4 "),
        ("openai-responses", "Hello from the fake upstream."),
        ("azure-openai", "Hello from the fake upstream."),
        ("anthropic", "Hello from the fake upstream."),
        ("anthropic-stream", "Hello from the fake upstream."),
        ("anthropic-x-api-key", "Hello from the fake upstream."),
        ("anthropic-x-api-key-stream", "Hello from the fake upstream."),
    ];
    let clients = script("clients.py");
    let clients = clients.to_str().unwrap();
    for (client, text) in cases {
        let out = run_client(&[clients, client, &h.base, WORKER_KEY]).await;
        assert_eq!(out["text"], text, "{client}: {out}");
    }
    let out = run_client(&[clients, "github", &h.base, WORKER_KEY]).await;
    assert_eq!(out["login"], "fake-user", "{out}");

    let sent = h.upstream.count();
    assert!(sent > cases.len(), "every client call reached the upstream");
    let records = outcome_records(&h, sent).await;
    assert_eq!(records.len(), sent, "one outcome record per request: {records:#?}");
    for r in &records {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["outcome"], "success", "{r}");
        assert_eq!(r["success"], true, "{r}");
        assert_eq!(r["agentId"], "worker-1", "{r}");
    }
    // The Anthropic clients sent their key as Bearer, and as x-api-key too: only the injected
    // credential arrived, in its one header.
    for request in h.upstream.requests() {
        let mut head = format!("{} {}\n", request.method, request.target);
        for (name, value) in &request.headers {
            head.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
        }
        assert_no_agent_key("the upstream", &head);
        let injected = CANARIES.iter().filter(|canary| head.contains(*canary)).count();
        assert_eq!(injected, 1, "exactly one injected credential:\n{head}");
        if request.target.contains("/deployments/") {
            assert_eq!(request.headers.get("api-key").unwrap(), CANARY_AZURE, "{head}");
        }
        if request.target.contains("/messages") {
            assert!(request.headers.get("authorization").is_none(), "{head}");
            assert_eq!(request.headers.get("x-api-key").unwrap(), CANARY_ANTHROPIC);
        }
    }
    let audit = std::fs::read_to_string(h.audit_path()).unwrap();
    assert_no_canary("the audit file", &audit);
    assert_no_agent_key("the audit file", &audit);
    h.stop().await;
}

const MCP_AGENT_KEY: &str = "kw_testMcpAgentKey23456789abcdefghijklmnopqrs";
const CANARY_MCP: &str = "mcp-canary-TOKEN-4d5e6f708192a3b4c5d6e7f8";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_is_served_and_audited_as_successes() {
    let scratch = tempfile::tempdir().unwrap();
    let secrets = scratch.path().join("mcp-secrets.json");
    std::fs::write(&secrets, serde_json::json!({ "MCP_TOKEN": CANARY_MCP }).to_string()).unwrap();
    let received = scratch.path().join("mcp-received.jsonl");
    let port = closed_port();
    let server = script("mcp_server.py");
    let _server = python()
        .args([server.to_str().unwrap(), &port.to_string(), CANARY_MCP, received.to_str().unwrap()])
        .spawn()
        .expect("python3 runs the mcp server");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "the mcp server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let extra = format!(
        r#"
[[sources]]
name = "mcp-secrets"
provider = "file"
path = "{secrets}"

[[routes]]
name = "mcp"
prefix = "/tools"
upstream = "http://127.0.0.1:{port}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[roles.mcp-user]
grants = [{{ route = "mcp", secret = "MCP_TOKEN", methods = ["GET", "POST", "DELETE"], paths = ["/mcp"] }}]

[[agents]]
id = "mcp-agent"
role = "mcp-user"
key_sha256 = "{hash}"
"#,
        secrets = secrets.display(),
        hash = sha(MCP_AGENT_KEY),
    );
    let h = Harness::start_with(&extra).await;

    // The server requires the injected token: the agent's own key gets the SDK's 401.
    let direct = h
        .client
        .post(format!("http://127.0.0.1:{port}/mcp"))
        .bearer_auth(MCP_AGENT_KEY)
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401, "the mcp server must refuse anything but the injected token");

    let client = script("mcp_client.py");
    let out = run_client(&[client.to_str().unwrap(), &format!("{}/tools/mcp", h.base), MCP_AGENT_KEY]).await;
    assert_eq!(out["tools"], serde_json::json!(["add"]), "{out}");
    assert_eq!(out["result"], serde_json::json!(["5"]), "{out}");
    assert_eq!(out["is_error"], false, "{out}");

    // What the server received through keyward: the injected token, never the agent key.
    let through: Vec<serde_json::Value> =
        std::fs::read_to_string(&received).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (direct_requests, proxied): (Vec<_>, Vec<_>) =
        through.into_iter().partition(|r| r.to_string().contains(MCP_AGENT_KEY));
    assert_eq!(direct_requests.len(), 1, "only the direct probe carried the agent key");
    let methods: Vec<&str> = proxied.iter().map(|r| r["method"].as_str().unwrap()).collect();
    assert!(methods.contains(&"POST") && methods.contains(&"DELETE"), "a whole session: {methods:?}");
    for request in &proxied {
        let authorization: Vec<&str> = request["headers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|pair| pair[0] == "authorization")
            .map(|pair| pair[1].as_str().unwrap())
            .collect();
        assert_eq!(authorization, [format!("Bearer {CANARY_MCP}")], "{request}");
    }

    // Every request of the session has one outcome record; each one that got its answer is a
    // success, the GET stream the client closed at the end included.
    let records: Vec<serde_json::Value> =
        outcome_records(&h, proxied.len()).await.into_iter().filter(|r| r["route"] == "mcp").collect();
    assert_eq!(records.len(), proxied.len(), "one record per request: {records:#?}");
    let agent_closed = records.iter().filter(|r| r["ended"]["by"] == "agent").count();
    assert!(agent_closed > 0, "the client closed event streams after reading its answers: {records:#?}");
    for r in &records {
        assert_ne!(r["status"], 499, "{r}");
        assert_eq!(r["success"], true, "{r}");
        assert_eq!(r["outcome"], "success", "{r}");
        assert_eq!(r["agentId"], "mcp-agent", "{r}");
    }
    let audit = std::fs::read_to_string(h.audit_path()).unwrap();
    assert!(!audit.contains(CANARY_MCP), "the injected token reached the audit file");
    assert_no_agent_key("the audit file", &audit);
    h.stop().await;
}
