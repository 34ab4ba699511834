//! Delegation: a parent agent mints a short-lived child key, scoped to a `secretref` list and to
//! routes, methods and paths it already holds, for a sub-agent (the article's mechanisms 2
//! and 3). Rights only narrow; expiry, request budget and revocation hold under concurrency.
//!
//! Child keys are stored only as hashes; revocation cascades to every descendant.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::config::{GrantConfig, RoleConfig};
use crate::error::ProxyError;
use crate::identity;
use crate::policy::{MethodSet, PathPattern};

/// Time, injectable so tests can move it.
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// The most live delegations kept; minting beyond it is refused, so memory stays bounded.
pub const MAX_LIVE: usize = 100_000;
/// How long expired and revoked delegations are remembered, to answer with a precise 401.
const REMEMBER: Duration = Duration::from_secs(3600);

/// A parent's request, as `POST /v1/delegations` receives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationRequest {
    pub secretref: Vec<String>,
    pub routes: Vec<String>,
    pub methods: Vec<String>,
    pub paths: Vec<String>,
    pub ttl_seconds: Option<u64>,
    pub max_requests: Option<u64>,
    pub label: Option<String>,
    #[serde(default)]
    pub revoke_on_failure: bool,
    #[serde(default)]
    pub allow_subdelegation: bool,
    /// Accepted for compatibility with the article's secretref tag; keyward always reveals at
    /// request time, never to the model.
    #[serde(rename = "autoReveal", default)]
    pub auto_reveal: Option<bool>,
}

/// What the parent may hand on: its grants and its limits.
pub struct Delegator<'a> {
    pub id: &'a str,
    pub role: &'a RoleConfig,
    /// The chain above the parent, nearest first (empty for a configured agent).
    pub chain: &'a [String],
    pub may_delegate: bool,
    pub max_ttl: Duration,
    pub depth: u32,
    pub max_depth: u32,
    /// A delegation's children cannot outlive it.
    pub expires: Option<SystemTime>,
    /// A delegation's children cannot have more requests than it has left.
    pub budget_left: Option<u64>,
}

/// One live child key. Not `Debug`-derived: it holds the key's hash.
pub struct Delegation {
    pub id: String,
    key_sha256: [u8; 32],
    /// `delegatedBy`: the parent first, up to the root agent.
    pub chain: Vec<String>,
    pub label: Option<String>,
    pub role: RoleConfig,
    pub created: SystemTime,
    pub expires: SystemTime,
    pub max_requests: Option<u64>,
    used: AtomicU64,
    revoked: AtomicBool,
    expiry_reported: AtomicBool,
    pub revoke_on_failure: bool,
    pub allow_subdelegation: bool,
    pub depth: u32,
    pub max_depth: u32,
    pub max_ttl: Duration,
}

impl std::fmt::Debug for Delegation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delegation").field("id", &self.id).field("chain", &self.chain).finish_non_exhaustive()
    }
}

