//! The forward-proxy side of the config: `[forward_proxy]` (listener, CA files, tunnel hosts,
//! leaf validity) and a route's `hosts`, `ports`, `connect_to` and `upstream_ca_file`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::super::raw::RawForwardProxy;
use super::super::{ForwardProxyConfig, Upstream};
use super::{Collector, check_unique};
use crate::policy::canonical_host;

/// A route's hosts (canonical) and ports, as validated.
pub(super) struct RouteHosts {
    pub names: Vec<String>,
    pub ports: Vec<u16>,
}

pub(super) fn route_hosts(c: &mut Collector<'_>, at: &str, raw: &[String], ports: Option<&[u16]>) -> RouteHosts {
    let mut names = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        match canonical_host(text) {
            Ok(host) => names.push(host),
            Err(why) => c.problem(format!("{at}.hosts[{i}]"), format!("'{text}' {why}")),
        }
    }
    let ports = match ports {
        None => vec![443],
        Some([]) => {
            c.problem(format!("{at}.ports"), "lists no port: leave it out for the default [443]");
            vec![443]
        }
        Some(list) => {
            if list.contains(&0) {
                c.problem(format!("{at}.ports"), "0 is not a port");
            }
            list.to_vec()
        }
    };
    RouteHosts { names, ports }
}

/// The upstream of a forward-only route for its rotation probes: `https://host[:port]`.
pub(super) fn host_upstream(host: &str, port: u16) -> Upstream {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    let authority = if port == 443 { host } else { format!("{host}:{port}") };
    Upstream {
        scheme: http::uri::Scheme::HTTPS,
        authority: authority.parse().unwrap_or_else(|_| http::uri::Authority::from_static("invalid")),
        base_path: String::new(),
    }
}

pub(super) fn connect_to(c: &mut Collector<'_>, at: &str, text: &str) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Some(addr),
        _ => {
            c.problem(format!("{at}.connect_to"), format!("'{text}' is not an address like 127.0.0.1:8443"));
            None
        }
    }
}

/// The certificates of a PEM file, as trust anchors for a route's upstream.
pub(super) fn roots(c: &mut Collector<'_>, at: &str, written: &str) -> Vec<CertificateDer<'static>> {
    let field = format!("{at}.upstream_ca_file");
    let path = c.path(written);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            c.problem(field, format!("cannot read '{}': {e}", path.display()));
            return Vec::new();
        }
    };
    match CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => {
            let mut store = rustls::RootCertStore::empty();
            let (_, unusable) = store.add_parsable_certificates(certs.iter().cloned());
            if unusable > 0 {
                c.problem(
                    field,
                    format!("'{}' holds {unusable} certificate(s) that are not valid CA certificates", path.display()),
                );
            }
            certs
        }
        Ok(_) => {
            c.problem(field, format!("'{}' holds no PEM certificate", path.display()));
            Vec::new()
        }
        Err(e) => {
            c.problem(field, format!("'{}' is not valid PEM: {e}", path.display()));
            Vec::new()
        }
    }
}

