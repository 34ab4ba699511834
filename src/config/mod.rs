//! Validated configuration: what keyward runs on once a file has been parsed and checked.
//!
//! Loading goes text → (JSON value + span index) → raw serde types → validated `Config`.
//! Every problem is reported with file:line and the field path.

pub mod budget;
mod raw;
mod spans;
mod structural;
mod validate;

#[cfg(test)]
mod check_tests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;

pub use crate::credentials::{
    CachePolicy, KindConfig, MintScope, ProviderConfig, RotationPolicy, Schedule, Selector, SourceConfig,
};
pub use crate::forward::ForwardConfig;
pub use crate::policy::Upstream;
pub(crate) use crate::policy::suggest;
pub use crate::policy::{GrantConfig, Quota};

pub use spans::line_at;

/// The default config path of `keyward serve` and `keyward check`.
pub const DEFAULT_CONFIG_PATH: &str = "config/keyward.toml";

/// The default config compiled into the binary, used when `config/keyward.toml` does not exist.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/keyward.toml");

/// The demo secrets the embedded default reads, compiled in with it.
pub const EMBEDDED_SECRETS: &str = include_str!("../../config/secrets.example.json");

/// The name problems and logs give the embedded default.
pub const EMBEDDED_NAME: &str = "<embedded config/keyward.toml>";

/// Where keyward keeps the files of its embedded default (its demo secrets, audit trail and
/// runtime state): `$KEYWARD_STATE_DIR`, else `$XDG_STATE_HOME/keyward`, else
/// `~/.local/state/keyward`. The embedded config behaves as if it were `config/keyward.toml`
/// in that directory, so its relative paths resolve below it and never in the working directory.
pub fn embedded_home() -> Result<PathBuf, String> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("KEYWARD_STATE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = non_empty("XDG_STATE_HOME") {
        return Ok(dir.join("keyward"));
    }
    match non_empty("HOME") {
        Some(home) => Ok(home.join(".local/state/keyward")),
        None => Err("neither KEYWARD_STATE_DIR, XDG_STATE_HOME nor HOME is set: set KEYWARD_STATE_DIR to a \
                     directory for the embedded default's audit trail and state, or pass --config FILE"
            .to_string()),
    }
}

/// Lays out the embedded default's directory: `config/secrets.example.json` with the demo
/// secrets (written once; a user may edit it afterwards). Returns the directory the embedded
/// config's relative paths resolve against.
fn prepare_embedded_home() -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let config_dir = embedded_home()?.join("config");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&config_dir).map_err(|e| {
        format!("cannot create {}: {e} (set KEYWARD_STATE_DIR to a writable directory)", config_dir.display())
    })?;
    let secrets = config_dir.join("secrets.example.json");
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secrets) {
        Ok(mut file) => file
            .write_all(EMBEDDED_SECRETS.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", secrets.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot write {}: {e}", secrets.display())),
    }
    Ok(config_dir)
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub forward: ForwardConfig,
    /// The forward-proxy listener, if configured.
    pub forward_proxy: Option<ForwardProxyConfig>,
    pub audit: AuditConfig,
    pub admin: AdminConfig,
    pub limits: LimitsConfig,
    pub sources: Vec<SourceConfig>,
    /// The secrets that are minted, not injected as stored (`[secrets.NAME]`), by name.
    pub kinds: BTreeMap<String, KindConfig>,
    pub routes: Vec<RouteConfig>,
    pub roles: BTreeMap<String, RoleConfig>,
    pub agents: Vec<AgentConfig>,
    /// The price table and how calls are reserved (`[usage]`).
    pub usage: std::sync::Arc<budget::UsageConfig>,
    pub budgets: Vec<budget::BudgetConfig>,
    /// `[secrets.NAME]` of kind `aws-sigv4`, by secret name.
    pub sigv4: BTreeMap<String, crate::credentials::sigv4::Sigv4Config>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The agent listener on TCP; `None` when `listen` names only a Unix socket.
    pub listen: Option<SocketAddr>,
    /// The agent listener on a Unix socket (`listen = "unix:/path"`), where agents may be
    /// identified by the connecting process's uid.
    pub listen_unix: Option<PathBuf>,
    /// The Unix socket's file mode (default 0o660).
    pub unix_socket_mode: u32,
    pub admin_listen: SocketAddr,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// One INFO line per attempt (target `keyward::access`).
    pub access_log: bool,
    pub shutdown_grace: Duration,
    /// An HTTP/1 keep-alive connection idle this long is parked: its buffers and connection
    /// state are dropped until the socket is readable again.
    pub park_idle_after: Duration,
    /// The most connections each listener (agent TCP, agent Unix socket, admin) holds open at
    /// once; a connection accepted beyond it is answered 503 and closed.
    pub max_connections: usize,
}