impl Delegation {
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// As the parent of a further delegation.
    pub fn as_delegator(&self) -> Delegator<'_> {
        Delegator {
            id: &self.id,
            role: &self.role,
            chain: &self.chain,
            may_delegate: self.allow_subdelegation,
            max_ttl: self.max_ttl,
            depth: self.depth,
            max_depth: self.max_depth,
            expires: Some(self.expires),
            budget_left: self.max_requests.map(|max| max.saturating_sub(self.used())),
        }
    }

    /// Notes a use already counted elsewhere (the shared budget in Redis), for display.
    pub fn note_use(&self) {
        self.used.fetch_add(1, Ordering::SeqCst);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A delegation as the admin API and the minting agent see it (never the key).
pub fn describe(d: &Delegation) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "delegatedBy": d.chain,
        "label": d.label,
        "grants": d.role.grants.iter().map(|g| serde_json::json!({
            "route": g.route, "secret": g.secret,
            "methods": method_list(&g.methods),
            "paths": g.paths.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "created_at": crate::timestamp::seconds(d.created),
        "expires_at": crate::timestamp::seconds(d.expires),
        "max_requests": d.max_requests,
        "used": d.used(),
        "revoke_on_failure": d.revoke_on_failure,
        "allow_subdelegation": d.allow_subdelegation,
        "depth": d.depth,
    })
}

fn method_list(methods: &MethodSet) -> Vec<String> {
    match methods {
        MethodSet::Any => vec!["*".to_string()],
        MethodSet::Only(list) => list.iter().map(|m| m.to_string()).collect(),
    }
}

/// A delegation as stored in Redis for other replicas: everything but the key (only its hash).
pub fn export(d: &Delegation) -> serde_json::Value {
    serde_json::json!({
        "id": d.id,
        "key_sha256": hex::encode(d.key_sha256),
        "chain": d.chain,
        "label": d.label,
        "grants": d.role.grants.iter().map(|g| serde_json::json!({
            "route": g.route, "secret": g.secret, "methods": method_list(&g.methods),
            "paths": g.paths.iter().map(|p| p.as_str().to_string()).collect::<Vec<_>>(),
            "quota": g.quota.map(|q| serde_json::json!({ "count": q.count, "period_ms": q.period.as_millis() as u64, "burst": q.burst })),
        })).collect::<Vec<_>>(),
        "created_ms": unix_ms(d.created),
        "expires_ms": unix_ms(d.expires),
        "max_requests": d.max_requests,
        "revoke_on_failure": d.revoke_on_failure,
        "allow_subdelegation": d.allow_subdelegation,
        "depth": d.depth,
        "max_depth": d.max_depth,
        "max_ttl_s": d.max_ttl.as_secs(),
    })
}

/// Rebuilds a delegation another replica minted; `None` if the record is not one.
fn import(v: &serde_json::Value) -> Option<Delegation> {
    let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array()?.iter().map(|s| s.as_str().map(str::to_string)).collect()
    };
    let mut key_sha256 = [0u8; 32];
    hex::decode_to_slice(v["key_sha256"].as_str()?, &mut key_sha256).ok()?;
    let mut grants = Vec::new();
    for g in v["grants"].as_array()? {
        let quota = match g.get("quota").filter(|q| !q.is_null()) {
            None => None,
            Some(q) => {
                let (count, period_ms, burst) = (q["count"].as_u64()?, q["period_ms"].as_u64()?, q["burst"].as_u64()?);
                if count == 0 || burst == 0 || period_ms == 0 {
                    return None;
                }
                Some(crate::config::Quota {
                    count: u32::try_from(count).ok()?,
                    period: Duration::from_millis(period_ms),
                    burst: u32::try_from(burst).ok()?,
                })
            }
        };
        grants.push(GrantConfig {
            route: g["route"].as_str()?.to_string(),
            secret: g["secret"].as_str()?.to_string(),
            methods: MethodSet::parse(&strings(&g["methods"])?).ok()?,
            paths: strings(&g["paths"])?.iter().map(|p| PathPattern::parse(p)).collect::<Result<_, _>>().ok()?,
            quota,
            // A child's calls mint with its root's grant (`Principal::authorize`), never its own.
            scope: Default::default(),
        });
    }
    let id = v["id"].as_str()?.to_string();
    let allow_subdelegation = v["allow_subdelegation"].as_bool()?;
    let max_ttl = Duration::from_secs(v["max_ttl_s"].as_u64()?);
    let max_depth = v["max_depth"].as_u64()? as u32;
    Some(Delegation {
        role: RoleConfig {
            name: format!("delegation:{id}"),
            grants,
            delegate: allow_subdelegation,
            max_delegation_ttl: max_ttl,
            max_delegation_depth: max_depth,
            ..RoleConfig::default()
        },
        id,
        key_sha256,
        chain: strings(&v["chain"])?,
        label: v["label"].as_str().map(str::to_string),
        created: at(v["created_ms"].as_u64()?),
        expires: at(v["expires_ms"].as_u64()?),
        max_requests: v["max_requests"].as_u64(),
        used: AtomicU64::new(0),
        revoked: AtomicBool::new(false),
        expiry_reported: AtomicBool::new(false),
        revoke_on_failure: v["revoke_on_failure"].as_bool()?,
        allow_subdelegation,
        depth: v["depth"].as_u64()? as u32,
        max_depth,
        max_ttl,
    })
}

