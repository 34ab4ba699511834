//! The config file exactly as written: serde types that refuse unknown fields, before validation.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::credentials::{self, ProviderFields};

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub forward: RawForward,
    /// The forward-proxy listener (`HTTPS_PROXY`), off unless present.
    pub forward_proxy: Option<RawForwardProxy>,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub sources: Vec<RawSource>,
    /// Files holding the article's `external-secrets` JSON blocks, loaded as sources.
    #[serde(default)]
    pub sources_from: Vec<String>,
    /// Named notification channels (name → webhook URL) for `notificationChannel = "name"`.
    #[serde(default)]
    pub notifications: BTreeMap<String, String>,
    /// `[secrets.NAME]`: the kind of a secret a source maps (`kind = "github-app"`, ...) and the
    /// kind's fields, read by the kind's module when the table is validated.
    #[serde(default)]
    pub secrets: BTreeMap<String, serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub roles: BTreeMap<String, RawRole>,
    #[serde(default)]
    pub agents: Vec<RawAgent>,
    /// The price table and how calls are reserved before their usage is known.
    #[serde(default)]
    pub usage: RawUsage,
    #[serde(default)]
    pub budgets: Vec<RawBudget>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub default_max_output_tokens: Option<u64>,
    /// `"refuse"` or `"default_price"`.
    pub unknown_model: Option<String>,
    pub default_price: Option<RawPrice>,
    #[serde(default)]
    pub prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    pub no_stream_usage: Vec<String>,
}

/// USD per million tokens; cached tokens cost the input price unless set.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub name: String,
    pub agent: Option<String>,
    pub role: Option<String>,
    pub pool: Option<RawPool>,
    pub tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    pub window: String,
    pub mode: Option<String>,
    pub redis_failure: Option<String>,
    #[serde(default)]
    pub cut_off: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    #[serde(default)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// `"host:port"`, `"unix:/path"`, or a list of one of each.
    pub listen: Option<OneOrMany>,
    pub unix_socket_mode: Option<String>,
    pub admin_listen: Option<String>,
    pub header_read_timeout_ms: Option<u64>,
    pub max_header_bytes: Option<usize>,
    pub access_log: Option<bool>,
    pub shutdown_grace_ms: Option<u64>,
    pub park_idle_after_ms: Option<u64>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAnomaly {
    pub rate_spike: Option<RawDetector>,
    pub failure_burst: Option<RawDetector>,
    pub off_hours: Option<RawDetector>,
    pub first_use: Option<RawDetector>,
}

/// One detector's settings; each detector uses the fields that apply to it.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawDetector {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub action: Option<String>,
    pub factor: Option<f64>,
    pub floor_per_minute: Option<u32>,
    pub threshold: Option<u32>,
    pub window_seconds: Option<u64>,
    pub active_hours: Option<String>,
    pub utc_offset: Option<String>,
    pub throttle_fraction: Option<f64>,
    pub cooldown_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub backend: Option<String>,
    pub redis_url: Option<String>,
    pub redis_failure: Option<String>,
    pub notify: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub token_sha256: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawForward {
    pub connect_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    pub total_timeout_ms: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub pool_idle_timeout_ms: Option<u64>,
    pub pool_max_idle_per_host: Option<usize>,
    pub retry_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawForwardProxy {
    pub listen: Option<String>,
    pub ca_cert_file: Option<String>,
    pub ca_key_file: Option<String>,
    #[serde(default)]
    pub tunnel_hosts: Vec<String>,
    pub leaf_validity_hours: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub path: Option<String>,
    pub retention_days: Option<u32>,
    pub durability: Option<String>,
    pub on_failure: Option<String>,
    pub rotate_bytes: Option<u64>,
    pub rotate_daily: Option<bool>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One secret source (the article's `external-secrets`): the fields every source has, and the
/// fields of its provider, written flat beside them. Each provider field is read with the type
/// its provider module declares; one no provider declares is an unknown field.
#[derive(Debug)]
pub struct RawSource {
    pub name: String,
    pub provider: String,
    pub mapping: Option<BTreeMap<String, String>>,
    pub cache: Option<RawCache>,
    pub rotation: Option<RawRotation>,
    pub audit_trail: Option<RawAuditTrail>,
    /// The provider's own fields; validation reports those its provider does not read.
    pub fields: ProviderFields,
}

/// The fields every source has, with the article's camelCase aliases (as serde lists them).
const SOURCE_FIELDS: [&str; 8] =
    ["name", "provider", "mapping", "cache", "rotationPolicy", "rotation", "auditTrail", "audit_trail"];

impl<'de> Deserialize<'de> for RawSource {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = RawSource;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("struct RawSource")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<RawSource, A::Error> {
                use serde::de::Error;
                /// Reads a field's value, refusing a second one as serde's derive does.
                fn once<'de, T: Deserialize<'de>, A: serde::de::MapAccess<'de>>(
                    slot: &mut Option<T>,
                    field: &'static str,
                    map: &mut A,
                ) -> Result<(), A::Error> {
                    if slot.is_some() {
                        return Err(A::Error::duplicate_field(field));
                    }
                    *slot = Some(map.next_value()?);
                    Ok(())
                }
                let (mut name, mut provider, mut mapping, mut cache, mut rotation, mut audit_trail) =
                    (None, None, None, None, None, None);
                let mut fields = ProviderFields::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "name" => once(&mut name, "name", &mut map)?,
                        "provider" => once(&mut provider, "provider", &mut map)?,
                        "mapping" => once(&mut mapping, "mapping", &mut map)?,
                        "cache" => once(&mut cache, "cache", &mut map)?,
                        "rotation" | "rotationPolicy" => once(&mut rotation, "rotation", &mut map)?,
                        "audit_trail" | "auditTrail" => once(&mut audit_trail, "audit_trail", &mut map)?,
                        other if credentials::is_provider_field(other) => fields.read(other, &mut map)?,
                        other => return Err(A::Error::unknown_field(other, expected_source_fields())),
                    }
                }
                Ok(RawSource {
                    name: name.ok_or_else(|| A::Error::missing_field("name"))?,
                    provider: provider.ok_or_else(|| A::Error::missing_field("provider"))?,
                    mapping: mapping.flatten(),
                    cache: cache.flatten(),
                    rotation: rotation.flatten(),
                    audit_trail: audit_trail.flatten(),
                    fields,
                })
            }
        }
        deserializer.deserialize_struct("RawSource", &SOURCE_FIELDS, Fields)
    }
}

