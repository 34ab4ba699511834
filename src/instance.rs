//! Starting and stopping a keyward instance: audit sink, runtime, listeners, secret warm-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{AuditEvent, AuditGuard, AuditSink};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::{self, ConnSettings, Observers, Unparsed};
use crate::state::{AppState, Runtime};

/// A started instance: where it listens, its state, and the handle to stop it.
pub struct Running {
    /// The agent listener on TCP, unless the config named only a Unix socket.
    pub proxy_addr: Option<SocketAddr>,
    /// The agent listener's Unix socket, if any; removed again at shutdown.
    pub proxy_unix: Option<PathBuf>,
    pub admin_addr: SocketAddr,
    /// The forward-proxy listener (`[forward_proxy]`), if configured.
    pub forward_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    shutdown_grace: std::time::Duration,
}

/// Opens the audit file, binds both listeners and starts serving. Secret sources are fetched in
/// the background; `/readyz` turns ready once each has answered.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::new());
    let audit = AuditSink::open(&config.audit, metrics.clone())
        .with_context(|| format!("cannot open the audit file {}", config.audit.path.display()))?;
    let runtime = Runtime::new(config, metrics.clone());
    start_with(runtime, Arc::new(audit), metrics).await
}

pub async fn start_with(runtime: Runtime, audit: Arc<AuditSink>, metrics: Arc<Metrics>) -> anyhow::Result<Running> {
    let server_config = runtime.config.server.clone();
    let agent_listeners = usize::from(server_config.listen.is_some())
        + usize::from(server_config.listen_unix.is_some())
        + usize::from(runtime.config.forward_proxy.is_some());
    let settings = ConnSettings {
        header_read_timeout: server_config.header_read_timeout,
        max_header_bytes: server_config.max_header_bytes,
        shutdown_grace: server_config.shutdown_grace,
        park_idle_after: server_config.park_idle_after,
        max_connections: fit_fd_budget(server_config.max_connections, agent_listeners),
    };
    let state = AppState::new(runtime, audit, metrics);
    // Revocations, quarantines and first uses are back before any request can be served.
    crate::persist::restore(&state).await?;
    let proxy_listener = match server_config.listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (server.listen)"))?)
        }
        None => None,
    };
    let unix_listener = match &server_config.listen_unix {
        Some(path) => Some(bind_unix(path, server_config.unix_socket_mode)?),
        None => None,
    };
    // The CA is loaded (or generated) before anything listens: a broken CA stops the start.
    let forward_proxy = match runtime_forward_proxy(&state) {
        Some(config) => {
            let ca = crate::server::forward::CertAuthority::load_or_create(
                &config.ca_cert_file,
                &config.ca_key_file,
                config.leaf_validity,
            )?;
            let listener = TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {} (forward_proxy.listen)", config.listen))?;
            Some((listener, Arc::new(ca)))
        }
        None => None,
    };
    let forward_addr = forward_proxy.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let admin_listener = TcpListener::bind(server_config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.admin_listen)", server_config.admin_listen))?;
    let proxy_addr = proxy_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let admin_addr = admin_listener.local_addr()?;
    let (shutdown, rx) = watch::channel(false);
    let admin_observers = Observers {
        parked: state.metrics.connections_parked.clone(),
        open: state.metrics.connections_open.clone(),
        refused: state.metrics.connections_refused.clone(),
        unparsed: None,
    };
    // On the agent listeners every attempt is audited, also one the HTTP parser refused.
    let audited = state.clone();
    let agent_observers = Observers {
        unparsed: Some(Arc::new(move |unparsed: Unparsed| {
            let runtime = audited.runtime.load();
            AuditGuard::unparsed(
                audited.audit.clone(),
                audited.metrics.clone(),
                runtime.secrets.scrubber_cell(),
                runtime.audit_metadata.clone(),
                unparsed.peer,
                &unparsed.error,
                runtime.config.server.access_log,
            );
        })),
        ..admin_observers.clone()
    };

    let mut tasks = vec![
        tokio::spawn(server::serve(
            admin_listener,
            server::App::Router(crate::admin::router(state.clone())),
            settings,
            admin_observers,
            rx.clone(),
        )),
        tokio::spawn(warm_up(state.clone(), rx.clone())),
        tokio::spawn(delegation_janitor(state.clone(), rx.clone())),
        tokio::spawn(crate::rotation::schedule::run(state.clone(), rx.clone())),
        tokio::spawn(shared_limits_poller(state.clone(), rx.clone())),
        tokio::spawn(crate::persist::run(state.clone(), rx.clone())),
    ];
    if let Some(listener) = proxy_listener {
        tasks.push(tokio::spawn(server::serve(
            listener,
            server::App::agent(state.clone()),
            settings,
            agent_observers.clone(),
            rx.clone(),
        )));
    }
    if let Some(listener) = unix_listener {
        tasks.push(tokio::spawn(server::serve(
            server::Listener::Unix(listener),
            server::App::agent(state.clone()),
            settings,
            agent_observers.clone(),
            rx.clone(),
        )));
    }
    if let Some((listener, ca)) = forward_proxy {
        tasks.push(tokio::spawn(crate::server::forward::serve(
            listener,
            state.clone(),
            ca,
            settings,
            state.metrics.connections_open.clone(),
            rx.clone(),
        )));
    }
    let proxy_unix = server_config.listen_unix.clone();
    let proxy = match (proxy_addr, &proxy_unix) {
        (Some(addr), Some(path)) => format!("http://{addr} unix:{}", path.display()),
        (Some(addr), None) => format!("http://{addr}"),
        (None, Some(path)) => format!("unix:{}", path.display()),
        (None, None) => "none".to_string(),
    };
    match forward_addr {
        Some(forward) => tracing::info!(proxy = %proxy, forward_proxy = %format!("http://{forward}"),
            admin = %format!("http://{admin_addr}"), "keyward listening"),
        None => tracing::info!(proxy = %proxy, admin = %format!("http://{admin_addr}"), "keyward listening"),
    }
    let shutdown_grace = settings.shutdown_grace;
    Ok(Running { proxy_addr, proxy_unix, admin_addr, forward_addr, state, shutdown, tasks, shutdown_grace })
}

