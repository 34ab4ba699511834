//! What the agent presented never goes upstream: its credential headers, its key anywhere in
//! the request head, and the parameters and headers that would change the authorized call.
//!
//! Pure functions over the request head; the pipeline calls them before a credential is
//! resolved (refusals) and to build the outbound request (removals, injection, the upstream
//! URI, which rotation probes are addressed with too).

use std::borrow::Cow;

use axum::body::Body;
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, COOKIE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, Version};
use percent_encoding::percent_decode;

use crate::config::{CREDENTIAL_HEADERS, InjectSpec, RANGE_HEADERS, RouteConfig, Upstream};
use crate::credentials::Resolved;
use crate::error::ProxyError;
use crate::forward::{OutboundBody, limited_body, strip_hop_by_hop};
use crate::inject;

/// Headers that some upstream frameworks use to change the method or path after the fact, which
/// would let an agent run a call its grant does not cover.
pub const OVERRIDE_HEADERS: [&str; 13] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-forwarded-host",
    "x-forwarded-path",
    "x-forwarded-uri",
    "x-envoy-original-path",
    "forwarded",
];

/// The headers an AWS SDK signs a request with (SigV4), removed on a route that signs: keyward
/// signs the request itself, and nothing the agent signed with goes upstream.
pub const AWS_AUTH_HEADERS: [&str; 4] = ["authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

/// The query parameters of a presigned (query-signed) AWS request, removed on a route that signs.
pub const AWS_AUTH_QUERY: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Removes what an agent signed an AWS request with: the SigV4 headers, and the presigned-URL
/// parameters in any spelling (`inject::names_parameter`).
pub fn strip_aws_auth(headers: &mut HeaderMap, query: &mut Option<String>) {
    for name in AWS_AUTH_HEADERS {
        headers.remove(name);
    }
    if let Some(text) = query.as_deref() {
        let kept: Vec<&str> = text
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter(|pair| {
                !pair.split(';').any(|part| AWS_AUTH_QUERY.iter().any(|name| inject::names_parameter(part, name)))
            })
            .collect();
        *query = (!kept.is_empty()).then(|| kept.join("&"));
    }
}

/// Refuses a request whose path or query carries the agent's key (it would reach the upstream
/// in the request line), or whose query has a `_method` parameter.
pub fn check_url(uri: &Uri, agent_key: Option<&str>, route: &str) -> Result<(), ProxyError> {
    if let Some(key) = agent_key {
        let target = uri.path_and_query().map_or("", |p| p.as_str());
        if holds_key(target.as_bytes(), key) {
            return Err(ProxyError::AgentKeyInUrl { route: route.to_string() });
        }
    }
    if uri.query().is_some_and(|query| has_method_parameter(query.as_bytes())) {
        return Err(ProxyError::MethodOverride { route: route.to_string() });
    }
    Ok(())
}

/// Whether a form-encoded body (`a=1&b=2`) sets `_method`.
pub fn has_method_parameter(form: &[u8]) -> bool {
    form.split(|b| *b == b'&' || *b == b';').any(|pair| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        let name: Vec<u8> = name.iter().map(|b| if *b == b'+' { b' ' } else { *b }).collect();
        let name: Cow<[u8]> = percent_decode(&name).into();
        is_method_name(&name)
    })
}

/// `_method` in the spellings Rails, Laravel and Symfony read: any letter case, with an array
/// suffix, and with a leading `.`, space or `[`, which PHP turns into `_` in parameter names.
fn is_method_name(name: &[u8]) -> bool {
    let Some((first, rest)) = name.split_first() else { return false };
    let rest = rest.split(|b| *b == b'[').next().unwrap_or(rest);
    b"_. [".contains(first) && rest.eq_ignore_ascii_case(b"method")
}

/// Keys shorter than this are not searched for in other headers, cookies and the URL: a short
/// string would match ordinary text everywhere. keyward's own keys are 46 characters; the
/// headers a key is expected in are removed whatever their length.
pub const MIN_SEARCHED_KEY_LEN: usize = 8;

/// Whether `value` holds `key`, as is or percent-encoded.
fn holds_key(value: &[u8], key: &str) -> bool {
    let key = key.as_bytes();
    let contains = |haystack: &[u8]| haystack.windows(key.len()).any(|window| window == key);
    key.len() >= MIN_SEARCHED_KEY_LEN
        && (contains(value) || (value.contains(&b'%') && contains(&Cow::<[u8]>::from(percent_decode(value)))))
}

