//! `[usage]` (the price table, the unknown-model rule, the default reservation) and
//! `[[budgets]]` (what each is attached to, limits, window, mode, Redis failure policy).

use std::collections::{BTreeMap, HashSet};

use super::super::budget::{BudgetConfig, BudgetScope, Mode, Price, UnknownModel, UsageConfig, Window};
use super::super::raw::{RawBudget, RawPrice, RawUsage};
use super::super::{AgentConfig, RoleConfig};
use super::{Collector, check_unique, did_you_mean, valid_name};

fn price(c: &mut Collector<'_>, at: &str, raw: RawPrice) -> Price {
    let mut check = |field: &str, value: f64| {
        if !(value.is_finite() && value >= 0.0) {
            c.problem(format!("{at}.{field}"), "must be a price in USD per million tokens, 0 or more");
        }
        value
    };
    let input = check("input", raw.input);
    Price {
        input,
        output: check("output", raw.output),
        cache_read: raw.cache_read.map_or(input, |p| check("cache_read", p)),
        cache_write: raw.cache_write.map_or(input, |p| check("cache_write", p)),
    }
}

pub(super) fn usage(c: &mut Collector<'_>, raw: RawUsage, route_names: &HashSet<&str>) -> UsageConfig {
    for (i, route) in raw.no_stream_usage.iter().enumerate() {
        known(c, format!("usage.no_stream_usage[{i}]"), route, route_names, "route");
    }
    let default_max_output_tokens = raw.default_max_output_tokens.unwrap_or(4096);
    if default_max_output_tokens == 0 {
        c.problem("usage.default_max_output_tokens", "must be at least 1");
    }
    let default_price = raw.default_price.map(|p| price(c, "usage.default_price", p));
    let unknown_model = match (raw.unknown_model.as_deref().unwrap_or("refuse"), default_price) {
        ("refuse", _) => UnknownModel::Refuse,
        ("default_price", Some(price)) => UnknownModel::Charge(price),
        ("default_price", None) => {
            c.problem("usage.default_price", "is required with unknown_model = \"default_price\"");
            UnknownModel::Refuse
        }
        (other, _) => {
            c.problem("usage.unknown_model", format!("'{other}' is not \"refuse\" or \"default_price\""));
            UnknownModel::Refuse
        }
    };
    let prices: BTreeMap<String, Price> = raw
        .prices
        .into_iter()
        .map(|(model, p)| (model.clone(), price(c, &format!("usage.prices.{model}"), p)))
        .collect();
    UsageConfig { default_max_output_tokens, unknown_model, prices, no_stream_usage: raw.no_stream_usage }
}

fn known(c: &mut Collector<'_>, field: String, name: &str, names: &HashSet<&str>, what: &str) {
    if !names.contains(name) {
        let near = super::super::suggest(name, names.iter().copied());
        c.problem(field, format!("no {what} named '{name}'{}", did_you_mean(near)));
    }
}