/// `[forward_proxy]`: the `HTTPS_PROXY` listener, its interception CA, and blind tunnels.
#[derive(Debug, Clone)]
pub struct ForwardProxyConfig {
    pub listen: SocketAddr,
    /// The CA certificate (PEM); generated with its key on first start when neither file exists.
    pub ca_cert_file: PathBuf,
    /// The CA's private key (PEM, mode 0600); never logged.
    pub ca_key_file: PathBuf,
    /// Hosts (`host` or `host:port`, port 443 by default) passed through untouched: no
    /// interception, no credential, audited as a tunnel with byte counts.
    pub tunnel_hosts: Vec<(String, u16)>,
    /// How long a leaf certificate keyward signs for an intercepted host is valid.
    pub leaf_validity: Duration,
}

#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub path: PathBuf,
    pub retention_days: u32,
    pub metadata: BTreeMap<String, String>,
    pub durability: Durability,
    pub on_failure: OnFailure,
    /// Rotate the active file once it is this large (0: never by size).
    pub rotate_bytes: u64,
    /// Rotate the active file when the UTC date changes.
    pub rotate_daily: bool,
}

/// What "written" means for an audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Handed to the OS with write(2): survives a crash of keyward.
    Os,
    /// Also fsync'd, one fsync per batch of concurrent records: survives power loss.
    Fsync,
    /// Buffered in keyward: for benchmarks only.
    None,
}

/// What to do when the audit file cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse the request with 503 `audit_unavailable`: no credential without a record.
    Deny,
    /// Forward anyway, counting and logging every lost record.
    Allow,
}

#[derive(Clone, Default)]
pub struct AdminConfig {
    /// SHA-256 of the admin API token; `None` leaves the admin API disabled.
    pub token_sha256: Option<[u8; 32]>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig").field("token_configured", &self.token_sha256.is_some()).finish()
    }
}

/// Headers where clients put API credentials. They are removed from every outbound request,
/// with the route's own `agent_key` headers, unless the route's `pass_headers` names them.
pub const CREDENTIAL_HEADERS: [&str; 5] =
    ["authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Range requests can cut an echoed credential into pieces that each pass the scrubber, so
/// they are removed on every route (all routes inject a credential) unless `pass_headers` names them.
pub const RANGE_HEADERS: [&str; 2] = ["range", "if-range"];

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// The reverse-proxy prefix; `None` for a route reached only through the forward proxy.
    pub prefix: Option<String>,
    /// Where reverse-proxy calls go; for a forward-only route, the first of `hosts` on its
    /// first port (rotation probes use it).
    pub upstream: Upstream,
    /// Where the agent key may come from, in order; empty only for a route without `prefix`.
    pub agent_key: Vec<AgentKeySpec>,
    /// Hosts (lowercase) this route answers for on the forward-proxy listener.
    pub hosts: Vec<String>,
    /// The ports a CONNECT to one of `hosts` may name.
    pub ports: Vec<u16>,
    /// Every upstream connection of this route goes to this address instead of resolving the
    /// host; TLS still verifies the certificate for the host name.
    pub connect_to: Option<SocketAddr>,
    /// Extra trust anchors for this route's upstream, from `upstream_ca_file`.
    pub upstream_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Headers removed by default (agent credential headers, `Range`, `If-Range`) that this
    /// route forwards anyway; never one of `agent_key`'s headers.
    pub pass_headers: Vec<HeaderName>,
    pub inject: InjectSpec,
    /// Scan responses for credentials (default). Off only for benchmarks or trusted binary streams.
    pub scrub_responses: bool,
    /// The request that tests a candidate credential before rotation promotes it.
    pub validate: Option<Probe>,
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub method: http::Method,
    /// Below the upstream's base path, with an optional query.
    pub path: String,
    pub expect: Vec<u16>,
}

#[derive(Debug, Clone)]
pub struct AgentKeySpec {
    pub header: HeaderName,
    /// Accepted auth schemes (`Bearer`, `token`); empty means the header holds the bare key.
    pub schemes: Vec<String>,
}

