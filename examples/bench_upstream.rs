//! A fast stand-in upstream for the load tests: `/json1k` answers a fixed 1 KiB JSON body,
//! `/stream16k` streams 16 KiB in 1 KiB chunks, `/sse?events=N&interval_ms=M` streams events,
//! and `/chat/completions` (and `/chat16k`, the same bytes on a path keyward does not meter)
//! streams about 16 KiB of chat completion chunks, one per write, ending with a usage chunk
//! and `data: [DONE]` (`/chat/completions?events=N&interval_ms=M`: N chunks M ms apart).
//!
//! Usage: `cargo run --release --example bench_upstream -- 127.0.0.1:18081`

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Exactly 1024 bytes of JSON.
fn json_1k() -> Bytes {
    let empty = r#"{"id":"bench","object":"ok","pad":""}"#;
    let body = format!(r#"{{"id":"bench","object":"ok","pad":"{}"}}"#, "x".repeat(1024 - empty.len()));
    assert_eq!(body.len(), 1024);
    Bytes::from(body)
}

/// About 16 KiB of chat completion chunks as OpenAI streams them with `include_usage`.
fn chat_16k() -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size < 16 * 1024 - 300 {
        let event = format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
        size += event.len();
        events.push(Bytes::from(event));
        i += 1;
    }
    events.push(Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{i},\"total_tokens\":{}}}}}\n\n",
        12 + i
    )));
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

async fn handle(request: Request<Incoming>, json: Bytes) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let query = request.uri().query().unwrap_or("").to_string();
    let param = |name: &str, default: u64| {
        query.split('&').find_map(|p| p.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(default)
    };
    let path = request.uri().path().to_string();
    // Drain the request body so keep-alive connections stay usable.
    let _ = request.into_body().collect().await;
    let paced = query.contains("events=");
    let response = if path.ends_with("/chat/completions") && paced {
        // Chat chunks `interval_ms` apart, then the usage chunk and [DONE]: for time to first event.
        let (events, interval) = (param("events", 50), param("interval_ms", 40));
        let stream = futures_util::stream::unfold(0u64, move |i| async move {
            if i > events + 1 {
                return None;
            }
            if i > 0 && i < events {
                tokio::time::sleep(Duration::from_millis(interval)).await;
            }
            let data = if i < events {
                format!(
                    "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}}}}],\"usage\":null}}\n\n"
                )
            } else if i == events {
                format!(
                    "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{events},\"total_tokens\":{}}}}}\n\n",
                    12 + events
                )
            } else {
                "data: [DONE]\n\n".to_string()
            };
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), i + 1))
        });
        Response::builder().header("content-type", "text/event-stream").body(BodyExt::boxed(StreamBody::new(stream)))
    } else if path.ends_with("/chat/completions") || path.ends_with("/chat16k") {
        let stream = futures_util::stream::iter(chat_16k().into_iter().map(|e| Ok::<_, Infallible>(Frame::data(e))));
        Response::builder().header("content-type", "text/event-stream").body(BodyExt::boxed(StreamBody::new(stream)))
    } else if path.ends_with("/stream16k") {
        let chunk = Bytes::from(vec![b'a'; 1024]);
        let stream = futures_util::stream::iter((0..16).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))));
        Response::builder()
            .header("content-type", "application/octet-stream")
            .body(BodyExt::boxed(StreamBody::new(stream)))
    } else if path.ends_with("/sse") {
        let (events, interval) = (param("events", 50), param("interval_ms", 40));
        let stream = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= events {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(interval)).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {{\"i\":{i}}}\n\n")))), i + 1))
        });
        Response::builder().header("content-type", "text/event-stream").body(BodyExt::boxed(StreamBody::new(stream)))
    } else {
        Response::builder().header("content-type", "application/json").body(Full::new(json).boxed())
    };
    Ok(response.expect("static response parts are valid"))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18081".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bench_upstream listening on http://{}", listener.local_addr()?);
    let json = json_1k();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let json = json.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |r| handle(r, json.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