fn runtime_forward_proxy(state: &AppState) -> Option<crate::config::ForwardProxyConfig> {
    state.runtime.load().config.forward_proxy.clone()
}

/// Descriptors kept aside for all but the agent connections: the audit file, the listeners,
/// pooled upstream connections beyond one per agent connection, Redis, secret stores, DNS.
const FD_RESERVE: u64 = 64;

/// Raises the soft limit on open files to the hard one, logs the budget, and returns
/// `max_connections` lowered if the listeners at their limit could exhaust it (each agent
/// connection may hold a second descriptor for its upstream; admin connections hold one).
fn fit_fd_budget(max_connections: usize, agent_listeners: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current;
    if soft.is_some() && soft != limit.maximum {
        let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = limit.maximum,
            Err(error) => tracing::warn!(%error, "cannot raise the soft limit on open files to the hard limit"),
        }
    }
    let Some(budget) = soft else {
        tracing::info!(max_connections, "file descriptors: no limit");
        return max_connections;
    };
    // The soft limit before it was raised, if it was.
    let raised_from = limit.current.filter(|&was| was != budget);
    let fitted = connections_that_fit(budget, max_connections, agent_listeners);
    if fitted == max_connections {
        tracing::info!(
            limit = budget,
            ?raised_from,
            max_connections,
            "file descriptors: enough for every listener at server.max_connections"
        );
    } else {
        tracing::warn!(
            limit = budget,
            ?raised_from,
            configured = max_connections,
            max_connections = fitted,
            "file descriptors: too few for server.max_connections on every listener; each listener now holds at \
             most max_connections (raise the limit with `ulimit -n` or systemd's LimitNOFILE to allow more)"
        );
    }
    fitted
}

