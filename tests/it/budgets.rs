//! Token and cost budgets from the usage the upstream reports: the official openai and
//! anthropic clients each charge exactly what the fake upstream reported; a budget admits calls
//! until a reservation no longer fits, answers 429 with Retry-After, and admits again in the
//! next window; cost budgets use the price table; a stream that would exhaust a `cut_off`
//! budget ends at an event boundary; shadow budgets let the call through and record
//! `would_deny`; accounts survive a restart; and two replicas with one Redis share a budget.

use crate::common;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};
use tokio::process::Command;

const PRICES: &str = r#"
[usage.prices]
"gpt-fake" = { input = 1.0, output = 2.0, cache_read = 0.5 }
"claude-fake" = { input = 3.0, output = 15.0, cache_read = 0.3, cache_write = 3.75 }
"#;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/usage_clients.py")
}

async fn run_client(case: &str, base: &str) -> Value {
    let mut command = Command::new("python3");
    command.env("NO_PROXY", "127.0.0.1,localhost").env_remove("HTTP_PROXY").env_remove("HTTPS_PROXY");
    command.env_remove("ALL_PROXY").env("PYTHONDONTWRITEBYTECODE", "1").kill_on_drop(true);
    command.args([script().to_str().unwrap(), case, base, WORKER_KEY]);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .unwrap_or_else(|_| panic!("{case} did not finish within 60 s"))
        .expect("python3 runs (scripts/test.sh installs openai and anthropic)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{case} failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{case} printed no JSON ({e}):\n{stdout}"))
}

async fn budgets(h: &Harness) -> Value {
    admin_get(&h.client, &format!("{}/admin/budgets", h.admin)).await
}

