//! Turns raw config into a validated `Config`, collecting every problem with its field path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

use super::raw::*;
use super::spans::SpanIndex;
use super::*;
use crate::policy::{MethodSet, PathPattern};
use crate::secrets;

struct Collector<'a> {
    file: &'a str,
    index: &'a SpanIndex,
    /// The directory relative paths in this file resolve against: the file's own directory.
    base: &'a Path,
    problems: Vec<Problem>,
}

impl secrets::Report for Collector<'_> {
    fn problem(&mut self, field: String, message: String) {
        Collector::problem(self, field, message);
    }

    fn path(&self, written: &str) -> PathBuf {
        Collector::path(self, written)
    }
}

impl Collector<'_> {
    /// A path as written in the config, made relative to the config file's directory, so a
    /// config behaves the same whatever the working directory.
    fn path(&self, written: &str) -> PathBuf {
        self.base.join(written)
    }

    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        self.problems.push(Problem {
            file: self.file.to_string(),
            line: self.index.line_of(&field),
            field,
            message: message.into(),
        });
    }
}

pub fn validate(value: serde_json::Value, index: &SpanIndex, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    // Structural problems do not stop the check: the repaired raw config is validated too, so
    // one run reports everything, minus what only follows from a repair.
    let mut parsed = super::structural::parse(value, index, file);
    let Some(raw) = parsed.raw.take() else { return Err(ConfigErrors(parsed.problems)) };
    let mut c = Collector { file, index, base, problems: Vec::new() };
    let config = build(raw, &mut c);
    let mut problems = parsed.problems.clone();
    problems.extend(c.problems.into_iter().filter(|p| !parsed.is_consequence(p)));
    // In file order, as a compiler lists them.
    problems.sort_by_key(|p| p.line.unwrap_or(0));
    if problems.is_empty() { Ok(config) } else { Err(ConfigErrors(problems)) }
}

/// `" (did you mean 'x'?)"` when there is a near name, else nothing.
fn did_you_mean(near: Option<&str>) -> String {
    near.map(|n| format!(" (did you mean '{n}'?)")).unwrap_or_default()
}

fn ms(value: Option<u64>, default_ms: u64) -> Duration {
    Duration::from_millis(value.unwrap_or(default_ms))
}

