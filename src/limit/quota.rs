//! Per-(agent, route) quotas with `governor`: one keyed limiter per distinct quota, created on
//! first use and kept across config reloads. A janitor bounds memory with `retain_recent`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota as GovernorQuota, RateLimiter};

use crate::config::Quota;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// Why a call was throttled, for the 429 and its `RateLimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    pub limit: u32,
    pub retry_after: Duration,
}

#[derive(Default)]
pub struct Quotas {
    limiters: RwLock<HashMap<Quota, Arc<Keyed>>>,
}

pub fn governor_quota(quota: &Quota) -> GovernorQuota {
    let burst = NonZeroU32::new(quota.burst).expect("validated: burst >= 1");
    GovernorQuota::with_period(quota.interval().max(Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(burst)
}

impl Quotas {
    fn limiter(&self, quota: &Quota) -> Arc<Keyed> {
        if let Some(found) = self.limiters.read().expect("quota lock").get(quota) {
            return found.clone();
        }
        let mut limiters = self.limiters.write().expect("quota lock");
        limiters
            .entry(*quota)
            .or_insert_with(|| {
                Arc::new(RateLimiter::dashmap(governor_quota(quota)).with_middleware::<StateInformationMiddleware>())
            })
            .clone()
    }

    /// Takes one request from `key`'s allowance under `quota`; returns the remaining burst.
    pub fn check(&self, quota: &Quota, key: &str) -> Result<u32, Throttle> {
        let limiter = self.limiter(quota);
        match limiter.check_key(&key.to_string()) {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => Err(Throttle {
                limit: quota.count,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
        }
    }

    /// Forgets keys whose allowance is full again, so idle agents cost no memory.
    pub fn retain_recent(&self) -> usize {
        let limiters: Vec<Arc<Keyed>> = self.limiters.read().expect("quota lock").values().cloned().collect();
        limiters
            .iter()
            .map(|l| {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn burst_then_refill() {
        let quotas = Quotas::default();
        let quota = Quota::parse("60/min", Some(3)).unwrap();
        assert_eq!(quotas.check(&quota, "a|openai"), Ok(2));
        assert_eq!(quotas.check(&quota, "a|openai"), Ok(1));
        assert_eq!(quotas.check(&quota, "a|openai"), Ok(0));
        let throttled = quotas.check(&quota, "a|openai").unwrap_err();
        assert_eq!(throttled.limit, 60);
        assert!(throttled.retry_after <= Duration::from_secs(1));
        // Another key has its own allowance.
        assert!(quotas.check(&quota, "b|openai").is_ok());
    }

    #[test]
    fn idle_keys_are_forgotten_so_memory_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let quota = Quota::parse("10/s", Some(10)).unwrap();
        let limiter = RateLimiter::dashmap_with_clock(governor_quota(&quota), clock.clone());
        for i in 0..100_000 {
            let _ = limiter.check_key(&format!("agent-{i}|openai"));
        }
        assert_eq!(limiter.len(), 100_000);
        clock.advance(Duration::from_secs(5));
        limiter.retain_recent();
        limiter.shrink_to_fit();
        assert_eq!(limiter.len(), 0, "idle keys must not stay in memory");
    }
}
