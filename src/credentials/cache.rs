//! The secret cache: TTL and size bound per source, single-flight fetches, refresh ahead of
//! expiry, optional stale serving, fallback sources, and the swap and grace window of a rotation.
//!
//! The lock guards only map operations and is never held across a fetch: concurrent misses on a
//! source join one shared in-flight fetch, and the fetch itself stores its result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use secrecy::{ExposeSecret, SecretString};

use super::held::{Adopt, Held};
use super::{CachePolicy, SourceConfig};
use super::{Fetched, SecretProvider, StoreError, build_provider};
use crate::error::ProxyError;
use crate::metrics::{FetchLabels, Metrics, SourceLabel};
use crate::scrub::Scrubber;

/// A resolved credential, ready to inject. Deliberately not `Debug`.
pub struct Resolved {
    pub name: String,
    pub source: String,
    pub value: SecretString,
    pub version: Option<String>,
    /// Set when `source` stands in for this source (its `fallback_to`).
    pub fallback_from: Option<String>,
    /// Set when `value` is a token minted from the secret (its kind is not `static`).
    pub minted: Option<Arc<super::MintedFrom>>,
}

impl Resolved {
    fn same_value(&self, other: &Resolved) -> bool {
        bool::from(subtle::ConstantTimeEq::ct_eq(
            self.value.expose_secret().as_bytes(),
            other.value.expose_secret().as_bytes(),
        ))
    }
}

/// What to do after the upstream refused a credential (401 or 403).
pub enum Rejection {
    /// The store has a newer value: retry with it.
    Newer(Arc<Resolved>),
    /// A rotation's previous version, inside its grace period: retry with it.
    Previous(Arc<Resolved>),
    /// The source's `fallback_to`: retry with its value.
    Fallback(Arc<Resolved>),
    /// Nothing else to try: the upstream's answer stands.
    Nothing,
}

type SharedFetch = Shared<BoxFuture<'static, Result<Arc<Fetched>, StoreError>>>;

struct Entry {
    value: Arc<Resolved>,
    fetched_at: Instant,
    fetched_wall: SystemTime,
    last_used: Instant,
}

/// What the admin API shows about one secret. Never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretStatus {
    pub name: String,
    pub source: String,
    pub version: Option<String>,
    pub fetched_at: Option<String>,
    pub expires_at: Option<String>,
    pub age_seconds: Option<u64>,
    pub cached: bool,
}

#[derive(Default)]
struct SlotState {
    entries: HashMap<String, Entry>,
    inflight: Option<(u64, SharedFetch)>,
    generation: u64,
    /// Bumped by a rotation's swap: fetches started before it do not overwrite its values.
    epoch: u64,
    /// The last successful fetch, for rotation to compare a candidate against.
    last: Option<Arc<Fetched>>,
    last_fetch_at: Option<Instant>,
    /// The version a rotation replaced, usable only where the new one is refused, until `until`.
    previous: Option<Previous>,
    /// A pinned source's change was logged (once per change).
    change_noticed: bool,
}

fn same_values(a: &Fetched, b: &Fetched) -> bool {
    a.values.len() == b.values.len()
        && a.values.iter().all(|(name, v)| b.values.get(name).is_some_and(|w| w.expose_secret() == v.expose_secret()))
}

struct Previous {
    values: HashMap<String, Arc<Resolved>>,
    until: Instant,
    epoch: u64,
}

/// Refresh a used entry in the background once this much of its TTL has passed.
const REFRESH_AHEAD_AT: f64 = 0.9;

/// A refused credential triggers at most one re-fetch per source in this long: an agent cannot
/// turn upstream 401s into a flood of secret-store calls.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(2);

/// Upper bound on one fetch; providers also have their own, shorter timeouts.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Clears the in-flight marker when a fetch task ends in any way, including a panic.
struct ClearInflight {
    slot: Arc<Slot>,
    generation: u64,
}

impl Drop for ClearInflight {
    fn drop(&mut self) {
        if let Ok(mut state) = self.slot.state.lock()
            && state.inflight.as_ref().is_some_and(|(g, _)| *g == self.generation)
        {
            state.inflight = None;
        }
    }
}

struct Slot {
    name: String,
    config: SourceConfig,
    /// A rotating source without version stages (file, vault): a changed value is taken only by
    /// a rotation, after its probes pass, never by a plain re-fetch.
    pinned: bool,
    provider: Arc<dyn SecretProvider>,
    policy: CachePolicy,
    state: Mutex<SlotState>,
    reached: AtomicBool,
    metrics: Arc<Metrics>,
    held: Arc<Held>,
}