fn socket_addr(c: &mut Collector<'_>, field: &str, value: Option<String>, default: &str) -> SocketAddr {
    let text = value.unwrap_or_else(|| default.to_string());
    text.parse().unwrap_or_else(|_| {
        c.problem(field, format!("'{text}' is not an address like 127.0.0.1:8080"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

/// `listen`: a TCP address, `unix:/path`, or a list with at most one of each.
fn listeners(c: &mut Collector<'_>, raw: Option<OneOrMany>) -> (Option<SocketAddr>, Option<PathBuf>) {
    let entries = raw.map(OneOrMany::into_vec).unwrap_or_else(|| vec!["127.0.0.1:8080".to_string()]);
    let (mut tcp, mut unix) = (None, None);
    if entries.is_empty() {
        c.problem("server.listen", "needs at least one address");
    }
    for text in entries {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                c.problem(
                    "server.listen",
                    format!("'{text}': the socket path must be absolute, like unix:/run/keyward/keyward.sock"),
                );
            } else if unix.replace(PathBuf::from(path)).is_some() {
                c.problem("server.listen", "at most one unix: socket");
            }
        } else {
            let addr = socket_addr(c, "server.listen", Some(text), "");
            if tcp.replace(addr).is_some() {
                c.problem("server.listen", "at most one TCP address");
            }
        }
    }
    (tcp, unix)
}

fn build(raw: RawConfig, c: &mut Collector<'_>) -> Config {
    let (listen, listen_unix) = listeners(c, raw.server.listen);
    let unix_socket_mode = match raw.server.unix_socket_mode.as_deref() {
        None => 0o660,
        Some(text) => match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 => mode,
            _ => {
                c.problem("server.unix_socket_mode", format!("'{text}' is not an octal file mode like \"0660\""));
                0o660
            }
        },
    };
    if raw.server.unix_socket_mode.is_some() && listen_unix.is_none() {
        c.problem("server.unix_socket_mode", "is only used with listen = \"unix:/path\"");
    }
    let server = ServerConfig {
        listen,
        listen_unix,
        unix_socket_mode,
        admin_listen: socket_addr(c, "server.admin_listen", raw.server.admin_listen, "127.0.0.1:9090"),
        header_read_timeout: ms(raw.server.header_read_timeout_ms, 10_000),
        max_header_bytes: raw.server.max_header_bytes.unwrap_or(64 * 1024),
        access_log: raw.server.access_log.unwrap_or(true),
        shutdown_grace: ms(raw.server.shutdown_grace_ms, 10_000),
        park_idle_after: ms(raw.server.park_idle_after_ms, 1_000),
        max_connections: raw.server.max_connections.unwrap_or(16_384),
    };
    if server.max_connections == 0 {
        c.problem("server.max_connections", "must be greater than 0");
    }
    if server.header_read_timeout.is_zero() {
        c.problem("server.header_read_timeout_ms", "must be greater than 0");
    }
    if server.park_idle_after.is_zero() {
        c.problem("server.park_idle_after_ms", "must be greater than 0");
    }
    if server.max_header_bytes < 8192 {
        c.problem("server.max_header_bytes", "must be at least 8192");
    }
    let forward = ForwardConfig {
        connect_timeout: ms(raw.forward.connect_timeout_ms, 5_000),
        read_timeout: ms(raw.forward.read_timeout_ms, 120_000),
        total_timeout: ms(raw.forward.total_timeout_ms, 900_000),
        max_request_body_bytes: raw.forward.max_request_body_bytes.unwrap_or(32 * 1024 * 1024),
        pool_idle_timeout: ms(raw.forward.pool_idle_timeout_ms, 90_000),
        pool_max_idle_per_host: raw.forward.pool_max_idle_per_host.unwrap_or(64),
        retry_body_bytes: raw.forward.retry_body_bytes.unwrap_or(64 * 1024),
    };
    for (field, value) in [
        ("forward.connect_timeout_ms", forward.connect_timeout),
        ("forward.read_timeout_ms", forward.read_timeout),
        ("forward.total_timeout_ms", forward.total_timeout),
    ] {
        if value.is_zero() {
            c.problem(field, "must be greater than 0");
        }
    }
    let durability = match raw.audit.durability.as_deref().unwrap_or("os") {
        "os" => Durability::Os,
        "fsync" => Durability::Fsync,
        "none" => Durability::None,
        other => {
            c.problem("audit.durability", format!("'{other}' is not one of \"os\", \"fsync\", \"none\""));
            Durability::Os
        }
    };
    let on_failure = match raw.audit.on_failure.as_deref().unwrap_or("deny") {
        "deny" => OnFailure::Deny,
        "allow" => OnFailure::Allow,
        other => {
            c.problem("audit.on_failure", format!("'{other}' is not one of \"deny\", \"allow\""));
            OnFailure::Deny
        }
    };
    let mut audit = AuditConfig {
        path: c.path(raw.audit.path.as_deref().unwrap_or("var/audit/keyward-audit.jsonl")),
        retention_days: raw.audit.retention_days.unwrap_or(90),
        metadata: raw.audit.metadata,
        durability,
        on_failure,
        rotate_bytes: raw.audit.rotate_bytes.unwrap_or(100 * 1024 * 1024),
        rotate_daily: raw.audit.rotate_daily.unwrap_or(true),
    };
    let mut admin = AdminConfig::default();
    if let Some(text) = &raw.admin.token_sha256 {
        let mut hash = [0u8; 32];
        if text.len() == 64 && hex::decode_to_slice(text, &mut hash).is_ok() {
            admin.token_sha256 = Some(hash);
        } else {
            c.problem("admin.token_sha256", "must be 64 hex characters (see `keyward admin token`)");
        }
    }
    if audit.retention_days == 0 {
        c.problem("audit.retention_days", "must be at least 1");
    }

    for (name, url) in &raw.notifications {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            c.problem(format!("notifications.{name}"), "must be a webhook URL (http:// or https://)");
        }
    }
    let mut cx = SourceContext { retention_floor: Vec::new(), channels: &raw.notifications };
    let mut sources: Vec<SourceConfig> = raw
        .sources
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| source(c, &format!("sources[{i}]"), s, &mut cx))
        .collect();
    for (i, path) in raw.sources_from.iter().enumerate() {
        sources.extend(external_sources(c, &format!("sources_from[{i}]"), path, &mut cx));
    }
    // An `auditTrail.retentionDays` keeps the trail at least that long; the longest one wins.
    for days in cx.retention_floor {
        audit.retention_days = audit.retention_days.max(days);
    }
    check_fallbacks(c, &sources);
    let secret_owner = secret_names(c, &sources);
    let routes: Vec<RouteConfig> =
        raw.routes.into_iter().enumerate().filter_map(|(i, r)| route(c, &format!("routes[{i}]"), r)).collect();
    check_unique(
        c,
        routes.iter().enumerate().map(|(i, r)| (format!("routes[{i}].name"), r.name.clone())),
        "route name",
    );
    check_unique(
        c,
        routes.iter().enumerate().map(|(i, r)| (format!("routes[{i}].prefix"), r.prefix.clone())),
        "route prefix",
    );
    let route_names: HashSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();

    let mut roles = BTreeMap::new();
    for (name, mut raw_role) in raw.roles {
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
                let near = super::suggest(&g.route, route_names.iter().copied());
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
        let max_delegation_depth = raw_role.max_delegation_depth.unwrap_or(2);
        if max_delegation_depth == 0 && raw_role.delegate {
            c.problem(format!("roles.{name}.max_delegation_depth"), "must be at least 1 when delegate = true");
        }
        if raw_role.max_in_flight == Some(0) {
            c.problem(format!("roles.{name}.max_in_flight"), "must be at least 1");
        }
        let anomaly = anomaly(c, &format!("roles.{name}.anomaly"), raw_role.anomaly.take().unwrap_or_default());
        let role = RoleConfig {
            name: name.clone(),
            grants,
            max_in_flight: raw_role.max_in_flight,
            anomaly,
            delegate: raw_role.delegate,
            max_delegation_ttl: Duration::from_secs(raw_role.max_delegation_ttl_seconds.unwrap_or(3600)),
            max_delegation_depth,
        };
        roles.insert(name, role);
    }

    let mut agents = Vec::new();
    for (i, a) in raw.agents.into_iter().enumerate() {
        let at = format!("agents[{i}]");
        if !roles.contains_key(&a.role) {
            let near = super::suggest(&a.role, roles.keys().map(String::as_str));
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

    let backend = match raw.limits.backend.as_deref().unwrap_or("local") {
        "local" => LimitsBackend::Local,
        "redis" => match raw.limits.redis_url.clone() {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => LimitsBackend::Redis { url },
            Some(url) => {
                c.problem("limits.redis_url", format!("'{url}' is not a redis:// URL"));
                LimitsBackend::Local
            }
            None => {
                c.problem("limits.redis_url", "is required with backend = \"redis\"");
                LimitsBackend::Local
            }
        },
        other => {
            c.problem("limits.backend", format!("'{other}' is not \"local\" or \"redis\""));
            LimitsBackend::Local
        }
    };
    let fail_open = match raw.limits.redis_failure.as_deref().unwrap_or("fail_open") {
        "fail_open" => true,
        "fail_closed" => false,
        other => {
            c.problem("limits.redis_failure", format!("'{other}' is not \"fail_open\" or \"fail_closed\""));
            true
        }
    };
    if let Some(url) = &raw.limits.notify
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        c.problem("limits.notify", "must be an http:// or https:// URL");
    }
    let limits = LimitsConfig { backend, fail_open, notify: raw.limits.notify };

    Config { server, forward, audit, admin, limits, sources, routes, roles, agents }
}

fn action(c: &mut Collector<'_>, field: &str, text: Option<&str>) -> AnomalyAction {
    match text.unwrap_or("alert") {
        "alert" => AnomalyAction::Alert,
        "throttle" => AnomalyAction::Throttle,
        "quarantine" => AnomalyAction::Quarantine,
        other => {
            c.problem(field, format!("'{other}' is not alert, throttle or quarantine"));
            AnomalyAction::Alert
        }
    }
}

/// `"08:00-20:00"` → minutes after midnight.
fn hours(text: &str) -> Option<(u32, u32)> {
    let minute = |t: &str| {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (start, end) = text.split_once('-')?;
    Some((minute(start)?, minute(end)?))
}

/// `"+08:00"`, `"-05:30"` or `"UTC"` → minutes east of UTC.
fn utc_offset(text: &str) -> Option<i32> {
    if text == "UTC" || text == "Z" {
        return Some(0);
    }
    let sign = match text.chars().next()? {
        '+' => 1,
        '-' => -1,
        _ => return None,
    };
    let (h, m) = text[1..].split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60).then_some(sign * (h * 60 + m))
}

/// Detectors default to alert-only; a `[roles.X.anomaly]` table tunes or turns them off.
fn anomaly(c: &mut Collector<'_>, at: &str, raw: RawAnomaly) -> AnomalyConfig {
    let mut build = |name: &str, raw: Option<RawDetector>, on_by_default: bool| -> Option<Detector> {
        let field = format!("{at}.{name}");
        let raw = match raw {
            Some(r) if !r.enabled => return None,
            Some(r) => r,
            None if on_by_default => RawDetector::default(),
            None => return None,
        };
        let action = action(c, &format!("{field}.action"), raw.action.as_deref());
        let active_minutes = raw.active_hours.as_deref().map(|text| {
            hours(text).unwrap_or_else(|| {
                c.problem(format!("{field}.active_hours"), format!("'{text}' is not a window like \"08:00-20:00\""));
                (0, 1440)
            })
        });
        let utc_offset_minutes = raw.utc_offset.as_deref().map_or(0, |text| {
            utc_offset(text).unwrap_or_else(|| {
                c.problem(format!("{field}.utc_offset"), format!("'{text}' is not an offset like \"+08:00\""));
                0
            })
        });
        let throttle_fraction = raw.throttle_fraction.unwrap_or(0.25);
        if !(throttle_fraction > 0.0 && throttle_fraction < 1.0) {
            c.problem(format!("{field}.throttle_fraction"), "must be between 0 and 1");
        }
        Some(Detector {
            action,
            factor: raw.factor.unwrap_or(10.0),
            floor_per_minute: raw.floor_per_minute.unwrap_or(60),
            threshold: raw.threshold.unwrap_or(20),
            window: Duration::from_secs(raw.window_seconds.unwrap_or(60)),
            active_minutes,
            utc_offset_minutes,
            throttle_fraction,
            cooldown: Duration::from_secs(raw.cooldown_seconds.unwrap_or(900)),
        })
    };
    let config = AnomalyConfig {
        rate_spike: build("rate_spike", raw.rate_spike, true),
        failure_burst: build("failure_burst", raw.failure_burst, true),
        off_hours: build("off_hours", raw.off_hours, false),
        first_use: build("first_use", raw.first_use, true),
    };
    if config.off_hours.as_ref().is_some_and(|d| d.active_minutes.is_none()) {
        c.problem(format!("{at}.off_hours.active_hours"), "is required for the off_hours detector");
    }
    config
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | ':'))
}

