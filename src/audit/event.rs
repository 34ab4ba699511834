//! Every audit event that is not a request record: rotation, delegation, anomaly, config, agent
//! and retention events, as one typed enum. Adding an event means adding one variant here.
//!
//! An event serialises to the JSON object the trail has always held: `type` is the variant's
//! `rename`, fields are camelCase unless a field keeps the name older trails used (those say so),
//! `None` is written as `null`, and the sink sorts the keys when it seals the line. The sink adds
//! `timestamp`, `seq`, `prev_hash` and `hash`.

use serde::Serialize;
use serde_json::Value;

/// The `type` of an attempt's outcome record.
pub const REQUEST: &str = "request";
/// The `type` of the record written before a credential goes onto the network.
pub const REQUEST_RELEASED: &str = "request.released";
/// Every anomaly event's `type` starts with this, followed by the detector's name.
pub const ANOMALY_PREFIX: &str = "anomaly.";
/// Every rotation event's `type` starts with this.
pub const ROTATION_PREFIX: &str = "rotation.";
/// The `type` of the rotation event that promoted a new version.
pub const ROTATION_PROMOTED: &str = "rotation.promoted";
/// The `type` of the retention event (the chain verifier accepts the gap it leaves).
pub const AUDIT_PRUNED: &str = "audit.pruned";

/// One audit event. `to_json` is its form in the trail and in webhook bodies.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all_fields = "camelCase")]
pub enum AuditEvent {
    /// An admin quarantined an agent; its delegations were revoked with it.
    #[serde(rename = "agent.quarantined")]
    AgentQuarantined {
        agent_id: String,
        by: String,
        /// `None` (`null`): until released.
        minutes: Option<u64>,
        #[serde(rename = "revoked_delegations")]
        revoked_delegations: Vec<String>,
    },
    /// An admin released an agent from quarantine or throttling.
    #[serde(rename = "agent.released")]
    AgentReleased {
        agent_id: String,
        by: String,
        #[serde(rename = "was_limited")]
        was_limited: bool,
    },
    /// An admin revoked an agent's key.
    #[serde(rename = "agent.revoked")]
    AgentRevoked { agent_id: String, by: String },

