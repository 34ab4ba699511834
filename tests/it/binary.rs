//! The real binary: env provider end to end with TRACE logs checked for canaries, `check`
//! errors with file:line and field, every shipped config, `demo`, `agents new`, embedded default.

use crate::common;

use std::path::Path;

use common::process::{Spawned, keyward};
use common::*;
use keyward::fake_upstream::FakeUpstream;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_provider_end_to_end_with_trace_logs_free_of_canaries() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    let config_path = binary_config(dir.path(), &upstream.url(), "");
    let spawned = Spawned::serve(
        dir.path(),
        &["--config", config_path.to_str().unwrap(), "--log", "trace"],
        &[("KW_TEST_OPENAI_KEY", CANARY_OPENAI)],
    );
    let client = common::client();
    let chat = format!("{}/openai/v1/chat/completions", spawned.proxy);
    let ok = client.post(&chat).bearer_auth(WORKER_KEY).body(r#"{"stream":true}"#).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let body = ok.text().await.unwrap();
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_no_canary("the streamed response", &body);
    assert_eq!(upstream.last().unwrap().target, "/v1/chat/completions");
    assert_eq!(upstream.last().unwrap().headers["authorization"], format!("Bearer {CANARY_OPENAI}").as_str());
    let denied =
        client.post(format!("{}/openai/v1/files", spawned.proxy)).bearer_auth(WORKER_KEY).send().await.unwrap();
    assert_eq!(denied.status(), 403);
    let unknown = client.post(&chat).bearer_auth("kw_nobody").send().await.unwrap();
    assert_eq!(unknown.status(), 401);
    let metrics = client.get(format!("{}/metrics", spawned.admin)).send().await.unwrap().text().await.unwrap();
    assert_no_canary("metrics", &metrics);

    let logs = spawned.terminate();
    assert!(logs.contains("TRACE"), "TRACE output was not captured:\n{logs}");
    assert!(logs.contains("request finished"), "{logs}");
    assert_no_canary("TRACE logs", &logs);
    assert!(!logs.contains(WORKER_KEY), "an agent key reached the logs");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert_eq!(outcomes(&dir.path().join("audit.jsonl")).len(), 3, "{audit}");
    // The forwarded call has a released record before its outcome; the refused ones do not.
    assert_eq!(audit.matches("\"type\":\"request.released\"").count(), 1, "{audit}");
    assert_no_canary("the audit file", &audit);
    assert!(audit.contains(r#""agentId":"subagent-abc123""#));
}

fn check(config_name: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(config_name);
    std::fs::write(&path, text).unwrap();
    let output = keyward().arg("check").arg("--config").arg(&path).current_dir(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr).replace(&format!("{}/", dir.path().display()), "");
    (output.status.success(), text)
}

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[sources]]
name = "e"
provider = "env"
mapping = { A = "{{A_VAR}}" }

[[routes]]
name = "r"
prefix = "/r"
upstream = "https://example.com"
agent_key = { header = "authorization", scheme = "Bearer" }
inject = { header = "authorization", value = "Bearer {{secret}}" }

[roles.worker]
grants = [{ route = "r", secret = "A", methods = ["GET"], paths = ["/**"] }]

[[agents]]
id = "a"
role = "worker"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
"#;

#[test]
fn check_reports_file_line_and_field_for_every_problem() {
    assert_eq!(check("good.toml", GOOD), (true, String::new()));
    let plaintext_opt_in = GOOD.replace("https://example.com", "http://example.com\"\nallow_plaintext = true\n#");
    assert_eq!(check("good.toml", &plaintext_opt_in), (true, String::new()));
    let cases = [
        (GOOD.replace("listen =", "listn ="), "bad.toml:3: server.listn: unknown field `listn`"),
        (
            GOOD.replace("scheme = \"Bearer\"", "scheme = 5"),
            "bad.toml:14: routes[0].agent_key.scheme: expected a string or a list of strings",
        ),
        (GOOD.replace("role = \"worker\"", "role = \"boss\""), "bad.toml:22: agents[0].role: no role named 'boss'"),
        (
            GOOD.replace("route = \"r\"", "route = \"q\""),
            "bad.toml:18: roles.worker.grants[0].route: no route named 'q'",
        ),
        (
            GOOD.replace("secret = \"A\"", "secret = \"B\""),
            "roles.worker.grants[0].secret: no source provides a secret named 'B'",
        ),
        (GOOD.replace("\"/**\"", "\"**\""), "roles.worker.grants[0].paths[0]: '**' must start with '/'"),
        (
            GOOD.replace("provider = \"env\"", "provider = \"vault9\""),
            "bad.toml:7: sources[0].provider: unknown provider 'vault9'",
        ),
        (GOOD.replace("{{A_VAR}}", "A_VAR"), "bad.toml:8: sources[0].mapping.A: is not a selector"),
        (GOOD.replace("https://example.com", "ftp://example.com"), "bad.toml:13: routes[0].upstream"),
        (GOOD.replace("0000000000", "zz"), "bad.toml:23: agents[0].key_sha256: must be 64 hex characters"),
        (GOOD.replace("prefix = \"/r\"", "prefix = \"/r/\""), "bad.toml:12: routes[0].prefix"),
        (GOOD.replace("{{secret}}", "{{secrte}}"), "routes[0].inject.value: unknown placeholder"),
        (GOOD.replace("[server]", "[server"), "bad.toml:2:"),
        (
            GOOD.replace("https://example.com", "http://example.com"),
            "bad.toml:13: routes[0].upstream: 'http://example.com' would send credentials in cleartext",
        ),
        (
            GOOD.replace("header = \"authorization\", value", "header = \"host\", value"),
            "routes[0].inject.header: 'host' is a connection or framing header",
        ),
        (
            GOOD.replace("{ header = \"authorization\", scheme", "{ header = \"content-length\", scheme"),
            "routes[0].agent_key.header: 'content-length'",
        ),
        (
            GOOD.replace("[server]", "[server]\nheader_read_timeout_ms = 0"),
            "server.header_read_timeout_ms: must be greater than 0",
        ),
        (
            GOOD.replace("[server]", "[server]\npark_idle_after_ms = 0"),
            "bad.toml:3: server.park_idle_after_ms: must be greater than 0",
        ),
        (
            GOOD.replace("[server]", "[server]\nmax_connections = 0"),
            "bad.toml:3: server.max_connections: must be greater than 0",
        ),
        (
            GOOD.replace(
                "mapping = { A = \"{{A_VAR}}\" }",
                "mapping = { A = \"{{A_VAR}}\", B = \"{{B_VAR}}\" }\ncache = { max_size = 1 }",
            ),
            "sources[0].cache.max_size: is 1 but this source provides 2 secrets",
        ),
        (
            GOOD.replace("methods = [\"GET\"]", "methods = [\"TRACE\"]"),
            "roles.worker.grants[0].methods: TRACE cannot be granted",
        ),
        (
            format!("{GOOD}\n[[sources]]\nname = \"f\"\nprovider = \"env\"\nmapping = {{ A = \"{{{{OTHER}}}}\" }}\n"),
            "bad.toml:28: sources[1].mapping.A: secret 'A' is already provided by source 'e'",
        ),
    ];
    for (text, expected) in &cases {
        let (ok, output) = check("bad.toml", text);
        assert!(!ok, "accepted a bad config; expected {expected}");
        assert!(output.contains(expected), "expected `{expected}` in:\n{output}");
    }
    // Several problems are all reported at once.
    let two = GOOD.replace("role = \"worker\"", "role = \"boss\"").replace("route = \"r\"", "route = \"q\"");
    let (_, output) = check("bad.toml", &two);
    assert!(output.contains("2 problem(s)"), "{output}");
}

/// `keyward check` goes on after a structural problem: a typo, an unknown route and a bad
/// cron schedule in one file are all reported in one run, each at its line.
#[test]
fn check_reports_structural_and_other_problems_in_one_run() {
    let text = GOOD
        .replace("prefix = \"/r\"", "prefx = \"/r\"\nprefix = \"/r\"")
        .replace("route = \"r\"", "route = \"s\"")
        .replace(
            "provider = \"env\"",
            "provider = \"file\"\npath = \"/dev/null\"\nrotation = { schedule = \"0 0 * 13 *\" }",
        )
        .replace("methods = [\"GET\"]", "methods = [\"GTE\"]");
    let (ok, output) = check("bad.toml", &text);
    assert!(!ok, "{output}");
    for expected in [
        "bad.toml:9: sources[0].rotation.schedule: '0 0 * 13 *': the month field '13' is out of range",
        "bad.toml:14: routes[0].prefx: unknown field `prefx`",
        "(did you mean `prefix`?)",
        "bad.toml:21: roles.worker.grants[0].route: no route named 's' (did you mean 'r'?)",
        "bad.toml:21: roles.worker.grants[0].methods: 'GTE' is not an HTTP method keyward knows; did you mean \"GET\"?",
        "keyward: the config has 4 problem(s)",
    ] {
        assert!(output.contains(expected), "expected `{expected}` in:\n{output}");
    }
}

#[test]
fn json_configs_with_comments_load_and_report_lines() {
    let json = r#"{
  // the same shape as TOML
  "server": { "listen": "127.0.0.1:8080" },
  "sources": [{ "name": "e", "provider": "env", "mapping": { "A": "{{A_VAR}}" } }],
  "routes": [{ "name": "r", "prefix": "/r", "upstream": "https://example.com",
               "agent_key": { "header": "x-api-key" }, "inject": { "header": "x-api-key" } }],
  "roles": { "worker": { "grants": [{ "route": "r", "secret": "A", "methods": ["*"], "paths": ["/**"] }] } },
  "agents": [{ "id": "a", "role": "worker", "key_sha256": "0000000000000000000000000000000000000000000000000000000000000000" }]
}"#;
    assert_eq!(check("k.json", json), (true, String::new()));
    let (ok, output) = check("k.json", &json.replace("\"role\": \"worker\"", "\"role\": \"nope\""));
    assert!(!ok);
    assert!(output.contains("k.json:8: agents[0].role: no role named 'nope'"), "{output}");
    let (ok, output) = check("k.json", &json.replace("\"listen\"", "\"lisen\""));
    assert!(!ok);
    assert!(output.contains("k.json:3: server.lisen: unknown field"), "{output}");
}

