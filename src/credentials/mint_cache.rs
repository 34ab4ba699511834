//! The mint cache: a minted token per (secret, scope), kept until its kind's margin before expiry;
//! one mint at a time per key (single-flight, run as its own task so it finishes and fills the
//! cache even if every waiter gives up); a short, growing backoff after a failed mint, so a down
//! or refusing mint endpoint is never called in a tight loop; one re-mint when the upstream
//! answers 401 to a token. Every token goes into the response scrubber before anyone can use it.
//!
//! Each replica mints its own tokens, also with Redis configured: see docs/credentials.md.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use secrecy::{ExposeSecret, SecretString};

use super::KindConfig;
use super::Resolved;
use super::held::Held;
use super::kind::{MintError, MintRequest, MintScope};
use crate::error::ProxyError;
use crate::forward::Forwarder;
use crate::metrics::{Metrics, MintLabels};
use crate::policy::Upstream;

/// The first wait after a failed mint; it doubles with each failure in a row, up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A 401 re-mints a token only if it is at least this old: an agent cannot turn upstream 401s
/// into a stream of mints.
const MIN_REMINT_AGE: Duration = Duration::from_secs(1);
/// Upper bound on one mint, whatever the forward timeouts.
const MINT_TIMEOUT: Duration = Duration::from_secs(30);
/// A token this close to its expiry is not used even as a stand-in while minting fails.
const EXPIRY_SAFETY: Duration = Duration::from_secs(10);

/// Where a minted credential came from, for the audit record and the 401 retry. Holds no value.
#[derive(Debug, Clone)]
pub struct MintedFrom {
    pub kind: &'static str,
    pub scope: Arc<MintScope>,
    pub expires_at: SystemTime,
    key: String,
}

/// A token in the cache. Deliberately not `Debug`.
struct Token {
    value: SecretString,
    expires_at: SystemTime,
    /// When the next caller mints a new one instead.
    refresh_at: Instant,
    minted_at: Instant,
    /// The digest of the root it was minted from: a new root (a rotated key) mints afresh.
    root: RootDigest,
}

impl Token {
    /// Still usable as a stand-in while a new mint fails.
    fn usable(&self) -> bool {
        SystemTime::now() + EXPIRY_SAFETY < self.expires_at
    }
}

type SharedMint = Shared<BoxFuture<'static, Result<Arc<Token>, MintError>>>;

struct Failure {
    error: MintError,
    until: Instant,
    streak: u32,
    /// A new root is tried at once, whatever the backoff of the old one.
    root: RootDigest,
}

/// SHA-256 of a root value, to notice a rotated root without keeping a copy of it.
type RootDigest = [u8; 32];

fn digest(root: &SecretString) -> RootDigest {
    use sha2::Digest;
    sha2::Sha256::digest(root.expose_secret().as_bytes()).into()
}

#[derive(Default)]
struct Slot {
    token: Option<Arc<Token>>,
    inflight: Option<(u64, SharedMint)>,
    generation: u64,
    failure: Option<Failure>,
    /// The scope, for the admin API.
    scope: Arc<MintScope>,
}

/// One minted secret: its kind and a slot per scope it was minted for (bounded by the grants).
struct MintedSecret {
    name: String,
    kind: KindConfig,
    slots: Mutex<HashMap<String, Slot>>,
    held: Arc<Held>,
    metrics: Arc<Metrics>,
}

/// What the admin API shows of one minted token. Never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MintStatus {
    pub scope: Arc<MintScope>,
    /// The current token's expiry, or none when none is held.
    pub expires_at: Option<String>,
    /// Set while mints are backing off after a failure: the mint endpoint's status, if any.
    pub failing: Option<String>,
}

/// Every minted secret, by name.
#[derive(Default)]
pub struct Minter {
    secrets: HashMap<String, Arc<MintedSecret>>,
}

