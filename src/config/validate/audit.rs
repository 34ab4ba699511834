//! `[audit]`: where the trail is written, how durably, and for how long.

use super::super::raw::RawAudit;
use super::super::{AuditConfig, Durability, OnFailure};
use super::Collector;

pub(super) fn audit(c: &mut Collector<'_>, raw: RawAudit) -> AuditConfig {
    let durability = match raw.durability.as_deref().unwrap_or("os") {
        "os" => Durability::Os,
        "fsync" => Durability::Fsync,
        "none" => Durability::None,
        other => {
            c.problem("audit.durability", format!("'{other}' is not one of \"os\", \"fsync\", \"none\""));
            Durability::Os
        }
    };
    let on_failure = match raw.on_failure.as_deref().unwrap_or("deny") {
        "deny" => OnFailure::Deny,
        "allow" => OnFailure::Allow,
        other => {
            c.problem("audit.on_failure", format!("'{other}' is not one of \"deny\", \"allow\""));
            OnFailure::Deny
        }
    };
    let audit = AuditConfig {
        path: c.path(raw.path.as_deref().unwrap_or("var/audit/keyward-audit.jsonl")),
        retention_days: raw.retention_days.unwrap_or(90),
        metadata: raw.metadata,
        durability,
        on_failure,
        rotate_bytes: raw.rotate_bytes.unwrap_or(100 * 1024 * 1024),
        rotate_daily: raw.rotate_daily.unwrap_or(true),
    };
    if audit.retention_days == 0 {
        c.problem("audit.retention_days", "must be at least 1");
    }
    audit
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn audit_problems_are_reported_with_their_lines() {
        check(&[
            ("valid settings", "[audit]\ndurability = \"fsync\"\non_failure = \"allow\"\nretention_days = 7\n", &[]),
            (
                "unknown durability and failure mode",
                "[audit]\ndurability = \"sometimes\"\non_failure = \"maybe\"\n",
                &[
                    "k.toml:2: audit.durability: 'sometimes' is not one of \"os\", \"fsync\", \"none\"",
                    "k.toml:3: audit.on_failure: 'maybe' is not one of \"deny\", \"allow\"",
                ],
            ),
            ("no retention", "[audit]\nretention_days = 0\n", &["k.toml:2: audit.retention_days: must be at least 1"]),
        ]);
    }
}