    /// A parent minted a child key. `description` is the delegation as the admin API shows it
    /// (`delegation::api::describe`), so both always agree.
    #[serde(rename = "delegation.minted")]
    DelegationMinted {
        delegation_id: String,
        #[serde(flatten)]
        description: Value,
    },
    /// A delegation request was refused. `agent_id` and `message` are absent when the caller
    /// could not be identified.
    #[serde(rename = "delegation.refused")]
    DelegationRefused {
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
        status: u16,
        error_code: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A child key was revoked (by its parent, an admin, an anomaly, or at startup).
    #[serde(rename = "delegation.revoked")]
    DelegationRevoked { delegation_id: String, reason: String, by: String },
    /// A child key reached its expiry.
    #[serde(rename = "delegation.expired")]
    DelegationExpired { delegation_id: String, delegated_by: Vec<String>, used: u64 },

    /// An anomaly detector fired; `type` is `anomaly.<detector>`.
    #[serde(rename = "anomaly")]
    Anomaly {
        #[serde(skip)]
        detector: &'static str,
        agent_id: String,
        /// `alert`, `throttle` or `quarantine`.
        action: &'static str,
        reason: String,
        value: f64,
        threshold: f64,
    },

    /// A reload swapped in a new config.
    #[serde(rename = "config.reloaded")]
    ConfigReloaded { path: String, sources: usize, sources_kept_cached: usize, restart_needed: Vec<&'static str> },
    /// A reload was refused; the last good config keeps serving. Problems are redacted.
    #[serde(rename = "config.rejected")]
    ConfigRejected { path: String, problems: Vec<String> },

    /// A rotation is coming up (`scheduled_at`) or was requested by hand.
    #[serde(rename = "rotation.notified")]
    RotationNotified {
        #[serde(flatten)]
        rotation: RotationOf,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        scheduled_at: Option<String>,
    },
    /// No pending version is newer than the current one.
    #[serde(rename = "rotation.skipped")]
    RotationSkipped {
        #[serde(flatten)]
        rotation: RotationOf,
        reason: String,
    },
    /// The candidate goes to a route's validate probe: written durably before it is sent.
    #[serde(rename = "rotation.probe.released")]
    RotationProbeReleased { source: String, route: String, credential: String, to_version: Option<String> },
    /// The candidate was tested with every probe that applies (`untested` when none does).
    #[serde(rename = "rotation.tested")]
    RotationTested {
        #[serde(flatten)]
        rotation: RotationOf,
        to_version: Option<String>,
        passed: bool,
        probes: Vec<ProbeResult>,
        untested: bool,
    },
    /// The candidate became the current version.
    #[serde(rename = "rotation.promoted")]
    RotationPromoted {
        #[serde(flatten)]
        rotation: RotationOf,
        from_version: Option<String>,
        to_version: Option<String>,
        grace_period_minutes: u64,
    },
    /// The run did not promote; the current version is untouched.
    #[serde(rename = "rotation.failed")]
    RotationFailed {
        #[serde(flatten)]
        rotation: RotationOf,
        reason: String,
        current_untouched: bool,
    },
    /// The replaced version was dropped once the grace period ended.
    #[serde(rename = "rotation.purged")]
    RotationPurged {
        #[serde(flatten)]
        rotation: RotationOf,
        purged_version: Option<String>,
    },

    /// The forward proxy refused a CONNECT (or a plain-HTTP or non-proxy request) before any
    /// tunnel was opened: no or unknown key (407), a host or port no route names, an IP literal
    /// or private address (403). `agentId` is absent when the caller was not identified.
    #[serde(rename = "forward.refused")]
    ForwardRefused {
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
        /// The connecting peer's address.
        ip: String,
        method: String,
        host: String,
        port: u16,
        status: u16,
        error_code: &'static str,
        /// For unknown keys: 12 hex chars of the key's SHA-256.
        #[serde(skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
        via: &'static str,
    },
    /// An intercepted tunnel was accepted (CONNECT answered 200) but the agent's TLS handshake
    /// with keyward's leaf failed, most often because the agent does not trust keyward's CA:
    /// nothing was sent upstream.
    #[serde(rename = "forward.handshake_failed")]
    ForwardHandshakeFailed { agent_id: String, ip: String, host: String, port: u16, reason: String, via: &'static str },
    /// A blind tunnel to one of `forward_proxy.tunnel_hosts` ended: no interception and no
    /// credential; the bytes each way and how long it was open.
    #[serde(rename = "forward.tunnel")]
    ForwardTunnel {
        agent_id: String,
        ip: String,
        host: String,
        port: u16,
        /// The address keyward connected to.
        connected_to: String,
        bytes_from_agent: u64,
        bytes_to_agent: u64,
        duration_ms: u64,
        /// `closed` (either side ended it), `error` (the connection broke), `shutdown`.
        outcome: &'static str,
        via: &'static str,
    },

    /// Rotated audit files past retention were deleted; the chain resumes at
    /// `first_surviving_hash`.
    #[serde(rename = "audit.pruned")]
    AuditPruned {
        deleted: Vec<String>,
        #[serde(rename = "retention_days")]
        retention_days: u32,
        #[serde(rename = "first_surviving_hash")]
        first_surviving_hash: Option<String>,
    },
}

/// Which rotation run a `rotation.*` event belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct RotationOf {
    pub source: String,
    /// `scheduled` or `manual`.
    pub trigger: &'static str,
}

/// One validate probe of a rotation candidate.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub route: String,
    pub secret: String,
    /// The upstream's status; `None` when it could not be reached.
    pub status: Option<u16>,
    pub passed: bool,
}

/// What a record read back from the trail is, by its `type`: readers branch on this instead of
/// on string literals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An attempt's outcome (`request`).
    Request,
    /// Written before a credential went onto the network (`request.released`).
    Released,
    /// `anomaly.*`
    Anomaly,
    /// `rotation.*`
    Rotation,
    /// Any other event, or a line without `type`.
    Other,
}