impl Minter {
    pub(super) fn new(kinds: &BTreeMap<String, KindConfig>, held: Arc<Held>, metrics: Arc<Metrics>) -> Minter {
        let secrets = kinds
            .iter()
            .filter(|(_, kind)| kind.mints())
            .map(|(name, kind)| {
                let secret = MintedSecret {
                    name: name.clone(),
                    kind: kind.clone(),
                    slots: Mutex::default(),
                    held: held.clone(),
                    metrics: metrics.clone(),
                };
                (name.clone(), Arc::new(secret))
            })
            .collect();
        Minter { secrets }
    }

    /// The minter for a reloaded config: a secret whose kind settings are unchanged keeps its
    /// tokens.
    pub(super) fn reload(
        &self,
        kinds: &BTreeMap<String, KindConfig>,
        held: Arc<Held>,
        metrics: Arc<Metrics>,
    ) -> Minter {
        let mut fresh = Minter::new(kinds, held, metrics);
        for (name, secret) in fresh.secrets.iter_mut() {
            if let Some(old) = self.secrets.get(name).filter(|old| old.kind == secret.kind) {
                *secret = old.clone();
            }
        }
        fresh
    }

    /// The credential to inject for `root` (a resolved secret): `root` itself for a static
    /// secret, else a token minted from it for `scope` on `upstream`, from the cache if it has one.
    pub async fn credential(
        &self,
        http: &Forwarder,
        root: Arc<Resolved>,
        upstream: &Upstream,
        scope: &Arc<MintScope>,
    ) -> Result<Arc<Resolved>, ProxyError> {
        let Some(secret) = self.secrets.get(&root.name) else { return Ok(root) };
        let key = secret.key(upstream, scope);
        let root_digest = digest(&root.value);
        let mint = {
            let mut slots = secret.slots.lock().expect("mint cache lock poisoned");
            let slot = slots.entry(key.clone()).or_insert_with(|| Slot { scope: scope.clone(), ..Slot::default() });
            let now = Instant::now();
            if let Some(token) = slot.token.as_ref().filter(|t| now < t.refresh_at && t.root == root_digest) {
                return Ok(secret.resolved(&root, &key, scope, token));
            }
            if let Some(failure) = slot.failure.as_ref().filter(|f| now < f.until && f.root == root_digest) {
                if let Some(token) = slot.token.as_ref().filter(|t| t.usable()) {
                    return Ok(secret.resolved(&root, &key, scope, token));
                }
                return Err(secret.failed(&failure.error, failure.until));
            }
            secret.join_or_start(slot, http, &root, upstream, scope, &key)
        };
        self.finish(secret, &root, &key, scope, mint.await)
    }

    /// The upstream refused `used`, a minted token, with `status`. On a 401 the token leaves the
    /// cache and one new token is minted (or the one another request minted meanwhile is
    /// returned); `None` when there is nothing else to try.
    pub async fn rejected(
        &self,
        http: &Forwarder,
        root: Arc<Resolved>,
        used: &Resolved,
        upstream: &Upstream,
        status: u16,
    ) -> Option<Arc<Resolved>> {
        let from = used.minted.as_ref()?;
        let secret = self.secrets.get(&used.name)?;
        if status != 401 {
            return None;
        }
        let scope = from.scope.clone();
        let mint = {
            let mut slots = secret.slots.lock().expect("mint cache lock poisoned");
            let slot = slots.get_mut(&from.key)?;
            match slot.token.clone() {
                Some(token) if !same(&token.value, &used.value) => {
                    // Another request has re-minted already.
                    return Some(secret.resolved(&root, &from.key, &scope, &token));
                }
                Some(token) if token.minted_at.elapsed() < MIN_REMINT_AGE => return None,
                Some(_) => {
                    tracing::info!(secret = %secret.name, kind = secret.kind.kind(),
                        "the upstream refused a minted token (401); minting a new one");
                    slot.token = None;
                }
                None => {}
            }
            if slot.failure.as_ref().is_some_and(|f| Instant::now() < f.until) {
                return None;
            }
            secret.join_or_start(slot, http, &root, upstream, &scope, &from.key)
        };
        self.finish(secret, &root, &from.key, &scope, mint.await).ok()
    }

