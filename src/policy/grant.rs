//! What a role grants: a route, a secret, methods, path patterns and a quota. Pure types that
//! `config` builds and authorization reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{MethodSet, PathPattern};

#[derive(Debug, Clone, Default)]
pub struct GrantConfig {
    pub route: String,
    pub secret: String,
    pub methods: MethodSet,
    pub paths: Vec<PathPattern>,
    /// The grant's quota, or its role's default; keyed by (agent, route).
    pub quota: Option<Quota>,
    /// `Shadow`: the grant still lets its calls through, but a call no enforced grant allows is
    /// recorded as `would_deny` (how a grant is withdrawn without breaking agents).
    pub mode: Mode,
    /// `Shadow`: a call over the quota goes through and is recorded as `would_deny`.
    pub quota_mode: Mode,
    /// What a minted credential for this grant is narrowed to (`github-app`: repositories and
    /// permissions); empty for other secrets.
    pub scope: Arc<MintScope>,
}

/// Enforce refuses; shadow decides as usual, records `would_deny` when it would refuse, and
/// lets the call through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "enforce" => Some(Mode::Enforce),
            "shadow" => Some(Mode::Shadow),
            _ => None,
        }
    }
}

/// `count` requests per `period`, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub count: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Quota {
    /// `"60/min"`, `"5/s"`, `"1000/h"` (also `/sec`, `/second`, `/m`, `/minute`, `/hour`).
    pub fn parse(rate: &str, burst: Option<u32>) -> Result<Quota, String> {
        let (count, unit) = rate.split_once('/').ok_or_else(|| format!("'{rate}' is not a rate like \"60/min\""))?;
        let count: u32 = count.trim().parse().map_err(|_| format!("'{rate}': the count must be a whole number"))?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => return Err(format!("'{rate}': unknown unit '{other}' (use /s, /min or /h)")),
        };
        if count == 0 {
            return Err(format!("'{rate}': the count must be at least 1"));
        }
        let burst = burst.unwrap_or(count);
        if burst == 0 {
            return Err("burst must be at least 1".to_string());
        }
        Ok(Quota { count, period, burst })
    }

    /// The time one request's worth of quota takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count
    }
}

/// What a grant narrows a minted token to (GitHub App: repositories and permissions). Empty:
/// whatever the kind's config grants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct MintScope {
    /// Repository names (without the owner), as GitHub's `repositories` takes them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// Permission name → `read`, `write` or `admin`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, String>,
}

impl MintScope {
    pub fn is_empty(&self) -> bool {
        self.repositories.is_empty() && self.permissions.is_empty()
    }
}