impl Kind {
    pub fn of(record: &Value) -> Kind {
        match record.get("type").and_then(Value::as_str).unwrap_or_default() {
            REQUEST => Kind::Request,
            REQUEST_RELEASED => Kind::Released,
            kind if kind.starts_with(ANOMALY_PREFIX) => Kind::Anomaly,
            kind if kind.starts_with(ROTATION_PREFIX) => Kind::Rotation,
            _ => Kind::Other,
        }
    }
}

/// Whether `record` is a `rotation.promoted` event of `source`.
pub fn is_promotion_of(record: &Value, source: &str) -> bool {
    record.get("type").and_then(Value::as_str) == Some(ROTATION_PROMOTED)
        && record.get("source").and_then(Value::as_str) == Some(source)
}

impl AuditEvent {
    /// The event as JSON, without `timestamp`: what a notify webhook receives.
    pub fn to_json(&self) -> Value {
        let mut json = serde_json::to_value(self).expect("audit events always serialize");
        if let AuditEvent::Anomaly { detector, .. } = self {
            json["type"] = Value::String(format!("{ANOMALY_PREFIX}{detector}"));
        }
        json
    }

    /// The event as the trail records it, stamped `timestamp`.
    pub fn record_at(&self, timestamp: String) -> Value {
        let mut json = self.to_json();
        json["timestamp"] = Value::String(timestamp);
        json
    }