/// The account of budget `name` for `holder`, once no reservation is in flight (settling runs
/// just after the response ends).
async fn settled_account(h: &Harness, name: &str, holder: &str) -> Value {
    for _ in 0..100 {
        let all = budgets(h).await;
        let account = all["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .and_then(|b| b["accounts"].as_array().unwrap().iter().find(|a| a["holder"] == holder).cloned())
            .unwrap_or_else(|| panic!("no account {name}/{holder}: {all}"));
        let reserved = account["tokens"]["reserved"].as_u64().unwrap_or(0)
            + (account["costUsd"]["reserved"].as_f64().unwrap_or(0.0) > 0.0) as u64;
        if reserved == 0 {
            return account;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("budget {name} still has a reservation in flight");
}

/// The outcome records with `usage`, once there are `count` of them (a stream's record is
/// written when the client closes it).
async fn usage_records(h: &Harness, count: usize) -> Vec<Value> {
    for _ in 0..200 {
        let records: Vec<Value> = h.audit().into_iter().filter(|r| r["usage"].is_object()).collect();
        if records.len() >= count {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("fewer than {count} metered records: {:#?}", h.audit());
}

fn usage_of(record: &Value) -> (u64, u64, u64, u64) {
    let u = &record["usage"];
    let n = |k: &str| u[k].as_u64().unwrap_or_else(|| panic!("no {k} in {record}"));
    (n("inputTokens"), n("outputTokens"), n("cacheReadTokens"), n("cacheWriteTokens"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_and_anthropic_clients_are_charged_exactly_what_the_upstream_reported() {
    let extra = format!(
        "{PRICES}\n[[budgets]]\nname = \"worker-day\"\nagent = \"worker-1\"\ntokens = 1000000\ncost_usd = 100\nwindow = \"day\"\n{}",
        admin_block()
    );
    let h = Harness::start_with(&extra).await;
    // (case, text, usage as keyward normalises it: input without cached, output, cache read, cache write)
    let cases = [
        ("chat", "Hello from the fake upstream.", (3, 7, 2, 0)),
        ("chat-stream", "tok0 tok1 tok2 tok3 tok4 ", (7, 5, 2, 0)),
        ("chat-stream-usage", "tok0 tok1 tok2 tok3 tok4 ", (7, 5, 2, 0)),
        ("responses-stream", "Hello from the fake upstream.", (8, 6, 3, 0)),
        ("anthropic", "Hello from the fake upstream.", (5, 7, 4, 3)),
        ("anthropic-stream", "Hello from the fake upstream.", (5, 7, 4, 3)),
    ];
    let mut total_tokens = 0;
    let mut total_cost = 0.0;
    for (i, (case, text, expected)) in cases.iter().enumerate() {
        let out = run_client(case, &h.base).await;
        assert_eq!(out["text"], *text, "{case}: {out}");
        let records = usage_records(&h, i + 1).await;
        let record = &records[i];
        assert_eq!(usage_of(record), *expected, "{case}: {record}");
        assert_eq!(record["usage"]["reported"], true, "{case}: {record}");
        assert_eq!(record["budgets"], json!(["worker-day"]), "{case}: {record}");
        assert_eq!(record["outcome"], "success", "{case}: {record}");
        let (input, output, read, write) = *expected;
        total_tokens += input + output + read + write;
        let (pi, po, pr, pw) =
            if case.starts_with("anthropic") { (3.0, 15.0, 0.3, 3.75) } else { (1.0, 2.0, 0.5, 1.0) };
        let cost = (pi * input as f64 + po * output as f64 + pr * read as f64 + pw * write as f64) / 1e6;
        let recorded = record["usage"]["costUsd"].as_f64().unwrap();
        assert!((recorded - cost).abs() < 1.5e-6, "{case}: cost {recorded} != {cost}");
        total_cost += recorded;
        let account = settled_account(&h, "worker-day", "worker-1").await;
        assert_eq!(account["tokens"]["used"], total_tokens, "{case}: {account}");
        assert!((account["costUsd"]["used"].as_f64().unwrap() - total_cost).abs() < 1e-9, "{case}: {account}");
    }

    // The stream without include_usage: keyward asked for usage upstream, and the client saw
    // exactly what it asked for (no usage chunk, no `usage` field on any chunk).
    let out = run_client("chat-stream", &h.base).await;
    assert_eq!(out["chunks"], 5, "{out}");
    assert_eq!(out["usage"], json!([]), "{out}");
    assert_eq!(out["without_choices"], 0, "{out}");
    assert!(!out["fields"].as_array().unwrap().contains(&json!("usage")), "{out}");
    let asked: Value = serde_json::from_slice(&h.upstream.last().unwrap().body).unwrap();
    assert_eq!(asked["stream_options"]["include_usage"], true, "keyward asked the upstream for usage");
    // The client that asked for usage got the usage chunk.
    let out = run_client("chat-stream-usage", &h.base).await;
    assert_eq!(out["without_choices"], 1, "{out}");
    assert_eq!(out["usage"][0]["prompt_tokens"], 9, "{out}");

    // Byte for byte: the stream keyward hands on is the one the upstream sends a client that
    // did not ask for usage.
    let body = json!({ "model": "gpt-fake", "messages": [{ "role": "user", "content": "hi" }], "stream": true });
    let direct = h.client.post(format!("{}/v1/chat/completions", h.upstream.url())).json(&body).send().await.unwrap();
    let direct = direct.bytes().await.unwrap();
    let via =
        h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).json(&body).send().await.unwrap();
    assert!(via.headers().get("content-length").is_none());
    let via = via.bytes().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&via), String::from_utf8_lossy(&direct));

    // Token and cost counters, labelled by agent, price-table model and route.
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(
            "keyward_tokens_total{agent=\"worker-1\",model=\"claude-fake\",route=\"anthropic\",kind=\"cache_write\"} 6"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("keyward_cost_usd_total{agent=\"worker-1\",model=\"gpt-fake\",route=\"openai\"}"));
    // A model name is the agent's text: one that carries the agent's key is refused under a
    // cost budget without the key in the message, and never recorded with it.
    let body = json!({ "model": format!("o9-{WORKER_KEY}"), "max_tokens": 5, "messages": [] });
    let r = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).json(&body).send();
    let error = r.await.unwrap().text().await.unwrap();
    assert!(error.contains("model_not_priced") && !error.contains(WORKER_KEY), "{error}");
    let audit = std::fs::read_to_string(h.audit_path()).unwrap();
    assert_no_canary("the audit file", &audit);
    assert!(!audit.contains(WORKER_KEY), "the agent key reached the audit file");
    h.stop().await;
}

/// Sleeps until just after the start of the next `seconds`-long window (epoch-aligned, as the
/// budget's windows are), so a short sequence of calls falls in one window.
async fn at_window_start(seconds: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let next = (now / (seconds * 1000) + 1) * seconds * 1000;
    tokio::time::sleep(Duration::from_millis(next - now + 30)).await;
}

async fn chat(h: &Harness, body: &Value) -> reqwest::Response {
    h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).json(body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_budget_admits_until_the_reservation_no_longer_fits_then_429_until_the_window_turns() {
    let extra =
        format!("[[budgets]]\nname = \"tight\"\nrole = \"worker\"\ntokens = 100\nwindow = \"3s\"\n{}", admin_block());
    let h = Harness::start_with(&extra).await;
    let body = json!({ "model": "gpt-fake", "max_tokens": 50, "messages": [{ "role": "user", "content": "hello" }] });
    let reservation = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) + 50;
    assert!(reservation > 100 / 2 && reservation < 100 - 2 * 12, "the test assumes 3 calls fit: {reservation}");
    // The first call through a fresh keyward is slow (connections, first fetch); another agent
    // makes it, so the budgeted calls fit in one window.
    let warm = h.client.get(h.url("/openai/v1/models")).bearer_auth(READER_KEY).send().await.unwrap();
    assert_eq!(warm.status(), 200);
    at_window_start(3).await;
    let started = Instant::now();
    // Each call reserves `reservation` and settles at the 12 tokens the fake reports.
    let mut admitted = 0;
    loop {
        let response = chat(&h, &body).await;
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=3).contains(&retry_after), "Retry-After {retry_after} points at the window's end");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains("budget 'tight'") && message.contains("worker-1"), "{message}");
            break;
        }
        assert_eq!(response.status(), 200);
        admitted += 1;
        settled_account(&h, "tight", "worker-1").await;
        assert!(admitted < 10, "the budget never refused");
    }
    assert!(started.elapsed() < Duration::from_millis(2900), "the calls spanned a window; the machine is too slow");
    assert_eq!(admitted, (100 - reservation) / 12 + 1, "admitted until 12 × n + {reservation} > 100");
    let upstream_calls = h.upstream.count();
    assert_eq!(upstream_calls, admitted as usize + 1, "the refused call never reached the upstream (+1: warm-up)");
    let refused = h.wait_for_audit(|r| r["errorCode"] == "budget_exceeded").await;
    assert_eq!(refused["decision"], "throttled");
    assert!(refused.get("secretSource").is_none(), "the secret store was not touched: {refused}");
    let account = settled_account(&h, "tight", "worker-1").await;
    assert_eq!(account["tokens"]["used"], 12 * admitted);
    assert_eq!(account["tokens"]["remaining"], 100 - 12 * admitted);
    // The next window admits again.
    at_window_start(3).await;
    assert_eq!(chat(&h, &body).await.status(), 200);
    // A call that reports no usage (GitHub) is counted as a request only.
    let r = h.client.get(h.url("/github/user")).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let account = settled_account(&h, "tight", "worker-1").await;
    assert_eq!(account["requests"], 2, "{account}");
    assert_eq!(account["tokens"]["used"], 12, "{account}");
    let metrics = h.metrics().await;
    assert!(metrics.contains("keyward_budget_refusals_total{budget=\"tight\"} 1"), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_budget_charges_from_the_price_table_and_refuses_unpriced_models() {
    // 1000 µUSD per input token, 2000 per output token: a call reports 3 + 2 cached input and
    // 7 output tokens = 3000 + 1000 + 14000 = 18000 µUSD.
    let extra = format!(
        "[usage.prices]\n\"gpt-fake\" = {{ input = 1000, output = 2000, cache_read = 500 }}\n[[budgets]]\nname = \"spend\"\npool = {{ agents = [\"worker-1\"] }}\ncost_usd = 0.2\nwindow = \"month\"\n{}",
        admin_block()
    );
    let h = Harness::start_with(&extra).await;
    let body = json!({ "model": "gpt-fake", "max_tokens": 50, "messages": [{ "role": "user", "content": "hello" }] });
    let input_estimate = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4);
    let reservation = input_estimate * 1000 + 50 * 2000;
    let mut admitted = 0u64;
    loop {
        let response = chat(&h, &body).await;
        if response.status() == 429 {
            let error: Value = response.json().await.unwrap();
            assert!(error["error"]["message"].as_str().unwrap().contains("cost per month"), "{error}");
            break;
        }
        assert_eq!(response.status(), 200);
        admitted += 1;
        settled_account(&h, "spend", "pool").await;
        assert!(admitted < 20);
    }
    assert_eq!(admitted, (200_000 - reservation) / 18_000 + 1);
    let account = settled_account(&h, "spend", "pool").await;
    assert!((account["costUsd"]["used"].as_f64().unwrap() - 0.018 * admitted as f64).abs() < 1e-9, "{account}");
    let record = h.audit().into_iter().find(|r| r["usage"].is_object()).unwrap();
    assert_eq!(record["usage"]["costUsd"], 0.018);
    // A model that is not in the price table cannot be charged: refused before the upstream.
    let before = h.upstream.count();
    let response = chat(&h, &json!({ "model": "o9-secret", "messages": [] })).await;
    assert_eq!(response.status(), 403);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "model_not_priced", "{error}");
    assert_eq!(h.upstream.count(), before);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_would_exhaust_a_cut_off_budget_ends_at_an_event_boundary() {
    let extra = format!(
        "[usage]\ndefault_max_output_tokens = 5\n[[budgets]]\nname = \"stream-cap\"\nagent = \"worker-1\"\ntokens = 60\nwindow = \"day\"\ncut_off = true\n{}",
        admin_block()
    );
    let h = Harness::start_with(&extra).await;
    let body = json!({ "model": "gpt-fake", "messages": [{ "role": "user", "content": "go" }], "stream": true,
                       "fake_events": 40, "fake_interval_ms": 1 });
    let response = chat(&h, &body).await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap();
    assert!(text.ends_with("\n\n"), "the stream ended at an event boundary: {text:?}");
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() > 3 && events.len() < 40, "cut mid-way: {} events", events.len());
    for event in &events {
        let data = event.strip_prefix("data: ").unwrap_or_else(|| panic!("whole event: {event:?}"));
        let chunk: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data:?}"));
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
    let record = h.wait_for_audit(|r| r["outcome"] == "budget_cut").await;
    assert_eq!(record["ended"], json!({ "by": "keyward", "at": "mid_body" }), "{record}");
    assert_eq!(record["success"], false);
    assert_eq!(record["usage"]["reported"], false);
    let metrics = h.metrics().await;
    assert!(metrics.contains("keyward_budget_cuts_total{budget=\"stream-cap\"} 1"), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_budget_lets_the_call_through_and_records_would_deny() {
    let extra = format!(
        "[[budgets]]\nname = \"trial\"\nrole = \"worker\"\ntokens = 10\nwindow = \"day\"\nmode = \"shadow\"\n{}",
        admin_block()
    );
    let h = Harness::start_with(&extra).await;
    let body = json!({ "model": "gpt-fake", "messages": [{ "role": "user", "content": "hello" }] });
    assert_eq!(chat(&h, &body).await.status(), 200);
    let record = h.wait_for_audit(|r| r["usage"].is_object()).await;
    assert_eq!(record["decision"], "would_deny", "{record}");
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(record["wouldDeny"][0]["policy"], "budget:trial", "{record}");
    assert!(record["wouldDeny"][0]["reason"].as_str().unwrap().contains("budget 'trial'"), "{record}");
    // Still charged, so the burn shows what enforcing it would have meant.
    let account = settled_account(&h, "trial", "worker-1").await;
    assert_eq!(account["tokens"]["used"], 12);
    let metrics = h.metrics().await;
    assert!(metrics.contains("keyward_would_deny_total{agent=\"worker-1\",policy=\"budget\"} 1"), "{metrics}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_accounts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let extra = format!(
        "[[budgets]]\nname = \"kept\"\nagent = \"worker-1\"\ntokens = 1000\nwindow = \"month\"\n{}",
        admin_block()
    );
    let text = config_text(dir.path(), &upstream.url(), &extra);
    let client = client();
    let body = json!({ "model": "gpt-fake", "max_tokens": 50, "messages": [{ "role": "user", "content": "hello" }] });
    let used = |budgets: &Value| budgets["budgets"][0]["accounts"][0]["tokens"]["used"].clone();
    for round in 1..=2u64 {
        let config = keyward::config::load_str(&text, "test.toml", false).unwrap();
        let running = keyward::instance::start(config).await.unwrap();
        let base = format!("http://{}", running.proxy_addr.unwrap());
        let admin = format!("http://{}/admin/budgets", running.admin_addr);
        let r = client.post(format!("{base}/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).json(&body).send();
        assert_eq!(r.await.unwrap().status(), 200);
        let mut seen = Value::Null;
        for _ in 0..100 {
            seen = admin_get(&client, &admin).await;
            if used(&seen) == json!(12 * round) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(used(&seen), json!(12 * round), "round {round}: {seen}");
        running.shutdown().await;
    }
}

/// A replica (the real binary) with the Redis backend and one token budget shared by the
/// worker role's pool; `failure` is the budget's own Redis failure policy.
fn replica(
    dir: &std::path::Path,
    name: &str,
    upstream: &str,
    redis_port: u16,
    failure: &str,
) -> common::process::Spawned {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    write_secrets(&sub);
    let extra = format!(
        r#"
[limits]
backend = "redis"
redis_url = "redis://127.0.0.1:{redis_port}"
redis_failure = "fail_open"

[[budgets]]
name = "shared-pool"
pool = {{ roles = ["worker"] }}
tokens = 600
window = "day"
redis_failure = "{failure}"

[roles.worker.anomaly]
rate_spike = {{ enabled = false }}
first_use = {{ enabled = false }}
{admin}"#,
        admin = admin_block()
    );
    let path = sub.join("keyward.toml");
    std::fs::write(&path, config_text(&sub, upstream, &extra)).unwrap();
    common::process::Spawned::serve(&sub, &["--config", path.to_str().unwrap()], &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_one_redis_never_hand_out_the_same_budget() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = keyward::fake_upstream::FakeUpstream::start().await.unwrap();
    let redis_port = closed_port();
    let redis = crate::redis::start_redis(redis_port);
    let a = replica(dir.path(), "a", &upstream.url(), redis_port, "fail_open");
    let b = replica(dir.path(), "b", &upstream.url(), redis_port, "fail_closed");
    let client = client();
    let body = json!({ "model": "gpt-fake", "max_tokens": 50, "messages": [{ "role": "user", "content": "hello" }] });
    let reservation = (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) + 50;

    // Eight concurrent workers, four on each replica, each calling until it is refused (at
    // most 40 calls each).
    let mut workers = Vec::new();
    for i in 0..8 {
        let base = if i % 2 == 0 { a.proxy.clone() } else { b.proxy.clone() };
        let (client, body) = (client.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..40 {
                let r = client
                    .post(format!("{base}/openai/v1/chat/completions"))
                    .bearer_auth(WORKER_KEY)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("{base}: {e:?}"))?;
                match r.status().as_u16() {
                    200 => {
                        r.bytes().await.unwrap();
                        admitted += 1;
                    }
                    429 => {
                        let error: Value = r.json().await.unwrap();
                        // On a loaded machine a Redis answer can outlast the 300 ms timeout:
                        // replica B's budget fails closed then, and an agent retries.
                        if error["error"]["code"] == "rate_limiter_unavailable" {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        assert_eq!(error["error"]["code"], "budget_exceeded", "{error}");
                        break;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            Ok::<u64, String>(admitted)
        }));
    }
    let mut admitted = 0;
    for worker in workers {
        match worker.await.unwrap() {
            Ok(n) => admitted += n,
            Err(e) => panic!("{e}\nreplica a:\n{}\nreplica b:\n{}", a.logs.lock().unwrap(), b.logs.lock().unwrap()),
        }
    }
    // Each call reports 12 tokens. One replica alone would admit (600 - reservation) / 12 + 1
    // calls; two counting apart would admit twice that.
    let alone = (600 - reservation) / 12 + 1;
    assert_eq!(upstream.count() as u64, admitted);
    // Replica a's budget fails open: on a machine loaded enough that a Redis answer outlasts its
    // timeout, a admits calls against its local account, which Redis never sees (its log says
    // "falling back to local limits"). The shared account's checks hold for calls that went
    // through Redis, so they are made when a never fell back.
    let a_fell_back = a.logs.lock().unwrap().contains("falling back to local limits");
    if a_fell_back {
        eprintln!("replica a fell back to its local account; the shared account's checks are skipped");
    } else {
        assert!(12 * admitted <= 600 + reservation, "{admitted} calls charged {} tokens", 12 * admitted);
        assert!(admitted <= alone, "{admitted} admitted, more than the {alone} one budget allows");
    }
    // Both replicas read the one account from Redis, settled.
    let mut account = Value::Null;
    for _ in 0..100 {
        let seen = admin_get(&client, &format!("{}/admin/budgets", b.admin)).await;
        account = seen["budgets"][0]["accounts"][0].clone();
        if account["tokens"]["reserved"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reservation whose script ran after its caller had timed out stays reserved, and so does
    // one whose settlement timed out (a loaded machine, Redis slower than its timeout): such a
    // call is counted at its reservation, so the budget over-counts, never under-counts.
    let used = account["tokens"]["used"].as_u64().unwrap();
    let reserved = account["tokens"]["reserved"].as_u64().unwrap();
    assert_eq!(reserved % reservation, 0, "{account}");
    assert!(used <= 12 * admitted && used.is_multiple_of(12), "{account}");
    let unsettled = (12 * admitted - used) / 12;
    if !a_fell_back {
        assert!(reserved >= unsettled * reservation, "an unsettled call keeps its reservation: {account}");
        assert!(account["requests"].as_u64().unwrap() >= admitted, "every reservation counted: {account}");
    }
    let from_a = admin_get(&client, &format!("{}/admin/budgets", a.admin)).await;
    assert_eq!(from_a["budgets"][0]["accounts"][0]["tokens"]["used"], used, "both replicas read one account");

    for (name, replica) in [("a", &a), ("b", &b)] {
        if name == "a" && a_fell_back {
            continue;
        }
        let logs = replica.logs.lock().unwrap();
        assert!(!logs.contains("could not be settled"), "replica {name} failed to settle with Redis up:\n{logs}");
    }

    // Redis gone: the replica whose budget fails closed refuses, the other counts on its own.
    drop(redis);
    let small = json!({ "model": "gpt-fake", "max_tokens": 5, "messages": [] });
    let call = |base: String| {
        let (client, small) = (client.clone(), small.clone());
        async move {
            let r = client
                .post(format!("{base}/openai/v1/chat/completions"))
                .bearer_auth(WORKER_KEY)
                .json(&small)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            (status, body["error"]["code"].as_str().unwrap_or_default().to_string())
        }
    };
    assert_eq!(call(b.proxy.clone()).await, (429, "rate_limiter_unavailable".to_string()));
    assert_eq!(call(a.proxy.clone()).await.0, 200);
}

const TRIAL_KEY: &str = "kw_testTrialAgentKey456789abcdefghijklmnopqrs";
const ROLLOUT_KEY: &str = "kw_testRolloutAgentKey6789abcdefghijklmnopqrs";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowed_grants_quotas_and_roles_let_the_call_through_and_record_would_deny() {
    let extra = format!(
        r#"
[roles.trialist]
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"], rate = "1/min", burst = 1, quota_mode = "shadow" }},
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/v1/models"], mode = "shadow" }},
]
[[agents]]
id = "trial-1"
role = "trialist"
key_sha256 = "{trial}"

[roles.rollout]
mode = "shadow"
grants = [{{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }}]
[[agents]]
id = "rollout-1"
role = "rollout"
key_sha256 = "{rollout}"
[[budgets]]
name = "rollout-tiny"
role = "rollout"
tokens = 1
window = "day"
{admin}"#,
        trial = sha(TRIAL_KEY),
        rollout = sha(ROLLOUT_KEY),
        admin = admin_block()
    );
    let h = Harness::start_with(&extra).await;
    let body = json!({ "model": "gpt-fake", "messages": [] });
    let post =
        |key: &'static str| h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(key).json(&body).send();
    // The shadowed grant: GET /v1/models goes through, recorded as what the enforced grants
    // alone would have refused.
    let r = h.client.get(h.url("/openai/v1/models")).bearer_auth(TRIAL_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let record = h.wait_for_audit(|r| r["agentId"] == "trial-1" && r["method"] == "GET").await;
    assert_eq!(record["decision"], "would_deny", "{record}");
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(record["wouldDeny"][0]["policy"], "grant:trialist[1]", "{record}");
    assert!(record["wouldDeny"][0]["reason"].as_str().unwrap().contains("is not granted"), "{record}");
    // The shadowed quota of 1 a minute: three calls pass, the second and third would not have.
    for _ in 0..3 {
        assert_eq!(post(TRIAL_KEY).await.unwrap().status(), 200);
    }
    let posts: Vec<Value> =
        h.audit().into_iter().filter(|r| r["agentId"] == "trial-1" && r["method"] == "POST").collect();
    let decisions: Vec<&str> = posts.iter().map(|r| r["decision"].as_str().unwrap()).collect();
    assert_eq!(decisions, ["allowed", "would_deny", "would_deny"], "{posts:#?}");
    assert_eq!(posts[1]["wouldDeny"][0]["policy"], "quota:openai");
    assert!(posts[1]["wouldDeny"][0]["reason"].as_str().unwrap().contains("over its quota"));

    // The shadowed role: an ungranted path on a route it holds goes through with that route's
    // credential; a route it holds nothing on has no credential to send, so it stays refused.
    let r = h.client.get(h.url("/openai/v1/models")).bearer_auth(ROLLOUT_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let record = h.wait_for_audit(|r| r["agentId"] == "rollout-1").await;
    assert_eq!(record["decision"], "would_deny", "{record}");
    assert_eq!(record["wouldDeny"][0]["policy"], "role:rollout", "{record}");
    let r = h.client.get(h.url("/github/user")).bearer_auth(ROLLOUT_KEY).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // A path that carries the agent's key is refused, and the would-deny reason that quotes
    // the path does not carry the key into the record.
    let r = h.client.get(h.url(&format!("/openai/v1/models/{ROLLOUT_KEY}"))).bearer_auth(ROLLOUT_KEY).send();
    assert_eq!(r.await.unwrap().status(), 400);
    let audit = std::fs::read_to_string(h.audit_path()).unwrap();
    assert!(!audit.contains(ROLLOUT_KEY), "the agent key reached the audit file");
    // The role's budgets are shadowed with it: an enforced budget of 1 token lets the call by.
    assert_eq!(post(ROLLOUT_KEY).await.unwrap().status(), 200);
    let record = h.wait_for_audit(|r| r["agentId"] == "rollout-1" && r["method"] == "POST").await;
    assert_eq!(record["decision"], "would_deny", "{record}");
    assert_eq!(record["wouldDeny"][0]["policy"], "budget:rollout-tiny", "{record}");
    assert_eq!(record["budgets"], json!(["rollout-tiny"]), "{record}");

    let metrics = h.metrics().await;
    for line in [
        "keyward_would_deny_total{agent=\"trial-1\",policy=\"grant\"} 1",
        "keyward_would_deny_total{agent=\"trial-1\",policy=\"quota\"} 2",
        "keyward_would_deny_total{agent=\"rollout-1\",policy=\"role\"} 2",
        "keyward_would_deny_total{agent=\"rollout-1\",policy=\"budget\"} 1",
        "keyward_requests_total{route=\"openai\",status=\"200\",decision=\"would_deny\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The audit report and the dashboard's summary list them per agent and policy.
    let report = admin_get(&h.client, &format!("{}/admin/report?format=json", h.admin)).await;
    assert_eq!(report["would_deny"]["trial-1"]["quota:openai"], 2, "{report}");
    assert_eq!(report["would_deny"]["rollout-1"]["role:rollout"], 2, "{report}");
    let text = h.client.get(format!("{}/admin/report?format=text", h.admin)).bearer_auth(ADMIN_TOKEN).send();
    let text = text.await.unwrap().text().await.unwrap();
    assert!(text.contains("would have been refused (policies in shadow mode):"), "{text}");
    assert!(text.lines().any(|l| l.contains("trial-1") && l.contains("quota:openai") && l.ends_with(" 2")), "{text}");
    let summary = admin_get(&h.client, &format!("{}/admin/audit/summary", h.admin)).await;
    assert_eq!(summary["would_deny"]["trial-1"]["grant:trialist[1]"], 1, "{summary}");
    h.stop().await;
}
