//! Who is calling: a configured agent, or a child key a parent delegated, with the role whose
//! grants apply. Revoked agents and revoked or expired child keys are refused here, and so is a
//! child key whose root agent no longer holds the authority it was minted under (disabled,
//! removed, revoked, or its role no longer allows delegating that deep or that long).
//!
//! `delegation` holds what the pipeline and the admin API do to a caller's delegations (count a
//! use, revoke); `api` the endpoints an agent mints and revokes child keys with.

pub mod api;
pub mod delegation;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use http::Method;

use crate::config::{AgentConfig, GrantConfig, RoleConfig};
use crate::delegation::{Delegation, DelegationStore, Delegator};
use crate::error::ProxyError;
use crate::policy::{self, Subject};
use crate::state::Runtime;

/// The agents revoked through the admin API (or another replica), refused at once.
pub type RevokedAgents = ArcSwap<HashSet<String>>;

pub enum Principal<'r> {
    Agent {
        agent: &'r AgentConfig,
        role: &'r RoleConfig,
    },
    /// A child key, with the configured agent at the root of its chain and that agent's role as
    /// the config holds it now: the child's rights are what it was given, cut to what the root
    /// still holds.
    Delegated {
        delegation: Arc<Delegation>,
        root: &'r AgentConfig,
        root_role: &'r RoleConfig,
    },
}

impl Principal<'_> {
    pub fn id(&self) -> &str {
        match self {
            Principal::Agent { agent, .. } => &agent.id,
            Principal::Delegated { delegation, .. } => &delegation.id,
        }
    }

    pub fn role(&self) -> &RoleConfig {
        match self {
            Principal::Agent { role, .. } => role,
            Principal::Delegated { delegation, .. } => &delegation.role,
        }
    }

    /// The configured agent at the root of the chain: limits, quarantine and anomaly detection
    /// apply to it, so a parent cannot escape them by delegating.
    pub fn root(&self) -> &str {
        match self {
            Principal::Agent { agent, .. } => &agent.id,
            Principal::Delegated { root, .. } => &root.id,
        }
    }

    /// The role whose limits apply: the root agent's, as configured now.
    pub fn limits_role(&self) -> &RoleConfig {
        match self {
            Principal::Agent { role, .. } => role,
            Principal::Delegated { root_role, .. } => root_role,
        }
    }

    /// The grant that allows this call. A child key needs a grant of its own and a grant of
    /// its root agent's current role for the same route and credential; the root's grant is
    /// returned, so its current quota applies.
    pub fn authorize(&self, route: &str, method: &Method, path: &str) -> Result<&GrantConfig, ProxyError> {
        let own = policy::authorize(&Subject { agent: self.id(), role: self.role() }, route, method, path)?;
        match self {
            Principal::Agent { .. } => Ok(own),
            Principal::Delegated { root, root_role, .. } => policy::authorize_within(
                &Subject { agent: self.id(), role: self.role() },
                &Subject { agent: &root.id, role: root_role },
                own,
                method,
                path,
            ),
        }
    }

    /// Why the call would be refused without the grants in shadow mode (the one `authorize`
    /// returned is one): the role's enforced grants alone, the root's for a child key.
    pub fn refusal_without_shadow(&self, route: &str, method: &Method, path: &str) -> Option<ProxyError> {
        let subject = match self {
            Principal::Agent { .. } => Subject { agent: self.id(), role: self.role() },
            Principal::Delegated { root, root_role, .. } => Subject { agent: &root.id, role: *root_role },
        };
        policy::refusal_without_shadow(&subject, route, method, path)
    }

    pub fn delegation(&self) -> Option<&Arc<Delegation>> {
        match self {
            Principal::Agent { .. } => None,
            Principal::Delegated { delegation, .. } => Some(delegation),
        }
    }

    /// As the parent of a new delegation.
    pub fn delegator(&self) -> Delegator<'_> {
        match self {
            Principal::Agent { agent, role } => Delegator {
                id: &agent.id,
                role,
                chain: &[],
                may_delegate: role.delegate,
                max_ttl: role.max_delegation_ttl,
                depth: 0,
                max_depth: role.max_delegation_depth,
                expires: None,
                budget_left: None,
            },
            Principal::Delegated { delegation, root_role, .. } => {
                // The root's role as it is now bounds depth and lifetime, as it does at use.
                let mut delegator = delegation.as_delegator();
                delegator.max_depth = delegator.max_depth.min(root_role.max_delegation_depth);
                delegator.max_ttl = delegator.max_ttl.min(root_role.max_delegation_ttl);
                delegator
            }
        }
    }
}

