//! The `file` provider: a JSON object of NAME → value, re-read on every fetch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;

use super::{Fetched, SecretProvider, StoreError, apply_mapping};
use crate::config::Selector;

pub struct FileProvider {
    path: PathBuf,
    mapping: BTreeMap<String, Selector>,
    warned_permissions: AtomicBool,
}

impl FileProvider {
    pub fn new(path: PathBuf, mapping: BTreeMap<String, Selector>) -> FileProvider {
        FileProvider { path, mapping, warned_permissions: AtomicBool::new(false) }
    }
}

impl SecretProvider for FileProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|e| StoreError::Unreachable(format!("cannot read {}: {e}", self.path.display())))?;
            if !self.warned_permissions.swap(true, Ordering::Relaxed) {
                warn_if_shared(&self.path);
            }
            let values = apply_mapping(&text, &self.mapping)?;
            Ok(Fetched { values, version: None })
        })
    }
}

/// Logs a warning when a secrets file can be read by its group or by everyone.
pub fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "secrets file is readable by group or others; chmod 600 it"
        );
    }
}

/// Names a file source provides when it has no mapping: the keys of its JSON object.
pub fn discover_names(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(map)) => {
            let mut names = Vec::new();
            for (key, value) in map {
                if !value.is_string() {
                    return Err(format!("{}: the value of '{key}' is not a string", path.display()));
                }
                names.push(key);
            }
            Ok(names)
        }
        Ok(_) => Err(format!("{}: expected a JSON object of NAME -> value", path.display())),
        Err(e) => Err(format!("{}: not JSON: {e}", path.display())),
    }
}
