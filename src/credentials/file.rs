//! The `file` provider: a JSON object of NAME → value, re-read on every fetch. Rotating it means
//! re-reading the file, testing the new values, and swapping them in at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{Check, Fetched, Provider, Rotatable, SecretProvider, Selector, StoreError, apply_mapping};

/// A JSON file of NAME → value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileConfig {
    /// Resolved against the config file's directory.
    pub path: PathBuf,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileFields {
    path: Option<String>,
}

impl Provider for FileConfig {
    const KIND: &'static str = "file";
    type Fields = FileFields;

    /// Without a mapping, the file is read now to learn its names: one secret per key.
    fn configure(
        fields: FileFields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<FileConfig> {
        let Some(path) = fields.path else {
            check.problem("path", "is required for provider 'file'");
            return None;
        };
        let path = check.path(&path);
        if mapping.is_none() {
            *mapping = Some(match discover_names(&path) {
                Ok(names) => names.into_iter().map(|n| (n.clone(), format!("{{{{{n}}}}}"))).collect(),
                Err(e) => {
                    check.problem(
                        "path",
                        format!("{e} (a file source without `mapping` is read at load to learn its names)"),
                    );
                    BTreeMap::new()
                }
            });
        }
        Some(FileConfig { path })
    }

    fn build(&self, _source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(FileProvider::new(self.path.clone(), mapping))
    }
}

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
            let path = self.path.clone();
            let text = tokio::task::spawn_blocking(move || read_bounded(&path))
                .await
                .map_err(|_| StoreError::Unreachable("the file read task failed".to_string()))?
                .map_err(StoreError::Unreachable)?;
            if !self.warned_permissions.swap(true, Ordering::Relaxed) {
                warn_if_shared(&self.path);
            }
            let values = apply_mapping(&text, &self.mapping)?;
            Ok(Fetched { values, version: None })
        })
    }

    fn rotation(&self) -> Option<&dyn Rotatable> {
        Some(self)
    }
}

impl Rotatable for FileProvider {
    fn candidate<'a>(&'a self, current: &'a Fetched) -> BoxFuture<'a, Result<Option<Fetched>, StoreError>> {
        Box::pin(async move {
            let read = self.fetch().await?;
            let same = read.values.len() == current.values.len()
                && read.values.iter().all(|(name, value)| {
                    current.values.get(name).is_some_and(|old| old.expose_secret() == value.expose_secret())
                });
            Ok((!same).then_some(read))
        })
    }

    fn stage<'a>(&'a self, _name: &'a str, _value: &'a SecretString) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            Err(StoreError::Unsupported(format!(
                "a file source rotates by re-reading {}: write the new value there, then rotate without a body",
                self.path.display()
            )))
        })
    }

    fn promote<'a>(&'a self, _candidate: &'a Fetched) -> BoxFuture<'a, Result<(), StoreError>> {
        // The file already holds the new values; promoting is the swap in the cache.
        Box::pin(async { Ok(()) })
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

/// The largest secrets file keyward reads; a path like /dev/zero cannot exhaust memory.
pub const MAX_SECRETS_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a regular file of at most `MAX_SECRETS_FILE_BYTES` as UTF-8.
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut text = String::new();
    file.take(MAX_SECRETS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_SECRETS_FILE_BYTES {
        return Err(format!("{} is larger than {MAX_SECRETS_FILE_BYTES} bytes", path.display()));
    }
    Ok(text)
}

/// Names a file source provides when it has no mapping: the keys of its JSON object.
pub fn discover_names(path: &Path) -> Result<Vec<String>, String> {
    let text = read_bounded(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bounded_regular_files_are_read() {
        assert!(read_bounded(Path::new("/dev/zero")).unwrap_err().contains("not a regular file"));
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_SECRETS_FILE_BYTES as usize + 1]).unwrap();
        assert!(read_bounded(&big).unwrap_err().contains("larger than"));
        assert!(discover_names(Path::new("/nonexistent/x.json")).unwrap_err().contains("cannot read"));
    }
}
