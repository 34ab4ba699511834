//! `[roles.*]` (grants, quotas, anomaly detectors, delegation limits) and `[[agents]]` (who
//! holds which role, identified by key hash or peer uid).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::super::raw::{RawAgent, RawRole};
use super::super::{AgentConfig, GrantConfig, InjectSpec, MintScope, Quota, RoleConfig, RouteConfig, ServerConfig};
use super::{Collector, check_unique, delegation, did_you_mean, limits, valid_name};
use crate::credentials::sigv4::Sigv4Config;
use crate::policy::{MethodSet, Mode, PathPattern};

pub(super) fn roles(
    c: &mut Collector<'_>,
    raw: BTreeMap<String, RawRole>,
    route_names: &HashSet<&str>,
    secret_owner: &HashMap<String, String>,
) -> BTreeMap<String, RoleConfig> {
    let mut roles = BTreeMap::new();
    let mode = |c: &mut Collector<'_>, field: String, text: Option<&str>| {
        Mode::parse(text.unwrap_or("enforce")).unwrap_or_else(|| {
            c.problem(field, "is not \"enforce\" or \"shadow\"");
            Mode::Enforce
        })
    };
    for (name, mut raw_role) in raw {
        let role_mode = mode(c, format!("roles.{name}.mode"), raw_role.mode.as_deref());
        let role_quota_mode = mode(c, format!("roles.{name}.quota_mode"), raw_role.quota_mode.as_deref());
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
            let (quota, inherited_quota_mode) = match &g.rate {
                Some(rate) => {
                    (Quota::parse(rate, g.burst).map_err(|e| c.problem(format!("{at}.rate"), e)).ok(), Mode::Enforce)
                }
                None => {
                    if g.burst.is_some() {
                        c.problem(format!("{at}.burst"), "needs a rate");
                    }
                    (role_quota, role_quota_mode)
                }
            };
            if g.repositories.as_ref().is_some_and(Vec::is_empty) {
                c.problem(
                    format!("{at}.repositories"),
                    "lists no repository; leave it out for every repository the installation can reach",
                );
            }
            let scope = Arc::new(MintScope {
                repositories: g.repositories.unwrap_or_default(),
                permissions: g.permissions.unwrap_or_default(),
            });
            let grant_mode = mode(c, format!("{at}.mode"), g.mode.as_deref());
            let quota_mode = match g.quota_mode.as_deref() {
                Some(text) => mode(c, format!("{at}.quota_mode"), Some(text)),
                None => inherited_quota_mode,
            };
            if quota.is_none() && g.quota_mode.is_some() {
                c.problem(format!("{at}.quota_mode"), "applies to no quota: set a rate on the grant or its role");
            }
            grants.push(GrantConfig {
                route: g.route,
                secret: g.secret,
                methods,
                paths,
                quota,
                mode: grant_mode,
                quota_mode,
                scope,
            });
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
            mode: role_mode,
        };
        roles.insert(name, role);
    }

    roles
}

