//! The access log: one INFO line per attempt (target `keyward::access`), written from the audit
//! guard's single outcome, so it agrees with the audit trail line for line. It names the agent by
//! its configured id, never its key.

use std::borrow::Cow;
use std::time::Duration;

use super::record::AuditRecord;
use crate::identity::KEY_PREFIX;
use crate::scrub::Scrubber;

/// The tracing target of access lines: `--log keyward::access=off` silences them too.
pub const TARGET: &str = "keyward::access";

/// Logs `record`'s attempt. The path is the one part an agent chooses freely, so it is scrubbed
/// of credentials, anything shaped like an agent key is cut out, and control and display
/// characters (line separators, bidi overrides) are escaped so one attempt stays one line.
pub fn log(record: &AuditRecord, scrubber: &Scrubber, elapsed: Duration) {
    // Filtered out (`--log keyward::access=off`, a level above INFO): skip the scrubbing too.
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let scrubbed = scrubber.scrub(record.path.as_bytes());
    let scrubbed = String::from_utf8_lossy(&scrubbed);
    let redacted = redact_agent_keys(&scrubbed);
    let path = printable(&redacted);
    let outcome = serde_json::to_value(record.outcome).ok();
    tracing::info!(
        target: TARGET,
        request_id = %record.request_id,
        agent = %record.agent_id.as_deref().unwrap_or("-"),
        route = %record.route.as_deref().unwrap_or("-"),
        method = %record.method,
        path = %path,
        status = record.status,
        outcome = %outcome.as_ref().and_then(|o| o.as_str()).unwrap_or("-"),
        duration_ms = elapsed.as_millis() as u64,
        "access"
    );
}

/// `kw_` followed by at least this many key characters is treated as an agent key.
const MIN_KEY_TAIL: usize = 16;

/// Replaces every `kw_…` run that looks like an agent key with `kw_<redacted>`.
fn redact_agent_keys(path: &str) -> Cow<'_, str> {
    if !path.contains(KEY_PREFIX) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find(KEY_PREFIX) {
        let after = &rest[at + KEY_PREFIX.len()..];
        let tail = after.bytes().take_while(|b| b.is_ascii_alphanumeric()).count();
        out.push_str(&rest[..at + KEY_PREFIX.len()]);
        if tail >= MIN_KEY_TAIL {
            out.push_str("<redacted>");
            rest = &after[tail..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Escapes control characters and invisible formatting (U+2028, U+202E, ...) as `\u{…}`.
fn printable(path: &str) -> Cow<'_, str> {
    if path.chars().all(|c| c.is_ascii_graphic()) {
        return Cow::Borrowed(path);
    }
    Cow::Owned(path.chars().map(|c| if c == ' ' { " ".to_string() } else { c.escape_debug().to_string() }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_keys_are_cut_out_of_paths() {
        let cases = [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/kw_testWorkerKey0123456789abcdefghijklmnopqrs/x", "/v1/kw_<redacted>/x"),
            ("/a/kw_AAAAAAAAAAAAAAAAAAAA?kw_BBBBBBBBBBBBBBBBBBBBBBBB", "/a/kw_<redacted>?kw_<redacted>"),
            ("/repos/kw_tool/issues", "/repos/kw_tool/issues"),
            ("/kw_", "/kw_"),
        ];
        for (path, expected) in cases {
            assert_eq!(redact_agent_keys(path), expected, "{path}");
        }
    }

    #[test]
    fn separators_and_display_controls_are_escaped() {
        assert_eq!(printable("/v1/models"), "/v1/models");
        assert_eq!(printable("/a\nb"), "/a\\nb");
        assert_eq!(printable("/a\u{2028}b\u{202e}c"), "/a\\u{2028}b\\u{202e}c");
        assert_eq!(printable("/caf\u{e9} x"), "/caf\u{e9} x");
    }
}