    fn finish(
        &self,
        secret: &MintedSecret,
        root: &Resolved,
        key: &str,
        scope: &Arc<MintScope>,
        minted: Result<Arc<Token>, MintError>,
    ) -> Result<Arc<Resolved>, ProxyError> {
        match minted {
            Ok(token) => Ok(secret.resolved(root, key, scope, &token)),
            Err(error) => {
                let slots = secret.slots.lock().expect("mint cache lock poisoned");
                let slot = slots.get(key);
                if let Some(token) = slot.and_then(|s| s.token.as_ref()).filter(|t| t.usable()) {
                    tracing::warn!(secret = %secret.name, error = %error, "minting failed; the current token is still valid");
                    return Ok(secret.resolved(root, key, scope, token));
                }
                let until = slot.and_then(|s| s.failure.as_ref()).map_or_else(Instant::now, |f| f.until);
                Err(secret.failed(&error, until))
            }
        }
    }

    /// For a rotation probe of a minted secret: a token minted from the candidate root `root`,
    /// outside the cache (the candidate is not current yet). `None` for a static secret, whose
    /// candidate value is what the probe sends. The token joins the scrubber like any other.
    pub async fn probe_token(
        &self,
        http: &Forwarder,
        secret: &str,
        root: &SecretString,
        upstream: &Upstream,
        scope: &Arc<MintScope>,
    ) -> Option<Result<SecretString, MintError>> {
        let minted = self.secrets.get(secret)?;
        let request = MintRequest {
            secret: secret.to_string(),
            root: root.clone(),
            upstream: upstream.clone(),
            scope: scope.clone(),
        };
        let result = match tokio::time::timeout(MINT_TIMEOUT, minted.kind.mint(http, &request)).await {
            Ok(result) => result,
            Err(_) => Err(MintError::new(None, "the mint took too long")),
        };
        Some(result.map(|token| {
            minted.held.minted(&format!("{secret}#probe"), secret, &token.token);
            token.token
        }))
    }

    /// Every minted token held for `secret`, for the admin API; `None` for a static secret.
    pub fn status(&self, secret: &str) -> Option<Vec<MintStatus>> {
        let secret = self.secrets.get(secret)?;
        let slots = secret.slots.lock().expect("mint cache lock poisoned");
        let mut out: Vec<MintStatus> = slots
            .values()
            .map(|slot| MintStatus {
                scope: slot.scope.clone(),
                expires_at: slot.token.as_ref().map(|t| crate::timestamp::seconds(t.expires_at)),
                failing: slot.failure.as_ref().filter(|f| Instant::now() < f.until).map(|f| f.error.to_string()),
            })
            .collect();
        out.sort_by(|a, b| a.scope.cmp(&b.scope));
        Some(out)
    }
}

fn same(a: &SecretString, b: &SecretString) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a.expose_secret().as_bytes(), b.expose_secret().as_bytes()))
}

impl MintedSecret {
    /// The cache key: the scope, and for kinds that mint on the route's upstream, that upstream.
    fn key(&self, upstream: &Upstream, scope: &MintScope) -> String {
        if self.kind.grant_scope() {
            let scope = serde_json::to_string(scope).expect("a scope serializes");
            format!("{upstream} {scope}")
        } else {
            String::new()
        }
    }

    fn resolved(&self, root: &Resolved, key: &str, scope: &Arc<MintScope>, token: &Token) -> Arc<Resolved> {
        Arc::new(Resolved {
            name: root.name.clone(),
            source: root.source.clone(),
            value: token.value.clone(),
            version: root.version.clone(),
            fallback_from: root.fallback_from.clone(),
            minted: Some(Arc::new(MintedFrom {
                kind: self.kind.kind(),
                scope: scope.clone(),
                expires_at: token.expires_at,
                key: key.to_string(),
            })),
        })
    }

    fn failed(&self, error: &MintError, until: Instant) -> ProxyError {
        ProxyError::MintFailed {
            secret: self.name.clone(),
            kind: self.kind.kind(),
            status: error.status,
            reason: error.reason.clone(),
            retry_after: until.saturating_duration_since(Instant::now()),
        }
    }

