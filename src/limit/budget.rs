//! Token and cost budgets: before a metered call, its worst case is reserved in every budget
//! that applies to the caller, all or nothing; after it, the reservation is settled with what
//! the upstream reported. Accounts are kept per (budget, holder, window): the holder is the
//! agent for `agent` and `role` budgets and `pool` for a shared one.
//!
//! With the Redis backend, reservation and settlement are Lua scripts over one hash per
//! account, so replicas never hand out the same remaining budget. Windows are computed from
//! each replica's clock (calendar periods in UTC), so replicas' clocks should agree (NTP).
//! When Redis cannot be reached, a budget with `redis_failure = "fail_open"` falls back to this
//! replica's own account and one with `fail_closed` refuses the call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::shared::Shared;
use crate::config::budget::{BudgetConfig, BudgetScope, Mode, Window};
use crate::error::ProxyError;

/// Reserves a call in every account, or in none: KEYS are the accounts; ARGV holds six values
/// per account: token limit, cost limit (-1: none), tokens, cost, enforce (1/0), seconds to
/// keep. Answers {refused index (0: none), 1 tokens / 2 cost, then per account whether it was
/// over (shadow), then per account the tokens and the cost left after the reservation (-1:
/// no limit)}.
const RESERVE: &str = r#"
local n = #KEYS
local state = {}
local over = {}
for i = 1, n do
  local b = (i - 1) * 6
  local tl, cl = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local at, ac = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local h = redis.call('HMGET', KEYS[i], 'ut', 'uc', 'rt', 'rc')
  local ut, uc = tonumber(h[1] or '0'), tonumber(h[2] or '0')
  local rt, rc = tonumber(h[3] or '0'), tonumber(h[4] or '0')
  local o = 0
  if tl >= 0 and ut + rt + at > tl then o = 1 elseif cl >= 0 and uc + rc + ac > cl then o = 2 end
  if o > 0 and ARGV[b + 5] == '1' then return {i, o} end
  over[i] = o
  state[i] = {ut + rt + at, uc + rc + ac}
end
local out = {0, 0}
for i = 1, n do
  local b = (i - 1) * 6
  redis.call('HINCRBY', KEYS[i], 'rt', ARGV[b + 3])
  redis.call('HINCRBY', KEYS[i], 'rc', ARGV[b + 4])
  redis.call('HINCRBY', KEYS[i], 'n', 1)
  redis.call('EXPIRE', KEYS[i], ARGV[b + 6])
  out[#out + 1] = over[i]
end
for i = 1, n do
  local b = (i - 1) * 6
  local tl, cl = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  if tl >= 0 then out[#out + 1] = tl - state[i][1] else out[#out + 1] = -1 end
  if cl >= 0 then out[#out + 1] = cl - state[i][2] else out[#out + 1] = -1 end
end
return out
"#;

/// Settles: KEYS are accounts; ARGV holds five values per account: reserved tokens and cost to
/// release, used tokens and cost to add, seconds to keep.
const SETTLE: &str = r#"
for i = 1, #KEYS do
  local b = (i - 1) * 5
  if tonumber(ARGV[b + 1]) > 0 and redis.call('HINCRBY', KEYS[i], 'rt', -tonumber(ARGV[b + 1])) < 0 then
    redis.call('HSET', KEYS[i], 'rt', 0)
  end
  if tonumber(ARGV[b + 2]) > 0 and redis.call('HINCRBY', KEYS[i], 'rc', -tonumber(ARGV[b + 2])) < 0 then
    redis.call('HSET', KEYS[i], 'rc', 0)
  end
  redis.call('HINCRBY', KEYS[i], 'ut', ARGV[b + 3])
  redis.call('HINCRBY', KEYS[i], 'uc', ARGV[b + 4])
  redis.call('EXPIRE', KEYS[i], ARGV[b + 5])
end
return {0}
"#;

/// One budget's account for one holder in one window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub window_start: u64,
    pub used_tokens: u64,
    pub used_micro_usd: u64,
    pub reserved_tokens: u64,
    pub reserved_micro_usd: u64,
    pub requests: u64,
}

/// An account as the state file keeps it: reservations in flight are counted as used (after a
/// crash their calls' real usage is unknown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAccount {
    pub budget: String,
    pub holder: String,
    pub window_start: u64,
    pub used_tokens: u64,
    pub used_micro_usd: u64,
    pub requests: u64,
}

/// Tokens and micro-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub tokens: u64,
    pub micro_usd: u64,
}

