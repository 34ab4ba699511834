//! `keyward audit report`: a compliance summary of the trail over a period, as text, JSON or HTML.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use super::event::{Kind, is_promotion_of};
use super::read::{self, Verified};
use crate::config::Config;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Counts {
    pub allowed: u64,
    pub success: u64,
    pub denied: u64,
    pub throttled: u64,
    pub errors: u64,
    /// Allowed, but a policy in shadow mode would have refused them.
    pub would_deny: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub chain: String,
    pub attempts: u64,
    pub totals: Counts,
    pub by_credential: BTreeMap<String, Counts>,
    pub by_agent: BTreeMap<String, Counts>,
    /// Denials by keyward error code.
    pub denials: BTreeMap<String, u64>,
    /// How forwarded responses ended: who ended the body, and agents that left before the head.
    pub endings: Endings,
    /// Anomaly events (`anomaly.*`), newest last.
    pub anomalies: Vec<Value>,
    /// Rotation events (`rotation.*`), newest last.
    pub rotations: Vec<Value>,
    /// Credentials in the config, with when each was last seen in use.
    pub credentials: Vec<CredentialStatus>,
    /// Calls a policy in shadow mode would have refused: agent → policy → count.
    pub would_deny: BTreeMap<String, BTreeMap<String, u64>>,
    /// Tokens and cost of metered calls, per agent.
    pub spend: BTreeMap<String, Spend>,
}

/// What an agent's metered calls used over the period.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Spend {
    pub calls: u64,
    pub tokens: u64,
    pub cost_usd: f64,
    /// Calls settled at their reservation because the answer reported no usage.
    pub unreported: u64,
}

impl Spend {
    pub fn count(&mut self, record: &Value) {
        let Some(usage) = record.get("usage").filter(|u| u.is_object()) else { return };
        let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
        self.calls += 1;
        self.tokens += n("inputTokens") + n("outputTokens") + n("cacheReadTokens") + n("cacheWriteTokens");
        self.cost_usd += usage.get("costUsd").and_then(Value::as_f64).unwrap_or(0.0);
        if usage.get("reported") == Some(&Value::Bool(false)) {
            self.unreported += 1;
        }
    }
}

/// Counts each `wouldDeny` entry of an outcome record under its agent and policy.
pub fn count_would_deny(table: &mut BTreeMap<String, BTreeMap<String, u64>>, record: &Value) {
    let Some(entries) = record.get("wouldDeny").and_then(Value::as_array) else { return };
    let agent = record.get("agentId").and_then(Value::as_str).unwrap_or("(unidentified)");
    for entry in entries {
        let policy = entry.get("policy").and_then(Value::as_str).unwrap_or("?").to_string();
        *table.entry(agent.to_string()).or_default().entry(policy).or_default() += 1;
    }
}

/// Who ended each forwarded response (the records' `ended`). An agent that closes a stream it
/// has read (SSE, MCP) ends the body itself and is still a success; only `before_head` is an
/// agent that left without its answer (status 499).
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Endings {
    pub upstream: u64,
    pub agent: u64,
    pub keyward: u64,
    pub before_head: u64,
}

impl Endings {
    pub fn count(&mut self, record: &Value) {
        let ended = &record["ended"];
        match (ended["by"].as_str(), ended["at"].as_str()) {
            (_, Some("before_head")) => self.before_head += 1,
            (Some("upstream"), _) => self.upstream += 1,
            (Some("agent"), _) => self.agent += 1,
            (Some("keyward"), _) => self.keyward += 1,
            _ => {}
        }
    }

    fn summary(&self) -> String {
        format!(
            "responses ended by the upstream {}, by the agent after the head {}, by keyward {}; agents that left before the head {}",
            self.upstream, self.agent, self.keyward, self.before_head
        )
    }
}

#[derive(Debug, Serialize)]
pub struct CredentialStatus {
    pub name: String,
    pub source: String,
    pub last_used: Option<String>,
    /// The source's rotation policy, and when it last promoted a new version.
    pub rotation: String,
    pub last_rotated: Option<String>,
}

fn count(counts: &mut Counts, record: &Value) {
    match record.get("decision").and_then(Value::as_str) {
        Some("allowed") => counts.allowed += 1,
        Some("would_deny") => {
            counts.allowed += 1;
            counts.would_deny += 1;
        }
        Some("denied") => counts.denied += 1,
        Some("throttled") => counts.throttled += 1,
        _ => counts.errors += 1,
    }
    if record.get("success") == Some(&Value::Bool(true)) {
        counts.success += 1;
    }
}

