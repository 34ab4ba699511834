//! The `aws-sigv4` credential kind: keyward holds the AWS keys and signs each outbound request
//! with AWS Signature Version 4 (the `aws-sigv4` crate, AWS's own signer) for the secret's service
//! and region, after removing whatever the agent signed it with.
//!
//! `[secrets.NAME]` with `kind = "aws-sigv4"` names the service and region and where the keys come
//! from: `credentials = "source"` (the value a source maps to NAME, a JSON object with
//! `access_key_id`, `secret_access_key` and an optional `session_token`), or `credentials =
//! "chain"` (the standard AWS credential chain of the keyward process: environment, profile, web
//! identity, ECS, IMDS). Neither the keys nor the signature are ever logged, audited or returned.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_sigv4::sign::v4;
use http::{HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{Report, Resolved, SecretStore};
use crate::error::ProxyError;

/// What `kind` names this credential kind.
pub const KIND: &str = "aws-sigv4";

/// What the audit record and `/admin/secrets` name the source of keys from the AWS chain.
pub const CHAIN_SOURCE: &str = "aws-credential-chain";

/// `[secrets.NAME]` as written. Only `kind = "aws-sigv4"` exists on this branch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretKind {
    pub kind: String,
    pub service: Option<String>,
    pub region: Option<String>,
    pub credentials: Option<String>,
    pub assume_role_arn: Option<String>,
    pub session_policy: Option<String>,
    pub role_session_name: Option<String>,
    pub session_duration_seconds: Option<u64>,
    pub sts_endpoint_url: Option<String>,
}

/// Where the AWS keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The secret's value from its source: JSON `{access_key_id, secret_access_key, session_token?}`.
    Source,
    /// The AWS default credential chain of the keyward process.
    Chain,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Source => "source",
            KeySource::Chain => "chain",
        }
    }
}

/// A validated `aws-sigv4` secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sigv4Config {
    /// The secret's name, as grants name it.
    pub name: String,
    /// The signing name of the AWS service (`bedrock` for Bedrock runtime).
    pub service: String,
    pub region: String,
    pub credentials: KeySource,
    /// A role the keys assume (STS `AssumeRole`) before signing; the role's temporary keys sign.
    pub assume_role: Option<AssumeRole>,
}

/// The role an `aws-sigv4` secret assumes, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRole {
    pub arn: String,
    /// An IAM policy (JSON) that narrows the role's permissions for this secret's session.
    pub session_policy: Option<String>,
    pub session_name: String,
    pub duration: Duration,
    /// STS at another address (a VPC endpoint, a local test); the regional endpoint by default.
    pub sts_endpoint_url: Option<String>,
}

/// AWS's bounds on an `AssumeRole` session and its inline policy.
const MIN_SESSION: u64 = 900;
const MAX_SESSION: u64 = 43_200;
const MAX_SESSION_POLICY_CHARS: usize = 2048;

/// Validates `[secrets.*]`. `secret_owner` (secret name → source) is the sources' mapping; a
/// `chain` secret is added to it, so grants may name it like any other secret.
pub fn configure(
    report: &mut dyn Report,
    raw: BTreeMap<String, RawSecretKind>,
    secret_owner: &mut HashMap<String, String>,
) -> BTreeMap<String, Sigv4Config> {
    let mut out = BTreeMap::new();
    for (name, raw) in raw {
        let at = format!("secrets.{name}");
        let mut problem = |field: &str, message: String| report.problem(format!("{at}.{field}"), message);
        if raw.kind != KIND {
            problem("kind", format!("'{}' is not a credential kind: expected '{KIND}'", raw.kind));
            continue;
        }
        let assume_role = assume_role(&mut problem, &raw);
        let service = required(&mut problem, "service", raw.service, "the AWS signing name, like \"bedrock\"");
        let region = required(&mut problem, "region", raw.region, "the AWS region, like \"us-east-1\"");
        if let Some(service) = &service
            && !is_aws_name(service)
        {
            problem("service", format!("'{service}' is not an AWS signing name (lowercase letters, digits and '-')"));
        }
        if let Some(region) = &region
            && !is_aws_name(region)
        {
            problem("region", format!("'{region}' is not an AWS region like \"us-east-1\""));
        }
        let credentials = match raw.credentials.as_deref() {
            None | Some("source") => Some(KeySource::Source),
            Some("chain") => Some(KeySource::Chain),
            Some(other) => {
                problem("credentials", format!("'{other}': expected 'source' or 'chain'"));
                None
            }
        };
        match (credentials, secret_owner.get(&name)) {
            (Some(KeySource::Source), None) => problem(
                "credentials",
                format!(
                    "no source provides a secret named '{name}': map it in a source to JSON with access_key_id and \
                     secret_access_key, or set credentials = \"chain\""
                ),
            ),
            (Some(KeySource::Chain), Some(source)) => problem(
                "credentials",
                format!(
                    "'chain' takes the keys from the AWS credential chain, but source '{source}' maps '{name}' too"
                ),
            ),
            _ => {}
        }
        let (Some(service), Some(region), Some(credentials), Some(assume_role)) =
            (service, region, credentials, assume_role)
        else {
            continue;
        };
        if credentials == KeySource::Chain {
            secret_owner.insert(name.clone(), CHAIN_SOURCE.to_string());
        }
        out.insert(name.clone(), Sigv4Config { name, service, region, credentials, assume_role });
    }
    out
}

