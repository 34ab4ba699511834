//! The Unix-socket listener with peer identity: real sockets, and real client processes that run
//! as other uids (the tests run as root), so SO_PEERCRED reports a uid the kernel vouches for.

use crate::common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use keyward::fake_upstream::FakeUpstream;

/// Reads what the server sends until it closes, and prints it: the end of each client script.
const READ_ALL: &str = r#"
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode("utf-8", "replace"))
"#;

/// A minimal HTTP/1.1 client over a Unix socket: prints the raw response.
const CLIENT: &str = r#"
import socket, sys
path, method, target, body = sys.argv[1:5]
headers = "".join(h + "\r\n" for h in sys.argv[5:])
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
s.sendall((f"{method} {target} HTTP/1.1\r\nHost: keyward\r\nConnection: close\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{headers}\r\n{body}").encode())
"#;

/// Two requests on one connection with a pause between them (long enough to be parked), then
/// everything the server sent until it closed.
const TWO_CALLS: &str = r#"
import socket, sys, time
path, target, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
def request(close):
    return (f"POST {target} HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\n"
            f"Content-Length: 2\r\n{'Connection: close' if close else 'X-First: 1'}\r\n\r\n{{}}").encode()
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(path)
s.sendall(request(False))
time.sleep(pause)
s.sendall(request(True))
"#;

const BOUND_KEY: &str = "kw_testBoundKey01234567890abcdefghijklmnopqrst";

/// Sends one request over `socket` from a process running as `uid` (or as root with `None`);
/// returns the status and the raw response text.
fn call_as(uid: Option<u32>, socket: &Path, method: &str, target: &str, body: &str, headers: &[&str]) -> (u16, String) {
    let mut command = Command::new("/usr/bin/python3");
    command
        .arg("-c")
        .arg(format!("{CLIENT}{READ_ALL}"))
        .arg(socket)
        .arg(method)
        .arg(target)
        .arg(body)
        .args(headers)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        // Drops to the agent's uid and a matching gid before exec (std also clears supplementary groups).
        command.uid(uid).gid(uid);
    }
    let output = command.output().expect("/usr/bin/python3 runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "client failed: {}\n{text}", String::from_utf8_lossy(&output.stderr));
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// `call_as` off the async workers, for the chat path.
async fn call(uid: Option<u32>, socket: &Path, method: &'static str, headers: &[&str]) -> (u16, String) {
    call_to(uid, socket, method, CHAT, "{}", headers).await
}

async fn call_to(
    uid: Option<u32>,
    socket: &Path,
    method: &'static str,
    target: &'static str,
    body: &str,
    headers: &[&str],
) -> (u16, String) {
    let socket = socket.to_path_buf();
    let body = body.to_string();
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        call_as(uid, &socket, method, target, &body, &headers)
    })
    .await
    .unwrap()
}

struct Setup {
    harness: Harness,
    socket: PathBuf,
}

/// keyward on TCP and on a Unix socket: agent `uid-agent` is uid 1001 alone; `bound-agent` needs
/// its key *and* uid 1002; the harness's worker key works on both listeners.
async fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    // The agents' uids must reach the socket inside the test directory.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("run/keyward.sock");
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let extra = format!(
        r#"
[[agents]]
id = "uid-agent"
role = "worker"
peer_uid = 1001

[[agents]]
id = "bound-agent"
role = "worker"
peer_uid = 1002
key_sha256 = "{bound}"

[roles.lead]
delegate = true
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }}]

