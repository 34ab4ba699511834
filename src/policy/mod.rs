//! Pure policy decisions: which route a path belongs to, and whether a role's grants allow a call.
//!
//! Nothing here does I/O or reads a clock; everything is tested with tables of cases.

mod pattern;
mod routing;

use http::Method;

pub use pattern::{MethodSet, PathPattern};
pub use routing::{CheckedPath, RouteMatch, RouteTable, check_path, check_target};

use crate::config::{GrantConfig, RoleConfig};
use crate::error::{Missing, ProxyError};

/// Who is asking, for the 403 message.
pub struct Subject<'a> {
    pub agent: &'a str,
    pub role: &'a RoleConfig,
}

/// Deny by default: the first grant of `role` on `route` that covers `method` and `path`, or a 403
/// naming the most specific thing that is missing.
pub fn authorize<'r>(
    subject: &Subject<'r>,
    route: &str,
    method: &Method,
    path: &str,
) -> Result<&'r GrantConfig, ProxyError> {
    let mut missing = Missing::Route;
    for grant in subject.role.grants.iter().filter(|g| g.route == route) {
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
        role: subject.role.name.clone(),
        route: route.to_string(),
        method: method.to_string(),
        path: if path.is_empty() { "/".to_string() } else { path.to_string() },
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(route: &str, secret: &str, methods: &[&str], paths: &[&str]) -> GrantConfig {
        GrantConfig {
            route: route.into(),
            secret: secret.into(),
            methods: MethodSet::parse(&methods.iter().map(|m| m.to_string()).collect::<Vec<_>>()).unwrap(),
            paths: paths.iter().map(|p| PathPattern::parse(p).unwrap()).collect(),
            quota: None,
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