/// The `assume_role_arn` group of fields: `Some(None)` when no role is assumed, `None` when a
/// field is wrong (reported).
fn assume_role(problem: &mut impl FnMut(&str, String), raw: &RawSecretKind) -> Option<Option<AssumeRole>> {
    let Some(arn) = &raw.assume_role_arn else {
        for (field, set) in [
            ("session_policy", raw.session_policy.is_some()),
            ("role_session_name", raw.role_session_name.is_some()),
            ("session_duration_seconds", raw.session_duration_seconds.is_some()),
            ("sts_endpoint_url", raw.sts_endpoint_url.is_some()),
        ] {
            if set {
                problem(field, "is used only with assume_role_arn".to_string());
            }
        }
        return Some(None);
    };
    let mut ok = true;
    let parts: Vec<&str> = arn.split(':').collect();
    if parts.len() != 6 || parts[0] != "arn" || parts[2] != "iam" || !parts[5].starts_with("role/") {
        problem("assume_role_arn", format!("'{arn}' is not a role ARN like \"arn:aws:iam::123456789012:role/name\""));
        ok = false;
    }
    if let Some(policy) = &raw.session_policy {
        if !matches!(serde_json::from_str::<serde_json::Value>(policy), Ok(serde_json::Value::Object(_))) {
            problem("session_policy", "must be an IAM policy document: a JSON object".to_string());
            ok = false;
        } else if policy.chars().count() > MAX_SESSION_POLICY_CHARS {
            problem("session_policy", format!("is longer than AWS's {MAX_SESSION_POLICY_CHARS} characters"));
            ok = false;
        }
    }
    let session_name = raw.role_session_name.clone().unwrap_or_else(|| "keyward".to_string());
    let name_ok = (2..=64).contains(&session_name.len())
        && session_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"=,.@_-".contains(&b));
    if !name_ok {
        problem("role_session_name", format!("'{session_name}': 2-64 letters, digits or =,.@_-"));
        ok = false;
    }
    let seconds = raw.session_duration_seconds.unwrap_or(3600);
    if !(MIN_SESSION..=MAX_SESSION).contains(&seconds) {
        problem("session_duration_seconds", format!("must be between {MIN_SESSION} and {MAX_SESSION}"));
        ok = false;
    }
    if let Some(url) = &raw.sts_endpoint_url {
        let parsed = url.parse::<http::Uri>().ok().filter(|u| u.host().is_some());
        let plain_remote = parsed.as_ref().is_some_and(|u| {
            u.scheme() == Some(&http::uri::Scheme::HTTP) && !crate::policy::is_loopback_host(u.host().unwrap_or(""))
        });
        let scheme_ok = parsed
            .as_ref()
            .and_then(|u| u.scheme())
            .is_some_and(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS);
        if !scheme_ok || plain_remote {
            problem("sts_endpoint_url", format!("'{url}' must be an https URL (http only on loopback)"));
            ok = false;
        }
    }
    ok.then(|| {
        Some(AssumeRole {
            arn: arn.clone(),
            session_policy: raw.session_policy.clone(),
            session_name,
            duration: Duration::from_secs(seconds),
            sts_endpoint_url: raw.sts_endpoint_url.clone(),
        })
    })
}

