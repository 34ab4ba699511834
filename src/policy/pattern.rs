//! Grant matchers: method sets and path patterns with whole-segment `*` and `**` wildcards.

use crate::suggest::suggest;
use http::Method;

/// The methods a grant may name: the HTTP methods of RFC 9110 and PATCH, and the WebDAV ones in
/// IANA's method registry (CONNECT and TRACE are refused separately).
pub const GRANTABLE_METHODS: [&str; 18] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "OPTIONS",
    "QUERY",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    "MERGE",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodSet {
    Any,
    Only(Vec<Method>),
}

impl Default for MethodSet {
    fn default() -> Self {
        MethodSet::none()
    }
}

impl MethodSet {
    pub fn none() -> MethodSet {
        MethodSet::Only(Vec::new())
    }

    /// `["*"]` grants every method; otherwise each entry is an HTTP method token, case-insensitive.
    pub fn parse(items: &[String]) -> Result<MethodSet, String> {
        if items.is_empty() {
            return Err("grants no method: list at least one, or \"*\" for all".to_string());
        }
        if items.iter().any(|m| m == "*") {
            return if items.len() == 1 { Ok(MethodSet::Any) } else { Err("\"*\" must stand alone".to_string()) };
        }
        let mut methods = Vec::new();
        for item in items {
            let upper = item.to_ascii_uppercase();
            if matches!(upper.as_str(), "CONNECT" | "TRACE" | "TRACK") {
                return Err(format!("{upper} cannot be granted: keyward is not a tunnel and does not echo requests"));
            }
            if !GRANTABLE_METHODS.contains(&upper.as_str()) {
                // Any token is a valid method to `http`, so a typo like "GTE" would grant nothing.
                let hint = match suggest(&upper, GRANTABLE_METHODS) {
                    Some(near) => format!("did you mean \"{near}\"?"),
                    None => format!("use one of {}, or \"*\"", GRANTABLE_METHODS.join(", ")),
                };
                return Err(format!("'{item}' is not an HTTP method keyward knows; {hint}"));
            }
            let method = Method::from_bytes(upper.as_bytes()).map_err(|_| format!("'{item}' is not an HTTP method"))?;
            methods.push(method);
        }
        Ok(MethodSet::Only(methods))
    }

    /// Whether every method `other` allows is also allowed here.
    pub fn covers(&self, other: &MethodSet) -> bool {
        match (self, other) {
            (MethodSet::Any, _) => true,
            (MethodSet::Only(_), MethodSet::Any) => false,
            (MethodSet::Only(mine), MethodSet::Only(theirs)) => theirs.iter().all(|m| mine.contains(m)),
        }
    }

    pub fn allows(&self, method: &Method) -> bool {
        match self {
            MethodSet::Any => true,
            MethodSet::Only(methods) => methods.contains(method),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments.
    Any,
}

/// A path pattern relative to the route prefix, such as `/repos/**` or `/v1/models/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<PathPattern, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("'{text}' must start with '/'"));
        };
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for seg in rest.split('/') {
                segments.push(match seg {
                    "*" => Segment::One,
                    "**" => Segment::Any,
                    "" => return Err(format!("'{text}' has an empty segment")),
                    "." | ".." => return Err(format!("'{text}' has a dot segment")),
                    s if s.contains('*') => {
                        return Err(format!("'{text}': '*' and '**' must be whole segments"));
                    }
                    s => Segment::Literal(s.to_string()),
                });
            }
        }
        Ok(PathPattern { text: text.to_string(), segments })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether every path `other` matches is also matched by `self` (for narrowing delegated
    /// rights). Conservative: when in doubt, it says no.
    pub fn covers(&self, other: &PathPattern) -> bool {
        covers(&self.segments, &other.segments)
    }

    /// Matches a validated, decoded path (no dot segments, no empty inner segments).
    pub fn matches(&self, path: &str) -> bool {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let parts: Vec<&str> = if trimmed.is_empty() { Vec::new() } else { trimmed.split('/').collect() };
        match_segments(&self.segments, &parts)
    }
}

fn covers(wide: &[Segment], narrow: &[Segment]) -> bool {
    match wide.split_first() {
        None => narrow.is_empty(),
        // `**` may stand for nothing, or absorb the narrow pattern's next segment of any kind.
        Some((Segment::Any, rest)) => covers(rest, narrow) || (!narrow.is_empty() && covers(wide, &narrow[1..])),
        Some((Segment::One, rest)) => match narrow.first() {
            Some(Segment::Literal(_) | Segment::One) => covers(rest, &narrow[1..]),
            _ => false,
        },
        Some((Segment::Literal(lit), rest)) => match narrow.first() {
            Some(Segment::Literal(other)) if other == lit => covers(rest, &narrow[1..]),
            _ => false,
        },
    }
}

