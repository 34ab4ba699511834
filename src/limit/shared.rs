//! The Redis (or Valkey) backend for limits that hold across replicas: quotas as GCRA in one Lua
//! script on Redis's own clock (so replicas need not agree on time), and quarantine and agent
//! revocation kept in Redis, which every replica polls twice a second.
//!
//! When Redis cannot be reached, `fail_open` falls back to each replica's local limits and
//! `fail_closed` answers 429; each transition is logged and counted once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use std::sync::Arc;

use super::quota::Throttle;
use crate::config::Quota;
use crate::metrics::{Metrics, TransitionLabel};

/// Takes one request from a GCRA bucket; answers {1, 0} or {0, microseconds to wait}.
const GCRA: &str = r#"
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - tolerance > now then
  return {0, new_tat - tolerance - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"#;

/// Charges one request to every budget of a call's chain, or to none: KEYS are the used
/// counters, ARGV the maxima and then the seconds each counter is kept. Answers 0 when all were
/// charged, or the 1-based index of the first spent budget.
const SPEND_CHAIN: &str = r#"
local n = #KEYS
for i = 1, n do
  if tonumber(redis.call('GET', KEYS[i]) or '0') >= tonumber(ARGV[i]) then
    return i
  end
end
for i = 1, n do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[n + i])
end
return 0
"#;

const QUARANTINE: &str = "keyward:quarantine";
const REVOKED: &str = "keyward:revoked_agents";
const DELEGATIONS: &str = "keyward:delegations";
const REVOKED_DELEGATIONS: &str = "keyward:revoked_delegations";
/// Every (agent, route, credential) ever used, as JSON arrays: first use means first ever.
const FIRST_USES: &str = "keyward:first_uses";

