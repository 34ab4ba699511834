//! The audit guard (agentgateway's `DropOnLog`): created first for every request, filled in by
//! each stage, and emitted exactly once, on whichever path the request ends. A guard dropped
//! without an explicit ending records an agent that left before the response head (499).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::Method;
use rand::Rng;

use super::chain::Line;
use super::record::{
    AuditRecord, Decision, Ended, EndedAt, EndedBy, InvalidatedCredential, Outcome, Signed, UsageRecord, WouldDeny,
};
use super::sink::AuditSink;
use crate::config::OnFailure;
use crate::error::{Origin, ProxyError};
use crate::metrics::{Metrics, RequestLabels, RouteLabel};
use crate::scrub::Scrubber;

/// What a request stage learned, for the record.
pub struct AuditGuard {
    sink: Arc<AuditSink>,
    metrics: Arc<Metrics>,
    /// Applied to the finished line: an agent that knows a credential could put it in the path.
    scrubber: Arc<ArcSwap<Scrubber>>,
    started: Instant,
    record: AuditRecord,
    emitted: bool,
    /// Write the one-line access log when the outcome is emitted (`server.access_log`).
    access_log: bool,
    /// A `request.released` record was written: the credential may be on its way upstream.
    released: bool,
    /// Released with the guard, when the response is done (an in-flight slot).
    held: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Settles a metered call's budgets once it has ended, exactly once, on every path.
    settle: Option<Settle>,
}

/// Called when the attempt ends with whether the credential was released; returns what the
/// call used and whether keyward cut its stream off for a budget.
pub type Settle = Box<dyn FnOnce(bool) -> Settled + Send + Sync>;

/// What settling a metered call found.
pub struct Settled {
    pub usage: Option<UsageRecord>,
    pub cut: bool,
}

/// How a proxied response body ended, once the agent had the response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The upstream's body reached its end.
    Complete,
    /// The upstream's connection broke off mid-body.
    UpstreamBroke,
    /// keyward cut the body off: a read timeout or deadline, or a body it could not decode.
    KeywardCut,
    /// The agent closed the connection or stream: normal once it has what it wanted (an SSE
    /// stream after `data: [DONE]`, an MCP client's stream).
    AgentLeft,
}

pub fn new_request_id() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    hex::encode(bytes)
}

impl AuditGuard {
    pub fn begin(
        sink: Arc<AuditSink>,
        metrics: Arc<Metrics>,
        scrubber: Arc<ArcSwap<Scrubber>>,
        metadata: Arc<BTreeMap<String, String>>,
        ip: Option<IpAddr>,
        method: &Method,
        path: &str,
    ) -> AuditGuard {
        let record = AuditRecord {
            kind: super::event::REQUEST,
            timestamp: String::new(),
            request_id: new_request_id(),
            agent_id: None,
            operation: String::new(),
            credential: None,
            success: false,
            duration_ms: 0,
            ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
            metadata,
            route: None,
            method: method.to_string(),
            path: path.to_string(),
            status: 0,
            decision: Decision::Denied,
            outcome: Outcome::Denied,
            error_code: None,
            secret_source: None,
            secret_version: None,
            signed: None,
            key_fingerprint: None,
            bytes_sent: None,
            ended: None,
            delegated_by: None,
            label: None,
            fallback_from: None,
            invalidated: None,
            budgets: Vec::new(),
            usage: None,
            would_deny: Vec::new(),
            connect_host: None,
            via: None,
            minted: None,
        };
        AuditGuard {
            sink,
            metrics,
            scrubber,
            started: Instant::now(),
            record,
            emitted: false,
            access_log: true,
            released: false,
            held: None,
            settle: None,
        }
    }