/// Every configured source, and which source provides each secret name.
pub struct SecretStore {
    slots: Vec<Arc<Slot>>,
    owner: HashMap<String, usize>,
    /// Each slot's `fallback_to`, by index.
    fallback: Vec<Option<usize>>,
    held: Arc<Held>,
    /// For the minter's counters.
    metrics: Arc<Metrics>,
}

impl SecretStore {
    pub fn new(sources: &[SourceConfig], metrics: Arc<Metrics>) -> SecretStore {
        let providers = sources.iter().map(build_provider).collect();
        Self::with_providers(sources, providers, metrics)
    }

    /// Builds a store over given providers (one per source, same order); tests use counting ones.
    pub fn with_providers(
        sources: &[SourceConfig],
        providers: Vec<Arc<dyn SecretProvider>>,
        metrics: Arc<Metrics>,
    ) -> SecretStore {
        let held = Arc::new(Held::new());
        let slots = sources
            .iter()
            .zip(providers)
            .map(|(source, provider)| Slot::new(source, provider, metrics.clone(), held.clone()))
            .collect();
        Self::assemble(sources, slots, held, metrics)
    }

    /// The store for a reloaded config: a source whose store, mapping and cache are unchanged
    /// keeps its slot, so its cached values, in-flight fetch and rotation grace carry over.
    pub fn reload(&self, sources: &[SourceConfig], metrics: Arc<Metrics>) -> SecretStore {
        let slots = sources
            .iter()
            .map(|source| match self.slots.iter().find(|slot| slot.config.same_store(source)) {
                Some(slot) => slot.clone(),
                None => Slot::new(source, build_provider(source), metrics.clone(), self.held.clone()),
            })
            .collect();
        Self::assemble(sources, slots, self.held.clone(), metrics)
    }

    /// How many of `sources` a reload of this store keeps cached.
    pub fn kept_by_reload(&self, sources: &[SourceConfig]) -> usize {
        sources.iter().filter(|source| self.slots.iter().any(|slot| slot.config.same_store(source))).count()
    }

    fn assemble(
        sources: &[SourceConfig],
        slots: Vec<Arc<Slot>>,
        held: Arc<Held>,
        metrics: Arc<Metrics>,
    ) -> SecretStore {
        let fallback_targets: Vec<&str> = sources.iter().filter_map(|s| s.fallback_to.as_deref()).collect();
        let mut owner = HashMap::new();
        for (i, source) in sources.iter().enumerate() {
            for name in source.mapping.keys() {
                // A name a fallback target shares with its primary belongs to the primary.
                let taken = owner.contains_key(name);
                if !taken || !fallback_targets.contains(&source.name.as_str()) {
                    owner.insert(name.clone(), i);
                }
            }
        }
        let fallback = sources
            .iter()
            .map(|s| s.fallback_to.as_ref().and_then(|to| sources.iter().position(|o| &o.name == to)))
            .collect();
        SecretStore { slots, owner, fallback, held, metrics }
    }

    fn slot_index(&self, source: &str) -> Option<usize> {
        self.slots.iter().position(|slot| slot.name == source)
    }

    /// The source that provides secret `name`.
    pub fn source_of(&self, name: &str) -> Option<&str> {
        self.owner.get(name).map(|i| self.slots[*i].name.as_str())
    }