fn required(problem: &mut impl FnMut(&str, String), field: &str, value: Option<String>, what: &str) -> Option<String> {
    if value.is_none() {
        problem(field, format!("is required for kind '{KIND}': {what}"));
    }
    value
}

fn is_aws_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

/// The AWS keys one signature uses. Deliberately not `Debug` (`Credentials` redacts its own).
#[derive(Clone)]
pub struct Keys(Credentials);

impl Keys {
    pub fn new(access_key_id: &str, secret_access_key: &str, session_token: Option<&str>) -> Keys {
        let token = session_token.map(str::to_string);
        Keys(Credentials::new(access_key_id, secret_access_key, token, None, "keyward"))
    }

    /// Parses a source's value. The error names what is missing, never a value.
    pub fn parse(value: &SecretString) -> Result<Keys, &'static str> {
        /// Deliberately not `Debug`.
        #[derive(Deserialize)]
        struct Document {
            access_key_id: Option<String>,
            secret_access_key: Option<String>,
            session_token: Option<String>,
        }
        // serde_json's error would quote the text it stopped at, so it is not passed on.
        let document: Document = serde_json::from_str(value.expose_secret())
            .map_err(|_| "the secret's value is not a JSON object with access_key_id and secret_access_key")?;
        let Document { access_key_id, secret_access_key, session_token } = document;
        // The parsed copies are wiped when this returns; `Credentials` keeps its own.
        let (secret_access_key, session_token) =
            (secret_access_key.map(zeroize::Zeroizing::new), session_token.map(zeroize::Zeroizing::new));
        let (Some(id), Some(secret)) =
            (access_key_id.filter(|v| !v.is_empty()), secret_access_key.filter(|v| !v.is_empty()))
        else {
            return Err("the secret's value lacks access_key_id or secret_access_key");
        };
        Ok(Keys::new(&id, &secret, session_token.as_deref().map(String::as_str).filter(|t| !t.is_empty())))
    }

    /// The values the response scrubber must recognise: the secret key and the session token.
    fn scrub_values(&self) -> HashMap<String, SecretString> {
        let mut values = HashMap::new();
        values.insert("secret_access_key".to_string(), SecretString::from(self.0.secret_access_key().to_string()));
        if let Some(token) = self.0.session_token() {
            values.insert("session_token".to_string(), SecretString::from(token.to_string()));
        }
        values
    }
}

/// Why a request could not be signed: a name and a reason, never a value.
fn unavailable(secret: &str, reason: &'static str) -> ProxyError {
    ProxyError::SigningUnavailable { secret: secret.to_string(), reason }
}

/// Chain keys without an expiry (environment, profile) are read again after this long.
const CHAIN_REFRESH: Duration = Duration::from_secs(15 * 60);
/// Keys with an expiry are replaced this long before it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
/// After the chain found no keys, calls fail at once for this long: an agent cannot turn
/// failures into a loop of IMDS or STS calls.
const CHAIN_RETRY_AFTER: Duration = Duration::from_secs(2);

/// The longest a chain lookup or an `AssumeRole` call may take; calls waiting for it then fail
/// with 503 instead of hanging.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a chain lookup or an STS call, bounded by `LOOKUP_TIMEOUT`.
async fn bounded(
    lookup: impl std::future::Future<Output = Result<Credentials, &'static str>>,
    what: &'static str,
) -> Result<Credentials, &'static str> {
    tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await.unwrap_or(Err(what))
}

/// Keys from the chain or from STS, until `refresh_at`; a failure is kept briefly too.
struct CachedKeys {
    keys: Result<Keys, &'static str>,
    fetched_at: Instant,
    refresh_at: Instant,
    /// For assumed keys: the access key id of the keys that assumed the role, so a rotated root
    /// key assumes the role again.
    root_key_id: String,
}

impl CachedKeys {
    /// Keys good until 5 minutes before their expiry (`CHAIN_REFRESH` for keys without one), or
    /// a failure remembered for `CHAIN_RETRY_AFTER`.
    fn new(keys: Result<Credentials, &'static str>, root_key_id: String) -> CachedKeys {
        let (keys, refresh_at) = match keys {
            Ok(credentials) => {
                let lifetime = credentials
                    .expiry()
                    .and_then(|at| at.duration_since(SystemTime::now()).ok())
                    .map_or(CHAIN_REFRESH, |left| left.saturating_sub(EXPIRY_MARGIN).max(Duration::from_secs(1)));
                (Ok(Keys(credentials)), Instant::now() + lifetime)
            }
            Err(reason) => (Err(reason), Instant::now() + CHAIN_RETRY_AFTER),
        };
        CachedKeys { keys, fetched_at: Instant::now(), refresh_at, root_key_id }
    }