/// Every field a source table may hold: its own, then each provider's.
fn expected_source_fields() -> &'static [&'static str] {
    static ALL: std::sync::LazyLock<Vec<&'static str>> =
        std::sync::LazyLock::new(|| SOURCE_FIELDS.iter().chain(credentials::provider_field_names()).copied().collect());
    &ALL
}

/// The article's `rotationPolicy`, with snake_case names and the article's camelCase as aliases.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRotation {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub schedule: Option<String>,
    #[serde(alias = "gracePeriodMinutes")]
    pub grace_period_minutes: Option<u64>,
    #[serde(alias = "fallbackTo")]
    pub fallback_to: Option<String>,
    #[serde(alias = "notificationChannel")]
    pub notify: Option<String>,
    #[serde(alias = "notifyAheadHours")]
    pub notify_ahead_hours: Option<u64>,
}

/// The article's `auditTrail`: every use is audited anyway; `retentionDays` raises the retention.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuditTrail {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(alias = "retentionDays")]
    pub retention_days: Option<u32>,
}

/// One block of the article's JSON exactly as published: `{"type": "external-secrets", "source":
/// {...}, "mapping": {...}, "rotationPolicy": {...}, "auditTrail": {...}}`. `name` is optional
/// (the file's stem by default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExternal {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
    pub source: RawExternalSource,
    pub mapping: Option<BTreeMap<String, String>>,
    pub cache: Option<RawCache>,
    #[serde(alias = "rotation")]
    #[serde(rename = "rotationPolicy")]
    pub rotation: Option<RawRotation>,
    #[serde(alias = "audit_trail")]
    #[serde(rename = "auditTrail")]
    pub audit_trail: Option<RawAuditTrail>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExternalSource {
    pub provider: String,
    pub region: Option<String>,
    #[serde(alias = "secret_name")]
    #[serde(rename = "secretName")]
    pub secret_name: Option<String>,
    #[serde(alias = "endpoint_url")]
    #[serde(rename = "endpointUrl")]
    pub endpoint_url: Option<String>,
    #[serde(alias = "version_stage")]
    #[serde(rename = "versionStage")]
    pub version_stage: Option<String>,
    pub path: Option<String>,
}

