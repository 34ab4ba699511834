//! The audit record: the article's fields (`timestamp`, `agentId`, `operation`, `credential`,
//! `success`, `durationMs`, `ip`, `metadata`) plus what a security team needs to follow a request.
//!
//! `credential` is always a secret's name. No field can hold a secret value or an agent key.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

/// What keyward decided about the attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded with a credential (also when the request was then cut off: `request_aborted`).
    Allowed,
    /// Refused by keyward: bad request, unknown agent, not granted.
    Denied,
    /// Refused by a limit.
    Throttled,
    /// keyward could not complete it: secret store or upstream failure.
    Error,
    /// Forwarded, but a policy in shadow mode would have refused it (`wouldDeny` says which).
    WouldDeny,
}

/// How the attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The upstream answered below 400 and the whole response reached the agent.
    Success,
    /// The upstream answered 400 or above; its response reached the agent.
    UpstreamStatus,
    /// keyward refused the request (4xx of its own).
    Denied,
    Throttled,
    /// The upstream could not be reached, timed out, or broke off its response.
    UpstreamError,
    /// The secret store could not supply the credential.
    SecretError,
    /// keyward itself failed.
    InternalError,
    /// The audit trail could not record the release, so the credential was withheld.
    AuditError,
    /// The agent went away before it received the response head (status 499).
    ClientDisconnect,
    /// keyward shut down past its grace period and closed the response.
    Shutdown,
    /// The HTTP parser refused the request head, or it did not arrive whole in time: there was
    /// no request to identify, route or authorize (`errorCode` says which).
    Unparsed,
    /// The credential had been released and the request was on its way upstream when keyward
    /// cut it off because of the agent's request body: over the limit, malformed, or broken off.
    RequestAborted,
    /// keyward ended the stream at an event boundary because it would exhaust a budget with
    /// `cut_off = true`.
    BudgetCut,
}

/// What a metered call used and cost (fields in sorted order).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// `null` when the model has no price (and no cost budget applied).
    pub cost_usd: Option<f64>,
    pub input_tokens: u64,
    /// The model the answer named, else the one the request asked for.
    pub model: Option<String>,
    pub output_tokens: u64,
    /// `false` when the answer reported no usage and the call was charged its reservation
    /// (or, for a stream keyward cut off, its estimate).
    pub reported: bool,
}

/// A policy in shadow mode that would have refused the call (fields in sorted order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WouldDeny {
    /// `budget:NAME`, `grant:ROLE[i]`, `quota:ROUTE` or `role:NAME`.
    pub policy: String,
    pub reason: String,
}

/// Who ended the response body (fields in sorted order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ended {
    /// How far the response had got: `before_head`, `mid_body` or `end_of_body`.
    pub at: EndedAt,
    /// `upstream` (it finished or broke off its body), `agent` (it closed the connection or
    /// stream), or `keyward` (a read timeout or deadline, or a body it could not decode).
    pub by: EndedBy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    Agent,
    Upstream,
    Keyward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedAt {
    BeforeHead,
    MidBody,
    EndOfBody,
}

/// Fields are declared in the sorted order of their JSON names, so serde writes the canonical
/// form (sorted keys) directly, without building a `serde_json::Value` first.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub agent_id: Option<String>,
    /// The budgets the call was charged to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// On the forward proxy: the host the agent's CONNECT (or plain-HTTP request) named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_host: Option<String>,
    /// The secret's name, never its value.
    pub credential: Option<String>,
    pub decision: Decision,
    /// For a delegated child key: its parent first, up to the root agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegated_by: Option<Vec<String>>,
    pub duration_ms: u64,
    /// Who ended the response and how far it had got; absent when keyward answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// keyward's error code when keyward produced the response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
    /// The source whose credential `secretSource` stood in for (`fallback_to`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// The upstream refused the first credential (401/403) and keyward evicted it from the cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalidated: Option<InvalidatedCredential>,
    /// The connecting peer's address; client-supplied forwarding headers are not trusted.
    pub ip: String,
    /// For unknown keys: 12 hex chars of the key's SHA-256, to group probes without storing keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// The label the parent gave the delegation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub metadata: Arc<BTreeMap<String, String>>,
    pub method: String,
    /// For a secret whose kind mints tokens: the kind, the scope asked for and the token's
    /// expiry, or the status the mint endpoint gave when minting failed. Never a value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minted: Option<MintedCredential>,
    /// `<route> <METHOD> <path>`, the path below the route prefix, without the query.
    pub operation: String,
    pub outcome: Outcome,
    pub path: String,
    pub request_id: String,
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_version: Option<String>,
    /// For a credential kind that signs the request (`aws-sigv4`): the kind and what it signed
    /// for. Never a key or a signature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
    /// The status the agent received (499 when it left before the response head).
    pub status: u16,
    pub success: bool,
    pub timestamp: String,
    /// `request` for the outcome of an attempt, `request.released` for the record written before
    /// a credential goes onto the network.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Tokens and cost of a metered call (LLM APIs); absent for calls that report no usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageRecord>,
    /// How the request came in: `forward` on the forward proxy (absent on the reverse path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
    /// Shadow-mode policies that would have refused the call.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_deny: Vec<WouldDeny>,
}