/// `[forward_proxy]`. The CA files default to `forward-ca.pem` and `forward-ca.key` beside the
/// audit file (keyward's state directory).
pub(super) fn forward_proxy(
    c: &mut Collector<'_>,
    raw: Option<RawForwardProxy>,
    audit_path: &Path,
) -> Option<ForwardProxyConfig> {
    let raw = raw?;
    let listen = match raw.listen.as_deref() {
        None => {
            c.problem("forward_proxy.listen", "missing field `listen`: give an address like 127.0.0.1:8081");
            None
        }
        Some(text) => text
            .parse::<SocketAddr>()
            .map_err(|_| c.problem("forward_proxy.listen", format!("'{text}' is not an address like 127.0.0.1:8081")))
            .ok(),
    };
    let state_dir = audit_path.parent().unwrap_or(Path::new(""));
    let ca_cert_file = raw.ca_cert_file.as_deref().map_or_else(|| state_dir.join("forward-ca.pem"), |f| c.path(f));
    let ca_key_file = raw.ca_key_file.as_deref().map_or_else(|| state_dir.join("forward-ca.key"), |f| c.path(f));
    if raw.ca_cert_file.is_some() != raw.ca_key_file.is_some() {
        let missing = if raw.ca_cert_file.is_some() { "ca_key_file" } else { "ca_cert_file" };
        c.problem(format!("forward_proxy.{missing}"), "set both `ca_cert_file` and `ca_key_file`, or neither");
    }
    if ca_cert_file == ca_key_file {
        c.problem("forward_proxy.ca_key_file", "must be another file than `ca_cert_file`");
    }
    let mut tunnel_hosts: Vec<(usize, (String, u16))> = Vec::new();
    for (i, text) in raw.tunnel_hosts.iter().enumerate() {
        let field = format!("forward_proxy.tunnel_hosts[{i}]");
        let (host, port) = split_host_port(text);
        let Some(port) = port else {
            c.problem(field, format!("'{text}': the port must be a number from 1 to 65535"));
            continue;
        };
        match canonical_host(host) {
            Ok(host) => tunnel_hosts.push((i, (host, port))),
            Err(why) => c.problem(field, format!("'{text}' {why}")),
        }
    }
    check_unique(
        c,
        tunnel_hosts.iter().map(|(i, (h, p))| (format!("forward_proxy.tunnel_hosts[{i}]"), format!("{h}:{p}"))),
        "tunnel host",
    );
    let tunnel_hosts = tunnel_hosts.into_iter().map(|(_, hp)| hp).collect();
    let hours = raw.leaf_validity_hours.unwrap_or(24);
    if !(1..=24 * 90).contains(&hours) {
        c.problem("forward_proxy.leaf_validity_hours", "must be from 1 to 2160 (90 days)");
    }
    Some(ForwardProxyConfig {
        listen: listen?,
        ca_cert_file,
        ca_key_file,
        tunnel_hosts,
        leaf_validity: Duration::from_secs(hours.clamp(1, 24 * 90) * 3600),
    })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` (a bare IPv6 address has no port); the port is
/// 443 unless given, `None` when it is not a port.
fn split_host_port(text: &str) -> (&str, Option<u16>) {
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    if let Some(rest) = text.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, "")) => (host, Some(443)),
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(port)),
            None => (text, Some(443)),
        };
    }
    match text.split_once(':') {
        Some((host, p)) if !p.contains(':') => (host, port(p)),
        _ => (text, Some(443)),
    }
}

/// A host both intercepted (a route names it) and passed through untouched is a mistake.
pub(super) fn tunnels_against_routes(
    c: &mut Collector<'_>,
    forward: &ForwardProxyConfig,
    routes: &[super::super::RouteConfig],
) {
    for (i, (host, _)) in forward.tunnel_hosts.iter().enumerate() {
        if let Some(route) = routes.iter().find(|r| r.hosts.contains(host)) {
            c.problem(
                format!("forward_proxy.tunnel_hosts[{i}]"),
                format!("'{host}' is also named by route '{}': a host is either intercepted or tunnelled", route.name),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    const ROUTE: &str =
        "[[routes]]\nname = \"gh\"\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n";

    #[test]
    fn forward_proxy_and_route_host_problems_are_reported_with_their_lines() {
        let with = |extra: &str| format!("{ROUTE}{extra}");
        check(&[
            ("a host-only route", &with("hosts = [\"api.github.com\"]\n"), &[]),
            (
                "a host-only route with everything",
                &with(
                    "hosts = [\"API.github.com\", \"127.0.0.1\"]\nports = [443, 8443]\nconnect_to = \"127.0.0.1:9443\"\n",
                ),
                &[],
            ),
            (
                "neither prefix nor hosts",
                ROUTE,
                &[
                    "k.toml:1: routes[0].prefix: missing field `prefix`: a route needs a `prefix` (reverse proxy), `hosts` (forward proxy), or both",
                ],
            ),
            (
                "a prefix without upstream or agent key",
                &with("prefix = \"/gh\"\n"),
                &[
                    "k.toml:1: routes[0].upstream: missing field `upstream`",
                    "k.toml:1: routes[0].agent_key: missing field `agent_key`",
                ],
            ),
            (
                "bad hosts",
                &with("hosts = [\"*.github.com\", \"api.github.com:443\", \"a..b\"]\n"),
                &[
                    "k.toml:4: routes[0].hosts[0]: '*.github.com' wildcards are not supported; list each host",
                    "k.toml:4: routes[0].hosts[1]: 'api.github.com:443' must be a host name without a port (ports go in `ports`)",
                    "k.toml:4: routes[0].hosts[2]: 'a..b' must be a host name like api.github.com (letters, digits, '-' and dots)",
                ],
            ),
            (
                "bad ports and connect_to",
                &with("hosts = [\"api.github.com\"]\nports = []\nconnect_to = \"localhost:1\"\n"),
                &[
                    "k.toml:5: routes[0].ports: lists no port: leave it out for the default [443]",
                    "k.toml:6: routes[0].connect_to: 'localhost:1' is not an address like 127.0.0.1:8443",
                ],
            ),
            (
                "connect_to without hosts",
                "[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\nconnect_to = \"127.0.0.1:9\"\n",
                &["k.toml:7: routes[0].connect_to: is only used with `hosts`"],
            ),
            (
                "a missing upstream CA file",
                &with("hosts = [\"api.github.com\"]\nupstream_ca_file = \"/nonexistent/ca.pem\"\n"),
                &[
                    "k.toml:5: routes[0].upstream_ca_file: cannot read '/nonexistent/ca.pem': No such file or directory (os error 2)",
                ],
            ),
            (
                "a host named by two routes",
                &format!("{}{ROUTE}hosts = [\"api.github.com\"]\n", with("hosts = [\"api.github.com\"]\n")).replacen(
                    "name = \"gh\"",
                    "name = \"gh2\"",
                    1,
                ),
                &["k.toml:8: routes[1].hosts[0]: duplicate route host 'api.github.com' (first at routes[0].hosts[0])"],
            ),
            (
                "a forward proxy",
                "[forward_proxy]\nlisten = \"127.0.0.1:8081\"\ntunnel_hosts = [\"pypi.org\", \"files.pythonhosted.org:8443\"]\n",
                &[],
            ),
            (
                "forward proxy problems",
                "[forward_proxy]\nlisten = \"nope\"\nca_cert_file = \"ca.pem\"\ntunnel_hosts = [\"a..b\", \"x.org:99999\", \"pypi.org\", \"pypi.org:443\"]\nleaf_validity_hours = 0\n",
                &[
                    "k.toml:1: forward_proxy.ca_key_file: set both `ca_cert_file` and `ca_key_file`, or neither",
                    "k.toml:2: forward_proxy.listen: 'nope' is not an address like 127.0.0.1:8081",
                    "k.toml:4: forward_proxy.tunnel_hosts[0]: 'a..b' must be a host name like api.github.com (letters, digits, '-' and dots)",
                    "k.toml:4: forward_proxy.tunnel_hosts[1]: 'x.org:99999': the port must be a number from 1 to 65535",
                    "k.toml:4: forward_proxy.tunnel_hosts[3]: duplicate tunnel host 'pypi.org:443' (first at forward_proxy.tunnel_hosts[2])",
                    "k.toml:5: forward_proxy.leaf_validity_hours: must be from 1 to 2160 (90 days)",
                ],
            ),
            (
                "no listen",
                "[forward_proxy]\n",
                &["k.toml:1: forward_proxy.listen: missing field `listen`: give an address like 127.0.0.1:8081"],
            ),
            (
                "a host both intercepted and tunnelled",
                &format!(
                    "[forward_proxy]\nlisten = \"127.0.0.1:8081\"\ntunnel_hosts = [\"api.github.com\"]\n{}",
                    with("hosts = [\"api.github.com\"]\n")
                ),
                &[
                    "k.toml:3: forward_proxy.tunnel_hosts[0]: 'api.github.com' is also named by route 'gh': a host is either intercepted or tunnelled",
                ],
            ),
        ]);
    }
}