/// The most any one amount may be (2^50: about 10^15 tokens, or a billion USD in micro-USD).
/// A request's `max_tokens` and an upstream's usage are the agent's and the upstream's to choose,
/// so every amount is clamped to this before it is added or sent to Redis as an `i64`: a huge
/// value is then over every budget instead of wrapping negative and freeing one.
pub const MAX_AMOUNT: u64 = 1 << 50;

/// `value` clamped to `MAX_AMOUNT`, as Redis takes it.
fn redis_amount(value: u64) -> i64 {
    value.min(MAX_AMOUNT) as i64
}

/// What a call claims before it is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Claim {
    pub amount: Amount,
    /// The output tokens inside `amount` (for the cut-off).
    pub max_output: u64,
    /// Micro-USD per output token (for a cost budget's cut-off).
    pub output_micro_per_token: f64,
}

impl Claim {
    /// A call's worst case: `input` estimated tokens at the highest of the model's input and
    /// cache prices, and `max_output` tokens at its output price (no cost without a price).
    pub fn worst_case(price: Option<crate::config::budget::Price>, input: u64, max_output: u64) -> Claim {
        let (input, max_output) = (input.min(MAX_AMOUNT), max_output.min(MAX_AMOUNT));
        let micro_usd = price.map_or(0, |p| {
            let input_price = p.input.max(p.cache_write).max(p.cache_read);
            ((input_price * input as f64 + p.output * max_output as f64).ceil() as u64).min(MAX_AMOUNT)
        });
        Claim {
            amount: Amount { tokens: input + max_output, micro_usd },
            max_output,
            output_micro_per_token: price.map_or(0.0, |p| p.output),
        }
    }
}

/// One account a reservation was made in.
#[derive(Debug, Clone)]
struct Line {
    budget: String,
    holder: String,
    window: Window,
    window_start: u64,
}

/// A call's reservation, settled once when the call ends.
#[derive(Debug)]
pub struct Reservation {
    lines: Vec<Line>,
    pub amount: Amount,
    in_redis: bool,
    /// Shadow budgets the call did not fit: (budget, reason).
    pub would_deny: Vec<(String, String)>,
    /// The most output tokens the stream may produce before a `cut_off` budget is exhausted,
    /// and that budget.
    pub cut_after_output: Option<(u64, String)>,
}

impl Reservation {
    pub fn budgets(&self) -> Vec<String> {
        self.lines.iter().map(|l| l.budget.clone()).collect()
    }
}

#[derive(Default)]
pub struct Budgets {
    accounts: Mutex<HashMap<(String, String), Account>>,
    /// Something changed that the state file should keep (written at most once a second).
    dirty: AtomicBool,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn redis_key(budget: &str, holder: &str, window_start: u64) -> String {
    // '|' cannot appear in budget names or agent ids, so no two accounts share a key.
    format!("keyward:budget:{budget}|{holder}|{window_start}")
}

/// Seconds an account is kept in Redis: to the end of its window, and a minute more.
fn keep_seconds(window: &Window, now: u64) -> u64 {
    window.bounds(now).1.saturating_sub(now) + 60
}

fn limit_name(which: i64) -> &'static str {
    if which == 2 { "cost" } else { "tokens" }
}

/// The budgets that apply to `agent` of `role`.
pub fn applicable<'c>(budgets: &'c [BudgetConfig], agent: &str, role: &str) -> Vec<&'c BudgetConfig> {
    budgets.iter().filter(|b| b.applies_to(agent, role)).collect()
}

