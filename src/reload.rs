//! Hot reload (SIGHUP or `POST /admin/reload`): the new config is validated in full, then swapped
//! in at once. In-flight requests finish on the config they started with; an invalid file is
//! refused and the last good config keeps serving; unchanged secret sources stay cached.

use std::sync::Arc;

use serde::Serialize;

use crate::audit::AuditEvent;
use crate::config::{self, Config, ConfigErrors};
use crate::state::{AppState, Runtime};

#[derive(Debug, Serialize)]
pub struct Reloaded {
    pub path: String,
    pub sources: usize,
    /// Sources whose store, mapping and cache did not change: their cached values carry over.
    pub sources_kept_cached: usize,
    /// Settings that changed but only take effect after a restart.
    pub restart_needed: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("keyward is running on its embedded default config; start it with --config FILE to reload")]
    NoFile,
    #[error("{0}")]
    Invalid(ConfigErrors),
}

/// Re-reads the config file and swaps it in, or keeps the running config and says why.
pub fn reload(state: &Arc<AppState>) -> Result<Reloaded, ReloadError> {
    let Some(path) = state.config_path.get() else { return Err(ReloadError::NoFile) };
    let _one_at_a_time = state.reload_lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let name = path.display().to_string();
    let config = match config::load_file(path) {
        Ok(config) => config,
        Err(errors) => {
            tracing::error!(config = %name, "config reload refused; still serving the last good config:\n{errors}");
            state.audit_event(AuditEvent::ConfigRejected {
                path: name,
                problems: errors.0.iter().map(|p| p.redacted()).collect(),
            });
            return Err(ReloadError::Invalid(errors));
        }
    };
    let old = state.runtime.load_full();
    let restart_needed = restart_only_changes(&old.config, &config);
    let kept = old.secrets.kept_by_reload(&config.sources);
    let sources = config.sources.len();
    let secrets = old.secrets.reload(&config.sources, state.metrics.clone());
    let mut runtime = Runtime::with_store(config, secrets);
    // Minted tokens of a secret whose kind is unchanged carry over, like cached secrets.
    runtime.minter = runtime.secrets.reload_minter(&old.minter, &runtime.config.kinds);
    let runtime = Arc::new(runtime);
    state.runtime.store(runtime.clone());
    // Sources new to this config are fetched now, and retried with back-off until each has
    // answered (or a later reload replaces this config), so readiness does not depend on use.
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let state = state.clone();
        handle.spawn(async move {
            let mut delay = std::time::Duration::from_millis(500);
            while Arc::ptr_eq(&state.runtime.load_full(), &runtime) && runtime.secrets.warm_up().await > 0 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        });
    }
    for setting in &restart_needed {
        tracing::warn!(setting, "changed in the config, but takes effect only after a restart");
    }
    tracing::info!(config = %name, sources, kept_cached = kept, "config reloaded");
    let reloaded = Reloaded { path: name, sources, sources_kept_cached: kept, restart_needed };
    state.audit_event(AuditEvent::ConfigReloaded {
        path: reloaded.path.clone(),
        sources,
        sources_kept_cached: kept,
        restart_needed: reloaded.restart_needed.clone(),
    });
    Ok(reloaded)
}

/// Settings read once at start (listeners, audit sink, HTTP client, limits backend).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if differs(&old.server, &new.server) {
        changed.push("server");
    }
    if differs(&old.forward, &new.forward) {
        changed.push("forward");
    }
    // The listener and the CA are set up at start; `tunnel_hosts` is read at each CONNECT.
    let forward_proxy = |c: &Config| {
        c.forward_proxy
            .as_ref()
            .map(|f| format!("{:?}{:?}{:?}{:?}", f.listen, f.ca_cert_file, f.ca_key_file, f.leaf_validity))
    };
    if forward_proxy(old) != forward_proxy(new) {
        changed.push("forward_proxy (except tunnel_hosts)");
    }
    let audit = |c: &Config| {
        let a = &c.audit;
        format!(
            "{:?}{:?}{:?}{}{}{}",
            a.path, a.durability, a.on_failure, a.rotate_bytes, a.rotate_daily, a.retention_days
        )
    };
    if audit(old) != audit(new) {
        changed.push("audit (except metadata)");
    }
    if differs(&old.limits, &new.limits) {
        changed.push("limits");
    }
    changed
}
