//! The `exec` provider with a real resolver process the test writes: the OpenClaw protocol on
//! stdin/stdout, a cleared environment with an allowlist, and each failure (timeout, bad JSON,
//! non-zero exit, oversized output, missing id) as a clear error that quotes no output, with 503
//! for the agent.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const EXEC_KEY: &str = "kw_testExecKey012345678901abcdefghijklmnopqrst";
const EXEC_SECRET: &str = "sk-canary-EXEC-5e4d3c2b1a09f8e7d6c5b4a3";
/// Printed by the resolver in its failure modes: must never reach an error, a log or the agent.
const LEAK: &str = "sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f";

/// The resolver: reads the request, records what it got, and answers as `mode` says.
const RESOLVER: &str = r#"#!/usr/bin/python3
import json, os, sys, time
here = os.path.dirname(os.path.abspath(__file__))
request = json.load(sys.stdin)
with open(os.path.join(here, "last-request.json"), "w") as f:
    json.dump({"request": request, "argv": sys.argv[1:], "env": sorted(os.environ), "pid": os.getpid()}, f)
mode = open(os.path.join(here, "mode")).read().strip()
values = {i: "sk-canary-EXEC-5e4d3c2b1a09f8e7d6c5b4a3" for i in request["ids"] if i != "providers/missing"}
errors = {"providers/missing": {"message": "not found: sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f"}}
if mode == "ok":
    print(json.dumps({"protocolVersion": 1, "values": values, "errors": errors}))
elif mode == "sleep":
    sys.stdout.flush()
    time.sleep(30)
elif mode == "grandchild":
    import subprocess
    helper = subprocess.Popen(["/bin/sleep", "30"])
    with open(os.path.join(here, "grandchild.pid"), "w") as f:
        f.write(str(helper.pid))
    time.sleep(30)
elif mode == "badjson":
    print("sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f {")
elif mode == "exit":
    print(json.dumps({"protocolVersion": 1, "values": {i: "sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f" for i in request["ids"]}}))
    sys.exit(3)
elif mode == "big":
    print(json.dumps({"protocolVersion": 1, "values": values, "pad": "sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f" * 500}))
elif mode == "nonstring":
    print(json.dumps({"protocolVersion": 1, "values": {i: ["sk-canary-EXEC-LEAK-6b1f0e9d8c7b6a5f"] for i in request["ids"]}}))
"#;

fn write_resolver(dir: &Path) -> String {
    let path = dir.join("resolver.py");
    std::fs::write(&path, RESOLVER).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    set_mode(dir, "ok");
    path.display().to_string()
}

fn set_mode(dir: &Path, mode: &str) {
    std::fs::write(dir.join("mode"), mode).unwrap();
}

/// Whether a process is alive (an orphaned zombie awaiting its reaper counts as gone).
fn running(pid: &str) -> bool {
    for _ in 0..50 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return false,
            Ok(stat) if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    true
}

fn exec_extra(script: &str) -> String {
    format!(
        r#"
[[sources]]
name = "resolver"
provider = "exec"
command = "{script}"
args = ["--profile", "test"]
pass_env = ["PATH", "KW_EXEC_TEST_PASSED"]
timeout_ms = 1500
max_output_bytes = 4096
mapping = {{ EXEC_OK = "{{{{providers/openai/apiKey}}}}", EXEC_MISSING = "{{{{providers/missing}}}}" }}
cache = {{ ttl_seconds = 0 }}

[roles.execer]
grants = [
  {{ route = "openai", secret = "EXEC_OK", methods = ["POST"], paths = ["/v1/chat/completions"] }},
  {{ route = "openai", secret = "EXEC_MISSING", methods = ["POST"], paths = ["/v1/responses"] }},
]

[[agents]]
id = "exec-agent"
role = "execer"
key_sha256 = "{hash}"
"#,
        hash = sha(EXEC_KEY)
    )
}

/// The `exec` source of a config, as a provider the test can call directly.
fn provider(dir: &Path, script: &str) -> std::sync::Arc<dyn keyward::credentials::SecretProvider> {
    write_secrets(dir);
    let text = config_text(dir, "http://127.0.0.1:9", &exec_extra(script));
    let config = keyward::config::load_str(&text, "exec.toml", false).unwrap_or_else(|e| panic!("{e}"));
    let source = config.sources.iter().find(|s| s.name == "resolver").unwrap();
    keyward::credentials::build_provider(source)
}

