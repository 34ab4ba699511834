//! `[[sources]]` and `sources_from`: each source's common fields (name, mapping, cache, rotation,
//! audit trail) here, its provider's fields in the provider's own module under `secrets/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use super::super::raw::{RawCache, RawExternal, RawRotation, RawSource};
use super::super::spans::SpanIndex;
use super::super::{
    AuditConfig, CachePolicy, Problem, ProviderConfig, RotationPolicy, Schedule, Selector, SourceConfig,
};
use super::{Collector, check_unique, valid_name};
use crate::credentials;

/// Validates every source, inline and from `sources_from` files, raising the audit retention to
/// the longest `auditTrail.retentionDays`. Returns the sources and which source serves each
/// secret name.
pub(super) fn sources(
    c: &mut Collector<'_>,
    raw_sources: Vec<RawSource>,
    sources_from: &[String],
    notifications: &BTreeMap<String, String>,
    audit: &mut AuditConfig,
) -> (Vec<SourceConfig>, HashMap<String, String>) {
    for (name, url) in notifications {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            c.problem(format!("notifications.{name}"), "must be a webhook URL (http:// or https://)");
        }
    }
    let mut cx = SourceContext { retention_floor: Vec::new(), channels: notifications };
    let mut sources: Vec<SourceConfig> = raw_sources
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| source(c, &format!("sources[{i}]"), s, &mut cx))
        .collect();
    for (i, path) in sources_from.iter().enumerate() {
        sources.extend(external_sources(c, &format!("sources_from[{i}]"), path, &mut cx));
    }
    // An `auditTrail.retentionDays` keeps the trail at least that long; the longest one wins.
    for days in cx.retention_floor {
        audit.retention_days = audit.retention_days.max(days);
    }
    check_fallbacks(c, &sources);
    let secret_owner = secret_names(c, &sources);
    (sources, secret_owner)
}

/// Secret names are global across sources: maps each to the source that serves it, reporting
/// duplicates. A source's `fallback_to` target may provide the same names: it stands in for them.
fn secret_names(c: &mut Collector<'_>, sources: &[SourceConfig]) -> HashMap<String, String> {
    check_unique(
        c,
        sources.iter().enumerate().map(|(i, s)| (format!("sources[{i}].name"), s.name.clone())),
        "source name",
    );
    let fallback_targets: HashSet<&str> = sources.iter().filter_map(|s| s.fallback_to.as_deref()).collect();
    let linked = |a: &str, b: &str| {
        let of = |x: &str| sources.iter().find(|s| s.name == x).and_then(|s| s.fallback_to.as_deref());
        fallback_chain(a, of).contains(&b) || fallback_chain(b, of).contains(&a)
    };
    let mut owner: HashMap<String, String> = HashMap::new();
    for (i, s) in sources.iter().enumerate() {
        for name in s.mapping.keys() {
            match owner.get(name) {
                Some(first) if linked(first, &s.name) => {
                    // The primary serves the name; its fallback only stands in.
                    if fallback_targets.contains(first.as_str()) && !fallback_targets.contains(s.name.as_str()) {
                        owner.insert(name.clone(), s.name.clone());
                    }
                }
                Some(first) => c.problem(
                    format!("sources[{i}].mapping.{name}"),
                    format!("secret '{name}' is already provided by source '{first}'; secret names are global"),
                ),
                None => {
                    owner.insert(name.clone(), s.name.clone());
                }
            }
        }
    }
    owner
}

/// The sources `start` falls back to, in order, stopping at a cycle.
fn fallback_chain<'a>(start: &'a str, next: impl Fn(&str) -> Option<&'a str>) -> Vec<&'a str> {
    let mut chain = Vec::new();
    let mut at = start;
    while let Some(to) = next(at) {
        if to == start || chain.contains(&to) {
            break;
        }
        chain.push(to);
        at = to;
    }
    chain
}

/// `fallback_to` names another source, without a cycle, that provides some of the same secrets.
fn check_fallbacks(c: &mut Collector<'_>, sources: &[SourceConfig]) {
    for (i, s) in sources.iter().enumerate() {
        let Some(target) = &s.fallback_to else { continue };
        let field = format!("sources[{i}].rotation.fallback_to");
        let Some(other) = sources.iter().find(|o| &o.name == target) else {
            c.problem(field, format!("no source is named '{target}'"));
            continue;
        };
        if other.name == s.name {
            c.problem(field, "a source cannot fall back to itself");
            continue;
        }
        let mut seen = vec![s.name.as_str()];
        let mut at = other;
        while let Some(next) = &at.fallback_to {
            if seen.contains(&next.as_str()) {
                c.problem(field.clone(), format!("falling back from '{}' leads back to '{next}'", s.name));
                break;
            }
            seen.push(at.name.as_str());
            match sources.iter().find(|o| &o.name == next) {
                Some(o) => at = o,
                None => break,
            }
        }
        if !s.mapping.keys().any(|name| other.mapping.contains_key(name)) {
            c.problem(field, format!("source '{target}' provides none of the secrets of '{}'", s.name));
        }
    }
}

