//! Request-target checks and the route table: which route a path belongs to, and the rest of it.
//!
//! The whole path is validated before any prefix match, so traversal and encoding tricks never
//! reach prefix matching, grant matching or the upstream.

use std::borrow::Cow;

use http::{Method, Uri, Version};
use percent_encoding::percent_decode_str;
use unicode_normalization::UnicodeNormalization;

use crate::error::ProxyError;

/// A path that passed validation: `raw` is forwarded as it came, `decoded` is matched against grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedPath<'a> {
    pub raw: &'a str,
    pub decoded: Cow<'a, str>,
}

/// Refuses absolute-form and authority-form targets: keyward only serves origin-form paths.
/// HTTP/2 always carries `:scheme` and `:authority`, so only HTTP/1 targets are checked for form.
/// TRACE and TRACK are refused because an upstream answering them echoes the injected credential.
pub fn check_target(method: &Method, version: Version, uri: &Uri) -> Result<(), ProxyError> {
    if method == Method::CONNECT {
        return Err(ProxyError::BadTarget("CONNECT is not supported; keyward is not a tunnel"));
    }
    if method == Method::TRACE || method.as_str() == "TRACK" {
        return Err(ProxyError::BadTarget("TRACE and TRACK would echo credentials and are not supported"));
    }
    if version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(ProxyError::BadTarget("absolute-form targets are not accepted; send an origin-form path"));
    }
    Ok(())
}

/// Characters that look like separators or dots without normalising to them under NFKC
/// (U+2215 DIVISION SLASH, U+2044 FRACTION SLASH, U+29F5 REVERSE SOLIDUS OPERATOR): some
/// upstreams fold them by hand-made tables.
const LOOKALIKES: [char; 3] = ['\u{2215}', '\u{2044}', '\u{29F5}'];

/// Whether NFKC turns some character of `decoded` into '.', '/' or '\' (U+2025 '‥' → "..",
/// U+FE30 '︰' → "..", U+2100 '℀' → "a/c", U+FF0F '／' → "/", ...): an upstream that normalises
/// would see a traversal or a separator that the grant check never saw. NFKC never removes
/// those ASCII characters, so more of them after normalisation means some were introduced.
fn normalises_to_separator(decoded: &str) -> bool {
    if decoded.is_ascii() {
        return false;
    }
    let special = |c: &char| matches!(c, '.' | '/' | '\\');
    decoded.nfkc().filter(special).count() > decoded.chars().filter(special).count()
}

/// Validates a raw request path and decodes it once.
///
/// Refused: a missing leading '/', backslashes, empty inner segments (`//`), dot segments in any
/// spelling (`..`, `%2e%2e`, `..;x`), encoded separators (`%2f`, `%5c`), encoded '%' (double
/// encoding), control bytes, and bytes that do not decode to UTF-8 (overlong forms).
pub fn check_path(raw: &str) -> Result<CheckedPath<'_>, ProxyError> {
    if !raw.starts_with('/') {
        return Err(ProxyError::BadPath("must start with '/'"));
    }
    if raw.contains('\\') {
        return Err(ProxyError::BadPath("backslashes are not allowed"));
    }
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let value = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            match value {
                None => return Err(ProxyError::BadPath("malformed percent-encoding")),
                Some(b'/') | Some(b'\\') => return Err(ProxyError::BadPath("encoded path separators are not allowed")),
                Some(b'%') => return Err(ProxyError::BadPath("double percent-encoding is not allowed")),
                Some(v) if v < 0x20 || v == 0x7f => {
                    return Err(ProxyError::BadPath("encoded control bytes are not allowed"));
                }
                Some(_) => {}
            }
        } else if *b < 0x20 || *b == 0x7f {
            return Err(ProxyError::BadPath("control bytes are not allowed"));
        } else if *b >= 0x80 {
            return Err(ProxyError::BadPath("non-ASCII bytes must be percent-encoded"));
        }
    }
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| ProxyError::BadPath("percent-encoded bytes are not valid UTF-8"))?;
    if decoded.contains(LOOKALIKES) || normalises_to_separator(&decoded) {
        return Err(ProxyError::BadPath("characters that normalise to '.', '/' or '\\' are not allowed"));
    }
    let inner = &decoded[1..];
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    if !inner.is_empty() {
        for seg in inner.split('/') {
            if seg.is_empty() {
                return Err(ProxyError::BadPath("empty path segments ('//') are not allowed"));
            }
            let name = seg.split(';').next().unwrap_or(seg).trim();
            if name == "." || name == ".." {
                return Err(ProxyError::BadPath("dot segments are not allowed"));
            }
        }
    }
    Ok(CheckedPath { raw, decoded })
}

/// Route prefixes, longest first, so `/openai/v2` wins over `/openai` when both exist.
#[derive(Debug, Clone)]
pub struct RouteTable {
    entries: Vec<(String, usize)>,
}

/// A matched route and the path below its prefix (`""` or starting with '/').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch<'a> {
    pub route: usize,
    pub raw_rest: &'a str,
    pub rest: Cow<'a, str>,
}

