//! The validated `[usage]` section (price table, unknown-model rule, default reservation) and
//! `[[budgets]]`: what a budget is attached to, what it limits, over which window, and how it
//! behaves in shadow mode and when Redis is down. Pure types and the window arithmetic.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Datelike, TimeZone, Timelike, Utc};

/// USD per million tokens, for each kind of token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_write: f64,
}

/// What a call to a model that is not in the price table is charged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnknownModel {
    /// Refused (403 `model_not_priced`) when a cost budget applies to it.
    Refuse,
    /// Charged at this price.
    Charge(Price),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UsageConfig {
    /// Reserved as the output of a call whose request sets no `max_tokens`/`max_output_tokens`.
    pub default_max_output_tokens: u64,
    pub unknown_model: UnknownModel,
    /// Model → price. A model is priced by its exact name, else by the longest name here that
    /// it starts with followed by `-` (`gpt-4o` prices `gpt-4o-2024-08-06`).
    pub prices: BTreeMap<String, Price>,
    /// Routes whose streamed chat completions keyward does not ask for usage (an upstream that
    /// refuses `stream_options`, such as Azure OpenAI before API version 2024-09-01).
    pub no_stream_usage: Vec<String>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            default_max_output_tokens: 4096,
            unknown_model: UnknownModel::Refuse,
            prices: BTreeMap::new(),
            no_stream_usage: Vec::new(),
        }
    }
}

impl UsageConfig {
    /// The price-table name a model is priced by, if any.
    pub fn priced_as<'a>(&'a self, model: &str) -> Option<&'a str> {
        if let Some((name, _)) = self.prices.get_key_value(model) {
            return Some(name);
        }
        self.prices
            .keys()
            .filter(|name| model.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('-')))
            .max_by_key(|name| name.len())
            .map(String::as_str)
    }

    /// The price of a model: its entry, or the unknown-model rule's price (`None`: refuse).
    pub fn price(&self, model: Option<&str>) -> Option<Price> {
        match model.and_then(|m| self.priced_as(m)) {
            Some(name) => self.prices.get(name).copied(),
            None => match self.unknown_model {
                UnknownModel::Refuse => None,
                UnknownModel::Charge(price) => Some(price),
            },
        }
    }
}

/// Who a budget is charged for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetScope {
    /// One agent.
    Agent(String),
    /// Each agent of the role, separately.
    Role(String),
    /// One allowance shared by all these agents and every agent of these roles.
    Pool { agents: Vec<String>, roles: Vec<String> },
}

pub use crate::policy::Mode;

/// A budget's window, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
    /// The calendar month.
    Month,
    /// Fixed windows of this many seconds, aligned to the Unix epoch (`"30s"`).
    Seconds(u64),
}

impl Window {
    pub fn parse(text: &str) -> Option<Window> {
        match text {
            "minute" => Some(Window::Minute),
            "hour" => Some(Window::Hour),
            "day" => Some(Window::Day),
            "month" => Some(Window::Month),
            other => {
                let n: u64 = other.strip_suffix('s')?.parse().ok()?;
                (1..=31 * 86_400).contains(&n).then_some(Window::Seconds(n))
            }
        }
    }

    /// The window holding `now` (Unix seconds): its start and end.
    pub fn bounds(&self, now: u64) -> (u64, u64) {
        let fixed = |len: u64| (now - now % len, now - now % len + len);
        match self {
            Window::Minute => fixed(60),
            Window::Hour => fixed(3600),
            Window::Day => fixed(86_400),
            Window::Seconds(n) => fixed(*n),
            Window::Month => {
                let at = Utc.timestamp_opt(now as i64, 0).single().unwrap_or_default();
                let start = Utc
                    .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
                    .single()
                    .unwrap_or(at.with_second(0).unwrap_or(at));
                let (year, month) = if at.month() == 12 { (at.year() + 1, 1) } else { (at.year(), at.month() + 1) };
                let end = Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0).single().unwrap_or(start);
                (start.timestamp() as u64, end.timestamp() as u64)
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Window::Minute => "minute".into(),
            Window::Hour => "hour".into(),
            Window::Day => "day".into(),
            Window::Month => "month".into(),
            Window::Seconds(n) => format!("{n}s"),
        }
    }