    /// Records an attempt that never became a request (see `server::Unparsed`): `peer` was
    /// answered `error` before any head could be read, so method, path and agent are unknown.
    pub fn unparsed(
        sink: Arc<AuditSink>,
        metrics: Arc<Metrics>,
        scrubber: Arc<ArcSwap<Scrubber>>,
        metadata: Arc<BTreeMap<String, String>>,
        peer: String,
        error: &ProxyError,
        access_log: bool,
    ) {
        let mut guard = AuditGuard::begin(sink, metrics, scrubber, metadata, None, &Method::GET, "");
        guard.access_log(access_log);
        guard.record.method = String::new();
        guard.record.ip = peer;
        guard.fail(error);
    }

    pub fn request_id(&self) -> &str {
        &self.record.request_id
    }

    /// Whether this attempt gets an access log line (on unless `server.access_log = false`).
    pub fn access_log(&mut self, enabled: bool) {
        self.access_log = enabled;
    }

    /// The route matched; `rest` is the path below its prefix.
    pub fn route(&mut self, route: &str, rest: &str) {
        self.record.route = Some(route.to_string());
        self.record.path = if rest.is_empty() { "/".to_string() } else { rest.to_string() };
    }

    /// The request came in on the forward proxy, through a tunnel to (or a plain-HTTP request
    /// for) `host`.
    pub fn via_forward(&mut self, host: &str) {
        self.record.via = Some("forward");
        self.record.connect_host = Some(host.to_string());
    }

    /// The agent's key never stands in the trail: a path that carries it (such a request is
    /// refused with `agent_key_in_url`) is recorded, and access-logged, with the key replaced.
    pub fn redact_agent_key(&mut self, key: &str) {
        if key.len() < crate::outbound::MIN_SEARCHED_KEY_LEN {
            return;
        }
        if self.record.path.contains(key) {
            self.record.path = self.record.path.replace(key, "[agent-key]");
        }
        // Percent-encoded (`kw_%41bc…`), the key is as readable: the path is recorded decoded then.
        let decoded = percent_encoding::percent_decode_str(&self.record.path).decode_utf8_lossy();
        if decoded.contains(key) {
            self.record.path = decoded.replace(key, "[agent-key]");
        }
    }

    /// The caller came over the Unix socket as `uid`: recorded as its address, `unix:uid=N`.
    pub fn unix_peer(&mut self, uid: u32) {
        self.record.ip = format!("unix:uid={uid}");
    }

    pub fn agent(&mut self, agent_id: &str) {
        self.record.agent_id = Some(agent_id.to_string());
    }

    /// Keeps `resource` until the request is completely finished.
    pub fn hold(&mut self, resource: impl std::any::Any + Send + Sync) {
        self.held = Some(Box::new(resource));
    }

    /// The caller is a delegated child key minted down `chain` (parent first).
    pub fn delegation(&mut self, chain: &[String], label: Option<&str>) {
        self.record.delegated_by = Some(chain.to_vec());
        self.record.label = label.map(str::to_string);
    }

    /// The call is metered: `settle` runs when it ends, and its usage goes into the record.
    pub fn settle_with(&mut self, budgets: Vec<String>, settle: Settle) {
        self.record.budgets = budgets;
        self.settle = Some(settle);
    }

    /// A policy in shadow mode would have refused the call.
    pub fn would_deny(&mut self, policy: String, reason: String) {
        self.record.would_deny.push(WouldDeny { policy, reason });
    }

    pub fn key_fingerprint(&mut self, fingerprint: String) {
        self.record.key_fingerprint = Some(fingerprint);
    }

    pub fn credential(&mut self, name: &str) {
        self.record.credential = Some(name.to_string());
    }

    pub fn secret(&mut self, source: &str, version: Option<&str>, fallback_from: Option<&str>) {
        self.record.secret_source = Some(source.to_string());
        self.record.secret_version = version.map(str::to_string);
        self.record.fallback_from = fallback_from.map(str::to_string);
    }

    /// The credential kind `kind` signs the request for `service` in `region`.
    pub fn signed(&mut self, kind: &'static str, service: &str, region: &str) {
        self.record.signed = Some(Signed { kind, region: region.to_string(), service: service.to_string() });
    }

