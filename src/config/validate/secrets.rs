//! `[secrets.NAME]`: a secret's kind (`static`, the default, or a kind that mints tokens from the
//! secret's value) and the kind's own fields, which the kind's module checks; and the grant
//! fields (`repositories`, `permissions`) that narrow the tokens of a kind that mints per grant.

use std::collections::{BTreeMap, HashMap};

use super::super::{KindConfig, RoleConfig};
use super::Collector;
use crate::credentials::{self, Check, sigv4};

/// A `[secrets.NAME]` table's fields as written.
type Table = serde_json::Map<String, serde_json::Value>;

/// The tables of kind `aws-sigv4`, read into that kind's own fields (it signs requests rather
/// than minting tokens, so `credentials::sigv4` validates them), and the rest.
pub(super) fn split_signing(
    c: &mut Collector<'_>,
    raw: BTreeMap<String, Table>,
) -> (BTreeMap<String, sigv4::RawSecretKind>, BTreeMap<String, Table>) {
    let (signing, rest): (BTreeMap<_, _>, BTreeMap<_, _>) =
        raw.into_iter().partition(|(_, table)| table.get("kind").and_then(|k| k.as_str()) == Some(sigv4::KIND));
    let mut read = BTreeMap::new();
    for (name, table) in signing {
        match serde_path_to_error::deserialize::<_, sigv4::RawSecretKind>(serde_json::Value::Object(table)) {
            Ok(fields) => {
                read.insert(name, fields);
            }
            Err(e) => {
                let field = e.path().to_string();
                let at = if field == "." { format!("secrets.{name}") } else { format!("secrets.{name}.{field}") };
                c.problem(at, credentials::kind::described(e.inner()));
            }
        }
    }
    (read, rest)
}

pub(super) fn kinds(
    c: &mut Collector<'_>,
    raw: BTreeMap<String, Table>,
    secret_owner: &HashMap<String, String>,
) -> BTreeMap<String, KindConfig> {
    let mut kinds = BTreeMap::new();
    for (name, mut table) in raw {
        let at = format!("secrets.{name}");
        if !secret_owner.contains_key(&name) {
            c.problem(at.clone(), format!("no source provides a secret named '{name}'"));
        }
        let kind = match table.remove("kind") {
            None => credentials::STATIC.to_string(),
            Some(serde_json::Value::String(kind)) => kind,
            Some(_) => {
                c.problem(format!("{at}.kind"), "must be a string, like \"github-app\"");
                continue;
            }
        };
        if kind == credentials::STATIC {
            for field in table.keys() {
                c.problem(format!("{at}.{field}"), "is not used by kind 'static'");
            }
            continue;
        }
        match KindConfig::configure(&kind, table, &mut Check::new(&at, c)) {
            Ok(Some(config)) => {
                kinds.insert(name, config);
            }
            Ok(None) => {}
            Err(expected) => c.problem(format!("{at}.kind"), format!("'{kind}': {expected}")),
        }
    }
    kinds
}

