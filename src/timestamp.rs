//! RFC 3339 timestamps in UTC, the one form keyward writes them in: audit records, admin views,
//! webhook bodies and rotated file names.

use std::time::SystemTime;

/// `2026-11-23T22:05:00.123Z`: audit records' `timestamp`.
pub fn millis(at: impl Into<SystemTime>) -> String {
    humantime::format_rfc3339_millis(at.into()).to_string()
}

/// `2026-11-23T22:05:00Z`: times shown to people (expiries, report periods, schedules).
pub fn seconds(at: impl Into<SystemTime>) -> String {
    humantime::format_rfc3339_seconds(at.into()).to_string()
}

/// `millis` of now.
pub fn now_millis() -> String {
    millis(SystemTime::now())
}

/// `2026-11-23`: the UTC date, for daily rotation.
pub fn date(at: impl Into<SystemTime>) -> String {
    let mut text = seconds(at);
    text.truncate(10);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn every_form_is_utc_with_a_z() {
        let at = UNIX_EPOCH + Duration::from_millis(1_795_471_500_123);
        assert_eq!(millis(at), "2026-11-23T22:05:00.123Z");
        assert_eq!(seconds(at), "2026-11-23T22:05:00Z");
        assert_eq!(date(at), "2026-11-23");
        let chrono_at: chrono::DateTime<chrono::Utc> = at.into();
        assert_eq!(seconds(chrono_at), "2026-11-23T22:05:00Z");
    }
}