/// A secret of a signing kind goes with a route without `inject`, and a stored secret with a
/// route that has one: the route's `inject` says how its credential goes on the request.
pub(super) fn signing_agrees(
    c: &mut Collector<'_>,
    roles: &BTreeMap<String, RoleConfig>,
    routes: &[RouteConfig],
    sigv4: &BTreeMap<String, Sigv4Config>,
    declared: &HashSet<String>,
) {
    for (name, role) in roles {
        for (i, grant) in role.grants.iter().enumerate() {
            let Some(route) = routes.iter().find(|r| r.name == grant.route) else { continue };
            let signs = sigv4.contains_key(&grant.secret);
            let unsigned = route.inject == InjectSpec::Signed;
            let at = format!("roles.{name}.grants[{i}].secret");
            if signs && !unsigned {
                c.problem(
                    at,
                    format!(
                        "secret '{}' is kind '{}': keyward signs the request with it, so route '{}' must have no inject",
                        grant.secret,
                        crate::credentials::sigv4::KIND,
                        route.name
                    ),
                );
            } else if !signs && unsigned && !declared.contains(&grant.secret) {
                c.problem(
                    at,
                    format!(
                        "route '{}' has no inject, so its secrets must sign: secret '{}' is stored; give the route an \
                         inject or make '{}' kind = \"{}\"",
                        route.name,
                        grant.secret,
                        grant.secret,
                        crate::credentials::sigv4::KIND
                    ),
                );
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn role_and_agent_problems_are_reported_with_their_lines() {
        check(&[
            (
                "a grant of an unknown route and secret",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n[roles.w]\ngrants = [{ route = \"rr\", secret = \"T\", methods = [\"GET\"], paths = [\"/**\"] }]\n",
                &[
                    "k.toml:12: roles.w.grants[0].route: no route named 'rr' (did you mean 'r'?)",
                    "k.toml:12: roles.w.grants[0].secret: no source provides a secret named 'T'",
                ],
            ),
            (
                "a grant with a bad method, no paths and a burst without rate",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n[roles.w]\ngrants = [{ route = \"r\", secret = \"S\", methods = [\"FROB\"], paths = [], burst = 3 }]\n",
                &[
                    "k.toml:12: roles.w.grants[0].methods: 'FROB' is not an HTTP method keyward knows; use one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, QUERY, PROPFIND, PROPPATCH, MKCOL, COPY, MOVE, LOCK, UNLOCK, REPORT, SEARCH, MERGE, or \"*\"",
                    "k.toml:12: roles.w.grants[0].paths: grants no path: list at least one, or \"/**\" for all",
                    "k.toml:12: roles.w.grants[0].burst: needs a rate",
                ],
            ),
            (
                "a bad path pattern and rate",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n[roles.w]\ngrants = [{ route = \"r\", secret = \"S\", methods = [\"GET\"], paths = [\"nope\"], rate = \"5/fortnight\" }]\n",
                &[
                    "k.toml:12: roles.w.grants[0].paths[0]: 'nope' must start with '/'",
                    "k.toml:12: roles.w.grants[0].rate: '5/fortnight': unknown unit 'fortnight' (use /s, /min or /h)",
                ],
            ),
            (
                "shadow modes that are neither, and a quota mode without a quota",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n[roles.w]\nmode = \"quiet\"\nquota_mode = \"shadow\"\ngrants = [{ route = \"r\", secret = \"S\", methods = [\"GET\"], paths = [\"/**\"], mode = \"dry\", quota_mode = \"shadow\" }]\n",
                &[
                    "k.toml:12: roles.w.mode: is not \"enforce\" or \"shadow\"",
                    "k.toml:14: roles.w.grants[0].mode: is not \"enforce\" or \"shadow\"",
                    "k.toml:14: roles.w.grants[0].quota_mode: applies to no quota: set a rate on the grant or its role",
                ],
            ),
            (
                "role quotas and in-flight limit",
                "[roles.w]\nrate = \"0/s\"\nmax_in_flight = 0\n[roles.v]\nburst = 2\n",
                &[
                    "k.toml:2: roles.w.rate: '0/s': the count must be at least 1",
                    "k.toml:3: roles.w.max_in_flight: must be at least 1",
                    "k.toml:5: roles.v.burst: needs a rate",
                ],
            ),
            (
                "an agent of an unknown role with a bad id and hash",
                "[roles.worker]\n[[agents]]\nid = \"a b\"\nrole = \"workr\"\nkey_sha256 = \"xyz\"\n",
                &[
                    "k.toml:3: agents[0].id: use letters, digits, '-', '_', '.' or ':' (1-128 characters)",
                    "k.toml:4: agents[0].role: no role named 'workr' (did you mean 'worker'?)",
                    "k.toml:5: agents[0].key_sha256: must be 64 hex characters (see `keyward agents new`)",
                ],
            ),
            (
                "an agent with neither key nor uid",
                "[roles.w]\n[[agents]]\nid = \"a\"\nrole = \"w\"\n",
                &[
                    "k.toml:2: agents[0].key_sha256: is required unless the agent is identified by peer_uid on a Unix socket",
                ],
            ),
            (
                "a peer uid without a Unix socket",
                "[roles.w]\n[[agents]]\nid = \"a\"\nrole = \"w\"\npeer_uid = 1000\n",
                &[
                    "k.toml:5: agents[0].peer_uid: needs a Unix-socket listener (server.listen = \"unix:/path\"): TCP peers have no uid",
                ],
            ),
            (
                "duplicate ids, key hashes and bare uids",
                "[server]\nlisten = \"unix:/run/k.sock\"\n[roles.w]\n[[agents]]\nid = \"a\"\nrole = \"w\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n[[agents]]\nid = \"a\"\nrole = \"w\"\nkey_sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n[[agents]]\nid = \"u0\"\nrole = \"w\"\npeer_uid = 7\n[[agents]]\nid = \"u1\"\nrole = \"w\"\npeer_uid = 7\n",
                &[
                    "k.toml:9: agents[1].id: duplicate agent id 'a' (first at agents[0].id)",
                    "k.toml:11: agents[1].key_sha256: duplicate agent key hash '0000000000000000000000000000000000000000000000000000000000000000' (first at agents[0].key_sha256)",
                    "k.toml:19: agents[3].peer_uid: duplicate peer_uid for an agent without a key '7' (first at agents[2].peer_uid)",
                ],
            ),
        ]);
    }
}
