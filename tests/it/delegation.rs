//! Delegation end to end: a parent mints a narrowed child key, the child works through the real
//! flow and nowhere else, budgets are exact under concurrency, and revocation (by the parent,
//! by cascade, by an admin, on failure) and expiry take effect at once.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const LEAD_KEY: &str = "kw_testLeadAgentKey123456789abcdefghijklmnopq";

fn extra() -> String {
    format!(
        r#"
[roles.lead]
delegate = true
max_delegation_ttl_seconds = 900
max_delegation_depth = 2
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions", "/v1/responses"] }},
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/_fake/**"] }},
  {{ route = "github", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/repos/**"] }},
]

[[agents]]
id = "lead-1"
role = "lead"
key_sha256 = "{lead}"

[admin]
token_sha256 = "{admin}"
"#,
        lead = sha(LEAD_KEY),
        admin = sha(ADMIN_TOKEN)
    )
}

async fn mint(h: &Harness, key: &str, body: Value) -> (u16, Value) {
    let r = h.client.post(h.url("/v1/delegations")).bearer_auth(key).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn chat_child(max_requests: Option<u64>) -> Value {
    json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["POST"],
            "paths": ["/v1/chat/completions"], "ttl_seconds": 600, "max_requests": max_requests,
            "label": "summarise-report-42", "revoke_on_failure": true })
}

async fn chat(h: &Harness, key: &str) -> u16 {
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(key).body("{}").send().await.unwrap();
    r.status().as_u16()
}

async fn code(r: reqwest::Response) -> String {
    r.json::<Value>().await.unwrap()["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_key_works_in_scope_only_and_is_audited_by_id() {
    let h = Harness::start_with(&extra()).await;
    let (status, child) = mint(&h, LEAD_KEY, chat_child(Some(10))).await;
    assert_eq!(status, 201, "{child}");
    let key = child["key"].as_str().unwrap().to_string();
    let id = child["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("kw_") && id.starts_with("dlg_"));
    assert_eq!(child["delegatedBy"], json!(["lead-1"]));

    // The child key works exactly like an agent key, with the real credential injected.
    assert_eq!(chat(&h, &key).await, 200);
    assert_eq!(h.upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
    // And nowhere outside its scope.
    let r = h.client.post(h.url("/openai/v1/responses")).bearer_auth(&key).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = h.client.get(h.url("/github/repos/o/r")).bearer_auth(&key).send().await.unwrap();
    assert_eq!(r.status(), 403);

    let records = h.audit_all();
    let used: Vec<&Value> = records.iter().filter(|r| r["type"] == "request" && r["agentId"] == id.as_str()).collect();
    assert_eq!(used.len(), 3);
    assert!(used.iter().all(|r| r["delegatedBy"] == json!(["lead-1"]) && r["label"] == "summarise-report-42"));
    assert!(records.iter().any(|r| r["type"] == "delegation.minted" && r["delegationId"] == id.as_str()));
    let listed: Value = admin_get(&h.client, &format!("{}/admin/delegations", h.admin)).await;
    assert_eq!(listed["delegations"][0]["id"], id.as_str());
    assert_eq!(listed["delegations"][0]["used"], 1);
    let dir = h.stop().await;
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains(&key), "a child key reached the audit trail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_excess_is_refused_with_its_name() {
    let h = Harness::start_with(&extra()).await;
    let base = chat_child(None);
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b
    };
    let cases = [
        (with("secretref", json!(["ANTHROPIC_API_KEY"])), "secretref 'ANTHROPIC_API_KEY'"),
        (with("routes", json!(["anthropic"])), "route 'anthropic'"),
        (with("methods", json!(["DELETE"])), "method DELETE"),
        (with("paths", json!(["/v1/files"])), "path '/v1/files'"),
        (with("ttl_seconds", json!(86400)), "ttl_seconds 86400 exceeds the limit of 900"),
    ];
    for (body, excess) in cases {
        let (status, answer) = mint(&h, LEAD_KEY, body).await;
        assert_eq!(status, 403, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(excess), "{excess}: {answer}");
    }
    // A worker's role does not delegate at all; an unknown key is 401.
    let (status, answer) = mint(&h, WORKER_KEY, base.clone()).await;
    assert_eq!(status, 403);
    assert!(answer["error"]["message"].as_str().unwrap().contains("may not delegate"));
    assert_eq!(mint(&h, "kw_nobody", base.clone()).await.0, 401);
    // Depth: a child without allow_subdelegation cannot mint; with it, only down to the limit.
    let (_, child) = mint(&h, LEAD_KEY, with("allow_subdelegation", json!(true))).await;
    let child_key = child["key"].as_str().unwrap();
    let (status, grandchild) = mint(&h, child_key, with("allow_subdelegation", json!(true))).await;
    assert_eq!(status, 201, "{grandchild}");
    assert_eq!(grandchild["delegatedBy"], json!([child["id"], "lead-1"]));
    let (status, answer) = mint(&h, grandchild["key"].as_str().unwrap(), base.clone()).await;
    assert_eq!(status, 403);
    assert!(answer["error"]["message"].as_str().unwrap().contains("depth 3 exceeds"), "{answer}");
    let (status, _) = mint(&h, &h.url(""), json!({"nonsense": true})).await;
    assert_eq!(status, 401);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_is_exact_under_concurrency() {
    let h = Harness::start_with(&extra()).await;
    let n = 12;
    let (_, child) = mint(&h, LEAD_KEY, chat_child(Some(n))).await;
    let key = child["key"].as_str().unwrap().to_string();
    let calls = (0..=n).map(|_| chat(&h, &key));
    let statuses = futures_util::future::join_all(calls).await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count() as u64, n, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 401).count(), 1, "{statuses:?}");
    assert_eq!(h.upstream.count() as u64, n);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_is_immediate_and_cascades() {
    let h = Harness::start_with(&extra()).await;
    let mut body = chat_child(None);
    body["allow_subdelegation"] = json!(true);
    let (_, child) = mint(&h, LEAD_KEY, body.clone()).await;
    let (child_id, child_key) = (child["id"].as_str().unwrap(), child["key"].as_str().unwrap());
    let (_, grandchild) = mint(&h, child_key, body.clone()).await;
    let grandchild_key = grandchild["key"].as_str().unwrap();
    assert_eq!(chat(&h, grandchild_key).await, 200);

    // Only an ancestor may revoke.
    let r =
        h.client.delete(h.url(&format!("/v1/delegations/{child_id}"))).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = h.client.delete(h.url(&format!("/v1/delegations/{child_id}"))).bearer_auth(LEAD_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let revoked: Value = r.json().await.unwrap();
    assert_eq!(revoked["revoked"].as_array().unwrap().len(), 2);
    for key in [child_key, grandchild_key] {
        let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(code(r).await, "delegation_revoked");
    }

    // Revoking the parent agent revokes everything it minted, and the agent itself.
    let (_, other) = mint(&h, LEAD_KEY, chat_child(None)).await;
    let other_key = other["key"].as_str().unwrap();
    let r =
        h.client.post(format!("{}/admin/agents/lead-1/revoke", h.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(other_key).send().await.unwrap();
    assert_eq!(code(r).await, "delegation_revoked");
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(LEAD_KEY).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r).await, "agent_revoked");
    let events = h.audit_all();
    assert!(events.iter().filter(|r| r["type"] == "delegation.revoked").count() >= 3);
    assert!(events.iter().any(|r| r["type"] == "agent.revoked" && r["agentId"] == "lead-1"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantined_parent_can_neither_mint_nor_use_its_children() {
    let h = Harness::start_with(&extra()).await;
    let (_, child) = mint(&h, LEAD_KEY, chat_child(None)).await;
    let child_key = child["key"].as_str().unwrap().to_string();
    let r = h
        .client
        .post(format!("{}/admin/agents/lead-1/quarantine", h.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, answer) = mint(&h, LEAD_KEY, chat_child(None)).await;
    assert_eq!(status, 403);
    assert_eq!(answer["error"]["code"], "agent_quarantined");
    // Quarantine revoked the existing child too.
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(&child_key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r).await, "delegation_revoked");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_failure_fires_on_an_upstream_401_and_on_a_5xx() {
    let h = Harness::start_with(&extra()).await;
    for status in [401, 502] {
        let body = json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["GET"],
                           "paths": ["/_fake/**"], "revoke_on_failure": true });
        let (_, child) = mint(&h, LEAD_KEY, body).await;
        let key = child["key"].as_str().unwrap();
        let r = h.client.get(h.url("/openai/_fake/status/200")).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = h.client.get(h.url(&format!("/openai/_fake/status/{status}"))).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status);
        let r = h.client.get(h.url("/openai/_fake/status/200")).bearer_auth(key).send().await.unwrap();
        assert_eq!(r.status(), 401, "after an upstream {status}");
        assert_eq!(code(r).await, "delegation_revoked");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_on_failure_fires_when_the_upstream_cannot_be_reached() {
    let grant = r#"  { route = "dead", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/**"] },
"#;
    let extra = extra().replacen("grants = [\n", &format!("grants = [\n{grant}"), 1)
        + &format!(
            r#"
[[routes]]
name = "dead"
prefix = "/dead"
upstream = "http://127.0.0.1:{port}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}
"#,
            port = closed_port()
        );
    let h = Harness::start_with(&extra).await;
    let body = json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["dead"], "methods": ["GET"],
                       "paths": ["/**"], "revoke_on_failure": true });
    let (status, child) = mint(&h, LEAD_KEY, body).await;
    assert_eq!(status, 201, "{child}");
    let key = child["key"].as_str().unwrap();
    let r = h.client.get(h.url("/dead/v1/models")).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(code(r).await, "upstream_unavailable");
    let revoked = h.wait_for_audit_event("delegation.revoked").await;
    assert_eq!(revoked["delegationId"], child["id"]);
    assert_eq!(revoked["reason"], "the upstream could not be reached");
    assert_eq!(revoked["by"], "revoke_on_failure");
    let r = h.client.get(h.url("/dead/v1/models")).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r).await, "delegation_revoked");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_child_key_is_refused_and_its_expiry_audited() {
    let h = Harness::start_with(&extra()).await;
    let mut body = chat_child(None);
    body["ttl_seconds"] = json!(1);
    let (_, child) = mint(&h, LEAD_KEY, body).await;
    let key = child["key"].as_str().unwrap();
    assert_eq!(chat(&h, key).await, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(code(r).await, "delegation_expired");
    let expired = h.wait_for_audit_event("delegation.expired").await;
    assert_eq!(expired["delegationId"], child["id"]);
    h.stop().await;
}

/// Writes the test config with `edit` applied to the lead's section, and reloads it through
/// the admin API (as SIGHUP would).
async fn reload_with(h: &Harness, edit: impl Fn(String) -> String) {
    let path = h.dir.path().join("keyward.toml");
    std::fs::write(&path, edit(config_text(h.dir.path(), &h.upstream.url(), &extra()))).unwrap();
    let state = &h.running.as_ref().unwrap().state;
    let _ = state.config_path.set(path);
    let r = h.client.post(format!("{}/admin/reload", h.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

async fn chat_code(h: &Harness, key: &str) -> (u16, String) {
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(key).body("{}").send().await.unwrap();
    (r.status().as_u16(), code(r).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_holds_no_more_than_its_parent_holds_now() {
    let h = Harness::start_with(&extra()).await;
    let mut body = chat_child(None);
    body["allow_subdelegation"] = json!(true);
    let (_, child) = mint(&h, LEAD_KEY, body.clone()).await;
    let child_key = child["key"].as_str().unwrap().to_string();
    let (status, grandchild) = mint(&h, &child_key, body).await;
    assert_eq!(status, 201, "{grandchild}");
    let grandchild_key = grandchild["key"].as_str().unwrap().to_string();
    for key in [LEAD_KEY, &child_key, &grandchild_key] {
        assert_eq!(chat_code(&h, key).await.0, 200);
    }
    let before = h.upstream.count();

    // Each reload takes something from the lead; the lead and every key below it lose it at once.
    let narrowed =
        |t: String| t.replace(r#"paths = ["/v1/chat/completions", "/v1/responses"]"#, r#"paths = ["/v1/responses"]"#);
    let disabled = |t: String| t.replace("role = \"lead\"\n", "role = \"lead\"\ndisabled = true\n");
    let no_delegation = |t: String| t.replace("delegate = true", "delegate = false");
    let other_role = |t: String| t.replace("id = \"lead-1\"\nrole = \"lead\"", "id = \"lead-1\"\nrole = \"reader\"");
    let shallow = |t: String| t.replace("max_delegation_depth = 2", "max_delegation_depth = 1");
    let removed = |t: String| t.replace("id = \"lead-1\"", "id = \"lead-2\"");
    type Edit = Box<dyn Fn(String) -> String>;
    type Expect = (u16, &'static str);
    let cases: Vec<(&str, Edit, Expect, Expect, Expect)> = vec![
        ("grant narrowed", Box::new(narrowed), (403, "forbidden"), (403, "forbidden"), (403, "forbidden")),
        (
            "parent disabled",
            Box::new(disabled),
            (401, "unknown_agent_key"),
            (401, "delegation_withdrawn"),
            (401, "delegation_withdrawn"),
        ),
        (
            "role may no longer delegate",
            Box::new(no_delegation),
            (200, ""),
            (401, "delegation_withdrawn"),
            (401, "delegation_withdrawn"),
        ),
        (
            "parent moved to a role without the grant",
            Box::new(other_role),
            (403, "forbidden"),
            (401, "delegation_withdrawn"),
            (401, "delegation_withdrawn"),
        ),
        ("depth limit lowered", Box::new(shallow), (200, ""), (200, ""), (401, "delegation_withdrawn")),
        (
            "parent renamed (its key now belongs to another agent)",
            Box::new(removed),
            (200, ""),
            (401, "delegation_withdrawn"),
            (401, "delegation_withdrawn"),
        ),
    ];
    for (what, edit, lead, child, grandchild) in cases {
        reload_with(&h, edit).await;
        let got =
            (chat_code(&h, LEAD_KEY).await, chat_code(&h, &child_key).await, chat_code(&h, &grandchild_key).await);
        let as_ref = |(s, c): &(u16, String)| (*s, c.as_str().to_owned());
        assert_eq!(
            (as_ref(&got.0), as_ref(&got.1), as_ref(&got.2)),
            ((lead.0, lead.1.to_owned()), (child.0, child.1.to_owned()), (grandchild.0, grandchild.1.to_owned())),
            "{what}"
        );
        // Restored: the children were cut to the parent's rights, not revoked.
        reload_with(&h, |t| t).await;
        assert_eq!(chat_code(&h, &grandchild_key).await.0, 200, "after restoring from: {what}");
    }
    let withdrawn = h.audit().into_iter().filter(|r| r["errorCode"] == "delegation_withdrawn").count();
    assert_eq!(withdrawn, 9, "each refusal has its outcome record");
    // Upstream saw only the calls that were allowed: the lead in three cases, the child in
    // one, and the grandchild after each restore.
    let allowed_after = 1 + 2 + 1 + 6;
    assert_eq!(h.upstream.count() - before, allowed_after);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_bounds_every_key_below_it() {
    let h = Harness::start_with(&extra()).await;
    let mut body = chat_child(Some(2));
    body["allow_subdelegation"] = json!(true);
    let (_, child) = mint(&h, LEAD_KEY, body.clone()).await;
    let (child_id, child_key) = (child["id"].as_str().unwrap(), child["key"].as_str().unwrap());
    // The issue's attack: four grandchildren with 2 each from a child that has 2.
    let mut grandchildren = Vec::new();
    for _ in 0..4 {
        let (status, grandchild) = mint(&h, child_key, body.clone()).await;
        assert_eq!(status, 201, "{grandchild}");
        grandchildren.push(grandchild["key"].as_str().unwrap().to_string());
    }
    let before = h.upstream.count();
    let calls = grandchildren.iter().flat_map(|k| [k.as_str(), k.as_str()]).chain([child_key, child_key]);
    let answers = futures_util::future::join_all(calls.map(|k| chat_code(&h, k))).await;
    assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 2, "{answers:?}");
    assert!(answers.iter().filter(|a| a.0 != 200).all(|a| *a == (401, "delegation_exhausted".to_string())));
    assert_eq!(h.upstream.count() - before, 2, "the tree made more upstream calls than the child's budget");
    let listed: Value = admin_get(&h.client, &format!("{}/admin/delegations", h.admin)).await;
    let child_row = listed["delegations"].as_array().unwrap().iter().find(|d| d["id"] == child_id).unwrap().clone();
    assert_eq!(child_row["used"], 2, "the child's count includes its subtree's calls");
    h.stop().await;
}
