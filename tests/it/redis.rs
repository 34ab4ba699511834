//! Limits across replicas: two keyward processes share one real redis-server. Their combined
//! quota holds, a quarantine made on one is enforced by the other within a second, and when
//! Redis dies each keeps serving under its configured failure policy.

use crate::common;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::Spawned;
use common::*;
use keyward::fake_upstream::FakeUpstream;
use serde_json::Value;

const LIMITED_KEY: &str = "kw_testRedisLimitedKey3456789abcdefghijklmnop";
const LEAD_KEY: &str = "kw_testRedisLeadKey0123456789abcdefghijklmnop";

pub(crate) struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_redis(port: u16) -> Redis {
    let redis = Redis(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: ./scripts/test.sh installs it (apt-get install redis-server)"),
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut pong = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut pong).is_ok() && &pong == b"+PONG\r\n" {
                return redis;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not start");
}

fn replica(dir: &std::path::Path, name: &str, upstream: &str, redis_port: u16, failure: &str) -> Spawned {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    write_secrets(&sub);
    let extra = format!(
        r#"
[roles.limited]
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"], rate = "30/min", burst = 5 }},
]
[roles.limited.anomaly]
first_use = {{ enabled = false }}

[[agents]]
id = "limited-1"
role = "limited"
key_sha256 = "{key}"

[roles.lead]
delegate = true
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }}]

[[agents]]
id = "lead-1"
role = "lead"
key_sha256 = "{lead}"

[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:{redis_port}"
redis_failure = "{failure}"

[admin]
token_sha256 = "{admin}"
"#,
        key = sha(LIMITED_KEY),
        lead = sha(LEAD_KEY),
        admin = sha(ADMIN_TOKEN)
    );
    let path = sub.join("keyward.toml");
    std::fs::write(&path, config_text(&sub, upstream, &extra)).unwrap();
    Spawned::serve(&sub, &["--config", path.to_str().unwrap()], &[])
}

