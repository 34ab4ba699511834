//! The `exec` provider, compatible with OpenClaw's secret exec protocol: keyward runs a resolver
//! (absolute path, no shell, cleared environment), writes the ids it needs to its stdin and reads
//! their values from its stdout, within a time and size limit.
//!
//! stdin:  `{"protocolVersion":1,"provider":"<source name>","ids":["ID", ...]}`
//! stdout: `{"protocolVersion":1,"values":{"ID":"value"},"errors":{"ID":{"message":"..."}}}`
//!
//! The resolver's output may hold secrets, so no error message ever quotes it: errors name the
//! command, the limit or the id, never a value. stderr is discarded for the same reason.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Check, Fetched, Provider, SecretProvider, Selector, StoreError};

/// An OpenClaw-compatible exec resolver: run without a shell, ids on stdin, values on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// An absolute path; never looked up in PATH, never run through a shell.
    pub command: PathBuf,
    pub args: Vec<String>,
    /// Environment variables passed through; everything else is cleared.
    pub pass_env: Vec<String>,
    pub timeout: Duration,
    pub max_output_bytes: usize,
}

/// The exec fields of a source table: an absolute command path, its arguments, and its limits.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecFields {
    command: Option<String>,
    args: Option<Vec<String>>,
    pass_env: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    max_output_bytes: Option<usize>,
}

impl Provider for ExecConfig {
    const KIND: &'static str = "exec";
    const WHOLE_VALUE: bool = false;
    type Fields = ExecFields;

    fn configure(
        fields: ExecFields,
        mapping: &mut Option<BTreeMap<String, String>>,
        check: &mut Check<'_>,
    ) -> Option<ExecConfig> {
        let Some(command) = fields.command else {
            check.problem("command", "is required for provider 'exec': an absolute path to the resolver");
            return None;
        };
        if !command.starts_with('/') {
            check.problem("command", "must be an absolute path (it is never looked up in PATH or run by a shell)");
        }
        let pass_env = fields.pass_env.unwrap_or_default();
        for (i, var) in pass_env.iter().enumerate() {
            if var.is_empty() || !var.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                check.problem(&format!("pass_env[{i}]"), format!("'{var}' is not an environment variable name"));
            }
        }
        let timeout = Duration::from_millis(fields.timeout_ms.unwrap_or(5_000));
        if timeout.is_zero() || timeout > Duration::from_secs(300) {
            check.problem("timeout_ms", "must be between 1 and 300000");
        }
        let max_output_bytes = fields.max_output_bytes.unwrap_or(1024 * 1024);
        if max_output_bytes == 0 || max_output_bytes > 16 * 1024 * 1024 {
            check.problem("max_output_bytes", "must be between 1 and 16777216");
        }
        if mapping.as_ref().is_none_or(BTreeMap::is_empty) {
            check.problem("mapping", "is required for provider 'exec' (secret name = \"{{FIELD}}\")");
        }
        Some(ExecConfig {
            command: PathBuf::from(command),
            args: fields.args.unwrap_or_default(),
            pass_env,
            timeout,
            max_output_bytes,
        })
    }

    fn rotation_refusals(&self) -> Vec<String> {
        vec!["an exec source cannot rotate: its resolver has no versions (rotate in the store it reads)".to_string()]
    }

    fn build(&self, source: &str, mapping: BTreeMap<String, Selector>) -> Arc<dyn SecretProvider> {
        Arc::new(ExecProvider::new(source.to_string(), self.clone(), mapping))
    }
}

pub struct ExecProvider {
    source: String,
    config: ExecConfig,
    mapping: BTreeMap<String, Selector>,
}

impl ExecProvider {
    pub fn new(source: String, config: ExecConfig, mapping: BTreeMap<String, Selector>) -> ExecProvider {
        ExecProvider { source, config, mapping }
    }

    fn ids(&self) -> BTreeSet<&str> {
        self.mapping
            .values()
            .filter_map(|s| match s {
                Selector::Field(id) => Some(id.as_str()),
                Selector::Whole => None,
            })
            .collect()
    }

