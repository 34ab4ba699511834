//! `[server]`, `[forward]` and `[admin]`: the listeners, the outbound client's limits and the
//! admin API token.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::super::raw::{OneOrMany, RawAdmin, RawForward, RawServer};
use super::super::{AdminConfig, ForwardConfig, ServerConfig};
use super::{Collector, ms};

pub(super) fn server(c: &mut Collector<'_>, raw: RawServer) -> ServerConfig {
    let (listen, listen_unix) = listeners(c, raw.listen);
    let unix_socket_mode = match raw.unix_socket_mode.as_deref() {
        None => 0o660,
        Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                c.problem("server.unix_socket_mode", format!("'{text}' is not an octal file mode like \"0660\""));
                0o660
            }
        },
    };
    if raw.unix_socket_mode.is_some() && listen_unix.is_none() {
        c.problem("server.unix_socket_mode", "is only used with listen = \"unix:/path\"");
    }
    let server = ServerConfig {
        listen,
        listen_unix,
        unix_socket_mode,
        admin_listen: socket_addr(c, "server.admin_listen", raw.admin_listen, "127.0.0.1:9090"),
        header_read_timeout: ms(raw.header_read_timeout_ms, 10_000),
        max_header_bytes: raw.max_header_bytes.unwrap_or(64 * 1024),
        access_log: raw.access_log.unwrap_or(true),
        shutdown_grace: ms(raw.shutdown_grace_ms, 10_000),
        park_idle_after: ms(raw.park_idle_after_ms, 1_000),
        max_connections: raw.max_connections.unwrap_or(16_384),
    };
    if server.max_connections == 0 {
        c.problem("server.max_connections", "must be greater than 0");
    }
    if server.header_read_timeout.is_zero() {
        c.problem("server.header_read_timeout_ms", "must be greater than 0");
    }
    if server.park_idle_after.is_zero() {
        c.problem("server.park_idle_after_ms", "must be greater than 0");
    }
    if server.max_header_bytes < 8192 {
        c.problem("server.max_header_bytes", "must be at least 8192");
    }
    server
}

pub(super) fn forward(c: &mut Collector<'_>, raw: RawForward) -> ForwardConfig {
    let forward = ForwardConfig {
        connect_timeout: ms(raw.connect_timeout_ms, 5_000),
        read_timeout: ms(raw.read_timeout_ms, 120_000),
        total_timeout: ms(raw.total_timeout_ms, 900_000),
        max_request_body_bytes: raw.max_request_body_bytes.unwrap_or(32 * 1024 * 1024),
        pool_idle_timeout: ms(raw.pool_idle_timeout_ms, 90_000),
        pool_max_idle_per_host: raw.pool_max_idle_per_host.unwrap_or(64),
        retry_body_bytes: raw.retry_body_bytes.unwrap_or(64 * 1024),
    };
    for (field, value) in [
        ("forward.connect_timeout_ms", forward.connect_timeout),
        ("forward.read_timeout_ms", forward.read_timeout),
        ("forward.total_timeout_ms", forward.total_timeout),
    ] {
        if value.is_zero() {
            c.problem(field, "must be greater than 0");
        }
    }
    forward
}

pub(super) fn admin(c: &mut Collector<'_>, raw: RawAdmin) -> AdminConfig {
    let mut admin = AdminConfig::default();
    if let Some(text) = &raw.token_sha256 {
        let mut hash = [0u8; 32];
        if text.len() == 64 && hex::decode_to_slice(text, &mut hash).is_ok() {
            admin.token_sha256 = Some(hash);
        } else {
            c.problem("admin.token_sha256", "must be 64 hex characters (see `keyward admin token`)");
        }
    }
    admin
}

