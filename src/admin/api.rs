//! Admin API handlers over the audit trail and the secret cache. Files are read on a blocking
//! thread, line by line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::admin_error;
use crate::audit::event::Kind;
use crate::audit::read::{self, Filter};
use crate::audit::report;
use crate::state::AppState;

fn audit_files(state: &AppState) -> Vec<PathBuf> {
    state.audit.flush();
    read::expand(&[state.audit.path().to_path_buf()])
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Response> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| admin_error(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "the audit read failed"))
}

/// `GET /admin/audit?agent=&credential=&decision=&type=&since=&until=&after_seq=&limit=`
pub async fn audit(State(state): State<Arc<AppState>>, Query(filter): Query<Filter>) -> Response {
    let result = blocking(move || read::query(&audit_files(&state), &filter)).await;
    match result {
        Ok(Ok(page)) => axum::Json(page).into_response(),
        Ok(Err(message)) => admin_error(StatusCode::BAD_REQUEST, "invalid_query", &message),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    since: Option<String>,
    format: Option<String>,
}

/// `GET /admin/audit/summary?since=7d`: what the dashboard draws.
pub async fn summary(State(state): State<Arc<AppState>>, Query(q): Query<Since>) -> Response {
    let since = match read::parse_time(q.since.as_deref().unwrap_or("7d")) {
        Ok(t) => t,
        Err(message) => return admin_error(StatusCode::BAD_REQUEST, "invalid_query", &message),
    };
    let result = blocking(move || {
        let mut by_agent: BTreeMap<String, [u64; 24]> = BTreeMap::new();
        let mut by_credential: BTreeMap<String, [u64; 24]> = BTreeMap::new();
        // Only the newest denials are kept: unauthenticated traffic can produce any number.
        let mut denials: std::collections::VecDeque<Value> = std::collections::VecDeque::new();
        let mut anomalies: Vec<Value> = Vec::new();
        let mut endings = crate::audit::report::Endings::default();
        let mut would_deny = BTreeMap::new();
        let mut spend: BTreeMap<String, crate::audit::report::Spend> = BTreeMap::new();
        for record in read::records(&audit_files(&state)) {
            let Some(time) = read::timestamp(&record).filter(|t| *t >= since) else { continue };
            match Kind::of(&record) {
                Kind::Anomaly => {
                    anomalies.push(record);
                    continue;
                }
                Kind::Request => {}
                Kind::Released | Kind::Rotation | Kind::Other => continue,
            }
            endings.count(&record);
            crate::audit::report::count_would_deny(&mut would_deny, &record);
            if record.get("usage").is_some_and(Value::is_object) {
                let agent = record.get("agentId").and_then(Value::as_str).unwrap_or("(unidentified)");
                spend.entry(agent.to_string()).or_default().count(&record);
            }
            match record.get("decision").and_then(Value::as_str) {
                Some("allowed" | "would_deny") => {
                    let hour =
                        (time.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() / 3600 % 24) as usize;
                    let text = |k: &str| record.get(k).and_then(Value::as_str).unwrap_or("(none)").to_string();
                    by_agent.entry(text("agentId")).or_insert([0; 24])[hour] += 1;
                    by_credential.entry(text("credential")).or_insert([0; 24])[hour] += 1;
                }
                Some("denied") | Some("throttled") => {
                    if denials.len() == 20 {
                        denials.pop_front();
                    }
                    denials.push_back(record);
                }
                _ => {}
            }
        }
        let recent: Vec<Value> = denials.iter().rev().take(20).cloned().collect();
        let now = std::time::SystemTime::now();
        let quarantined: Vec<String> = state
            .runtime
            .load()
            .config
            .agents
            .iter()
            .filter(|a| state.limits.standing(&a.id, now).quarantined_until.is_some())
            .map(|a| a.id.clone())
            .collect();
        json!({
            "since": crate::timestamp::seconds(since),
            "heatmap": { "by_agent": by_agent, "by_credential": by_credential },
            "recent_denials": recent,
            "endings": endings,
            "anomalies": anomalies.iter().rev().take(50).collect::<Vec<_>>(),
            "quarantined": quarantined,
            "would_deny": would_deny,
            "spend": spend,
        })
    })
    .await;
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(response) => response,
    }
}

/// `GET /admin/report?since=7d&format=html|json|text`
pub async fn report(State(state): State<Arc<AppState>>, Query(q): Query<Since>) -> Response {
    let since = match read::parse_time(q.since.as_deref().unwrap_or("7d")) {
        Ok(t) => t,
        Err(message) => return admin_error(StatusCode::BAD_REQUEST, "invalid_query", &message),
    };
    let format = q.format.unwrap_or_else(|| "html".to_string());
    let config = state.runtime.load().config.clone();
    let built = blocking(move || report::build(&audit_files(&state), since, Some(&config))).await;
    let built = match built {
        Ok(r) => r,
        Err(response) => return response,
    };
    match format.as_str() {
        "json" => axum::Json(built).into_response(),
        "text" => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], report::text(&built)).into_response(),
        "html" => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], report::html(&built)).into_response(),
        other => admin_error(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            &format!("format '{other}' is not html, json or text"),
        ),
    }
}

/// `GET /admin/secrets`: name, source, version, fetched and expiry times, the last rotation and
/// the next scheduled one, the secret's kind and, for a minted kind, each token's scope and
/// expiry. Never a value.
pub async fn secrets(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime.load();
    let now = chrono::Utc::now();
    let secrets: Vec<Value> = runtime
        .secrets
        .status()
        .into_iter()
        .map(|s| {
            let source = runtime.config.sources.iter().find(|c| c.name == s.source);
            let policy = source.and_then(|c| c.rotation.as_ref());
            let next = policy
                .filter(|p| p.enabled)
                .and_then(|p| p.schedule.as_ref())
                .and_then(|schedule| schedule.next_after(now))
                .map(crate::timestamp::seconds);
            let last = state.rotations.last(&s.source);
            // The secret's kind; a minted one lists each token held (scope, expiry), a signing
            // one how it signs; never a value.
            let signing = runtime.signers.get(&s.name).map(|_| runtime.signers.describe(&s.name));
            let kind = match (runtime.config.kinds.get(&s.name), &signing) {
                (Some(k), _) => k.kind(),
                (None, Some(_)) => crate::credentials::sigv4::KIND,
                (None, None) => crate::credentials::STATIC,
            };
            let minted = runtime.minter.status(&s.name);
            let mut v = serde_json::to_value(s).expect("status serializes");
            v["kind"] = json!(kind);
            if let Some(minted) = minted {
                v["minted"] = json!(minted);
            }
            v["next_rotation"] = json!(next);
            v["last_rotation"] = json!(last);
            v["rotation"] = json!(source.map(|c| c.rotation_summary()));
            if let Some(signing) = signing {
                v["signing"] = signing;
            }
            v
        })
        .collect();
    // A secret whose keys come from the AWS credential chain is in no source.
    let chain = runtime.signers.chain_names().into_iter().map(|name| {
        json!({
            "name": name,
            "source": crate::credentials::sigv4::CHAIN_SOURCE,
            "kind": crate::credentials::sigv4::KIND,
            "signing": runtime.signers.describe(name),
        })
    });
    let secrets: Vec<Value> = secrets.into_iter().chain(chain).collect();
    axum::Json(json!({ "secrets": secrets })).into_response()
}
