//! DNS for upstream connections that refuses link-local and cloud metadata addresses, so a host
//! name (or a DNS answer that changes later) cannot point keyward at 169.254.169.254.
//!
//! An upstream written as a literal IP address never reaches the resolver: naming the
//! metadata address explicitly in a route is the one way to allow it.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use tower_service::Service;

/// Whether connections to `ip` are refused when it came from DNS.
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_blocked(IpAddr::V4(v4));
            }
            let aws_metadata = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == aws_metadata || v6.is_unspecified()
        }
    }
}

#[derive(Clone)]
pub struct GuardedResolver {
    inner: GaiResolver,
}

impl Default for GuardedResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl GuardedResolver {
    pub fn new() -> GuardedResolver {
        GuardedResolver { inner: GaiResolver::new() }
    }
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.inner.call(name.clone());
        Box::pin(async move {
            let all: Vec<SocketAddr> = lookup.await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| !is_blocked(a.ip())).collect();
            if allowed.is_empty() && !all.is_empty() {
                tracing::warn!(host = %name, "upstream host resolves only to link-local or metadata addresses; refused");
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "resolves only to blocked addresses"));
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_addresses_are_blocked() {
        for blocked in
            ["169.254.169.254", "169.254.0.1", "fe80::1", "fd00:ec2::254", "::ffff:169.254.169.254", "0.0.0.0"]
        {
            assert!(is_blocked(blocked.parse().unwrap()), "{blocked}");
        }
        for allowed in ["127.0.0.1", "10.0.0.1", "93.184.216.34", "::1", "2606:4700::1111"] {
            assert!(!is_blocked(allowed.parse().unwrap()), "{allowed}");
        }
    }

    #[tokio::test]
    async fn localhost_still_resolves() {
        let mut resolver = GuardedResolver::new();
        let addrs: Vec<_> = resolver.call("localhost".parse().unwrap()).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        assert!(!addrs.is_empty());
    }
}