async fn fetch_error(provider: &dyn keyward::credentials::SecretProvider) -> String {
    match provider.fetch().await {
        Ok(_) => panic!("the fetch succeeded"),
        Err(error) => {
            let text = error.to_string();
            assert!(!text.contains(LEAK) && !text.contains(EXEC_SECRET), "an error quoted the output: {text}");
            text
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_answers_over_the_openclaw_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_resolver(dir.path());
    // The resolver keeps its mode and what it was sent in its own directory.
    let h = Harness::start_with(&exec_extra(&script)).await;

    let ok = h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(EXEC_KEY).body("{}").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_no_canary("the response", &ok.text().await.unwrap());
    assert_eq!(h.upstream.last().unwrap().headers["authorization"], format!("Bearer {EXEC_SECRET}").as_str());

    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("last-request.json")).unwrap()).unwrap();
    assert_eq!(
        seen["request"],
        serde_json::json!({ "protocolVersion": 1, "provider": "resolver", "ids": ["providers/missing", "providers/openai/apiKey"] })
    );
    assert_eq!(seen["argv"], serde_json::json!(["--profile", "test"]));
    // env_clear, then only the allowlist (KW_EXEC_TEST_PASSED is not set in this process).
    let env: Vec<&str> = seen["env"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(env.iter().all(|v| *v == "PATH" || *v == "LC_CTYPE"), "unexpected environment: {env:?}");

    // An id the resolver reports an error for: 503, naming the secret, quoting nothing.
    let missing = h.client.post(h.url("/openai/v1/responses")).bearer_auth(EXEC_KEY).body("{}").send().await.unwrap();
    assert_eq!(missing.status(), 503);
    let body = missing.text().await.unwrap();
    assert!(body.contains("secret_not_found") && body.contains("EXEC_MISSING"), "{body}");
    assert!(!body.contains(LEAK), "{body}");

    // Every failure mode: 503 for the agent, nothing forwarded.
    let before = h.upstream.count();
    for mode in ["badjson", "exit", "big", "nonstring"] {
        set_mode(dir.path(), mode);
        let failed =
            h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(EXEC_KEY).body("{}").send().await.unwrap();
        assert_eq!(failed.status(), 503, "mode {mode}");
        let body = failed.text().await.unwrap();
        assert!(body.contains("secret_store_unavailable"), "mode {mode}: {body}");
        assert!(!body.contains(LEAK), "mode {mode}: {body}");
    }
    assert_eq!(h.upstream.count(), before, "no request went upstream without its credential");
    let dir_audit = h.stop().await;
    let audit = std::fs::read_to_string(dir_audit.path().join("audit.jsonl")).unwrap();
    assert!(!audit.contains(LEAK) && !audit.contains(EXEC_SECRET), "the audit file holds resolver output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_a_clear_error_that_quotes_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_resolver(dir.path());
    let provider = provider(dir.path(), &script);

    set_mode(dir.path(), "badjson");
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("output is not JSON (line 1, column"), "{error}");
    set_mode(dir.path(), "exit");
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("exited with status 3"), "{error}");
    set_mode(dir.path(), "big");
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("more than max_output_bytes = 4096"), "{error}");
    set_mode(dir.path(), "nonstring");
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("the value for id 'providers/missing' is not a string"), "{error}");

    // A hung resolver is killed at the timeout.
    set_mode(dir.path(), "sleep");
    let started = Instant::now();
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("did not answer within timeout_ms = 1500; it was killed"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("last-request.json")).unwrap()).unwrap();
    let pid = seen["pid"].as_u64().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the resolver {pid} still runs");

    // What the resolver started is killed with it: its whole process group.
    set_mode(dir.path(), "grandchild");
    let error = fetch_error(provider.as_ref()).await;
    assert!(error.contains("it was killed"), "{error}");
    let helper = std::fs::read_to_string(dir.path().join("grandchild.pid")).unwrap();
    assert!(!running(helper.trim()), "the resolver's own child {helper} still runs");

    // A missing id is left out, so the lookup reports not-found; the rest is served.
    set_mode(dir.path(), "ok");
    let Ok(fetched) = provider.fetch().await else { panic!("the ok mode failed") };
    assert_eq!(fetched.values.len(), 1);
    assert!(fetched.values.contains_key("EXEC_OK"));

    // A command that does not exist.
    let gone = self::provider(dir.path(), "/nonexistent/resolver");
    let error = fetch_error(gone.as_ref()).await;
    assert!(error.contains("/nonexistent/resolver cannot be started"), "{error}");
}

#[test]
fn exec_config_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let problems = |source: &str| {
        let text = config_text(dir.path(), "http://127.0.0.1:9", source);
        match keyward::config::load_str(&text, "t.toml", false) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let src = |fields: &str| format!("[[sources]]\nname = \"x\"\nprovider = \"exec\"\n{fields}\n");
    assert!(problems(&src("command = \"resolver\"\nmapping = { A = \"{{a}}\" }")).contains("must be an absolute path"));
    assert!(problems(&src("mapping = { A = \"{{a}}\" }")).contains("sources[3].command: is required"));
    assert!(problems(&src("command = \"/bin/true\"")).contains("sources[3].mapping: is required for provider 'exec'"));
    assert!(problems(&src("command = \"/bin/true\"\nmapping = { A = \"{{.}}\" }")).contains("not the whole {{.}}"));
    assert!(
        problems(&src("command = \"/bin/true\"\ntimeout_ms = 0\nmapping = { A = \"{{a}}\" }"))
            .contains("timeout_ms: must be between")
    );
    assert!(
        problems(&src("command = \"/bin/true\"\npass_env = [\"A B\"]\nmapping = { A = \"{{a}}\" }"))
            .contains("pass_env[0]")
    );
    assert!(
        problems(&src("command = \"/bin/true\"\nregion = \"x\"\nmapping = { A = \"{{a}}\" }"))
            .contains("sources[3].region: is not used by provider 'exec'")
    );
    assert_eq!(problems(&src("command = \"/bin/true\"\nmapping = { A = \"{{a}}\" }")), "");
}
