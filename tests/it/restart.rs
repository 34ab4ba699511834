//! State set at runtime survives a restart of the real binary: an admin's revocation and
//! quarantines (and a release), the first use of each (route, credential) pair, which is
//! reported once ever, not once per start, and child keys with their budgets and revocations
//! (after a crash, budgeted child keys are revoked rather than trusted with a short count). A
//! state file that cannot be read stops the start with a clear error instead of silently
//! forgetting revocations.

use crate::common;

use common::process::{Spawned, keyward};
use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::Value;

const HELD_KEY: &str = "kw_testHeldAgentKey0123456789abcdefghijklmnop";
const BRIEF_KEY: &str = "kw_testBriefAgentKey123456789abcdefghijklmnop";
const LEAD_KEY: &str = "kw_testRestartLeadKey23456789abcdefghijklmnop";

fn extra() -> String {
    format!(
        r#"
[[agents]]
id = "held-1"
role = "worker"
key_sha256 = "{held}"

[[agents]]
id = "brief-1"
role = "worker"
key_sha256 = "{brief}"

[roles.lead]
delegate = true
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }}]
anomaly = {{ first_use = {{ enabled = false }} }}

[[agents]]
id = "lead-1"
role = "lead"
key_sha256 = "{lead}"
{admin}"#,
        held = sha(HELD_KEY),
        brief = sha(BRIEF_KEY),
        lead = sha(LEAD_KEY),
        admin = admin_block()
    )
}

async fn chat(client: &reqwest::Client, base: &str, key: &str) -> (u16, String) {
    let r = client.post(format!("{base}/openai/v1/chat/completions")).bearer_auth(key).body("{}").send().await.unwrap();
    let status = r.status().as_u16();
    let code =
        r.json::<Value>().await.ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string)).unwrap_or_default();
    (status, code)
}