    /// Joins the key's in-flight mint or starts one, as its own task.
    fn join_or_start(
        self: &Arc<Self>,
        slot: &mut Slot,
        http: &Forwarder,
        root: &Resolved,
        upstream: &Upstream,
        scope: &Arc<MintScope>,
        key: &str,
    ) -> SharedMint {
        if let Some((_, inflight)) = &slot.inflight {
            return inflight.clone();
        }
        slot.generation += 1;
        let generation = slot.generation;
        let request = MintRequest {
            secret: self.name.clone(),
            root: root.value.clone(),
            upstream: upstream.clone(),
            scope: scope.clone(),
        };
        let root_digest = digest(&root.value);
        let (secret, http, key) = (self.clone(), http.clone(), key.to_string());
        let (after_panic, key_after_panic) = (self.clone(), key.clone());
        let task = tokio::spawn(async move {
            let minted = match tokio::time::timeout(MINT_TIMEOUT, secret.kind.mint(&http, &request)).await {
                Ok(minted) => minted,
                Err(_) => Err(MintError::new(None, "the mint took too long")),
            };
            secret.store(&key, generation, root_digest, minted)
        });
        // A mint task that panicked is a failure like any other: it clears the in-flight mint
        // and starts the backoff, so later calls neither join a dead mint nor retry in a loop.
        let mint: BoxFuture<'static, _> = Box::pin(async move {
            match task.await {
                Ok(stored) => stored,
                Err(_) => after_panic.store(
                    &key_after_panic,
                    generation,
                    root_digest,
                    Err(MintError::new(None, "the mint task failed")),
                ),
            }
        });
        let shared = mint.shared();
        slot.inflight = Some((generation, shared.clone()));
        shared
    }

    /// Records a mint's result: a token goes into the scrubber, then the cache; a failure starts
    /// (or lengthens) the backoff.
    fn store(
        &self,
        key: &str,
        generation: u64,
        root: RootDigest,
        minted: Result<super::kind::Minted, MintError>,
    ) -> Result<Arc<Token>, MintError> {
        let minted = minted.inspect_err(|error| {
            tracing::error!(secret = %self.name, kind = self.kind.kind(), error = %error, "minting a credential failed");
        });
        let result = if minted.is_ok() { "ok" } else { "error" };
        let labels = MintLabels { secret: self.name.clone(), kind: self.kind.kind(), result };
        self.metrics.credential_mints.get_or_create(&labels).inc();
        if let Ok(minted) = &minted {
            // Before any waiter sees it, so no response can outrun its scrubber.
            self.held.minted(&format!("{}#{key}", self.name), &self.name, &minted.token);
        }
        let mut slots = self.slots.lock().expect("mint cache lock poisoned");
        let slot = slots.entry(key.to_string()).or_default();
        if slot.inflight.as_ref().is_some_and(|(g, _)| *g == generation) {
            slot.inflight = None;
        }
        match minted {
            Ok(mut minted) => {
                let now = Instant::now();
                // The endpoint's word on expiry is capped, so no answer can keep a token forever
                // or put its expiry past what timestamps can be written for.
                minted.expires_at = minted.expires_at.min(SystemTime::now() + super::kind::MAX_TOKEN_LIFETIME);
                let lifetime = minted.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
                // A token that lives shorter than twice the margin is renewed at half its life.
                let margin = self.kind.refresh_margin().min(lifetime / 2);
                let token = Arc::new(Token {
                    value: minted.token,
                    expires_at: minted.expires_at,
                    refresh_at: now + lifetime.saturating_sub(margin),
                    minted_at: now,
                    root,
                });
                tracing::info!(secret = %self.name, kind = self.kind.kind(),
                    expires_at = %crate::timestamp::seconds(token.expires_at), "minted a credential");
                slot.token = Some(token.clone());
                slot.failure = None;
                Ok(token)
            }
            Err(error) => {
                let streak = slot.failure.as_ref().filter(|f| f.root == root).map_or(1, |f| f.streak + 1);
                let backoff = FIRST_BACKOFF.saturating_mul(1 << (streak - 1).min(5)).min(MAX_BACKOFF);
                slot.failure = Some(Failure { error: error.clone(), until: Instant::now() + backoff, streak, root });
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    use super::*;
    use crate::credentials::oauth2::{ClientAuth, OAuth2Config};

    /// An OAuth2 token endpoint on loopback that counts its calls, answers `fail` while it is
    /// non-zero, and takes 100 ms per token.
    struct Endpoint {
        calls: AtomicUsize,
        fail: AtomicU16,
    }

    async fn endpoint() -> (Arc<Endpoint>, String) {
        let state = Arc::new(Endpoint { calls: AtomicUsize::new(0), fail: AtomicU16::new(0) });
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move || {
                let state = shared.clone();
                async move {
                    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match state.fail.load(Ordering::SeqCst) {
                        0 => (
                            http::StatusCode::OK,
                            format!(r#"{{"access_token":"minted-token-{n:04}","expires_in":3600}}"#),
                        ),
                        status => (http::StatusCode::from_u16(status).unwrap(), "{}".to_string()),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (state, url)
    }

    fn minter(url: &str, held: Arc<Held>) -> Minter {
        let kind = KindConfig::OAuth2(OAuth2Config {
            token_url: url.to_string(),
            client_id: "c".into(),
            scope: None,
            audience: None,
            client_auth: ClientAuth::Basic,
            refresh_margin: Duration::from_secs(60),
        });
        Minter::new(&[("S".to_string(), kind)].into(), held, Arc::new(Metrics::new()))
    }

    fn forwarder() -> Forwarder {
        Forwarder::new(&crate::config::ForwardConfig {
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(10),
            max_request_body_bytes: 1 << 20,
            pool_idle_timeout: Duration::from_secs(5),
            pool_max_idle_per_host: 4,
            retry_body_bytes: 0,
        })
    }

    fn root() -> Arc<Resolved> {
        Arc::new(Resolved {
            name: "S".into(),
            source: "src".into(),
            value: SecretString::from("client-secret-0000"),
            version: None,
            fallback_from: None,
            minted: None,
        })
    }

    fn upstream() -> Upstream {
        Upstream {
            scheme: http::uri::Scheme::HTTP,
            authority: "127.0.0.1:9".parse().unwrap(),
            base_path: String::new(),
        }
    }

    #[tokio::test]
    async fn concurrent_cold_calls_mint_once_and_tokens_are_scrubbed() {
        let (endpoint, url) = endpoint().await;
        let held = Arc::new(Held::new());
        let minter = Arc::new(minter(&url, held.clone()));
        let http = forwarder();
        let scope = Arc::new(MintScope::default());
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let (minter, http, scope) = (minter.clone(), http.clone(), scope.clone());
                tokio::spawn(async move { minter.credential(&http, root(), &upstream(), &scope).await })
            })
            .collect();
        for call in calls {
            let credential = call.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(credential.value.expose_secret(), "minted-token-0001");
            assert_eq!(credential.minted.as_ref().unwrap().kind, "oauth2-client-credentials");
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
        let scrubbed = held.scrubber().load().scrub(b"x minted-token-0001 y").into_owned();
        assert_eq!(String::from_utf8_lossy(&scrubbed), "x [REDACTED:S]***** y");
        // A static secret is passed through untouched.
        let other = Arc::new(Resolved {
            name: "T".into(),
            source: "src".into(),
            value: SecretString::from("client-secret-0000"),
            version: None,
            fallback_from: None,
            minted: None,
        });
        let same = minter.credential(&http, other, &upstream(), &scope).await.unwrap();
        assert!(same.minted.is_none() && same.value.expose_secret() == "client-secret-0000");
    }

    #[tokio::test]
    async fn a_failed_mint_backs_off_and_a_401_remints_once() {
        let (endpoint, url) = endpoint().await;
        let minter = minter(&url, Arc::new(Held::new()));
        let http = forwarder();
        let scope = Arc::new(MintScope::default());
        endpoint.fail.store(503, Ordering::SeqCst);
        for _ in 0..5 {
            match minter.credential(&http, root(), &upstream(), &scope).await {
                Err(ProxyError::MintFailed { status, retry_after, .. }) => {
                    assert_eq!(status, Some(503));
                    assert!(retry_after <= FIRST_BACKOFF);
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("minted while the endpoint refuses"),
            }
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1, "calls during the backoff do not mint");
        let failing = minter.status("S").unwrap();
        assert!(failing[0].failing.as_deref().is_some_and(|f| f.contains("503")), "{failing:?}");
        endpoint.fail.store(0, Ordering::SeqCst);
        tokio::time::sleep(FIRST_BACKOFF).await;
        let used = minter.credential(&http, root(), &upstream(), &scope).await.unwrap();
        assert_eq!(used.value.expose_secret(), "minted-token-0002");

        // Refused too soon after its mint: no re-mint.
        assert!(minter.rejected(&http, root(), &used, &upstream(), 401).await.is_none());
        tokio::time::sleep(MIN_REMINT_AGE).await;
        assert!(minter.rejected(&http, root(), &used, &upstream(), 403).await.is_none(), "a 403 never re-mints");
        let upstream = upstream();
        let (first, second) = tokio::join!(
            minter.rejected(&http, root(), &used, &upstream, 401),
            minter.rejected(&http, root(), &used, &upstream, 401)
        );
        assert_eq!(first.unwrap().value.expose_secret(), "minted-token-0003");
        assert_eq!(second.unwrap().value.expose_secret(), "minted-token-0003");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3, "two refusals of one token re-mint once");
        let status = minter.status("S").unwrap();
        assert!(status[0].expires_at.is_some() && status[0].failing.is_none(), "{status:?}");
    }

    #[tokio::test]
    async fn a_new_root_mints_afresh_even_during_a_backoff() {
        let (endpoint, url) = endpoint().await;
        let minter = minter(&url, Arc::new(Held::new()));
        let http = forwarder();
        let scope = Arc::new(MintScope::default());
        minter.credential(&http, root(), &upstream(), &scope).await.unwrap();
        let rotated = || {
            Arc::new(Resolved {
                name: "S".into(),
                source: "src".into(),
                value: SecretString::from("client-secret-0001"),
                version: Some("v2".into()),
                fallback_from: None,
                minted: None,
            })
        };
        let fresh = minter.credential(&http, rotated(), &upstream(), &scope).await.unwrap();
        assert_eq!(fresh.value.expose_secret(), "minted-token-0002", "a rotated root mints at once");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        // Minting with the old root fails and backs off; the new root is not held back by it.
        endpoint.fail.store(401, Ordering::SeqCst);
        let stale = Arc::new(Resolved {
            name: "S".into(),
            source: "src".into(),
            value: SecretString::from("client-secret-9999"),
            version: None,
            fallback_from: None,
            minted: None,
        });
        let refused = minter.credential(&http, stale.clone(), &upstream(), &scope).await;
        assert!(refused.is_ok(), "the still-valid token stands in while minting fails");
        // The current root's token is served: another root's failure does not hold it back.
        let again = minter.credential(&http, rotated(), &upstream(), &scope).await.unwrap();
        assert_eq!(again.value.expose_secret(), "minted-token-0002");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_reload_keeps_the_tokens_of_an_unchanged_kind() {
        let (endpoint, url) = endpoint().await;
        let held = Arc::new(Held::new());
        let minter = minter(&url, held.clone());
        let http = forwarder();
        let scope = Arc::new(MintScope::default());
        minter.credential(&http, root(), &upstream(), &scope).await.unwrap();
        let kinds: BTreeMap<String, KindConfig> =
            minter.secrets.iter().map(|(name, secret)| (name.clone(), secret.kind.clone())).collect();
        let reloaded = minter.reload(&kinds, held.clone(), Arc::new(Metrics::new()));
        reloaded.credential(&http, root(), &upstream(), &scope).await.unwrap();
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1);
        let mut changed = kinds.clone();
        if let Some(KindConfig::OAuth2(config)) = changed.get_mut("S") {
            config.scope = Some("more".into());
        }
        let reloaded = reloaded.reload(&changed, held, Arc::new(Metrics::new()));
        reloaded.credential(&http, root(), &upstream(), &scope).await.unwrap();
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2, "a changed kind mints afresh");
    }
}
