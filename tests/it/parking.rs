//! Idle connection parking (`server.park_idle_after_ms`): an idle HTTP/1 keep-alive connection
//! gives back hyper's buffers and is served again on its next request, on the same socket,
//! without losing or cutting off a byte; closing, timeouts and shutdown behave as before.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARK_MS: u64 = 200;

async fn start() -> Harness {
    Harness::start_edited("", |text| {
        text.replace(
            "header_read_timeout_ms = 2000",
            &format!("header_read_timeout_ms = 2000\npark_idle_after_ms = {PARK_MS}"),
        )
    })
    .await
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\n\r\n").into_bytes()
}

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const ECHO: &str = "/openai/_fake/echo-headers";
const CHAT: &str = "/openai/v1/chat/completions";

/// One raw HTTP/1.1 connection: what is sent and read is exactly what is on the wire.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    async fn connect(h: &Harness) -> Raw {
        let stream = TcpStream::connect(h.running.as_ref().unwrap().proxy_addr.unwrap()).await.unwrap();
        Raw { stream, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
            .await
            .expect("no answer within 5 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "the connection closed mid-response");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(end + 2).await;
                return String::from_utf8_lossy(&line[..end]).into_owned();
            }
            assert!(self.fill().await, "the connection closed mid-response");
        }
    }

    /// The next whole response (Content-Length or chunked).
    async fn answer(&mut self) -> Answer {
        let mut head = String::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            head.push_str(&line);
            head.push('\n');
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
            })
        };
        let body = if let Some(length) = header("content-length") {
            self.take(length.parse().unwrap()).await
        } else if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            let mut body = Vec::new();
            loop {
                let size = usize::from_str_radix(self.line().await.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                body.extend(self.take(size).await);
                assert_eq!(self.line().await, "");
            }
            body
        } else {
            Vec::new()
        };
        Answer { status, head, body }
    }

    /// How long until the server closes the connection (reading and discarding what comes).
    async fn closed_after(&mut self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout_at((started + limit).into(), self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }
}

/// `keyward_connections_parked`, read over a connection that is not kept (so never parked).
async fn parked(h: &Harness) -> u64 {
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let text = client.get(format!("{}/metrics", h.admin)).send().await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix("keyward_connections_parked ")).unwrap().trim().parse().unwrap()
}

