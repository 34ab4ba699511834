//! A secret source's validated settings: which provider, which names it serves, how they are
//! cached and rotated. Pure types: `config` builds them, the cache and rotation read them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::ProviderConfig;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub provider: ProviderConfig,
    /// Secret name → which part of the source's document holds it. A file source written without
    /// a mapping gets one entry per key of its file, read when the config is loaded.
    pub mapping: BTreeMap<String, Selector>,
    pub cache: CachePolicy,
    pub rotation: Option<RotationPolicy>,
    /// The source to use when this one cannot be fetched or its credential is refused.
    pub fallback_to: Option<String>,
}

impl SourceConfig {
    /// The rotation policy in words, for reports and the admin API.
    pub fn rotation_summary(&self) -> String {
        match &self.rotation {
            None => "no rotation policy configured".to_string(),
            Some(p) if !p.enabled => "rotation disabled".to_string(),
            Some(p) => {
                let when =
                    p.schedule.as_ref().map_or("manual only".to_string(), |s| format!("schedule '{}' UTC", s.text));
                format!("{when}, grace {} min", p.grace_period.as_secs() / 60)
            }
        }
    }

    /// Whether a cache built for `self` can keep serving `other`: same store, same mapping,
    /// same cache policy. Rotation settings may differ.
    pub fn same_store(&self, other: &SourceConfig) -> bool {
        self.name == other.name
            && self.provider == other.provider
            && self.mapping == other.mapping
            && self.cache == other.cache
    }
}

/// The article's `rotationPolicy`.
#[derive(Debug, Clone)]
pub struct RotationPolicy {
    pub enabled: bool,
    /// When scheduled rotation runs (UTC); `None`: only on the manual trigger.
    pub schedule: Option<Schedule>,
    /// How long the previous version stays usable where the new one is refused upstream.
    pub grace_period: Duration,
    /// Where each phase is POSTed as JSON.
    pub notify: Option<String>,
    /// How long before a scheduled run the `rotation.notified` notice goes out.
    pub notify_ahead: Duration,
}

/// A cron schedule: 5 fields (minute hour day month weekday), or 6 with seconds first, in UTC.
#[derive(Clone)]
pub struct Schedule {
    pub text: String,
    pub cron: croner::Cron,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, String> {
        use croner::parser::{CronParser, Seconds};
        let fields = text.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!("'{text}' has {fields} fields; use 5 (minute hour day month weekday), UTC"));
        }
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        let cron = parser.parse(text).map_err(|e| Schedule::explain(text, &e.to_string()))?;
        Ok(Schedule { text: text.to_string(), cron })
    }

    /// Names the field a refused schedule fails on: each field is parsed alone, the others `*`.
    fn explain(text: &str, error: &str) -> String {
        use croner::parser::{CronParser, Seconds};
        const FIELDS: [(&str, &str); 6] = [
            ("second", "0-59"),
            ("minute", "0-59"),
            ("hour", "0-23"),
            ("day-of-month", "1-31"),
            ("month", "1-12 or JAN-DEC"),
            ("day-of-week", "0-7 or SUN-SAT"),
        ];
        let parts: Vec<&str> = text.split_whitespace().collect();
        let names = if parts.len() == 6 { &FIELDS[..] } else { &FIELDS[1..] };
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        for (i, ((name, range), part)) in names.iter().zip(&parts).enumerate() {
            let alone: Vec<&str> = (0..parts.len()).map(|j| if j == i { *part } else { "*" }).collect();
            if let Err(e) = parser.parse(&alone.join(" ")) {
                let why = if e.to_string().contains("out of bounds") { "is out of range" } else { "is not valid" };
                return format!("'{text}': the {name} field '{part}' {why} (allowed: {range}, with * , - /)");
            }
        }
        format!("'{text}' is not a cron schedule: {error}")
    }

    /// The first time strictly after `after` that the schedule fires.
    pub fn next_after(&self, after: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

/// `{{FIELD}}` selects a field of a JSON document (or an env var); `{{.}}` the whole value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Whole,
    Field(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Zero means runtime reveal: fetch for every request.
    pub ttl: Duration,
    pub max_size: usize,
    /// How long past expiry a cached value may still be served while the store is down. Zero: fail closed.
    pub stale_if_error: Duration,
}
