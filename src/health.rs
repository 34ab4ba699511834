//! `keyward health`: asks a running keyward's admin `/readyz` whether it is ready, so a container
//! health check needs no curl in the image.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The readiness URL for an admin listener: an unspecified bind address (0.0.0.0, ::) is asked
/// on loopback.
pub fn readyz_url(admin_listen: SocketAddr) -> String {
    let ip = match admin_listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/readyz", SocketAddr::new(ip, admin_listen.port()))
}

/// GETs `url` (plain HTTP) within `timeout`: `Ok` with the body on 200, `Err` saying why not.
pub async fn check(url: &str, timeout: Duration) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("'{url}' is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("'{url}': the admin listener speaks plain http"));
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let exchange = async {
        let response = client.get(uri).await.map_err(|e| format!("{url}: cannot connect: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|_| format!("{url}: the answer broke off"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).trim().to_string();
        if status == http::StatusCode::OK { Ok(body) } else { Err(format!("{url}: {} {body}", status.as_u16())) }
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_admin_addresses_are_asked_on_loopback() {
        assert_eq!(readyz_url("0.0.0.0:9090".parse().unwrap()), "http://127.0.0.1:9090/readyz");
        assert_eq!(readyz_url("[::]:9090".parse().unwrap()), "http://[::1]:9090/readyz");
        assert_eq!(readyz_url("10.0.0.5:9091".parse().unwrap()), "http://10.0.0.5:9091/readyz");
    }
}
