//! State an admin, a parent agent or a detector sets at runtime that must survive a restart:
//! agent revocations, quarantines, the (route, credential) pairs each agent has ever used (so
//! `first_use` means first ever), and delegated child keys (as hashes) with their revocations.
//! With the Redis limits backend it lives in Redis; otherwise in `keyward-state.json` in the
//! audit file's directory, replaced atomically (temp file, fsync, rename, fsync of the
//! directory). It is loaded before the listeners open; a file that cannot be read or parsed
//! stops the start with its path and the reason, never a silent reset.
//!
//! Budget accounts (used tokens and cost of the windows under way) are written at most once a
//! second while they change, and at shutdown.
//!
//! Child keys' use counts are written at a clean shutdown only (not on every call); the file
//! says whether its last writer stopped cleanly, and after a crash every restored child key
//! with a `max_requests` budget is revoked, since its count may be short.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::limit::anomaly::FirstUses;
use crate::limit::shared::SharedState;
use crate::state::AppState;
use crate::state::file::{FORMAT, Persisted};

fn snapshot(state: &AppState, clean_shutdown: bool) -> Persisted {
    let (quarantined, first_uses) = state.limits.persisted(SystemTime::now());
    Persisted {
        format: FORMAT,
        revoked_agents: state.revoked_agents.load().iter().cloned().collect(),
        quarantined,
        first_uses: first_uses.as_map().clone(),
        delegations: state.delegations.export_all(),
        clean_shutdown,
        budgets: state.limits.budgets.export(),
    }
}

