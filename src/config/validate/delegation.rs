//! Delegation settings: how long and how deep a role's child keys may go, and the path agents
//! mint them on, which no route may take.

use std::time::Duration;

use super::super::raw::RawRole;
use super::Collector;

/// Where agents mint child keys; a route under it would shadow the endpoint.
const DELEGATIONS_PATH: &str = "/v1/delegations";

/// A role's `max_delegation_ttl_seconds` (default an hour) and `max_delegation_depth` (default 2).
pub(super) fn role_limits(c: &mut Collector<'_>, role: &str, raw: &RawRole) -> (Duration, u32) {
    let depth = raw.max_delegation_depth.unwrap_or(2);
    if depth == 0 && raw.delegate {
        c.problem(format!("roles.{role}.max_delegation_depth"), "must be at least 1 when delegate = true");
    }
    (Duration::from_secs(raw.max_delegation_ttl_seconds.unwrap_or(3600)), depth)
}

/// A route prefix may not take the delegation endpoint's path.
pub(super) fn reserved_prefix(c: &mut Collector<'_>, at: &str, prefix: &str) {
    if prefix == DELEGATIONS_PATH || prefix.strip_prefix(DELEGATIONS_PATH).is_some_and(|rest| rest.starts_with('/')) {
        c.problem(format!("{at}.prefix"), format!("{DELEGATIONS_PATH} is reserved for minting delegated keys"));
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn delegation_problems_are_reported_with_their_lines() {
        check(&[
            ("a delegating role with depth", "[roles.r]\ndelegate = true\nmax_delegation_depth = 1\n", &[]),
            (
                "a delegating role without depth",
                "[roles.r]\ndelegate = true\nmax_delegation_depth = 0\n",
                &["k.toml:3: roles.r.max_delegation_depth: must be at least 1 when delegate = true"],
            ),
            ("depth 0 on a role that does not delegate", "[roles.r]\nmax_delegation_depth = 0\n", &[]),
            (
                "a route on the delegation endpoint",
                "[[routes]]\nname = \"r\"\nprefix = \"/v1/delegations\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &["k.toml:3: routes[0].prefix: /v1/delegations is reserved for minting delegated keys"],
            ),
            (
                "a route below the delegation endpoint",
                "[[routes]]\nname = \"r\"\nprefix = \"/v1/delegations/x\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &["k.toml:3: routes[0].prefix: /v1/delegations is reserved for minting delegated keys"],
            ),
            (
                "a route that only starts with its letters",
                "[[routes]]\nname = \"r\"\nprefix = \"/v1/delegationsx\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n",
                &[],
            ),
        ]);
    }
}