    /// The names source `source` provides.
    pub fn names_of(&self, source: &str) -> Vec<String> {
        self.slot_index(source).map(|i| self.slots[i].config.mapping.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn provider(&self, source: &str) -> Option<Arc<dyn SecretProvider>> {
        self.slot_index(source).map(|i| self.slots[i].provider.clone())
    }

    /// What the source holds now (fetching it if nothing is cached), for rotation to compare to.
    pub async fn current(&self, source: &str) -> Result<Arc<Fetched>, StoreError> {
        let Some(i) = self.slot_index(source) else {
            return Err(StoreError::Unsupported(format!("no source is named '{source}'")));
        };
        let slot = &self.slots[i];
        if let Some(last) = slot.state.lock().expect("secret cache lock poisoned").last.clone() {
            return Ok(last);
        }
        slot.fetch_shared().await
    }

    /// A rotation's swap: `candidate` becomes what every new request gets, and the values it
    /// replaces stay usable for `grace` only as a stand-in where the new ones are refused.
    /// Returns the epoch to hand to `purge_previous`.
    pub fn install(&self, source: &str, candidate: Fetched, grace: Duration) -> Option<u64> {
        let slot = &self.slots[self.slot_index(source)?];
        Some(slot.install(candidate, grace))
    }

    /// Ends a rotation's grace period: the replaced values are dropped from the cache and the
    /// scrubber. Returns false when a later rotation already replaced them.
    pub fn purge_previous(&self, source: &str, epoch: u64) -> bool {
        self.held.purge(source, epoch);
        let Some(i) = self.slot_index(source) else { return false };
        let mut state = self.slots[i].state.lock().expect("secret cache lock poisoned");
        match &state.previous {
            Some(previous) if previous.epoch == epoch => {
                state.previous = None;
                true
            }
            _ => false,
        }
    }

    /// The upstream refused `used` with `status`: evict its source at once, re-fetch, and say
    /// what to retry with. Only a 401 (the credential itself is bad) may fall back to the previous
    /// version or another source; a 403 can be about the resource, and an agent could provoke it.
    pub async fn rejected(&self, used: &Resolved, status: u16) -> Rejection {
        let Some(&i) = self.owner.get(&used.name) else { return Rejection::Nothing };
        let slot = &self.slots[i];
        let unauthorized = status == 401;
        if used.fallback_from.is_none() {
            if let Ok(fresh) = slot.refetch(&used.name).await
                && !fresh.same_value(used)
            {
                return Rejection::Newer(fresh);
            }
            if unauthorized
                && let Some(previous) = slot.previous(&used.name)
                && !previous.same_value(used)
            {
                return Rejection::Previous(previous);
            }
        }
        let tried = used.fallback_from.is_some();
        match self.fallback[i] {
            Some(f) if !tried && unauthorized => match self.slots[f].resolve(&used.name).await {
                Ok(value) => Rejection::Fallback(Arc::new(Resolved {
                    name: value.name.clone(),
                    source: value.source.clone(),
                    value: value.value.clone(),
                    version: value.version.clone(),
                    fallback_from: Some(slot.name.clone()),
                    minted: None,
                })),
                Err(_) => Rejection::Nothing,
            },
            _ => Rejection::Nothing,
        }
    }

    /// Names of sources not reached yet, for the readiness message.
    pub fn unreached(&self) -> Vec<String> {
        self.slots.iter().filter(|s| !s.reached.load(Ordering::Relaxed)).map(|s| s.name.clone()).collect()
    }

    /// Fetches every source not reached yet, once; returns how many are still unreached.
    pub async fn warm_up(&self) -> usize {
        let pending: Vec<_> = self.slots.iter().filter(|s| !s.reached.load(Ordering::Relaxed)).cloned().collect();
        let results = futures_util::future::join_all(pending.iter().map(|slot| slot.fetch_shared())).await;
        for (slot, result) in pending.iter().zip(results) {
            if let Err(e) = result {
                tracing::warn!(source = %slot.name, error = %e, "secret source not reachable yet");
            }
        }
        self.unreached().len()
    }

    /// Every secret name with its cache state, for the admin API and dashboard.
    pub fn status(&self) -> Vec<SecretStatus> {
        let mut names: Vec<(&String, &usize)> = self.owner.iter().collect();
        names.sort();
        names
            .into_iter()
            .map(|(name, slot)| {
                let slot = &self.slots[*slot];
                let state = slot.state.lock().expect("secret cache lock poisoned");
                let entry = state.entries.get(name);
                SecretStatus {
                    name: name.clone(),
                    source: slot.name.clone(),
                    version: entry.and_then(|e| e.value.version.clone()),
                    fetched_at: entry.map(|e| crate::timestamp::seconds(e.fetched_wall)),
                    expires_at: entry.map(|e| crate::timestamp::seconds(e.fetched_wall + slot.policy.ttl)),
                    age_seconds: entry.map(|e| e.fetched_at.elapsed().as_secs()),
                    cached: entry.is_some(),
                }
            })
            .collect()
    }

    /// Values derived from secret `name` (the keys a credential kind parsed from it or obtained
    /// for it), held like fetched values so the response scrubber recognises them.
    pub fn hold_derived(&self, name: &str, values: HashMap<String, SecretString>) {
        self.held.update(&format!("{name}#derived"), &values, Adopt::Current);
    }

    /// The minter for the secrets `kinds` names; its tokens join this store's scrubber.
    pub fn minter(&self, kinds: &std::collections::BTreeMap<String, super::KindConfig>) -> super::Minter {
        self.held.keep_out(unsent_roots(kinds));
        super::Minter::new(kinds, self.held.clone(), self.metrics.clone())
    }

    /// The minter for a reloaded config: a secret whose kind is unchanged keeps `old`'s tokens.
    pub fn reload_minter(
        &self,
        old: &super::Minter,
        kinds: &std::collections::BTreeMap<String, super::KindConfig>,
    ) -> super::Minter {
        self.held.keep_out(unsent_roots(kinds));
        old.reload(kinds, self.held.clone(), self.metrics.clone())
    }

    /// The scrubber for every credential value fetched so far.
    pub fn scrubber(&self) -> Arc<Scrubber> {
        self.held.scrubber().load_full()
    }

    /// The cell the scrubber is replaced in, for readers that must see values fetched later.
    pub fn scrubber_cell(&self) -> Arc<ArcSwap<Scrubber>> {
        self.held.scrubber().clone()
    }

    /// The credential for `name`; where its source cannot be fetched, its `fallback_to`'s.
    pub async fn resolve(&self, name: &str) -> Result<Arc<Resolved>, ProxyError> {
        let Some(&i) = self.owner.get(name) else {
            return Err(ProxyError::SecretNotFound { secret: name.to_string(), source: "(none)".to_string() });
        };
        let mut at = i;
        let mut hops = 0;
        loop {
            let result = self.slots[at].resolve(name).await;
            match (result, self.fallback[at]) {
                (Err(ProxyError::SecretStoreUnavailable { .. }), Some(next)) if hops < self.slots.len() => {
                    tracing::warn!(source = %self.slots[at].name, fallback = %self.slots[next].name, secret = name,
                        "secret source unavailable; using its fallback");
                    at = next;
                    hops += 1;
                }
                (Ok(value), _) if at != i => {
                    return Ok(Arc::new(Resolved {
                        name: value.name.clone(),
                        source: value.source.clone(),
                        value: value.value.clone(),
                        version: value.version.clone(),
                        fallback_from: Some(self.slots[i].name.clone()),
                        minted: None,
                    }));
                }
                (result, _) => return result,
            }
        }
    }
}

impl Slot {
    fn new(
        source: &SourceConfig,
        provider: Arc<dyn SecretProvider>,
        metrics: Arc<Metrics>,
        held: Arc<Held>,
    ) -> Arc<Slot> {
        let rotating = source.rotation.as_ref().is_some_and(|p| p.enabled);
        let pinned = rotating && provider.rotation().is_some_and(|r| r.pins());
        Arc::new(Slot {
            name: source.name.clone(),
            config: source.clone(),
            pinned,
            provider,
            policy: source.cache,
            state: Mutex::new(SlotState::default()),
            reached: AtomicBool::new(false),
            metrics,
            held,
        })
    }

    fn label(&self) -> SourceLabel {
        SourceLabel { source: self.name.clone() }
    }

    fn resolved(&self, name: &str, fetched: &Fetched) -> Option<Arc<Resolved>> {
        fetched.values.get(name).map(|value| {
            Arc::new(Resolved {
                name: name.to_string(),
                source: self.name.clone(),
                value: value.clone(),
                version: fetched.version.clone(),
                fallback_from: None,
                minted: None,
            })
        })
    }

    async fn resolve(self: &Arc<Self>, name: &str) -> Result<Arc<Resolved>, ProxyError> {
        let fetch = {
            let mut state = self.state.lock().expect("secret cache lock poisoned");
            if let Some(entry) = state.entries.get_mut(name)
                && entry.fetched_at.elapsed() < self.policy.ttl
            {
                entry.last_used = Instant::now();
                self.metrics.secret_cache_hits.get_or_create(&self.label()).inc();
                let value = entry.value.clone();
                // Refresh ahead: a used entry is re-fetched in the background before it expires,
                // so no reader waits at expiry. The in-flight marker keeps it to one fetch.
                if entry.fetched_at.elapsed().as_secs_f64() >= self.policy.ttl.as_secs_f64() * REFRESH_AHEAD_AT
                    && state.inflight.is_none()
                {
                    drop(self.join_or_start(&mut state));
                }
                return Ok(value);
            }
            self.join_or_start(&mut state)
        };
        match fetch.await {
            Ok(fetched) => match self.resolved(name, &fetched) {
                Some(value) => Ok(value),
                None => Err(ProxyError::SecretNotFound { secret: name.to_string(), source: self.name.clone() }),
            },
            Err(error) => {
                if let Some(stale) = self.stale(name) {
                    tracing::warn!(source = %self.name, secret = name, %error, "secret store down; serving a stale value");
                    self.metrics.secret_stale_served.get_or_create(&self.label()).inc();
                    return Ok(stale);
                }
                tracing::error!(source = %self.name, secret = name, %error, "secret store fetch failed");
                Err(ProxyError::SecretStoreUnavailable { secret: name.to_string(), source: self.name.clone() })
            }
        }
    }

    /// Evicts the source's entries and fetches again, unless the last fetch is very recent.
    async fn refetch(self: &Arc<Self>, name: &str) -> Result<Arc<Resolved>, ProxyError> {
        let fetch = {
            let mut state = self.state.lock().expect("secret cache lock poisoned");
            let recent = state.last_fetch_at.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL);
            if !recent {
                // Expired, not removed: while the store is down, `stale_if_error` still has them.
                match Instant::now().checked_sub(self.policy.ttl) {
                    Some(expired) if !self.policy.ttl.is_zero() => {
                        for entry in state.entries.values_mut() {
                            entry.fetched_at = expired.min(entry.fetched_at);
                        }
                    }
                    _ => state.entries.clear(),
                }
            }
            match (&state.last, recent) {
                (Some(last), true) => {
                    let last = last.clone();
                    drop(state);
                    return self
                        .resolved(name, &last)
                        .ok_or(ProxyError::SecretNotFound { secret: name.to_string(), source: self.name.clone() });
                }
                _ => self.join_or_start(&mut state),
            }
        };
        match fetch.await {
            Ok(fetched) => self
                .resolved(name, &fetched)
                .ok_or(ProxyError::SecretNotFound { secret: name.to_string(), source: self.name.clone() }),
            Err(_) => Err(ProxyError::SecretStoreUnavailable { secret: name.to_string(), source: self.name.clone() }),
        }
    }

    /// The value a rotation replaced, while its grace period lasts.
    fn previous(&self, name: &str) -> Option<Arc<Resolved>> {
        let state = self.state.lock().expect("secret cache lock poisoned");
        let previous = state.previous.as_ref().filter(|p| Instant::now() < p.until)?;
        previous.values.get(name).cloned()
    }

    fn install(&self, candidate: Fetched, grace: Duration) -> u64 {
        let epoch = {
            let mut state = self.state.lock().expect("secret cache lock poisoned");
            state.epoch += 1;
            state.epoch
        };
        // Into the scrubber before any request can get the new value.
        self.held.update(&self.name, &candidate.values, Adopt::Rotation { epoch });
        let until = Instant::now().checked_add(grace).unwrap_or_else(Instant::now);
        let candidate = Arc::new(candidate);
        let mut state = self.state.lock().expect("secret cache lock poisoned");
        let replaced: HashMap<String, Arc<Resolved>> = match &state.last {
            Some(last) => {
                last.values.keys().filter_map(|name| Some((name.clone(), self.resolved(name, last)?))).collect()
            }
            None => HashMap::new(),
        };
        state.previous = Some(Previous { values: replaced, until, epoch });
        // A fetch started before the swap may still answer with the old version: drop its marker.
        state.inflight = None;
        self.fill(&mut state, &candidate);
        epoch
    }

    /// An expired entry still inside its `stale_if_error` window.
    fn stale(&self, name: &str) -> Option<Arc<Resolved>> {
        let state = self.state.lock().expect("secret cache lock poisoned");
        let entry = state.entries.get(name)?;
        (entry.fetched_at.elapsed() < self.policy.ttl + self.policy.stale_if_error).then(|| entry.value.clone())
    }

    fn fetch_shared(self: &Arc<Self>) -> SharedFetch {
        let mut state = self.state.lock().expect("secret cache lock poisoned");
        self.join_or_start(&mut state)
    }

    /// Joins the source's in-flight fetch, or starts one. The fetch runs as its own task, so it
    /// completes (and fills the cache) even if every waiter gives up, and it is bounded by
    /// `FETCH_TIMEOUT` so a hung store cannot block the source for good.
    fn join_or_start(self: &Arc<Self>, state: &mut SlotState) -> SharedFetch {
        if let Some((_, inflight)) = &state.inflight {
            return inflight.clone();
        }
        state.generation += 1;
        let generation = state.generation;
        let epoch = state.epoch;
        let slot = self.clone();
        let task = tokio::spawn(async move {
            let _clear = ClearInflight { slot: slot.clone(), generation };
            let result = match tokio::time::timeout(FETCH_TIMEOUT, slot.provider.fetch()).await {
                Ok(result) => result.map(Arc::new),
                Err(_) => Err(StoreError::Unreachable(format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))),
            };
            slot.store(result, epoch)
        });
        let fetch: BoxFuture<'static, _> = Box::pin(async move {
            task.await.unwrap_or_else(|_| Err(StoreError::Unreachable("the fetch task failed".to_string())))
        });
        let shared = fetch.shared();
        state.inflight = Some((generation, shared.clone()));
        shared
    }

    /// Records a fetch's result and returns what its waiters get: the fetched values, or for a
    /// pinned source whose values changed outside a rotation, the values it already serves.
    fn store(&self, result: Result<Arc<Fetched>, StoreError>, epoch: u64) -> Result<Arc<Fetched>, StoreError> {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.secret_fetches.get_or_create(&FetchLabels { source: self.name.clone(), result: outcome }).inc();
        let fetched = result?;
        let mut state = self.state.lock().expect("secret cache lock poisoned");
        self.reached.store(true, Ordering::Relaxed);
        if state.epoch != epoch {
            // A rotation swapped values in while this fetch ran; they are newer. Its waiters may
            // still send these, so they are scrubbed until that rotation's purge.
            drop(state);
            self.held.update(&self.name, &fetched.values, Adopt::Stale { epoch });
            return Ok(fetched);
        }
        if self.pinned
            && let Some(last) = state.last.clone()
            && !same_values(&last, &fetched)
        {
            if !std::mem::replace(&mut state.change_noticed, true) {
                tracing::warn!(source = %self.name,
                    "the source's values changed; they are used once a rotation has tested and promoted them");
            }
            self.fill(&mut state, &last);
            return Ok(last);
        }
        state.change_noticed = false;
        // Before any waiter sees the value, so no response can outrun its scrubber.
        self.held.update(&self.name, &fetched.values, Adopt::Current);
        self.fill(&mut state, &fetched);
        Ok(fetched)
    }

    fn fill(&self, state: &mut SlotState, fetched: &Arc<Fetched>) {
        state.last = Some(fetched.clone());
        state.last_fetch_at = Some(Instant::now());
        let keeps_values = !self.policy.ttl.is_zero() || !self.policy.stale_if_error.is_zero();
        if !keeps_values {
            return;
        }
        let now = Instant::now();
        for (name, value) in &fetched.values {
            let resolved = Resolved {
                name: name.clone(),
                source: self.name.clone(),
                value: value.clone(),
                version: fetched.version.clone(),
                fallback_from: None,
                minted: None,
            };
            let last_used = state.entries.get(name).map_or(now, |e| e.last_used);
            let entry =
                Entry { value: Arc::new(resolved), fetched_at: now, fetched_wall: SystemTime::now(), last_used };
            state.entries.insert(name.clone(), entry);
        }
        state.entries.retain(|name, _| fetched.values.contains_key(name));
        evict_to(&mut state.entries, self.policy.max_size.max(1));
    }
}