impl RawExternal {
    pub fn into_source(self, default_name: String) -> RawSource {
        let source = self.source;
        RawSource {
            name: self.name.unwrap_or(default_name),
            provider: source.provider,
            mapping: self.mapping,
            cache: self.cache,
            rotation: self.rotation,
            audit_trail: self.audit_trail,
            fields: ProviderFields::from_pairs([
                ("region", source.region),
                ("secret_name", source.secret_name),
                ("endpoint_url", source.endpoint_url),
                ("version_stage", source.version_stage),
                ("path", source.path),
            ]),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(alias = "ttlSeconds")]
    pub ttl_seconds: Option<u64>,
    #[serde(alias = "maxSize")]
    pub max_size: Option<usize>,
    #[serde(alias = "staleIfErrorSeconds")]
    pub stale_if_error_seconds: Option<u64>,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    /// The reverse-proxy path prefix; a route needs it, `hosts`, or both.
    pub prefix: Option<String>,
    /// Required with `prefix`; a route with only `hosts` goes to the host the agent asked for.
    pub upstream: Option<String>,
    /// Hosts this route answers for on the forward-proxy listener.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The ports a CONNECT to one of `hosts` may name (default 443).
    pub ports: Option<Vec<u16>>,
    /// Connect here instead of resolving the host (tests, split-horizon DNS).
    pub connect_to: Option<String>,
    /// Extra CA certificates (PEM) trusted for this route's upstream.
    pub upstream_ca_file: Option<String>,
    #[serde(default)]
    pub allow_plaintext: bool,
    #[serde(default = "default_true")]
    pub scrub_responses: bool,
    /// One place (`{ header, scheme }`) or a list of places the agent key may come from;
    /// required with `prefix` (on the forward proxy the key comes from `Proxy-Authorization`).
    pub agent_key: Option<RawAgentKeys>,
    /// Headers keyward removes by default that this route forwards anyway.
    #[serde(default)]
    pub pass_headers: Vec<String>,
    /// Absent on a route whose secrets sign the request (`aws-sigv4`).
    pub inject: Option<RawInject>,
    pub validate: Option<RawProbe>,
}

/// A request that tests a candidate credential during rotation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    #[serde(default = "default_probe_method")]
    pub method: String,
    pub path: String,
    #[serde(default = "default_probe_expect")]
    pub expect: Vec<u16>,
}

fn default_probe_method() -> String {
    "GET".to_string()
}

fn default_probe_expect() -> Vec<u16> {
    vec![200]
}

/// `agent_key`: one table, or a list of tables. Deserialized by shape (not `untagged`), so a
/// problem inside a place is reported at its own field, like `agent_key[1].scheme`.
#[derive(Debug)]
pub enum RawAgentKeys {
    One(RawAgentKey),
    Many(Vec<RawAgentKey>),
}

impl<'de> Deserialize<'de> for RawAgentKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Places;
        impl<'de> serde::de::Visitor<'de> for Places {
            type Value = RawAgentKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a place like { header = \"x-api-key\" } or { header = \"authorization\", scheme = \"Bearer\" }, or a list of them",
                )
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawAgentKeys, A::Error> {
                RawAgentKey::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawAgentKeys::One)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<RawAgentKeys, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(RawAgentKeys::Many)
            }
        }
        deserializer.deserialize_any(Places)
    }
}

impl RawAgentKeys {
    pub fn into_vec(self) -> Vec<RawAgentKey> {
        match self {
            RawAgentKeys::One(one) => vec![one],
            RawAgentKeys::Many(many) => many,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgentKey {
    pub header: String,
    pub scheme: Option<OneOrMany>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// Exactly one of `header`, `query` or `basic` is set; `value` is the template for the first two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInject {
    pub header: Option<String>,
    pub query: Option<String>,
    pub value: Option<String>,
    pub basic: Option<RawBasic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    #[serde(default)]
    pub grants: Vec<RawGrant>,
    #[serde(default)]
    pub delegate: bool,
    pub rate: Option<String>,
    pub burst: Option<u32>,
    pub max_in_flight: Option<u32>,
    pub anomaly: Option<RawAnomaly>,
    pub max_delegation_ttl_seconds: Option<u64>,
    pub max_delegation_depth: Option<u32>,
    /// `"shadow"`: everything the role would refuse goes through, recorded as `would_deny`.
    pub mode: Option<String>,
    /// `"shadow"` for the role's default quota.
    pub quota_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    pub route: String,
    pub secret: String,
    pub methods: Vec<String>,
    pub paths: Vec<String>,
    pub rate: Option<String>,
    pub burst: Option<u32>,
    pub mode: Option<String>,
    pub quota_mode: Option<String>,
    /// For a `github-app` secret: the repositories its tokens are narrowed to.
    pub repositories: Option<Vec<String>>,
    /// For a `github-app` secret: the permissions its tokens are narrowed to.
    pub permissions: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub id: String,
    pub role: String,
    pub key_sha256: Option<String>,
    pub peer_uid: Option<u32>,
    #[serde(default)]
    pub disabled: bool,
}