#[test]
fn every_shipped_config_passes_check() {
    let mut checked = 0;
    let mut stack = vec![repo_root().join("config")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                let output =
                    keyward().arg("check").arg("--config").arg(&path).current_dir(repo_root()).output().unwrap();
                assert!(output.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "expected the default and example configs, checked {checked}");
}

#[test]
fn demo_shows_all_three_sides_and_masks_the_credential() {
    let output = keyward().arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    for section in ["what the agent sent", "what the upstream received", "what the agent got back", "the audit record"]
    {
        assert!(text.contains(section), "{text}");
    }
    assert!(text.contains("authorization: Bearer sk-d…[masked"), "{text}");
    assert!(text.contains("(the real credential was injected: yes)"), "{text}");
    assert!(text.contains(r#""agentId":"demo-agent""#), "{text}");
    assert!(!text.contains("sk-demo-"), "the demo printed the credential:\n{text}");
    // The agent key where each official client puts it: answered, never forwarded.
    assert_eq!(text.matches("agent key forwarded: no").count(), 6, "{text}");
    for client in ["anthropic (api_key)", "azure openai", "google genai", "github (token)"] {
        assert!(text.lines().any(|l| l.starts_with(client) && l.contains(" 200 ")), "{client}: {text}");
    }
}

#[test]
fn agents_new_prints_a_key_once_and_its_hash() {
    let output = keyward().args(["agents", "new", "--id", "subagent-abc123", "--role", "worker"]).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let key = text.split_whitespace().find(|w| w.starts_with("kw_")).unwrap();
    assert_eq!(key.len(), 46);
    assert!(text.contains(&format!("key_sha256 = \"{}\"", sha(key))), "{text}");
    assert!(text.contains("id = \"subagent-abc123\""));

    let output = keyward()
        .args(["agents", "new", "--id", "x", "--role", "nope", "--config", "config/keyward.toml"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no role 'nope'"));

    // An id the config already has: a warning before the key, which is still printed.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.toml"), GOOD).unwrap();
    let output = keyward()
        .args(["agents", "new", "--id", "a", "--role", "worker", "--config", "k.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let warning = String::from_utf8_lossy(&output.stderr);
    assert!(warning.contains("warning: k.toml already has an agent 'a' (role 'worker')"), "{warning}");
    assert!(warning.contains("replace its key_sha256"), "{warning}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("kw_"));
    // The config `serve` would use is consulted when none is named.
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/keyward.toml"), GOOD).unwrap();
    let output =
        keyward().args(["agents", "new", "--id", "a", "--role", "worker"]).current_dir(dir.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("config/keyward.toml already has an agent 'a'"));
    let output =
        keyward().args(["agents", "new", "--id", "b", "--role", "worker"]).current_dir(dir.path()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stderr), "", "a new id gets no warning");
}

#[test]
fn without_a_config_file_the_embedded_default_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let output =
        keyward().arg("check").current_dir(dir.path()).env("KEYWARD_STATE_DIR", state.path()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("<embedded config/keyward.toml>: OK"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "check wrote into the working directory");
}

/// The README's first command from any directory: the embedded default needs nothing from the
/// working directory (its demo secrets come with it), becomes ready, and keeps its audit trail
/// in the state directory; `check` agrees with `serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_serves_from_any_directory() {
    let cwd = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let spawned = Spawned::serve(
        cwd.path(),
        &["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("KEYWARD_STATE_DIR", state_dir)],
    );
    let started = std::time::Instant::now();
    loop {
        let ready = reqwest::get(format!("{}/readyz", spawned.admin)).await.unwrap().status();
        if ready == 200 {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "never ready:\n{}", spawned.logs());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // An unknown key is refused and audited in the state directory, not in the working directory.
    let r = common::client()
        .post(format!("{}/openai/v1/chat/completions", spawned.proxy))
        .bearer_auth("kw_notTheDemoKey")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let logs = spawned.terminate();
    assert!(!logs.contains("cannot read"), "{logs}");
    assert!(logs.contains(state_dir), "the log names where the state lives:\n{logs}");
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "serve wrote into the working directory");
    let audit = std::fs::read_to_string(state.path().join("var/audit/keyward-audit.jsonl")).unwrap();
    assert!(audit.contains("unknown_agent_key"), "{audit}");
    assert!(state.path().join("config/secrets.example.json").exists());
    let check = keyward().arg("check").current_dir(cwd.path()).env("KEYWARD_STATE_DIR", state_dir).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

/// Relative paths in a config file resolve against the file's own directory, whatever the
/// working directory: a file source and `sources_from` are found, and check says where.
#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(dir.path().join("conf/secrets.json"), r#"{"A": "v"}"#).unwrap();
    let text = r#"
[[sources]]
name = "s"
provider = "file"
path = "secrets.json"

[[routes]]
name = "r"
prefix = "/r"
upstream = "https://example.com"
agent_key = { header = "x-api-key" }
inject = { header = "x-api-key" }

[roles.worker]
grants = [{ route = "r", secret = "A", methods = ["GET"], paths = ["/**"] }]
"#;
    std::fs::write(dir.path().join("conf/k.toml"), text).unwrap();
    let output = keyward()
        .args(["check", "--config"])
        .arg(dir.path().join("conf/k.toml"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // Without the file beside the config, the problem names the resolved path.
    std::fs::remove_file(dir.path().join("conf/secrets.json")).unwrap();
    let output = keyward()
        .args(["check", "--config"])
        .arg(dir.path().join("conf/k.toml"))
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sources[0].path") && stderr.contains("conf/secrets.json"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_uses_config_keyward_toml_and_fails_closed_without_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    // The default config on free ports, in a directory without its secrets file.
    let text = keyward::config::EMBEDDED_DEFAULT
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/keyward.toml"), &text).unwrap();
    let spawned = Spawned::serve(dir.path(), &[], &[]);
    let health = reqwest::get(format!("{}/healthz", spawned.admin)).await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{}/readyz", spawned.admin)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let client = common::client();
    let r = client
        .post(format!("{}/openai/v1/chat/completions", spawned.proxy))
        .bearer_auth("kw_demodEi4lqgesStLOpXXiCZZP4OLLW9aXo8Ahw39P9h")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("secret_store_unavailable"), "{body}");
    let logs = spawned.terminate();
    assert!(logs.contains("config/keyward.toml"), "{logs}");
    assert!(dir.path().join("var/audit/keyward-audit.jsonl").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_open_at_shutdown_is_audited_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = FakeUpstream::start().await.unwrap();
    write_secrets(dir.path());
    let text = config_text(dir.path(), &upstream.url(), "")
        .replace("header_read_timeout_ms = 2000", "shutdown_grace_ms = 300");
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, text).unwrap();
    let spawned = Spawned::serve(dir.path(), &["--config", path.to_str().unwrap()], &[]);
    let response = common::client()
        .get(format!("{}/openai/_fake/sse?events=50&interval_ms=200", spawned.proxy))
        .bearer_auth(WORKER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let reader = tokio::spawn(async move { response.bytes().await.is_err() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    spawned.terminate();
    assert!(reader.await.unwrap(), "the stream should have been cut at shutdown");
    let records = outcomes(&dir.path().join("audit.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "shutdown", "{records:?}");
    assert_eq!(records[0]["success"], false);
    assert_eq!(records[0]["ended"], serde_json::json!({ "by": "keyward", "at": "mid_body" }));
}

#[test]
fn every_example_config_passes_check() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{root}/config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = keyward().arg("check").arg("--config").arg(&path).current_dir(root).output().unwrap();
            assert!(output.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

/// `sources_from` files are the article's JSON: problems in them point at their own lines.
#[test]
fn sources_from_reports_problems_at_the_external_files_lines() {
    let dir = tempfile::tempdir().unwrap();
    let article = include_str!("../../config/examples/openclaw-prod.json");
    let main =
        format!("sources_from = [\"prod.json\"]\n{}", GOOD.replace("secret = \"A\"", "secret = \"OPENAI_API_KEY\""));
    let staging =
        "\n[[sources]]\nname = \"staging\"\nprovider = \"env\"\nmapping = { OPENAI_API_KEY = \"{{STAGING_KEY}}\" }\n";
    let run = |prod: &str, main: &str| {
        std::fs::write(dir.path().join("prod.json"), prod).unwrap();
        std::fs::write(dir.path().join("k.toml"), main).unwrap();
        let output = keyward().args(["check", "--config", "k.toml"]).current_dir(dir.path()).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, out) = run(article, &format!("{main}{staging}"));
    assert!(ok, "{out}");
    assert!(out.contains("source 'prod': rotation schedule '0 0 * * 0' (UTC)"), "{out}");

    let (ok, out) = run(article, &main);
    assert!(!ok);
    assert!(out.contains("sources[1].rotation.fallback_to: no source is named 'staging'"), "{out}");
    let (ok, out) = run(&article.replace("\"secretName\"", "\"secretNam\""), &format!("{main}{staging}"));
    assert!(!ok);
    assert!(out.contains("prod.json:6: source.secretNam: unknown field `secretNam`"), "{out}");
    let (ok, out) = run(&article.replace("\"0 0 * * 0\"", "\"0 0 * *\""), &format!("{main}{staging}"));
    assert!(!ok);
    assert!(out.contains("prod.json:15: rotationPolicy.schedule: '0 0 * *' has 4 fields"), "{out}");
    let (ok, out) = run(
        &article.replace("\"enabled\": true,\n\"retentionDays\"", "\"enabled\": false,\n\"retentionDays\""),
        &format!("{main}{staging}"),
    );
    assert!(!ok);
    assert!(out.contains("the audit trail cannot be turned off"), "{out}");
    // The article's fuller rotationPolicy names a channel: it resolves through [notifications].
    let telegram = article.replace(
        "\"fallbackTo\": \"staging\"",
        "\"fallbackTo\": \"staging\",\n\"gracePeriodMinutes\": 30,\n\"notificationChannel\": \"telegram\"",
    );
    let (ok, out) = run(&telegram, &format!("{main}{staging}"));
    assert!(!ok);
    assert!(out.contains("prod.json:18: rotationPolicy.notificationChannel: 'telegram' is neither"), "{out}");
    let channels = "\n[notifications]\ntelegram = \"https://hooks.example.com/telegram\"\n";
    let (ok, out) = run(&telegram, &format!("{main}{staging}{channels}"));
    assert!(ok, "{out}");
    assert!(out.contains("grace 30 min"), "{out}");
    let (ok, out) = run("{ \"type\": \"external-secrets\", ", &format!("{main}{staging}"));
    assert!(!ok);
    assert!(out.starts_with("prod.json:"), "{out}");
}
