//! `[[routes]]`: prefix → upstream (and the hosts they answer for on the forward proxy, see `hosts`), where the agent key comes from, what is injected, and the
//! probe that tests a rotated credential.

use http::HeaderName;

use super::super::raw::{OneOrMany, RawAgentKeys, RawInject, RawProbe, RawRoute};
use super::super::{
    AgentKeySpec, CREDENTIAL_HEADERS, InjectSpec, Probe, RANGE_HEADERS, RouteConfig, Template, TemplatePart, Upstream,
};
use super::{Collector, check_unique, delegation, valid_name};

pub(super) fn routes(c: &mut Collector<'_>, raw: Vec<RawRoute>) -> Vec<RouteConfig> {
    let routes: Vec<RouteConfig> =
        raw.into_iter().enumerate().filter_map(|(i, r)| route(c, &format!("routes[{i}]"), r)).collect();
    check_unique(
        c,
        routes.iter().enumerate().map(|(i, r)| (format!("routes[{i}].name"), r.name.clone())),
        "route name",
    );
    check_unique(
        c,
        routes.iter().enumerate().filter_map(|(i, r)| Some((format!("routes[{i}].prefix"), r.prefix.clone()?))),
        "route prefix",
    );
    check_unique(
        c,
        routes.iter().enumerate().flat_map(|(i, r)| {
            r.hosts.iter().enumerate().map(move |(j, h)| (format!("routes[{i}].hosts[{j}]"), h.clone()))
        }),
        "route host",
    );
    routes
}

fn route(c: &mut Collector<'_>, at: &str, r: RawRoute) -> Option<RouteConfig> {
    if !valid_name(&r.name) {
        c.problem(format!("{at}.name"), "use letters, digits, '-', '_', '.' or ':' (1-128 characters)");
    }
    if let Some(prefix) = &r.prefix {
        let prefix_ok = prefix.starts_with('/')
            && prefix.len() > 1
            && !prefix.ends_with('/')
            && prefix[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.~".contains(ch))
            });
        delegation::reserved_prefix(c, at, prefix);
        if !prefix_ok {
            c.problem(
                format!("{at}.prefix"),
                "must look like \"/name\" or \"/a/b\": no trailing slash, no dot segments",
            );
        }
    }
    let hosts = super::hosts::route_hosts(c, at, &r.hosts, r.ports.as_deref());
    let reverse = r.prefix.is_some();
    if !reverse && r.hosts.is_empty() {
        c.problem(
            format!("{at}.prefix"),
            "missing field `prefix`: a route needs a `prefix` (reverse proxy), `hosts` (forward proxy), or both",
        );
    }
    let upstream = match (&r.upstream, hosts.names.first()) {
        (Some(text), _) => match upstream(text, r.allow_plaintext) {
            Ok(u) => Some(u),
            Err(e) => {
                c.problem(format!("{at}.upstream"), e);
                None
            }
        },
        // A forward-only route goes to the host the agent named; probes use its first host.
        (None, Some(host)) if !reverse => Some(super::hosts::host_upstream(host, hosts.ports[0])),
        (None, _) => {
            if reverse {
                c.problem(format!("{at}.upstream"), "missing field `upstream`");
            }
            // A stand-in (the route has problems already), so grants on this route are not
            // reported as naming no route.
            Some(super::hosts::host_upstream("invalid", 443))
        }
    };
    let agent_key = match r.agent_key {
        Some(raw) => agent_key_places(c, at, raw),
        None if reverse => {
            c.problem(format!("{at}.agent_key"), "missing field `agent_key`");
            Some(Vec::new())
        }
        None => Some(Vec::new()),
    };
    let pass_headers = pass_headers(c, at, r.pass_headers, agent_key.as_deref().unwrap_or_default());
    // No inject: the route's secrets sign the request (checked against its grants in `roles`).
    let inject = match r.inject {
        Some(raw) => inject(c, &format!("{at}.inject"), raw),
        None => Some(InjectSpec::Signed),
    };
    let validate = r.validate.and_then(|p| probe(c, &format!("{at}.validate"), p));
    let connect_to = r.connect_to.as_deref().and_then(|text| super::hosts::connect_to(c, at, text));
    let upstream_roots = r.upstream_ca_file.as_deref().map(|f| super::hosts::roots(c, at, f)).unwrap_or_default();
    if (connect_to.is_some() || r.ports.is_some()) && hosts.names.is_empty() {
        let field = if connect_to.is_some() { "connect_to" } else { "ports" };
        c.problem(format!("{at}.{field}"), "is only used with `hosts`");
    }
    if validate.is_some() && inject == Some(InjectSpec::Signed) {
        c.problem(
            format!("{at}.validate"),
            "a route without an inject signs its requests; rotation probes are not signed, so remove the probe",
        );
    }
    Some(RouteConfig {
        name: r.name,
        prefix: r.prefix,
        upstream: upstream?,
        agent_key: agent_key?,
        hosts: hosts.names,
        ports: hosts.ports,
        connect_to,
        upstream_roots,
        pass_headers,
        inject: inject?,
        scrub_responses: r.scrub_responses,
        validate,
    })
}

