//! Every credential value keyward may still send or see echoed, per (source, secret name), and
//! the response scrubber built from them.
//!
//! A source's current value is joined by the values it replaced: a rotation's previous version
//! (tagged with the rotation's epoch, purged when its grace period ends) and values a plain
//! re-fetch replaced (untagged, a few kept, since requests may still hold them). It keeps values
//! even when the cache does not (`ttl_seconds = 0`), so that an echo can still be recognised.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};

use crate::scrub::{MIN_SCRUB_LEN, Scrubber};

/// Untagged replaced values kept per (source, name): in-flight requests may still hold them.
const KEEP_REPLACED: usize = 3;

#[derive(Default)]
struct Entry {
    current: Option<SecretString>,
    /// Replaced values, with the rotation epoch that purges them (`None`: dropped by age).
    replaced: Vec<(SecretString, Option<u64>)>,
}

impl Entry {
    fn holds(&self, value: &SecretString) -> bool {
        let same = |v: &SecretString| v.expose_secret() == value.expose_secret();
        self.current.as_ref().is_some_and(same) || self.replaced.iter().any(|(v, _)| same(v))
    }

    fn retire(&mut self, value: SecretString, tag: Option<u64>) {
        self.replaced.push((value, tag));
        while self.replaced.iter().filter(|(_, t)| t.is_none()).count() > KEEP_REPLACED {
            let oldest = self.replaced.iter().position(|(_, t)| t.is_none()).expect("counted above");
            self.replaced.remove(oldest);
        }
    }
}

/// How a batch of fetched values joins what is held.
#[derive(Clone, Copy)]
pub enum Adopt {
    /// They become current; the values they replace are kept untagged.
    Current,
    /// A rotation's swap: they become current; the values they replace are purged with `epoch`.
    Rotation { epoch: u64 },
    /// A fetch that started before rotation `epoch`: scrubbed, never current, purged with it.
    Stale { epoch: u64 },
}

pub struct Held {
    values: Mutex<BTreeMap<(String, String), Entry>>,
    scrubber: Arc<ArcSwap<Scrubber>>,
    /// Secret names whose values are never sent anywhere (the private keys minted kinds sign
    /// with), so they are not scrubbed for (see `Kind::ROOT_SENT`).
    kept_out: Mutex<HashSet<String>>,
}

impl Held {
    pub fn new() -> Held {
        Held {
            values: Mutex::default(),
            scrubber: Arc::new(ArcSwap::from_pointee(Scrubber::empty())),
            kept_out: Mutex::default(),
        }
    }

    /// Names whose values stay out of the scrubber from now on (and leave it if they are in it).
    pub fn keep_out(&self, names: HashSet<String>) {
        let mut held = self.values.lock().expect("held secrets lock poisoned");
        let before = held.len();
        held.retain(|(source, name), _| source.starts_with("minted ") || !names.contains(name));
        *self.kept_out.lock().expect("held secrets lock poisoned") = names;
        if held.len() != before {
            self.rebuild(&held);
        }
    }

    pub fn scrubber(&self) -> &Arc<ArcSwap<Scrubber>> {
        &self.scrubber
    }

    pub fn update(&self, source: &str, fetched: &HashMap<String, SecretString>, how: Adopt) {
        let kept_out = self.kept_out.lock().expect("held secrets lock poisoned").clone();
        self.adopt(source, fetched, how, &kept_out);
    }

    /// A token minted from secret `name` for the cache key `key`: scrubbed while it may be in
    /// use (with the few it replaced), whatever the secret's own value is.
    pub fn minted(&self, key: &str, name: &str, token: &SecretString) {
        let values = HashMap::from([(name.to_string(), token.clone())]);
        self.adopt(&format!("minted {key}"), &values, Adopt::Current, &HashSet::new());
    }

    fn adopt(&self, source: &str, fetched: &HashMap<String, SecretString>, how: Adopt, kept_out: &HashSet<String>) {
        let mut held = self.values.lock().expect("held secrets lock poisoned");
        let mut changed = false;
        for (name, value) in fetched {
            if kept_out.contains(name) {
                continue;
            }
            let entry = held.entry((source.to_string(), name.clone())).or_default();
            if entry.current.as_ref().is_some_and(|c| c.expose_secret() == value.expose_secret()) {
                continue;
            }
            if value.expose_secret().len() < MIN_SCRUB_LEN && !entry.holds(value) {
                tracing::warn!(
                    secret = %name,
                    "secret is shorter than {MIN_SCRUB_LEN} characters, so responses are not scrubbed for it"
                );
            }
            match how {
                Adopt::Stale { epoch } => {
                    if !entry.holds(value) {
                        entry.retire(value.clone(), Some(epoch));
                        changed = true;
                    }
                }
                Adopt::Current | Adopt::Rotation { .. } => {
                    let tag = match how {
                        Adopt::Rotation { epoch } => Some(epoch),
                        _ => None,
                    };
                    entry.replaced.retain(|(v, _)| v.expose_secret() != value.expose_secret());
                    if let Some(old) = entry.current.replace(value.clone()) {
                        entry.retire(old, tag);
                    }
                    changed = true;
                }
            }
        }
        if changed {
            self.rebuild(&held);
        }
    }

