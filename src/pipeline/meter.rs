//! The `meter` stage: an LLM call's worst case reserved in its budgets before any credential is
//! obtained, and what a shadow-mode policy would have refused recorded.

use super::*;

/// `meter`: a call to an LLM API (`usage::Api`) has its body read (bounded by the body limit),
/// a streamed chat completion is made to report its usage, and the call's worst case is
/// reserved in every budget of its root agent, before the secret store is touched. Any other
/// call is counted as a request in those budgets.
pub(super) async fn meter(
    state: &AppState,
    runtime: &Arc<Runtime>,
    audit: &mut AuditGuard,
    routed: &Routed<'_>,
    identified: &Identified<'_>,
    request: Request<Body>,
) -> Result<(Request<Body>, Option<Arc<Metering>>), ProxyError> {
    let config = &runtime.config;
    let agent = identified.caller.root();
    let limits_role = identified.caller.limits_role();
    let role = &limits_role.name;
    let role_shadow = limits_role.mode == Mode::Shadow && identified.caller.delegation().is_none();
    let shadowed = Shadowed { agent, presented_key: identified.presented_key() };
    let budgets = budget::applicable(&config.budgets, agent, role);
    let shared = state.limits.shared.as_deref();
    let Some(api) = Api::detect(request.method(), &routed.rest) else {
        if !budgets.is_empty() {
            state.limits.budgets.count_request(shared, &budgets, agent, budget::unix_now()).await;
        }
        return Ok((request, None));
    };
    let (request, body) = whole_body(request, config.forward.max_request_body_bytes).await?;
    let (mut parts, _) = request.into_parts();
    let add_stream_usage = !config.usage.no_stream_usage.contains(&routed.route.name);
    let facts = usage::read_request(api, &body, add_stream_usage);
    // About four bytes of request a token: more than the prompt's tokens, as JSON adds bytes.
    let input_estimate = (body.len() as u64).div_ceil(4);
    let max_output = facts
        .max_output_tokens
        .unwrap_or(config.usage.default_max_output_tokens)
        .saturating_mul(facts.completions.max(1));
    let price = config.usage.price(facts.model.as_deref());
    let mut would_deny = Vec::new();
    if price.is_none()
        && let Some(cost_budget) = budgets.iter().find(|b| b.cost_micro_usd.is_some())
    {
        let refusal = ProxyError::ModelNotPriced { budget: cost_budget.name.clone() };
        if cost_budget.mode == Mode::Enforce && !role_shadow {
            return Err(refusal);
        }
        would_deny.push((cost_budget.name.clone(), refusal.message()));
    }
    let reservation = if budgets.is_empty() {
        None
    } else {
        let claim = Claim::worst_case(price, input_estimate, max_output);
        let reserved =
            state.limits.budgets.reserve(shared, &budgets, agent, claim, role_shadow, budget::unix_now()).await;
        if let Err(ProxyError::BudgetExceeded { budget, .. }) = &reserved {
            state.metrics.budget_refusals.get_or_create(&BudgetLabel { budget: budget.clone() }).inc();
        }
        Some(reserved?)
    };
    if let Some(reservation) = &reservation {
        would_deny.extend(reservation.would_deny.iter().cloned());
    }
    for (budget, reason) in would_deny {
        shadow_denied(state, audit, shadowed, "budget", format!("budget:{budget}"), reason);
    }
    let strip_usage_chunk = facts.rewritten.is_some();
    let body = match facts.rewritten {
        Some(rewritten) => {
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(rewritten.len()));
            rewritten
        }
        None => body,
    };
    let charged = reservation.as_ref().map(|r| r.budgets()).unwrap_or_default();
    let handles = Handles {
        usage_config: config.usage.clone(),
        budgets: state.limits.budgets.clone(),
        shared: state.limits.shared.clone(),
        metrics: state.metrics.clone(),
    };
    let reserved = Reserved { input_tokens: input_estimate, output_tokens: max_output };
    let call = Call { agent, route: &routed.route.name, agent_key: identified.presented_key() };
    let metering = Metering::new(api, strip_usage_chunk, facts.model, reserved, reservation, handles, call);
    audit.settle_with(charged, metering.settle_hook());
    Ok((Request::from_parts(parts, Body::from(body)), Some(metering)))
}

/// A policy in shadow mode would have refused the call: recorded and counted, and the call goes
/// on. The reason can quote the path, so the key the agent presented is taken out of it.
pub(super) fn shadow_denied(
    state: &AppState,
    audit: &mut AuditGuard,
    shadowed: Shadowed<'_>,
    kind: &'static str,
    policy: String,
    reason: String,
) {
    let Shadowed { agent, presented_key } = shadowed;
    let reason = usage::without_key(reason, presented_key);
    tracing::info!(agent, policy = %policy, reason = %reason, "shadow mode: a policy would have refused this call");
    state.metrics.would_deny.get_or_create(&WouldDenyLabels { agent: agent.to_string(), policy: kind }).inc();
    audit.would_deny(policy, reason);
}