/// `agent_key`: one place or a non-empty list of places, each a header with optional schemes.
fn agent_key_places(c: &mut Collector<'_>, at: &str, raw: RawAgentKeys) -> Option<Vec<AgentKeySpec>> {
    let one = matches!(raw, RawAgentKeys::One(_));
    let raw = raw.into_vec();
    if raw.is_empty() {
        c.problem(format!("{at}.agent_key"), "lists no place: give at least one { header = ... }");
        return None;
    }
    let mut places = Vec::with_capacity(raw.len());
    let mut complete = true;
    for (i, place) in raw.into_iter().enumerate() {
        let field = if one { format!("{at}.agent_key") } else { format!("{at}.agent_key[{i}]") };
        let header = header_name(c, &format!("{field}.header"), &place.header);
        let schemes = place.scheme.map(OneOrMany::into_vec).unwrap_or_default();
        for (j, scheme) in schemes.iter().enumerate() {
            if scheme.is_empty() || !scheme.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch)) {
                c.problem(format!("{field}.scheme[{j}]"), format!("'{scheme}' is not an auth scheme like Bearer"));
            }
        }
        let Some(header) = header else {
            complete = false;
            continue;
        };
        // A header read two ways is ambiguous: is `Bearer x` the bare key "Bearer x"?
        if places.iter().any(|p: &AgentKeySpec| p.header == header) {
            c.problem(
                format!("{field}.header"),
                format!("'{header}' is listed twice: give one place with a list of schemes instead"),
            );
            continue;
        }
        places.push(AgentKeySpec { header, schemes });
    }
    complete.then_some(places)
}

/// `pass_headers`: headers keyward removes by default that this route forwards anyway. Only
/// such headers may be named, and never one that carries the agent key on this route.
fn pass_headers(c: &mut Collector<'_>, at: &str, raw: Vec<String>, agent_key: &[AgentKeySpec]) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let field = format!("{at}.pass_headers[{i}]");
        let Ok(name) = HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()) else {
            c.problem(field, format!("'{text}' is not a header name"));
            continue;
        };
        if agent_key.iter().any(|place| place.header == name) || name == http::header::PROXY_AUTHORIZATION {
            c.problem(field, format!("'{name}' carries the agent key on this route and is never forwarded"));
        } else if !CREDENTIAL_HEADERS.contains(&name.as_str()) && !RANGE_HEADERS.contains(&name.as_str()) {
            let removable = CREDENTIAL_HEADERS.iter().chain(&RANGE_HEADERS).filter(|h| **h != "proxy-authorization");
            c.problem(
                field,
                format!(
                    "'{name}' is forwarded anyway; only these removed headers can be passed: {}",
                    removable.copied().collect::<Vec<_>>().join(", ")
                ),
            );
        } else {
            out.push(name);
        }
    }
    out
}

