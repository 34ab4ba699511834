//! Pure policy decisions: which route a path belongs to, and whether a role's grants allow a call.
//!
//! Nothing here does I/O or reads a clock; everything is tested with tables of cases.

mod grant;
pub mod hosts;
mod pattern;
mod routing;
mod upstream;

use http::Method;

pub use crate::suggest::suggest;
pub use grant::{GrantConfig, MintScope, Mode, Quota};
pub use hosts::{AddressKind, HostTable, canonical_host};
pub use pattern::{MethodSet, PathPattern};
pub use routing::{CheckedPath, RouteMatch, RouteTable, check_path, check_target, is_loopback_host};
pub use upstream::Upstream;

use crate::error::{Missing, ProxyError};

/// What authorization reads of a role: its name (for the 403 message) and its grants.
pub trait RoleGrants {
    fn name(&self) -> &str;
    fn grants(&self) -> &[GrantConfig];
}

impl<T: RoleGrants + ?Sized> RoleGrants for &T {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn grants(&self) -> &[GrantConfig] {
        (**self).grants()
    }
}

/// Who is asking, for the 403 message.
pub struct Subject<'a> {
    pub agent: &'a str,
    pub role: &'a dyn RoleGrants,
}

/// Deny by default: the first grant of `role` on `route` that covers `method` and `path`, or a 403
/// naming the most specific thing that is missing.
///
/// Enforced grants are tried first; a grant in shadow mode allows only what no enforced grant
/// does, and the caller records that as `would_deny` (`refusal_without_shadow` says why).
pub fn authorize<'r>(
    subject: &Subject<'r>,
    route: &str,
    method: &Method,
    path: &str,
) -> Result<&'r GrantConfig, ProxyError> {
    let enforced = decide(subject, route, method, path, Mode::Enforce);
    if enforced.is_ok() || !subject.role.grants().iter().any(|g| g.mode == Mode::Shadow) {
        return enforced;
    }
    decide(subject, route, method, path, Mode::Shadow).or(enforced)
}

/// The refusal the role's enforced grants alone give this call (a grant in shadow mode let it
/// through).
pub fn refusal_without_shadow(subject: &Subject<'_>, route: &str, method: &Method, path: &str) -> Option<ProxyError> {
    decide(subject, route, method, path, Mode::Enforce).err()
}

fn decide<'r>(
    subject: &Subject<'r>,
    route: &str,
    method: &Method,
    path: &str,
    mode: Mode,
) -> Result<&'r GrantConfig, ProxyError> {
    let mut missing = Missing::Route;
    for grant in subject.role.grants().iter().filter(|g| g.route == route && g.mode == mode) {
        if !grant.methods.allows(method) {
            if missing == Missing::Route {
                missing = Missing::Method;
            }
            continue;
        }
        if grant.paths.iter().any(|p| p.matches(path)) {
            return Ok(grant);
        }
        missing = Missing::Path;
    }
    Err(ProxyError::Forbidden {
        agent: subject.agent.to_string(),
        role: subject.role.name().to_string(),
        route: route.to_string(),
        method: method.to_string(),
        path: if path.is_empty() { "/".to_string() } else { path.to_string() },
        missing,
    })
}