/// Waits (bounded) until at least `n` connections are parked.
async fn wait_parked(h: &Harness, n: u64) {
    let started = Instant::now();
    while parked(h).await < n {
        assert!(started.elapsed() < Duration::from_secs(3), "fewer than {n} connections were parked");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_parked_and_serves_its_next_request_on_the_same_socket() {
    let h = start().await;
    let mut raw = Raw::connect(&h).await;
    let local = raw.stream.local_addr().unwrap();
    for round in 0..3 {
        raw.send(&get(ECHO)).await;
        let answer = raw.answer().await;
        assert_eq!(answer.status, 200, "round {round}: {}", answer.head);
        assert!(String::from_utf8_lossy(&answer.body).contains("\"target\":\"/_fake/echo-headers\""));
        wait_parked(&h, 1).await;
    }
    // One raw socket all along (a reconnect would have shown as the end of the stream), and the
    // peer address is still attached to every request.
    assert_eq!(parked(&h).await, 1);
    raw.send(&get(ECHO)).await;
    assert_eq!(raw.answer().await.status, 200);
    assert_eq!(parked(&h).await, 0, "a connection serving a request is not counted as parked");
    for _ in 0..100 {
        if h.audit().len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = h.audit();
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r["ip"] == local.ip().to_string()), "{records:?}");
    assert_eq!(h.upstream.count(), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_split_across_the_park_delay_is_served_whole() {
    let h = start().await;
    let pause = Duration::from_millis(PARK_MS * 3);

    // A fresh connection whose first request head arrives in two parts.
    let mut first = Raw::connect(&h).await;
    let request = get(ECHO);
    first.send(&request[..20]).await;
    tokio::time::sleep(pause).await;
    first.send(&request[20..]).await;
    assert_eq!(first.answer().await.status, 200);

    // A parked connection whose next head arrives in two parts, with a pause past the delay.
    wait_parked(&h, 1).await;
    first.send(&request[..20]).await;
    tokio::time::sleep(pause).await;
    first.send(&request[20..]).await;
    assert_eq!(first.answer().await.status, 200);

    // A body that stops halfway for longer than the delay: the request is in flight, not idle.
    let body = r#"{"model":"gpt-fake","messages":[{"role":"user","content":"split body"}]}"#;
    let request = post(CHAT, body);
    let cut = request.len() - body.len() / 2;
    first.send(&request[..cut]).await;
    tokio::time::sleep(pause).await;
    first.send(&request[cut..]).await;
    assert_eq!(first.answer().await.status, 200);
    assert_eq!(&h.upstream.last().unwrap().body[..], body.as_bytes());
    // And the connection is still open for the next request.
    first.send(&get(ECHO)).await;
    assert_eq!(first.answer().await.status, 200);
    assert_eq!(h.upstream.count(), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_streaming_longer_than_the_delay_is_not_parked_midway() {
    let h = start().await;
    let mut raw = Raw::connect(&h).await;
    raw.send(&get("/openai/_fake/sse?events=6&interval_ms=150")).await;
    let answer = raw.answer().await;
    assert_eq!(answer.status, 200);
    let events = String::from_utf8_lossy(&answer.body).into_owned();
    assert_eq!(events.matches("data:").count(), 7, "six events and [DONE]: {events}");
    assert!(events.contains("[DONE]"), "{events}");
    raw.send(&get(ECHO)).await;
    assert_eq!(raw.answer().await.status, 200);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_across_a_park() {
    let h = start().await;
    let mut raw = Raw::connect(&h).await;
    let fourth = get("/openai/_fake/echo-headers?n=4");
    let mut burst = [
        get("/openai/_fake/echo-headers?n=1"),
        get("/openai/_fake/echo-headers?n=2"),
        get("/openai/_fake/echo-headers?n=3"),
    ]
    .concat();
    // The start of a fourth request rides along and waits, read but unparsed, through the park.
    burst.extend_from_slice(&fourth[..25]);
    raw.send(&burst).await;
    for n in 1..=3 {
        let answer = raw.answer().await;
        assert_eq!(answer.status, 200);
        assert!(String::from_utf8_lossy(&answer.body).contains(&format!("?n={n}")), "response {n} out of order");
    }
    wait_parked(&h, 1).await;
    tokio::time::sleep(Duration::from_millis(PARK_MS)).await;
    raw.send(&fourth[25..]).await;
    let answer = raw.answer().await;
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&answer.body).contains("?n=4"));
    assert_eq!(h.upstream.count(), 4);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_arrive_whole_after_a_park() {
    let h = start().await;
    let mut raw = Raw::connect(&h).await;
    raw.send(&get(ECHO)).await;
    assert_eq!(raw.answer().await.status, 200);
    wait_parked(&h, 1).await;

    let body = r#"{"model":"gpt-fake","messages":[{"role":"user","content":"after a park"}]}"#;
    raw.send(&post(CHAT, body)).await;
    let answer = raw.answer().await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(&h.upstream.last().unwrap().body[..], body.as_bytes());

    // A chunked body, then a pipelined GET right behind it.
    wait_parked(&h, 1).await;
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunked = [head.as_bytes(), b"5\r\n{\"a\":\r\n3\r\n42}\r\n0\r\n\r\n", &get(ECHO)].concat();
    raw.send(&chunked).await;
    assert_eq!(raw.answer().await.status, 200);
    assert_eq!(raw.answer().await.status, 200);
    let seen = h.upstream.requests();
    assert_eq!(&seen[seen.len() - 2].body[..], b"{\"a\":42}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_ask_to_close_are_closed_not_parked() {
    let h = start().await;
    let close = format!(
        "GET {ECHO} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\nConnection: close\r\n\r\n"
    );
    let http10 = format!("GET {ECHO} HTTP/1.0\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\n\r\n");
    for request in [close, http10] {
        let mut raw = Raw::connect(&h).await;
        raw.send(request.as_bytes()).await;
        let answer = raw.answer().await;
        assert_eq!(answer.status, 200);
        // At once, where a parked connection would stay open until the header timeout (2 s).
        let closed = raw.closed_after(Duration::from_millis(1500)).await;
        assert!(closed.is_some_and(|after| after < Duration::from_secs(1)), "{request}: {closed:?}");
    }
    tokio::time::sleep(Duration::from_millis(PARK_MS * 2)).await;
    assert_eq!(parked(&h).await, 0);
    h.stop().await;
}

/// A closing connection still delivers its whole response to a client that reads slowly: what
/// hyper holds when the exchange ends is flushed before the socket is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_response_reaches_a_slow_reader_whole() {
    let h = start().await;
    let size = 8 << 20;
    let mut raw = Raw::connect(&h).await;
    raw.send(
        format!(
            "GET /openai/_fake/bytes?n={size} HTTP/1.1\r\nHost: keyward\r\nAuthorization: Bearer {WORKER_KEY}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    // Reading slower than keyward writes: the socket stays full, so the end of the response is
    // still in keyward's buffer when the exchange is over.
    let mut received = Vec::with_capacity(size + 1024);
    let reading = async {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = raw.stream.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..n]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), reading).await.expect("the response ends");
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    assert!(received.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&received[..head_end]));
    assert_eq!(received.len() - head_end, size, "the response was cut off");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_still_closes_a_parked_connection() {
    let h = start().await;
    // Both connections must send their next head within 2 s of their last response, as before
    // parking: one stays silent, one starts a head after 1 s and never finishes it.
    let mut silent = Raw::connect(&h).await;
    let mut partial = Raw::connect(&h).await;
    for raw in [&mut silent, &mut partial] {
        raw.send(&get(ECHO)).await;
        assert_eq!(raw.answer().await.status, 200);
    }
    let answered = Instant::now();
    wait_parked(&h, 2).await;
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(answered.elapsed())).await;
    partial.send(&get(ECHO)[..20]).await;
    for (what, raw) in [("silent", &mut silent), ("partial", &mut partial)] {
        let closed = raw.closed_after(Duration::from_secs(4)).await;
        let at = answered.elapsed();
        assert!(
            closed.is_some() && at > Duration::from_millis(1700) && at < Duration::from_millis(2600),
            "{what}: {at:?}"
        );
    }
    assert_eq!(h.upstream.count(), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_parked_connections_at_once_and_lets_requests_finish() {
    let h = start().await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut raw = Raw::connect(&h).await;
        raw.send(&get(ECHO)).await;
        assert_eq!(raw.answer().await.status, 200);
        idle.push(raw);
    }
    wait_parked(&h, 5).await;
    let mut busy = Raw::connect(&h).await;
    busy.send(&get("/openai/_fake/slow?ms=800")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let stopping = tokio::spawn(h.stop());
    for raw in &mut idle {
        let closed = raw.closed_after(Duration::from_secs(2)).await;
        assert!(closed.is_some_and(|after| after < Duration::from_millis(300)), "a parked connection: {closed:?}");
    }
    // The request in flight still gets its whole answer, then the connection closes.
    let answer = busy.answer().await;
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&answer.body).contains("slept_ms"));
    assert!(busy.closed_after(Duration::from_secs(2)).await.is_some());
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
}
