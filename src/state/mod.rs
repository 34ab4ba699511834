//! Shared state: the process-wide parts (client, audit sink, metrics) and the per-config
//! `Runtime` snapshot that a request reads once and keeps until it ends. The modules that act
//! on it (persist, rotation, admin, the pipeline) import it; it imports none of them, so the
//! state file's format (`file`) and the rotation log (`rotations`) live here.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use crate::audit::{AuditEvent, AuditSink};
use crate::config::Config;
use crate::credentials::{Minter, SecretStore};
use crate::delegation::DelegationStore;
use crate::forward::Forwarder;
use crate::identity::AgentDirectory;
use crate::limit::Limits;
use crate::metrics::Metrics;
use crate::policy::{HostTable, RouteTable};

pub mod file;
pub mod rotations;

pub use file::StateFile;
pub use rotations::{RotationLog, RotationRun};

/// Everything derived from one config, prepared at load so the request path only looks things up.
pub struct Runtime {
    pub config: Config,
    pub routes: RouteTable,
    /// Which route answers for a host on the forward-proxy listener.
    pub hosts: HostTable,
    /// The outbound client of each route with its own `connect_to` or `upstream_ca_file`
    /// (`None`: the shared one).
    pub route_clients: Vec<Option<Forwarder>>,
    pub agents: AgentDirectory,
    pub secrets: SecretStore,
    /// The `aws-sigv4` secrets' signers, by secret name.
    pub signers: crate::credentials::sigv4::Signers,
    /// Tokens minted from the secrets whose kind is not `static`.
    pub minter: Minter,
    pub audit_metadata: Arc<BTreeMap<String, String>>,
}

impl Runtime {
    /// The client that sends route `index`'s calls: its own, or the shared `default`.
    pub fn client_for<'a>(&'a self, index: usize, default: &'a Forwarder) -> &'a Forwarder {
        self.route_clients.get(index).and_then(Option::as_ref).unwrap_or(default)
    }

    pub fn new(config: Config, metrics: Arc<Metrics>) -> Runtime {
        let secrets = SecretStore::new(&config.sources, metrics);
        Runtime::with_store(config, secrets)
    }

    /// A runtime over an existing secret store (a reload keeps unchanged sources cached).
    pub fn with_store(config: Config, secrets: SecretStore) -> Runtime {
        let route_clients = config
            .routes
            .iter()
            .map(|r| {
                (r.connect_to.is_some() || !r.upstream_roots.is_empty())
                    .then(|| Forwarder::for_route(&config.forward, &r.upstream_roots, r.connect_to))
            })
            .collect();
        Runtime {
            routes: RouteTable::with_indexes(
                config.routes.iter().enumerate().filter_map(|(i, r)| Some((i, r.prefix.as_deref()?))),
            ),
            hosts: HostTable::new(config.routes.iter().enumerate().map(|(i, r)| (i, r.hosts.as_slice()))),
            route_clients,
            agents: AgentDirectory::new(&config.agents),
            signers: crate::credentials::sigv4::Signers::new(&config.sigv4),
            audit_metadata: Arc::new(config.audit.metadata.clone()),
            minter: secrets.minter(&config.kinds),
            secrets,
            config,
        }
    }
}

/// Everything that outlives a config reload: the client, the audit sink, metrics, delegations,
/// limits and revocations.
pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub forwarder: Forwarder,
    pub audit: Arc<AuditSink>,
    pub metrics: Arc<Metrics>,
    pub delegations: DelegationStore,
    pub limits: Limits,
    /// Agents revoked through the admin API: refused at once, without a restart.
    pub revoked_agents: ArcSwap<HashSet<String>>,
    pub rotations: RotationLog,
    /// One reload at a time: the file read last is the one that stays.
    pub reload_lock: std::sync::Mutex<()>,
    /// The file the config was loaded from, for reloads; unset for the embedded default.
    pub config_path: OnceLock<PathBuf>,
    /// Where revocations, quarantines and first uses are kept across restarts, with the local
    /// limits backend (with Redis they live there).
    pub state_file: Option<Arc<StateFile>>,
}

impl AppState {
    /// Writes an event (delegation, anomaly, revocation) to the audit trail, scrubbed like every
    /// record.
    pub fn audit_event(&self, event: AuditEvent) {
        let mut record = event.record_now();
        self.runtime.load().secrets.scrubber().scrub_json(&mut record);
        self.audit.record(record);
    }

    /// Writes an event and waits until it is durable, for events that precede a credential going
    /// onto the network. `Err` when it could not be written and `audit.on_failure = "deny"`.
    pub async fn audit_event_durably(&self, event: AuditEvent) -> Result<(), ()> {
        let mut record = event.record_now();
        self.runtime.load().secrets.scrubber().scrub_json(&mut record);
        match self.audit.record_durably(record).await {
            Ok(()) => Ok(()),
            Err(_) if self.audit.on_failure() == crate::config::OnFailure::Allow => Ok(()),
            Err(_) => Err(()),
        }
    }

    pub fn new(runtime: Runtime, audit: Arc<AuditSink>, metrics: Arc<Metrics>) -> Arc<AppState> {
        let forwarder = Forwarder::new(&runtime.config.forward);
        let limits = Limits::new(&runtime.config.limits, metrics.clone());
        let state_file = limits.shared.is_none().then(|| Arc::new(StateFile::beside(&runtime.config.audit.path)));
        Arc::new(AppState {
            runtime: ArcSwap::from_pointee(runtime),
            forwarder,
            audit,
            metrics,
            delegations: DelegationStore::default(),
            limits,
            revoked_agents: ArcSwap::from_pointee(HashSet::new()),
            rotations: RotationLog::default(),
            reload_lock: std::sync::Mutex::new(()),
            config_path: OnceLock::new(),
            state_file,
        })
    }
}