/// One chat call as the limited agent: the status and keyward's error code, if any.
async fn call(client: &reqwest::Client, base: &str) -> (u16, String) {
    chat_code(client, base, LIMITED_KEY).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_quota_quarantine_and_survive_redis_loss() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let redis_port = closed_port();
    let redis = start_redis(redis_port);
    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_open");
    let b = replica(dir.path(), "b", &upstream.url(), redis_port, "fail_closed");
    let client = common::client();

    // 40 calls spread over both replicas: the shared bucket allows the burst of 5 (plus at most
    // one refill at 30/min), where two separate buckets would allow 10.
    let started = Instant::now();
    let mut allowed = 0;
    for i in 0..40 {
        let base = if i % 2 == 0 { &a.proxy } else { &b.proxy };
        let (status, code) = call(&client, base).await;
        match status {
            200 => allowed += 1,
            429 => assert_eq!(code, "rate_limited"),
            other => panic!("unexpected {other} {code}"),
        }
    }
    let refills = (started.elapsed().as_secs_f64() / 2.0).ceil() as usize;
    assert!(allowed >= 5 && allowed <= 5 + refills, "{allowed} allowed across two replicas (refills {refills})");
    assert_eq!(upstream.count(), allowed);

    // A quarantine made through replica A's admin API holds on replica B within a second.
    let r = client
        .post(format!("{}/admin/agents/limited-1/quarantine", a.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen =
        poll_call(&client, &b.proxy, LIMITED_KEY, Duration::from_millis(1500), |(_, code)| code == "agent_quarantined")
            .await;
    assert_eq!(seen, (403, "agent_quarantined".to_string()), "replica B did not see the quarantine within a second");
    let r = client
        .post(format!("{}/admin/agents/limited-1/release", b.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Replicas poll every 500 ms; on a loaded machine the poll itself may run late.
    let (_, code) =
        poll_call(&client, &a.proxy, LIMITED_KEY, Duration::from_millis(3000), |(_, code)| code != "agent_quarantined")
            .await;
    assert_ne!(code, "agent_quarantined", "replica A did not see the release");
    // A quarantine that another replica releases before this one's next poll still lifts here.
    for (admin, action) in [(&a.admin, "quarantine"), (&b.admin, "release")] {
        let r = client
            .post(format!("{admin}/admin/agents/limited-1/{action}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{action}");
    }
    let (_, code) =
        poll_call(&client, &a.proxy, LIMITED_KEY, Duration::from_millis(3000), |(_, code)| code != "agent_quarantined")
            .await;
    assert_ne!(code, "agent_quarantined", "replica A kept a quarantine released at once on B");

    // Redis dies: A (fail_open) falls back to its local limits and keeps serving; B
    // (fail_closed) refuses limited calls with 429. Neither answers 5xx.
    drop(redis);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut a_statuses = Vec::new();
    let mut b_codes = Vec::new();
    for _ in 0..4 {
        a_statuses.push(call(&client, &a.proxy).await.0);
        b_codes.push(call(&client, &b.proxy).await);
    }
    assert!(a_statuses.contains(&200), "fail_open replica stopped serving: {a_statuses:?}");
    assert!(a_statuses.iter().all(|s| *s == 200 || *s == 429), "{a_statuses:?}");
    assert!(b_codes.iter().all(|(s, c)| *s == 429 && c == "rate_limiter_unavailable"), "{b_codes:?}");
    let health = client.get(format!("{}/healthz", b.admin)).send().await.unwrap();
    assert_eq!(health.status(), 200);

    let a_logs = a.terminate();
    let b_logs = b.terminate();
    assert_eq!(a_logs.matches("falling back to local limits").count(), 1, "log once per transition:\n{a_logs}");
    assert_eq!(b_logs.matches("refusing limited calls").count(), 1, "log once per transition:\n{b_logs}");
}

/// Repeats a chat call with `key` on `base` until `done` holds or `within` passes; returns the
/// last answer.
async fn poll_call(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    within: Duration,
    done: impl Fn(&(u16, String)) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let answer = chat_code(client, base, key).await;
        if done(&answer) || Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Mints a child key as the lead agent on `base`; returns (id, key).
async fn mint(client: &reqwest::Client, base: &str, body: &Value) -> (String, String) {
    let minted: Value = client
        .post(format!("{base}/v1/delegations"))
        .bearer_auth(LEAD_KEY)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (minted["id"].as_str().unwrap().to_string(), minted["key"].as_str().unwrap().to_string())
}

/// One chat call with `key`: the status and keyward's error code, if any.
async fn chat_code(client: &reqwest::Client, base: &str, key: &str) -> (u16, String) {
    let r = client.post(format!("{base}/openai/v1/chat/completions")).bearer_auth(key).body("{}").send().await.unwrap();
    let status = r.status().as_u16();
    let code =
        r.json::<Value>().await.ok().and_then(|v| v["error"]["code"].as_str().map(str::to_string)).unwrap_or_default();
    (status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegations_budgets_and_revocations_reach_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let redis_port = closed_port();
    let _redis = start_redis(redis_port);
    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_closed");
    let b = replica(dir.path(), "b", &upstream.url(), redis_port, "fail_closed");
    let client = common::client();

    // Minted on A, with a budget of 4 calls.
    let body = serde_json::json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["POST"],
                                   "paths": ["/v1/chat/completions"], "max_requests": 4 });
    let (id, key) = mint(&client, &a.proxy, &body).await;

    // Usable on B within a second (until then B does not know the key).
    let first = poll_call(&client, &b.proxy, &key, Duration::from_secs(1), |answer| {
        assert!(answer.0 == 200 || answer.1 == "unknown_agent_key", "{answer:?}");
        answer.0 == 200
    })
    .await;
    assert_eq!(first.0, 200, "replica B did not learn the delegation within a second");
    let listed: Value = admin_get(&client, &format!("{}/admin/delegations", b.admin)).await;
    assert!(listed["delegations"].as_array().unwrap().iter().any(|d| d["id"] == id.as_str()), "{listed}");

    // The budget is one budget across both replicas: 4 in all, however the calls are spread.
    let mut successes = 1;
    let mut exhausted = 0;
    for i in 0..6 {
        let base = if i % 2 == 0 { &a.proxy } else { &b.proxy };
        match chat_code(&client, base, &key).await {
            (200, _) => successes += 1,
            (401, code) if code == "delegation_exhausted" => exhausted += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((successes, exhausted), (4, 3));

    // A second child, revoked by its parent on A: refused on B within a second.
    let (id2, key2) = mint(&client, &a.proxy, &body).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(chat_code(&client, &b.proxy, &key2).await.0, 200);
    let r = client.delete(format!("{}/v1/delegations/{id2}", a.proxy)).bearer_auth(LEAD_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let last =
        poll_call(&client, &b.proxy, &key2, Duration::from_millis(1500), |(_, code)| code == "delegation_revoked")
            .await;
    assert_eq!(last, (401, "delegation_revoked".to_string()), "replica B still accepts a revoked key");
    a.terminate();
    b.terminate();
}

/// Mints a child key as `parent_key` on `base`; returns (id, key).
async fn mint_as(client: &reqwest::Client, base: &str, parent_key: &str, body: &Value) -> (String, String) {
    let r = client.post(format!("{base}/v1/delegations")).bearer_auth(parent_key).json(body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let minted: Value = r.json().await.unwrap();
    (minted["id"].as_str().unwrap().to_string(), minted["key"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subtree_budget_and_the_parents_current_rights_hold_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let redis_port = closed_port();
    let _redis = start_redis(redis_port);
    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_closed");
    let b = replica(dir.path(), "b", &upstream.url(), redis_port, "fail_closed");
    let client = common::client();

    // A child with a budget of 2 mints four grandchildren with 2 each, all on A.
    let body = serde_json::json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["POST"],
                                   "paths": ["/v1/chat/completions"], "max_requests": 2, "allow_subdelegation": true });
    let (_, child_key) = mint(&client, &a.proxy, &body).await;
    let mut grandchildren = Vec::new();
    for _ in 0..4 {
        grandchildren.push(mint_as(&client, &a.proxy, &child_key, &body).await.1);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Every grandchild calls twice, once on each replica, all at once: the child's budget of 2
    // bounds the whole tree across both replicas.
    let before = upstream.count();
    let calls = grandchildren.iter().flat_map(|k| [(&a.proxy, k), (&b.proxy, k)]);
    let answers = futures_util::future::join_all(calls.map(|(base, k)| chat_code(&client, base, k))).await;
    assert_eq!(answers.iter().filter(|a| a.0 == 200).count(), 2, "{answers:?}");
    assert!(answers.iter().all(|a| a.0 == 200 || a.1 == "delegation_exhausted"), "{answers:?}");
    assert_eq!(upstream.count() - before, 2);

    // A child minted on A works on B; once the lead is disabled in both replicas' config, both
    // refuse it, though neither revoked it.
    let unbudgeted = serde_json::json!({ "secretref": ["OPENAI_API_KEY"], "routes": ["openai"], "methods": ["POST"],
                                         "paths": ["/v1/chat/completions"] });
    let (_, key) = mint(&client, &a.proxy, &unbudgeted).await;
    let first = poll_call(&client, &b.proxy, &key, Duration::from_secs(1), |answer| answer.0 == 200).await;
    assert_eq!(first.0, 200, "replica B did not learn the delegation within a second");
    for (name, replica) in [("a", &a), ("b", &b)] {
        let path = dir.path().join(name).join("keyward.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("role = \"lead\"\n", "role = \"lead\"\ndisabled = true\n")).unwrap();
        let r = client.post(format!("{}/admin/reload", replica.admin)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    for replica in [&a, &b] {
        assert_eq!(chat_code(&client, &replica.proxy, LEAD_KEY).await, (401, "unknown_agent_key".to_string()));
        assert_eq!(chat_code(&client, &replica.proxy, &key).await, (401, "delegation_withdrawn".to_string()));
    }
    a.terminate();
    b.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_quarantines_and_first_uses_survive_a_restart_in_redis() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let redis_port = closed_port();
    let _redis = start_redis(redis_port);
    let client = common::client();
    let admin = |base: &str, path: &str| {
        let request = client.post(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN);
        async move {
            let r = request.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let first_uses = |logs: &str| logs.lines().filter(|l| l.contains("first_use") && l.contains("lead-1")).count();

    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_closed");
    assert_eq!(chat_code(&client, &a.proxy, LEAD_KEY).await.0, 200);
    admin(&a.admin, "/admin/agents/limited-1/quarantine").await;
    // The first use reaches Redis in the background, and at the latest at shutdown.
    let logs = a.terminate();
    assert_eq!(first_uses(&logs), 1, "{logs}");
    assert!(!dir.path().join("a").join("keyward-state.json").exists(), "with redis the state lives in redis");

    // Restarted: the quarantine holds from the first request, and lead-1's first use is old news.
    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_closed");
    assert_eq!(chat_code(&client, &a.proxy, LIMITED_KEY).await, (403, "agent_quarantined".to_string()));
    assert_eq!(chat_code(&client, &a.proxy, LEAD_KEY).await.0, 200);
    let revoked = admin(&a.admin, "/admin/agents/lead-1/revoke").await;
    let logs = a.terminate();
    assert_eq!(first_uses(&logs), 0, "first use means first ever:\n{logs}");
    assert!(logs.contains("loaded from redis"), "{logs}");

    // A replica that never ran before starts with the revocation already in force.
    let b = replica(dir.path(), "b", &upstream.url(), redis_port, "fail_closed");
    assert_eq!(chat_code(&client, &b.proxy, LEAD_KEY).await, (401, "agent_revoked".to_string()));
    assert_eq!(chat_code(&client, &b.proxy, LIMITED_KEY).await, (403, "agent_quarantined".to_string()));
    b.terminate();
    assert_eq!(revoked["persisted"], true, "{revoked}");
}
