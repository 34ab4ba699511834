//! Credential rotation, the article's notify → prepare → switch → clean up → verify: find the
//! pending version, test it with each route's probe, promote it, swap it into the cache, and purge
//! the old one when the grace period ends. Every phase is an audit event and a notification.

pub mod schedule;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Request};
use secrecy::SecretString;

use crate::audit::event::{AuditEvent, ProbeResult, RotationOf};
use crate::config::{RotationPolicy, RouteConfig};
use crate::credentials::{Fetched, StoreError};
use crate::forward::OutboundBody;
use crate::metrics::RotationLabels;
use crate::state::{AppState, RotationRun, Runtime};

/// Why a rotation run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Scheduled,
    Manual,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Manual => "manual",
        }
    }
}

/// Why a rotation could not start or did not promote.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RotationError {
    #[error("no secret or source is named '{0}'")]
    UnknownSecret(String),
    #[error("source '{0}' cannot rotate: {1}")]
    Unsupported(String, String),
    #[error("a rotation of source '{0}' is already running")]
    AlreadyRunning(String),
    #[error("{0}")]
    Store(StoreError),
    #[error("the candidate failed validation: {0}")]
    Failed(String),
}

/// The source a name refers to: a secret's source, or a source by its own name.
pub fn source_for(runtime: &Runtime, name: &str) -> Option<String> {
    if let Some(source) = runtime.secrets.source_of(name) {
        return Some(source.to_string());
    }
    runtime.config.sources.iter().any(|s| s.name == name).then(|| name.to_string())
}

/// Runs one rotation of `source`. With `new_value`, that value is first staged as the pending
/// version of secret `name` (AWS `PutSecretValue`).
pub async fn rotate(
    state: &Arc<AppState>,
    source: &str,
    trigger: Trigger,
    new_value: Option<(String, SecretString)>,
) -> Result<RotationRun, RotationError> {
    let runtime = state.runtime.load_full();
    let Some(config) = runtime.config.sources.iter().find(|s| s.name == source) else {
        return Err(RotationError::UnknownSecret(source.to_string()));
    };
    let policy = config.rotation.clone().unwrap_or(RotationPolicy {
        enabled: true,
        schedule: None,
        grace_period: Duration::ZERO,
        notify: None,
        notify_ahead: Duration::ZERO,
    });
    if !policy.enabled {
        return Err(RotationError::Unsupported(
            source.to_string(),
            "its rotation is disabled (enabled = false)".into(),
        ));
    }
    let Some(provider) = runtime.secrets.provider(source) else {
        return Err(RotationError::UnknownSecret(source.to_string()));
    };
    let Some(rotatable) = provider.rotation() else {
        return Err(RotationError::Unsupported(
            source.to_string(),
            format!("provider '{}' has no versions to rotate", config.provider.kind()),
        ));
    };
    let Some(_running) = state.rotations.start(source) else {
        return Err(RotationError::AlreadyRunning(source.to_string()));
    };
    let phases = Phases { state, policy: &policy, source, trigger };
    if trigger == Trigger::Manual {
        phases.event(AuditEvent::RotationNotified {
            rotation: phases.of(),
            reason: "manual rotation requested".into(),
            scheduled_at: None,
        });
    }

    let result: Result<(Option<String>, Option<Fetched>), RotationError> = async {
        if let Some((name, value)) = &new_value {
            rotatable.stage(name, value).await.map_err(RotationError::Store)?;
        }
        let current = runtime.secrets.current(source).await.map_err(RotationError::Store)?;
        let Some(candidate) = rotatable.candidate(&current).await.map_err(RotationError::Store)? else {
            return Ok((current.version.clone(), None));
        };
        test(&phases, &runtime, &config.mapping.keys().cloned().collect::<Vec<_>>(), &candidate).await?;
        rotatable.promote(&candidate).await.map_err(RotationError::Store)?;
        Ok((current.version.clone(), Some(candidate)))
    }
    .await;

    let mut run = RotationRun {
        source: source.to_string(),
        trigger: trigger.as_str(),
        outcome: "failed",
        at: crate::timestamp::seconds(SystemTime::now()),
        from_version: None,
        to_version: None,
        reason: None,
    };
    let failure = match result {
        Ok((from_version, None)) => {
            phases.event(AuditEvent::RotationSkipped {
                rotation: phases.of(),
                reason: "nothing to rotate: no pending version is newer than the current one".into(),
            });
            run.outcome = "nothing_to_rotate";
            run.from_version = from_version;
            run.reason = Some("no pending version".into());
            None
        }
        Ok((from_version, Some(candidate))) => {
            let to_version = candidate.version.clone();
            // The store serving now: a reload during the run may have replaced the one it began on.
            let serving = state.runtime.load_full();
            let epoch = serving.secrets.install(source, candidate, policy.grace_period);
            phases.event(AuditEvent::RotationPromoted {
                rotation: phases.of(),
                from_version: from_version.clone(),
                to_version: to_version.clone(),
                grace_period_minutes: policy.grace_period.as_secs() / 60,
            });
            if let Some(epoch) = epoch {
                schedule_purge(state.clone(), policy.clone(), source.to_string(), trigger, epoch, from_version.clone());
            }
            run.outcome = "promoted";
            run.from_version = from_version;
            run.to_version = to_version;
            None
        }
        Err(error) => {
            phases.event(AuditEvent::RotationFailed {
                rotation: phases.of(),
                reason: error.to_string(),
                current_untouched: true,
            });
            run.reason = Some(error.to_string());
            Some(error)
        }
    };
    state.metrics.rotations.get_or_create(&RotationLabels { source: source.to_string(), outcome: run.outcome }).inc();
    state.rotations.record(run.clone());
    match failure {
        Some(error) => Err(error),
        None => Ok(run),
    }
}