/// How a route puts its credential on the request; `Signed` when the route has no `inject`, its
/// secrets being of a kind that signs the request (`aws-sigv4`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectSpec {
    Header { name: HeaderName, value: Template },
    Query { name: String, value: Template },
    Basic { username: Template, password: Template },
    Signed,
}

/// A string with `{{secret}}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    Secret,
}

#[derive(Debug, Clone, Default)]
pub struct RoleConfig {
    pub name: String,
    pub grants: Vec<GrantConfig>,
    /// May agents of this role mint delegated child keys?
    pub delegate: bool,
    /// The longest a child key may live.
    pub max_delegation_ttl: Duration,
    /// How many levels of delegation may hang below an agent of this role.
    pub max_delegation_depth: u32,
    /// Most requests one agent of this role may have in flight at once.
    pub max_in_flight: Option<u32>,
    pub anomaly: AnomalyConfig,
    /// `Shadow`: what the role's grants, quotas, in-flight limit and budgets would refuse goes
    /// through (for its own agents, not their delegated keys), recorded as `would_deny`.
    pub mode: crate::policy::Mode,
}

impl crate::policy::RoleGrants for RoleConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn grants(&self) -> &[GrantConfig] {
        &self.grants
    }
}

/// What an anomaly detector does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnomalyAction {
    /// An audit event and the notify webhook.
    Alert,
    /// Alert, and cut the agent's quotas to `throttle_fraction` for the cool-down.
    Throttle,
    /// Alert, and refuse every request (`403 agent_quarantined`) until released or cooled down.
    Quarantine,
}

#[derive(Debug, Clone)]
pub struct Detector {
    pub action: AnomalyAction,
    /// Rate spike: fire when the 1-minute rate exceeds `factor` × the baseline...
    pub factor: f64,
    /// ...and this many requests per minute.
    pub floor_per_minute: u32,
    /// Failure burst: fire at this many failures within `window`.
    pub threshold: u32,
    pub window: Duration,
    /// Off-hours: the active window as minutes after local midnight, `[start, end)`.
    pub active_minutes: Option<(u32, u32)>,
    /// Off-hours: the time zone as a fixed offset from UTC, in minutes.
    pub utc_offset_minutes: i32,
    pub throttle_fraction: f64,
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct AnomalyConfig {
    pub rate_spike: Option<Detector>,
    pub failure_burst: Option<Detector>,
    pub off_hours: Option<Detector>,
    pub first_use: Option<Detector>,
}

#[derive(Debug, Clone)]
pub enum LimitsBackend {
    Local,
    Redis { url: String },
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub backend: LimitsBackend,
    /// With Redis unreachable: `true` falls back to local limits (fail open), `false` answers 429.
    pub fail_open: bool,
    /// Where anomaly alerts are POSTed as JSON.
    pub notify: Option<String>,
}

#[derive(Clone)]
pub struct AgentConfig {
    pub id: String,
    pub role: String,
    /// SHA-256 of the agent key; `None` for an agent identified by `peer_uid` alone.
    pub key_sha256: Option<[u8; 32]>,
    /// On the Unix-socket listener: the uid the connecting process must run as. Alone, the uid
    /// identifies the agent; with a key, both must match.
    pub peer_uid: Option<u32>,
    pub disabled: bool,
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("id", &self.id)
            .field("role", &self.role)
            .field("peer_uid", &self.peer_uid)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Advice about a valid config: things that work, but probably not as intended.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in &self.budgets {
            if b.cost_micro_usd.is_some()
                && self.usage.prices.is_empty()
                && self.usage.unknown_model == budget::UnknownModel::Refuse
            {
                out.push(format!(
                    "budget '{}' limits cost, but [usage.prices] is empty and usage.unknown_model = \"refuse\": every metered call it applies to is refused (model_not_priced)",
                    b.name
                ));
            }
        }
        for role in self.roles.values() {
            if role.mode == crate::policy::Mode::Shadow {
                out.push(format!(
                    "role '{}' is in shadow mode: what its grants, quotas and budgets would refuse goes through, recorded as would_deny",
                    role.name
                ));
            }
        }
        for source in &self.sources {
            let Some(policy) = source.rotation.as_ref().filter(|p| p.enabled) else { continue };
            let probed = self.roles.values().flat_map(|r| &r.grants).any(|g| {
                source.mapping.contains_key(&g.secret)
                    && self.routes.iter().any(|r| r.name == g.route && r.validate.is_some())
            });
            if !probed {
                out.push(format!(
                    "source '{}' rotates, but no route that uses its secrets has a `validate` probe: candidates are promoted untested",
                    source.name
                ));
            }
            if policy.schedule.is_none() {
                out.push(format!(
                    "source '{}' has no rotation schedule: it rotates only on POST /admin/secrets/NAME/rotate",
                    source.name
                ));
            }
            if self.admin.token_sha256.is_none() && policy.schedule.is_none() {
                out.push(format!(
                    "source '{}' can only rotate manually, but the admin API is off (admin.token_sha256)",
                    source.name
                ));
            }
        }
        out
    }
}