/// `max_connections`, or fewer if `agent_listeners` listeners and the admin listener, all at
/// that many connections, could run out of `budget` descriptors.
fn connections_that_fit(budget: u64, max_connections: usize, agent_listeners: usize) -> usize {
    let per_connection = 2 * agent_listeners as u64 + 1;
    if per_connection * max_connections as u64 + FD_RESERVE <= budget {
        return max_connections;
    }
    (budget.saturating_sub(FD_RESERVE) / per_connection).max(1) as usize
}

/// Binds the agent Unix socket with `mode`. A socket file left by an earlier run is replaced;
/// any other file at the path is an error.
fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot replace the old socket {} (server.listen)", path.display()))?,
        Ok(_) => anyhow::bail!("{} exists and is not a socket (server.listen)", path.display()),
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on unix:{} (server.listen)", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Fetches every secret source until all have answered once, backing off between rounds.
async fn warm_up(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(500);
    loop {
        let runtime = state.runtime.load_full();
        if runtime.secrets.warm_up().await == 0 {
            tracing::info!("all secret sources reached; ready");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Once a second: records each delegation that has expired, and forgets old ones; once a
/// minute: bounds the limiters' memory.
async fn delegation_janitor(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut ticks = 0u64;
    loop {
        ticks += 1;
        if ticks.is_multiple_of(60) {
            state.limits.janitor(std::time::SystemTime::now());
            state.limits.budgets.janitor(&state.runtime.load().config.budgets, crate::limit::budget::unix_now());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        for expired in state.delegations.sweep() {
            state.audit_event(AuditEvent::DelegationExpired {
                delegation_id: expired.id.clone(),
                delegated_by: expired.chain.clone(),
                used: expired.used(),
            });
        }
    }
}

/// With the Redis backend: twice a second, mirrors quarantines and agent revocations made on
/// any replica (a revocation also revokes that agent's delegations here).
async fn shared_limits_poller(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let Some(shared) = state.limits.shared.clone() else { return };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        let Ok(polled) = shared.poll().await else { continue };
        crate::persist::apply_polled(&state, &polled);
        let hour_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            .saturating_sub(3_600_000) as u64;
        let expired: Vec<String> = polled
            .delegations
            .iter()
            .filter(|d| d["expires_ms"].as_u64().is_some_and(|ms| ms < hour_ago))
            .filter_map(|d| d["id"].as_str().map(str::to_string))
            .collect();
        let _ = shared.forget_delegations(&expired).await;
    }
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within the grace period, flushes audit.
    pub async fn shutdown(self) {
        // The listeners close what is still open when their grace period ends; from then on an
        // ending response is keyward's cut, not the agent leaving.
        self.state.audit.closing_from(std::time::Instant::now() + self.shutdown_grace);
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(path) = &self.proxy_unix {
            let _ = std::fs::remove_file(path);
        }
        // After the last request: anything it changed (a first use) is kept too.
        if let Err(error) = crate::persist::save_at_shutdown(&self.state).await {
            tracing::error!(%error, "runtime state (revocations, quarantines, first uses) not saved at shutdown");
        }
        let audit = self.state.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_is_fitted_to_the_descriptor_budget() {
        // (budget, configured, agent listeners) → per listener
        let cases = [
            (1_048_576, 16_384, 1, 16_384),
            (524_288, 16_384, 2, 16_384),
            (512, 16_384, 1, 149),
            (512, 100, 1, 100),
            (1024, 16_384, 2, 192),
            (4096, 16_384, 1, 1344),
            (10, 16_384, 1, 1),
        ];
        for (budget, configured, listeners, expected) in cases {
            assert_eq!(
                connections_that_fit(budget, configured, listeners),
                expected,
                "{budget} {configured} {listeners}"
            );
        }
    }
}