fn socket_addr(c: &mut Collector<'_>, field: &str, value: Option<String>, default: &str) -> SocketAddr {
    let text = value.unwrap_or_else(|| default.to_string());
    text.parse().unwrap_or_else(|_| {
        c.problem(field, format!("'{text}' is not an address like 127.0.0.1:8080"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// `listen`: a TCP address, `unix:/path`, or a list with at most one of each.
fn listeners(c: &mut Collector<'_>, raw: Option<OneOrMany>) -> (Option<SocketAddr>, Option<PathBuf>) {
    let entries = raw.map(OneOrMany::into_vec).unwrap_or_else(|| vec!["127.0.0.1:8080".to_string()]);
    let (mut tcp, mut unix) = (None, None);
    if entries.is_empty() {
        c.problem("server.listen", "needs at least one address");
    }
    for text in entries {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                c.problem(
                    "server.listen",
                    format!("'{text}': the socket path must be absolute, like unix:/run/keyward/keyward.sock"),
                );
            } else if unix.replace(PathBuf::from(path)).is_some() {
                c.problem("server.listen", "at most one unix: socket");
            }
        } else {
            let addr = socket_addr(c, "server.listen", Some(text), "");
            if tcp.replace(addr).is_some() {
                c.problem("server.listen", "at most one TCP address");
            }
        }
    }
    (tcp, unix)
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn server_forward_and_admin_problems_are_reported_with_their_lines() {
        check(&[
            (
                "a valid Unix-socket listener",
                "[server]\nlisten = \"unix:/run/k.sock\"\nunix_socket_mode = \"0600\"\n",
                &[],
            ),
            (
                "a listen address that is not one",
                "[server]\nlisten = \"nope\"\n",
                &["k.toml:2: server.listen: 'nope' is not an address like 127.0.0.1:8080"],
            ),
            (
                "a relative socket and two TCP addresses",
                "[server]\nlisten = [\"unix:k.sock\", \"127.0.0.1:1\", \"127.0.0.1:2\"]\n",
                &[
                    "k.toml:2: server.listen: 'unix:k.sock': the socket path must be absolute, like unix:/run/keyward/keyward.sock",
                    "k.toml:2: server.listen: at most one TCP address",
                ],
            ),
            ("no listener at all", "[server]\nlisten = []\n", &["k.toml:2: server.listen: needs at least one address"]),
            (
                "a socket mode without a socket, and one that is not octal",
                "[server]\nunix_socket_mode = \"999\"\n",
                &[
                    "k.toml:2: server.unix_socket_mode: '999' is not an octal file mode like \"0660\"",
                    "k.toml:2: server.unix_socket_mode: is only used with listen = \"unix:/path\"",
                ],
            ),
            (
                "zero limits",
                "[server]\nmax_connections = 0\nheader_read_timeout_ms = 0\npark_idle_after_ms = 0\nmax_header_bytes = 100\n",
                &[
                    "k.toml:2: server.max_connections: must be greater than 0",
                    "k.toml:3: server.header_read_timeout_ms: must be greater than 0",
                    "k.toml:4: server.park_idle_after_ms: must be greater than 0",
                    "k.toml:5: server.max_header_bytes: must be at least 8192",
                ],
            ),
            (
                "zero outbound timeouts",
                "[forward]\nconnect_timeout_ms = 0\nread_timeout_ms = 0\ntotal_timeout_ms = 0\n",
                &[
                    "k.toml:2: forward.connect_timeout_ms: must be greater than 0",
                    "k.toml:3: forward.read_timeout_ms: must be greater than 0",
                    "k.toml:4: forward.total_timeout_ms: must be greater than 0",
                ],
            ),
            (
                "a bad admin address and token hash",
                "[server]\nadmin_listen = \"localhost\"\n[admin]\ntoken_sha256 = \"abc\"\n",
                &[
                    "k.toml:2: server.admin_listen: 'localhost' is not an address like 127.0.0.1:8080",
                    "k.toml:4: admin.token_sha256: must be 64 hex characters (see `keyward admin token`)",
                ],
            ),
        ]);
    }
}