/// One problem in a config file, located by line and field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl Problem {
    /// The problem without the text it quotes, for audit records and API answers: a value pasted
    /// into the wrong field could be a credential. Quoted spans of 8 or more characters are masked.
    pub fn redacted(&self) -> String {
        let text = self.to_string();
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(open) = rest.find(['\'', '"', '`']) {
            let quote = rest[open..].chars().next().expect("found above");
            out.push_str(&rest[..=open]);
            rest = &rest[open + 1..];
            match rest.find(quote) {
                Some(close) if rest[..close].chars().count() >= 8 => {
                    out.push('…');
                    out.push(quote);
                    rest = &rest[close + 1..];
                }
                Some(close) => {
                    out.push_str(&rest[..=close]);
                    rest = &rest[close + 1..];
                }
                None => break,
            }
        }
        out.push_str(rest);
        out
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: ", self.file, line)?,
            None => write!(f, "{}: ", self.file)?,
        }
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in a config, so a user can fix them all in one pass.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where a config came from: a file, or the copy embedded in the binary.
pub enum ConfigSource<'a> {
    File(&'a Path),
    Embedded,
}

/// Loads the config a command should use: the given path; else `config/keyward.toml`; else the
/// embedded default (a path that was named explicitly must exist).
pub fn load_for_command(explicit: Option<&Path>) -> Result<(Config, String), ConfigErrors> {
    match explicit {
        Some(path) => load_file(path).map(|c| (c, path.display().to_string())),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            load_file(Path::new(DEFAULT_CONFIG_PATH)).map(|c| (c, DEFAULT_CONFIG_PATH.to_string()))
        }
        None => {
            let base = prepare_embedded_home().map_err(|message| {
                ConfigErrors(vec![Problem {
                    file: EMBEDDED_NAME.to_string(),
                    line: None,
                    field: String::new(),
                    message,
                }])
            })?;
            load_str_at(EMBEDDED_DEFAULT, EMBEDDED_NAME, false, &base).map(|c| (c, EMBEDDED_NAME.to_string()))
        }
    }
}

pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Problem {
            file: name.clone(),
            line: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let json = matches!(spans::Format::of_path(&name), spans::Format::Json);
    load_str_at(&text, &name, json, path.parent().unwrap_or(Path::new("")))
}

/// Parses and validates config text; `name` is used in problem locations. Relative paths in it
/// stay relative to the working directory.
pub fn load_str(text: &str, name: &str, json: bool) -> Result<Config, ConfigErrors> {
    load_str_at(text, name, json, Path::new(""))
}