fn selector(text: &str) -> Option<Selector> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    match inner {
        "." => Some(Selector::Whole),
        "" => None,
        field if !field.contains(['{', '}']) => Some(Selector::Field(field.to_string())),
        _ => None,
    }
}

/// What validating a source needs beyond the source itself.
struct SourceContext<'a> {
    /// Every `auditTrail.retentionDays`, to raise the audit retention to the largest.
    retention_floor: Vec<u32>,
    /// `[notifications]`: channel name → webhook URL, for `notificationChannel = "name"`.
    channels: &'a BTreeMap<String, String>,
}

/// Loads a file of the article's `external-secrets` blocks (one object or a list), reporting
/// problems at that file's own lines.
fn external_sources(c: &mut Collector<'_>, at: &str, written: &str, cx: &mut SourceContext<'_>) -> Vec<SourceConfig> {
    let resolved = c.path(written);
    let path = &*resolved.to_string_lossy();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            c.problem(at, format!("cannot read {path}: {e}"));
            return Vec::new();
        }
    };
    let (value, index) = match super::super::spans::parse(&text, super::super::spans::Format::Json) {
        Ok(parsed) => parsed,
        Err(e) => {
            c.problems.push(Problem { file: path.to_string(), line: e.line, field: String::new(), message: e.message });
            return Vec::new();
        }
    };
    let stem = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or("external").to_string();
    let blocks = match value {
        serde_json::Value::Array(items) => items.into_iter().enumerate().map(|(i, v)| (format!("[{i}]"), v)).collect(),
        other => vec![(String::new(), other)],
    };
    let many = blocks.len() > 1;
    // Paths inside an external file resolve against that file's own directory.
    let base = resolved.parent().unwrap_or(Path::new("."));
    let mut inner = Collector { file: path, index: &index, base, problems: Vec::new() };
    let mut out = Vec::new();
    for (n, (prefix, value)) in blocks.into_iter().enumerate() {
        let raw: RawExternal = match serde_path_to_error::deserialize(value) {
            Ok(raw) => raw,
            Err(e) => {
                let field = format!("{prefix}{}", e.path()).trim_start_matches('.').to_string();
                inner.problem(field, e.inner().to_string());
                continue;
            }
        };
        if raw.kind != "external-secrets" {
            inner.problem(format!("{prefix}.type").trim_start_matches('.'), "must be \"external-secrets\"");
            continue;
        }
        if many && raw.name.is_none() {
            inner.problem(
                format!("{prefix}.name").trim_start_matches('.'),
                "is required when a file holds several blocks",
            );
            continue;
        }
        let _ = n;
        // Validated with keyward's field names, then reported at the article's own names and lines.
        let empty = SpanIndex::default();
        let mut scratch = Collector { file: path, index: &empty, base, problems: Vec::new() };
        out.extend(source(&mut scratch, "@", raw.into_source(stem.clone()), cx));
        for problem in scratch.problems {
            let field = format!("{prefix}.{}", article_field(problem.field.trim_start_matches("@.")));
            let field = field.trim_start_matches('.').to_string();
            inner.problems.push(Problem { line: index.line_of(&field), field, ..problem });
        }
    }
    c.problems.extend(inner.problems);
    out
}

/// A source field path as the article's JSON spells it: provider fields under `source`, and
/// camelCase names (`rotation.grace_period_minutes` → `rotationPolicy.gracePeriodMinutes`).
fn article_field(field: &str) -> String {
    let camel = |name: &str| {
        let mut out = String::new();
        let mut upper = false;
        for ch in name.chars() {
            match ch {
                '_' => upper = true,
                c if upper => {
                    out.extend(c.to_uppercase());
                    upper = false;
                }
                c => out.push(c),
            }
        }
        out
    };
    let (head, rest) = field.split_once('.').map_or((field, None), |(h, r)| (h, Some(r)));
    let head = match head {
        "rotation" => "rotationPolicy".to_string(),
        "audit_trail" => "auditTrail".to_string(),
        "mapping" | "cache" | "name" => head.to_string(),
        other => format!("source.{}", camel(other)),
    };
    let rest = rest.map(|r| match r {
        _ if head == "mapping" => r.to_string(),
        "notify" => "notificationChannel".to_string(),
        _ => camel(r),
    });
    match rest {
        Some(rest) => format!("{head}.{rest}"),
        None => head,
    }
}

