//! Anomaly detection per agent: rate spikes against the agent's own baseline (an EWMA of its
//! per-minute rate, about an hour's memory), failure bursts, use outside active hours, and first
//! use of a route or credential. Every function takes `now`, so tests drive time.
//!
//! "First use" means first ever: the pairs an agent has used are kept by `FirstUses`, which
//! outlives idle agents and is persisted with the state that survives a restart.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{AnomalyConfig, Detector};

/// Weight of each finished minute in the baseline: about an hour of memory.
const ALPHA: f64 = 1.0 / 60.0;
/// The same detector fires at most once per agent in this long (unless it quarantines).
const REALERT: Duration = Duration::from_secs(600);

/// A detector that fired, with the numbers that made it fire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub detector: &'static str,
    pub reason: String,
    pub value: f64,
    pub threshold: f64,
}

#[derive(Debug, Default)]
pub struct AgentActivity {
    minute: u64,
    minute_count: u32,
    baseline: f64,
    minutes_seen: u32,
    failures: VecDeque<SystemTime>,
    last_fired: Vec<(&'static str, SystemTime)>,
    pub last_seen: Option<SystemTime>,
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60
}

impl AgentActivity {
    pub fn current_rate(&self) -> u32 {
        self.minute_count
    }

    pub fn baseline(&self) -> f64 {
        self.baseline
    }

    fn roll(&mut self, now: SystemTime) {
        let minute = minute_of(now);
        if self.minutes_seen == 0 && self.minute_count == 0 {
            self.minute = minute;
        }
        if minute > self.minute {
            // Fold the finished minute, then one zero per silent minute.
            self.baseline += ALPHA * (f64::from(self.minute_count) - self.baseline);
            let silent = (minute - self.minute - 1).min(10_000) as i32;
            self.baseline *= (1.0 - ALPHA).powi(silent);
            self.minutes_seen = self.minutes_seen.saturating_add(1 + silent as u32);
            self.minute = minute;
            self.minute_count = 0;
        }
    }

    fn may_fire(&mut self, detector: &'static str, now: SystemTime) -> bool {
        match self.last_fired.iter_mut().find(|(d, _)| *d == detector) {
            Some((_, at)) if now.duration_since(*at).unwrap_or_default() < REALERT => false,
            Some((_, at)) => {
                *at = now;
                true
            }
            None => {
                self.last_fired.push((detector, now));
                true
            }
        }
    }

    /// Records one call and returns what it made fire. `first_ever` is the (route, credential)
    /// pair when the agent has never used it before (see `FirstUses`).
    pub fn observe_call(
        &mut self,
        config: &AnomalyConfig,
        first_ever: Option<(&str, &str)>,
        now: SystemTime,
    ) -> Vec<(Finding, Detector)> {
        self.roll(now);
        self.minute_count += 1;
        self.last_seen = Some(now);
        let mut found = Vec::new();
        if let Some(d) = &config.rate_spike {
            let rate = f64::from(self.minute_count);
            let limit = (d.factor * self.baseline).max(f64::from(d.floor_per_minute));
            if rate > limit && self.may_fire("rate_spike", now) {
                let reason = format!(
                    "{} requests this minute, over {:.1}x the baseline of {:.2}/min and the floor of {}/min",
                    self.minute_count, d.factor, self.baseline, d.floor_per_minute
                );
                found.push((Finding { detector: "rate_spike", reason, value: rate, threshold: limit }, d.clone()));
            }
        }
        if let Some(d) = &config.off_hours
            && let Some((start, end)) = d.active_minutes
        {
            let local = ((now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 60) as i64
                + i64::from(d.utc_offset_minutes))
            .rem_euclid(1440) as u32;
            let active = if start <= end { local >= start && local < end } else { local >= start || local < end };
            if !active && self.may_fire("off_hours", now) {
                let reason = format!(
                    "used at {:02}:{:02} local time, outside {:02}:{:02}-{:02}:{:02}",
                    local / 60,
                    local % 60,
                    start / 60,
                    start % 60,
                    end / 60,
                    end % 60
                );
                found.push((
                    Finding { detector: "off_hours", reason, value: f64::from(local), threshold: f64::from(start) },
                    d.clone(),
                ));
            }
        }
        if let Some(d) = &config.first_use
            && let Some((route, credential)) = first_ever
        {
            let reason = format!("first use of credential '{credential}' on route '{route}'");
            found.push((Finding { detector: "first_use", reason, value: 1.0, threshold: 1.0 }, d.clone()));
        }
        found
    }

    /// Records a failure (an upstream 401/403 or a keyward denial) and returns what it made fire.
    pub fn observe_failure(&mut self, config: &AnomalyConfig, now: SystemTime) -> Vec<(Finding, Detector)> {
        self.last_seen = Some(now);
        let Some(d) = &config.failure_burst else { return Vec::new() };
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.duration_since(*t).unwrap_or_default() > d.window) {
            self.failures.pop_front();
        }
        if self.failures.len() as u32 >= d.threshold && self.may_fire("failure_burst", now) {
            let count = self.failures.len();
            self.failures.clear();
            let reason = format!("{count} failures within {} s", d.window.as_secs());
            return vec![(
                Finding { detector: "failure_burst", reason, value: count as f64, threshold: f64::from(d.threshold) },
                d.clone(),
            )];
        }
        Vec::new()
    }
}

/// Every (route, credential) pair each agent has ever used: small (bounded by the config's
/// agents, routes and credentials), never pruned for idleness, and persisted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FirstUses(BTreeMap<String, BTreeSet<(String, String)>>);