impl Budgets {
    fn fresh<'a>(
        accounts: &'a mut HashMap<(String, String), Account>,
        budget: &BudgetConfig,
        holder: &str,
        now: u64,
    ) -> &'a mut Account {
        let start = budget.window.bounds(now).0;
        let account = accounts.entry((budget.name.clone(), holder.to_string())).or_default();
        if account.window_start != start {
            *account = Account { window_start: start, ..Account::default() };
        }
        account
    }

    /// Reserves `claim` in every budget of `budgets` for `agent`, or refuses the call with the
    /// first enforced budget it does not fit (nothing is reserved then). Shadow budgets it does
    /// not fit are reserved anyway and listed in `would_deny`.
    pub async fn reserve(
        &self,
        shared: Option<&Shared>,
        budgets: &[&BudgetConfig],
        agent: &str,
        claim: Claim,
        shadow_all: bool,
        now: u64,
    ) -> Result<Reservation, ProxyError> {
        // A role in shadow mode shadows every budget of its agents.
        let shadowed: Vec<BudgetConfig>;
        let budgets: Vec<&BudgetConfig> = if shadow_all {
            shadowed = budgets.iter().map(|b| BudgetConfig { mode: Mode::Shadow, ..(*b).clone() }).collect();
            shadowed.iter().collect()
        } else {
            budgets.to_vec()
        };
        let budgets = budgets.as_slice();
        if let Some(shared) = shared {
            match self.reserve_shared(shared, budgets, agent, claim, now).await {
                Ok(answer) => return answer,
                Err(()) => {
                    if let Some(closed) = budgets.iter().find(|b| !b.fail_open && b.mode == Mode::Enforce) {
                        tracing::warn!(budget = %closed.name, "redis unreachable; budget fails closed");
                        return Err(ProxyError::LimiterUnavailable);
                    }
                }
            }
        }
        self.reserve_local(budgets, agent, claim, now)
    }

    fn refusal(budget: &BudgetConfig, agent: &str, which: &'static str, now: u64) -> ProxyError {
        ProxyError::BudgetExceeded {
            budget: budget.name.clone(),
            agent: agent.to_string(),
            limit: which,
            window: budget.window.name(),
            retry_after: Duration::from_secs(budget.window.bounds(now).1.saturating_sub(now).max(1)),
        }
    }

    fn line(budget: &BudgetConfig, agent: &str, now: u64) -> Line {
        Line {
            budget: budget.name.clone(),
            holder: budget.holder(agent).to_string(),
            window: budget.window,
            window_start: budget.window.bounds(now).0,
        }
    }

    fn reserve_local(
        &self,
        budgets: &[&BudgetConfig],
        agent: &str,
        claim: Claim,
        now: u64,
    ) -> Result<Reservation, ProxyError> {
        let amount = claim.amount;
        let mut accounts = self.accounts.lock().expect("budget lock");
        let mut would_deny = Vec::new();
        for budget in budgets {
            let account = Self::fresh(&mut accounts, budget, budget.holder(agent), now);
            let over_tokens = budget.tokens.is_some_and(|l| {
                account.used_tokens.saturating_add(account.reserved_tokens).saturating_add(amount.tokens) > l
            });
            let over_cost = budget.cost_micro_usd.is_some_and(|l| {
                account.used_micro_usd.saturating_add(account.reserved_micro_usd).saturating_add(amount.micro_usd) > l
            });
            let which = if over_tokens { "tokens" } else { "cost" };
            if over_tokens || over_cost {
                let refusal = Self::refusal(budget, agent, which, now);
                if budget.mode == Mode::Enforce {
                    return Err(refusal);
                }
                would_deny.push((budget.name.clone(), refusal.message()));
            }
        }
        let mut left = Vec::new();
        for budget in budgets {
            let account = Self::fresh(&mut accounts, budget, budget.holder(agent), now);
            account.reserved_tokens = account.reserved_tokens.saturating_add(amount.tokens.min(MAX_AMOUNT));
            account.reserved_micro_usd = account.reserved_micro_usd.saturating_add(amount.micro_usd.min(MAX_AMOUNT));
            account.requests += 1;
            left.push((
                budget.tokens.map(|l| {
                    redis_amount(l) - redis_amount(account.used_tokens.saturating_add(account.reserved_tokens))
                }),
                budget.cost_micro_usd.map(|l| {
                    redis_amount(l) - redis_amount(account.used_micro_usd.saturating_add(account.reserved_micro_usd))
                }),
            ));
        }
        drop(accounts);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(Reservation {
            lines: budgets.iter().map(|b| Self::line(b, agent, now)).collect(),
            amount,
            in_redis: false,
            would_deny,
            cut_after_output: cut_after(budgets, &left, claim),
        })
    }

    async fn reserve_shared(
        &self,
        shared: &Shared,
        budgets: &[&BudgetConfig],
        agent: &str,
        claim: Claim,
        now: u64,
    ) -> Result<Result<Reservation, ProxyError>, ()> {
        let amount = claim.amount;
        let keys: Vec<String> =
            budgets.iter().map(|b| redis_key(&b.name, b.holder(agent), b.window.bounds(now).0)).collect();
        let mut args: Vec<i64> = Vec::with_capacity(budgets.len() * 6);
        for budget in budgets {
            args.push(budget.tokens.map_or(-1, redis_amount));
            args.push(budget.cost_micro_usd.map_or(-1, redis_amount));
            args.push(redis_amount(amount.tokens));
            args.push(redis_amount(amount.micro_usd));
            args.push(i64::from(budget.mode == Mode::Enforce));
            args.push(keep_seconds(&budget.window, now) as i64);
        }
        let answer = shared.eval_ints(&redis::Script::new(RESERVE), &keys, &args).await?;
        let refused = answer.first().copied().unwrap_or(0);
        if refused > 0 {
            let budget = budgets[(refused - 1) as usize];
            return Ok(Err(Self::refusal(budget, agent, limit_name(answer[1]), now)));
        }
        let n = budgets.len();
        let mut would_deny = Vec::new();
        for (i, budget) in budgets.iter().enumerate() {
            let over = answer.get(2 + i).copied().unwrap_or(0);
            if over > 0 {
                would_deny.push((budget.name.clone(), Self::refusal(budget, agent, limit_name(over), now).message()));
            }
        }
        let left: Vec<(Option<i64>, Option<i64>)> = (0..n)
            .map(|i| {
                let value = |j: usize| answer.get(2 + n + 2 * i + j).copied().filter(|v| *v != -1);
                (budgets[i].tokens.and(value(0)), budgets[i].cost_micro_usd.and(value(1)))
            })
            .collect();
        Ok(Ok(Reservation {
            lines: budgets.iter().map(|b| Self::line(b, agent, now)).collect(),
            amount,
            in_redis: true,
            would_deny,
            cut_after_output: cut_after(budgets, &left, claim),
        }))
    }

    /// Settles a reservation with what the call used. A window that has turned over since the
    /// reservation was made is charged in its new window (the old one's reservation is gone).
    pub async fn settle(&self, shared: Option<&Shared>, reservation: &Reservation, used: Amount, now: u64) {
        if reservation.in_redis
            && let Some(shared) = shared
        {
            let mut keys = Vec::new();
            let mut args: Vec<i64> = Vec::new();
            let reserved = reservation.amount;
            for line in &reservation.lines {
                let keep = keep_seconds(&line.window, now) as i64;
                let current = line.window.bounds(now).0;
                keys.push(redis_key(&line.budget, &line.holder, line.window_start));
                if current == line.window_start {
                    args.extend([
                        redis_amount(reserved.tokens),
                        redis_amount(reserved.micro_usd),
                        redis_amount(used.tokens),
                        redis_amount(used.micro_usd),
                        keep,
                    ]);
                } else {
                    args.extend([redis_amount(reserved.tokens), redis_amount(reserved.micro_usd), 0, 0, keep]);
                    keys.push(redis_key(&line.budget, &line.holder, current));
                    args.extend([0, 0, redis_amount(used.tokens), redis_amount(used.micro_usd), keep]);
                }
            }
            // A timed-out settlement is tried twice more: if the script did run, the retry counts
            // the call twice (over, never under); if it never runs, the reservation stays in
            // Redis until its window ends (the call counts at its worst case).
            let script = redis::Script::new(SETTLE);
            for (attempt, pause) in [0u64, 50, 250].into_iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                match shared.eval_ints(&script, &keys, &args).await {
                    Ok(_) => return,
                    Err(_) if attempt < 2 => continue,
                    Err(_) => tracing::error!(budgets = ?reservation.budgets(),
                        "redis unreachable; a budget reservation could not be settled (it stays reserved)"),
                }
            }
            return;
        }
        let mut accounts = self.accounts.lock().expect("budget lock");
        for line in &reservation.lines {
            let start = line.window.bounds(now).0;
            let account = accounts.entry((line.budget.clone(), line.holder.clone())).or_default();
            if account.window_start != start {
                *account = Account { window_start: start, ..Account::default() };
            }
            if line.window_start == start {
                account.reserved_tokens = account.reserved_tokens.saturating_sub(reservation.amount.tokens);
                account.reserved_micro_usd = account.reserved_micro_usd.saturating_sub(reservation.amount.micro_usd);
            }
            account.used_tokens = account.used_tokens.saturating_add(used.tokens.min(MAX_AMOUNT));
            account.used_micro_usd = account.used_micro_usd.saturating_add(used.micro_usd.min(MAX_AMOUNT));
        }
        drop(accounts);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Counts a call that reports no usage (GitHub, anything not an LLM API) in its budgets.
    pub async fn count_request(&self, shared: Option<&Shared>, budgets: &[&BudgetConfig], agent: &str, now: u64) {
        if let Some(shared) = shared {
            let keys: Vec<String> =
                budgets.iter().map(|b| redis_key(&b.name, b.holder(agent), b.window.bounds(now).0)).collect();
            let args: Vec<i64> =
                budgets.iter().flat_map(|b| [0, 0, 0, 0, keep_seconds(&b.window, now) as i64]).collect();
            // Settling nothing keeps the account alive; the request count goes with it.
            if shared.count_requests(&keys, &args).await.is_ok() {
                return;
            }
        }
        let mut accounts = self.accounts.lock().expect("budget lock");
        for budget in budgets {
            Self::fresh(&mut accounts, budget, budget.holder(agent), now).requests += 1;
        }
        drop(accounts);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// The account of `budget` for `holder` now: from Redis when it is the backend and answers.
    pub async fn account(&self, shared: Option<&Shared>, budget: &BudgetConfig, holder: &str, now: u64) -> Account {
        let start = budget.window.bounds(now).0;
        if let Some(shared) = shared
            && let Ok(fields) = shared.hash_ints(&redis_key(&budget.name, holder, start)).await
        {
            let get = |k: &str| fields.get(k).copied().unwrap_or(0).max(0) as u64;
            return Account {
                window_start: start,
                used_tokens: get("ut"),
                used_micro_usd: get("uc"),
                reserved_tokens: get("rt"),
                reserved_micro_usd: get("rc"),
                requests: get("n"),
            };
        }
        let accounts = self.accounts.lock().expect("budget lock");
        match accounts.get(&(budget.name.clone(), holder.to_string())) {
            Some(account) if account.window_start == start => *account,
            _ => Account { window_start: start, ..Account::default() },
        }
    }

    /// Whether anything changed since the last `take_dirty`.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    pub fn export(&self) -> Vec<SavedAccount> {
        let accounts = self.accounts.lock().expect("budget lock");
        let mut saved: Vec<SavedAccount> = accounts
            .iter()
            .map(|((budget, holder), a)| SavedAccount {
                budget: budget.clone(),
                holder: holder.clone(),
                window_start: a.window_start,
                used_tokens: a.used_tokens + a.reserved_tokens,
                used_micro_usd: a.used_micro_usd + a.reserved_micro_usd,
                requests: a.requests,
            })
            .collect();
        saved.sort_by(|a, b| (&a.budget, &a.holder).cmp(&(&b.budget, &b.holder)));
        saved
    }

    pub fn import(&self, saved: &[SavedAccount]) {
        let mut accounts = self.accounts.lock().expect("budget lock");
        for s in saved {
            accounts.insert(
                (s.budget.clone(), s.holder.clone()),
                Account {
                    window_start: s.window_start,
                    used_tokens: s.used_tokens,
                    used_micro_usd: s.used_micro_usd,
                    reserved_tokens: 0,
                    reserved_micro_usd: 0,
                    requests: s.requests,
                },
            );
        }
    }

    /// Forgets accounts of windows that have ended, so memory stays bounded by the agents and
    /// budgets in the config.
    pub fn janitor(&self, budgets: &[BudgetConfig], now: u64) {
        let windows: HashMap<&str, Window> = budgets.iter().map(|b| (b.name.as_str(), b.window)).collect();
        self.accounts.lock().expect("budget lock").retain(|(budget, _), account| {
            windows
                .get(budget.as_str())
                .is_some_and(|w| w.bounds(now).0 == account.window_start || account.reserved_tokens > 0)
        });
    }
}