fn source(c: &mut Collector<'_>, at: &str, s: RawSource, cx: &mut SourceContext<'_>) -> Option<SourceConfig> {
    if !valid_name(&s.name) {
        c.problem(format!("{at}.name"), "use letters, digits, '-', '_', '.' or ':' (1-128 characters)");
    }
    let mut mapping_text = s.mapping.clone();
    let provider =
        match ProviderConfig::configure(&s.provider, &s.fields, &mut mapping_text, &mut credentials::Check::new(at, c))
        {
            Ok(provider) => provider?,
            Err(expected) => {
                c.problem(format!("{at}.provider"), format!("unknown provider '{}': {expected}", s.provider));
                return None;
            }
        };
    let mapping = mapping_text.unwrap_or_default();
    let whole_value = provider.whole_value();
    let mapping: BTreeMap<String, Selector> = {
        mapping.into_iter()
            .filter_map(|(name, text)| {
                if !valid_name(&name) {
                    c.problem(format!("{at}.mapping.{name}"), "secret names use letters, digits, '-', '_', '.' or ':'");
                }
                match selector(&text) {
                    Some(Selector::Whole) if !whole_value => {
                        c.problem(format!("{at}.mapping.{name}"), "must name one variable or id, not the whole {{.}}");
                        None
                    }
                    Some(sel) => Some((name, sel)),
                    None => {
                        c.problem(
                            format!("{at}.mapping.{name}"),
                            // The text is not quoted: a credential pasted here must not reach a log.
                            "is not a selector: write \"{{FIELD}}\" (a field of the secret) or \"{{.}}\" (the whole value)",
                        );
                        None
                    }
                }
            })
            .collect()
    };
    let cache = match s.cache {
        Some(RawCache { enabled: false, .. }) => {
            CachePolicy { ttl: Duration::ZERO, max_size: 0, stale_if_error: Duration::ZERO }
        }
        Some(raw) => CachePolicy {
            ttl: Duration::from_secs(raw.ttl_seconds.unwrap_or(300)),
            max_size: raw.max_size.unwrap_or(64),
            stale_if_error: Duration::from_secs(raw.stale_if_error_seconds.unwrap_or(0)),
        },
        None => CachePolicy { ttl: Duration::from_secs(300), max_size: 64, stale_if_error: Duration::ZERO },
    };
    if !cache.ttl.is_zero() && cache.max_size < mapping.len().max(1) {
        c.problem(
            format!("{at}.cache.max_size"),
            format!(
                "is {} but this source provides {} secrets, so every call would refetch; raise it to at least {}",
                cache.max_size,
                mapping.len(),
                mapping.len().max(1)
            ),
        );
    }
    if let Some(trail) = s.audit_trail {
        if !trail.enabled {
            c.problem(
                format!("{at}.audit_trail.enabled"),
                "keyward audits every use of every credential; the audit trail cannot be turned off",
            );
        }
        if let Some(days) = trail.retention_days {
            if days == 0 {
                c.problem(format!("{at}.audit_trail.retention_days"), "must be at least 1");
            }
            cx.retention_floor.push(days);
        }
    }
    let (rotation, fallback_to) = match s.rotation {
        Some(raw) => rotation(c, &format!("{at}.rotation"), raw, &provider, cx.channels),
        None => (None, None),
    };
    Some(SourceConfig { name: s.name, provider, mapping, cache, rotation, fallback_to })
}

