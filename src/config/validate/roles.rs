//! `[roles.*]` (grants, quotas, anomaly detectors, delegation limits) and `[[agents]]` (who
//! holds which role, identified by key hash or peer uid).

use std::collections::{BTreeMap, HashMap, HashSet};

use super::super::raw::{RawAgent, RawRole};
use super::super::{AgentConfig, GrantConfig, Quota, RoleConfig, ServerConfig};
use super::{Collector, check_unique, delegation, did_you_mean, limits, valid_name};
use crate::policy::{MethodSet, PathPattern};

pub(super) fn roles(
    c: &mut Collector<'_>,
    raw: BTreeMap<String, RawRole>,
    route_names: &HashSet<&str>,
    secret_owner: &HashMap<String, String>,
) -> BTreeMap<String, RoleConfig> {
    let mut roles = BTreeMap::new();
    for (name, mut raw_role) in raw {
        let role_quota = match &raw_role.rate {
            Some(rate) => {
                Quota::parse(rate, raw_role.burst).map_err(|e| c.problem(format!("roles.{name}.rate"), e)).ok()
            }
            None => {
                if raw_role.burst.is_some() {
                    c.problem(format!("roles.{name}.burst"), "needs a rate");
                }
                None
            }
        };
        let mut grants = Vec::new();
        for (i, g) in std::mem::take(&mut raw_role.grants).into_iter().enumerate() {
            let at = format!("roles.{name}.grants[{i}]");
            if !route_names.contains(g.route.as_str()) {
                let near = super::super::suggest(&g.route, route_names.iter().copied());
                c.problem(format!("{at}.route"), format!("no route named '{}'{}", g.route, did_you_mean(near)));
            }
            if !secret_owner.contains_key(&g.secret) {
                c.problem(format!("{at}.secret"), format!("no source provides a secret named '{}'", g.secret));
            }
            let methods = MethodSet::parse(&g.methods).unwrap_or_else(|e| {
                c.problem(format!("{at}.methods"), e);
                MethodSet::none()
            });
            if g.paths.is_empty() {
                c.problem(format!("{at}.paths"), "grants no path: list at least one, or \"/**\" for all");
            }
            let paths = g
                .paths
                .iter()
                .enumerate()
                .filter_map(|(j, p)| PathPattern::parse(p).map_err(|e| c.problem(format!("{at}.paths[{j}]"), e)).ok())
                .collect();
            let quota = match &g.rate {
                Some(rate) => Quota::parse(rate, g.burst).map_err(|e| c.problem(format!("{at}.rate"), e)).ok(),
                None => {
                    if g.burst.is_some() {
                        c.problem(format!("{at}.burst"), "needs a rate");
                    }
                    role_quota
                }
            };
            grants.push(GrantConfig { route: g.route, secret: g.secret, methods, paths, quota });
        }
        let (max_delegation_ttl, max_delegation_depth) = delegation::role_limits(c, &name, &raw_role);
        if raw_role.max_in_flight == Some(0) {
            c.problem(format!("roles.{name}.max_in_flight"), "must be at least 1");
        }
        let anomaly = limits::anomaly(c, &format!("roles.{name}.anomaly"), raw_role.anomaly.take().unwrap_or_default());
        let role = RoleConfig {
            name: name.clone(),
            grants,
            max_in_flight: raw_role.max_in_flight,
            anomaly,
            delegate: raw_role.delegate,
            max_delegation_ttl,
            max_delegation_depth,
        };
        roles.insert(name, role);
    }

    roles
}

pub(super) fn agents(
    c: &mut Collector<'_>,
    raw: Vec<RawAgent>,
    roles: &BTreeMap<String, RoleConfig>,
    server: &ServerConfig,
) -> Vec<AgentConfig> {
    let mut agents = Vec::new();
    for (i, a) in raw.into_iter().enumerate() {
        let at = format!("agents[{i}]");
        if !roles.contains_key(&a.role) {
            let near = super::super::suggest(&a.role, roles.keys().map(String::as_str));
            c.problem(format!("{at}.role"), format!("no role named '{}'{}", a.role, did_you_mean(near)));
        }
        if !valid_name(&a.id) {
            c.problem(format!("{at}.id"), "use letters, digits, '-', '_', '.' or ':' (1-128 characters)");
        }
        let key_sha256 = a.key_sha256.as_ref().map(|text| {
            let mut hash = [0u8; 32];
            if text.len() != 64 || hex::decode_to_slice(text, &mut hash).is_err() {
                c.problem(format!("{at}.key_sha256"), "must be 64 hex characters (see `keyward agents new`)");
            }
            hash
        });
        match (&key_sha256, a.peer_uid) {
            (None, None) => c.problem(
                format!("{at}.key_sha256"),
                "is required unless the agent is identified by peer_uid on a Unix socket",
            ),
            (_, Some(_)) if server.listen_unix.is_none() => c.problem(
                format!("{at}.peer_uid"),
                "needs a Unix-socket listener (server.listen = \"unix:/path\"): TCP peers have no uid",
            ),
            _ => {}
        }
        agents.push(AgentConfig { id: a.id, role: a.role, key_sha256, peer_uid: a.peer_uid, disabled: a.disabled });
    }
    check_unique(c, agents.iter().enumerate().map(|(i, a)| (format!("agents[{i}].id"), a.id.clone())), "agent id");
    check_unique(
        c,
        agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.key_sha256.map(|k| (format!("agents[{i}].key_sha256"), hex::encode(k)))),
        "agent key hash",
    );
    // A uid alone must name one agent; uid-bound agents with keys may share a uid.
    check_unique(
        c,
        agents
            .iter()
            .enumerate()
            .filter(|(_, a)| a.key_sha256.is_none() && !a.disabled)
            .filter_map(|(i, a)| a.peer_uid.map(|uid| (format!("agents[{i}].peer_uid"), uid.to_string()))),
        "peer_uid for an agent without a key",
    );

    agents
}