/// For a child key whose own grant `own` allows the call: the grant of its root agent's role
/// (as configured now) for the same route and credential that also allows it, or a 403 saying
/// the root no longer holds it. A child's rights are what it was given, cut to what its root
/// holds at the time of the call.
pub fn authorize_within<'r>(
    child: &Subject<'_>,
    root: &Subject<'r>,
    own: &GrantConfig,
    method: &Method,
    path: &str,
) -> Result<&'r GrantConfig, ProxyError> {
    let allows = |g: &&GrantConfig| {
        g.route == own.route
            && g.secret == own.secret
            && g.methods.allows(method)
            && g.paths.iter().any(|p| p.matches(path))
    };
    // An enforced grant of the root first; its shadow grant only when none allows the call.
    let grants = root.role.grants();
    grants
        .iter()
        .filter(|g| g.mode == Mode::Enforce)
        .find(allows)
        .or_else(|| grants.iter().filter(|g| g.mode == Mode::Shadow).find(allows))
        .ok_or_else(|| ProxyError::ParentForbidden {
            agent: child.agent.to_string(),
            parent: root.agent.to_string(),
            route: own.route.clone(),
            method: method.to_string(),
            path: if path.is_empty() { "/".to_string() } else { path.to_string() },
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoleConfig;

    fn grant(route: &str, secret: &str, methods: &[&str], paths: &[&str]) -> GrantConfig {
        GrantConfig {
            route: route.into(),
            secret: secret.into(),
            methods: MethodSet::parse(&methods.iter().map(|m| m.to_string()).collect::<Vec<_>>()).unwrap(),
            paths: paths.iter().map(|p| PathPattern::parse(p).unwrap()).collect(),
            quota: None,
            ..GrantConfig::default()
        }
    }

    fn roles() -> Vec<RoleConfig> {
        vec![
            RoleConfig {
                name: "worker".into(),
                grants: vec![
                    grant("openai", "OPENAI_API_KEY", &["POST"], &["/v1/chat/completions", "/v1/responses"]),
                    grant("github", "GITHUB_TOKEN", &["GET"], &["/repos/**", "/user"]),
                ],
                ..RoleConfig::default()
            },
            RoleConfig {
                name: "reader".into(),
                grants: vec![grant("openai", "OPENAI_API_KEY", &["GET"], &["/v1/models", "/v1/models/*"])],
                ..RoleConfig::default()
            },
            RoleConfig {
                name: "admin".into(),
                grants: vec![
                    grant("github", "GITHUB_TOKEN", &["GET"], &["/**"]),
                    grant("github", "GITHUB_ADMIN_TOKEN", &["*"], &["/orgs/**"]),
                ],
                ..RoleConfig::default()
            },
            RoleConfig { name: "nobody".into(), ..RoleConfig::default() },
        ]
    }

    #[test]
    fn a_child_holds_only_what_its_root_still_holds() {
        let roles = roles();
        let role = |n: &str| roles.iter().find(|r| r.name == n).unwrap();
        let child_role = RoleConfig {
            name: "delegation:dlg_1".into(),
            grants: vec![grant("github", "GITHUB_TOKEN", &["GET"], &["/repos/**", "/user"])],
            ..RoleConfig::default()
        };
        let child = Subject { agent: "dlg_1", role: &child_role };
        // (root's role now, method, path) → Ok(secret of the root's grant) or Err(())
        let cases: &[(&str, Method, &str, bool)] = &[
            ("worker", Method::GET, "/repos/o/r", true),
            ("worker", Method::GET, "/user", true),
            ("admin", Method::GET, "/repos/o/r", true),
            // The root's role was narrowed to models only, or lost every grant.
            ("reader", Method::GET, "/repos/o/r", false),
            ("nobody", Method::GET, "/user", false),
        ];
        for (root_role, method, path, allowed) in cases {
            let own = authorize(&child, "github", method, path).unwrap();
            let root = Subject { agent: "lead", role: role(root_role) };
            match (authorize_within(&child, &root, own, method, path), allowed) {
                (Ok(grant), true) => assert_eq!(grant.secret, "GITHUB_TOKEN"),
                (Err(ProxyError::ParentForbidden { parent, .. }), false) => assert_eq!(parent, "lead"),
                (got, _) => panic!("{root_role} {method} {path}: got {got:?}"),
            }
        }
        // A root grant for the same path but another credential does not count.
        let other = RoleConfig {
            name: "other".into(),
            grants: vec![grant("github", "GITHUB_ADMIN_TOKEN", &["GET"], &["/**"])],
            ..RoleConfig::default()
        };
        let own = authorize(&child, "github", &Method::GET, "/user").unwrap();
        let root = Subject { agent: "lead", role: &other };
        assert!(authorize_within(&child, &root, own, &Method::GET, "/user").is_err());
    }

    #[test]
    fn authorization_table() {
        let roles = roles();
        let role = |n: &str| roles.iter().find(|r| r.name == n).unwrap();
        // (role, route, method, path) → Ok(secret) or Err(missing)
        type Case<'a> = (&'a str, &'a str, Method, &'a str, Result<&'a str, Missing>);
        let cases: &[Case] = &[
            ("worker", "openai", Method::POST, "/v1/chat/completions", Ok("OPENAI_API_KEY")),
            ("worker", "openai", Method::POST, "/v1/responses", Ok("OPENAI_API_KEY")),
            ("worker", "openai", Method::GET, "/v1/chat/completions", Err(Missing::Method)),
            ("worker", "openai", Method::POST, "/v1/files", Err(Missing::Path)),
            ("worker", "openai", Method::POST, "/v1/chat/completions/extra", Err(Missing::Path)),
            ("worker", "anthropic", Method::POST, "/v1/messages", Err(Missing::Route)),
            ("worker", "github", Method::GET, "/repos/o/r/pulls", Ok("GITHUB_TOKEN")),
            ("worker", "github", Method::GET, "/user", Ok("GITHUB_TOKEN")),
            ("worker", "github", Method::GET, "/user/repos", Err(Missing::Path)),
            ("worker", "github", Method::DELETE, "/repos/o/r", Err(Missing::Method)),
            ("worker", "github", Method::HEAD, "/user", Err(Missing::Method)),
            ("reader", "openai", Method::GET, "/v1/models/gpt-5", Ok("OPENAI_API_KEY")),
            ("reader", "openai", Method::GET, "", Err(Missing::Path)),
            ("reader", "openai", Method::POST, "/v1/models", Err(Missing::Method)),
            ("admin", "github", Method::GET, "/orgs/x", Ok("GITHUB_TOKEN")),
            ("admin", "github", Method::DELETE, "/orgs/x/members/y", Ok("GITHUB_ADMIN_TOKEN")),
            ("admin", "github", Method::DELETE, "/repos/x", Err(Missing::Path)),
            ("nobody", "github", Method::GET, "/user", Err(Missing::Route)),
        ];
        for (role_name, route, method, path, expect) in cases {
            let subject = Subject { agent: "a1", role: role(role_name) };
            let got = authorize(&subject, route, method, path);
            match (expect, got) {
                (Ok(secret), Ok(grant)) => assert_eq!(&grant.secret, secret, "{role_name} {method} {route}{path}"),
                (Err(missing), Err(ProxyError::Forbidden { missing: got, .. })) => {
                    assert_eq!(missing, &got, "{role_name} {method} {route}{path}")
                }
                (expect, got) => panic!("{role_name} {method} {route}{path}: expected {expect:?}, got {got:?}"),
            }
        }
    }
}