[[agents]]
id = "uid-lead"
role = "lead"
peer_uid = 1004
"#,
        bound = sha(BOUND_KEY)
    );
    let text = config_text(dir.path(), &upstream.url(), &extra)
        .replace("header_read_timeout_ms = 2000", "header_read_timeout_ms = 2000\npark_idle_after_ms = 200")
        .replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = [\"127.0.0.1:0\", \"unix:{}\"]\nunix_socket_mode = \"0666\"", socket.display()),
            1,
        );
    let config = keyward::config::load_str(&text, "unix.toml", false).unwrap_or_else(|e| panic!("{e}"));
    let running = keyward::instance::start(config).await.unwrap();
    assert_eq!(running.proxy_unix.as_deref(), Some(socket.as_path()));
    let base = format!("http://{}", running.proxy_addr.expect("TCP too"));
    let admin = format!("http://{}", running.admin_addr);
    let client = common::client();
    Setup { harness: Harness { upstream, running: Some(running), dir, base, admin, client }, socket }
}

const CHAT: &str = "/openai/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_is_identified_by_its_uid_alone() {
    let Setup { harness: h, socket } = start().await;
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);

    let (status, text) = call(Some(1001), &socket, "POST", &[]).await;
    assert_eq!(status, 200, "{text}");
    assert_no_canary("the response", &text);
    let seen = h.upstream.last().unwrap();
    assert_eq!(seen.headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
    let record = h.wait_for_audit(|r| r["agentId"] == "uid-agent").await;
    assert_eq!(record["ip"], "unix:uid=1001");
    assert_eq!(record["decision"], "allowed");

    // Another uid with no agent of its own and no key: refused, and nothing reaches the upstream.
    let before = h.upstream.requests().len();
    let (status, text) = call(Some(1003), &socket, "POST", &[]).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("missing_agent_key"), "{text}");
    assert_eq!(h.upstream.requests().len(), before);
    let refused = h.wait_for_audit(|r| r["ip"] == "unix:uid=1003").await;
    assert_eq!(refused["agentId"], serde_json::Value::Null);

    // The uid does not let an agent escape its role's grants.
    let (status, _) = call(Some(1001), &socket, "DELETE", &[]).await;
    assert_eq!(status, 403);

    let dir = h.stop().await;
    assert!(!socket.exists(), "the socket is removed at shutdown");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_no_canary("the audit file", &audit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_agent_needs_both_its_key_and_its_uid() {
    let Setup { harness: h, socket } = start().await;
    let bearer = format!("Authorization: Bearer {BOUND_KEY}");

    let (status, text) = call(Some(1002), &socket, "POST", &[&bearer]).await;
    assert_eq!(status, 200, "{text}");
    let record = h.wait_for_audit(|r| r["agentId"] == "bound-agent").await;
    assert_eq!(record["ip"], "unix:uid=1002");

    // The key alone: from another uid, from root, or over TCP, it is refused.
    for uid in [Some(1001), None] {
        let (status, text) = call(uid, &socket, "POST", &[&bearer]).await;
        assert_eq!(status, 401, "{text}");
        assert!(text.contains("peer_mismatch"), "{text}");
    }
    let tcp = h.client.post(h.url(CHAT)).bearer_auth(BOUND_KEY).body("{}").send().await.unwrap();
    assert_eq!(tcp.status(), 401);
    assert_eq!(tcp.json::<serde_json::Value>().await.unwrap()["error"]["code"], "peer_mismatch");

    // The uid alone is not enough for an agent that also has a key.
    let (status, _) = call(Some(1002), &socket, "POST", &[]).await;
    assert_eq!(status, 401);

    // Ordinary agent keys work on the socket too, from any uid.
    let worker = format!("Authorization: Bearer {WORKER_KEY}");
    let (status, text) = call(Some(1003), &socket, "POST", &[&worker]).await;
    assert_eq!(status, 200, "{text}");
    let record = h.wait_for_audit(|r| r["agentId"] == "worker-1" && r["ip"] == "unix:uid=1003").await;
    assert_eq!(record["decision"], "allowed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_known_by_its_uid_can_delegate() {
    let Setup { harness: h, socket } = start().await;
    let request = r#"{"secretref":["OPENAI_API_KEY"],"routes":["openai"],"methods":["POST"],"paths":["/v1/chat/completions"],"ttl_seconds":60}"#;
    let (status, text) = call_to(Some(1004), &socket, "POST", "/v1/delegations", request, &[]).await;
    assert_eq!(status, 201, "{text}");
    let minted: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(minted["delegatedBy"], serde_json::json!(["uid-lead"]));
    let child = minted["key"].as_str().unwrap();

    // The child key works like any key, here over TCP.
    let r = h.client.post(h.url(CHAT)).bearer_auth(child).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Another uid cannot mint as the lead.
    let (status, _) = call_to(Some(1003), &socket, "POST", "/v1/delegations", request, &[]).await;
    assert_eq!(status, 401);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced_and_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("keyward.sock");
    // A socket left behind by a killed process.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let text = config_text(dir.path(), &upstream.url(), "").replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"unix:{}\"", socket.display()),
        1,
    );
    let config = keyward::config::load_str(&text, "unix.toml", false).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.server.listen.is_none());
    let running = keyward::instance::start(config.clone()).await.unwrap();
    assert!(running.proxy_addr.is_none(), "unix: alone opens no TCP listener");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the default socket mode");
    let worker = format!("Authorization: Bearer {WORKER_KEY}");
    let (status, _) = call(None, &socket, "POST", &[&worker]).await;
    assert_eq!(status, 200);
    running.shutdown().await;

    // A regular file at the socket path is never deleted.
    std::fs::write(&socket, "not a socket").unwrap();
    let error = keyward::instance::start(config).await.err().expect("refused");
    assert!(format!("{error:#}").contains("is not a socket"), "{error:#}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

#[test]
fn peer_uid_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let base = config_text(dir.path(), "http://127.0.0.1:9", "");
    let problems = |extra: &str, listen: &str| {
        let text = format!("{base}{extra}").replacen("\nlisten = \"127.0.0.1:0\"", &format!("\nlisten = {listen}"), 1);
        match keyward::config::load_str(&text, "t.toml", false) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let uid_agent = "[[agents]]\nid = \"u\"\nrole = \"worker\"\npeer_uid = 1001\n";
    assert!(problems(uid_agent, "\"127.0.0.1:0\"").contains("agents[3].peer_uid: needs a Unix-socket listener"));
    assert_eq!(problems(uid_agent, "\"unix:/run/k.sock\""), "");
    let nothing = "[[agents]]\nid = \"n\"\nrole = \"worker\"\n";
    assert!(problems(nothing, "\"unix:/run/k.sock\"").contains("agents[3].key_sha256: is required unless"));
    let twice = format!("{uid_agent}[[agents]]\nid = \"v\"\nrole = \"worker\"\npeer_uid = 1001\n");
    assert!(problems(&twice, "\"unix:/run/k.sock\"").contains("duplicate peer_uid"));
    assert!(problems("", "\"unix:run/k.sock\"").contains("must be absolute"));
    assert!(problems("", "[\"127.0.0.1:0\", \"127.0.0.1:1\"]").contains("at most one TCP address"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_uid_still_identifies_requests_after_the_connection_was_parked() {
    let Setup { harness: h, socket } = start().await;
    let path = socket.clone();
    let client = tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(format!("{TWO_CALLS}{READ_ALL}"))
            .arg(&path)
            .arg(CHAT)
            .arg("1.5")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .uid(1001)
            .gid(1001)
            .output()
            .expect("/usr/bin/python3 runs")
    });
    // While the client pauses, its connection is parked.
    let metrics = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let started = std::time::Instant::now();
    loop {
        let text = metrics.get(format!("{}/metrics", h.admin)).send().await.unwrap().text().await.unwrap();
        if text.lines().any(|l| l == "keyward_connections_parked 1") {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_millis(1400), "the connection was not parked");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let output = client.await.unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    for _ in 0..100 {
        if h.audit().len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let records = h.audit();
    assert_eq!(records.len(), 2);
    for record in &records {
        assert_eq!(record["agentId"], "uid-agent");
        assert_eq!(record["ip"], "unix:uid=1001");
    }
    h.stop().await;
}