/// The configured agent as a principal, unless it was revoked.
fn agent_principal<'r>(
    revoked: &RevokedAgents,
    runtime: &'r Runtime,
    agent: &'r AgentConfig,
) -> Result<Principal<'r>, ProxyError> {
    if revoked.load().contains(&agent.id) {
        return Err(ProxyError::AgentRevoked { agent: agent.id.clone() });
    }
    let role = runtime.config.roles.get(&agent.role).ok_or(ProxyError::Internal("the agent's role is not loaded"))?;
    Ok(Principal::Agent { agent, role })
}

/// A child key as a principal, if every link above it still stands: no ancestor revoked, the
/// root agent configured, enabled and not revoked, and the root's role (as the config holds it
/// now) still allowing delegation this deep and this long.
fn delegated_principal<'r>(
    delegations: &DelegationStore,
    revoked: &RevokedAgents,
    runtime: &'r Runtime,
    delegation: Arc<Delegation>,
    now: SystemTime,
) -> Result<Principal<'r>, ProxyError> {
    let withdrawn = |reason: String| ProxyError::DelegationWithdrawn { id: delegation.id.clone(), reason };
    let root_id = delegation.chain.last().ok_or(ProxyError::Internal("a delegation without a parent"))?;
    // A child of a revoked parent (or of a revoked agent) is refused, whatever its own flag.
    let ancestor_revoked = delegation.chain.iter().any(|id| delegations.get(id).is_some_and(|a| a.is_revoked()));
    if ancestor_revoked || revoked.load().contains(root_id) {
        return Err(ProxyError::DelegationRevoked { id: delegation.id.clone() });
    }
    let Some(root) = runtime.config.agents.iter().find(|a| &a.id == root_id) else {
        return Err(withdrawn(format!("its parent agent '{root_id}' is no longer configured")));
    };
    if root.disabled {
        return Err(withdrawn(format!("its parent agent '{root_id}' is disabled")));
    }
    let Some(root_role) = runtime.config.roles.get(&root.role) else {
        return Err(ProxyError::Internal("the agent's role is not loaded"));
    };
    if !root_role.delegate {
        return Err(withdrawn(format!("role '{}' of its parent agent '{root_id}' may no longer delegate", root.role)));
    }
    if delegation.depth > root_role.max_delegation_depth {
        return Err(withdrawn(format!(
            "its depth {} exceeds the delegation depth limit of {} that role '{}' now has",
            delegation.depth, root_role.max_delegation_depth, root.role
        )));
    }
    if delegation.created + root_role.max_delegation_ttl <= now {
        return Err(withdrawn(format!(
            "it is older than the {} s that role '{}' now allows a delegation to live",
            root_role.max_delegation_ttl.as_secs(),
            root.role
        )));
    }
    Ok(Principal::Delegated { delegation, root, root_role })
}

/// On the Unix socket, for a request without a key: the agent identified by the caller's uid
/// alone (`peer_uid` without `key_sha256`), if there is one.
pub fn identify_peer<'r>(
    revoked: &RevokedAgents,
    runtime: &'r Runtime,
    uid: u32,
) -> Option<Result<Principal<'r>, ProxyError>> {
    runtime.agents.identify_uid(uid).map(|agent| agent_principal(revoked, runtime, agent))
}

/// The principal a key belongs to; `route` names where it was used, for the 401 message.
/// `peer_uid` is the caller's uid on the Unix socket: an agent bound to a uid must match it.
pub fn identify<'r>(
    delegations: &DelegationStore,
    revoked: &RevokedAgents,
    runtime: &'r Runtime,
    key: &str,
    route: &str,
    peer_uid: Option<u32>,
) -> Result<Principal<'r>, ProxyError> {
    match runtime.agents.identify(key, route) {
        Ok(agent) => {
            if agent.peer_uid.is_some() && agent.peer_uid != peer_uid {
                return Err(ProxyError::PeerMismatch { agent: agent.id.clone() });
            }
            agent_principal(revoked, runtime, agent)
        }
        Err(unknown) => match delegations.identify(key) {
            Some(Ok(delegation)) => delegated_principal(delegations, revoked, runtime, delegation, SystemTime::now()),
            Some(Err(refused)) => Err(refused),
            None => Err(unknown),
        },
    }
}
