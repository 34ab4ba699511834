//! Limits, in one place the pipeline asks: is the agent quarantined, is this call within its
//! quota (halved, quartered... while throttled), may it have another request in flight, and what
//! did the call tell the anomaly detectors. State survives config reloads.

pub mod anomaly;
pub mod budget;
pub mod metered;
pub mod quota;
pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::{AnomalyAction, AnomalyConfig, LimitsBackend, LimitsConfig, Quota};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use anomaly::{AgentActivity, Finding, FirstUses};
use quota::Quotas;
use shared::Shared;

/// An agent's standing, as the admin API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Standing {
    pub quarantined_until: Option<String>,
    pub throttled_until: Option<String>,
    pub throttle_fraction: Option<f64>,
    pub rate_this_minute: u32,
    pub baseline_per_minute: f64,
    pub flags: Vec<Finding>,
}

#[derive(Default)]
struct AgentState {
    activity: AgentActivity,
    /// `None` inside: quarantined until an admin releases it.
    quarantined: Option<Option<SystemTime>>,
    /// Redis has confirmed this quarantine (only those may be lifted by a poll).
    quarantine_confirmed: bool,
    throttled: Option<(SystemTime, f64)>,
    flags: Vec<Finding>,
}

/// What a detector found and the action it takes, for the audit trail and the notify webhook
/// (named apart from `audit::Decision`, which is what became of a request).
pub struct Detection {
    pub finding: Finding,
    pub action: AnomalyAction,
}

#[derive(Default)]
pub struct Limits {
    quotas: Quotas,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
    agents: Mutex<HashMap<String, AgentState>>,
    /// Every (route, credential) pair each agent has ever used, and the pairs not yet written
    /// to Redis (with the Redis backend).
    first_uses: Mutex<(FirstUses, Vec<FirstUse>)>,
    /// Woken when state that must survive a restart changed (a new first use, a quarantine).
    pub changed: tokio::sync::Notify,
    /// The Redis backend, when `limits.backend = "redis"`.
    pub shared: Option<Arc<Shared>>,
    /// Token and cost budgets (their accounts; the budgets themselves are config).
    pub budgets: Arc<budget::Budgets>,
}

/// One (agent, route, credential) first use.
pub type FirstUse = (String, String, String);

/// Quarantines as they are persisted: agent → until (unix ms), or `None` for until released.
pub type QuarantineMap = std::collections::BTreeMap<String, Option<u64>>;