fn check_unique(c: &mut Collector<'_>, items: impl Iterator<Item = (String, String)>, what: &str) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for (field, value) in items {
        if let Some(first) = seen.get(&value) {
            c.problem(field, format!("duplicate {what} '{value}' (first at {first})"));
        } else {
            seen.insert(value, field);
        }
    }
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

/// Loads a file of the article's `external-secrets` blocks (one object or a list), reporting
/// problems at that file's own lines.
/// What validating a source needs beyond the source itself.
struct SourceContext<'a> {
    /// Every `auditTrail.retentionDays`, to raise the audit retention to the largest.
    retention_floor: Vec<u32>,
    /// `[notifications]`: channel name → webhook URL, for `notificationChannel = "name"`.
    channels: &'a BTreeMap<String, String>,
}

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
    let (value, index) = match super::spans::parse(&text, super::spans::Format::Json) {
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
        match ProviderConfig::configure(&s.provider, &s.fields, &mut mapping_text, &mut secrets::Check::new(at, c)) {
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

fn route(c: &mut Collector<'_>, at: &str, r: RawRoute) -> Option<RouteConfig> {
    if !valid_name(&r.name) {
        c.problem(format!("{at}.name"), "use letters, digits, '-', '_', '.' or ':' (1-128 characters)");
    }
    let prefix_ok = r.prefix.starts_with('/')
        && r.prefix.len() > 1
        && !r.prefix.ends_with('/')
        && r.prefix[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.~".contains(ch))
        });
    if r.prefix == "/v1/delegations" || r.prefix.starts_with("/v1/delegations/") {
        c.problem(format!("{at}.prefix"), "/v1/delegations is reserved for minting delegated keys");
    }
    if !prefix_ok {
        c.problem(format!("{at}.prefix"), "must look like \"/name\" or \"/a/b\": no trailing slash, no dot segments");
    }
    let upstream = match upstream(&r.upstream, r.allow_plaintext) {
        Ok(u) => Some(u),
        Err(e) => {
            c.problem(format!("{at}.upstream"), e);
            None
        }
    };
    let agent_key = agent_key_places(c, at, r.agent_key);
    let pass_headers = pass_headers(c, at, r.pass_headers, agent_key.as_deref().unwrap_or_default());
    let inject = inject(c, &format!("{at}.inject"), r.inject);
    let validate = r.validate.and_then(|p| probe(c, &format!("{at}.validate"), p));
    Some(RouteConfig {
        name: r.name,
        prefix: r.prefix,
        upstream: upstream?,
        agent_key: agent_key?,
        pass_headers,
        inject: inject?,
        scrub_responses: r.scrub_responses,
        validate,
    })
}

/// `agent_key`: one place or a non-empty list of places, each a header with optional schemes.
fn agent_key_places(c: &mut Collector<'_>, at: &str, raw: RawAgentKeys) -> Option<Vec<AgentKeySpec>> {
    let one = matches!(raw, RawAgentKeys::One(_));
    let raw = raw.into_vec();
    if raw.is_empty() {
        c.problem(format!("{at}.agent_key"), "lists no place: give at least one { header = ... }");
        return None;
    }
    let mut places = Vec::with_capacity(raw.len());
    let mut complete = true;
    for (i, place) in raw.into_iter().enumerate() {
        let field = if one { format!("{at}.agent_key") } else { format!("{at}.agent_key[{i}]") };
        let header = header_name(c, &format!("{field}.header"), &place.header);
        let schemes = place.scheme.map(OneOrMany::into_vec).unwrap_or_default();
        for (j, scheme) in schemes.iter().enumerate() {
            if scheme.is_empty() || !scheme.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch)) {
                c.problem(format!("{field}.scheme[{j}]"), format!("'{scheme}' is not an auth scheme like Bearer"));
            }
        }
        let Some(header) = header else {
            complete = false;
            continue;
        };
        // A header read two ways is ambiguous: is `Bearer x` the bare key "Bearer x"?
        if places.iter().any(|p: &AgentKeySpec| p.header == header) {
            c.problem(
                format!("{field}.header"),
                format!("'{header}' is listed twice: give one place with a list of schemes instead"),
            );
            continue;
        }
        places.push(AgentKeySpec { header, schemes });
    }
    complete.then_some(places)
}