/// How the request was signed (fields in sorted order).
#[derive(Debug, Clone, Serialize)]
pub struct Signed {
    /// The credential kind, `aws-sigv4`.
    pub kind: &'static str,
    pub region: String,
    pub service: String,
}

/// What happened after the upstream refused an injected credential (fields in sorted order).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InvalidatedCredential {
    /// `new_version`, `grace_previous`, `fallback_source`, `reminted` (a new token was minted from a
    /// minted secret), or `none` (the answer was returned),
    /// or `not_replayable` (the body was too large to send twice).
    pub retry: &'static str,
    /// The upstream's status for the refused credential.
    pub status: u16,
    /// The refused credential's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A minted credential, as the audit trail sees it (fields in sorted order). Never a value.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MintedCredential {
    /// When the injected token expires; absent when none could be minted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// `github-app`, `oauth2-client-credentials`, `gcp-service-account`.
    pub kind: &'static str,
    /// The mint endpoint's status when minting failed (absent when it could not be reached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mint_status: Option<u16>,
    /// The permissions the token was narrowed to (`github-app`, from the grant).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, String>,
    /// The repositories the token was narrowed to (`github-app`, from the grant).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
}

/// The `request.released` record: who is getting which credential, for what. Borrowed from the
/// request's record, so writing it copies nothing but the JSON it becomes.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Released<'a> {
    agent_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_host: Option<&'a str>,
    credential: Option<&'a str>,
    decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    delegated_by: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback_from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalidated: Option<&'a InvalidatedCredential>,
    ip: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
    metadata: &'a BTreeMap<String, String>,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    minted: Option<&'a MintedCredential>,
    operation: &'a str,
    path: &'a str,
    request_id: &'a str,
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    signed: Option<&'a Signed>,
    timestamp: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<&'static str>,
}

