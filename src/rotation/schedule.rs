//! Scheduled rotation: each source's cron schedule (UTC) starts a run, and the
//! `rotation.notified` notice goes out `notify_ahead_hours` before it. Schedules are re-read from
//! the current config on every tick, so a reload takes effect without a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{Phases, Trigger, rotate};
use crate::audit::AuditEvent;
use crate::state::AppState;

const TICK: Duration = Duration::from_millis(250);

/// The next scheduled run of one source, and whether its notice went out.
struct Planned {
    schedule: String,
    at: DateTime<Utc>,
    notified: bool,
}

pub async fn run(state: Arc<AppState>, mut shutdown: watch::Receiver<bool>) {
    let mut plans: HashMap<String, Planned> = HashMap::new();
    loop {
        let runtime = state.runtime.load_full();
        let now = Utc::now();
        let mut seen = Vec::new();
        for source in &runtime.config.sources {
            let Some(policy) = source.rotation.as_ref().filter(|p| p.enabled) else { continue };
            let Some(schedule) = &policy.schedule else { continue };
            seen.push(source.name.clone());
            let plan = plans.entry(source.name.clone()).or_insert_with(|| Planned {
                schedule: schedule.text.clone(),
                at: schedule.next_after(now).unwrap_or(DateTime::<Utc>::MAX_UTC),
                notified: false,
            });
            if plan.schedule != schedule.text {
                *plan = Planned {
                    schedule: schedule.text.clone(),
                    at: schedule.next_after(now).unwrap_or(DateTime::<Utc>::MAX_UTC),
                    notified: false,
                };
            }
            let ahead = chrono::Duration::from_std(policy.notify_ahead).unwrap_or_default();
            if !plan.notified && now >= plan.at.checked_sub_signed(ahead).unwrap_or(DateTime::<Utc>::MIN_UTC) {
                plan.notified = true;
                let phases = Phases { state: &state, policy, source: &source.name, trigger: Trigger::Scheduled };
                phases.event(AuditEvent::RotationNotified {
                    rotation: phases.of(),
                    reason: "scheduled rotation coming up".into(),
                    scheduled_at: Some(crate::timestamp::seconds(plan.at)),
                });
            }
            if now >= plan.at {
                plan.at = schedule.next_after(now).unwrap_or(DateTime::<Utc>::MAX_UTC);
                plan.notified = false;
                let state = state.clone();
                let name = source.name.clone();
                tokio::spawn(async move {
                    if let Err(error) = rotate(&state, &name, Trigger::Scheduled, None).await {
                        tracing::warn!(source = %name, %error, "scheduled rotation did not promote");
                    }
                });
            }
        }
        plans.retain(|name, _| seen.contains(name));
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}