    fn fresh_for(&self, root_key_id: &str) -> bool {
        Instant::now() < self.refresh_at && self.root_key_id == root_key_id
    }
}

/// One `aws-sigv4` secret at run time: its settings and the keys last used.
pub struct Signer {
    pub config: Sigv4Config,
    /// The resolved value the keys were parsed from (held, so its address cannot be reused).
    parsed: Mutex<Option<(Arc<Resolved>, Keys)>>,
    /// Chain keys; an async mutex, so concurrent calls on a cold cache wait for one lookup
    /// (single flight) instead of each walking the chain. It is held across the lookup on
    /// purpose: it guards this secret's keys only, every waiter needs exactly that lookup's
    /// result, and the lookup is bounded by `LOOKUP_TIMEOUT`.
    chain: tokio::sync::Mutex<Option<CachedKeys>>,
    /// The assumed role's keys, single-flight the same way: one `AssumeRole` per expiry.
    assumed: tokio::sync::Mutex<Option<CachedKeys>>,
}

impl Signer {
    pub fn new(config: Sigv4Config) -> Signer {
        Signer {
            config,
            parsed: Mutex::new(None),
            chain: tokio::sync::Mutex::new(None),
            assumed: tokio::sync::Mutex::new(None),
        }
    }

    /// The stand-in for a store value when the keys come from the chain: it carries the name
    /// and source for the audit record, and no value.
    pub fn chain_resolved(&self) -> Option<Arc<Resolved>> {
        (self.config.credentials == KeySource::Chain).then(|| {
            Arc::new(Resolved {
                name: self.config.name.clone(),
                source: CHAIN_SOURCE.to_string(),
                value: SecretString::from(String::new()),
                version: None,
                fallback_from: None,
                minted: None,
            })
        })
    }

    /// When the temporary keys it signs with now expire (the assumed role's, else the chain's),
    /// if it holds such keys; `None` too while a lookup is under way.
    fn keys_expire_at(&self) -> Option<SystemTime> {
        let expiry = |cache: &tokio::sync::Mutex<Option<CachedKeys>>| {
            cache.try_lock().ok().and_then(|cached| cached.as_ref()?.keys.as_ref().ok()?.0.expiry())
        };
        match self.config.assume_role {
            Some(_) => expiry(&self.assumed),
            None => expiry(&self.chain),
        }
    }

    /// The upstream refused a request this signer signed (401/403): keys from the chain or STS
    /// are looked up again on the next call (expired or revoked temporary keys), unless they were
    /// obtained less than `CHAIN_RETRY_AFTER` ago, so refusals cannot become a loop of STS calls.
    /// Keys from a source are re-fetched by the store (`SecretStore::rejected`).
    pub async fn refused(&self) {
        for cache in [&self.chain, &self.assumed] {
            let mut cached = cache.lock().await;
            if cached.as_ref().is_some_and(|c| c.fetched_at.elapsed() >= CHAIN_RETRY_AFTER) {
                *cached = None;
            }
        }
    }

    /// The keys to sign with: parsed from `resolved` (once per value) or from the chain, or the
    /// role's temporary keys those assumed.
    async fn keys(&self, resolved: &Arc<Resolved>, store: &SecretStore) -> Result<Keys, ProxyError> {
        let root = match self.config.credentials {
            KeySource::Source => self.parsed_keys(resolved, store)?,
            KeySource::Chain => self.chain_keys(store).await?,
        };
        match &self.config.assume_role {
            None => Ok(root),
            Some(role) => self.assumed_keys(role, root, store).await,
        }
    }

    async fn assumed_keys(&self, role: &AssumeRole, root: Keys, store: &SecretStore) -> Result<Keys, ProxyError> {
        let mut assumed = self.assumed.lock().await;
        let root_key_id = root.0.access_key_id().to_string();
        if let Some(cached) = assumed.as_ref().filter(|c| c.fresh_for(&root_key_id)) {
            return cached.keys.clone().map_err(|reason| unavailable(&self.config.name, reason));
        }
        let assumed_now = bounded(assume(role, &self.config.region, root), "STS did not answer within 10 s").await;
        let fresh = CachedKeys::new(assumed_now, root_key_id);
        match &fresh.keys {
            Ok(keys) => store.hold_derived(&format!("{}#assumed", self.config.name), keys.scrub_values()),
            Err(reason) => {
                tracing::warn!(secret = %self.config.name, role = %role.arn, reason, "assuming the role failed")
            }
        }
        let keys = fresh.keys.clone();
        *assumed = Some(fresh);
        keys.map_err(|reason| unavailable(&self.config.name, reason))
    }