/// `pass_headers`: headers keyward removes by default that this route forwards anyway. Only
/// such headers may be named, and never one that carries the agent key on this route.
fn pass_headers(c: &mut Collector<'_>, at: &str, raw: Vec<String>, agent_key: &[AgentKeySpec]) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for (i, text) in raw.iter().enumerate() {
        let field = format!("{at}.pass_headers[{i}]");
        let Ok(name) = HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes()) else {
            c.problem(field, format!("'{text}' is not a header name"));
            continue;
        };
        if agent_key.iter().any(|place| place.header == name) || name == http::header::PROXY_AUTHORIZATION {
            c.problem(field, format!("'{name}' carries the agent key on this route and is never forwarded"));
        } else if !CREDENTIAL_HEADERS.contains(&name.as_str()) && !RANGE_HEADERS.contains(&name.as_str()) {
            let removable = CREDENTIAL_HEADERS.iter().chain(&RANGE_HEADERS).filter(|h| **h != "proxy-authorization");
            c.problem(
                field,
                format!(
                    "'{name}' is forwarded anyway; only these removed headers can be passed: {}",
                    removable.copied().collect::<Vec<_>>().join(", ")
                ),
            );
        } else {
            out.push(name);
        }
    }
    out
}

fn probe(c: &mut Collector<'_>, at: &str, p: RawProbe) -> Option<Probe> {
    let method = http::Method::from_bytes(p.method.to_ascii_uppercase().as_bytes())
        .map_err(|_| c.problem(format!("{at}.method"), format!("'{}' is not an HTTP method", p.method)))
        .ok()?;
    if !p.path.starts_with('/') || p.path.parse::<http::uri::PathAndQuery>().is_err() {
        c.problem(format!("{at}.path"), format!("'{}' must be a path starting with '/'", p.path));
        return None;
    }
    if p.expect.is_empty() || p.expect.iter().any(|s| !(100..600).contains(s)) {
        c.problem(format!("{at}.expect"), "must list HTTP status codes, like [200]");
        return None;
    }
    Some(Probe { method, path: p.path, expect: p.expect })
}