impl RouteTable {
    pub fn new<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> RouteTable {
        RouteTable::with_indexes(prefixes.into_iter().enumerate())
    }

    /// Prefixes with the index of their route (routes without a prefix are left out).
    pub fn with_indexes<'a>(prefixes: impl IntoIterator<Item = (usize, &'a str)>) -> RouteTable {
        let mut entries: Vec<(String, usize)> = prefixes.into_iter().map(|(i, p)| (p.to_string(), i)).collect();
        entries.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        RouteTable { entries }
    }

    /// Matches on whole segments: `/openai-evil/x` does not match `/openai`.
    pub fn find<'a>(&self, path: &CheckedPath<'a>) -> Option<RouteMatch<'a>> {
        self.entries.iter().find_map(|(prefix, route)| {
            let raw_rest = below(path.raw, prefix)?;
            let rest = match &path.decoded {
                Cow::Borrowed(d) => Cow::Borrowed(below(d, prefix)?),
                Cow::Owned(d) => Cow::Owned(below(d, prefix)?.to_string()),
            };
            Some(RouteMatch { route: *route, raw_rest, rest })
        })
    }
}

fn below<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Whether `host` (a name, an IPv4 address or a bracketed IPv6 address) is this machine.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_in_every_spelling_is_refused() {
        for bad in [
            "/openai/../admin",
            "/openai/./v1",
            "/openai/%2e%2e/x",
            "/openai/%2E%2e/x",
            "/openai/.%2e/x",
            "/openai/%252e%252e/x",
            "/openai/..%2fx",
            "/openai/a%5cb",
            "/openai\\..\\x",
            "/openai//v1",
            "/openai/%c0%ae%c0%ae/x",
            "/openai/%00",
            "/openai/..;/x",
            "/openai/%zz",
            "openai/v1",
            "/openai/..",
            "/openai/..%20/x",
            "/openai/%EF%BC%8E%EF%BC%8E/x",
            "/openai/a%EF%BC%8Fb",
            "/openai/caf\u{e9}",
            // Compatibility forms that NFKC turns into "..", or into text containing '/'.
            "/github/repos/%E2%80%A5/orgs/x",
            "/github/repos/%EF%B8%B0/orgs/x",
            "/github/repos/%E2%84%80",
            "/github/repos/%E2%84%81",
            "/github/repos/%E2%84%85",
            "/github/repos/%E2%84%86",
            "/github/repos/o/r%E2%80%A4txt",
            "/github/repos/%E2%80%A6",
            "/github/repos/%E2%88%95x",
        ] {
            assert!(check_path(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn ordinary_paths_pass_and_decode_once() {
        let p = check_path("/github/repos/o/my%20repo/").unwrap();
        assert_eq!(p.decoded, "/github/repos/o/my repo/");
        assert!(check_path("/openai/v1/chat/completions").is_ok());
        assert!(check_path("/a/.well-known/x").is_ok());
        assert!(check_path("/").is_ok());
        assert_eq!(check_path("/github/repos/o/caf%C3%A9").unwrap().decoded, "/github/repos/o/café");
        // Non-ASCII that NFKC changes is fine as long as no '.', '/' or '\\' appears: a
        // decomposed "café.txt", a ligature, full-width letters.
        assert!(check_path("/github/repos/o/cafe%CC%81.txt").is_ok());
        assert!(check_path("/github/repos/o/%EF%AC%81le").is_ok());
        assert!(check_path("/github/repos/o/%EF%BC%A1").is_ok());
    }

    #[test]
    fn prefixes_match_whole_segments_longest_first() {
        let table = RouteTable::new(["/openai", "/openai/v2", "/github"]);
        let find = |p: &str| table.find(&check_path(p).unwrap()).map(|m| (m.route, m.rest.to_string()));
        assert_eq!(find("/openai/v1/models"), Some((0, "/v1/models".into())));
        assert_eq!(find("/openai/v2/x"), Some((1, "/x".into())));
        assert_eq!(find("/openai"), Some((0, "".into())));
        assert_eq!(find("/openai-evil/v1"), None);
        assert_eq!(find("/githubx"), None);
        assert_eq!(find("/"), None);
    }

    #[test]
    fn absolute_form_and_connect_are_refused() {
        let abs: Uri = "http://evil.example/openai/v1".parse().unwrap();
        assert!(check_target(&Method::GET, Version::HTTP_11, &abs).is_err());
        // HTTP/2 requests always carry scheme and authority pseudo-headers.
        assert!(check_target(&Method::GET, Version::HTTP_2, &abs).is_ok());
        let path: Uri = "/openai/v1".parse().unwrap();
        assert!(check_target(&Method::CONNECT, Version::HTTP_11, &path).is_err());
        assert!(check_target(&Method::CONNECT, Version::HTTP_2, &path).is_err());
        assert!(check_target(&Method::TRACE, Version::HTTP_11, &path).is_err());
        assert!(check_target(&Method::from_bytes(b"TRACK").unwrap(), Version::HTTP_11, &path).is_err());
        assert!(check_target(&Method::POST, Version::HTTP_11, &path).is_ok());
    }
}