/// Removes every header whose name `doomed` picks. The request's few headers are looked at once,
/// instead of parsing and looking up each of the many names that could be removed.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&str) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|name| doomed(name.as_str())).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// Removes from `headers` every credential the agent presented: the route's agent key headers,
/// the usual credential headers (unless the route passes them through), `Range`/`If-Range`
/// (unless passed through), and then any header, or cookie, that still holds the agent's key.
pub fn strip_agent_credentials(headers: &mut HeaderMap, route: &RouteConfig, agent_key: Option<&str>) {
    for place in &route.agent_key {
        headers.remove(&place.header);
    }
    remove_where(headers, |name| {
        (CREDENTIAL_HEADERS.contains(&name) || RANGE_HEADERS.contains(&name))
            && !route.pass_headers.iter().any(|passed| passed == name)
    });
    let Some(key) = agent_key else { return };
    let cookies: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    if cookies.iter().any(|value| holds_key(value.as_bytes(), key)) {
        headers.remove(COOKIE);
        for value in cookies {
            let kept: Vec<&[u8]> = value
                .as_bytes()
                .split(|b| *b == b';')
                .map(|pair| pair.trim_ascii())
                .filter(|pair| !pair.is_empty() && !holds_key(pair, key))
                .collect();
            if !kept.is_empty()
                && let Ok(value) = HeaderValue::from_bytes(&kept.join(&b"; "[..]))
            {
                headers.append(COOKIE, value);
            }
        }
    }
    let holding: Vec<HeaderName> =
        headers.iter().filter(|(_, value)| holds_key(value.as_bytes(), key)).map(|(name, _)| name.clone()).collect();
    for name in holding {
        tracing::debug!(header = %name, "removed a header that held the agent key");
        headers.remove(name);
    }
}

