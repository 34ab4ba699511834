//! `[limits]` (the shared-state backend and where alerts go) and each role's `anomaly` detectors.

use std::time::Duration;

use super::super::raw::{RawAnomaly, RawDetector, RawLimits};
use super::super::{AnomalyAction, AnomalyConfig, Detector, LimitsBackend, LimitsConfig};
use super::Collector;

pub(super) fn limits(c: &mut Collector<'_>, raw: RawLimits) -> LimitsConfig {
    let backend = match raw.backend.as_deref().unwrap_or("local") {
        "local" => LimitsBackend::Local,
        "redis" => match raw.redis_url.clone() {
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => LimitsBackend::Redis { url },
            Some(url) => {
                c.problem("limits.redis_url", format!("'{url}' is not a redis:// URL"));
                LimitsBackend::Local
            }
            None => {
                c.problem("limits.redis_url", "is required with backend = \"redis\"");
                LimitsBackend::Local
            }
        },
        other => {
            c.problem("limits.backend", format!("'{other}' is not \"local\" or \"redis\""));
            LimitsBackend::Local
        }
    };
    let fail_open = match raw.redis_failure.as_deref().unwrap_or("fail_open") {
        "fail_open" => true,
        "fail_closed" => false,
        other => {
            c.problem("limits.redis_failure", format!("'{other}' is not \"fail_open\" or \"fail_closed\""));
            true
        }
    };
    if let Some(url) = &raw.notify
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        c.problem("limits.notify", "must be an http:// or https:// URL");
    }
    LimitsConfig { backend, fail_open, notify: raw.notify }
}

fn action(c: &mut Collector<'_>, field: &str, text: Option<&str>) -> AnomalyAction {
    match text.unwrap_or("alert") {
        "alert" => AnomalyAction::Alert,
        "throttle" => AnomalyAction::Throttle,
        "quarantine" => AnomalyAction::Quarantine,
        other => {
            c.problem(field, format!("'{other}' is not alert, throttle or quarantine"));
            AnomalyAction::Alert
        }
    }
}

/// `"08:00-20:00"` → minutes after midnight.
fn hours(text: &str) -> Option<(u32, u32)> {
    let minute = |t: &str| {
        let (h, m) = t.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
    };
    let (start, end) = text.split_once('-')?;
    Some((minute(start)?, minute(end)?))
}

/// `"+08:00"`, `"-05:30"` or `"UTC"` → minutes east of UTC.
fn utc_offset(text: &str) -> Option<i32> {
    if text == "UTC" || text == "Z" {
        return Some(0);
    }
    let sign = match text.chars().next()? {
        '+' => 1,
        '-' => -1,
        _ => return None,
    };
    let (h, m) = text[1..].split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 14 && m < 60).then_some(sign * (h * 60 + m))
}

/// Detectors default to alert-only; a `[roles.X.anomaly]` table tunes or turns them off.
pub(super) fn anomaly(c: &mut Collector<'_>, at: &str, raw: RawAnomaly) -> AnomalyConfig {
    let mut build = |name: &str, raw: Option<RawDetector>, on_by_default: bool| -> Option<Detector> {
        let field = format!("{at}.{name}");
        let raw = match raw {
            Some(r) if !r.enabled => return None,
            Some(r) => r,
            None if on_by_default => RawDetector::default(),
            None => return None,
        };
        let action = action(c, &format!("{field}.action"), raw.action.as_deref());
        let active_minutes = raw.active_hours.as_deref().map(|text| {
            hours(text).unwrap_or_else(|| {
                c.problem(format!("{field}.active_hours"), format!("'{text}' is not a window like \"08:00-20:00\""));
                (0, 1440)
            })
        });
        let utc_offset_minutes = raw.utc_offset.as_deref().map_or(0, |text| {
            utc_offset(text).unwrap_or_else(|| {
                c.problem(format!("{field}.utc_offset"), format!("'{text}' is not an offset like \"+08:00\""));
                0
            })
        });
        let throttle_fraction = raw.throttle_fraction.unwrap_or(0.25);
        if !(throttle_fraction > 0.0 && throttle_fraction < 1.0) {
            c.problem(format!("{field}.throttle_fraction"), "must be between 0 and 1");
        }
        Some(Detector {
            action,
            factor: raw.factor.unwrap_or(10.0),
            floor_per_minute: raw.floor_per_minute.unwrap_or(60),
            threshold: raw.threshold.unwrap_or(20),
            window: Duration::from_secs(raw.window_seconds.unwrap_or(60)),
            active_minutes,
            utc_offset_minutes,
            throttle_fraction,
            cooldown: Duration::from_secs(raw.cooldown_seconds.unwrap_or(900)),
        })
    };
    let config = AnomalyConfig {
        rate_spike: build("rate_spike", raw.rate_spike, true),
        failure_burst: build("failure_burst", raw.failure_burst, true),
        off_hours: build("off_hours", raw.off_hours, false),
        first_use: build("first_use", raw.first_use, true),
    };
    if config.off_hours.as_ref().is_some_and(|d| d.active_minutes.is_none()) {
        c.problem(format!("{at}.off_hours.active_hours"), "is required for the off_hours detector");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::super::table::check;

    #[test]
    fn limits_and_anomaly_problems_are_reported_with_their_lines() {
        check(&[
            (
                "a valid Redis backend",
                "[limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nredis_failure = \"fail_closed\"\n",
                &[],
            ),
            (
                "an unknown backend",
                "[limits]\nbackend = \"memcached\"\n",
                &["k.toml:2: limits.backend: 'memcached' is not \"local\" or \"redis\""],
            ),
            (
                "Redis without a URL",
                "[limits]\nbackend = \"redis\"\n",
                &["k.toml:1: limits.redis_url: is required with backend = \"redis\""],
            ),
            (
                "Redis with another URL, an unknown failure mode and a bad notify URL",
                "[limits]\nbackend = \"redis\"\nredis_url = \"http://x\"\nredis_failure = \"shrug\"\nnotify = \"ftp://x\"\n",
                &[
                    "k.toml:3: limits.redis_url: 'http://x' is not a redis:// URL",
                    "k.toml:4: limits.redis_failure: 'shrug' is not \"fail_open\" or \"fail_closed\"",
                    "k.toml:5: limits.notify: must be an http:// or https:// URL",
                ],
            ),
            (
                "detector settings out of range",
                "[roles.r.anomaly.rate_spike]\naction = \"explode\"\nthrottle_fraction = 1.5\n[roles.r.anomaly.off_hours]\nactive_hours = \"8-20\"\nutc_offset = \"CET\"\n",
                &[
                    "k.toml:2: roles.r.anomaly.rate_spike.action: 'explode' is not alert, throttle or quarantine",
                    "k.toml:3: roles.r.anomaly.rate_spike.throttle_fraction: must be between 0 and 1",
                    "k.toml:5: roles.r.anomaly.off_hours.active_hours: '8-20' is not a window like \"08:00-20:00\"",
                    "k.toml:6: roles.r.anomaly.off_hours.utc_offset: 'CET' is not an offset like \"+08:00\"",
                ],
            ),
            (
                "off hours without a window",
                "[roles.r.anomaly.off_hours]\naction = \"alert\"\n",
                &["k.toml:1: roles.r.anomaly.off_hours.active_hours: is required for the off_hours detector"],
            ),
        ]);
    }
}