/// One in-flight slot, released when dropped.
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Limits {
    pub fn new(config: &LimitsConfig, metrics: Arc<Metrics>) -> Limits {
        let shared = match &config.backend {
            LimitsBackend::Local => None,
            LimitsBackend::Redis { url } => match Shared::new(url, config.fail_open, metrics) {
                Ok(shared) => Some(Arc::new(shared)),
                Err(error) => {
                    tracing::error!(%error, "the redis limits backend cannot be used; limits stay local");
                    None
                }
            },
        };
        Limits { shared, ..Limits::default() }
    }

    /// Refuses a quarantined agent (a quarantine with a cool-down lifts itself).
    /// Returns the fraction its quotas are cut to while it is throttled (one lock for both).
    pub fn gate(&self, agent: &str, now: SystemTime) -> Result<Option<f64>, ProxyError> {
        let mut agents = self.agents.lock().expect("limits lock");
        let Some(state) = agents.get_mut(agent) else { return Ok(None) };
        match state.quarantined {
            Some(None) => return Err(ProxyError::Quarantined { agent: agent.to_string() }),
            Some(Some(until)) if now < until => return Err(ProxyError::Quarantined { agent: agent.to_string() }),
            Some(Some(_)) => state.quarantined = None,
            None => {}
        }
        match state.throttled {
            Some((until, fraction)) if now < until => Ok(Some(fraction)),
            Some(_) => {
                state.throttled = None;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Takes one call from the (agent, route) quota, cut to `throttled` (from `gate`) while the
    /// agent is throttled; across replicas when Redis is the backend.
    pub async fn check_quota(
        &self,
        agent: &str,
        route: &str,
        quota: &Quota,
        throttled: Option<f64>,
    ) -> Result<(), ProxyError> {
        let effective = match throttled {
            Some(f) => Quota {
                count: ((f64::from(quota.count) * f).ceil() as u32).max(1),
                burst: ((f64::from(quota.burst) * f).ceil() as u32).max(1),
                period: quota.period,
            },
            None => *quota,
        };
        let throttled = |t: quota::Throttle| ProxyError::Throttled {
            agent: agent.to_string(),
            route: route.to_string(),
            limit: t.limit,
            retry_after: t.retry_after,
            window: effective.period,
        };
        if let Some(shared) = &self.shared {
            // '|' cannot appear in agent or route names, so no two pairs share a bucket.
            match shared.check(&effective, &format!("{agent}|{route}")).await {
                Ok(answer) => return answer.map_err(throttled),
                Err(()) if !shared.fail_open => return Err(ProxyError::LimiterUnavailable),
                Err(()) => {}
            }
        }
        let key = format!("{agent}|{route}");
        self.quotas.check(&effective, &key).map(|_| ()).map_err(throttled)
    }

    /// Takes an in-flight slot for `agent` if it has fewer than `max`.
    pub fn enter(&self, agent: &str, max: u32) -> Result<InFlight, ProxyError> {
        let counter = self.in_flight.lock().expect("limits lock").entry(agent.to_string()).or_default().clone();
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < max).then_some(n + 1))
            .map(|_| InFlight(counter.clone()))
            .map_err(|_| ProxyError::TooManyInFlight { agent: agent.to_string(), max })
    }

    fn apply(
        &self,
        agent: &str,
        state: &mut AgentState,
        fired: Vec<(Finding, crate::config::Detector)>,
        now: SystemTime,
    ) -> Vec<Detection> {
        fired
            .into_iter()
            .map(|(finding, detector)| {
                match detector.action {
                    AnomalyAction::Alert => {}
                    AnomalyAction::Throttle => state.throttled = Some((now + detector.cooldown, detector.throttle_fraction)),
                    AnomalyAction::Quarantine => {
                        state.quarantined = Some(Some(now + detector.cooldown));
                        state.quarantine_confirmed = false;
                        self.share_quarantine(agent, Some(now + detector.cooldown));
                        self.changed.notify_one();
                    }
                }
                tracing::warn!(agent, detector = finding.detector, reason = %finding.reason, action = ?detector.action, "anomaly");
                state.flags.push(finding.clone());
                if state.flags.len() > 20 {
                    state.flags.remove(0);
                }
                Detection { finding, action: detector.action }
            })
            .collect()
    }

    /// Feeds one allowed call to the detectors; returns their decisions.
    pub fn observe_call(
        &self,
        agent: &str,
        config: &AnomalyConfig,
        route: &str,
        credential: &str,
        now: SystemTime,
    ) -> Vec<Detection> {
        let first_ever = {
            let mut first_uses = self.first_uses.lock().expect("limits lock");
            let (seen, unsaved) = &mut *first_uses;
            seen.record(agent, route, credential).then(|| {
                // Redis takes new pairs one by one; the state file is rewritten whole.
                if self.shared.is_some() {
                    unsaved.push((agent.to_string(), route.to_string(), credential.to_string()));
                }
                self.changed.notify_one();
                (route, credential)
            })
        };
        let mut agents = self.agents.lock().expect("limits lock");
        let state = state_of(&mut agents, agent);
        let fired = state.activity.observe_call(config, first_ever, now);
        self.apply(agent, state, fired, now)
    }

    /// The state that must survive a restart: live quarantines and every first use.
    pub fn persisted(&self, now: SystemTime) -> (QuarantineMap, FirstUses) {
        let quarantined = self
            .agents
            .lock()
            .expect("limits lock")
            .iter()
            .filter_map(|(agent, s)| match s.quarantined {
                Some(None) => Some((agent.clone(), None)),
                Some(Some(until)) if until > now => Some((agent.clone(), Some(shared::unix_ms(until)))),
                _ => None,
            })
            .collect();
        let first_uses = self.first_uses.lock().expect("limits lock").0.clone();
        (quarantined, first_uses)
    }

    /// Puts back what `persisted` saved, at start, before any request is served.
    pub fn restore(&self, quarantined: &QuarantineMap, first_uses: &FirstUses) {
        let mut agents = self.agents.lock().expect("limits lock");
        for (agent, until) in quarantined {
            state_of(&mut agents, agent).quarantined = Some(until.map(shared::from_unix_ms));
        }
        drop(agents);
        self.first_uses.lock().expect("limits lock").0.merge(first_uses);
    }

    /// First uses recorded here and not yet written to Redis; taken, so each is written once
    /// (put back with `unsaved_back` if the write failed).
    pub fn take_unsaved_first_uses(&self) -> Vec<FirstUse> {
        std::mem::take(&mut self.first_uses.lock().expect("limits lock").1)
    }

    pub fn unsaved_back(&self, mut triples: Vec<FirstUse>) {
        self.first_uses.lock().expect("limits lock").1.append(&mut triples);
    }

    /// Feeds one failure (upstream 401/403 or a keyward denial) to the detectors.
    pub fn observe_failure(&self, agent: &str, config: &AnomalyConfig, now: SystemTime) -> Vec<Detection> {
        let mut agents = self.agents.lock().expect("limits lock");
        let state = state_of(&mut agents, agent);
        let fired = state.activity.observe_failure(config, now);
        self.apply(agent, state, fired, now)
    }

    /// Writes a quarantine through to Redis, for the other replicas.
    fn share_quarantine(&self, agent: &str, until: Option<SystemTime>) {
        if let Some(shared) = self.shared.clone() {
            let agent = agent.to_string();
            tokio::spawn(async move {
                let _ = shared.quarantine(&agent, until).await;
            });
        }
    }

    /// Quarantines `agent` until released (or for `duration`), on every replica. `Err` when
    /// Redis (with that backend) did not take it: it holds on this replica only.
    pub async fn quarantine(&self, agent: &str, duration: Option<Duration>, now: SystemTime) -> Result<(), ()> {
        let until = duration.map(|d| now + d);
        {
            let mut agents = self.agents.lock().expect("limits lock");
            let state = state_of(&mut agents, agent);
            state.quarantined = Some(until);
            state.quarantine_confirmed = false;
        }
        self.changed.notify_one();
        // Awaited, not spawned: an admin's release right after cannot overtake it in Redis.
        match &self.shared {
            Some(shared) => {
                let written = shared.quarantine(agent, until).await;
                if written.is_ok() {
                    self.confirm_quarantine(agent, until);
                }
                written
            }
            None => Ok(()),
        }
    }

    /// Redis holds this replica's quarantine of `agent` now, so a poll that no longer lists it
    /// means another replica released it. Without this, a release made before this replica's
    /// next poll would never reach it (the quarantine would stay unconfirmed, so never lifted).
    fn confirm_quarantine(&self, agent: &str, until: Option<SystemTime>) {
        let mut agents = self.agents.lock().expect("limits lock");
        if let Some(state) = agents.get_mut(agent)
            && state.quarantined == Some(until)
        {
            state.quarantine_confirmed = true;
        }
    }

    /// Lifts a quarantine and a throttle, on every replica; returns whether there was one here,
    /// and `Err` when Redis (with that backend) did not take it.
    pub async fn release(&self, agent: &str) -> (bool, Result<(), ()>) {
        let was = self.release_local(agent);
        let shared = match &self.shared {
            Some(shared) => shared.release(agent).await,
            None => Ok(()),
        };
        (was, shared)
    }

    fn release_local(&self, agent: &str) -> bool {
        let mut agents = self.agents.lock().expect("limits lock");
        let Some(state) = agents.get_mut(agent) else { return false };
        let was = state.quarantined.is_some() || state.throttled.is_some();
        state.quarantined = None;
        state.throttled = None;
        self.changed.notify_one();
        was
    }

    pub fn standing(&self, agent: &str, now: SystemTime) -> Standing {
        let agents = self.agents.lock().expect("limits lock");
        let Some(state) = agents.get(agent) else { return Standing::default() };
        Standing {
            quarantined_until: match state.quarantined {
                Some(None) => Some("until released".to_string()),
                Some(Some(until)) if until > now => Some(crate::timestamp::seconds(until)),
                _ => None,
            },
            throttled_until: state.throttled.filter(|(u, _)| *u > now).map(|(u, _)| crate::timestamp::seconds(u)),
            throttle_fraction: state.throttled.filter(|(u, _)| *u > now).map(|(_, f)| f),
            rate_this_minute: state.activity.current_rate(),
            baseline_per_minute: state.activity.baseline(),
            flags: state.flags.clone(),
        }
    }

    /// Mirrors quarantines polled from Redis: adds the ones listed there, lifts the others; and
    /// learns the first uses other replicas recorded.
    pub fn apply_shared(&self, state: &shared::SharedState) {
        self.first_uses.lock().expect("limits lock").0.merge(&state.first_uses);
        let mut agents = self.agents.lock().expect("limits lock");
        for (agent, until) in &state.quarantined {
            let local = agents.entry(agent.clone()).or_default();
            local.quarantined = Some(until.map(shared::from_unix_ms));
            local.quarantine_confirmed = true;
        }
        // Lift only quarantines Redis had confirmed and no longer lists (released elsewhere); one
        // whose write has not reached Redis yet stays.
        for (agent, local) in agents.iter_mut() {
            if local.quarantined.is_some() && local.quarantine_confirmed && !state.quarantined.contains_key(agent) {
                local.quarantined = None;
                local.quarantine_confirmed = false;
            }
        }
    }

    /// Bounds memory: forgets full quota buckets, idle in-flight counters, and agents idle for
    /// two hours that are neither quarantined nor throttled.
    pub fn janitor(&self, now: SystemTime) {
        self.quotas.retain_recent();
        self.in_flight.lock().expect("limits lock").retain(|_, n| n.load(Ordering::SeqCst) > 0);
        self.agents.lock().expect("limits lock").retain(|_, s| {
            s.quarantined.is_some()
                || s.throttled.is_some()
                || s.activity
                    .last_seen
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() < Duration::from_secs(7200))
        });
    }
}