/// A grant's `repositories` and `permissions` narrow the tokens of a `github-app` secret; on any
/// other secret they would be silently ignored, so they are refused.
pub(super) fn grant_scopes(
    c: &mut Collector<'_>,
    roles: &BTreeMap<String, RoleConfig>,
    kinds: &BTreeMap<String, KindConfig>,
) {
    for (role, config) in roles {
        for (i, grant) in config.grants.iter().enumerate() {
            let at = format!("roles.{role}.grants[{i}]");
            if grant.scope.is_empty() {
                continue;
            }
            match kinds.get(&grant.secret) {
                Some(kind) if kind.grant_scope() => {
                    for (field, message) in kind.check_scope(&grant.scope) {
                        c.problem(format!("{at}.{field}"), message);
                    }
                }
                other => {
                    let kind = other.map_or(credentials::STATIC, KindConfig::kind);
                    let field = if grant.scope.repositories.is_empty() { "permissions" } else { "repositories" };
                    c.problem(
                        format!("{at}.{field}"),
                        format!(
                            "narrows the tokens of a 'github-app' secret only; '{}' is of kind '{kind}'",
                            grant.secret
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    const BASE: &str = "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { GH = \"{{GH}}\", O = \"{{O}}\", S = \"{{S}}\" }\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = { header = \"x-api-key\" }\ninject = { header = \"authorization\", value = \"Bearer {{secret}}\" }\n";

    fn with(extra: &str) -> String {
        format!("{BASE}{extra}")
    }

    #[test]
    fn kinds_and_their_fields_are_checked_with_their_lines() {
        let cases: Vec<(&str, String, Vec<&str>)> = vec![
            (
                "a valid github-app, oauth2 and static secret",
                with(
                    "[secrets.GH]\nkind = \"github-app\"\napp_id = 12\ninstallation_id = 34\n[secrets.O]\nkind = \"oauth2-client-credentials\"\ntoken_url = \"https://auth.example/token\"\nclient_id = \"svc\"\n[secrets.S]\nkind = \"static\"\n",
                ),
                vec![],
            ),
            (
                "an unknown kind and a secret no source maps",
                with(
                    "[secrets.GH]\nkind = \"kerberos\"\n[secrets.NOPE]\nkind = \"github-app\"\napp_id = 1\ninstallation_id = 2\n",
                ),
                vec![
                    "k.toml:12: secrets.GH.kind: 'kerberos': expected 'static', 'github-app', 'oauth2-client-credentials', 'gcp-service-account' or 'aws-sigv4'",
                    "k.toml:13: secrets.NOPE: no source provides a secret named 'NOPE'",
                ],
            ),
            (
                "missing, unknown and mistyped fields",
                with(
                    "[secrets.GH]\nkind = \"github-app\"\napp_id = 1\n[secrets.O]\nkind = \"oauth2-client-credentials\"\ntoken_url = \"https://a.example/t\"\nclient_id = \"c\"\nclientauth = \"body\"\n[secrets.S]\nkind = \"static\"\napp_id = 3\n",
                ),
                vec![
                    "k.toml:11: secrets.GH.installation_id: is required for kind 'github-app' (or `owner`, to look the installation up)",
                    "k.toml:18: secrets.O.clientauth: unknown field `clientauth`, expected one of `token_url`, `client_id`, `scope`, `audience`, `client_auth`, `refresh_margin_seconds` (did you mean `client_auth`?)",
                    "k.toml:21: secrets.S.app_id: is not used by kind 'static'",
                ],
            ),
        ];
        let cases: Vec<(&str, &str, &[&str])> = cases.iter().map(|(n, t, e)| (*n, t.as_str(), e.as_slice())).collect();
        check(&cases);
    }

    #[test]
    fn grant_scopes_are_checked_and_only_for_github_apps() {
        let grant = |scope: &str| {
            with(&format!(
                "[secrets.GH]\nkind = \"github-app\"\napp_id = 1\ninstallation_id = 2\n[roles.w]\ngrants = [{{ route = \"r\", secret = \"GH\", methods = [\"GET\"], paths = [\"/**\"], {scope} }}, {{ route = \"r\", secret = \"S\", methods = [\"GET\"], paths = [\"/**\"], permissions = {{ contents = \"read\" }} }}]\n"
            ))
        };
        let ok =
            grant("repositories = [\"keyward\"], permissions = { contents = \"read\", pull_requests = \"write\" }");
        let bad =
            grant("repositories = [\"octo/keyward\", \"\"], permissions = { Contents = \"read\", issues = \"all\" }");
        let empty = grant("repositories = []");
        check(&[
            (
                "a good scope; a scope on a static secret",
                &ok,
                &[
                    "k.toml:16: roles.w.grants[1].permissions: narrows the tokens of a 'github-app' secret only; 'S' is of kind 'static'",
                ],
            ),
            (
                "bad repositories and permissions",
                &bad,
                &[
                    "k.toml:16: roles.w.grants[0].repositories[0]: 'octo/keyward' is not a repository name (the name alone, without its owner)",
                    "k.toml:16: roles.w.grants[0].repositories[1]: '' is not a repository name (the name alone, without its owner)",
                    "k.toml:16: roles.w.grants[0].permissions.Contents: 'Contents' is not a GitHub App permission name (like contents or pull_requests)",
                    "k.toml:16: roles.w.grants[0].permissions.issues: 'all' must be read, write or admin",
                    "k.toml:16: roles.w.grants[1].permissions: narrows the tokens of a 'github-app' secret only; 'S' is of kind 'static'",
                ],
            ),
            (
                "an empty repository list",
                &empty,
                &[
                    "k.toml:16: roles.w.grants[0].repositories: lists no repository; leave it out for every repository the installation can reach",
                    "k.toml:16: roles.w.grants[1].permissions: narrows the tokens of a 'github-app' secret only; 'S' is of kind 'static'",
                ],
            ),
        ]);
    }
}