    /// Ends rotation `epoch` of `source`: the values it replaced leave the scrubber and memory.
    pub fn purge(&self, source: &str, epoch: u64) {
        let mut held = self.values.lock().expect("held secrets lock poisoned");
        let mut changed = false;
        for ((owner, _), entry) in held.iter_mut() {
            if owner == source {
                let before = entry.replaced.len();
                entry.replaced.retain(|(_, tag)| *tag != Some(epoch));
                changed |= entry.replaced.len() != before;
            }
        }
        if changed {
            self.rebuild(&held);
        }
    }

    fn rebuild(&self, held: &BTreeMap<(String, String), Entry>) {
        let all = held.iter().flat_map(|((_, name), entry)| {
            entry.current.iter().chain(entry.replaced.iter().map(|(v, _)| v)).map(move |v| (name.as_str(), v))
        });
        self.scrubber.store(Arc::new(Scrubber::new(all)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &str) -> HashMap<String, SecretString> {
        [("K".to_string(), SecretString::from(v.to_string()))].into()
    }

    fn scrubs(held: &Held, text: &str) -> bool {
        held.scrubber.load().scrub(text.as_bytes()).as_ref() != text.as_bytes()
    }

    #[test]
    fn a_stale_fetch_after_a_rotation_never_displaces_the_new_value() {
        let held = Held::new();
        held.update("a", &values("old-value-000000"), Adopt::Current);
        held.update("a", &values("new-value-111111"), Adopt::Rotation { epoch: 1 });
        // A fetch that began before the swap answers with the old value.
        held.update("a", &values("old-value-000000"), Adopt::Stale { epoch: 1 });
        assert!(scrubs(&held, "old-value-000000") && scrubs(&held, "new-value-111111"));
        held.purge("a", 1);
        assert!(!scrubs(&held, "old-value-000000"), "purged with its rotation");
        assert!(scrubs(&held, "new-value-111111"), "the live value stays");
    }

    #[test]
    fn sources_sharing_a_name_keep_their_own_values() {
        let held = Held::new();
        held.update("primary", &values("primary-value-00"), Adopt::Current);
        held.update("fallback", &values("fallback-value-0"), Adopt::Current);
        held.update("primary", &values("primary-value-01"), Adopt::Rotation { epoch: 3 });
        held.purge("primary", 3);
        assert!(scrubs(&held, "fallback-value-0"), "another source's value is never purged");
        assert!(scrubs(&held, "primary-value-01"));
        assert!(!scrubs(&held, "primary-value-00"));
    }

    #[test]
    fn private_keys_stay_out_but_tokens_minted_from_them_are_scrubbed() {
        let held = Held::new();
        held.keep_out(["K".to_string()].into());
        held.update("a", &values("-----BEGIN RSA PRIVATE KEY----- canary"), Adopt::Current);
        assert!(!scrubs(&held, "-----BEGIN RSA PRIVATE KEY----- canary"));
        held.minted("K#scope", "K", &SecretString::from("ghs_minted_token_0001"));
        assert!(scrubs(&held, "ghs_minted_token_0001"));
        held.minted("K#scope", "K", &SecretString::from("ghs_minted_token_0002"));
        assert!(scrubs(&held, "ghs_minted_token_0001") && scrubs(&held, "ghs_minted_token_0002"));
        // A reload that keeps the key out again leaves the minted tokens in.
        held.keep_out(["K".to_string()].into());
        assert!(scrubs(&held, "ghs_minted_token_0002"));
    }

    #[test]
    fn replaced_values_are_bounded() {
        let held = Held::new();
        for i in 0..10 {
            held.update("a", &values(&format!("value-number-{i:04}")), Adopt::Current);
        }
        assert!(scrubs(&held, "value-number-0009") && scrubs(&held, "value-number-0006"));
        assert!(!scrubs(&held, "value-number-0005"));
    }
}