/// Headers whose meaning belongs to the connection or to framing: never an agent key or an
/// injection target.
const RESERVED_HEADERS: [&str; 12] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "cookie",
    "expect",
];

fn header_name(c: &mut Collector<'_>, field: &str, text: &str) -> Option<HeaderName> {
    let name = HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes())
        .map_err(|_| c.problem(field, format!("'{text}' is not a header name")))
        .ok()?;
    if RESERVED_HEADERS.contains(&name.as_str()) {
        c.problem(field, format!("'{name}' is a connection or framing header and cannot be used here"));
        return None;
    }
    Some(name)
}

fn upstream(text: &str, allow_plaintext: bool) -> Result<Upstream, String> {
    let uri: http::Uri = text.parse().map_err(|_| format!("'{text}' is not a URL"))?;
    let scheme = uri.scheme().cloned().ok_or_else(|| format!("'{text}' needs a scheme (https:// or http://)"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("'{text}': only http and https upstreams are supported"));
    }
    let authority = uri.authority().cloned().ok_or_else(|| format!("'{text}' has no host"))?;
    if authority.as_str().contains('@') {
        return Err("must not carry user info; use inject for credentials".to_string());
    }
    if uri.query().is_some() {
        return Err("must not carry a query string".to_string());
    }
    if scheme == http::uri::Scheme::HTTP && !allow_plaintext && !crate::policy::is_loopback_host(authority.host()) {
        return Err(format!(
            "'{text}' would send credentials in cleartext; use https, or set allow_plaintext = true on this route"
        ));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(Upstream { scheme, authority, base_path })
}

fn template(c: &mut Collector<'_>, field: &str, text: &str) -> Template {
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else { break };
        let name = rest[start + 2..start + len].trim();
        if name != "secret" {
            c.problem(field, format!("unknown placeholder '{{{{{name}}}}}': only {{{{secret}}}} is supported"));
        }
        if start > 0 {
            parts.push(TemplatePart::Literal(rest[..start].to_string()));
        }
        parts.push(TemplatePart::Secret);
        rest = &rest[start + len + 2..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest.to_string()));
    }
    let printable = |text: &str| text.bytes().all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    if parts.iter().any(|p| matches!(p, TemplatePart::Literal(text) if !printable(text))) {
        c.problem(field, "may only hold printable ASCII around {{secret}}");
    }
    Template { parts }
}