pub fn build(files: &[PathBuf], since: SystemTime, config: Option<&Config>) -> Report {
    let chain = match read::verify(files) {
        Ok(Verified { files, records }) => format!("intact: {records} records in {files} file(s)"),
        Err(broken) => format!("BROKEN at {broken}"),
    };
    let mut report = Report {
        since: crate::timestamp::seconds(since),
        until: crate::timestamp::seconds(SystemTime::now()),
        chain,
        attempts: 0,
        totals: Counts::default(),
        by_credential: BTreeMap::new(),
        by_agent: BTreeMap::new(),
        denials: BTreeMap::new(),
        endings: Endings::default(),
        anomalies: Vec::new(),
        rotations: Vec::new(),
        credentials: Vec::new(),
        would_deny: BTreeMap::new(),
        spend: BTreeMap::new(),
    };
    let mut last_used: BTreeMap<String, String> = BTreeMap::new();
    for record in read::records(files).filter(|r| read::timestamp(r).is_some_and(|t| t >= since)) {
        match Kind::of(&record) {
            Kind::Anomaly => {
                report.anomalies.push(record);
                continue;
            }
            Kind::Rotation => {
                report.rotations.push(record);
                continue;
            }
            Kind::Request => {}
            Kind::Released | Kind::Other => continue,
        }
        report.attempts += 1;
        count(&mut report.totals, &record);
        count_would_deny(&mut report.would_deny, &record);
        if record.get("usage").is_some_and(Value::is_object) {
            let agent = record.get("agentId").and_then(Value::as_str).unwrap_or("(unidentified)");
            report.spend.entry(agent.to_string()).or_default().count(&record);
        }
        report.endings.count(&record);
        let text = |k: &str| record.get(k).and_then(Value::as_str).map(str::to_string);
        if let Some(credential) = text("credential") {
            count(report.by_credential.entry(credential.clone()).or_default(), &record);
            if matches!(record.get("decision").and_then(Value::as_str), Some("allowed" | "would_deny"))
                && let Some(ts) = text("timestamp")
            {
                last_used.insert(credential, ts);
            }
        }
        count(
            report.by_agent.entry(text("agentId").unwrap_or_else(|| "(unidentified)".to_string())).or_default(),
            &record,
        );
        if record.get("decision").and_then(Value::as_str) == Some("denied") {
            *report.denials.entry(text("errorCode").unwrap_or_else(|| "denied".to_string())).or_default() += 1;
        }
    }
    if let Some(config) = config {
        for source in &config.sources {
            let last_rotated = report
                .rotations
                .iter()
                .rev()
                .find(|e| is_promotion_of(e, &source.name))
                .and_then(|e| e["timestamp"].as_str().map(str::to_string));
            for name in source.mapping.keys() {
                report.credentials.push(CredentialStatus {
                    name: name.clone(),
                    source: source.name.clone(),
                    last_used: last_used.get(name).cloned(),
                    rotation: source.rotation_summary(),
                    last_rotated: last_rotated.clone(),
                });
            }
        }
    }
    report
}

pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "keyward audit report: {} to {}", r.since, r.until);
    let _ = writeln!(out, "chain: {}", r.chain);
    let t = &r.totals;
    let _ = writeln!(
        out,
        "attempts: {} (allowed {}, successful {}, denied {}, throttled {}, errors {})",
        r.attempts, t.allowed, t.success, t.denied, t.throttled, t.errors
    );
    let _ = writeln!(out, "{}", r.endings.summary());
    for (title, table) in [("credential", &r.by_credential), ("agent", &r.by_agent)] {
        let _ = writeln!(out, "\nuse by {title}:");
        let _ = writeln!(
            out,
            "  {:<32} {:>8} {:>8} {:>8} {:>9} {:>7}",
            title, "allowed", "success", "denied", "throttled", "errors"
        );
        for (name, c) in table {
            let _ = writeln!(
                out,
                "  {:<32} {:>8} {:>8} {:>8} {:>9} {:>7}",
                name, c.allowed, c.success, c.denied, c.throttled, c.errors
            );
        }
    }
    let _ = writeln!(out, "\ndenials by reason:");
    for (code, n) in &r.denials {
        let _ = writeln!(out, "  {code:<32} {n:>8}");
    }
    if !r.would_deny.is_empty() {
        let _ = writeln!(out, "\nwould have been refused (policies in shadow mode):");
        for (agent, policies) in &r.would_deny {
            for (policy, n) in policies {
                let _ = writeln!(out, "  {agent:<24} {policy:<32} {n:>8}");
            }
        }
    }
    if !r.spend.is_empty() {
        let _ = writeln!(out, "\nspend by agent:");
        let _ =
            writeln!(out, "  {:<32} {:>8} {:>12} {:>12} {:>10}", "agent", "calls", "tokens", "cost USD", "unreported");
        for (agent, s) in &r.spend {
            let _ = writeln!(
                out,
                "  {agent:<32} {:>8} {:>12} {:>12.6} {:>10}",
                s.calls, s.tokens, s.cost_usd, s.unreported
            );
        }
    }
    let _ = writeln!(out, "\nanomalies: {}", r.anomalies.len());
    let _ = writeln!(out, "rotations: {}", r.rotations.len());
    if !r.credentials.is_empty() {
        let _ = writeln!(out, "\ncredentials:");
        for c in &r.credentials {
            let used = c.last_used.as_deref().unwrap_or("not used in this period");
            let rotated = c.last_rotated.as_deref().map(|t| format!("; last rotated {t}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<24} source {:<12} last used {:<26} {}{rotated}",
                c.name, c.source, used, c.rotation
            );
        }
    }
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn html(r: &Report) -> String {
    let mut rows = String::new();
    for (title, table) in [("Credential", &r.by_credential), ("Agent", &r.by_agent)] {
        let _ = write!(
            rows,
            "<h2>Use by {}</h2><table><tr><th>{title}</th><th>allowed</th><th>success</th><th>denied</th><th>throttled</th><th>errors</th></tr>",
            title.to_lowercase()
        );
        for (name, c) in table {
            let _ = write!(
                rows,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(name),
                c.allowed,
                c.success,
                c.denied,
                c.throttled,
                c.errors
            );
        }
        rows.push_str("</table>");
    }
    rows.push_str("<h2>Denials by reason</h2><table><tr><th>code</th><th>count</th></tr>");
    for (code, n) in &r.denials {
        let _ = write!(rows, "<tr><td>{}</td><td>{n}</td></tr>", escape(code));
    }
    rows.push_str("</table><h2>Would have been refused (shadow mode)</h2><table><tr><th>agent</th><th>policy</th><th>count</th></tr>");
    for (agent, policies) in &r.would_deny {
        for (policy, n) in policies {
            let _ = write!(rows, "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>", escape(agent), escape(policy));
        }
    }
    rows.push_str("</table><h2>Spend by agent</h2><table><tr><th>agent</th><th>calls</th><th>tokens</th><th>cost USD</th><th>unreported</th></tr>");
    for (agent, s) in &r.spend {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.6}</td><td>{}</td></tr>",
            escape(agent),
            s.calls,
            s.tokens,
            s.cost_usd,
            s.unreported
        );
    }
    rows.push_str(
        "</table><h2>Credentials</h2><table><tr><th>name</th><th>source</th><th>last used</th><th>rotation</th><th>last rotated</th></tr>",
    );
    for c in &r.credentials {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.name),
            escape(&c.source),
            escape(c.last_used.as_deref().unwrap_or("-")),
            escape(&c.rotation),
            escape(c.last_rotated.as_deref().unwrap_or("-"))
        );
    }
    rows.push_str("</table>");
    let t = &r.totals;
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>keyward audit report</title>\
         <style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>\
         <h1>keyward audit report</h1><p>{} to {}</p><p>Chain: {}</p>\
         <p>Attempts: {} (allowed {}, successful {}, denied {}, throttled {}, errors {}); anomalies {}; rotations {}.</p><p>{}.</p>{rows}</body></html>",
        escape(&r.since),
        escape(&r.until),
        escape(&r.chain),
        r.attempts,
        t.allowed,
        t.success,
        t.denied,
        t.throttled,
        t.errors,
        r.anomalies.len(),
        r.rotations.len(),
        escape(&r.endings.summary())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::ChainHead;
    use serde_json::json;

    #[test]
    fn would_deny_decisions_and_spend_are_counted_per_agent() {
        let records = [
            json!({ "agentId": "a", "decision": "would_deny", "wouldDeny": [{ "policy": "budget:b", "reason": "r" }, { "policy": "quota:openai", "reason": "r" }],
                    "usage": { "inputTokens": 3, "outputTokens": 7, "cacheReadTokens": 2, "cacheWriteTokens": 0, "costUsd": 0.5, "reported": true } }),
            json!({ "agentId": "a", "decision": "would_deny", "wouldDeny": [{ "policy": "budget:b", "reason": "r" }],
                    "usage": { "inputTokens": 1, "outputTokens": 1, "cacheReadTokens": 0, "cacheWriteTokens": 0, "costUsd": null, "reported": false } }),
            json!({ "agentId": "b", "decision": "allowed" }),
        ];
        let mut table = BTreeMap::new();
        let mut spend = Spend::default();
        let mut counts = Counts::default();
        for record in &records {
            count_would_deny(&mut table, record);
            count(&mut counts, record);
            if record["agentId"] == "a" {
                spend.count(record);
            }
        }
        assert_eq!(table["a"]["budget:b"], 2);
        assert_eq!(table["a"]["quota:openai"], 1);
        assert!(!table.contains_key("b"));
        assert_eq!(spend, Spend { calls: 2, tokens: 14, cost_usd: 0.5, unreported: 1 });
        assert_eq!((counts.allowed, counts.would_deny, counts.errors), (3, 2, 0));
    }

    #[test]
    fn figures_match_a_known_trail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut head = ChainHead::genesis();
        let now = crate::timestamp::seconds(SystemTime::now());
        let mut lines = String::new();
        let mut add = |v: Value| lines.push_str(&(head.seal(v) + "\n"));
        for i in 0..6 {
            add(
                json!({ "type": "request.released", "timestamp": now, "credential": "OPENAI_API_KEY", "agentId": "a" }),
            );
            // A stream the agent closed after the head is a success; one it left before the head is not.
            let ended = match i {
                5 => json!({ "by": "agent", "at": "before_head" }),
                4 => json!({ "by": "agent", "at": "mid_body" }),
                _ => json!({ "by": "upstream", "at": "end_of_body" }),
            };
            add(json!({ "type": "request", "timestamp": now, "credential": "OPENAI_API_KEY", "agentId": "a",
                        "decision": "allowed", "success": i != 5, "ended": ended }));
        }
        add(
            json!({ "type": "request", "timestamp": now, "credential": "GITHUB_TOKEN", "agentId": "b", "decision": "denied", "errorCode": "forbidden" }),
        );
        add(
            json!({ "type": "request", "timestamp": now, "agentId": null, "decision": "denied", "errorCode": "unknown_agent_key" }),
        );
        add(
            json!({ "type": "request", "timestamp": now, "credential": "OPENAI_API_KEY", "agentId": "a", "decision": "throttled" }),
        );
        add(
            json!({ "type": "request", "timestamp": "2001-01-01T00:00:00Z", "credential": "OPENAI_API_KEY", "agentId": "a", "decision": "allowed" }),
        );
        add(json!({ "type": "anomaly.rate_spike", "timestamp": now, "agentId": "a" }));
        std::fs::write(&path, lines).unwrap();

        let since = SystemTime::now() - std::time::Duration::from_secs(7 * 86_400);
        let r = build(&[path], since, None);
        assert!(r.chain.starts_with("intact: 17 records"), "{}", r.chain);
        assert_eq!(r.attempts, 9);
        assert_eq!(r.totals, Counts { allowed: 6, success: 5, denied: 2, throttled: 1, errors: 0, would_deny: 0 });
        assert_eq!(
            r.by_credential["OPENAI_API_KEY"],
            Counts { allowed: 6, success: 5, denied: 0, throttled: 1, errors: 0, would_deny: 0 }
        );
        assert_eq!(r.by_agent["(unidentified)"].denied, 1);
        assert_eq!(r.denials["forbidden"], 1);
        assert_eq!(r.anomalies.len(), 1);
        assert_eq!(r.endings, Endings { upstream: 4, agent: 1, keyward: 0, before_head: 1 });
        let text = text(&r);
        assert!(
            text.contains("by the agent after the head 1, by keyward 0; agents that left before the head 1"),
            "{text}"
        );
        assert!(text.contains("attempts: 9 (allowed 6, successful 5, denied 2, throttled 1, errors 0)"), "{text}");
        assert!(html(&r).contains("<td>OPENAI_API_KEY</td><td>6</td><td>5</td>"));
    }
}
