//! The floor under keyward's figures: a bare reverse proxy on the same stack (tokio multi-thread,
//! hyper-util's HTTP/1 + h2c server and pooled client, mimalloc) that only replaces the
//! Authorization header and strips the prefix. No identity, policy, limits, scrubbing or audit.
//!
//! Usage: `cargo run --release --example bare_proxy -- LISTEN UPSTREAM PREFIX AUTHORIZATION`,
//! for example `127.0.0.1:18485 127.0.0.1:18481 /bench "Bearer sk-…"` (loopback benchmarks only).

use std::convert::Infallible;

use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Target {
    upstream: String,
    prefix: String,
    authorization: HeaderValue,
}

type Upstream = Client<HttpConnector, Incoming>;

async fn forward(client: Upstream, target: &Target, mut request: Request<Incoming>) -> Response<Incoming> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let path = path.strip_prefix(target.prefix.as_str()).unwrap_or(path).to_string();
    *request.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(target.upstream.as_str())
        .path_and_query(path)
        .build()
        .expect("a loopback address and a request path make a URI");
    request.headers_mut().remove(http::header::HOST);
    request.headers_mut().insert(http::header::AUTHORIZATION, target.authorization.clone());
    match client.request(request).await {
        Ok(response) => response,
        Err(error) => panic!("bare_proxy: upstream failed: {error}"),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, prefix, authorization] = args.as_slice() else {
        return Err(std::io::Error::other("usage: bare_proxy LISTEN UPSTREAM PREFIX AUTHORIZATION"));
    };
    let target: &'static Target = Box::leak(Box::new(Target {
        upstream: upstream.clone(),
        prefix: prefix.clone(),
        authorization: HeaderValue::from_str(authorization).expect("a valid header value"),
    }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("bare_proxy listening on http://{}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let builder = Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let client = client.clone();
                async move { Ok::<_, Infallible>(forward(client, target, request).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