/// The agent's state, created on first use; the id is copied only then, not on every call.
fn state_of<'a>(agents: &'a mut HashMap<String, AgentState>, agent: &str) -> &'a mut AgentState {
    if !agents.contains_key(agent) {
        agents.insert(agent.to_string(), AgentState::default());
    }
    agents.get_mut(agent).expect("just inserted")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Detector;

    fn throttling_burst_detector() -> AnomalyConfig {
        AnomalyConfig {
            failure_burst: Some(Detector {
                action: AnomalyAction::Throttle,
                factor: 10.0,
                floor_per_minute: 60,
                threshold: 2,
                window: Duration::from_secs(60),
                active_minutes: None,
                utc_offset_minutes: 0,
                throttle_fraction: 0.25,
                cooldown: Duration::from_secs(300),
            }),
            ..AnomalyConfig::default()
        }
    }

    #[tokio::test]
    async fn a_throttle_cuts_the_quota_for_the_cool_down_only() {
        let limits = Limits::default();
        let config = throttling_burst_detector();
        let quota = Quota::parse("8/min", Some(8)).unwrap();
        let now = SystemTime::now();
        assert_eq!(limits.gate("a", now).unwrap(), None);
        limits.observe_failure("a", &config, now);
        let decisions = limits.observe_failure("a", &config, now);
        assert_eq!(decisions.len(), 1);
        assert_eq!(decisions[0].action, AnomalyAction::Throttle);
        let throttled = limits.gate("a", now).unwrap();
        assert_eq!(throttled, Some(0.25));
        // A quarter of a burst of 8: two calls, then 429.
        assert!(limits.check_quota("a", "r", &quota, throttled).await.is_ok());
        assert!(limits.check_quota("a", "r", &quota, throttled).await.is_ok());
        assert_eq!(limits.check_quota("a", "r", &quota, throttled).await.unwrap_err().code(), "rate_limited");
        assert!(limits.standing("a", now).throttled_until.is_some());
        // After the cool-down the full quota applies again.
        assert_eq!(limits.gate("a", now + Duration::from_secs(301)).unwrap(), None);
        assert!(limits.standing("a", now + Duration::from_secs(301)).throttled_until.is_none());
    }
}
