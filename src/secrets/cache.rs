//! The secret cache: TTL and size bound per source, single-flight fetches, optional stale serving.
//!
//! The lock guards only map operations and is never held across a fetch: concurrent misses on a
//! source join one shared in-flight fetch, and the fetch itself stores its result.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use secrecy::{ExposeSecret, SecretString};

use super::{Fetched, SecretProvider, StoreError, build_provider};
use crate::config::{CachePolicy, SourceConfig};
use crate::error::ProxyError;
use crate::metrics::{FetchLabels, Metrics, SourceLabel};
use crate::scrub::{MIN_SCRUB_LEN, Scrubber};

/// A resolved credential, ready to inject. Deliberately not `Debug`.
pub struct Resolved {
    pub name: String,
    pub source: String,
    pub value: SecretString,
    pub version: Option<String>,
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
}

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
    provider: Arc<dyn SecretProvider>,
    policy: CachePolicy,
    state: Mutex<SlotState>,
    reached: AtomicBool,
    metrics: Arc<Metrics>,
    held: Arc<Held>,
}

/// Every credential value keyward has fetched, by secret name, and the scrubber built from them.
/// It keeps the last value of each name even when the cache does not (`ttl_seconds = 0`), so
/// that an echo of it can still be recognised.
struct Held {
    values: Mutex<BTreeMap<String, SecretString>>,
    scrubber: Arc<ArcSwap<Scrubber>>,
}

impl Held {
    fn update(&self, fetched: &HashMap<String, SecretString>) {
        let mut values = self.values.lock().expect("held secrets lock poisoned");
        let mut changed = false;
        for (name, value) in fetched {
            if values.get(name).is_none_or(|old| old.expose_secret() != value.expose_secret()) {
                if value.expose_secret().len() < MIN_SCRUB_LEN {
                    tracing::warn!(
                        secret = %name,
                        "secret is shorter than {MIN_SCRUB_LEN} characters, so responses are not scrubbed for it"
                    );
                }
                values.insert(name.clone(), value.clone());
                changed = true;
            }
        }
        if changed {
            let scrubber = Scrubber::new(values.iter().map(|(name, value)| (name.as_str(), value)));
            self.scrubber.store(Arc::new(scrubber));
        }
    }
}

/// Every configured source, and which source provides each secret name.
pub struct SecretStore {
    slots: Vec<Arc<Slot>>,
    owner: HashMap<String, usize>,
    held: Arc<Held>,
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
        let mut owner = HashMap::new();
        let held =
            Arc::new(Held { values: Mutex::default(), scrubber: Arc::new(ArcSwap::from_pointee(Scrubber::empty())) });
        let slots = sources
            .iter()
            .zip(providers)
            .enumerate()
            .map(|(i, (source, provider))| {
                for name in source.mapping.keys() {
                    owner.insert(name.clone(), i);
                }
                Arc::new(Slot {
                    name: source.name.clone(),
                    provider,
                    policy: source.cache,
                    state: Mutex::new(SlotState::default()),
                    reached: AtomicBool::new(false),
                    metrics: metrics.clone(),
                    held: held.clone(),
                })
            })
            .collect();
        SecretStore { slots, owner, held }
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
                let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
                SecretStatus {
                    name: name.clone(),
                    source: slot.name.clone(),
                    version: entry.and_then(|e| e.value.version.clone()),
                    fetched_at: entry.map(|e| stamp(e.fetched_wall)),
                    expires_at: entry.map(|e| stamp(e.fetched_wall + slot.policy.ttl)),
                    age_seconds: entry.map(|e| e.fetched_at.elapsed().as_secs()),
                    cached: entry.is_some(),
                }
            })
            .collect()
    }

    /// The scrubber for every credential value fetched so far.
    pub fn scrubber(&self) -> Arc<Scrubber> {
        self.held.scrubber.load_full()
    }

    /// The cell the scrubber is replaced in, for readers that must see values fetched later.
    pub fn scrubber_cell(&self) -> Arc<ArcSwap<Scrubber>> {
        self.held.scrubber.clone()
    }

    pub async fn resolve(&self, name: &str) -> Result<Arc<Resolved>, ProxyError> {
        let Some(slot) = self.owner.get(name).map(|i| &self.slots[*i]) else {
            return Err(ProxyError::SecretNotFound { secret: name.to_string(), source: "(none)".to_string() });
        };
        slot.resolve(name).await
    }
}

impl Slot {
    fn label(&self) -> SourceLabel {
        SourceLabel { source: self.name.clone() }
    }

    async fn resolve(self: &Arc<Self>, name: &str) -> Result<Arc<Resolved>, ProxyError> {
        let fetch = {
            let mut state = self.state.lock().expect("secret cache lock poisoned");
            if let Some(entry) = state.entries.get_mut(name)
                && entry.fetched_at.elapsed() < self.policy.ttl
            {
                entry.last_used = Instant::now();
                self.metrics.secret_cache_hits.get_or_create(&self.label()).inc();
                return Ok(entry.value.clone());
            }
            self.join_or_start(&mut state)
        };
        match fetch.await {
            Ok(fetched) => match fetched.values.get(name) {
                Some(value) => Ok(Arc::new(Resolved {
                    name: name.to_string(),
                    source: self.name.clone(),
                    value: value.clone(),
                    version: fetched.version.clone(),
                })),
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
        let slot = self.clone();
        let task = tokio::spawn(async move {
            let _clear = ClearInflight { slot: slot.clone(), generation };
            let result = match tokio::time::timeout(FETCH_TIMEOUT, slot.provider.fetch()).await {
                Ok(result) => result.map(Arc::new),
                Err(_) => Err(StoreError::Unreachable(format!("no answer within {} s", FETCH_TIMEOUT.as_secs()))),
            };
            slot.store(&result);
            result
        });
        let fetch: BoxFuture<'static, _> = Box::pin(async move {
            task.await.unwrap_or_else(|_| Err(StoreError::Unreachable("the fetch task failed".to_string())))
        });
        let shared = fetch.shared();
        state.inflight = Some((generation, shared.clone()));
        shared
    }

    fn store(&self, result: &Result<Arc<Fetched>, StoreError>) {
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.secret_fetches.get_or_create(&FetchLabels { source: self.name.clone(), result: outcome }).inc();
        let Ok(fetched) = result else { return };
        // Before any waiter sees the value, so no response can outrun its scrubber.
        self.held.update(&fetched.values);
        let mut state = self.state.lock().expect("secret cache lock poisoned");
        self.reached.store(true, Ordering::Relaxed);
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
            provider: ProviderConfig::Env,
            mapping: [("A".to_string(), Selector::Whole), ("B".to_string(), Selector::Whole)].into(),
            cache: policy,
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
            provider: ProviderConfig::Env,
            mapping: [("A".to_string(), Selector::Whole)].into(),
            cache: policy(60_000, 10, 0),
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
    async fn unknown_names_are_not_found() {
        let (store, _) = new_store(policy(60_000, 10, 0));
        assert_eq!(store.resolve("NOPE").await.err().unwrap().code(), "secret_not_found");
    }
}