fn inject(c: &mut Collector<'_>, at: &str, i: RawInject) -> Option<InjectSpec> {
    let chosen = [i.header.is_some(), i.query.is_some(), i.basic.is_some()].iter().filter(|b| **b).count();
    if chosen != 1 {
        c.problem(at, "set exactly one of `header`, `query` or `basic`");
        return None;
    }
    let value = i.value.as_deref().unwrap_or("{{secret}}");
    let uses_secret = |t: &Template| t.parts.contains(&TemplatePart::Secret);
    let spec = if let Some(header) = i.header {
        let name = header_name(c, &format!("{at}.header"), &header)?;
        InjectSpec::Header { name, value: template(c, &format!("{at}.value"), value) }
    } else if let Some(query) = i.query {
        if query.is_empty() || !query.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            c.problem(format!("{at}.query"), format!("'{query}' is not a plain query parameter name"));
        }
        InjectSpec::Query { name: query, value: template(c, &format!("{at}.value"), value) }
    } else {
        let basic = i.basic?;
        if i.value.is_some() {
            c.problem(format!("{at}.value"), "is not used with `basic`; template `username` and `password` instead");
        }
        InjectSpec::Basic {
            username: template(c, &format!("{at}.basic.username"), &basic.username),
            password: template(c, &format!("{at}.basic.password"), &basic.password),
        }
    };
    let injects_secret = match &spec {
        InjectSpec::Header { value, .. } | InjectSpec::Query { value, .. } => uses_secret(value),
        InjectSpec::Basic { username, password } => uses_secret(username) || uses_secret(password),
    };
    if !injects_secret {
        c.problem(at, "never uses {{secret}}, so no credential would be injected");
    }
    Some(spec)
}