/// The most output a stream may produce before a `cut_off` budget is exhausted: what it
/// reserved for output plus what the budget had left after the reservation.
fn cut_after(budgets: &[&BudgetConfig], left: &[(Option<i64>, Option<i64>)], claim: Claim) -> Option<(u64, String)> {
    budgets
        .iter()
        .zip(left)
        .filter(|(b, _)| b.cut_off && b.mode == Mode::Enforce)
        .filter_map(|(b, (tokens, cost))| {
            let by_tokens = tokens.map(|t| t.max(0) as u64);
            let by_cost = cost
                .filter(|_| claim.output_micro_per_token > 0.0)
                .map(|c| (c.max(0) as f64 / claim.output_micro_per_token) as u64);
            let left = match (by_tokens, by_cost) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            left.map(|left| (claim.max_output + left, b.name.clone()))
        })
        .min_by_key(|(left, _)| *left)
}

/// Who holds accounts of `budget`: the agent, each agent of the role, or the pool.
pub fn holders(budget: &BudgetConfig, agents: &[crate::config::AgentConfig]) -> Vec<String> {
    match &budget.scope {
        BudgetScope::Agent(agent) => vec![agent.clone()],
        BudgetScope::Role(role) => agents.iter().filter(|a| &a.role == role).map(|a| a.id.clone()).collect(),
        BudgetScope::Pool { .. } => vec!["pool".to_string()],
    }
}