async fn admin_post(client: &reqwest::Client, admin: &str, path: &str) -> Value {
    let r = client.post(format!("{admin}{path}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

fn first_use_lines(logs: &str, agent: &str) -> usize {
    logs.lines().filter(|l| l.contains("first_use") && l.contains(agent) && l.contains("WARN")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_quarantines_and_first_uses_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let config = dir.path().join("keyward.toml");
    std::fs::write(&config, config_text(dir.path(), &upstream.url(), &extra())).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let client = common::client();

    let first = Spawned::serve(dir.path(), &args, &[]);
    assert_eq!(chat(&client, &first.proxy, WORKER_KEY).await.0, 200);
    assert_eq!(chat(&client, &first.proxy, WORKER_KEY).await.0, 200);
    let mut answers = vec![admin_post(&client, &first.admin, "/admin/agents/reader-1/revoke").await];
    answers.push(admin_post(&client, &first.admin, "/admin/agents/held-1/quarantine").await);
    admin_post(&client, &first.admin, "/admin/agents/brief-1/quarantine").await;
    answers.push(admin_post(&client, &first.admin, "/admin/agents/brief-1/release").await);
    assert_eq!(chat(&client, &first.proxy, HELD_KEY).await, (403, "agent_quarantined".to_string()));
    let first_logs = first.terminate();
    assert_eq!(first_use_lines(&first_logs, "worker-1"), 1, "the first call is a first use:\n{first_logs}");

    // The same config again: nothing set at runtime was lost.
    let second = Spawned::serve(dir.path(), &args, &[]);
    assert_eq!(chat(&client, &second.proxy, READER_KEY).await, (401, "agent_revoked".to_string()));
    assert_eq!(chat(&client, &second.proxy, HELD_KEY).await, (403, "agent_quarantined".to_string()));
    assert_eq!(chat(&client, &second.proxy, BRIEF_KEY).await.0, 200, "a release is kept too");
    assert_eq!(chat(&client, &second.proxy, WORKER_KEY).await.0, 200);
    let agents: Value = admin_get(&client, &format!("{}/admin/agents", second.admin)).await;
    let status =
        |id: &str| agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == id).unwrap()["status"].clone();
    assert_eq!((status("reader-1"), status("held-1")), ("revoked".into(), "quarantined".into()), "{agents}");
    let logs = second.terminate();
    assert_eq!(first_use_lines(&logs, "worker-1"), 0, "first use means first ever, not first since start:\n{logs}");
    assert_eq!(first_use_lines(&logs, "brief-1"), 1, "brief-1 had never called before:\n{logs}");
    assert!(logs.contains("runtime state loaded"), "{logs}");
    let saved = std::fs::read_to_string(dir.path().join("keyward-state.json")).unwrap();
    assert!(saved.contains("reader-1") && saved.contains("held-1"), "{saved}");
    for answer in &answers {
        assert_eq!(answer["persisted"], true, "{answer}");
    }
    for line in ["agent revoked by admin", "agent quarantined by admin", "agent released by admin"] {
        let logged = first_logs.lines().any(|l| l.contains(line) && l.contains("INFO"));
        assert!(logged, "no INFO line '{line}':\n{first_logs}");
    }

    // A damaged state file is a startup error that names it, never a silent reset.
    std::fs::write(dir.path().join("keyward-state.json"), "{\"format\":1,\"revoked_agents\":[\"reader-1\"").unwrap();
    let output = keyward()
        .args(["serve", "--config", config.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .expect("keyward binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "keyward started over a damaged state file:\n{stderr}");
    assert!(stderr.contains("keyward-state.json") && stderr.contains("not valid"), "{stderr}");
    assert!(!stderr.contains("keyward listening"), "{stderr}");

    // A state file that went missing beside a trail with records is said out loud, not a quiet reset.
    std::fs::remove_file(dir.path().join("keyward-state.json")).unwrap();
    let third = Spawned::serve(dir.path(), &["--config", config.to_str().unwrap()], &[]);
    let logs = third.terminate();
    assert!(logs.lines().any(|l| l.contains("WARN") && l.contains("no state file beside an audit trail")), "{logs}");
}

/// Mints a chat-only child key as the lead; returns (id, key).
async fn mint(client: &reqwest::Client, base: &str, max_requests: Option<u64>) -> (String, String) {
    let body = serde_json::json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["POST"],
                                   "paths": ["/v1/chat/completions"], "max_requests": max_requests });
    let r = client.post(format!("{base}/v1/delegations")).bearer_auth(LEAD_KEY).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let minted: Value = r.json().await.unwrap();
    (minted["id"].as_str().unwrap().to_string(), minted["key"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_keys_survive_a_restart_and_a_crash_cannot_refill_a_budget() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let config = dir.path().join("keyward.toml");
    std::fs::write(&config, config_text(dir.path(), &upstream.url(), &extra())).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let client = common::client();

    let first = Spawned::serve(dir.path(), &args, &[]);
    let (_, open_key) = mint(&client, &first.proxy, None).await;
    let (_, budgeted_key) = mint(&client, &first.proxy, Some(2)).await;
    let (revoked_id, revoked_key) = mint(&client, &first.proxy, None).await;
    assert_eq!(chat(&client, &first.proxy, &budgeted_key).await.0, 200);
    let r = client.delete(format!("{}/v1/delegations/{revoked_id}", first.proxy)).bearer_auth(LEAD_KEY).send().await;
    assert_eq!(r.unwrap().status(), 200);
    first.terminate();

    // A clean restart: the keys work, the budget goes on from where it was, the revocation holds.
    let second = Spawned::serve(dir.path(), &args, &[]);
    assert_eq!(chat(&client, &second.proxy, &open_key).await.0, 200);
    assert_eq!(chat(&client, &second.proxy, &revoked_key).await, (401, "delegation_revoked".to_string()));
    assert_eq!(chat(&client, &second.proxy, &budgeted_key).await.0, 200, "one of two requests was left");
    assert_eq!(chat(&client, &second.proxy, &budgeted_key).await, (401, "delegation_exhausted".to_string()));
    let (_, fresh_budget_key) = mint(&client, &second.proxy, Some(5)).await;
    assert_eq!(chat(&client, &second.proxy, &fresh_budget_key).await.0, 200);
    // A crash (SIGKILL): the file cannot know the last counts, so budgeted keys are revoked
    // rather than refilled; keys without a budget carry on.
    drop(second);

    let third = Spawned::serve(dir.path(), &args, &[]);
    assert_eq!(chat(&client, &third.proxy, &fresh_budget_key).await, (401, "delegation_revoked".to_string()));
    assert_eq!(chat(&client, &third.proxy, &open_key).await.0, 200);
    assert_eq!(chat(&client, &third.proxy, &revoked_key).await, (401, "delegation_revoked".to_string()));
    let logs = third.terminate();
    assert!(logs.contains("did not stop cleanly"), "{logs}");
    let audit = read_audit(&dir.path().join("audit.jsonl"));
    assert!(
        audit.iter().any(|r| r["type"] == "delegation.revoked" && r["by"] == "startup"),
        "the revocation at start is audited"
    );
}