/// Checks that `request` only narrows what `parent` holds, and returns the child's grants.
/// The error names the first excess.
pub fn narrow(parent: &Delegator<'_>, request: &DelegationRequest) -> Result<Vec<GrantConfig>, String> {
    if !parent.may_delegate {
        return Err(match parent.chain.is_empty() {
            true => format!("role '{}' may not delegate (set delegate = true)", parent.role.name),
            false => "this delegation does not allow sub-delegation".to_string(),
        });
    }
    if parent.depth + 1 > parent.max_depth {
        return Err(format!("depth {} exceeds the delegation depth limit of {}", parent.depth + 1, parent.max_depth));
    }
    for (field, empty) in [
        ("secretref", request.secretref.is_empty()),
        ("routes", request.routes.is_empty()),
        ("methods", request.methods.is_empty()),
        ("paths", request.paths.is_empty()),
    ] {
        if empty {
            return Err(format!("{field} must list at least one entry"));
        }
    }
    let methods = MethodSet::parse(&request.methods)?;
    let paths: Vec<PathPattern> = request.paths.iter().map(|p| PathPattern::parse(p)).collect::<Result<_, _>>()?;
    let mut grants = Vec::new();
    for route in &request.routes {
        for secret in &request.secretref {
            let held: Vec<&GrantConfig> =
                parent.role.grants.iter().filter(|g| &g.route == route && &g.secret == secret).collect();
            if held.is_empty() {
                let on_route = parent.role.grants.iter().any(|g| &g.route == route);
                return Err(match on_route {
                    true => format!("secretref '{secret}' is not granted to '{}' on route '{route}'", parent.id),
                    false => format!("route '{route}' is not granted to '{}'", parent.id),
                });
            }
            let single = |m: &http::Method| MethodSet::Only(vec![m.clone()]);
            let wanted: Vec<MethodSet> = match &methods {
                MethodSet::Any => vec![MethodSet::Any],
                MethodSet::Only(list) => list.iter().map(single).collect(),
            };
            for method in &wanted {
                if !held.iter().any(|g| g.methods.covers(method)) {
                    let name = match method {
                        MethodSet::Any => "*".to_string(),
                        MethodSet::Only(m) => m[0].to_string(),
                    };
                    return Err(format!(
                        "method {name} with '{secret}' on route '{route}' exceeds what '{}' holds",
                        parent.id
                    ));
                }
                for path in &paths {
                    if !held.iter().any(|g| g.methods.covers(method) && g.paths.iter().any(|p| p.covers(path))) {
                        return Err(format!(
                            "path '{}' with '{secret}' on route '{route}' exceeds what '{}' holds",
                            path.as_str(),
                            parent.id
                        ));
                    }
                }
            }
            // The child gets the tightest quota of the parent's grants it draws on; calls are
            // counted against the root agent's bucket, so delegating never adds allowance.
            let quota = held
                .iter()
                .filter_map(|g| g.quota)
                .min_by_key(|q| (u128::from(q.count) * 1_000_000_000) / q.period.as_nanos().max(1));
            grants.push(GrantConfig {
                route: route.clone(),
                secret: secret.clone(),
                methods: methods.clone(),
                paths: paths.clone(),
                quota,
                // A child's calls mint with its root's grant (`Principal::authorize`), never its own.
                scope: Default::default(),
            });
        }
    }
    Ok(grants)
}

pub struct DelegationStore {
    by_hash: RwLock<HashMap<[u8; 32], Arc<Delegation>>>,
    by_id: RwLock<HashMap<String, Arc<Delegation>>>,
    clock: Arc<dyn Clock>,
    /// Held while a call's budgets are checked and charged up its chain, so that check and
    /// charge are one step for every key at once (never across an `.await`).
    charging: Mutex<()>,
}

/// Why minting failed: the HTTP status and message follow from it.
#[derive(Debug, PartialEq, Eq)]
pub enum MintError {
    /// Rights, TTL or depth beyond the parent's: 403 with the excess named.
    Excess(String),
    /// The request is malformed: 400.
    Invalid(String),
    /// Too many live delegations: 503.
    Full,
}

