//! Hosts on the forward-proxy listener: the canonical form of a host name, which route answers
//! for a host, and what kind of address a CONNECT target is. Pure: no DNS, no I/O.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

/// `text` as keyward compares hosts: lowercase, an IPv6 literal without brackets. `Err` says
/// why it is not a host name or an IP address (a port, a wildcard, a path, an empty label...).
pub fn canonical_host(text: &str) -> Result<String, &'static str> {
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let host = text.to_ascii_lowercase();
    if host.is_empty() || host.len() > 253 {
        return Err("must be a host name of 1 to 253 characters");
    }
    if host.contains(':') {
        return Err("must be a host name without a port (ports go in `ports`)");
    }
    if host.contains('*') {
        return Err("wildcards are not supported; list each host");
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err("must be a host name like api.github.com (letters, digits, '-' and dots)");
        }
    }
    Ok(host)
}

/// What a CONNECT target that no route names is, for the refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    /// A name, not an address.
    Name,
    /// Cloud metadata (169.254.169.254, fd00:ec2::254) or another link-local address.
    Metadata,
    /// 127.0.0.0/8, ::1, 0.0.0.0, ::.
    Loopback,
    /// RFC 1918, CGNAT 100.64/10, unique-local fc00::/7.
    Private,
    /// Any other IP literal.
    Public,
}

/// Classifies `host` (canonical form). Also used on the addresses a tunnel host resolves to:
/// a blind tunnel only ever reaches `Public` addresses.
pub fn address_kind(host: &str) -> AddressKind {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip_kind(ip),
        Err(_) if host == "localhost" || host.ends_with(".localhost") => AddressKind::Loopback,
        Err(_) => AddressKind::Name,
    }
}

pub fn ip_kind(ip: IpAddr) -> AddressKind {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_link_local() {
                AddressKind::Metadata
            } else if v4.is_loopback() || v4.is_unspecified() || a == 0 {
                AddressKind::Loopback
            } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) || v4.is_broadcast() {
                AddressKind::Private
            } else {
                AddressKind::Public
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped().or_else(|| embedded_ipv4(v6)) {
                return ip_kind(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if (first & 0xffc0) == 0xfe80 || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                AddressKind::Metadata
            } else if v6.is_loopback() || v6.is_unspecified() {
                AddressKind::Loopback
            } else if (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfec0 {
                AddressKind::Private
            } else {
                AddressKind::Public
            }
        }
    }
}

/// The IPv4 address an IPv6 address carries to an IPv4 host: NAT64 (`64:ff9b::/96`,
/// `64:ff9b:1::/48`), 6to4 (`2002::/16`) and the deprecated IPv4-compatible form (`::a.b.c.d`).
/// Such an address is as public or private as the IPv4 address it reaches.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let low = |hi: u16, lo: u16| Some(std::net::Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8));
    match s {
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => low(hi, lo),
        [0x64, 0xff9b, 1, ..] => low(s[6], s[7]),
        [0x2002, hi, lo, ..] => low(hi, lo),
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) > (0, 1) => low(hi, lo),
        _ => None,
    }
}

/// Which route answers for a host on the forward proxy, and on which ports.
#[derive(Debug, Clone, Default)]
pub struct HostTable {
    hosts: HashMap<String, usize>,
}

impl HostTable {
    /// `routes` yields each route's index and its (canonical) hosts; a host is named once.
    pub fn new<'a>(routes: impl IntoIterator<Item = (usize, &'a [String])>) -> HostTable {
        let mut hosts = HashMap::new();
        for (index, names) in routes {
            for name in names {
                hosts.entry(name.clone()).or_insert(index);
            }
        }
        HostTable { hosts }
    }

    /// The index of the route that names `host` (canonical form).
    pub fn find(&self, host: &str) -> Option<usize> {
        self.hosts.get(host).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_in_one_form() {
        assert_eq!(canonical_host("API.GitHub.com"), Ok("api.github.com".into()));
        assert_eq!(canonical_host("[::1]"), Ok("::1".into()));
        assert_eq!(canonical_host("127.0.0.1"), Ok("127.0.0.1".into()));
        for bad in ["", "a..b", "-a.com", "a-.com", "*.github.com", "api.github.com:443", "a/b", "a b", "x.com."] {
            assert!(canonical_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn address_kinds() {
        let cases = [
            ("api.github.com", AddressKind::Name),
            ("localhost", AddressKind::Loopback),
            ("a.localhost", AddressKind::Loopback),
            ("169.254.169.254", AddressKind::Metadata),
            ("fd00:ec2::254", AddressKind::Metadata),
            ("fe80::1", AddressKind::Metadata),
            ("::ffff:169.254.169.254", AddressKind::Metadata),
            ("127.0.0.1", AddressKind::Loopback),
            ("0.0.0.0", AddressKind::Loopback),
            ("::1", AddressKind::Loopback),
            ("10.1.2.3", AddressKind::Private),
            ("192.168.0.1", AddressKind::Private),
            ("172.16.0.1", AddressKind::Private),
            ("100.64.0.1", AddressKind::Private),
            ("fd12::1", AddressKind::Private),
            ("93.184.216.34", AddressKind::Public),
            ("2606:4700::1111", AddressKind::Public),
            // IPv6 forms that reach an IPv4 host are as private as that host.
            ("64:ff9b::a00:5", AddressKind::Private),
            ("64:ff9b::5db8:d822", AddressKind::Public),
            ("64:ff9b:1::a9fe:a9fe", AddressKind::Metadata),
            ("2002:a00:5::1", AddressKind::Private),
            ("::7f00:1", AddressKind::Loopback),
            ("fec0::1", AddressKind::Private),
        ];
        for (host, kind) in cases {
            assert_eq!(address_kind(host), kind, "{host}");
        }
    }

    #[test]
    fn the_host_table_finds_the_route_that_names_a_host() {
        let a = ["api.github.com".to_string()];
        let b = ["github.com".to_string(), "codeload.github.com".to_string()];
        let table = HostTable::new([(0, &a[..]), (2, &b[..])]);
        assert_eq!(table.find("api.github.com"), Some(0));
        assert_eq!(table.find("codeload.github.com"), Some(2));
        assert_eq!(table.find("evil.github.com"), None);
    }
}