/// Cost in USD for display: micro-USD as a decimal.
pub fn usd(micro: u64) -> f64 {
    micro as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(name: &str, tokens: Option<u64>, cost: Option<u64>, mode: Mode) -> BudgetConfig {
        BudgetConfig {
            name: name.into(),
            scope: BudgetScope::Role("w".into()),
            tokens,
            cost_micro_usd: cost,
            window: Window::Seconds(10),
            mode,
            fail_open: true,
            cut_off: true,
        }
    }

    fn claim(tokens: u64, micro_usd: u64) -> Claim {
        Claim { amount: Amount { tokens, micro_usd }, max_output: 10, output_micro_per_token: 0.0 }
    }

    #[tokio::test]
    async fn reservations_fit_or_refuse_all_or_nothing_and_settle_with_real_usage() {
        let budgets = Budgets::default();
        let tokens = budget("t", Some(100), None, Mode::Enforce);
        let cost = budget("c", None, Some(1000), Mode::Enforce);
        let both = [&tokens, &cost];
        let now = 1000;
        let first = budgets.reserve(None, &both, "a", claim(60, 100), false, now).await.unwrap();
        assert_eq!(first.cut_after_output, Some((10 + 40, "t".to_string())));
        // 60 reserved + 60 > 100: refused, and the cost budget is not charged either.
        let refused = budgets.reserve(None, &both, "a", claim(60, 100), false, now).await.unwrap_err();
        assert_eq!(refused.code(), "budget_exceeded");
        assert!(refused.message().contains("budget 't'"), "{}", refused.message());
        assert_eq!(budgets.account(None, &cost, "a", now).await.reserved_micro_usd, 100);
        // Another agent of the role has its own account.
        budgets.reserve(None, &both, "b", claim(60, 100), false, now).await.unwrap();
        // Settled at 12 tokens: room again.
        budgets.settle(None, &first, Amount { tokens: 12, micro_usd: 30 }, now).await;
        let account = budgets.account(None, &tokens, "a", now).await;
        assert_eq!((account.used_tokens, account.reserved_tokens, account.requests), (12, 0, 1));
        budgets.reserve(None, &both, "a", claim(60, 100), false, now).await.unwrap();
        // The next window starts empty; Retry-After pointed at it.
        let ProxyError::BudgetExceeded { retry_after, .. } =
            budgets.reserve(None, &both, "a", claim(60, 100), false, now + 5).await.unwrap_err()
        else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_secs(5));
        budgets.reserve(None, &both, "a", claim(60, 100), false, now + 10).await.unwrap();
    }

    #[test]
    fn the_worst_case_prices_input_at_the_dearest_input_rate() {
        let price = crate::config::budget::Price { input: 3.0, output: 15.0, cache_read: 0.3, cache_write: 3.75 };
        let claim = Claim::worst_case(Some(price), 100, 50);
        assert_eq!(claim.amount, Amount { tokens: 150, micro_usd: 375 + 750 });
        assert_eq!((claim.max_output, claim.output_micro_per_token), (50, 15.0));
        assert_eq!(Claim::worst_case(None, 100, 50).amount, Amount { tokens: 150, micro_usd: 0 });
    }

    #[tokio::test]
    async fn a_huge_claim_is_refused_and_never_wraps_an_account() {
        let price = crate::config::budget::Price { input: 3.0, output: 15.0, cache_read: 0.3, cache_write: 3.75 };
        let claim = Claim::worst_case(Some(price), 10, u64::MAX);
        assert_eq!(claim.amount.tokens, 10 + MAX_AMOUNT);
        assert_eq!(claim.amount.micro_usd, MAX_AMOUNT);
        // As Redis gets them: clamped, never negative.
        assert_eq!(redis_amount(u64::MAX), MAX_AMOUNT as i64);
        let budgets = Budgets::default();
        let b = budget("t", Some(1000), Some(1000), Mode::Enforce);
        let refused = budgets.reserve(None, &[&b], "a", claim, false, 0).await.unwrap_err();
        assert_eq!(refused.code(), "budget_exceeded");
        budgets.reserve(None, &[&b], "a", Claim::worst_case(None, 10, 10), false, 0).await.unwrap();
    }

    #[tokio::test]
    async fn a_shadow_budget_reserves_and_reports_what_it_would_refuse() {
        let budgets = Budgets::default();
        let shadow = budget("s", Some(10), None, Mode::Shadow);
        let reservation = budgets.reserve(None, &[&shadow], "a", claim(60, 0), false, 0).await.unwrap();
        assert_eq!(reservation.would_deny.len(), 1);
        assert_eq!(reservation.would_deny[0].0, "s");
        assert_eq!(budgets.account(None, &shadow, "a", 0).await.reserved_tokens, 60);
    }

    #[tokio::test]
    async fn saved_accounts_count_reservations_in_flight_as_used() {
        let budgets = Budgets::default();
        let b = budget("t", Some(100), None, Mode::Enforce);
        budgets.reserve(None, &[&b], "a", claim(30, 0), false, 0).await.unwrap();
        let saved = budgets.export();
        assert_eq!(saved[0].used_tokens, 30);
        let restored = Budgets::default();
        restored.import(&saved);
        assert_eq!(restored.account(None, &b, "a", 0).await.used_tokens, 30);
        restored.janitor(std::slice::from_ref(&b), 20);
        assert!(restored.export().is_empty(), "an ended window is forgotten");
    }
}
