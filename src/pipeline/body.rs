//! The request body stages: refused before anything is read when declared too large, read
//! whole where a check or a signature needs it, and kept for one replay of a refused credential.

use super::*;

/// Refuses a body declared larger than the limit, and a form body that sets `_method`.
pub(super) async fn check_body(request: Request<Body>, limit: u64, route: &str) -> Result<Request<Body>, ProxyError> {
    if declared_length(&request).is_some_and(|len| len > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    refuse_form_method_override(request, limit, route).await
}

/// A request kept whole, to be sent again.
pub(super) struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: http::HeaderMap,
    body: bytes::Bytes,
}

impl Replay {
    pub(super) fn into_request(self) -> Request<Body> {
        let mut request = Request::new(Body::from(self.body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        request
    }
}

/// Reads up to `limit` bytes of the body before any credential is released, so a small body can
/// be replayed and a malformed one (broken chunked framing) is refused with 400 while nothing has
/// gone out. A body declared larger than `limit` is not read ahead; one that turns out larger
/// streams on after the bytes read (not replayable), still held to `max_body` bytes.
pub(super) async fn keep_for_replay(
    request: Request<Body>,
    limit: u64,
    max_body: u64,
) -> Result<(Request<Body>, Option<Replay>), ProxyError> {
    use http_body_util::BodyExt;
    if limit == 0 || declared_length(&request).is_some_and(|len| len > limit) {
        return Ok((request, None));
    }
    let (parts, mut body) = request.into_parts();
    let mut kept = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers are not forwarded; only data is kept.
        let Ok(data) = frame.map_err(|_| ProxyError::BadBody)?.into_data() else { continue };
        kept.extend_from_slice(&data);
        if kept.len() as u64 > max_body {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
        if kept.len() as u64 > limit {
            // Larger than a replay may keep: what was read goes first, the rest streams after it.
            use futures_util::StreamExt;
            let read = futures_util::stream::once(std::future::ready(Ok(kept.freeze())));
            let body = Body::from_stream(read.chain(body.into_data_stream()));
            return Ok((Request::from_parts(parts, body), None));
        }
    }
    let body = kept.freeze();
    let replay = Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    Ok((Request::from_parts(parts, Body::from(body)), Some(replay)))
}

/// Reads the whole body (at most `limit` bytes), for a request that is signed over its hash or
/// metered (its model and token limits read).
pub(super) async fn whole_body(
    request: Request<Body>,
    limit: u64,
) -> Result<(Request<Body>, bytes::Bytes), ProxyError> {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, limit as usize).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => return Err(ProxyError::BodyTooLarge { limit }),
        Err(_) => return Err(ProxyError::BadBody),
    };
    Ok((Request::from_parts(parts, Body::from(body.clone())), body))
}

/// A form-encoded body is read whole (it is bounded by the body limit, and such bodies are small
/// form posts) and refused if it sets `_method`, which Rails, Laravel and Symfony honour as the
/// request's method. Other bodies stream through unread: multipart uploads, JSON, and bodies
/// without a `Content-Type` (which Rack also parses as a form); SECURITY.md lists the gap.
async fn refuse_form_method_override(
    request: Request<Body>,
    limit: u64,
    route: &str,
) -> Result<Request<Body>, ProxyError> {
    let is_form = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
    if !is_form {
        return Ok(request);
    }
    let (request, body) = whole_body(request, limit).await?;
    if outbound::has_method_parameter(&body) {
        return Err(ProxyError::MethodOverride { route: route.to_string() });
    }
    Ok(request)
}

pub(super) fn declared_length(request: &Request<Body>) -> Option<u64> {
    request.headers().get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
