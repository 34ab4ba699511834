//! Who is calling: a configured agent, or a child key a parent delegated, with the role whose
//! grants apply. Revoked agents and revoked or expired child keys are refused here.

use std::sync::Arc;

use crate::config::{AgentConfig, RoleConfig};
use crate::delegation::{Delegation, Delegator};
use crate::error::ProxyError;
use crate::state::{AppState, Runtime};

pub enum Principal<'r> {
    Agent { agent: &'r AgentConfig, role: &'r RoleConfig },
    Delegated(Arc<Delegation>),
}

impl Principal<'_> {
    pub fn id(&self) -> &str {
        match self {
            Principal::Agent { agent, .. } => &agent.id,
            Principal::Delegated(d) => &d.id,
        }
    }

    pub fn role(&self) -> &RoleConfig {
        match self {
            Principal::Agent { role, .. } => role,
            Principal::Delegated(d) => &d.role,
        }
    }

    /// The configured agent at the root of the chain: limits, quarantine and anomaly detection
    /// apply to it, so a parent cannot escape them by delegating.
    pub fn root(&self) -> &str {
        match self {
            Principal::Agent { agent, .. } => &agent.id,
            Principal::Delegated(d) => d.chain.last().map_or(&d.id, String::as_str),
        }
    }

    /// The role whose limits apply: the root agent's.
    pub fn limits_role<'a>(&'a self, runtime: &'a Runtime) -> &'a RoleConfig {
        match self {
            Principal::Agent { role, .. } => role,
            Principal::Delegated(d) => {
                let root = self.root();
                runtime
                    .config
                    .agents
                    .iter()
                    .find(|a| a.id == root)
                    .and_then(|a| runtime.config.roles.get(&a.role))
                    .unwrap_or(&d.role)
            }
        }
    }

    pub fn delegation(&self) -> Option<&Arc<Delegation>> {
        match self {
            Principal::Agent { .. } => None,
            Principal::Delegated(d) => Some(d),
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
            Principal::Delegated(d) => d.as_delegator(),
        }
    }
}

/// The configured agent as a principal, unless it was revoked.
fn agent_principal<'r>(
    state: &AppState,
    runtime: &'r Runtime,
    agent: &'r AgentConfig,
) -> Result<Principal<'r>, ProxyError> {
    if state.revoked_agents.load().contains(&agent.id) {
        return Err(ProxyError::AgentRevoked { agent: agent.id.clone() });
    }
    let role = runtime.config.roles.get(&agent.role).ok_or(ProxyError::Internal("the agent's role is not loaded"))?;
    Ok(Principal::Agent { agent, role })
}

/// On the Unix socket, for a request without a key: the agent identified by the caller's uid
/// alone (`peer_uid` without `key_sha256`), if there is one.
pub fn identify_peer<'r>(
    state: &AppState,
    runtime: &'r Runtime,
    uid: u32,
) -> Option<Result<Principal<'r>, ProxyError>> {
    runtime.agents.identify_uid(uid).map(|agent| agent_principal(state, runtime, agent))
}

/// The principal a key belongs to; `route` names where it was used, for the 401 message.
/// `peer_uid` is the caller's uid on the Unix socket: an agent bound to a uid must match it.
pub fn identify<'r>(
    state: &AppState,
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
            agent_principal(state, runtime, agent)
        }
        Err(unknown) => match state.delegations.identify(key) {
            Some(Ok(delegation)) => {
                // A child of a revoked parent (or of a revoked agent) is refused, whatever its own flag.
                let root_revoked =
                    delegation.chain.last().is_some_and(|root| state.revoked_agents.load().contains(root));
                let ancestor_revoked =
                    delegation.chain.iter().any(|id| state.delegations.get(id).is_some_and(|a| a.is_revoked()));
                if root_revoked || ancestor_revoked {
                    return Err(ProxyError::DelegationRevoked { id: delegation.id.clone() });
                }
                Ok(Principal::Delegated(delegation))
            }
            Some(Err(refused)) => Err(refused),
            None => Err(unknown),
        },
    }
}