pub struct Shared {
    manager: ConnectionManager,
    gcra: redis::Script,
    spend_chain: redis::Script,
    pub fail_open: bool,
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

/// What Redis says about agents, as of the last poll.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SharedState {
    /// Agent → quarantined until (unix ms), or `None` for until released.
    pub quarantined: HashMap<String, Option<u64>>,
    pub revoked: HashSet<String>,
    /// Delegation records minted on any replica (see `delegation::export`).
    pub delegations: Vec<serde_json::Value>,
    pub revoked_delegations: HashSet<String>,
    pub first_uses: super::anomaly::FirstUses,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Shared {
    pub fn new(url: &str, fail_open: bool, metrics: Arc<Metrics>) -> Result<Shared, String> {
        let client = redis::Client::open(url).map_err(|e| format!("limits.redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(300)))
            .set_response_timeout(Some(Duration::from_millis(300)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| format!("redis: {e}"))?;
        Ok(Shared {
            manager,
            gcra: redis::Script::new(GCRA),
            spend_chain: redis::Script::new(SPEND_CHAIN),
            fail_open,
            up: AtomicBool::new(true),
            metrics,
        })
    }

    fn note(&self, ok: bool, error: Option<&redis::RedisError>) {
        if self.up.swap(ok, Ordering::SeqCst) != ok {
            let to = if ok { "up" } else { "down" };
            self.metrics.limits_backend_transitions.get_or_create(&TransitionLabel { to }).inc();
            if ok {
                tracing::warn!("redis is reachable again; shared limits are back");
            } else if self.fail_open {
                tracing::error!(error = ?error.map(ToString::to_string), "redis is unreachable; falling back to local limits (fail_open)");
            } else {
                tracing::error!(error = ?error.map(ToString::to_string), "redis is unreachable; refusing limited calls (fail_closed)");
            }
        }
    }

    /// One request from the shared bucket: `Ok(Ok)` allowed, `Ok(Err)` throttled, `Err` Redis down.
    pub async fn check(&self, quota: &Quota, key: &str) -> Result<Result<(), Throttle>, ()> {
        let mut connection = self.manager.clone();
        let interval = quota.interval().as_micros().max(1) as u64;
        let bucket = format!("keyward:rl:{}/{}s/{}:{key}", quota.count, quota.period.as_secs(), quota.burst);
        let answer: Result<(i64, i64), _> =
            self.gcra.key(bucket).arg(interval).arg(quota.burst).invoke_async(&mut connection).await;
        match answer {
            Ok((allowed, wait_us)) => {
                self.note(true, None);
                Ok(if allowed == 1 {
                    Ok(())
                } else {
                    Err(Throttle { limit: quota.count, retry_after: Duration::from_micros(wait_us.max(0) as u64) })
                })
            }
            Err(error) => {
                self.note(false, Some(&error));
                Err(())
            }
        }
    }

    pub async fn quarantine(&self, agent: &str, until: Option<SystemTime>) -> Result<(), ()> {
        let mut connection = self.manager.clone();
        let value = until.map_or(0, unix_ms);
        connection.hset::<_, _, _, ()>(QUARANTINE, agent, value).await.map_err(|e| self.note(false, Some(&e)))
    }

    pub async fn release(&self, agent: &str) -> Result<(), ()> {
        let mut connection = self.manager.clone();
        connection.hdel::<_, _, ()>(QUARANTINE, agent).await.map_err(|e| self.note(false, Some(&e)))
    }

    pub async fn revoke(&self, agent: &str) -> Result<(), ()> {
        let mut connection = self.manager.clone();
        connection.sadd::<_, _, ()>(REVOKED, agent).await.map_err(|e| self.note(false, Some(&e)))
    }

    pub async fn publish_delegation(&self, record: &serde_json::Value) -> Result<(), ()> {
        let mut connection = self.manager.clone();
        let id = record["id"].as_str().unwrap_or_default().to_string();
        connection
            .hset::<_, _, _, ()>(DELEGATIONS, id, record.to_string())
            .await
            .map_err(|e| self.note(false, Some(&e)))
    }

    /// Drops shared delegation records that expired more than an hour ago, so the hash every
    /// replica polls stays small.
    pub async fn forget_delegations(&self, ids: &[String]) -> Result<(), ()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut connection = self.manager.clone();
        connection.hdel::<_, _, ()>(DELEGATIONS, ids).await.map_err(|e| self.note(false, Some(&e)))?;
        connection.srem::<_, _, ()>(REVOKED_DELEGATIONS, ids).await.map_err(|e| self.note(false, Some(&e)))
    }

    pub async fn revoke_delegations(&self, ids: &[String]) -> Result<(), ()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut connection = self.manager.clone();
        connection.sadd::<_, _, ()>(REVOKED_DELEGATIONS, ids).await.map_err(|e| self.note(false, Some(&e)))
    }

    /// Counts one use against each `(delegation id, max_requests, keep)` budget at once, across
    /// replicas: `Ok(None)` when every one had room (all are charged), `Ok(Some(i))` when
    /// `budgets[i]` is spent (none is charged).
    pub async fn spend(&self, budgets: &[(&str, u64, Duration)]) -> Result<Option<usize>, ()> {
        let mut connection = self.manager.clone();
        let mut invocation = self.spend_chain.prepare_invoke();
        for (id, _, _) in budgets {
            invocation.key(format!("keyward:delegation_used:{id}"));
        }
        for (_, max, _) in budgets {
            invocation.arg(*max);
        }
        for (_, _, keep) in budgets {
            invocation.arg(keep.as_secs().max(1));
        }
        let spent: i64 = invocation.invoke_async(&mut connection).await.map_err(|e| self.note(false, Some(&e)))?;
        self.note(true, None);
        Ok(usize::try_from(spent).ok().filter(|i| *i > 0).map(|i| i - 1))
    }

    /// Runs `script` over `keys` with integer `args`; its answer as integers (budgets).
    pub async fn eval_ints(&self, script: &redis::Script, keys: &[String], args: &[i64]) -> Result<Vec<i64>, ()> {
        let mut connection = self.manager.clone();
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        let answer = invocation.invoke_async(&mut connection).await.map_err(|e| self.note(false, Some(&e)))?;
        self.note(true, None);
        Ok(answer)
    }

    /// A hash of integer fields (a budget account); absent fields are absent.
    pub async fn hash_ints(&self, key: &str) -> Result<HashMap<String, i64>, ()> {
        let mut connection = self.manager.clone();
        connection.hgetall(key).await.map_err(|e| self.note(false, Some(&e)))
    }

    /// Counts one request in each budget account of `keys` (args: five per key, the last the
    /// seconds to keep it).
    pub async fn count_requests(&self, keys: &[String], args: &[i64]) -> Result<(), ()> {
        let mut connection = self.manager.clone();
        let mut pipe = redis::pipe();
        for (i, key) in keys.iter().enumerate() {
            pipe.hincr(key, "n", 1).ignore().expire(key, args[i * 5 + 4]).ignore();
        }
        pipe.query_async::<()>(&mut connection).await.map_err(|e| self.note(false, Some(&e)))
    }

    /// Records first uses, so no replica reports them again, even after a restart.
    pub async fn record_first_uses(&self, triples: &[(String, String, String)]) -> Result<(), ()> {
        if triples.is_empty() {
            return Ok(());
        }
        let mut connection = self.manager.clone();
        let members: Vec<String> = triples.iter().map(|t| serde_json::json!([t.0, t.1, t.2]).to_string()).collect();
        connection.sadd::<_, _, ()>(FIRST_USES, members).await.map_err(|e| self.note(false, Some(&e)))
    }

    pub async fn poll(&self) -> Result<SharedState, ()> {
        let mut connection = self.manager.clone();
        let quarantine: HashMap<String, u64> =
            connection.hgetall(QUARANTINE).await.map_err(|e| self.note(false, Some(&e)))?;
        let revoked: HashSet<String> = connection.smembers(REVOKED).await.map_err(|e| self.note(false, Some(&e)))?;
        let records: HashMap<String, String> =
            connection.hgetall(DELEGATIONS).await.map_err(|e| self.note(false, Some(&e)))?;
        let revoked_delegations: HashSet<String> =
            connection.smembers(REVOKED_DELEGATIONS).await.map_err(|e| self.note(false, Some(&e)))?;
        let delegations = records.values().filter_map(|r| serde_json::from_str(r).ok()).collect();
        let used: Vec<String> = connection.smembers(FIRST_USES).await.map_err(|e| self.note(false, Some(&e)))?;
        let mut first_uses = super::anomaly::FirstUses::default();
        for triple in used.iter().filter_map(|t| serde_json::from_str::<(String, String, String)>(t).ok()) {
            first_uses.record(&triple.0, &triple.1, &triple.2);
        }
        self.note(true, None);
        let now = unix_ms(SystemTime::now());
        let quarantined = quarantine
            .into_iter()
            .filter(|(_, until)| *until == 0 || *until > now)
            .map(|(agent, until)| (agent, (until != 0).then_some(until)))
            .collect();
        Ok(SharedState { quarantined, revoked, delegations, revoked_delegations, first_uses })
    }
}

pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