/// The minted secrets whose stored value never leaves keyward (a private key that only signs).
fn unsent_roots(kinds: &std::collections::BTreeMap<String, super::KindConfig>) -> std::collections::HashSet<String> {
    kinds.iter().filter(|(_, kind)| !kind.root_sent()).map(|(name, _)| name.clone()).collect()
}

fn evict_to(entries: &mut HashMap<String, Entry>, max: usize) {
    while entries.len() > max {
        let Some(oldest) = entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone()) else { return };
        entries.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProviderConfig, Selector};
    use std::sync::atomic::AtomicUsize;

    struct Counting {
        calls: AtomicUsize,
        fail: AtomicBool,
        delay: Duration,
    }

    impl SecretProvider for Counting {
        fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(self.delay).await;
                if self.fail.load(Ordering::SeqCst) {
                    return Err(StoreError::Unreachable("down".into()));
                }
                let values = [
                    ("A".to_string(), SecretString::from(format!("alpha-secret-{n}"))),
                    ("B".to_string(), SecretString::from(format!("beta-secret-{n}"))),
                ]
                .into();
                Ok(Fetched { values, version: Some(format!("v{n}")) })
            })
        }
    }

    fn new_store(policy: CachePolicy) -> (SecretStore, Arc<Counting>) {
        let provider = Arc::new(Counting {
            calls: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
            delay: Duration::from_millis(50),
        });
        let source = SourceConfig {
            name: "s".into(),
            provider: ProviderConfig::Env(crate::credentials::env::EnvConfig),
            mapping: [("A".to_string(), Selector::Whole), ("B".to_string(), Selector::Whole)].into(),
            cache: policy,
            rotation: None,
            fallback_to: None,
        };
        let store = SecretStore::with_providers(&[source], vec![provider.clone()], Arc::new(Metrics::new()));
        (store, provider)
    }

    fn policy(ttl_ms: u64, max_size: usize, stale_ms: u64) -> CachePolicy {
        CachePolicy { ttl: Duration::from_millis(ttl_ms), max_size, stale_if_error: Duration::from_millis(stale_ms) }
    }

    #[tokio::test]
    async fn concurrent_cold_misses_make_one_fetch() {
        let (store, provider) = new_store(policy(60_000, 10, 0));
        let store = Arc::new(store);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.resolve(if i % 2 == 0 { "A" } else { "B" }).await.map(|r| r.version.clone())
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Some("v1".to_string()));
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
        assert!(store.unreached().is_empty());
        // A cache hit afterwards makes no call.
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-1");
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn ttl_zero_fetches_every_time_and_expiry_refetches() {
        let (store, provider) = new_store(policy(0, 10, 0));
        store.resolve("A").await.unwrap();
        store.resolve("A").await.unwrap();
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);

        let (store, provider) = new_store(policy(30, 10, 0));
        store.resolve("A").await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-2");
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn store_down_fails_closed_unless_stale_is_allowed() {
        let (closed, provider) = new_store(policy(10, 10, 0));
        closed.resolve("A").await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(closed.resolve("A").await.err().unwrap().code(), "secret_store_unavailable");

        let (stale, provider) = new_store(policy(10, 10, 60_000));
        stale.resolve("A").await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(stale.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-1");
    }

    #[tokio::test]
    async fn size_bound_evicts_least_recently_used() {
        let (store, provider) = new_store(policy(60_000, 1, 0));
        store.resolve("A").await.unwrap();
        // Only one of A/B is kept; asking for both in turn forces refetches.
        store.resolve("B").await.unwrap();
        store.resolve("A").await.unwrap();
        assert!(provider.calls.load(Ordering::SeqCst) >= 2);
        let state = store.slots[0].state.lock().unwrap();
        assert_eq!(state.entries.len(), 1);
    }

    #[tokio::test]
    async fn a_fetch_finishes_even_when_every_waiter_gives_up() {
        let (store, provider) = new_store(policy(60_000, 10, 0));
        let gave_up = tokio::time::timeout(Duration::from_millis(10), store.resolve("A")).await;
        assert!(gave_up.is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The abandoned fetch completed and filled the cache: no second call.
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-1");
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    }

    struct Panicking;

    impl SecretProvider for Panicking {
        fn fetch(&self) -> BoxFuture<'_, Result<Fetched, StoreError>> {
            Box::pin(async { panic!("provider bug") })
        }
    }

    #[tokio::test]
    async fn a_panicking_provider_gives_503_and_does_not_wedge_the_source() {
        let source = SourceConfig {
            name: "p".into(),
            provider: ProviderConfig::Env(crate::credentials::env::EnvConfig),
            mapping: [("A".to_string(), Selector::Whole)].into(),
            cache: policy(60_000, 10, 0),
            rotation: None,
            fallback_to: None,
        };
        let store = SecretStore::with_providers(&[source], vec![Arc::new(Panicking)], Arc::new(Metrics::new()));
        for _ in 0..2 {
            assert_eq!(store.resolve("A").await.err().unwrap().code(), "secret_store_unavailable");
        }
        assert!(store.slots[0].state.lock().unwrap().inflight.is_none());
    }

    #[tokio::test]
    async fn the_scrubber_covers_every_fetched_value_even_without_caching() {
        let (store, _) = new_store(policy(0, 10, 0));
        assert!(store.scrubber().is_empty());
        store.resolve("A").await.unwrap();
        let scrubbed = store.scrubber().scrub(b"x alpha-secret-1 beta-secret-1 y").into_owned();
        assert_eq!(String::from_utf8_lossy(&scrubbed), "x [REDACTED:A]** [REDACTED:B]* y");
        // A newer value replaces the old one in the scrubber.
        store.resolve("A").await.unwrap();
        assert_eq!(String::from_utf8_lossy(&store.scrubber().scrub(b"alpha-secret-2")), "[REDACTED:A]**");
    }

    #[tokio::test]
    async fn a_used_entry_is_refreshed_ahead_of_expiry() {
        let (store, provider) = new_store(policy(400, 10, 0));
        store.resolve("A").await.unwrap();
        tokio::time::sleep(Duration::from_millis(370)).await;
        // A hit in the last tenth of the TTL answers at once and starts one background fetch.
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-1");
        store.resolve("A").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
        // Past the old expiry the refreshed value is served with no wait.
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-2");
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_credential_is_evicted_and_a_newer_one_offered() {
        let (store, provider) = new_store(policy(60_000, 10, 0));
        let used = store.resolve("A").await.unwrap();
        // The last fetch is too recent to re-fetch: nothing newer is offered.
        assert!(matches!(store.rejected(&used, 401).await, Rejection::Nothing));
        tokio::time::sleep(MIN_REFETCH_INTERVAL).await;
        match store.rejected(&used, 401).await {
            Rejection::Newer(next) => assert_eq!(next.value.expose_secret(), "alpha-secret-2"),
            _ => panic!("expected a newer version"),
        }
        assert_eq!(provider.calls.load(Ordering::SeqCst), 2);
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-2");
    }

    #[tokio::test]
    async fn an_invalidation_while_the_store_is_down_keeps_stale_if_error() {
        let (store, provider) = new_store(policy(60_000, 10, 60_000));
        let used = store.resolve("A").await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(MIN_REFETCH_INTERVAL).await;
        assert!(matches!(store.rejected(&used, 401).await, Rejection::Nothing));
        // Expired by the invalidation, but still inside the stale window: served, not a 503.
        assert_eq!(store.resolve("A").await.unwrap().value.expose_secret(), "alpha-secret-1");
        assert!(provider.calls.load(Ordering::SeqCst) >= 3, "the expired entry was re-fetched first");
    }

    #[tokio::test]
    async fn a_rotation_swaps_at_once_and_keeps_the_old_value_only_for_its_grace() {
        let (store, _) = new_store(policy(60_000, 10, 0));
        let old = store.resolve("A").await.unwrap();
        let candidate = Fetched {
            values: [
                ("A".to_string(), SecretString::from("alpha-rotated")),
                ("B".to_string(), SecretString::from("beta-rotated")),
            ]
            .into(),
            version: Some("v9".into()),
        };
        let epoch = store.install("s", candidate, Duration::from_secs(60)).unwrap();
        let new = store.resolve("A").await.unwrap();
        assert_eq!((new.value.expose_secret(), new.version.as_deref()), ("alpha-rotated", Some("v9")));
        // Both values are scrubbed while the old one may still be in flight.
        let scrubbed = store.scrubber().scrub(b"alpha-secret-1 alpha-rotated").into_owned();
        assert!(!String::from_utf8_lossy(&scrubbed).contains("alpha"), "{}", String::from_utf8_lossy(&scrubbed));
        // Where the new one is refused, the old one stands in during the grace period.
        match store.rejected(&new, 401).await {
            Rejection::Previous(previous) => assert!(previous.same_value(&old)),
            _ => panic!("expected the previous version"),
        }
        assert!(matches!(store.rejected(&new, 403).await, Rejection::Nothing), "a 403 never downgrades");
        assert!(store.purge_previous("s", epoch));
        assert!(!store.purge_previous("s", epoch));
        assert!(matches!(store.rejected(&new, 401).await, Rejection::Nothing));
        assert_eq!(String::from_utf8_lossy(&store.scrubber().scrub(b"alpha-secret-1")), "alpha-secret-1");
    }

    #[tokio::test]
    async fn a_source_that_cannot_be_fetched_falls_back() {
        let primary =
            Arc::new(Counting { calls: AtomicUsize::new(0), fail: AtomicBool::new(true), delay: Duration::ZERO });
        let backup =
            Arc::new(Counting { calls: AtomicUsize::new(0), fail: AtomicBool::new(false), delay: Duration::ZERO });
        let source = |name: &str, fallback: Option<&str>| SourceConfig {
            name: name.into(),
            provider: ProviderConfig::Env(crate::credentials::env::EnvConfig),
            mapping: [("A".to_string(), Selector::Whole)].into(),
            cache: policy(60_000, 10, 0),
            rotation: None,
            fallback_to: fallback.map(str::to_string),
        };
        let sources = [source("prod", Some("staging")), source("staging", None)];
        let store = SecretStore::with_providers(&sources, vec![primary, backup], Arc::new(Metrics::new()));
        let resolved = store.resolve("A").await.unwrap();
        assert_eq!(resolved.source, "staging");
        assert_eq!(resolved.fallback_from.as_deref(), Some("prod"));
    }

    #[tokio::test]
    async fn unknown_names_are_not_found() {
        let (store, _) = new_store(policy(60_000, 10, 0));
        assert_eq!(store.resolve("NOPE").await.err().unwrap().code(), "secret_not_found");
    }
}