    /// The event as the trail records it, stamped now.
    pub fn record_now(&self) -> Value {
        self.record_at(crate::timestamp::now_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::canonical;
    use serde_json::json;

    fn rotation() -> RotationOf {
        RotationOf { source: "aws".into(), trigger: "manual" }
    }

    /// Each event against the `json!` it replaced: same keys, same values, same canonical line.
    #[test]
    fn events_serialise_as_the_trail_always_held_them() {
        let cases: Vec<(AuditEvent, Value)> = vec![
            (
                AuditEvent::AgentQuarantined {
                    agent_id: "a".into(),
                    by: "admin".into(),
                    minutes: None,
                    revoked_delegations: vec!["d1".into()],
                },
                json!({ "type": "agent.quarantined", "agentId": "a", "by": "admin", "minutes": null, "revoked_delegations": ["d1"] }),
            ),
            (
                AuditEvent::AgentReleased { agent_id: "a".into(), by: "admin".into(), was_limited: true },
                json!({ "type": "agent.released", "agentId": "a", "by": "admin", "was_limited": true }),
            ),
            (
                AuditEvent::AgentRevoked { agent_id: "a".into(), by: "admin".into() },
                json!({ "type": "agent.revoked", "agentId": "a", "by": "admin" }),
            ),
            (
                AuditEvent::DelegationMinted {
                    delegation_id: "d1".into(),
                    description: json!({ "id": "d1", "delegatedBy": ["a"], "max_requests": null }),
                },
                json!({ "type": "delegation.minted", "delegationId": "d1", "id": "d1", "delegatedBy": ["a"], "max_requests": null }),
            ),
            (
                AuditEvent::DelegationRefused {
                    agent_id: None,
                    status: 401,
                    error_code: "unknown_agent_key".into(),
                    message: None,
                },
                json!({ "type": "delegation.refused", "status": 401, "errorCode": "unknown_agent_key" }),
            ),
            (
                AuditEvent::DelegationRefused {
                    agent_id: Some("a".into()),
                    status: 403,
                    error_code: "delegation_exceeds_parent".into(),
                    message: Some("m".into()),
                },
                json!({ "type": "delegation.refused", "agentId": "a", "status": 403, "errorCode": "delegation_exceeds_parent", "message": "m" }),
            ),
            (
                AuditEvent::DelegationRevoked { delegation_id: "d1".into(), reason: "r".into(), by: "startup".into() },
                json!({ "type": "delegation.revoked", "delegationId": "d1", "reason": "r", "by": "startup" }),
            ),
            (
                AuditEvent::DelegationExpired { delegation_id: "d1".into(), delegated_by: vec!["a".into()], used: 3 },
                json!({ "type": "delegation.expired", "delegationId": "d1", "delegatedBy": ["a"], "used": 3 }),
            ),
            (
                AuditEvent::Anomaly {
                    detector: "rate_spike",
                    agent_id: "a".into(),
                    action: "alert",
                    reason: "r".into(),
                    value: 12.5,
                    threshold: 10.0,
                },
                json!({ "type": "anomaly.rate_spike", "agentId": "a", "action": "alert", "reason": "r", "value": 12.5, "threshold": 10.0 }),
            ),
            (
                AuditEvent::ConfigReloaded {
                    path: "k.toml".into(),
                    sources: 2,
                    sources_kept_cached: 1,
                    restart_needed: vec!["server"],
                },
                json!({ "type": "config.reloaded", "path": "k.toml", "sources": 2, "sourcesKeptCached": 1, "restartNeeded": ["server"] }),
            ),
            (
                AuditEvent::ConfigRejected { path: "k.toml".into(), problems: vec!["p".into()] },
                json!({ "type": "config.rejected", "path": "k.toml", "problems": ["p"] }),
            ),
            (
                AuditEvent::RotationNotified {
                    rotation: rotation(),
                    reason: "manual rotation requested".into(),
                    scheduled_at: None,
                },
                json!({ "type": "rotation.notified", "source": "aws", "trigger": "manual", "reason": "manual rotation requested" }),
            ),
            (
                AuditEvent::RotationNotified {
                    rotation: rotation(),
                    reason: "r".into(),
                    scheduled_at: Some("2026-11-23T22:05:00Z".into()),
                },
                json!({ "type": "rotation.notified", "source": "aws", "trigger": "manual", "reason": "r", "scheduledAt": "2026-11-23T22:05:00Z" }),
            ),
            (
                AuditEvent::RotationSkipped { rotation: rotation(), reason: "r".into() },
                json!({ "type": "rotation.skipped", "source": "aws", "trigger": "manual", "reason": "r" }),
            ),
            (
                AuditEvent::RotationProbeReleased {
                    source: "aws".into(),
                    route: "openai".into(),
                    credential: "K".into(),
                    to_version: None,
                },
                json!({ "type": "rotation.probe.released", "source": "aws", "route": "openai", "credential": "K", "toVersion": null }),
            ),
            (
                AuditEvent::RotationTested {
                    rotation: rotation(),
                    to_version: Some("v2".into()),
                    passed: false,
                    probes: vec![ProbeResult {
                        route: "openai".into(),
                        secret: "K".into(),
                        status: None,
                        passed: false,
                    }],
                    untested: false,
                },
                json!({ "type": "rotation.tested", "source": "aws", "trigger": "manual", "toVersion": "v2", "passed": false,
                        "probes": [{ "route": "openai", "secret": "K", "status": null, "passed": false }], "untested": false }),
            ),
            (
                AuditEvent::RotationPromoted {
                    rotation: rotation(),
                    from_version: None,
                    to_version: Some("v2".into()),
                    grace_period_minutes: 30,
                },
                json!({ "type": "rotation.promoted", "source": "aws", "trigger": "manual", "fromVersion": null, "toVersion": "v2", "gracePeriodMinutes": 30 }),
            ),
            (
                AuditEvent::RotationFailed { rotation: rotation(), reason: "r".into(), current_untouched: true },
                json!({ "type": "rotation.failed", "source": "aws", "trigger": "manual", "reason": "r", "currentUntouched": true }),
            ),
            (
                AuditEvent::RotationPurged { rotation: rotation(), purged_version: Some("v1".into()) },
                json!({ "type": "rotation.purged", "source": "aws", "trigger": "manual", "purgedVersion": "v1" }),
            ),
            (
                AuditEvent::AuditPruned { deleted: vec!["f".into()], retention_days: 90, first_surviving_hash: None },
                json!({ "type": "audit.pruned", "deleted": ["f"], "retention_days": 90, "first_surviving_hash": null }),
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(event.to_json(), expected);
            assert_eq!(canonical(&event.to_json()), canonical(&expected));
        }
    }

    #[test]
    fn readers_classify_records_by_type() {
        let of = |kind: &str| Kind::of(&json!({ "type": kind }));
        assert_eq!(of("request"), Kind::Request);
        assert_eq!(of("request.released"), Kind::Released);
        assert_eq!(of("anomaly.rate_spike"), Kind::Anomaly);
        assert_eq!(of("rotation.probe.released"), Kind::Rotation);
        assert_eq!(of("delegation.minted"), Kind::Other);
        assert_eq!(Kind::of(&json!({ "seq": 1 })), Kind::Other);
        let anomaly = AuditEvent::Anomaly {
            detector: "first_use",
            agent_id: "a".into(),
            action: "alert",
            reason: "r".into(),
            value: 1.0,
            threshold: 1.0,
        };
        assert_eq!(Kind::of(&anomaly.record_now()), Kind::Anomaly);
        let promoted = AuditEvent::RotationPromoted {
            rotation: RotationOf { source: "aws".into(), trigger: "scheduled" },
            from_version: None,
            to_version: None,
            grace_period_minutes: 0,
        };
        assert!(is_promotion_of(&promoted.record_now(), "aws"));
        assert!(!is_promotion_of(&promoted.record_now(), "vault"));
        assert_eq!(Kind::of(&promoted.record_now()), Kind::Rotation);
        let refused = AuditEvent::ForwardRefused {
            agent_id: None,
            ip: "127.0.0.1".into(),
            method: "CONNECT".into(),
            host: "169.254.169.254".into(),
            port: 443,
            status: 403,
            error_code: "connect_refused",
            key_fingerprint: None,
            via: "forward",
        };
        assert_eq!(
            refused.to_json(),
            json!({ "type": "forward.refused", "ip": "127.0.0.1", "method": "CONNECT", "host": "169.254.169.254",
                    "port": 443, "status": 403, "errorCode": "connect_refused", "via": "forward" })
        );
        let tunnel = AuditEvent::ForwardTunnel {
            agent_id: "a".into(),
            ip: "127.0.0.1".into(),
            host: "pypi.org".into(),
            port: 443,
            connected_to: "151.101.0.223:443".into(),
            bytes_from_agent: 10,
            bytes_to_agent: 20,
            duration_ms: 5,
            outcome: "closed",
            via: "forward",
        };
        assert_eq!(
            tunnel.to_json(),
            json!({ "type": "forward.tunnel", "agentId": "a", "ip": "127.0.0.1", "host": "pypi.org", "port": 443,
                    "connectedTo": "151.101.0.223:443", "bytesFromAgent": 10, "bytesToAgent": 20, "durationMs": 5,
                    "outcome": "closed", "via": "forward" })
        );
    }

    #[test]
    fn a_record_is_the_event_with_its_timestamp() {
        let event = AuditEvent::AgentRevoked { agent_id: "a".into(), by: "admin".into() };
        let record = event.record_at("2026-11-23T22:05:00.123Z".into());
        assert_eq!(
            record,
            json!({ "type": "agent.revoked", "agentId": "a", "by": "admin", "timestamp": "2026-11-23T22:05:00.123Z" })
        );
    }
}