impl Default for DelegationStore {
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl DelegationStore {
    pub fn new(clock: Arc<dyn Clock>) -> DelegationStore {
        DelegationStore { by_hash: RwLock::default(), by_id: RwLock::default(), clock, charging: Mutex::new(()) }
    }

    /// The keys whose budgets a call with `delegation` spends: itself, then each delegation
    /// above it, nearest first (the configured agent at the root has no budget here). An
    /// ancestor this replica no longer knows refuses the call rather than skipping its budget.
    pub fn lineage(&self, delegation: &Arc<Delegation>) -> Result<Vec<Arc<Delegation>>, ProxyError> {
        let ancestors = &delegation.chain[..delegation.chain.len().saturating_sub(1)];
        let mut lineage = Vec::with_capacity(ancestors.len() + 1);
        lineage.push(delegation.clone());
        for id in ancestors {
            let ancestor = self.get(id).ok_or_else(|| ProxyError::DelegationExpired { id: id.clone() })?;
            lineage.push(ancestor);
        }
        Ok(lineage)
    }

    /// Counts one request against every budget in `lineage` (from `lineage`), or against none
    /// if any of them is spent: a key's `max_requests` bounds the calls of its whole subtree,
    /// exactly, however many race for the last one.
    pub fn admit(&self, lineage: &[Arc<Delegation>]) -> Result<(), ProxyError> {
        let _one_at_a_time = self.charging.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(spent) = lineage.iter().find(|d| d.max_requests.is_some_and(|max| d.used() >= max)) {
            return Err(ProxyError::DelegationExhausted { id: spent.id.clone() });
        }
        for d in lineage {
            d.note_use();
        }
        Ok(())
    }

    pub fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Mints a child key for `parent`. Returns the delegation and the key (shown once).
    pub fn mint(
        &self,
        parent: &Delegator<'_>,
        request: &DelegationRequest,
    ) -> Result<(Arc<Delegation>, String), MintError> {
        let grants = narrow(parent, request).map_err(MintError::Excess)?;
        let now = self.clock.now();
        let ttl = Duration::from_secs(request.ttl_seconds.unwrap_or(600));
        if ttl.is_zero() {
            return Err(MintError::Invalid("ttl_seconds must be at least 1".to_string()));
        }
        if ttl > parent.max_ttl {
            return Err(MintError::Excess(format!(
                "ttl_seconds {} exceeds the limit of {}",
                ttl.as_secs(),
                parent.max_ttl.as_secs()
            )));
        }
        // A child never outlives its parent: its expiry is clamped to the parent's.
        let expires = parent.expires.map_or(now + ttl, |parent_end| parent_end.min(now + ttl));
        if request.max_requests == Some(0) {
            return Err(MintError::Invalid("max_requests must be at least 1".to_string()));
        }
        let max_requests = match (request.max_requests, parent.budget_left) {
            (Some(asked), Some(left)) if asked > left => {
                return Err(MintError::Excess(format!(
                    "max_requests {asked} exceeds the parent's remaining budget of {left}"
                )));
            }
            (None, Some(0)) => {
                return Err(MintError::Excess("the parent has no requests left to delegate".to_string()));
            }
            (None, Some(left)) => Some(left),
            (asked, _) => asked,
        };
        if let Some(label) = &request.label
            && (label.len() > 200
                || label.chars().any(|c| c.is_control() || crate::audit::chain::is_line_break_or_display_control(c)))
        {
            return Err(MintError::Invalid(
                "label must be at most 200 printable characters, without line separators or bidi and other invisible controls"
                    .to_string(),
            ));
        }
        if self.by_id.read().expect("delegations lock").len() >= MAX_LIVE {
            return Err(MintError::Full);
        }
        let key = identity::generate_key();
        let id = format!("dlg_{}", &crate::audit::new_request_id()[..16]);
        let mut chain = vec![parent.id.to_string()];
        chain.extend(parent.chain.iter().cloned());
        let delegation = Arc::new(Delegation {
            role: RoleConfig {
                name: format!("delegation:{id}"),
                grants,
                delegate: request.allow_subdelegation,
                max_delegation_ttl: parent.max_ttl,
                max_delegation_depth: parent.max_depth,
                ..RoleConfig::default()
            },
            id: id.clone(),
            key_sha256: identity::hash_key(&key),
            chain,
            label: request.label.clone(),
            created: now,
            expires,
            max_requests,
            used: AtomicU64::new(0),
            revoked: AtomicBool::new(false),
            expiry_reported: AtomicBool::new(false),
            revoke_on_failure: request.revoke_on_failure,
            allow_subdelegation: request.allow_subdelegation,
            depth: parent.depth + 1,
            max_depth: parent.max_depth,
            max_ttl: parent.max_ttl,
        });
        self.by_hash.write().expect("delegations lock").insert(delegation.key_sha256, delegation.clone());
        self.by_id.write().expect("delegations lock").insert(id, delegation.clone());
        Ok((delegation, key))
    }

    /// The delegation a key belongs to: `None` if it is not a child key at all.
    pub fn identify(&self, key: &str) -> Option<Result<Arc<Delegation>, ProxyError>> {
        let hash = identity::hash_key(key);
        let found = self.by_hash.read().expect("delegations lock").get(&hash).cloned()?;
        if found.is_revoked() {
            return Some(Err(ProxyError::DelegationRevoked { id: found.id.clone() }));
        }
        if self.clock.now() >= found.expires {
            return Some(Err(ProxyError::DelegationExpired { id: found.id.clone() }));
        }
        Some(Ok(found))
    }

    /// Adds delegations minted on other replicas (records from Redis); returns how many were new.
    pub fn import(&self, records: &[serde_json::Value]) -> usize {
        let mut added = 0;
        for record in records {
            let Some(id) = record["id"].as_str() else { continue };
            if self.by_id.read().expect("delegations lock").contains_key(id) {
                continue;
            }
            let Some(delegation) = import(record).map(Arc::new) else {
                tracing::warn!(id, "a shared delegation record could not be read; ignored");
                continue;
            };
            if self.clock.now() >= delegation.expires + REMEMBER {
                continue;
            }
            self.by_hash.write().expect("delegations lock").insert(delegation.key_sha256, delegation.clone());
            self.by_id.write().expect("delegations lock").insert(id.to_string(), delegation);
            added += 1;
        }
        added
    }

    /// Every delegation still remembered, oldest first, with its use count and revocation: for
    /// the local state file (`persist`).
    pub fn export_all(&self) -> Vec<serde_json::Value> {
        let mut all: Vec<Arc<Delegation>> = self.by_id.read().expect("delegations lock").values().cloned().collect();
        all.sort_by_key(|d| d.created);
        all.iter()
            .map(|d| {
                let mut record = export(d);
                record["used"] = d.used().into();
                record["revoked"] = d.is_revoked().into();
                record
            })
            .collect()
    }

    /// Puts back delegations saved by `export_all`, at start. Unless `counts_exact` (the last
    /// run stopped cleanly), each one with a request budget is revoked: its count may be short.
    /// Returns how many were restored and the ids revoked for that reason.
    pub fn restore(&self, records: &[serde_json::Value], counts_exact: bool) -> (usize, Vec<String>) {
        self.import(records);
        let mut uncounted = Vec::new();
        for record in records {
            let Some(d) = record["id"].as_str().and_then(|id| self.get(id)) else { continue };
            d.used.store(record["used"].as_u64().unwrap_or(0), Ordering::SeqCst);
            if record["revoked"].as_bool() != Some(false) {
                d.revoked.store(true, Ordering::SeqCst);
            } else if !counts_exact && d.max_requests.is_some() && d.expires > self.clock.now() {
                d.revoked.store(true, Ordering::SeqCst);
                uncounted.push(d.id.clone());
            }
        }
        (self.by_id.read().expect("delegations lock").len(), uncounted)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Delegation>> {
        self.by_id.read().expect("delegations lock").get(id).cloned()
    }

    /// Revokes `id` and every delegation below it; returns the ids newly revoked.
    pub fn revoke(&self, id: &str) -> Vec<String> {
        self.revoke_where(|d| d.id == id || d.chain.iter().any(|c| c == id))
    }

    /// Revokes every delegation minted, directly or not, by the agent `agent_id`.
    pub fn revoke_rooted_at(&self, agent_id: &str) -> Vec<String> {
        self.revoke_where(|d| d.chain.last().is_some_and(|root| root == agent_id))
    }

    fn revoke_where(&self, matches: impl Fn(&Delegation) -> bool) -> Vec<String> {
        let mut revoked: Vec<String> = self
            .by_id
            .read()
            .expect("delegations lock")
            .values()
            .filter(|d| matches(d))
            .filter(|d| !d.revoked.swap(true, Ordering::SeqCst))
            .map(|d| d.id.clone())
            .collect();
        revoked.sort();
        revoked
    }

    /// Live (unexpired, unrevoked) delegations, oldest first.
    pub fn live(&self) -> Vec<Arc<Delegation>> {
        let now = self.clock.now();
        let mut live: Vec<Arc<Delegation>> = self
            .by_id
            .read()
            .expect("delegations lock")
            .values()
            .filter(|d| !d.is_revoked() && d.expires > now)
            .cloned()
            .collect();
        live.sort_by_key(|d| d.created);
        live
    }

    /// Reports each newly expired delegation once, and forgets those expired or revoked long ago.
    pub fn sweep(&self) -> Vec<Arc<Delegation>> {
        let now = self.clock.now();
        let mut newly_expired = Vec::new();
        let mut forget = Vec::new();
        for d in self.by_id.read().expect("delegations lock").values() {
            if d.expires <= now && !d.is_revoked() && !d.expiry_reported.swap(true, Ordering::SeqCst) {
                newly_expired.push(d.clone());
            }
            if d.expires + REMEMBER <= now {
                forget.push((d.id.clone(), d.key_sha256));
            }
        }
        if !forget.is_empty() {
            let mut by_id = self.by_id.write().expect("delegations lock");
            let mut by_hash = self.by_hash.write().expect("delegations lock");
            for (id, hash) in forget {
                by_id.remove(&id);
                by_hash.remove(&hash);
            }
        }
        newly_expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct ManualClock(Mutex<SystemTime>);

    impl Clock for ManualClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    impl ManualClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    fn grant(route: &str, secret: &str, methods: &[&str], paths: &[&str]) -> GrantConfig {
        GrantConfig {
            route: route.into(),
            secret: secret.into(),
            methods: MethodSet::parse(&methods.iter().map(|m| m.to_string()).collect::<Vec<_>>()).unwrap(),
            paths: paths.iter().map(|p| PathPattern::parse(p).unwrap()).collect(),
            quota: None,
            scope: Default::default(),
        }
    }

    fn parent_role() -> RoleConfig {
        RoleConfig {
            name: "lead".into(),
            grants: vec![
                grant("openai", "OPENAI_API_KEY", &["POST"], &["/v1/chat/completions", "/v1/responses"]),
                grant("github", "GITHUB_TOKEN", &["GET"], &["/repos/**"]),
            ],
            ..RoleConfig::default()
        }
    }

    fn delegator(role: &RoleConfig) -> Delegator<'_> {
        Delegator {
            id: "lead-1",
            role,
            chain: &[],
            may_delegate: true,
            max_ttl: Duration::from_secs(3600),
            depth: 0,
            max_depth: 2,
            expires: None,
            budget_left: None,
        }
    }

    fn request(secretref: &[&str], routes: &[&str], methods: &[&str], paths: &[&str]) -> DelegationRequest {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        DelegationRequest {
            secretref: v(secretref),
            routes: v(routes),
            methods: v(methods),
            paths: v(paths),
            ttl_seconds: Some(600),
            max_requests: None,
            label: Some("summarise-report-42".into()),
            revoke_on_failure: false,
            allow_subdelegation: false,
            auto_reveal: None,
        }
    }

    #[test]
    fn labels_with_line_separators_or_display_controls_are_refused() {
        let clock = Arc::new(ManualClock(Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))));
        let store = DelegationStore::new(clock);
        let role = parent_role();
        let parent = delegator(&role);
        for bad in ["a\u{2028}b", "a\u{2029}b", "a\u{85}b", "report\u{202e}fdp.exe", "a\u{2066}b", "a\u{200b}b", "a\nb"]
        {
            let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/chat/completions"]);
            req.label = Some(bad.to_string());
            match store.mint(&parent, &req) {
                Err(MintError::Invalid(message)) => assert!(message.contains("label"), "{message}"),
                _ => panic!("label {bad:?} was accepted"),
            }
        }
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/chat/completions"]);
        req.label = Some("résumé 報告 42".to_string());
        assert!(store.mint(&parent, &req).is_ok());
    }