    fn parsed_keys(&self, resolved: &Arc<Resolved>, store: &SecretStore) -> Result<Keys, ProxyError> {
        let mut parsed = self.parsed.lock().expect("sigv4 keys lock poisoned");
        if let Some((from, keys)) = parsed.as_ref()
            && Arc::ptr_eq(from, resolved)
        {
            return Ok(keys.clone());
        }
        let keys = Keys::parse(&resolved.value).map_err(|reason| unavailable(&self.config.name, reason))?;
        store.hold_derived(&self.config.name, keys.scrub_values());
        *parsed = Some((resolved.clone(), keys.clone()));
        Ok(keys)
    }

    async fn chain_keys(&self, store: &SecretStore) -> Result<Keys, ProxyError> {
        let mut chain = self.chain.lock().await;
        if let Some(cached) = chain.as_ref().filter(|c| c.fresh_for("")) {
            return cached.keys.clone().map_err(|reason| unavailable(&self.config.name, reason));
        }
        let looked_up =
            bounded(load_chain(&self.config.region), "the AWS credential chain did not answer within 10 s").await;
        let fresh = CachedKeys::new(looked_up, String::new());
        match &fresh.keys {
            Ok(keys) => store.hold_derived(&self.config.name, keys.scrub_values()),
            Err(reason) => tracing::warn!(secret = %self.config.name, reason, "the AWS credential chain gave no keys"),
        }
        let keys = fresh.keys.clone();
        *chain = Some(fresh);
        keys.map_err(|reason| unavailable(&self.config.name, reason))
    }

    /// Signs `request` (the outbound request, addressed to the upstream, with what the agent
    /// signed it with already removed) whose whole body is `body`.
    pub async fn sign<B>(
        &self,
        request: http::Request<B>,
        body: &[u8],
        resolved: &Arc<Resolved>,
        store: &SecretStore,
    ) -> Result<http::Request<B>, ProxyError> {
        let keys = self.keys(resolved, store).await?;
        let (mut parts, payload) = request.into_parts();
        sign_parts(&mut parts, body, &keys, &self.config.service, &self.config.region, SystemTime::now())
            .map_err(|reason| unavailable(&self.config.name, reason))?;
        Ok(http::Request::from_parts(parts, payload))
    }
}

#[cfg(feature = "aws")]
async fn load_chain(region: &str) -> Result<Credentials, &'static str> {
    use aws_credential_types::provider::ProvideCredentials;
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(aws_config::Region::new(region.to_string()))
        .build()
        .await;
    // The chain's errors can quote profile files or endpoint answers, so they are not passed on.
    chain.provide_credentials().await.map_err(|_| "the AWS credential chain found no usable keys")
}

/// Assumes `role` with `root` (STS `AssumeRole`, with the session policy if any).
#[cfg(feature = "aws")]
async fn assume(role: &AssumeRole, region: &str, root: Keys) -> Result<Credentials, &'static str> {
    use aws_credential_types::provider::ProvideCredentials;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()))
        .credentials_provider(root.0);
    if let Some(url) = &role.sts_endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let conf = loader.load().await;
    let mut provider = aws_config::sts::AssumeRoleProvider::builder(role.arn.clone())
        .session_name(role.session_name.clone())
        .session_length(role.duration)
        .configure(&conf);
    if let Some(policy) = &role.session_policy {
        provider = provider.policy(policy.clone());
    }
    // STS's errors can quote the request, so they are not passed on.
    provider.build().await.provide_credentials().await.map_err(|_| "STS did not let the keys assume the role")
}

#[cfg(not(feature = "aws"))]
async fn assume(_role: &AssumeRole, _region: &str, _root: Keys) -> Result<Credentials, &'static str> {
    Err("keyward was built without the `aws` feature, so it cannot assume a role")
}

#[cfg(not(feature = "aws"))]
async fn load_chain(_region: &str) -> Result<Credentials, &'static str> {
    Err("keyward was built without the `aws` feature, so the AWS credential chain is unavailable")
}

