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
use crate::config::Upstream;
use crate::error::ProxyError;
use crate::forward::Forwarder;

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
    pub(super) fn new(kinds: &BTreeMap<String, KindConfig>, held: Arc<Held>) -> Minter {
        let secrets = kinds
            .iter()
            .map(|(name, kind)| {
                let secret = MintedSecret {
                    name: name.clone(),
                    kind: kind.clone(),
                    slots: Mutex::default(),
                    held: held.clone(),
                };
                (name.clone(), Arc::new(secret))
            })
            .collect();
        Minter { secrets }
    }

    /// The minter for a reloaded config: a secret whose kind settings are unchanged keeps its
    /// tokens.
    pub(super) fn reload(&self, kinds: &BTreeMap<String, KindConfig>, held: Arc<Held>) -> Minter {
        let mut fresh = Minter::new(kinds, held);
        for (name, secret) in fresh.secrets.iter_mut() {
            if let Some(old) = self.secrets.get(name).filter(|old| old.kind == secret.kind) {
                *secret = old.clone();
            }
        }
        fresh
    }

    /// The secret's kind: `static` unless it is minted.
    pub fn kind_of(&self, secret: &str) -> &'static str {
        self.secrets.get(secret).map_or(super::kind::STATIC, |s| s.kind.kind())
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
        let mint = {
            let mut slots = secret.slots.lock().expect("mint cache lock poisoned");
            let slot = slots.entry(key.clone()).or_insert_with(|| Slot { scope: scope.clone(), ..Slot::default() });
            let now = Instant::now();
            if let Some(token) = slot.token.as_ref().filter(|t| now < t.refresh_at) {
                return Ok(secret.resolved(&root, &key, scope, token));
            }
            if let Some(failure) = slot.failure.as_ref().filter(|f| now < f.until) {
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
        let (secret, http, key) = (self.clone(), http.clone(), key.to_string());
        let task = tokio::spawn(async move {
            let minted = match tokio::time::timeout(MINT_TIMEOUT, secret.kind.mint(&http, &request)).await {
                Ok(minted) => minted,
                Err(_) => Err(MintError::new(None, "the mint took too long")),
            };
            secret.store(&key, generation, minted)
        });
        let mint: BoxFuture<'static, _> =
            Box::pin(async move { task.await.unwrap_or_else(|_| Err(MintError::new(None, "the mint task failed"))) });
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
        minted: Result<super::kind::Minted, MintError>,
    ) -> Result<Arc<Token>, MintError> {
        let minted = minted.inspect_err(|error| {
            tracing::error!(secret = %self.name, kind = self.kind.kind(), error = %error, "minting a credential failed");
        });
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
            Ok(minted) => {
                let now = Instant::now();
                let lifetime = minted.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
                // A token that lives shorter than twice the margin is renewed at half its life.
                let margin = self.kind.refresh_margin().min(lifetime / 2);
                let token = Arc::new(Token {
                    value: minted.token,
                    expires_at: minted.expires_at,
                    refresh_at: now + lifetime.saturating_sub(margin),
                    minted_at: now,
                });
                tracing::info!(secret = %self.name, kind = self.kind.kind(),
                    expires_at = %crate::timestamp::seconds(token.expires_at), "minted a credential");
                slot.token = Some(token.clone());
                slot.failure = None;
                Ok(token)
            }
            Err(error) => {
                let streak = slot.failure.as_ref().map_or(1, |f| f.streak + 1);
                let backoff = FIRST_BACKOFF.saturating_mul(1 << (streak - 1).min(5)).min(MAX_BACKOFF);
                slot.failure = Some(Failure { error: error.clone(), until: Instant::now() + backoff, streak });
                Err(error)
            }
        }
    }
}