    #[test]
    fn rights_only_narrow_and_every_excess_is_named() {
        let role = parent_role();
        let parent = delegator(&role);
        let ok =
            narrow(&parent, &request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/chat/completions"])).unwrap();
        assert_eq!(ok.len(), 1);
        assert!(narrow(&parent, &request(&["GITHUB_TOKEN"], &["github"], &["GET"], &["/repos/o/r/**"])).is_ok());
        let cases = [
            (
                request(&["ANTHROPIC_API_KEY"], &["openai"], &["POST"], &["/v1/chat/completions"]),
                "secretref 'ANTHROPIC_API_KEY'",
            ),
            (request(&["OPENAI_API_KEY"], &["anthropic"], &["POST"], &["/v1/messages"]), "route 'anthropic'"),
            (request(&["OPENAI_API_KEY"], &["openai"], &["DELETE"], &["/v1/chat/completions"]), "method DELETE"),
            (request(&["OPENAI_API_KEY"], &["openai"], &["*"], &["/v1/chat/completions"]), "method *"),
            (request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/files"]), "path '/v1/files'"),
            (request(&["GITHUB_TOKEN"], &["github"], &["GET"], &["/**"]), "path '/**'"),
        ];
        for (req, excess) in cases {
            let err = narrow(&parent, &req).unwrap_err();
            assert!(err.contains(excess), "expected {excess} in {err}");
        }
        let no = Delegator { may_delegate: false, ..delegator(&role) };
        assert!(
            narrow(&no, &request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]))
                .unwrap_err()
                .contains("may not delegate")
        );
    }