pub(super) fn budgets(
    c: &mut Collector<'_>,
    raw: Vec<RawBudget>,
    agents: &[AgentConfig],
    roles: &BTreeMap<String, RoleConfig>,
    limits_fail_open: bool,
) -> Vec<BudgetConfig> {
    let agent_names: HashSet<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    let role_names: HashSet<&str> = roles.keys().map(String::as_str).collect();
    let mut budgets = Vec::new();
    for (i, b) in raw.into_iter().enumerate() {
        let at = format!("budgets[{i}]");
        if !valid_name(&b.name) {
            c.problem(format!("{at}.name"), "use letters, digits, '-', '_', '.' or ':' (1-128 characters)");
        }
        let scope = match (b.agent, b.role, b.pool) {
            (Some(agent), None, None) => {
                known(c, format!("{at}.agent"), &agent, &agent_names, "agent");
                BudgetScope::Agent(agent)
            }
            (None, Some(role), None) => {
                known(c, format!("{at}.role"), &role, &role_names, "role");
                BudgetScope::Role(role)
            }
            (None, None, Some(pool)) => {
                for (j, agent) in pool.agents.iter().enumerate() {
                    known(c, format!("{at}.pool.agents[{j}]"), agent, &agent_names, "agent");
                }
                for (j, role) in pool.roles.iter().enumerate() {
                    known(c, format!("{at}.pool.roles[{j}]"), role, &role_names, "role");
                }
                if pool.agents.is_empty() && pool.roles.is_empty() {
                    c.problem(format!("{at}.pool"), "names no agent and no role");
                }
                BudgetScope::Pool { agents: pool.agents, roles: pool.roles }
            }
            _ => {
                c.problem(
                    at.clone(),
                    "attach the budget to exactly one of `agent`, `role` (each agent separately) or `pool` (shared)",
                );
                BudgetScope::Pool { agents: Vec::new(), roles: Vec::new() }
            }
        };
        if b.tokens.is_none() && b.cost_usd.is_none() {
            c.problem(at.clone(), "limits nothing: set `tokens`, `cost_usd` or both");
        }
        if b.tokens == Some(0) {
            c.problem(format!("{at}.tokens"), "must be at least 1");
        }
        let cost_micro_usd = b.cost_usd.map(|usd| {
            if !(usd.is_finite() && usd > 0.0 && usd < 1e9) {
                c.problem(format!("{at}.cost_usd"), "must be an amount of USD above 0 and below 1000000000");
                return 0;
            }
            (usd * 1e6).round() as u64
        });
        let window = Window::parse(&b.window).unwrap_or_else(|| {
            c.problem(
                format!("{at}.window"),
                format!(
                    "'{}' is not \"minute\", \"hour\", \"day\", \"month\" or a number of seconds like \"30s\"",
                    b.window
                ),
            );
            Window::Day
        });
        let mode = Mode::parse(b.mode.as_deref().unwrap_or("enforce")).unwrap_or_else(|| {
            c.problem(format!("{at}.mode"), "is not \"enforce\" or \"shadow\"");
            Mode::Enforce
        });
        let fail_open = match b.redis_failure.as_deref() {
            None => limits_fail_open,
            Some("fail_open") => true,
            Some("fail_closed") => false,
            Some(other) => {
                c.problem(format!("{at}.redis_failure"), format!("'{other}' is not \"fail_open\" or \"fail_closed\""));
                limits_fail_open
            }
        };
        budgets.push(BudgetConfig {
            name: b.name,
            scope,
            tokens: b.tokens,
            cost_micro_usd,
            window,
            mode,
            fail_open,
            cut_off: b.cut_off,
        });
    }
    check_unique(
        c,
        budgets.iter().enumerate().map(|(i, b)| (format!("budgets[{i}].name"), b.name.clone())),
        "budget name",
    );
    budgets
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    const AGENT: &str = "[roles.w]\n[[agents]]\nid = \"a\"\nrole = \"w\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

    #[test]
    fn usage_and_budget_problems_are_reported_with_their_lines() {
        let with = |text: &str| format!("{AGENT}{text}");
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "a valid price table and budgets of each kind",
                with(
                    "[usage]\nunknown_model = \"default_price\"\ndefault_price = { input = 1, output = 2 }\n[usage.prices]\n\"gpt-4o\" = { input = 2.5, output = 10, cache_read = 1.25 }\n[[budgets]]\nname = \"a-day\"\nagent = \"a\"\ntokens = 1000\nwindow = \"day\"\n[[budgets]]\nname = \"w-month\"\nrole = \"w\"\ncost_usd = 5.5\nwindow = \"month\"\nmode = \"shadow\"\nredis_failure = \"fail_closed\"\ncut_off = true\n[[budgets]]\nname = \"team\"\npool = { agents = [\"a\"], roles = [\"w\"] }\ntokens = 10\nwindow = \"30s\"\n",
                ),
                vec![],
            ),
            (
                "bad prices and rules",
                with(
                    "[usage]\ndefault_max_output_tokens = 0\nunknown_model = \"default_price\"\n[usage.prices]\n\"m\" = { input = -1, output = 2 }\n",
                ),
                vec![
                    "k.toml:6: usage.default_price: is required with unknown_model = \"default_price\"",
                    "k.toml:7: usage.default_max_output_tokens: must be at least 1",
                    "k.toml:10: usage.prices.m.input: must be a price in USD per million tokens, 0 or more",
                ],
            ),
            (
                "an unknown-model rule that is neither, and an unknown route",
                with("[usage]\nunknown_model = \"guess\"\nno_stream_usage = [\"azure\"]\n"),
                vec![
                    "k.toml:7: usage.unknown_model: 'guess' is not \"refuse\" or \"default_price\"",
                    "k.toml:8: usage.no_stream_usage[0]: no route named 'azure'",
                ],
            ),
            (
                "budgets attached to nothing, to two things, to unknown names, limiting nothing",
                with(
                    "[[budgets]]\nname = \"x\"\ntokens = 1\nwindow = \"day\"\n[[budgets]]\nname = \"y\"\nagent = \"a\"\nrole = \"w\"\ntokens = 1\nwindow = \"day\"\n[[budgets]]\nname = \"z\"\nagent = \"b\"\nwindow = \"day\"\n[[budgets]]\nname = \"p\"\npool = { agents = [\"a\"], roles = [\"ww\"] }\ntokens = 1\nwindow = \"day\"\n",
                ),
                vec![
                    "k.toml:6: budgets[0]: attach the budget to exactly one of `agent`, `role` (each agent separately) or `pool` (shared)",
                    "k.toml:10: budgets[1]: attach the budget to exactly one of `agent`, `role` (each agent separately) or `pool` (shared)",
                    "k.toml:16: budgets[2]: limits nothing: set `tokens`, `cost_usd` or both",
                    "k.toml:18: budgets[2].agent: no agent named 'b' (did you mean 'a'?)",
                    "k.toml:22: budgets[3].pool.roles[0]: no role named 'ww' (did you mean 'w'?)",
                ],
            ),
            (
                "bad limits, window, mode, failure policy and a duplicate name",
                with(
                    "[[budgets]]\nname = \"b\"\nagent = \"a\"\ntokens = 0\ncost_usd = -2\nwindow = \"fortnight\"\nmode = \"loud\"\nredis_failure = \"shrug\"\n[[budgets]]\nname = \"b\"\nagent = \"a\"\ntokens = 5\nwindow = \"minute\"\n",
                ),
                vec![
                    "k.toml:9: budgets[0].tokens: must be at least 1",
                    "k.toml:10: budgets[0].cost_usd: must be an amount of USD above 0 and below 1000000000",
                    "k.toml:11: budgets[0].window: 'fortnight' is not \"minute\", \"hour\", \"day\", \"month\" or a number of seconds like \"30s\"",
                    "k.toml:12: budgets[0].mode: is not \"enforce\" or \"shadow\"",
                    "k.toml:13: budgets[0].redis_failure: 'shrug' is not \"fail_open\" or \"fail_closed\"",
                    "k.toml:15: budgets[1].name: duplicate budget name 'b' (first at budgets[0].name)",
                ],
            ),
        ];
        let cases: Vec<(&str, &str, &[&str])> =
            cases.iter().map(|(case, text, expected)| (*case, text.as_str(), expected.as_slice())).collect();
        check(&cases);
    }
}
