//! State an admin, a parent agent or a detector sets at runtime that must survive a restart:
//! agent revocations, quarantines, the (route, credential) pairs each agent has ever used (so
//! `first_use` means first ever), and delegated child keys (as hashes) with their revocations.
//! With the Redis limits backend it lives in Redis; otherwise in `keyward-state.json` in the
//! audit file's directory, replaced atomically (temp file, fsync, rename, fsync of the
//! directory). It is loaded before the listeners open; a file that cannot be read or parsed
//! stops the start with its path and the reason, never a silent reset.
//!
//! Child keys' use counts are written at a clean shutdown only (not on every call); the file
//! says whether its last writer stopped cleanly, and after a crash every restored child key
//! with a `max_requests` budget is revoked, since its count may be short.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::AuditEvent;
use crate::limit::QuarantineMap;
use crate::limit::anomaly::FirstUses;
use crate::state::AppState;

/// The file's name, in the audit file's directory.
pub const STATE_FILE: &str = "keyward-state.json";
const FORMAT: u32 = 1;

/// The state file's content. Unknown fields are refused: a file from a newer keyward is an
/// error, not something to half-read and then overwrite.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    format: u32,
    #[serde(default)]
    revoked_agents: BTreeSet<String>,
    /// Agent → quarantined until (unix ms), or `null` for until released.
    #[serde(default)]
    quarantined: QuarantineMap,
    /// Agent → the [route, credential] pairs it has used.
    #[serde(default)]
    first_uses: BTreeMap<String, BTreeSet<(String, String)>>,
    /// Delegated child keys (hashes only), with their use counts and revocation.
    #[serde(default)]
    delegations: Vec<serde_json::Value>,
    /// Written by a clean shutdown: the use counts are exact.
    #[serde(default)]
    clean_shutdown: bool,
}

/// The local state file, for the local limits backend.
pub struct StateFile {
    path: PathBuf,
    /// One writer at a time; each takes its snapshot while holding it, so the newest state is
    /// always the one left on disk.
    writing: tokio::sync::Mutex<()>,
}

impl StateFile {
    /// The state file that goes with an audit file: in the same directory.
    pub fn beside(audit_path: &Path) -> StateFile {
        let dir = audit_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        StateFile { path: dir.join(STATE_FILE), writing: tokio::sync::Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an absent file is a first start.
    fn load(&self) -> anyhow::Result<Persisted> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Persisted::default()),
            Err(e) => return Err(e).context(format!("cannot read the state file {}", self.path.display())),
        };
        let persisted: Persisted = serde_json::from_str(&text).with_context(|| {
            format!(
                "the state file {} (revocations, quarantines, first uses) is not valid; \
                 fix it or move it aside to start without that state",
                self.path.display()
            )
        })?;
        if persisted.format != FORMAT {
            anyhow::bail!(
                "the state file {} has format {}; this keyward reads format {FORMAT}",
                self.path.display(),
                persisted.format
            );
        }
        Ok(persisted)
    }

    /// Replaces the file with `state`, atomically: a crash leaves the old file or the new one.
    fn write(&self, state: &Persisted) -> std::io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut temp = tempfile::Builder::new().prefix(".keyward-state.").suffix(".tmp").tempfile_in(dir)?;
        temp.write_all(&serde_json::to_vec_pretty(state).expect("the state always serializes"))?;
        temp.write_all(b"\n")?;
        temp.as_file().sync_all()?;
        temp.persist(&self.path).map_err(|e| e.error)?;
        // The rename itself is durable only once the directory is.
        std::fs::File::open(dir)?.sync_all()
    }
}

fn snapshot(state: &AppState, clean_shutdown: bool) -> Persisted {
    let (quarantined, first_uses) = state.limits.persisted(SystemTime::now());
    Persisted {
        format: FORMAT,
        revoked_agents: state.revoked_agents.load().iter().cloned().collect(),
        quarantined,
        first_uses: first_uses.as_map().clone(),
        delegations: state.delegations.export_all(),
        clean_shutdown,
    }
}

/// Loads the saved state into `state`, before any listener serves: from Redis (with its
/// backend) or from the state file.
pub async fn restore(state: &AppState) -> anyhow::Result<()> {
    if let Some(shared) = &state.limits.shared {
        // Redis may still be starting next to keyward: a few tries over about three seconds.
        for attempt in 0..6 {
            if let Ok(polled) = shared.poll().await {
                crate::serve::apply_polled(state, &polled);
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
    let _one_at_a_time = file.writing.lock().await;
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
    loop {
        tokio::select! {
            _ = state.limits.changed.notified() => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::beside(&dir.path().join("audit.jsonl"));
        assert_eq!(file.path(), dir.path().join(STATE_FILE));
        assert_eq!(file.load().unwrap(), Persisted::default(), "no file: a first start");
        let mut state = Persisted { format: FORMAT, clean_shutdown: true, ..Persisted::default() };
        state.delegations.push(serde_json::json!({ "id": "dlg_1", "used": 3 }));
        state.revoked_agents.insert("a1".into());
        state.quarantined.insert("a2".into(), None);
        state.quarantined.insert("a3".into(), Some(1_900_000_000_000));
        state.first_uses.entry("a1".into()).or_default().insert(("openai".into(), "OPENAI_API_KEY".into()));
        file.write(&state).unwrap();
        assert_eq!(file.load().unwrap(), state);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(STATE_FILE)], "no temp file is left behind");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the state file is readable by its owner only");

        for damaged in ["{\"format\":1,\"revoked_agents\":", "[]", "{\"format\":1,\"extra\":true}", "{\"format\":9}"] {
            std::fs::write(file.path(), damaged).unwrap();
            let error = format!("{:#}", file.load().unwrap_err());
            assert!(error.contains(&file.path().display().to_string()), "{error}");
        }
    }
}