    /// The credential is a token minted from the secret (`mint_status`: the mint endpoint's
    /// status when minting failed).
    pub fn minted(
        &mut self,
        kind: &'static str,
        scope: &crate::credentials::MintScope,
        expires_at: Option<std::time::SystemTime>,
        mint_status: Option<u16>,
    ) {
        self.record.minted = Some(super::record::MintedCredential {
            expires_at: expires_at.map(crate::timestamp::seconds),
            kind,
            mint_status,
            permissions: scope.permissions.clone(),
            repositories: scope.repositories.clone(),
        });
    }

    /// The upstream refused the credential with `status`; `retry` says what keyward did next.
    pub fn invalidated(&mut self, status: u16, version: Option<&str>, retry: &'static str) {
        self.record.invalidated = Some(InvalidatedCredential { status, version: version.map(str::to_string), retry });
    }

    pub fn upstream_status(&mut self, status: u16) {
        self.record.status = status;
    }

    /// Writes the `request.released` record and waits until it is durable, before the credential
    /// goes onto the network. If the audit file cannot be written and `on_failure = "deny"`, the
    /// credential is withheld.
    pub async fn release(&mut self) -> Result<(), ProxyError> {
        let timestamp = crate::timestamp::now_millis();
        let line =
            scrubbed(&self.scrubber.load(), self.record.released_canonical(&timestamp, &operation(&self.record)));
        let released = match self.sink.record_durably(line).await {
            Ok(()) => Ok(()),
            Err(failure) if self.sink.on_failure() == OnFailure::Allow => {
                tracing::error!(request_id = %self.record.request_id, error = %failure.0,
                    "audit record not written; forwarding anyway because audit.on_failure = \"allow\"");
                Ok(())
            }
            Err(_) => Err(ProxyError::AuditUnavailable),
        };
        self.released |= released.is_ok();
        released
    }

    /// keyward refused or failed the request with `error`.
    pub fn fail(mut self, error: &ProxyError) {
        self.record.status = error.status().as_u16();
        self.record.error_code = Some(error.code());
        let (decision, outcome) = match (error.origin(), error) {
            (
                _,
                ProxyError::SecretStoreUnavailable { .. }
                | ProxyError::SecretNotFound { .. }
                | ProxyError::SigningUnavailable { .. }
                | ProxyError::MintFailed { .. },
            ) => (Decision::Error, Outcome::SecretError),
            (
                _,
                ProxyError::BadRequestHead
                | ProxyError::RequestHeadTooLarge
                | ProxyError::UriTooLong
                | ProxyError::RequestHeadTimeout,
            ) => (Decision::Denied, Outcome::Unparsed),
            // The agent's body ended the call after the credential had gone out with its head.
            (Origin::Downstream, _) if self.released => (Decision::Allowed, Outcome::RequestAborted),
            (Origin::Downstream, _) if error.status() == http::StatusCode::TOO_MANY_REQUESTS => {
                (Decision::Throttled, Outcome::Throttled)
            }
            (Origin::Downstream, _) => (Decision::Denied, Outcome::Denied),
            (_, ProxyError::AuditUnavailable) => (Decision::Error, Outcome::AuditError),
            (Origin::Upstream, _) => (Decision::Error, Outcome::UpstreamError),
            (Origin::Internal, _) => (Decision::Error, Outcome::InternalError),
        };
        self.emit(decision, outcome);
    }

    /// The response body ended after `bytes` bytes reached the agent, which had the head (and
    /// so the upstream's status) already. An agent that leaves mid-body does not make the call a
    /// failure: it got the answer it asked for, or the part of it that it wanted.
    pub fn finish(mut self, end: BodyEnd, bytes: u64) {
        self.record.bytes_sent = Some(bytes);
        if end == BodyEnd::AgentLeft && self.sink.is_closing() {
            self.record.ended = Some(Ended { by: EndedBy::Keyward, at: EndedAt::MidBody });
            return self.emit(Decision::Allowed, Outcome::Shutdown);
        }
        let answered = if self.record.status < 400 { Outcome::Success } else { Outcome::UpstreamStatus };
        let (by, at, outcome) = match end {
            BodyEnd::Complete => (EndedBy::Upstream, EndedAt::EndOfBody, answered),
            BodyEnd::AgentLeft => (EndedBy::Agent, EndedAt::MidBody, answered),
            BodyEnd::UpstreamBroke => (EndedBy::Upstream, EndedAt::MidBody, Outcome::UpstreamError),
            BodyEnd::KeywardCut => (EndedBy::Keyward, EndedAt::MidBody, Outcome::UpstreamError),
        };
        self.record.ended = Some(Ended { by, at });
        self.emit(Decision::Allowed, outcome);
    }