    /// Runs the resolver once: the exit status and at most `max_output_bytes + 1` bytes of stdout.
    async fn run(&self, request: Vec<u8>) -> Result<(std::process::ExitStatus, Vec<u8>), StoreError> {
        let command = self.config.command.display().to_string();
        let mut cmd = Command::new(&self.config.command);
        cmd.args(&self.config.args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C for keyward is not delivered to the resolver, and
            // on a timeout the whole group is killed.
            .process_group(0);
        for var in &self.config.pass_env {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| StoreError::Unreachable(format!("exec resolver {command} cannot be started: {e}")))?;
        let group = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let limit = self.config.max_output_bytes;
        let exchange = async {
            // Written concurrently with reading, so a resolver that answers before reading cannot deadlock.
            let write = async {
                // A resolver may exit without reading its input; that is its business.
                let _ = stdin.write_all(&request).await;
                drop(stdin);
            };
            let read = async {
                let mut output = Vec::new();
                let read = (&mut stdout).take(limit as u64 + 1).read_to_end(&mut output).await;
                read.map(|_| output)
            };
            let ((), output) = tokio::join!(write, read);
            let output =
                output.map_err(|e| StoreError::Unreachable(format!("cannot read the output of {command}: {e}")))?;
            if output.len() > limit {
                return Err(StoreError::Malformed(format!(
                    "exec resolver {command} wrote more than max_output_bytes = {limit} bytes; it was stopped"
                )));
            }
            let status =
                child.wait().await.map_err(|e| StoreError::Unreachable(format!("cannot wait for {command}: {e}")))?;
            Ok((status, output))
        };
        let result = tokio::time::timeout(self.config.timeout, exchange).await;
        if !matches!(result, Ok(Ok(_)))
            && let Some(group) = group
        {
            // Timed out or over the limit: stop the resolver and everything it started (its own
            // process group), not only the process keyward spawned.
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        // The child may still run after a failure: kill it (kill_on_drop backs this up), and reap it.
        let _ = child.start_kill();
        let _ = child.wait().await;
        match result {
            Ok(done) => done,
            Err(_) => Err(StoreError::Unreachable(format!(
                "exec resolver {command} did not answer within timeout_ms = {}; it was killed",
                self.config.timeout.as_millis()
            ))),
        }
    }
}

impl SecretProvider for ExecProvider {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
        Box::pin(async move {
            let command = self.config.command.display().to_string();
            let ids = self.ids();
            let request = serde_json::json!({ "protocolVersion": 1, "provider": self.source, "ids": ids });
            let (status, output) = self.run(request.to_string().into_bytes()).await?;
            if !status.success() {
                let how = match status.code() {
                    Some(code) => format!("exited with status {code}"),
                    None => "was killed by a signal".to_string(),
                };
                return Err(StoreError::Unreachable(format!("exec resolver {command} {how}")));
            }
            let answer = parse_answer(&output)
                .map_err(|problem| StoreError::Malformed(format!("exec resolver {command}: {problem}")))?;
            let mut by_id = HashMap::new();
            for id in &ids {
                match answer.values.get(*id) {
                    Some(serde_json::Value::String(value)) => {
                        by_id.insert(*id, value.clone());
                    }
                    Some(_) => {
                        return Err(StoreError::Malformed(format!(
                            "exec resolver {command}: the value for id '{id}' is not a string"
                        )));
                    }
                    None => {
                        // The resolver's own error text may quote what it was given: only the id is logged.
                        let reported = answer.errors.contains_key(*id);
                        tracing::warn!(
                            source = %self.source,
                            id = %id,
                            reported_error = reported,
                            "exec resolver returned no value for this id"
                        );
                    }
                }
            }
            let values = self
                .mapping
                .iter()
                .filter_map(|(name, selector)| match selector {
                    Selector::Field(id) => {
                        by_id.get(id.as_str()).map(|v| (name.clone(), SecretString::from(v.clone())))
                    }
                    Selector::Whole => None,
                })
                .collect();
            Ok(Fetched { values, version: None })
        })
    }
}

/// The resolver's answer, checked for shape.
struct Answer {
    values: serde_json::Map<String, serde_json::Value>,
    errors: serde_json::Map<String, serde_json::Value>,
}

/// Parses stdout. Problems are described by position and field name only: serde's type errors
/// would quote the offending value, so the document is read as an untyped value first.
fn parse_answer(output: &[u8]) -> Result<Answer, String> {
    let value: serde_json::Value = serde_json::from_slice(output)
        .map_err(|e| format!("its output is not JSON (line {}, column {})", e.line(), e.column()))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err("its output is not a JSON object".to_string());
    };
    if object.get("protocolVersion").and_then(serde_json::Value::as_u64) != Some(1) {
        return Err("its output does not say protocolVersion 1".to_string());
    }
    let values = match object.remove("values") {
        Some(serde_json::Value::Object(values)) => values,
        None => serde_json::Map::new(),
        Some(_) => return Err("\"values\" is not an object".to_string()),
    };
    let errors = match object.remove("errors") {
        Some(serde_json::Value::Object(errors)) => errors,
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(_) => return Err("\"errors\" is not an object".to_string()),
    };
    Ok(Answer { values, errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_checked_without_quoting_them() {
        // `Answer` holds values, so it is deliberately not `Debug`: no `unwrap_err` here.
        let problem = |output: &[u8]| match parse_answer(output) {
            Err(problem) => problem,
            Ok(_) => panic!("accepted a bad answer"),
        };
        let err = problem(b"sk-canary-not-json");
        assert!(!err.contains("canary"), "{err}");
        let err = problem(br#"{"protocolVersion":2,"values":{}}"#);
        assert!(err.contains("protocolVersion 1"), "{err}");
        let err = problem(br#"{"protocolVersion":1,"values":["sk-canary"]}"#);
        assert!(!err.contains("canary"), "{err}");
        let Ok(ok) = parse_answer(br#"{"protocolVersion":1,"values":{"a":"b"},"errors":{"c":{"message":"x"}}}"#) else {
            panic!("refused a good answer")
        };
        assert_eq!(ok.values.len(), 1);
        assert!(ok.errors.contains_key("c"));
    }
}