fn rotation(
    c: &mut Collector<'_>,
    at: &str,
    raw: RawRotation,
    provider: &ProviderConfig,
    channels: &BTreeMap<String, String>,
) -> (Option<RotationPolicy>, Option<String>) {
    let schedule = raw
        .schedule
        .as_deref()
        .and_then(|text| Schedule::parse(text).map_err(|e| c.problem(format!("{at}.schedule"), e)).ok());
    // A webhook URL, or the name of a channel under `[notifications]` (the article's "telegram").
    let notify = match raw.notify {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url),
        Some(name) => match channels.get(&name) {
            Some(url) => Some(url.clone()),
            None => {
                c.problem(
                    format!("{at}.notify"),
                    format!(
                        "'{name}' is neither a webhook URL nor a channel under [notifications]; add `{name} = \"https://…\"` there"
                    ),
                );
                None
            }
        },
        None => None,
    };
    if raw.enabled {
        for refusal in provider.rotation_refusals() {
            c.problem(format!("{at}.enabled"), refusal);
        }
    }
    const MAX_GRACE_MINUTES: u64 = 7 * 24 * 60;
    const MAX_AHEAD_HOURS: u64 = 366 * 24;
    let grace = raw.grace_period_minutes.unwrap_or(0);
    if grace > MAX_GRACE_MINUTES {
        c.problem(format!("{at}.grace_period_minutes"), format!("must be at most {MAX_GRACE_MINUTES} (a week)"));
    }
    let ahead = raw.notify_ahead_hours.unwrap_or(24);
    if ahead > MAX_AHEAD_HOURS {
        c.problem(format!("{at}.notify_ahead_hours"), format!("must be at most {MAX_AHEAD_HOURS} (a year)"));
    }
    let policy = RotationPolicy {
        enabled: raw.enabled,
        schedule,
        grace_period: Duration::from_secs(grace.min(MAX_GRACE_MINUTES) * 60),
        notify,
        notify_ahead: Duration::from_secs(ahead.min(MAX_AHEAD_HOURS) * 3600),
    };
    (Some(policy), raw.fallback_to)
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn source_problems_are_reported_with_their_lines() {
        check(&[
            ("a valid env source", "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n", &[]),
            (
                "a bad name and an unknown provider",
                "[[sources]]\nname = \"a b\"\nprovider = \"keychain\"\n",
                &[
                    "k.toml:2: sources[0].name: use letters, digits, '-', '_', '.' or ':' (1-128 characters)",
                    "k.toml:3: sources[0].provider: unknown provider 'keychain': expected 'aws-secrets-manager', 'file', 'env', 'vault' or 'exec'",
                ],
            ),
            (
                "a misspelt field names its near match",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\nadress = \"https://v\"\n",
                &[
                    "k.toml:5: sources[0].adress: unknown field `adress`, expected one of `name`, `provider`, `mapping`, `cache`, `rotationPolicy`, `rotation`, `auditTrail`, `audit_trail`, `region`, `secretName`, `secret_name`, `endpointUrl`, `endpoint_url`, `versionStage`, `version_stage`, `path`, `address`, `mount`, `namespace`, `auth`, `command`, `args`, `pass_env`, `timeout_ms`, `max_output_bytes` (did you mean `address`?)",
                ],
            ),
            (
                "another provider's fields",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\ncommand = \"/bin/true\"\nregion = \"eu-west-1\"\n",
                &[
                    "k.toml:5: sources[0].command: is not used by provider 'env'",
                    "k.toml:6: sources[0].region: is not used by provider 'env'",
                ],
            ),
            (
                "a provider field of the wrong type, at its own path",
                "[[sources]]\nname = \"e\"\nprovider = \"exec\"\ncommand = \"/bin/true\"\ntimeout_ms = \"soon\"\nmapping = { K = \"{{K}}\" }\n",
                &["k.toml:5: sources[0].timeout_ms: invalid type: string \"soon\", expected u64"],
            ),
            (
                "an unknown field nested in a provider field",
                "[[sources]]\nname = \"v\"\nprovider = \"vault\"\naddress = \"https://v\"\npath = \"a\"\nauth = { method = \"token\", tokn = \"x\" }\nmapping = { K = \"{{K}}\" }\n",
                &[
                    "k.toml:6: sources[0].auth.tokn: unknown field `tokn`, expected one of `method`, `token_env`, `token_file`, `role_id`, `secret_id_env`, `secret_id_file`, `approle_mount`",
                ],
            ),
            (
                "env without a mapping",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\n",
                &["k.toml:1: sources[0].mapping: is required for provider 'env' (secret name = \"{{ENV_VAR}}\")"],
            ),
            (
                "env taking a whole value, and bad mapping entries",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { W = \"{{.}}\", \"a b\" = \"{{X}}\", P = \"plain\" }\n",
                &[
                    "k.toml:4: sources[0].mapping.P: is not a selector: write \"{{FIELD}}\" (a field of the secret) or \"{{.}}\" (the whole value)",
                    "k.toml:4: sources[0].mapping.W: must name one variable or id, not the whole {{.}}",
                    "k.toml:4: sources[0].mapping.a b: secret names use letters, digits, '-', '_', '.' or ':'",
                ],
            ),
            (
                "aws without a secret name",
                "[[sources]]\nname = \"a\"\nprovider = \"aws-secrets-manager\"\nmapping = { K = \"{{K}}\" }\n",
                &[
                    "k.toml:1: sources[0].secret_name: is required for provider 'aws-secrets-manager' unless every mapping entry names its secret (\"<secret-id>#{{FIELD}}\")",
                ],
            ),
            (
                "aws reading two secrets at another stage",
                "[[sources]]\nname = \"a\"\nprovider = \"aws-secrets-manager\"\nsecret_name = \"one\"\nversion_stage = \"AWSPREVIOUS\"\nendpoint_url = \"localhost\"\nmapping = { K = \"{{K}}\", L = \"two#{{L}}\" }\n",
                &[
                    "k.toml:5: sources[0].version_stage: a source that reads several secrets reads each one's AWSCURRENT (BatchGetSecretValue has no stage)",
                    "k.toml:6: sources[0].endpoint_url: must be an http:// or https:// URL",
                ],
            ),
            (
                "a file source without a mapping whose file is missing",
                "[[sources]]\nname = \"f\"\nprovider = \"file\"\npath = \"/nonexistent/keyward-secrets.json\"\n",
                &[
                    "k.toml:4: sources[0].path: cannot read /nonexistent/keyward-secrets.json: No such file or directory (os error 2) (a file source without `mapping` is read at load to learn its names)",
                ],
            ),
            (
                "exec with a relative command and bad limits",
                "[[sources]]\nname = \"e\"\nprovider = \"exec\"\ncommand = \"resolver\"\npass_env = [\"A-B\"]\ntimeout_ms = 0\nmax_output_bytes = 0\n",
                &[
                    "k.toml:1: sources[0].mapping: is required for provider 'exec' (secret name = \"{{FIELD}}\")",
                    "k.toml:4: sources[0].command: must be an absolute path (it is never looked up in PATH or run by a shell)",
                    "k.toml:5: sources[0].pass_env[0]: 'A-B' is not an environment variable name",
                    "k.toml:6: sources[0].timeout_ms: must be between 1 and 300000",
                    "k.toml:7: sources[0].max_output_bytes: must be between 1 and 16777216",
                ],
            ),
            (
                "vault without an address, auth or mapping",
                "[[sources]]\nname = \"v\"\nprovider = \"vault\"\npath = \"a\"\n",
                &[
                    "k.toml:1: sources[0].address: is required for provider 'vault': an http:// or https:// URL without user info",
                    "k.toml:1: sources[0].auth: is required for provider 'vault': { method = \"token\" } or { method = \"approle\", ... }",
                ],
            ),
            (
                "vault approle without a role id",
                "[[sources]]\nname = \"v\"\nprovider = \"vault\"\naddress = \"https://v\"\npath = \"a\"\nauth = { method = \"approle\", secret_id_env = \"S\" }\nmapping = { K = \"{{K}}\" }\n",
                &["k.toml:6: sources[0].auth.role_id: is required for auth method 'approle'"],
            ),
            (
                "the same secret from two sources",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n[[sources]]\nname = \"t\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\n",
                &[
                    "k.toml:8: sources[1].mapping.S: secret 'S' is already provided by source 's'; secret names are global",
                ],
            ),
            (
                "a cache too small, an audit trail turned off",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\ncache = { max_size = 0 }\naudit_trail = { enabled = false, retention_days = 0 }\n",
                &[
                    "k.toml:5: sources[0].cache.max_size: is 0 but this source provides 1 secrets, so every call would refetch; raise it to at least 1",
                    "k.toml:6: sources[0].audit_trail.enabled: keyward audits every use of every credential; the audit trail cannot be turned off",
                    "k.toml:6: sources[0].audit_trail.retention_days: must be at least 1",
                ],
            ),
            (
                "rotation of an env source, to an unknown channel and fallback",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\nrotation = { schedule = \"0 0 * * 9\", notify = \"telegram\", fallback_to = \"nowhere\", grace_period_minutes = 99999 }\n",
                &[
                    "k.toml:5: sources[0].rotation.schedule: '0 0 * * 9': the day-of-week field '9' is out of range (allowed: 0-7 or SUN-SAT, with * , - /)",
                    "k.toml:5: sources[0].rotation.notify: 'telegram' is neither a webhook URL nor a channel under [notifications]; add `telegram = \"https://…\"` there",
                    "k.toml:5: sources[0].rotation.enabled: an env source cannot rotate: its values are fixed when keyward starts",
                    "k.toml:5: sources[0].rotation.grace_period_minutes: must be at most 10080 (a week)",
                    "k.toml:5: sources[0].rotation.fallback_to: no source is named 'nowhere'",
                ],
            ),
            (
                "a fallback to itself",
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = { S = \"{{S}}\" }\nrotation = { enabled = false, fallback_to = \"s\" }\n",
                &["k.toml:5: sources[0].rotation.fallback_to: a source cannot fall back to itself"],
            ),
        ]);
    }
}