impl FirstUses {
    /// Records a use; `true` the first time ever `agent` uses this pair.
    pub fn record(&mut self, agent: &str, route: &str, credential: &str) -> bool {
        let pairs = match self.0.get_mut(agent) {
            Some(pairs) => pairs,
            None => self.0.entry(agent.to_string()).or_default(),
        };
        // Looked up by reference first: the hot path (a pair already seen) allocates nothing.
        if pairs.iter().any(|(r, c)| r == route && c == credential) {
            return false;
        }
        pairs.insert((route.to_string(), credential.to_string()))
    }

    /// Adds pairs learned elsewhere (the state file, or another replica through Redis).
    pub fn merge(&mut self, other: &FirstUses) {
        for (agent, pairs) in &other.0 {
            self.0.entry(agent.clone()).or_default().extend(pairs.iter().cloned());
        }
    }

    pub fn as_map(&self) -> &BTreeMap<String, BTreeSet<(String, String)>> {
        &self.0
    }

    pub fn from_map(map: BTreeMap<String, BTreeSet<(String, String)>>) -> FirstUses {
        FirstUses(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AnomalyAction;

    fn detector() -> Detector {
        Detector {
            action: AnomalyAction::Alert,
            factor: 5.0,
            floor_per_minute: 30,
            threshold: 10,
            window: Duration::from_secs(60),
            active_minutes: Some((8 * 60, 20 * 60)),
            utc_offset_minutes: 8 * 60,
            throttle_fraction: 0.25,
            cooldown: Duration::from_secs(300),
        }
    }

    fn config(which: &str) -> AnomalyConfig {
        let mut c = AnomalyConfig::default();
        match which {
            "rate_spike" => c.rate_spike = Some(detector()),
            "failure_burst" => c.failure_burst = Some(detector()),
            "off_hours" => c.off_hours = Some(detector()),
            _ => c.first_use = Some(detector()),
        }
        c
    }

    /// 02:00 UTC = 10:00 at +08:00: inside the 08:00-20:00 window.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 2 * 3600)
    }

    fn fired(events: &[(Finding, Detector)], name: &str) -> bool {
        events.iter().any(|(f, _)| f.detector == name)
    }

    #[test]
    fn a_rate_spike_fires_and_a_steady_rate_of_the_same_volume_does_not() {
        let cfg = config("rate_spike");
        // Steady: 1,200 calls spread as 20 a minute over an hour.
        let mut steady = AgentActivity::default();
        let mut any = false;
        for minute in 0..60u64 {
            for i in 0..20u64 {
                let now = t0() + Duration::from_secs(minute * 60 + i * 3);
                any |= fired(&steady.observe_call(&cfg, None, now), "rate_spike");
            }
        }
        assert!(!any, "a steady rate must not fire");
        // Spike: the same 1,200 calls inside one minute after an hour of quiet use.
        let mut spiky = AgentActivity::default();
        for minute in 0..59u64 {
            spiky.observe_call(&cfg, None, t0() + Duration::from_secs(minute * 60));
        }
        let spike_start = t0() + Duration::from_secs(59 * 60);
        let fired_at = (0..1200u64).position(|i| {
            fired(&spiky.observe_call(&cfg, None, spike_start + Duration::from_millis(i * 40)), "rate_spike")
        });
        assert_eq!(fired_at, Some(30), "fires once past the floor of 30/min (baseline {:.2})", spiky.baseline());
    }

    #[test]
    fn a_failure_burst_fires_and_spread_failures_do_not() {
        let cfg = config("failure_burst");
        let mut spread = AgentActivity::default();
        let any = (0..30u64)
            .any(|i| fired(&spread.observe_failure(&cfg, t0() + Duration::from_secs(i * 20)), "failure_burst"));
        assert!(!any, "30 failures over 10 minutes is not a burst");
        let mut burst = AgentActivity::default();
        let at = (0..30u64)
            .position(|i| fired(&burst.observe_failure(&cfg, t0() + Duration::from_secs(i)), "failure_burst"));
        assert_eq!(at, Some(9), "the 10th failure within 60 s fires");
    }

    #[test]
    fn off_hours_fire_outside_the_local_window_only() {
        let cfg = config("off_hours");
        let mut day = AgentActivity::default();
        let inside =
            (0..100u64).any(|i| fired(&day.observe_call(&cfg, None, t0() + Duration::from_secs(i * 60)), "off_hours"));
        assert!(!inside);
        // 14:00 UTC = 22:00 at +08:00.
        let night = t0() + Duration::from_secs(12 * 3600);
        assert!(fired(&AgentActivity::default().observe_call(&cfg, None, night), "off_hours"));
    }

    #[test]
    fn first_use_fires_once_per_route_and_credential_ever() {
        let cfg = config("first_use");
        let mut a = AgentActivity::default();
        let mut seen = FirstUses::default();
        let mut call = |a: &mut AgentActivity, route: &str, credential: &str| {
            let first = seen.record("a1", route, credential).then_some((route, credential));
            fired(&a.observe_call(&cfg, first, t0()), "first_use")
        };
        assert!(call(&mut a, "openai", "K1"));
        assert!(!call(&mut a, "openai", "K1"));
        assert!(call(&mut a, "github", "K2"));
        // A restart: fresh activity, the pairs restored from the persisted state.
        let restored = FirstUses::from_map(seen.as_map().clone());
        let mut seen = FirstUses::default();
        seen.merge(&restored);
        let mut b = AgentActivity::default();
        let first = seen.record("a1", "openai", "K1").then_some(("openai", "K1"));
        assert!(!fired(&b.observe_call(&cfg, first, t0()), "first_use"), "not the first use since the restart");
        assert!(seen.record("a2", "openai", "K1"), "another agent's first use is its own");
    }
}