    pub fn length_hint(&self) -> Duration {
        let (start, end) = self.bounds(0);
        Duration::from_secs(end - start)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    pub name: String,
    pub scope: BudgetScope,
    /// Tokens per window (input, output, cache read and cache write together).
    pub tokens: Option<u64>,
    /// Cost per window, in micro-USD.
    pub cost_micro_usd: Option<u64>,
    pub window: Window,
    pub mode: Mode,
    /// With Redis unreachable: fall back to this replica's own count (`true`) or refuse.
    pub fail_open: bool,
    /// End a stream at an event boundary once it would exhaust the budget.
    pub cut_off: bool,
}

impl BudgetConfig {
    /// Whether this budget is charged for `agent` of `role`.
    pub fn applies_to(&self, agent: &str, role: &str) -> bool {
        match &self.scope {
            BudgetScope::Agent(a) => a == agent,
            BudgetScope::Role(r) => r == role,
            BudgetScope::Pool { agents, roles } => agents.iter().any(|a| a == agent) || roles.iter().any(|r| r == role),
        }
    }

    /// Whose allowance a call of `agent` draws on: the agent's own, or the pool's.
    pub fn holder<'a>(&'a self, agent: &'a str) -> &'a str {
        match &self.scope {
            BudgetScope::Pool { .. } => "pool",
            _ => agent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_utc_calendar_periods() {
        // 2026-02-15T10:20:30Z
        let now = 1_771_150_830;
        assert_eq!(Window::Minute.bounds(now), (1_771_150_800, 1_771_150_860));
        assert_eq!(Window::Day.bounds(now), (1_771_113_600, 1_771_200_000));
        // February 2026 has 28 days.
        let (start, end) = Window::Month.bounds(now);
        assert_eq!((start, end - start), (1_769_904_000, 28 * 86_400));
        // December rolls into January.
        let december = 1_798_675_200 - 3600; // 2026-12-31T23:00:00Z
        assert_eq!(Window::Month.bounds(december).1, 1_798_761_600);
        assert_eq!(Window::Seconds(5).bounds(12), (10, 15));
        assert_eq!(Window::parse("5s"), Some(Window::Seconds(5)));
        assert_eq!(Window::parse("0s"), None);
        assert_eq!(Window::parse("week"), None);
    }

    #[test]
    fn models_are_priced_by_name_or_longest_dated_prefix() {
        let price = |input| Price { input, output: 0.0, cache_read: 0.0, cache_write: 0.0 };
        let mut usage = UsageConfig::default();
        usage.prices.insert("gpt-4o".into(), price(2.5));
        usage.prices.insert("gpt-4o-mini".into(), price(0.15));
        assert_eq!(usage.priced_as("gpt-4o"), Some("gpt-4o"));
        assert_eq!(usage.priced_as("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(usage.priced_as("gpt-4o-mini-2024-07-18"), Some("gpt-4o-mini"));
        assert_eq!(usage.priced_as("gpt-4oo"), None);
        assert_eq!(usage.price(Some("o3")), None);
        usage.unknown_model = UnknownModel::Charge(price(9.0));
        assert_eq!(usage.price(Some("o3")).unwrap().input, 9.0);
        let usage = crate::usage::Usage {
            input_tokens: 1000,
            output_tokens: 100,
            cache_read_tokens: 400,
            cache_write_tokens: 0,
        };
        let cost = usage.cost_micro_usd(&Price { input: 2.5, output: 10.0, cache_read: 1.25, cache_write: 3.75 });
        assert_eq!(cost, 2500 + 1000 + 500);
    }
}
