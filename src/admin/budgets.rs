//! `GET /admin/budgets`: each budget's current window, and for each holder (the agent, each
//! agent of the role, or the pool) what is used, reserved and left, in tokens and in USD.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::config::budget::{BudgetScope, Mode};
use crate::limit::budget::{self, holders, usd};
use crate::state::AppState;

/// `GET /admin/budgets`
pub async fn list(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime.load_full();
    let now = budget::unix_now();
    let shared = state.limits.shared.as_deref();
    let mut out = Vec::new();
    for b in &runtime.config.budgets {
        let (start, end) = b.window.bounds(now);
        let mut accounts = Vec::new();
        for holder in holders(b, &runtime.config.agents) {
            let a = state.limits.budgets.account(shared, b, &holder, now).await;
            let tokens = b.tokens.map(|limit| {
                json!({ "limit": limit, "used": a.used_tokens, "reserved": a.reserved_tokens,
                        "remaining": limit.saturating_sub(a.used_tokens + a.reserved_tokens) })
            });
            let cost = b.cost_micro_usd.map(|limit| {
                json!({ "limit": usd(limit), "used": usd(a.used_micro_usd), "reserved": usd(a.reserved_micro_usd),
                        "remaining": usd(limit.saturating_sub(a.used_micro_usd + a.reserved_micro_usd)) })
            });
            accounts.push(json!({
                "holder": holder,
                "requests": a.requests,
                "tokens": tokens,
                "costUsd": cost,
                // What is spent of the tightest limit, 0 to 1 (the dashboard draws it).
                "burn": burn(b.tokens, a.used_tokens, b.cost_micro_usd, a.used_micro_usd),
            }));
        }
        let scope = match &b.scope {
            BudgetScope::Agent(agent) => json!({ "agent": agent }),
            BudgetScope::Role(role) => json!({ "role": role }),
            BudgetScope::Pool { agents, roles } => json!({ "pool": { "agents": agents, "roles": roles } }),
        };
        out.push(json!({
            "name": b.name,
            "scope": scope,
            "mode": if b.mode == Mode::Shadow { "shadow" } else { "enforce" },
            "cutOff": b.cut_off,
            "redisFailure": if b.fail_open { "fail_open" } else { "fail_closed" },
            "window": { "kind": b.window.name(), "start": rfc3339(start), "end": rfc3339(end) },
            "accounts": accounts,
        }));
    }
    axum::Json(json!({ "budgets": out })).into_response()
}

fn burn(tokens: Option<u64>, used_tokens: u64, cost: Option<u64>, used_cost: u64) -> f64 {
    let share = |limit: Option<u64>, used: u64| limit.map_or(0.0, |l| used as f64 / l.max(1) as f64);
    share(tokens, used_tokens).max(share(cost, used_cost))
}

fn rfc3339(unix: u64) -> Value {
    Value::String(crate::timestamp::seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix)))
}