fn probe(c: &mut Collector<'_>, at: &str, p: RawProbe) -> Option<Probe> {
    let method = http::Method::from_bytes(p.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| c.problem(format!("{at}.method"), format!("'{}' is not an HTTP method", p.method)))
        .ok()?;
    if !p.path.starts_with('/') || p.path.parse::<http::uri::PathAndQuery>().is_err() {
        c.problem(format!("{at}.path"), format!("'{}' must be a path starting with '/'", p.path));
        return None;
    }
    if p.expect.is_empty() || p.expect.iter().any(|s| !(100..600).contains(s)) {
        c.problem(format!("{at}.expect"), "must list HTTP status codes, like [200]");
        return None;
    }
    Some(Probe { method, path: p.path, expect: p.expect })
}

/// Headers whose meaning belongs to the connection or to framing: never an agent key or an
/// injection target.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "cookie",
    "expect",
];

fn header_name(c: &mut Collector<'_>, field: &str, text: &str) -> Option<HeaderName> {
    let name = HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes())
        .map_err(|_| c.problem(field, format!("'{text}' is not a header name")))
        .ok()?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        c.problem(field, format!("'{name}' is a connection or framing header and cannot be used here"));
        return None;
    }
    Some(name)
}

fn upstream(text: &str, allow_plaintext: bool) -> Result<Upstream, String> {
    let uri: http::Uri = text.parse().map_err(|_| format!("'{text}' is not a URL"))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| format!("'{text}' needs a scheme (https:// or http://)"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("'{text}': only http and https upstreams are supported"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("'{text}' has no host"))?;
    if authority.as_str().contains('@') {
        return Err("must not carry user info; use inject for credentials".to_string());
    }
    if uri.query().is_some() {
        return Err("must not carry a query string".to_string());
    }
    if scheme == http::uri::Scheme::HTTP && !allow_plaintext && !crate::policy::is_loopback_host(authority.host()) {
        return Err(format!(
            "'{text}' would send credentials in cleartext; use https, or set allow_plaintext = true on this route"
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream { scheme, authority, base_path })
}

fn template(c: &mut Collector<'_>, field: &str, text: &str) -> Template {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else { break };
        let name = rest[start + 2..start + len].trim();
        if name != "secret" {
            c.problem(field, format!("unknown placeholder '{{{{{name}}}}}': only {{{{secret}}}} is supported"));
        }
        if start > 0 {
            parts.push(TemplatePart::Literal(rest[..start].to_string()));
        }
        parts.push(TemplatePart::Secret);
        rest = &rest[start + len + 2..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest.to_string()));
    }
    let printable = |text: &str| text.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    if parts.iter().any(|p| matches!(p, TemplatePart::Literal(text) if !printable(text))) {
        c.problem(field, "may only hold printable ASCII around {{secret}}");
    }
    Template { parts }
}

fn inject(c: &mut Collector<'_>, at: &str, i: RawInject) -> Option<InjectSpec> {
    let chosen = [i.header.is_some(), i.query.is_some(), i.basic.is_some()].iter().filter(|b| **b).count();
    if chosen != 1 {
        c.problem(at, "set exactly one of `header`, `query` or `basic`");
        return None;
    }
    let value = i.value.as_deref().unwrap_or("{{secret}}");
    let uses_secret = |t: &Template| t.parts.contains(&TemplatePart::Secret);
    let spec = if let Some(header) = i.header {
        let name = header_name(c, &format!("{at}.header"), &header)?;
        InjectSpec::Header { name, value: template(c, &format!("{at}.value"), value) }
    } else if let Some(query) = i.query {
        if query.is_empty() || !query.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            c.problem(format!("{at}.query"), format!("'{query}' is not a plain query parameter name"));
        }
        InjectSpec::Query { name: query, value: template(c, &format!("{at}.value"), value) }
    } else {
        let basic = i.basic?;
        if i.value.is_some() {
            c.problem(format!("{at}.value"), "is not used with `basic`; template `username` and `password` instead");
        }
        InjectSpec::Basic {
            username: template(c, &format!("{at}.basic.username"), &basic.username),
            password: template(c, &format!("{at}.basic.password"), &basic.password),
        }
    };
    let injects_secret = match &spec {
        InjectSpec::Header { value, .. } | InjectSpec::Query { value, .. } => uses_secret(value),
        InjectSpec::Basic { username, password } => uses_secret(username) || uses_secret(password),
        InjectSpec::Signed => true,
    };
    if !injects_secret {
        c.problem(at, "never uses {{secret}}, so no credential would be injected");
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn route_problems_are_reported_with_their_lines() {
        check(&[
            (
                "a valid route",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[],
            ),
            (
                "a bad name and prefix",
                "[[routes]]\nname = \"a b\"\nprefix = \"/r/\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[
                    "k.toml:2: routes[0].name: use letters, digits, '-', '_', '.' or ':' (1-128 characters)",
                    "k.toml:3: routes[0].prefix: must look like \"/name\" or \"/a/b\": no trailing slash, no dot segments",
                ],
            ),
            (
                "a cleartext upstream",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"http://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[
                    "k.toml:4: routes[0].upstream: 'http://x.example' would send credentials in cleartext; use https, or set allow_plaintext = true on this route",
                ],
            ),
            (
                "cleartext to loopback is fine",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"http://127.0.0.1:9\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[],
            ),
            (
                "an upstream with user info",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://u:p@x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &["k.toml:4: routes[0].upstream: must not carry user info; use inject for credentials"],
            ),
            (
                "an upstream with a query",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example/?a=1\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &["k.toml:4: routes[0].upstream: must not carry a query string"],
            ),
            (
                "an upstream of another scheme",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"ftp://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &["k.toml:4: routes[0].upstream: 'ftp://x.example': only http and https upstreams are supported"],
            ),
            (
                "two injections",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", query = \"key\" }\n",
                &["k.toml:6: routes[0].inject: set exactly one of `header`, `query` or `basic`"],
            ),
            (
                "an unknown placeholder",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{token}}\" }\n",
                &["k.toml:6: routes[0].inject.value: unknown placeholder '{{token}}': only {{secret}} is supported"],
            ),
            (
                "a framing header as the target",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"content-length\", value = \"Bearer {{secret}}\" }\n",
                &[
                    "k.toml:6: routes[0].inject.header: 'content-length' is a connection or framing header and cannot be used here",
                ],
            ),
            (
                "a query name that is not plain",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { query = \"a&b\" }\n",
                &["k.toml:6: routes[0].inject.query: 'a&b' is not a plain query parameter name"],
            ),
            (
                "basic with a value",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { basic = { username = \"u\", password = \"{{secret}}\" }, value = \"x\" }\n",
                &[
                    "k.toml:6: routes[0].inject.value: is not used with `basic`; template `username` and `password` instead",
                ],
            ),
            (
                "a probe with a bad method",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\nvalidate = { method = \"GE T\", path = \"/v1/models\" }\n",
                &["k.toml:7: routes[0].validate.method: 'GE T' is not an HTTP method"],
            ),
            (
                "a probe with a relative path",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\nvalidate = { path = \"v1/models\" }\n",
                &["k.toml:7: routes[0].validate.path: 'v1/models' must be a path starting with '/'"],
            ),
            (
                "a probe expecting nothing",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\nvalidate = { path = \"/v1/models\", expect = [] }\n",
                &["k.toml:7: routes[0].validate.expect: must list HTTP status codes, like [200]"],
            ),
            (
                "duplicate names and prefixes",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[
                    "k.toml:8: routes[1].name: duplicate route name 'r' (first at routes[0].name)",
                    "k.toml:9: routes[1].prefix: duplicate route prefix '/r' (first at routes[0].prefix)",
                ],
            ),
        ]);
    }
}
