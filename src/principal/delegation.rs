//! What the pipeline and the admin API do to a caller's delegations: count a child key's use
//! against its budgets, and revoke (a subtree, or everything an agent minted) with one audit
//! event per revoked key, shared with the other replicas.

use std::sync::Arc;

use super::Principal;
use crate::audit::AuditEvent;
use crate::delegation::{Delegation, DelegationStore};
use crate::error::ProxyError;
use crate::limit::shared::Shared;
use crate::state::AppState;

/// Tells the other replicas (through Redis, when it is the limits backend).
fn share_revocations(state: &AppState, ids: &[String]) {
    if let Some(shared) = state.limits.shared.clone()
        && !ids.is_empty()
    {
        let ids = ids.to_vec();
        tokio::spawn(async move {
            let _ = shared.revoke_delegations(&ids).await;
        });
    }
}

/// Revokes every delegation an agent minted, transitively, with one audit event each.
pub fn revoke_tree_of_agent(state: &AppState, agent: &str, reason: &str, by: &str) -> Vec<String> {
    let revoked = state.delegations.revoke_rooted_at(agent);
    state.limits.changed.notify_one();
    for child in &revoked {
        state.audit_event(AuditEvent::DelegationRevoked {
            delegation_id: child.clone(),
            reason: reason.into(),
            by: by.into(),
        });
    }
    share_revocations(state, &revoked);
    revoked
}

/// Counts one use of a child key against its own budget and every budget above it (a key's
/// `max_requests` bounds its whole subtree): exact across replicas with the Redis backend.
pub async fn admit(
    delegations: &DelegationStore,
    shared: Option<&Shared>,
    delegation: &Arc<Delegation>,
) -> Result<(), ProxyError> {
    let lineage = delegations.lineage(delegation)?;
    let now = delegations.now();
    let budgets: Vec<(&str, u64, std::time::Duration)> = lineage
        .iter()
        .filter_map(|d| {
            let max = d.max_requests?;
            // The shared counter outlives the key by an hour, for the admin view.
            let keep = d.expires.duration_since(now).unwrap_or_default() + std::time::Duration::from_secs(3600);
            Some((d.id.as_str(), max, keep))
        })
        .collect();
    match shared {
        Some(shared) if !budgets.is_empty() => match shared.spend(&budgets).await {
            Ok(None) => {
                lineage.iter().for_each(|d| d.note_use());
                Ok(())
            }
            Ok(Some(spent)) => Err(ProxyError::DelegationExhausted { id: budgets[spent].0.to_string() }),
            Err(()) if shared.fail_open => delegations.admit(&lineage),
            Err(()) => Err(ProxyError::LimiterUnavailable),
        },
        _ => delegations.admit(&lineage),
    }
}

/// Revokes `id` and its descendants, with one audit event each.
pub fn revoke(state: &AppState, id: &str, reason: &str, by: &str) -> Vec<String> {
    let revoked = state.delegations.revoke(id);
    // Written in the background at once; the callers that can wait for it do (`persist::save`).
    state.limits.changed.notify_one();
    share_revocations(state, &revoked);
    for child in &revoked {
        state.audit_event(AuditEvent::DelegationRevoked {
            delegation_id: child.clone(),
            reason: reason.into(),
            by: by.into(),
        });
    }
    revoked
}

/// The pipeline's revoke-on-failure: a child key minted with `revoke_on_failure` is revoked
/// when its call fails; returns once the revocation is durable.
pub async fn revoke_on_failure(state: &AppState, principal: &Principal<'_>, why: &str) {
    if let Some(d) = principal.delegation()
        && d.revoke_on_failure
        && !d.is_revoked()
    {
        revoke(state, &d.id, why, "revoke_on_failure");
        crate::persist::save_or_log(state, &d.id, "delegation revocation").await;
    }
}