/// Parses and validates config text whose relative paths resolve against `base`.
pub fn load_str_at(text: &str, name: &str, json: bool, base: &Path) -> Result<Config, ConfigErrors> {
    let format = if json { spans::Format::Json } else { spans::Format::Toml };
    let (value, index) = spans::parse(text, format).map_err(|e| {
        ConfigErrors(vec![Problem { file: name.to_string(), line: e.line, field: String::new(), message: e.message }])
    })?;
    validate::validate(value, &index, name, base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_problems_mask_quoted_text() {
        let problem = Problem {
            file: "k.toml".into(),
            line: Some(3),
            field: "sources[0].mapping.K".into(),
            message: "invalid type: string \"sk-live-pasted-by-mistake\", expected a map; `id` ok".into(),
        };
        assert_eq!(
            problem.redacted(),
            "k.toml:3: sources[0].mapping.K: invalid type: string \"…\", expected a map; `id` ok"
        );
    }

    #[test]
    fn rotation_bounds_and_stages_are_checked() {
        let base = r#"
[[sources]]
name = "s"
provider = "aws-secrets-manager"
secret_name = "x"
version_stage = "AWSPREVIOUS"
mapping = { K = "{{K}}" }
rotation = { grace_period_minutes = 99999999, notify_ahead_hours = 99999999, schedule = "0 0 * * 0" }
"#;
        let errors = load_str(base, "k.toml", false).unwrap_err().to_string();
        assert!(errors.contains("grace_period_minutes: must be at most 10080"), "{errors}");
        assert!(errors.contains("notify_ahead_hours: must be at most 8784"), "{errors}");
        assert!(errors.contains("reads version_stage 'AWSPREVIOUS'"), "{errors}");
        let exec = "[[sources]]\nname = \"e\"\nprovider = \"exec\"\ncommand = \"/bin/true\"\nmapping = { K = \"{{K}}\" }\nrotation = { enabled = true }\n";
        let errors = load_str(exec, "k.toml", false).unwrap_err().to_string();
        assert!(errors.contains("an exec source cannot rotate"), "{errors}");
    }

    #[test]
    fn agent_key_places_and_pass_headers_are_checked_with_their_lines() {
        let route = |agent_key: &str, pass: &str| {
            format!(
                "[[sources]]\nname = \"s\"\nprovider = \"env\"\nmapping = {{ S = \"{{{{S}}}}\" }}\n[[routes]]\nname = \"r\"\nprefix = \"/r\"\nupstream = \"https://x.example\"\nagent_key = {agent_key}\npass_headers = {pass}\ninject = {{ header = \"x-api-key\", value = \"{{{{secret}}}}\" }}\n"
            )
        };
        let ok = load_str(
            &route(r#"[{ header = "x-api-key" }, { header = "Authorization", scheme = "Bearer" }]"#, r#"["Range"]"#),
            "k.toml",
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let places: Vec<&str> = ok.routes[0].agent_key.iter().map(|p| p.header.as_str()).collect();
        assert_eq!(places, ["x-api-key", "authorization"]);
        assert_eq!(ok.routes[0].pass_headers, [http::header::RANGE]);
        // The single-table form keeps working.
        let one = load_str(&route(r#"{ header = "x-api-key" }"#, "[]"), "k.toml", false).unwrap();
        assert_eq!(one.routes[0].agent_key.len(), 1);

        let problems =
            |agent_key: &str, pass: &str| load_str(&route(agent_key, pass), "k.toml", false).unwrap_err().to_string();
        let errors =
            problems(r#"[{ header = "x-api-key" }, { header = "content-length" }, { header = "X-Api-Key" }]"#, "[]");
        assert!(
            errors.contains("k.toml:9: routes[0].agent_key[1].header: 'content-length' is a connection"),
            "{errors}"
        );
        assert!(errors.contains("routes[0].agent_key[2].header: 'x-api-key' is listed twice"), "{errors}");
        let errors = problems(r#"[{ header = "x-api-key" }, { header = "authorization", scheme = 3 }]"#, "[]");
        assert!(errors.contains("k.toml:9: routes[0].agent_key[1].scheme: "), "{errors}");
        let errors = problems(r#""x-api-key""#, "[]");
        assert!(errors.contains("routes[0].agent_key: invalid type: string"), "{errors}");
        assert!(errors.contains("or a list of them"), "{errors}");
        let errors = problems("[]", "[]");
        assert!(errors.contains("k.toml:9: routes[0].agent_key: lists no place"), "{errors}");
        let errors = problems(r#"[{ header = "x-api-key", scheme = "Bear er" }]"#, "[]");
        assert!(errors.contains("routes[0].agent_key[0].scheme[0]: 'Bear er' is not an auth scheme"), "{errors}");
        let errors =
            problems(r#"{ header = "x-api-key" }"#, r#"["x-api-key", "proxy-authorization", "x-trace", "bad header"]"#);
        assert!(errors.contains("k.toml:10: routes[0].pass_headers[0]: 'x-api-key' carries the agent key"), "{errors}");
        assert!(errors.contains("pass_headers[1]: 'proxy-authorization' carries the agent key"), "{errors}");
        assert!(errors.contains("pass_headers[2]: 'x-trace' is forwarded anyway"), "{errors}");
        assert!(errors.contains("pass_headers[3]: 'bad header' is not a header name"), "{errors}");
    }
}