/// Signs the request head `parts` and `body` for `service` in `region` at `time`: sets
/// `Authorization`, `X-Amz-Date` and, with a session token, `X-Amz-Security-Token`, each marked
/// sensitive. Every header present is signed (except those AWS's signer leaves out, like
/// `User-Agent`), with `Host` taken from the URI as the client will send it.
pub fn sign_parts(
    parts: &mut http::request::Parts,
    body: &[u8],
    keys: &Keys,
    service: &str,
    region: &str,
    time: SystemTime,
) -> Result<(), &'static str> {
    let mut settings = SigningSettings::default();
    if service == "s3" {
        // S3 takes the path as it is and wants the payload hash in a header.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
    }
    let identity = keys.0.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|_| "the signing parameters are incomplete")?
        .into();
    let uri = parts.uri.to_string();
    let mut headers = Vec::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        let value = value.to_str().map_err(|_| "a request header is not visible ASCII, so it cannot be signed")?;
        headers.push((name.as_str(), value));
    }
    let signable = SignableRequest::new(parts.method.as_str(), &uri, headers.into_iter(), SignableBody::Bytes(body))
        .map_err(|_| "the request cannot be signed")?;
    let (instructions, _signature) = sign(signable, &params).map_err(|_| "the request cannot be signed")?.into_parts();
    let (signed_headers, query) = instructions.into_parts();
    debug_assert!(query.is_empty(), "header signing adds no query parameters");
    for header in signed_headers {
        let name = HeaderName::from_bytes(header.name().as_bytes()).map_err(|_| "the signer made a bad header")?;
        let mut value = HeaderValue::from_str(header.value()).map_err(|_| "the signer made a bad header")?;
        // Authorization holds the signature, X-Amz-Security-Token the session token.
        value.set_sensitive(true);
        parts.headers.insert(name, value);
    }
    Ok(())
}

/// One line per `aws-sigv4` secret for `keyward check`: what it signs for and where its keys
/// come from.
pub fn summaries(secrets: &BTreeMap<String, Sigv4Config>, sources: &[super::SourceConfig]) -> Vec<String> {
    secrets
        .values()
        .map(|secret| {
            let keys = match secret.credentials {
                KeySource::Chain => "the AWS credential chain".to_string(),
                KeySource::Source => {
                    let source = sources.iter().find(|s| s.mapping.contains_key(&secret.name));
                    format!("source '{}'", source.map_or("?", |s| s.name.as_str()))
                }
            };
            let role = secret.assume_role.as_ref().map_or(String::new(), |role| {
                let policy = if role.session_policy.is_some() { " with a session policy" } else { "" };
                format!(", assuming {}{policy}", role.arn)
            });
            format!(
                "secret '{}': {KIND}, signs for {} in {} with keys from {keys}{role}",
                secret.name, secret.service, secret.region
            )
        })
        .collect()
}

/// Every `aws-sigv4` secret's signer, by secret name.
#[derive(Default)]
pub struct Signers(HashMap<String, Arc<Signer>>);

impl Signers {
    pub fn new(configs: &BTreeMap<String, Sigv4Config>) -> Signers {
        Signers(configs.iter().map(|(name, config)| (name.clone(), Arc::new(Signer::new(config.clone())))).collect())
    }

    pub fn get(&self, secret: &str) -> Option<&Arc<Signer>> {
        self.0.get(secret)
    }

    /// What `/admin/secrets` shows of secret `name`'s kind: `static`, or the signing settings.
    pub fn describe(&self, name: &str) -> serde_json::Value {
        match self.0.get(name) {
            None => serde_json::json!({ "kind": "static" }),
            Some(signer) => serde_json::json!({
                "kind": KIND,
                "service": signer.config.service,
                "region": signer.config.region,
                "credentials": signer.config.credentials.as_str(),
                "assume_role_arn": signer.config.assume_role.as_ref().map(|r| r.arn.as_str()),
                "keys_expire_at": signer.keys_expire_at().map(crate::timestamp::seconds),
            }),
        }
    }