impl AuditRecord {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("audit records always serialize")
    }

    /// The record's canonical JSON (sorted keys, no whitespace), written straight from the struct.
    pub fn to_canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(768);
        super::chain::write_json(&mut out, self);
        out
    }

    /// The canonical JSON of the `request.released` record for this request, written at
    /// `timestamp` for `operation`.
    pub fn released_canonical(&self, timestamp: &str, operation: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(640);
        super::chain::write_json(&mut out, &self.released(timestamp, operation));
        out
    }

    /// The `request.released` record as a `Value`, to compare with the full record in tests.
    #[cfg(test)]
    fn released_json(&self, timestamp: &str, operation: &str) -> serde_json::Value {
        serde_json::to_value(self.released(timestamp, operation)).expect("audit records always serialize")
    }

    fn released<'a>(&'a self, timestamp: &'a str, operation: &'a str) -> Released<'a> {
        Released {
            kind: super::event::REQUEST_RELEASED,
            timestamp,
            request_id: &self.request_id,
            agent_id: self.agent_id.as_deref(),
            operation,
            credential: self.credential.as_deref(),
            ip: &self.ip,
            metadata: &self.metadata,
            route: self.route.as_deref(),
            method: &self.method,
            path: &self.path,
            decision: Decision::Allowed,
            secret_source: self.secret_source.as_deref(),
            secret_version: self.secret_version.as_deref(),
            signed: self.signed.as_ref(),
            delegated_by: self.delegated_by.as_deref(),
            label: self.label.as_deref(),
            fallback_from: self.fallback_from.as_deref(),
            invalidated: self.invalidated.as_ref(),
            connect_host: self.connect_host.as_deref(),
            via: self.via,
            minted: self.minted.as_ref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::canonical;

    /// The fields a `request.released` record keeps: who is getting which credential, for what.
    const RELEASED_FIELDS: [&str; 22] = [
        "via",
        "connectHost",
        "type",
        "timestamp",
        "requestId",
        "agentId",
        "operation",
        "credential",
        "ip",
        "metadata",
        "route",
        "method",
        "path",
        "decision",
        "secretSource",
        "secretVersion",
        "signed",
        "delegatedBy",
        "label",
        "fallbackFrom",
        "invalidated",
        "minted",
    ];

    fn record(filled: bool) -> AuditRecord {
        let some = |s: &str| filled.then(|| s.to_string());
        AuditRecord {
            kind: "request",
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            request_id: "00ff".into(),
            agent_id: some("agent-1"),
            operation: String::new(),
            credential: some("OPENAI"),
            success: false,
            duration_ms: 3,
            ip: "127.0.0.1".into(),
            metadata: Arc::new([("team".to_string(), "x".to_string())].into()),
            route: some("openai"),
            method: "POST".into(),
            path: "/v1/chat".into(),
            status: 0,
            decision: Decision::Denied,
            outcome: Outcome::Denied,
            error_code: filled.then_some("forbidden"),
            secret_source: some("aws"),
            secret_version: some("v1"),
            signed: filled.then(|| Signed { kind: "aws-sigv4", region: "us-east-1".into(), service: "bedrock".into() }),
            key_fingerprint: some("abc"),
            bytes_sent: filled.then_some(9),
            ended: filled.then_some(Ended { by: EndedBy::Agent, at: EndedAt::MidBody }),
            delegated_by: filled.then(|| vec!["parent".to_string()]),
            label: some("job"),
            fallback_from: some("prod"),
            invalidated: filled.then(|| InvalidatedCredential {
                status: 401,
                version: some("v0"),
                retry: "new_version",
            }),
            budgets: if filled { vec!["daily".to_string()] } else { Vec::new() },
            usage: filled.then(|| UsageRecord {
                cache_read_tokens: 1,
                cache_write_tokens: 2,
                cost_usd: Some(0.5),
                input_tokens: 3,
                model: some("gpt-4o"),
                output_tokens: 4,
                reported: true,
            }),
            would_deny: if filled {
                vec![WouldDeny { policy: "budget:daily".into(), reason: "r".into() }]
            } else {
                Vec::new()
            },
            connect_host: some("api.github.com"),
            via: filled.then_some("forward"),
            minted: filled.then(|| MintedCredential {
                expires_at: some("2026-01-01T01:00:00Z"),
                kind: "github-app",
                mint_status: Some(201),
                permissions: [("contents".to_string(), "read".to_string())].into(),
                repositories: vec!["keyward".to_string()],
            }),
        }
    }

    #[test]
    fn the_released_record_is_the_full_record_cut_to_its_fields() {
        for filled in [true, false] {
            let record = record(filled);
            let mut full = record.clone();
            full.kind = "request.released";
            full.timestamp = "2026-01-01T00:00:01.000Z".into();
            full.operation = "openai POST /v1/chat".into();
            full.decision = Decision::Allowed;
            let mut expected = full.to_json();
            expected.as_object_mut().unwrap().retain(|key, _| RELEASED_FIELDS.contains(&key.as_str()));
            assert_eq!(record.released_json("2026-01-01T00:00:01.000Z", "openai POST /v1/chat"), expected);
        }
    }

    #[test]
    fn records_serialize_straight_to_their_canonical_form() {
        for filled in [true, false] {
            let record = record(filled);
            assert_eq!(String::from_utf8(record.to_canonical()).unwrap(), canonical(&record.to_json()));
            let released = record.released_canonical("2026-01-01T00:00:01.000Z", "openai POST /v1/chat");
            let expected = canonical(&record.released_json("2026-01-01T00:00:01.000Z", "openai POST /v1/chat"));
            assert_eq!(String::from_utf8(released).unwrap(), expected);
        }
    }
}