/// The agent's request re-addressed to `upstream` (the route's, or on the forward proxy the
/// host the agent named): every credential the agent
/// presented and hop-by-hop headers removed, Host left for the client to set from the URI, and
/// the credential injected.
pub fn build_request(
    request: Request<Body>,
    route: &RouteConfig,
    upstream: &Upstream,
    raw_rest: &str,
    secret: &Resolved,
    agent_key: Option<&str>,
    body_limit: u64,
) -> Result<Request<OutboundBody>, ProxyError> {
    let (mut parts, body) = request.into_parts();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    strip_agent_credentials(headers, route, agent_key);
    // Framing is rebuilt by the client from the body; overrides could change what was authorized.
    remove_where(headers, |name| {
        name == HOST.as_str() || name == CONTENT_LENGTH.as_str() || OVERRIDE_HEADERS.contains(&name)
    });
    // Compressed answers could hide an echoed credential from the scrubber.
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let mut query = parts.uri.query().map(str::to_string);
    if route.inject == InjectSpec::Signed {
        strip_aws_auth(headers, &mut query);
    }
    inject::apply(&route.inject, &secret.value, headers, &mut query)?;
    parts.uri = upstream
        .uri(raw_rest, query.as_deref())
        .map_err(|_| ProxyError::Internal("could not build the upstream URI"))?;
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, limited_body(body, body_limit)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentKeySpec;

    const KEY: &str = "kw_agentKey0123";

    /// Removal compares these lists with `HeaderName::as_str`, which is lowercase.
    #[test]
    fn removed_header_lists_are_lowercase() {
        for name in CREDENTIAL_HEADERS.iter().chain(&RANGE_HEADERS).chain(&OVERRIDE_HEADERS).chain(&AWS_AUTH_HEADERS) {
            assert_eq!(*name, name.to_ascii_lowercase(), "{name}");
        }
    }

    fn route(pass: &[&str]) -> RouteConfig {
        let text = r#"
[[sources]]
name = "s"
provider = "env"
mapping = { S = "{{S}}" }
[[routes]]
name = "r"
prefix = "/r"
upstream = "https://api.example.com"
agent_key = { header = "x-api-key" }
inject = { header = "x-api-key", value = "{{secret}}" }
"#;
        let config = crate::config::load_str(text, "t.toml", false).unwrap_or_else(|e| panic!("{e}"));
        let mut route = config.routes[0].clone();
        route.agent_key.push(AgentKeySpec { header: HeaderName::from_static("x-agent"), schemes: vec![] });
        route.pass_headers = pass.iter().map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap()).collect();
        route
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<String> {
        map.iter().map(|(k, v)| format!("{k}: {}", v.to_str().unwrap())).collect()
    }

    #[test]
    fn credential_headers_and_the_key_anywhere_are_removed() {
        let mut map = headers(&[
            ("x-api-key", KEY),
            ("x-agent", "other"),
            ("authorization", "Bearer something-else"),
            ("proxy-authorization", "Bearer x"),
            ("api-key", "y"),
            ("x-goog-api-key", "z"),
            ("range", "bytes=0-3"),
            ("if-range", "\"etag\""),
            ("x-custom", &format!("prefix {KEY} suffix")),
            ("referer", "https://x.example/?k=kw%5FagentKey0123"),
            ("cookie", &format!("a=1; session={KEY}; b=2")),
            ("cookie", "c=3"),
            ("accept", "application/json"),
        ]);
        strip_agent_credentials(&mut map, &route(&[]), Some(KEY));
        assert_eq!(names(&map), ["accept: application/json", "cookie: a=1; b=2", "cookie: c=3"]);
    }

    #[test]
    fn passed_headers_stay_unless_they_hold_the_key() {
        let mut map = headers(&[("authorization", "Bearer upstream-own"), ("range", "bytes=0-3"), ("api-key", KEY)]);
        strip_agent_credentials(&mut map, &route(&["authorization", "range", "api-key"]), Some(KEY));
        assert_eq!(names(&map), ["authorization: Bearer upstream-own", "range: bytes=0-3"]);
    }

    #[test]
    fn aws_signing_headers_and_presigned_parameters_are_removed() {
        let mut map = headers(&[
            ("authorization", "AWS4-HMAC-SHA256 Credential=kw_x/20260101/us-east-1/bedrock/aws4_request"),
            ("x-amz-date", "20260101T000000Z"),
            ("X-Amz-Security-Token", "agent-token"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ("content-type", "application/json"),
            ("x-amz-target", "kept"),
        ]);
        let mut query = Some(
            "a=1&X-Amz-Algorithm=AWS4-HMAC-SHA256&x-amz-credential=k%2F1&X-Amz-Date=1&X-Amz-Expires=60&\
             X-Amz-SignedHeaders=host&%58-Amz-Signature=ab&X-Amz-Security-Token=t&b=2"
                .to_string(),
        );
        strip_aws_auth(&mut map, &mut query);
        let mut left = names(&map);
        left.sort();
        assert_eq!(left, ["content-type: application/json", "x-amz-target: kept"]);
        assert_eq!(query.as_deref(), Some("a=1&b=2"));
        let mut only = Some("X-Amz-Signature=ab".to_string());
        strip_aws_auth(&mut HeaderMap::new(), &mut only);
        assert_eq!(only, None);
    }

    #[test]
    fn the_key_or_method_override_in_the_url_is_refused() {
        let check = |uri: &str| check_url(&uri.parse().unwrap(), Some(KEY), "r").map_err(|e| e.code());
        assert_eq!(check("/v1/x?a=1"), Ok(()));
        assert_eq!(check(&format!("/v1/x?key={KEY}")), Err("agent_key_in_url"));
        assert_eq!(check("/v1/x?key=kw%5FagentKey%30123"), Err("agent_key_in_url"));
        assert_eq!(check(&format!("/v1/{KEY}/x")), Err("agent_key_in_url"));
        for query in ["_method=DELETE", "a=1&_METHOD=put", "%5Fmethod=DELETE", "_method[]=x", ".method=x", "+method=x"]
        {
            assert_eq!(check(&format!("/v1/x?{query}")), Err("method_override_refused"), "{query}");
        }
        for query in ["method=DELETE", "x_method=1", "_methods=1", "a=_method"] {
            assert_eq!(check(&format!("/v1/x?{query}")), Ok(()), "{query}");
        }
        assert_eq!(check_url(&"/v1/x?k=1".parse().unwrap(), None, "r"), Ok(()));
        // A key too short to search for is not matched in ordinary text.
        assert_eq!(check_url(&"/v1/abc?abc=1".parse().unwrap(), Some("abc"), "r"), Ok(()));
    }

    #[test]
    fn the_upstream_uri_is_the_base_path_then_the_rest_then_the_query() {
        let upstream = |base: &str| Upstream {
            scheme: http::uri::Scheme::HTTPS,
            authority: "api.example.com:8443".parse().unwrap(),
            base_path: base.to_string(),
        };
        let uri = |base: &str, path: &str, query: Option<&str>| upstream(base).uri(path, query).unwrap();
        assert_eq!(uri("/base", "/v1/x", Some("a=1&b=%20")), "https://api.example.com:8443/base/v1/x?a=1&b=%20");
        assert_eq!(uri("", "/v1/x", None), "https://api.example.com:8443/v1/x");
        assert_eq!(uri("/base", "", None), "https://api.example.com:8443/base");
        assert_eq!(uri("", "", Some("q=1")), "https://api.example.com:8443/?q=1", "an empty path is '/'");
        assert!(upstream("").uri("/a b", None).is_err(), "not a valid path");
    }
}
