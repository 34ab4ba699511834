//! The local state file, `keyward-state.json` in the audit file's directory: its format, how it
//! is read (an unreadable or unparsable file is an error with its path, never a silent reset)
//! and how it is replaced atomically (temp file, fsync, rename, fsync of the directory). What
//! goes into it, and when, is `persist`'s business.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::limit::QuarantineMap;

/// The file's name, in the audit file's directory.
pub const STATE_FILE: &str = "keyward-state.json";
pub(crate) const FORMAT: u32 = 1;

/// The state file's content. Unknown fields are refused: a file from a newer keyward is an
/// error, not something to half-read and then overwrite.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Persisted {
    pub(crate) format: u32,
    #[serde(default)]
    pub(crate) revoked_agents: BTreeSet<String>,
    /// Agent → quarantined until (unix ms), or `null` for until released.
    #[serde(default)]
    pub(crate) quarantined: QuarantineMap,
    /// Agent → the [route, credential] pairs it has used.
    #[serde(default)]
    pub(crate) first_uses: BTreeMap<String, BTreeSet<(String, String)>>,
    /// Delegated child keys (hashes only), with their use counts and revocation.
    #[serde(default)]
    pub(crate) delegations: Vec<serde_json::Value>,
    /// Written by a clean shutdown: the use counts are exact.
    #[serde(default)]
    pub(crate) clean_shutdown: bool,
    /// Budget accounts of the windows under way (reservations in flight counted as used).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) budgets: Vec<crate::limit::budget::SavedAccount>,
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

    /// Held by a writer from its snapshot until the file is replaced.
    pub async fn one_writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writing.lock().await
    }

    /// The saved state; an absent file is a first start.
    pub(crate) fn load(&self) -> anyhow::Result<Persisted> {
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
    pub(crate) fn write(&self, state: &Persisted) -> std::io::Result<()> {
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