fn match_segments(pattern: &[Segment], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((Segment::Any, rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((Segment::One, rest)) => !path.is_empty() && match_segments(rest, &path[1..]),
        Some((Segment::Literal(lit), rest)) => path.first() == Some(&lit.as_str()) && match_segments(rest, &path[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_known_tokens_with_a_suggestion_for_typos() {
        let cases: [(&[&str], Result<&str, &str>); 8] = [
            (&["GET", "post"], Ok("Only([GET, POST])")),
            (&["*"], Ok("Any")),
            (&["PROPFIND"], Ok("Only([PROPFIND])")),
            (&["GTE"], Err("'GTE' is not an HTTP method keyward knows; did you mean \"GET\"?")),
            (&["POTS"], Err("'POTS' is not an HTTP method keyward knows; did you mean \"POST\"?")),
            (&["delet"], Err("'delet' is not an HTTP method keyward knows; did you mean \"DELETE\"?")),
            (&["FROB"], Err("'FROB' is not an HTTP method keyward knows; use one of GET, HEAD, POST")),
            (&["TRACE"], Err("TRACE cannot be granted")),
        ];
        for (items, expected) in cases {
            let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
            match (MethodSet::parse(&items), expected) {
                (Ok(set), Ok(want)) => assert_eq!(format!("{set:?}"), want, "{items:?}"),
                (Err(error), Err(want)) => assert!(error.starts_with(want), "{items:?}: {error}"),
                (got, want) => panic!("{items:?}: {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn patterns_match_whole_segments() {
        let cases = [
            ("/v1/chat/completions", "/v1/chat/completions", true),
            ("/v1/chat/completions", "/v1/chat/completions/", true),
            ("/v1/chat/completions", "/v1/chat/completions/x", false),
            ("/v1/chat/completions", "/v1/chat", false),
            ("/repos/**", "/repos/o/r/issues", true),
            ("/repos/**", "/repos", true),
            ("/repos/**", "/reposx/a", false),
            ("/v1/models/*", "/v1/models/gpt", true),
            ("/v1/models/*", "/v1/models", false),
            ("/v1/models/*", "/v1/models/a/b", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all", true),
            ("/", "/", true),
            ("/", "", true),
            ("/a/**/c", "/a/b/b/c", true),
            ("/a/**/c", "/a/c", true),
            ("/a/**/c", "/a/b/d", false),
        ];
        for (pattern, path, expect) in cases {
            assert_eq!(PathPattern::parse(pattern).unwrap().matches(path), expect, "{pattern} vs {path}");
        }
    }

    #[test]
    fn coverage_between_patterns() {
        let cases = [
            ("/**", "/v1/chat/completions", true),
            ("/**", "/**", true),
            ("/repos/**", "/repos/o/*/pulls", true),
            ("/repos/**", "/repos/**", true),
            ("/repos/**", "/**", false),
            ("/repos/*", "/repos/x", true),
            ("/repos/*", "/repos/*", true),
            ("/repos/*", "/repos/**", false),
            ("/repos/*", "/repos/x/y", false),
            ("/v1/chat/completions", "/v1/chat/completions", true),
            ("/v1/chat/completions", "/v1/chat/*", false),
            ("/v1/chat/completions", "/v1/files", false),
            ("/a/**/c", "/a/b/c", true),
            ("/a/**/c", "/a/**/c", true),
            ("/a/**/c", "/a/b/d", false),
        ];
        for (wide, narrow, expect) in cases {
            let (w, n) = (PathPattern::parse(wide).unwrap(), PathPattern::parse(narrow).unwrap());
            assert_eq!(w.covers(&n), expect, "{wide} covers {narrow}");
        }
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["v1", "/a//b", "/a/../b", "/a*", "/a/b*c"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn method_sets() {
        let set = MethodSet::parse(&["post".into(), "GET".into()]).unwrap();
        assert!(set.allows(&Method::POST));
        assert!(!set.allows(&Method::DELETE));
        assert!(MethodSet::parse(&["*".into()]).unwrap().allows(&Method::PATCH));
        assert!(MethodSet::parse(&[]).is_err());
        assert!(MethodSet::parse(&["CONNECT".into()]).is_err());
        assert!(MethodSet::parse(&["trace".into()]).is_err());
        assert!(MethodSet::parse(&["*".into(), "GET".into()]).is_err());
    }
}
