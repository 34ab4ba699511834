//! What keyward remembers about rotations across config reloads: the last run of each source
//! and which sources are rotating right now.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

/// How a rotation run ended, for the admin API and `GET /admin/secrets`.
#[derive(Debug, Clone, Serialize)]
pub struct RotationRun {
    pub source: String,
    pub trigger: &'static str,
    /// `promoted`, `nothing_to_rotate`, or `failed`.
    pub outcome: &'static str,
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The rotation runs: the last of each source, and the sources rotating now.
#[derive(Default)]
pub struct RotationLog {
    last: Mutex<BTreeMap<String, RotationRun>>,
    running: Mutex<HashSet<String>>,
}

impl RotationLog {
    pub fn last(&self, source: &str) -> Option<RotationRun> {
        self.last.lock().expect("rotation log lock poisoned").get(source).cloned()
    }

    /// Marks `source` as rotating, unless it already is; it stays marked until the returned
    /// guard drops, however the run ends.
    pub fn start(&self, source: &str) -> Option<Running<'_>> {
        let started = self.running.lock().expect("rotation log lock poisoned").insert(source.to_string());
        started.then(|| Running { log: self, source: source.to_string() })
    }

    /// Keeps `run` as its source's last run.
    pub fn record(&self, run: RotationRun) {
        self.last.lock().expect("rotation log lock poisoned").insert(run.source.clone(), run);
    }
}

/// Releases the per-source run lock however the run ends.
pub struct Running<'a> {
    log: &'a RotationLog,
    source: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.log.running.lock().expect("rotation log lock poisoned").remove(&self.source);
    }
}