/// Drops the replaced version once the grace period ends (at once without one).
fn schedule_purge(
    state: Arc<AppState>,
    policy: RotationPolicy,
    source: String,
    trigger: Trigger,
    epoch: u64,
    version: Option<String>,
) {
    tokio::spawn(async move {
        tokio::time::sleep(policy.grace_period).await;
        if state.runtime.load().secrets.purge_previous(&source, epoch) {
            let phases = Phases { state: &state, policy: &policy, source: &source, trigger };
            phases.event(AuditEvent::RotationPurged { rotation: phases.of(), purged_version: version });
        }
    });
}

/// Writes one phase's audit event and sends its notification.
struct Phases<'a> {
    state: &'a Arc<AppState>,
    policy: &'a RotationPolicy,
    source: &'a str,
    trigger: Trigger,
}

impl Phases<'_> {
    /// The run this phase belongs to, for its event.
    fn of(&self) -> RotationOf {
        RotationOf { source: self.source.to_string(), trigger: self.trigger.as_str() }
    }

    fn event(&self, event: AuditEvent) {
        let detail = event.to_json();
        let kind = detail["type"].as_str().unwrap_or_default();
        tracing::info!(source = self.source, event = kind, "rotation");
        self.state.audit_event(event);
        notify(self.state, self.policy, detail);
    }
}

fn notify(state: &AppState, policy: &RotationPolicy, event: serde_json::Value) {
    if let Some(url) = policy.notify.clone() {
        let forwarder = state.forwarder.clone();
        tokio::spawn(async move { forwarder.notify(&url, &event).await });
    }
}

/// Tests `candidate` with the probe of every route that a grant uses one of its secrets on.
async fn test(
    phases: &Phases<'_>,
    runtime: &Runtime,
    names: &[String],
    candidate: &Fetched,
) -> Result<(), RotationError> {
    if let Some(missing) = names.iter().find(|n| !candidate.values.contains_key(*n)) {
        return Err(RotationError::Failed(format!("the candidate has no value for '{missing}'")));
    }
    let mut pairs: Vec<(&RouteConfig, &String, &std::sync::Arc<crate::credentials::MintScope>)> = Vec::new();
    for role in runtime.config.roles.values() {
        for grant in role.grants.iter().filter(|g| names.contains(&g.secret)) {
            if let Some(route) = runtime.config.routes.iter().find(|r| r.name == grant.route)
                && route.validate.is_some()
                && !pairs.iter().any(|(r, s, _)| r.name == route.name && **s == grant.secret)
            {
                pairs.push((route, &grant.secret, &grant.scope));
            }
        }
    }
    let mut results = Vec::new();
    let mut passed = true;
    for (route, name, scope) in pairs {
        let probe = route.validate.as_ref().expect("filtered above");
        // Like every credential keyward sends, the candidate goes out only after a durable record.
        let released = AuditEvent::RotationProbeReleased {
            source: phases.source.to_string(),
            route: route.name.clone(),
            credential: name.clone(),
            to_version: candidate.version.clone(),
        };
        if phases.state.audit_event_durably(released).await.is_err() {
            return Err(RotationError::Failed("the audit trail cannot be written, so no probe was sent".into()));
        }
        // A minted secret's candidate is a root: the probe sends a token minted from it, never
        // the root itself.
        let root = &candidate.values[name];
        let forwarder = &phases.state.forwarder;
        let value = match runtime.minter.probe_token(forwarder, name, root, &route.upstream, scope).await {
            None => Ok(root.clone()),
            Some(Ok(token)) => Ok(token),
            Some(Err(error)) => {
                tracing::warn!(route = %route.name, secret = %name, %error, "rotation probe: no token could be minted from the candidate");
                Err(())
            }
        };
        let status = match value.and_then(|value| probe_request(route, &value).map_err(|_| ())) {
            Ok(request) => match phases.state.forwarder.send(request, &route.name).await {
                Ok(response) => Some(response.status().as_u16()),
                Err(e) => {
                    tracing::warn!(route = %route.name, error = %e, "rotation probe could not reach the upstream");
                    None
                }
            },
            Err(_) => None,
        };
        let ok = status.is_some_and(|s| probe.expect.contains(&s));
        passed &= ok;
        results.push(ProbeResult { route: route.name.clone(), secret: name.clone(), status, passed: ok });
    }
    let untested = results.is_empty();
    phases.event(AuditEvent::RotationTested {
        rotation: phases.of(),
        to_version: candidate.version.clone(),
        passed,
        probes: results,
        untested,
    });
    if passed {
        Ok(())
    } else {
        Err(RotationError::Failed("a route's validate probe did not get an expected status".into()))
    }
}

fn probe_request(route: &RouteConfig, value: &SecretString) -> Result<Request<OutboundBody>, crate::error::ProxyError> {
    let probe = route.validate.as_ref().expect("probe routes only");
    let (path, query) = match probe.path.split_once('?') {
        Some((path, query)) => (path, Some(query.to_string())),
        None => (probe.path.as_str(), None),
    };
    let mut headers = HeaderMap::new();
    let mut query = query;
    crate::inject::apply(&route.inject, value, &mut headers, &mut query)?;
    let uri = route
        .upstream
        .uri(path, query.as_deref())
        .map_err(|_| crate::error::ProxyError::Internal("could not build the probe URI"))?;
    let mut request = Request::new(crate::forward::empty_body());
    *request.method_mut() = probe.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}