    /// The chain secrets, which no source lists.
    pub fn chain_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .0
            .values()
            .filter(|s| s.config.credentials == KeySource::Chain)
            .map(|s| s.config.name.as_str())
            .collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn problems(text: &str) -> Vec<String> {
        match crate::config::load_str(text, "k.toml", false) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    const BASE: &str = r#"
[[sources]]
name = "aws-keys"
provider = "env"
mapping = { BEDROCK = "{{BEDROCK}}" }
[[routes]]
name = "bedrock"
prefix = "/bedrock"
upstream = "https://bedrock-runtime.us-east-1.amazonaws.com"
agent_key = { header = "authorization", scheme = "AWS4-HMAC-SHA256" }
[roles.r]
grants = [{ route = "bedrock", secret = "BEDROCK", methods = ["POST"], paths = ["/model/*/invoke"] }]
"#;

    #[test]
    fn secrets_tables_are_checked_with_their_lines() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "complete",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n",
                &[],
            ),
            (
                "unknown kind",
                "[secrets.BEDROCK]\nkind = \"aws-sigv2\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n",
                &[
                    "k.toml:14: secrets.BEDROCK.kind: 'aws-sigv2': expected 'static', 'github-app', 'oauth2-client-credentials', 'gcp-service-account' or 'aws-sigv4'",
                ],
            ),
            (
                "missing and malformed fields",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nregion = \"US East\"\ncredentials = \"instance\"\n",
                &[
                    "k.toml:13: secrets.BEDROCK.service: is required for kind 'aws-sigv4': the AWS signing name, like \"bedrock\"",
                    "k.toml:15: secrets.BEDROCK.region: 'US East' is not an AWS region like \"us-east-1\"",
                    "k.toml:16: secrets.BEDROCK.credentials: 'instance': expected 'source' or 'chain'",
                ],
            ),
            (
                "unknown field",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\nregoin = \"x\"\n",
                &[
                    "k.toml:17: secrets.BEDROCK.regoin: unknown field `regoin`, expected one of `kind`, `service`, `region`, `credentials`, `assume_role_arn`, `session_policy`, `role_session_name`, `session_duration_seconds`, `sts_endpoint_url` (did you mean `region`?)",
                ],
            ),
            (
                "chain, but a source maps the name",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\ncredentials = \"chain\"\n",
                &[
                    "k.toml:17: secrets.BEDROCK.credentials: 'chain' takes the keys from the AWS credential chain, but source 'aws-keys' maps 'BEDROCK' too",
                ],
            ),
            (
                "source, but no source maps the name",
                "[secrets.OTHER]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n",
                &[
                    "k.toml:13: secrets.OTHER.credentials: no source provides a secret named 'OTHER': map it in a source to JSON with access_key_id and secret_access_key, or set credentials = \"chain\"",
                ],
            ),
            (
                "assumed role, complete",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n\
                 assume_role_arn = \"arn:aws:iam::123456789012:role/bedrock-invoke\"\n\
                 session_policy = '{\"Version\":\"2012-10-17\",\"Statement\":[]}'\nrole_session_name = \"agents\"\n\
                 session_duration_seconds = 900\nsts_endpoint_url = \"https://sts.us-east-1.amazonaws.com\"\n",
                &[],
            ),
            (
                "assumed role, malformed",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n\
                 assume_role_arn = \"arn:aws:iam::123456789012:user/me\"\nsession_policy = \"Allow everything\"\n\
                 role_session_name = \"a b\"\nsession_duration_seconds = 60\nsts_endpoint_url = \"http://sts.example.com\"\n",
                &[
                    "k.toml:17: secrets.BEDROCK.assume_role_arn: 'arn:aws:iam::123456789012:user/me' is not a role ARN like \"arn:aws:iam::123456789012:role/name\"",
                    "k.toml:18: secrets.BEDROCK.session_policy: must be an IAM policy document: a JSON object",
                    "k.toml:19: secrets.BEDROCK.role_session_name: 'a b': 2-64 letters, digits or =,.@_-",
                    "k.toml:20: secrets.BEDROCK.session_duration_seconds: must be between 900 and 43200",
                    "k.toml:21: secrets.BEDROCK.sts_endpoint_url: 'http://sts.example.com' must be an https URL (http only on loopback)",
                ],
            ),
            (
                "role fields without a role",
                "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\nsession_policy = \"{}\"\n",
                &["k.toml:17: secrets.BEDROCK.session_policy: is used only with assume_role_arn"],
            ),
        ];
        let mut failed = Vec::new();
        for (case, secrets, expected) in cases {
            let got = problems(&format!("{BASE}{secrets}"));
            if got != *expected {
                failed.push(format!("{case}:\n  expected {expected:#?}\n  got {got:#?}"));
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }

    #[test]
    fn routes_and_grants_must_agree_on_signing() {
        let sigv4 = "[secrets.BEDROCK]\nkind = \"aws-sigv4\"\nservice = \"bedrock\"\nregion = \"us-east-1\"\n";
        let with_inject = BASE.replace(
            "agent_key = { header = \"authorization\", scheme = \"AWS4-HMAC-SHA256\" }",
            "agent_key = { header = \"authorization\", scheme = \"AWS4-HMAC-SHA256\" }\ninject = { header = \"x-api-key\", value = \"{{secret}}\" }",
        );
        assert_eq!(
            problems(&format!("{with_inject}{sigv4}")),
            [
                "k.toml:13: roles.r.grants[0].secret: secret 'BEDROCK' is kind 'aws-sigv4': keyward signs the request with it, so route 'bedrock' must have no inject"
            ]
        );
        let probe = BASE.replace("[roles.r]", "validate = { path = \"/foundation-models\" }\n[roles.r]");
        assert_eq!(
            problems(&format!("{probe}{sigv4}")),
            [
                "k.toml:11: routes[0].validate: a route without an inject signs its requests; rotation probes are not signed, so remove the probe"
            ]
        );
        let chain = BASE.replace("mapping = { BEDROCK = \"{{BEDROCK}}\" }", "mapping = { OTHER = \"{{OTHER}}\" }");
        let config = crate::config::load_str(&format!("{chain}{}credentials = \"chain\"\n", sigv4), "k.toml", false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.sigv4["BEDROCK"].credentials, KeySource::Chain);
        assert_eq!(config.routes[0].inject, crate::config::InjectSpec::Signed);
    }

    #[test]
    fn keys_parse_without_echoing_values() {
        let keys = Keys::parse(&SecretString::from(format!(
            r#"{{"access_key_id":"AKIDEXAMPLE","secret_access_key":"{SECRET}","session_token":"tok-canary-123"}}"#
        )))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.0.access_key_id(), "AKIDEXAMPLE");
        assert_eq!(keys.0.session_token(), Some("tok-canary-123"));
        let scrub = keys.scrub_values();
        assert_eq!(scrub.len(), 2);
        for bad in ["sk-canary-not-json", r#"{"access_key_id":"AKID"}"#, r#"{"secret_access_key":"sk-canary"}"#, "[1]"]
        {
            let reason = Keys::parse(&SecretString::from(bad.to_string())).err().expect(bad);
            assert!(!reason.contains("canary") && !reason.contains("AKID"), "{reason}");
        }
    }

    /// The AWS test suite's `get-vanilla` case (aws-sig-v4-test-suite): same keys, time, region
    /// and service give the published signature.
    #[test]
    fn signing_matches_the_aws_test_suite() {
        let keys = Keys::new("AKIDEXAMPLE", SECRET, None);
        let (mut parts, ()) = http::Request::get("https://example.amazonaws.com/").body(()).unwrap().into_parts();
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160); // 2015-08-30T12:36:00Z
        sign_parts(&mut parts, b"", &keys, "service", "us-east-1", time).unwrap();
        let authorization = parts.headers.get(http::header::AUTHORIZATION).unwrap();
        assert_eq!(
            authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert!(authorization.is_sensitive());
        assert_eq!(parts.headers.get("x-amz-date").unwrap(), "20150830T123600Z");
        assert!(!format!("{:?}", parts.headers).contains("5fa00fa3"), "sensitive values are not printed");
    }

    #[test]
    fn a_session_token_is_sent_and_signed() {
        let keys = Keys::new("ASIAEXAMPLE", SECRET, Some("session-token-value"));
        let (mut parts, ()) = http::Request::post("https://bedrock-runtime.us-east-1.amazonaws.com/model/m/invoke")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts();
        sign_parts(&mut parts, b"{}", &keys, "bedrock", "us-east-1", SystemTime::now()).unwrap();
        let token = parts.headers.get("x-amz-security-token").unwrap();
        assert_eq!(token, "session-token-value");
        assert!(token.is_sensitive());
        let authorization = parts.headers.get(http::header::AUTHORIZATION).unwrap().to_str().unwrap();
        assert!(
            authorization.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token,"),
            "{authorization}"
        );
    }
}
