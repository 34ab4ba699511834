//! The load client of `loadtest/forward-proxy.sh`: HTTPS through keyward's forward proxy
//! (CONNECT with `Proxy-Authorization: Basic`, then TLS to keyward's leaf) or directly to the
//! TLS upstream, with HTTP/1.1 keep-alive. Bounded in time and count; loopback only.
//!
//! ```text
//! forward_bench rps     --host H --connect ADDR --ca PEM [--proxy ADDR --auth ID:KEY] --connections N --seconds S --path P
//! forward_bench tunnels --hosts H1,H2,... --ca PEM --proxy ADDR --auth ID:KEY --path P
//! forward_bench hold    --host H --ca PEM --proxy ADDR --auth ID:KEY --count N --pid PID --path P
//! ```
//! `rps` prints `{"requests", "seconds", "rps", "p50_ms", "p99_ms", "errors"}`; `tunnels` opens one
//! new tunnel per host in order (CONNECT, TLS handshake, one request) and prints the time of each;
//! `hold` opens N tunnels (one request each), keeps them open, and prints the process's RSS
//! before and with them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type Stream = tokio_rustls::client::TlsStream<TcpStream>;

struct Options {
    values: HashMap<String, String>,
}

impl Options {
    fn parse() -> (String, Options) {
        let mut args = std::env::args().skip(1);
        let mode = args.next().expect("a mode: rps, tunnels or hold");
        let mut values = HashMap::new();
        while let Some(name) = args.next() {
            let name = name.trim_start_matches("--").to_string();
            values.insert(name, args.next().expect("every option has a value"));
        }
        (mode, Options { values })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    fn must(&self, name: &str) -> &str {
        self.get(name).unwrap_or_else(|| panic!("--{name} is required"))
    }

    fn number(&self, name: &str, default: u64) -> u64 {
        self.get(name).map_or(default, |v| v.parse().expect("a number"))
    }
}

/// How to reach the origin: through the proxy (CONNECT host:443) or directly.
#[derive(Clone)]
struct Route {
    tls: TlsConnector,
    proxy: Option<(SocketAddr, String)>,
    connect: Option<SocketAddr>,
    path: String,
}

impl Route {
    fn new(options: &Options) -> Route {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(options.must("ca")).expect("the CA file");
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots.add(cert.expect("PEM")).expect("a CA certificate");
        }
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let proxy = options.get("proxy").map(|p| {
            let auth = base64::engine::general_purpose::STANDARD.encode(options.must("auth"));
            (p.parse().expect("--proxy ADDR"), auth)
        });
        Route {
            tls: TlsConnector::from(Arc::new(config)),
            proxy,
            connect: options.get("connect").map(|c| c.parse().expect("--connect ADDR")),
            path: options.get("path").unwrap_or("/json1k").to_string(),
        }
    }

    /// A TLS connection to `host`, through a new tunnel or directly.
    async fn open(&self, host: &str) -> std::io::Result<Stream> {
        let tcp = match &self.proxy {
            Some((proxy, auth)) => {
                let mut tcp = TcpStream::connect(proxy).await?;
                tcp.set_nodelay(true)?;
                let connect = format!(
                    "CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
                );
                tcp.write_all(connect.as_bytes()).await?;
                let head = read_head(&mut tcp).await?;
                if !head.starts_with("HTTP/1.1 200") {
                    return Err(std::io::Error::other(format!("CONNECT refused: {head}")));
                }
                tcp
            }
            None => {
                let tcp = TcpStream::connect(self.connect.expect("--connect without --proxy")).await?;
                tcp.set_nodelay(true)?;
                tcp
            }
        };
        let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
        self.tls.connect(name, tcp).await
    }

    /// One GET on a kept-alive connection; the whole body is read.
    async fn get(&self, stream: &mut Stream, host: &str) -> std::io::Result<()> {
        let request = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n\r\n", self.path);
        stream.write_all(request.as_bytes()).await?;
        let head = read_head(stream).await?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!("answered {}", head.lines().next().unwrap_or(""))));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .ok_or_else(|| std::io::Error::other("no content-length"))?;
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await?;
        Ok(())
    }
}

/// Reads a response head byte by byte (heads are small; bodies are read whole after it).
async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed before the head ended"));
        }
        head.push(byte[0]);
        if head.len() > 65536 {
            return Err(std::io::Error::other("head too large"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn rps(options: &Options) {
    let route = Route::new(options);
    let host = options.must("host").to_string();
    let connections = options.number("connections", 32);
    let seconds = options.number("seconds", 10);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (route, host, stop, errors) = (route.clone(), host.clone(), stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut stream = match route.open(&host).await {
                Ok(stream) => stream,
                Err(error) => {
                    eprintln!("{error}");
                    errors.fetch_add(1, Ordering::Relaxed);
                    return latencies;
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if route.get(&mut stream, &host).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        if let Ok(Ok(latencies)) = tokio::time::timeout(Duration::from_secs(10), task).await {
            all.extend(latencies);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let result = serde_json::json!({
        "requests": all.len(),
        "seconds": elapsed,
        "rps": all.len() as f64 / elapsed,
        "p50_ms": percentile(&all, 0.50),
        "p99_ms": percentile(&all, 0.99),
        "errors": errors.load(Ordering::Relaxed),
    });
    println!("{result}");
}

async fn tunnels(options: &Options) {
    let route = Route::new(options);
    let mut times = Vec::new();
    for host in options.must("hosts").split(',') {
        let started = Instant::now();
        let mut stream = route.open(host).await.expect("a tunnel");
        route.get(&mut stream, host).await.expect("an answer");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({ "tunnels": times.len(), "mean_ms": mean, "p50_ms": percentile(&sorted, 0.5), "p99_ms": percentile(&sorted, 0.99) })
    );
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn hold(options: &Options) {
    let route = Route::new(options);
    let host = options.must("host").to_string();
    let count = options.number("count", 1000);
    let pid = options.must("pid").to_string();
    let before = rss_kib(&pid);
    let mut open = Vec::new();
    let started = Instant::now();
    // Opened 50 at a time, so the listener's accept queue is never the bottleneck.
    for _ in 0..count.div_ceil(50) {
        let batch: Vec<_> = (0..50.min(count - open.len() as u64))
            .map(|_| {
                let (route, host) = (route.clone(), host.clone());
                tokio::spawn(async move {
                    let mut stream = route.open(&host).await?;
                    route.get(&mut stream, &host).await?;
                    Ok::<_, std::io::Error>(stream)
                })
            })
            .collect();
        for task in batch {
            open.push(task.await.expect("task").expect("a tunnel"));
        }
    }
    let opened_in = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let samples: Vec<u64> = {
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(rss_kib(&pid));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        samples
    };
    let with = *samples.iter().max().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "tunnels": open.len(),
            "opened_in_s": opened_in,
            "rss_before_kib": before,
            "rss_with_kib": with,
            "per_tunnel_kib": (with.saturating_sub(before)) as f64 / open.len().max(1) as f64,
        })
    );
    drop(open);
}

#[tokio::main]
async fn main() {
    let (mode, options) = Options::parse();
    // Bounded: no mode runs longer than this.
    let run = async {
        match mode.as_str() {
            "rps" => rps(&options).await,
            "tunnels" => tunnels(&options).await,
            "hold" => hold(&options).await,
            other => panic!("unknown mode {other}"),
        }
    };
    tokio::time::timeout(Duration::from_secs(600), run).await.expect("forward_bench took over ten minutes");
}
