//! Connections and attempts below the request: every connection has a deadline from accept to its
//! first whole request head (HTTP/1 and h2c alike), idle HTTP/2 connections are closed, a
//! listener holds at most `server.max_connections`, a flood cannot starve a normal agent of file
//! descriptors, and every attempt is audited, also one the HTTP parser refused or one whose body
//! went wrong after the credential was released.

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The first bytes of every HTTP/2 connection.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until keyward closes the connection (end of stream or a reset). `None` if it is still
/// open after `bound`.
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut read = Vec::new();
    let closed = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    closed.ok().map(|()| read)
}

fn proxy_addr(h: &Harness) -> std::net::SocketAddr {
    h.running.as_ref().unwrap().proxy_addr.unwrap()
}

/// An h2c (prior knowledge) client connection to `addr`; the connection future must be driven.
async fn h2c(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    hyper::client::conn::http2::Connection<
        hyper_util::rt::TokioIo<TcpStream>,
        http_body_util::Empty<bytes::Bytes>,
        hyper_util::rt::TokioExecutor,
    >,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap()
}

/// Sends `request` on a new connection and reads the answer until keyward closes it.
async fn exchange(h: &Harness, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy_addr(h)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await.expect("keyward closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_whole_request_head_are_closed_at_the_deadline() {
    // header_read_timeout_ms = 2000 in the test config.
    let h = Harness::start().await;
    let partial_h1 = format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nAuthorization: Bearer {WORKER_KEY}\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", Vec::new()),
        ("one byte of the HTTP/2 preface", H2_PREFACE[..1].to_vec()),
        ("23 of the 24 bytes of the HTTP/2 preface", H2_PREFACE[..23].to_vec()),
        ("the HTTP/2 preface", H2_PREFACE.to_vec()),
        ("the HTTP/2 preface and SETTINGS", [H2_PREFACE, H2_SETTINGS].concat()),
        ("part of an HTTP/1 head", partial_h1.into_bytes()),
    ];
    let mut waiting = Vec::new();
    for (what, bytes) in cases {
        let mut stream = TcpStream::connect(proxy_addr(&h)).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        waiting
            .push(tokio::spawn(async move { (what, read_until_closed(&mut stream, Duration::from_secs(12)).await) }));
    }
    for task in waiting {
        let (what, answer) = task.await.unwrap();
        let answer = answer.unwrap_or_else(|| panic!("{what}: still open 12 s after connect"));
        if what == "part of an HTTP/1 head" {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text}");
            assert!(text.contains("request_head_timeout"), "{what}: {text}");
        }
    }
    // The partial head was an attempt, and has its record; the silent connections were not.
    let record = h.wait_for_audit(|r| r["errorCode"] == "request_head_timeout").await;
    assert_eq!(record["outcome"], "unparsed");
    assert_eq!(record["status"], 408);
    assert_eq!(record["ip"], "127.0.0.1");
    assert_eq!(h.audit().len(), 1, "{:#?}", h.audit());
    assert_eq!(h.upstream.count(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_its_last_stream() {
    let h = Harness::start().await;
    let (mut sender, connection) = h2c(proxy_addr(&h)).await;
    let driven = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/openai/_fake/echo-headers", proxy_addr(&h)))
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // The connection stays quiet; keyward sends GOAWAY about header_read_timeout (2 s) later.
    let ended = tokio::time::timeout(Duration::from_secs(12), driven).await;
    assert!(ended.is_ok(), "an idle h2c connection was still open 12 s after its last stream");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_at_max_connections_refuses_the_newest() {
    let h = Harness::start_edited("", |text| {
        text.replace("header_read_timeout_ms = 2000", "header_read_timeout_ms = 10000\nmax_connections = 4")
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(proxy_addr(&h)).await.unwrap());
    }
    // Let the accept loop take all four before the fifth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = exchange(&h, b"GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    // The connections already open keep their place: the first one is served.
    held[0]
        .write_all(format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WORKER_KEY}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let served = read_until_closed(&mut held[0], Duration::from_secs(10)).await.unwrap();
    assert!(String::from_utf8_lossy(&served).starts_with("HTTP/1.1 200"));
    // The admin listener has its own limit.
    let metrics = h.metrics().await;
    assert!(metrics.contains("keyward_connections_refused_total 1"), "{metrics}");
    // Places are given back as connections close.
    drop(held);
    let mut answered = None;
    for _ in 0..50 {
        let response = h
            .client
            .get(h.url("/openai/_fake/echo-headers"))
            .header("authorization", format!("Bearer {WORKER_KEY}"))
            .send()
            .await;
        if let Ok(response) = response
            && response.status() == 200
        {
            answered = Some(response.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered, Some(http::StatusCode::OK));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_under_a_low_fd_limit_does_not_starve_agents() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, config_text(dir.path(), &upstream.url(), "")).unwrap();
    let mut command = std::process::Command::new("prlimit");
    command.arg("--nofile=512:512").arg("--").arg(env!("CARGO_BIN_EXE_keyward"));
    let spawned = process::Spawned::serve_command(command, dir.path(), &["--config", path.to_str().unwrap()], &[], &[]);
    let proxy = spawned.proxy.trim_start_matches("http://").to_string();

    // 600 connections that say nothing (more than the process may hold descriptors).
    let mut flood = Vec::new();
    for _ in 0..600 {
        flood.push(TcpStream::connect(&proxy).await.unwrap());
    }
    let client = common::client();
    // The admin listener keeps its own places meanwhile.
    let health =
        client.get(format!("{}/healthz", spawned.admin)).timeout(Duration::from_secs(10)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Every one of them is refused or closed by the head deadline (2 s here).
    let mut closing = Vec::new();
    for mut stream in flood {
        closing
            .push(tokio::spawn(async move { read_until_closed(&mut stream, Duration::from_secs(15)).await.is_some() }));
    }
    let mut still_open = 0;
    for task in closing {
        still_open += usize::from(!task.await.unwrap());
    }
    assert_eq!(still_open, 0, "silent connections still open 15 s after connect");
    // And a normal agent is served.
    let response = client
        .get(format!("{}/openai/_fake/echo-headers", spawned.proxy))
        .header("authorization", format!("Bearer {WORKER_KEY}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let logs = spawned.terminate();
    assert!(logs.contains("file descriptors"), "the descriptor budget is logged at start:\n{logs}");
    assert!(logs.contains("server.max_connections"), "the lowered connection limit is logged:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_the_parser_refuses_are_audited() {
    let h = Harness::start().await;
    let auth = format!("Authorization: Bearer {WORKER_KEY}\r\n");
    let many: String = (0..120).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let cases = [
        (
            "duplicate Content-Length",
            format!(
                "POST /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
            ),
            400,
            "invalid_request_head",
        ),
        (
            "obs-folded Transfer-Encoding",
            format!(
                "POST /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
            ),
            400,
            "invalid_request_head",
        ),
        (
            "a 70 KB head",
            format!(
                "GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}X-Big: {}\r\n\r\n",
                "a".repeat(70_000)
            ),
            431,
            "request_head_too_large",
        ),
        (
            "120 headers",
            format!("GET /openai/_fake/echo-headers HTTP/1.1\r\nHost: x\r\n{auth}{many}\r\n"),
            431,
            "request_head_too_large",
        ),
    ];
    for (what, request, status, code) in cases {
        let before = h.audit().len();
        let answer = exchange(&h, request.as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{what}: {answer}");
        let records = h.audit();
        assert_eq!(records.len(), before + 1, "{what}: one record per attempt: {records:#?}");
        let record = records.last().unwrap();
        assert_eq!(record["outcome"], "unparsed", "{what}");
        assert_eq!(record["decision"], "denied", "{what}");
        assert_eq!(record["status"], status, "{what}");
        assert_eq!(record["errorCode"], code, "{what}");
        assert_eq!(record["ip"], "127.0.0.1", "{what}");
        assert!(record["agentId"].is_null(), "{what}");
    }
    assert_eq!(h.upstream.count(), 0);
    h.stop().await;
}

fn chunked_post(path: &str, chunks: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WORKER_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_gets_400_before_the_credential_is_released() {
    let h = Harness::start().await;
    let cases =
        [("chunk size overflow", "fffffffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), ("bare LF", "5\nhello\n0\n\n")];
    for (what, chunks) in cases {
        let answer = exchange(&h, &chunked_post("/openai/_fake/echo-headers", chunks)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{what}: {answer}");
        assert!(answer.contains("invalid_body"), "{what}: {answer}");
    }
    assert_eq!(h.upstream.count(), 0, "no request, and no credential, went upstream");
    assert!(h.audit_all().iter().all(|r| r["type"] != "request.released"));
    let records = h.audit();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["decision"] == "denied" && r["errorCode"] == "invalid_body"), "{records:#?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_fails_after_release_is_recorded_as_released_and_aborted() {
    // Bodies up to 1 KiB are read before release; the limit on the whole body is 64 KiB.
    let h = Harness::start_edited("", |text| {
        text.replace("max_request_body_bytes = 65536", "max_request_body_bytes = 65536\nretry_body_bytes = 1024")
    })
    .await;
    let chunk = "a".repeat(4096);
    let mut over: String = (0..20).map(|_| format!("1000\r\n{chunk}\r\n")).collect();
    over.push_str("0\r\n\r\n");
    let answer = exchange(&h, &chunked_post("/openai/_fake/echo-headers", &over)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let mut malformed: String = (0..2).map(|_| format!("1000\r\n{chunk}\r\n")).collect();
    malformed.push_str("5\nhello\n0\n\n");
    let answer = exchange(&h, &chunked_post("/openai/_fake/echo-headers", &malformed)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let released = h.audit_all().into_iter().filter(|r| r["type"] == "request.released").count();
    assert_eq!(released, 2, "both bodies were past the read-ahead when the credential went out");
    let records = h.audit();
    assert_eq!(records.len(), 2, "{records:#?}");
    for (record, code) in records.iter().zip(["body_too_large", "invalid_body"]) {
        assert_eq!(record["errorCode"], code, "{record:#?}");
        assert_eq!(record["decision"], "allowed", "the credential went out: {record:#?}");
        assert_eq!(record["outcome"], "request_aborted", "{record:#?}");
    }
    h.stop().await;
}

/// A harness with route `/broken` to an upstream that promises 100 bytes, sends 8 and closes.
async fn with_broken_upstream() -> Harness {
    let broken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken_addr = broken.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = broken.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n12345678").await;
            });
        }
    });
    let extra = format!(
        r#"
[[routes]]
name = "broken"
prefix = "/broken"
upstream = "http://{broken_addr}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[roles.breaker]
grants = [{{ route = "broken", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/**"] }}]

[[agents]]
id = "breaker-1"
role = "breaker"
key_sha256 = "{}"
"#,
        sha(BREAKER_KEY)
    );
    Harness::start_with(&extra).await
}

const BREAKER_KEY: &str = "kw_testBreakerKey123456789abcdefghijklmnopqrs";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_is_recorded_with_what_the_agent_received() {
    let h = with_broken_upstream().await;
    for round in 0..20 {
        let answer = exchange(
            &h,
            format!("GET /broken/{round} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BREAKER_KEY}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let received = answer.split_once("\r\n\r\n").map_or(0, |(_, body)| body.len());
        let path = format!("/{round}");
        let record = h.wait_for_audit(|r| r["route"] == "broken" && r["path"] == path.as_str()).await;
        assert_eq!(record["outcome"], "upstream_error", "{record:#?}");
        assert_eq!(record["bytesSent"], received, "the record counts what the agent got: {answer:?} {record:#?}");
        // What arrived before the break reaches the agent.
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert_eq!(received, 8, "{answer:?}");
    }
    h.stop().await;
}

/// A HEAD that keyward refuses gets its status and the length of the error it would have
/// carried, but no body: over HTTP/2 a body would go out as DATA frames, which `h2` clients
/// reject as a protocol error. Refused and unknown alike, on h2c, each audited once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_over_h2c_has_no_body() {
    use http_body_util::BodyExt;
    let h = Harness::start().await;
    let (mut sender, connection) = h2c(proxy_addr(&h)).await;
    tokio::spawn(connection);
    for (path, key, status) in
        [("/openai/v1/models", "kw_notAKnownKey0123456789abcdefghijk", 401), ("/nowhere/x", WORKER_KEY, 404)]
    {
        let request = http::Request::head(format!("http://{}{path}", proxy_addr(&h)))
            .header("authorization", format!("Bearer {key}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let length: usize = response.headers()["content-length"].to_str().unwrap().parse().unwrap();
        assert!(length > 0, "{path}: the length of the error a GET would get");
        let body = response.into_body().collect().await.expect("no stream error").to_bytes();
        assert!(body.is_empty(), "{path}: {body:?}");
        let record = h.wait_for_audit(|r| r["method"] == "HEAD" && r["status"] == status).await;
        assert_eq!(record["decision"], "denied", "{record:#?}");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_off_is_recorded_with_what_an_h2c_agent_received() {
    use http_body_util::BodyExt;
    let h = with_broken_upstream().await;
    let (mut sender, connection) = h2c(proxy_addr(&h)).await;
    tokio::spawn(connection);
    // Losing the bytes was a race (about one round in twenty before the fix). It is rarer now but
    // not gone: a DATA frame handed to the HTTP/2 layer just before the stream is reset can still
    // be dropped, on keyward's side or in the client's, so over HTTP/2 the record counts what
    // keyward handed on, never less than the agent got and never more than the upstream sent
    // (docs/audit.md says so).
    let mut short = 0;
    for round in 0..50 {
        let request = http::Request::get(format!("http://{}/broken/{round}", proxy_addr(&h)))
            .header("authorization", format!("Bearer {BREAKER_KEY}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let mut body = response.into_body();
        let mut received = 0;
        while let Some(Ok(frame)) = body.frame().await {
            received += frame.data_ref().map_or(0, |d| d.len());
        }
        let path = format!("/{round}");
        let record = h.wait_for_audit(|r| r["route"] == "broken" && r["path"] == path.as_str()).await;
        assert_eq!(record["outcome"], "upstream_error", "{record:#?}");
        let counted = record["bytesSent"].as_u64().unwrap() as usize;
        assert!(counted >= received && counted <= 8, "round {round}: agent got {received}: {record:#?}");
        short += usize::from(counted != received);
    }
    eprintln!("h2c: {short} of 50 rounds lost the bytes sent before the reset");
    h.stop().await;
}