/// Loads the saved state into `state`, before any listener serves: from Redis (with its
/// backend) or from the state file.
pub async fn restore(state: &AppState) -> anyhow::Result<()> {
    if let Some(shared) = &state.limits.shared {
        // Redis may still be starting next to keyward: a few tries over about three seconds.
        for attempt in 0..6 {
            if let Ok(polled) = shared.poll().await {
                apply_polled(state, &polled);
                tracing::info!(
                    revoked = polled.revoked.len(),
                    quarantined = polled.quarantined.len(),
                    "revocations and quarantines loaded from redis"
                );
                return Ok(());
            }
            if attempt < 5 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        if !shared.fail_open {
            anyhow::bail!(
                "cannot load revocations and quarantines from redis (limits.redis_url) and limits.redis_failure = \"fail_closed\"; start redis first"
            );
        }
        tracing::error!(
            "cannot load revocations and quarantines from redis; serving without them until redis answers (limits.redis_failure = \"fail_open\")"
        );
        return Ok(());
    }
    let Some(file) = &state.state_file else { return Ok(()) };
    let missing = !file.path().exists();
    let persisted = file.load()?;
    let audit_path = state.runtime.load().config.audit.path.clone();
    if missing && std::fs::metadata(&audit_path).is_ok_and(|m| m.len() > 0) {
        // keyward writes its state file at every start, so an audit trail without one means the
        // file was deleted or moved (or this is the first start of a version that keeps one).
        tracing::warn!(
            state_file = %file.path().display(),
            audit = %audit_path.display(),
            "no state file beside an audit trail that already has records: starting with no revocations, \
             quarantines or child keys; if keyward kept state here before, restore the file"
        );
    }
    let first_start = persisted == Persisted::default();
    state.limits.restore(&persisted.quarantined, &FirstUses::from_map(persisted.first_uses));
    state.limits.budgets.import(&persisted.budgets);
    if !persisted.revoked_agents.is_empty() {
        state.revoked_agents.store(Arc::new(persisted.revoked_agents.iter().cloned().collect()));
    }
    let (restored, uncounted) = state.delegations.restore(&persisted.delegations, persisted.clean_shutdown);
    if !first_start && !persisted.clean_shutdown {
        tracing::warn!(
            revoked = uncounted.len(),
            "keyward did not stop cleanly last time: child keys with a max_requests budget are revoked, as their use counts may be short"
        );
    }
    for id in &uncounted {
        state.audit_event(AuditEvent::DelegationRevoked {
            delegation_id: id.clone(),
            reason: "its use count is unknown after an unclean stop".into(),
            by: "startup".into(),
        });
    }
    tracing::info!(
        path = %file.path().display(),
        revoked = persisted.revoked_agents.len(),
        quarantined = persisted.quarantined.len(),
        delegations = restored,
        "runtime state loaded"
    );
    // From now until a clean shutdown, the file on disk says "not clean".
    save(state).await.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Writes the state that must survive a restart, and waits until it is durable. With Redis,
/// revocations, quarantines and delegations were written by whoever set them; the first uses
/// are written here.
pub async fn save(state: &AppState) -> Result<(), String> {
    write(state, false).await
}

/// The last save, after the last request: the use counts of child keys are exact.
pub async fn save_at_shutdown(state: &AppState) -> Result<(), String> {
    write(state, true).await
}

async fn write(state: &AppState, clean_shutdown: bool) -> Result<(), String> {
    if let Some(shared) = &state.limits.shared {
        let unsaved = state.limits.take_unsaved_first_uses();
        if shared.record_first_uses(&unsaved).await.is_err() {
            state.limits.unsaved_back(unsaved);
            return Err("redis is unreachable".to_string());
        }
        return Ok(());
    }
    let Some(file) = state.state_file.clone() else { return Ok(()) };
    let _one_at_a_time = file.one_writer().await;
    let snapshot = snapshot(state, clean_shutdown);
    let path = file.path().display().to_string();
    let writer = file.clone();
    tokio::task::spawn_blocking(move || writer.write(&snapshot))
        .await
        .map_err(|_| "the state writer panicked".to_string())?
        .map_err(|e| format!("cannot write {path}: {e}"))
}

/// `save`, for an admin action on `agent`: `false` (and an error in the log) if the change
/// could not be made durable, though it holds in this process already.
pub async fn save_or_log(state: &AppState, agent: &str, what: &str) -> bool {
    match save(state).await {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(agent, %error, "the {what} holds now but may not survive a restart");
            false
        }
    }
}

/// Writes the state whenever it changes (a first use, a detector's quarantine). Admin actions
/// also save at once and wait for it, and `Running::shutdown` saves once more after the last
/// request has finished.
pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    // Budget accounts change with every metered call: they are written at most once a second
    // (a crash loses at most that second's charges), not on every call.
    let mut budget_tick = tokio::time::interval(Duration::from_secs(1));
    budget_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.limits.changed.notified() => {}
            _ = budget_tick.tick() => {
                if state.limits.shared.is_some() || !state.limits.budgets.take_dirty() {
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        if let Err(error) = save(&state).await {
            tracing::error!(%error, "runtime state (revocations, quarantines, first uses) not saved; retrying");
            // Not busy-looping on a persistent failure: again in a second, or at the next change.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => state.limits.changed.notify_one(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Mirrors what Redis holds (quarantines, agent and delegation revocations, delegations, first
/// uses) into this replica: on every poll, and once at start before the listeners serve.
pub fn apply_polled(state: &AppState, polled: &SharedState) {
    state.limits.apply_shared(polled);
    state.delegations.import(&polled.delegations);
    for id in &polled.revoked_delegations {
        if state.delegations.get(id).is_some_and(|d| !d.is_revoked()) {
            state.delegations.revoke(id);
        }
    }
    let known = state.revoked_agents.load();
    let newly: Vec<String> = polled.revoked.iter().filter(|a| !known.contains(*a)).cloned().collect();
    if !newly.is_empty() {
        state.revoked_agents.rcu(|set| {
            let mut set = (**set).clone();
            set.extend(newly.iter().cloned());
            set
        });
        for agent in &newly {
            state.delegations.revoke_rooted_at(agent);
        }
    }
}