    #[test]
    fn ttl_depth_budget_expiry_and_cascading_revocation() {
        let clock = Arc::new(ManualClock(Mutex::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))));
        let store = DelegationStore::new(clock.clone());
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/chat/completions"]);
        req.ttl_seconds = Some(7200);
        assert!(
            matches!(store.mint(&delegator(&role), &req), Err(MintError::Excess(e)) if e.contains("exceeds the limit of 3600"))
        );

        req.ttl_seconds = Some(60);
        req.allow_subdelegation = true;
        req.max_requests = Some(2);
        let (child, child_key) = store.mint(&delegator(&role), &req).unwrap();
        assert_eq!(child.chain, vec!["lead-1"]);
        req.allow_subdelegation = false;
        req.ttl_seconds = Some(30);
        let (grandchild, grandchild_key) = store.mint(&child.as_delegator(), &req).unwrap();
        assert_eq!(grandchild.chain, vec![child.id.clone(), "lead-1".to_string()]);
        // Depth 3 is over the limit of 2, and the grandchild may not sub-delegate anyway.
        let too_deep = Delegator { may_delegate: true, ..grandchild.as_delegator() };
        assert!(matches!(store.mint(&too_deep, &req), Err(MintError::Excess(e)) if e.contains("depth 3")));
        // A child cannot outlive its parent: its expiry is clamped to the parent's.
        req.ttl_seconds = Some(120);
        let (clamped, _) = store.mint(&child.as_delegator(), &req).unwrap();
        assert_eq!(clamped.expires, child.expires);

        // The request budget is exact.
        let lineage = store.lineage(&child).unwrap();
        assert!(store.admit(&lineage).is_ok() && store.admit(&lineage).is_ok());
        assert_eq!(store.admit(&lineage).unwrap_err().code(), "delegation_exhausted");

        // Expiry follows the clock.
        assert!(store.identify(&grandchild_key).unwrap().is_ok());
        clock.advance(Duration::from_secs(31));
        assert_eq!(store.identify(&grandchild_key).unwrap().unwrap_err().code(), "delegation_expired");
        assert_eq!(store.sweep().len(), 1);
        assert!(store.sweep().is_empty(), "expiry is reported once");

        // Revoking the child revokes everything below it at once.
        let revoked = store.revoke(&child.id);
        assert!(revoked.contains(&child.id) && revoked.contains(&grandchild.id));
        assert_eq!(store.identify(&child_key).unwrap().unwrap_err().code(), "delegation_revoked");
        assert!(store.identify("kw_not-a-child").is_none());
        assert!(store.live().is_empty());
    }

    #[test]
    fn a_child_budget_fits_inside_the_parents_remaining_budget() {
        let store = DelegationStore::default();
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]);
        req.allow_subdelegation = true;
        req.max_requests = Some(5);
        let (child, _) = store.mint(&delegator(&role), &req).unwrap();
        store.admit(&store.lineage(&child).unwrap()).unwrap();
        req.max_requests = Some(5);
        assert!(
            matches!(store.mint(&child.as_delegator(), &req), Err(MintError::Excess(e)) if e.contains("remaining budget of 4"))
        );
        req.max_requests = None;
        let (grandchild, _) = store.mint(&child.as_delegator(), &req).unwrap();
        assert_eq!(grandchild.max_requests, Some(4));
    }

    #[test]
    fn saved_delegations_come_back_with_counts_and_revocations() {
        let store = DelegationStore::default();
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]);
        req.allow_subdelegation = true;
        let (open, open_key) = store.mint(&delegator(&role), &req).unwrap();
        req.max_requests = Some(5);
        let (budgeted, budgeted_key) = store.mint(&delegator(&role), &req).unwrap();
        let (revoked, revoked_key) = store.mint(&delegator(&role), &req).unwrap();
        store.admit(&store.lineage(&budgeted).unwrap()).unwrap();
        store.admit(&store.lineage(&open).unwrap()).unwrap();
        store.revoke(&revoked.id);
        let saved = store.export_all();
        assert!(saved.iter().all(|r| r.get("key").is_none()), "only hashes are saved");

        // After a clean stop: everything as it was.
        let after_clean = DelegationStore::default();
        assert_eq!(after_clean.restore(&saved, true), (3, vec![]));
        assert_eq!(after_clean.identify(&budgeted_key).unwrap().unwrap().used(), 1);
        assert_eq!(after_clean.identify(&open_key).unwrap().unwrap().used(), 1);
        assert_eq!(after_clean.identify(&revoked_key).unwrap().unwrap_err().code(), "delegation_revoked");

        // After a crash: a budgeted key's count may be short, so it is revoked; the rest stand.
        let after_crash = DelegationStore::default();
        assert_eq!(after_crash.restore(&saved, false), (3, vec![budgeted.id.clone()]));
        assert_eq!(after_crash.identify(&budgeted_key).unwrap().unwrap_err().code(), "delegation_revoked");
        assert!(after_crash.identify(&open_key).unwrap().is_ok());
        assert_eq!(after_crash.identify(&revoked_key).unwrap().unwrap_err().code(), "delegation_revoked");
    }

    #[test]
    fn revoking_an_agent_revokes_its_whole_tree() {
        let store = DelegationStore::default();
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]);
        req.allow_subdelegation = true;
        let (child, _) = store.mint(&delegator(&role), &req).unwrap();
        let (_, grandchild_key) = store.mint(&child.as_delegator(), &req).unwrap();
        assert_eq!(store.revoke_rooted_at("lead-1").len(), 2);
        assert_eq!(store.identify(&grandchild_key).unwrap().unwrap_err().code(), "delegation_revoked");
    }

    #[test]
    fn the_budget_is_exact_under_contention() {
        let store = DelegationStore::default();
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]);
        req.max_requests = Some(50);
        let (child, _) = store.mint(&delegator(&role), &req).unwrap();
        let lineage = store.lineage(&child).unwrap();
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        if store.admit(&lineage).is_ok() {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn a_budget_bounds_the_whole_subtree_under_contention() {
        let store = DelegationStore::default();
        let role = parent_role();
        let mut req = request(&["OPENAI_API_KEY"], &["openai"], &["POST"], &["/v1/responses"]);
        req.allow_subdelegation = true;
        req.max_requests = Some(2);
        let (child, _) = store.mint(&delegator(&role), &req).unwrap();
        // Four grandchildren, each given the child's whole remaining budget of 2, and one
        // grandchild with no budget of its own.
        let mut lineages: Vec<Vec<Arc<Delegation>>> =
            (0..4).map(|_| store.lineage(&store.mint(&child.as_delegator(), &req).unwrap().0).unwrap()).collect();
        req.max_requests = None;
        let (unbudgeted, _) = store.mint(&child.as_delegator(), &req).unwrap();
        assert_eq!(unbudgeted.max_requests, Some(2), "a child without a budget gets what its parent has left");
        lineages.push(store.lineage(&unbudgeted).unwrap());
        assert_eq!(lineages[0].len(), 2, "the grandchild, then the child");
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for lineage in &lineages {
                let (store, admitted) = (&store, &admitted);
                s.spawn(move || {
                    for _ in 0..10 {
                        if store.admit(lineage).is_ok() {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 2, "the child's budget of 2 bounds its subtree");
        assert_eq!(child.used(), 2);
        for lineage in &lineages {
            assert_eq!(store.admit(lineage).unwrap_err().code(), "delegation_exhausted");
        }
        let untouched = lineages.iter().find(|l| l[0].used() == 0).expect("at most two grandchildren made calls");
        assert_eq!(store.admit(untouched).unwrap_err(), ProxyError::DelegationExhausted { id: child.id.clone() });
        // The child's own remaining budget is gone too: it cannot mint more.
        req.max_requests = Some(1);
        assert!(matches!(store.mint(&child.as_delegator(), &req), Err(MintError::Excess(_))));
    }
}