    fn emit(&mut self, mut decision: Decision, mut outcome: Outcome) {
        if std::mem::replace(&mut self.emitted, true) {
            return;
        }
        if let Some(settle) = self.settle.take() {
            let settled = settle(self.released);
            self.record.usage = settled.usage;
            if settled.cut && matches!(outcome, Outcome::Success | Outcome::UpstreamStatus) {
                outcome = Outcome::BudgetCut;
                self.record.ended = Some(Ended { by: EndedBy::Keyward, at: EndedAt::MidBody });
            }
        }
        if decision == Decision::Allowed && !self.record.would_deny.is_empty() {
            decision = Decision::WouldDeny;
        }
        let elapsed = self.started.elapsed();
        let record = &mut self.record;
        record.timestamp = crate::timestamp::now_millis();
        record.duration_ms = elapsed.as_millis() as u64;
        record.decision = decision;
        record.outcome = outcome;
        record.success = outcome == Outcome::Success;
        record.operation = operation(record);
        let route = record.route.clone().unwrap_or_default();
        let decision_label = match decision {
            Decision::Allowed => "allowed",
            Decision::Denied => "denied",
            Decision::Throttled => "throttled",
            Decision::Error => "error",
            Decision::WouldDeny => "would_deny",
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels { route: route.clone(), status: record.status, decision: decision_label })
            .inc();
        self.metrics.request_duration.get_or_create(&RouteLabel { route }).observe(elapsed.as_secs_f64());
        tracing::debug!(
            request_id = %record.request_id,
            agent = record.agent_id.as_deref().unwrap_or("-"),
            route = record.route.as_deref().unwrap_or("-"),
            status = record.status,
            outcome = ?outcome,
            "request finished"
        );
        let scrubber = self.scrubber.load();
        if self.access_log {
            super::access_log::log(record, &scrubber, elapsed);
        }
        self.sink.record(scrubbed(&scrubber, record.to_canonical()));
    }
}

/// The record as a chain line, scrubbed: an agent that knows a credential could put it in the
/// path. A record that may hold one is scrubbed string by string, like any event.
fn scrubbed(scrubber: &Scrubber, canonical: Vec<u8>) -> Line {
    if !scrubber.may_appear_in_json(&canonical) {
        return Line::from_canonical(canonical);
    }
    let mut value: serde_json::Value = serde_json::from_slice(&canonical).expect("records serialize to JSON");
    scrubber.scrub_json(&mut value);
    Line::from_value(value)
}

fn operation(record: &AuditRecord) -> String {
    format!("{} {} {}", record.route.as_deref().unwrap_or("-"), record.method, record.path)
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if !self.emitted {
            // The request future, or a response body never polled, was dropped: the agent went
            // away before the response head. Allowed only once the credential was released: an
            // agent that leaves while keyward still reads its body took nothing with it.
            let decision = if self.released { Decision::Allowed } else { Decision::Denied };
            self.record.status = 499;
            if self.sink.is_closing() {
                self.record.ended = Some(Ended { by: EndedBy::Keyward, at: EndedAt::BeforeHead });
                self.emit(decision, Outcome::Shutdown);
            } else {
                self.record.ended = Some(Ended { by: EndedBy::Agent, at: EndedAt::BeforeHead });
                self.emit(decision, Outcome::ClientDisconnect);
            }
        }
    }
}
