//! The forward proxy (`HTTPS_PROXY`) with real tools: curl, git (against `git http-backend`
//! behind TLS), Python requests, httpx (HTTP/1.1 and HTTP/2), the OpenAI SDK with no base URL,
//! `gh`, strict certificate verification (OpenSSL's `-x509_strict`, Python's
//! `VERIFY_X509_STRICT`), and the refusals (407, 403, 421), all on loopback. The upstream is
//! a local TLS server with its own test CA (made here with rcgen); routes reach it through
//! `connect_to`, so `api.github.com` resolves nowhere. The agent's environment is what
//! `keyward agent-env` prints, and it holds no credential.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keyward::instance::Running;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::common::{CANARIES, CANARY_GITHUB, CANARY_OPENAI, WORKER_KEY, assert_no_canary, closed_port, sha};

/// The local TLS upstream (tests/it/py/tls_upstream.py), stopped when dropped.
struct Upstream {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Upstream {
    /// Every request it received, as JSON lines.
    fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn header<'a>(request: &'a serde_json::Value, name: &str) -> Option<&'a str> {
        request["headers"]
            .as_array()?
            .iter()
            .find(|h| h[0].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .and_then(|h| h[1].as_str())
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

struct Forward {
    dir: tempfile::TempDir,
    running: Option<Running>,
    upstream: Upstream,
    config: PathBuf,
    /// The agent's environment, as `keyward agent-env --with-key` printed it.
    env: Vec<(String, String)>,
    proxy: std::net::SocketAddr,
}

/// A test CA (rcgen) and a leaf for the faked hosts, written as PEM files: (ca, cert, key).
fn upstream_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "forward-test upstream CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let hosts: Vec<String> = ["api.github.com", "github.com", "api.openai.com"].map(String::from).to_vec();
    let mut leaf = CertificateParams::new(hosts).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let paths = (dir.join("upstream-ca.pem"), dir.join("upstream.pem"), dir.join("upstream.key"));
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, leaf_cert.pem()).unwrap();
    std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
    paths
}

/// A bare repository `org/private-repo.git` with one commit, below `root`.
async fn bare_repo(root: &Path, home: &Path) -> PathBuf {
    let bare = root.join("org/private-repo.git");
    std::fs::create_dir_all(&bare).unwrap();
    let work = home.join("seed");
    git(home, &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()], &[]).await;
    git(home, &["init", "-q", "-b", "main", work.to_str().unwrap()], &[]).await;
    commit(home, &work, "README.md", "first\n").await;
    git(home, &["-C", work.to_str().unwrap(), "push", "-q", bare.to_str().unwrap(), "main"], &[]).await;
    work
}

async fn commit(home: &Path, work: &Path, file: &str, text: &str) {
    std::fs::write(work.join(file), text).unwrap();
    let work = work.to_str().unwrap();
    git(home, &["-C", work, "add", file], &[]).await;
    git(
        home,
        &["-C", work, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", text.trim()],
        &[],
    )
    .await;
}

/// Runs `git` with `home` as HOME (no user or system config) and `env`, and asserts success.
async fn git(home: &Path, args: &[&str], env: &[(String, String)]) -> String {
    let output = run("git", args, home, env).await;
    assert!(output.0.success(), "git {args:?} failed: {}", output.2);
    output.1
}

/// Runs a program (bounded to two minutes) with `env` on top of a HOME in `home` and no proxy
/// variables inherited; returns its status, stdout and stderr.
async fn run(
    program: &str,
    args: &[&str],
    home: &Path,
    env: &[(String, String)],
) -> (std::process::ExitStatus, String, String) {
    let mut command = tokio::process::Command::new(program);
    command.args(args).current_dir(home).kill_on_drop(true).stdin(Stdio::null());
    for name in
        ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"]
    {
        command.env_remove(name);
    }
    command
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GH_CONFIG_DIR", home.join("gh"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within two minutes"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

impl Forward {
    async fn start() -> Forward {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = upstream_pki(dir.path());
        let git_root = dir.path().join("repos");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        bare_repo(&git_root, &home).await;
        let log = dir.path().join("upstream.jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/py/tls_upstream.py");
        let mut child = tokio::process::Command::new("python3")
            .args([script, cert.to_str().unwrap(), key.to_str().unwrap(), log.to_str().unwrap()])
            .args([git_root.to_str().unwrap(), CANARY_GITHUB])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the TLS upstream");
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), tokio::io::BufReader::new(stdout).read_line(&mut line))
            .await
            .expect("the TLS upstream starts")
            .unwrap();
        let port: u16 = line.trim().parse().expect("the TLS upstream prints its port");
        let upstream = Upstream { child, port, log };

        std::fs::write(
            dir.path().join("secrets.json"),
            serde_json::json!({ "GITHUB_TOKEN": CANARY_GITHUB, "OPENAI_API_KEY": CANARY_OPENAI }).to_string(),
        )
        .unwrap();
        let forward_port = closed_port();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
header_read_timeout_ms = 5000

[forward_proxy]
listen = "127.0.0.1:{forward_port}"
tunnel_hosts = ["localhost:{port}"]

[audit]
path = "{dir}/audit.jsonl"

[[sources]]
name = "files"
provider = "file"
path = "{dir}/secrets.json"

[[routes]]
name = "github"
hosts = ["api.github.com"]
connect_to = "127.0.0.1:{port}"
upstream_ca_file = "{ca}"
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[[routes]]
name = "github-git"
hosts = ["github.com"]
connect_to = "127.0.0.1:{port}"
upstream_ca_file = "{ca}"
inject = {{ basic = {{ username = "x-access-token", password = "{{{{secret}}}}" }} }}

[[routes]]
name = "openai"
hosts = ["api.openai.com"]
connect_to = "127.0.0.1:{port}"
upstream_ca_file = "{ca}"
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[roles.worker]
grants = [
  {{ route = "github", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/user", "/repos/**", "/redirect"] }},
  {{ route = "github", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/limited"], rate = "2/min" }},
  {{ route = "github-git", secret = "GITHUB_TOKEN", methods = ["GET"], paths = ["/**/info/refs"] }},
  {{ route = "github-git", secret = "GITHUB_TOKEN", methods = ["POST"], paths = ["/**/git-upload-pack"] }},
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/v1/models"] }},
]

[[agents]]
id = "worker-1"
role = "worker"
key_sha256 = "{worker}"
"#,
            dir = dir.path().display(),
            port = upstream.port,
            ca = ca.display(),
            worker = sha(WORKER_KEY),
        );
        let config_path = dir.path().join("keyward.toml");
        std::fs::write(&config_path, &text).unwrap();
        let config = keyward::config::load_file(&config_path).unwrap_or_else(|e| panic!("{e}"));
        let running = keyward::instance::start(config).await.unwrap();
        let _ = running.state.config_path.set(config_path.clone());
        let proxy = running.forward_addr.expect("the forward proxy listens");
        // The agent's environment, from the real command.
        let (status, stdout, stderr) = run(
            env!("CARGO_BIN_EXE_keyward"),
            &["agent-env", "--agent", "worker-1", "--with-key", "--config", config_path.to_str().unwrap()],
            &home,
            &[("KEYWARD_AGENT_KEY".to_string(), WORKER_KEY.to_string())],
        )
        .await;
        assert!(status.success(), "agent-env failed: {stderr}");
        let env: Vec<(String, String)> =
            stdout.lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
        Forward { dir, running: Some(running), upstream, config: config_path, env, proxy }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn keyward_ca(&self) -> PathBuf {
        self.dir.path().join("forward-ca.pem")
    }

    fn env_with(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    /// Sends raw bytes to the forward proxy and returns what came back until it closed or
    /// went quiet (bounded).
    async fn raw(&self, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.proxy).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                break;
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    async fn stop(mut self) -> Vec<serde_json::Value> {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        crate::common::read_audit(&self.dir.path().join("audit.jsonl"))
    }
}

/// What every test checks at the end: the agent's environment holds no credential and not one
/// reached it; the upstream got the real credential and never the agent key.
fn assert_nothing_leaked(forward: &Forward, received: &str) {
    let env: String = forward.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    assert_no_canary("the agent's environment", &env);
    assert_no_canary("what the agent received", received);
    let upstream = std::fs::read_to_string(&forward.upstream.log).unwrap_or_default();
    assert!(!upstream.contains(WORKER_KEY), "the agent key reached the upstream: {upstream}");
    for canary in CANARIES {
        assert!(!env.contains(canary));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_env_prints_the_proxy_and_the_ca_and_ca_export_prints_the_ca() {
    let forward = Forward::start().await;
    let get = |name: &str| forward.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get("HTTPS_PROXY"), format!("http://worker-1:{WORKER_KEY}@127.0.0.1:{}", forward.proxy.port()));
    assert_eq!(get("https_proxy"), get("HTTPS_PROXY"));
    assert!(get("NO_PROXY").contains("localhost"));
    let ca = forward.keyward_ca().display().to_string();
    for name in ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO"] {
        assert_eq!(get(name), ca, "{name}");
    }
    let home = forward.home();
    let config = forward.config.to_str().unwrap();
    // Without --with-key the key is a placeholder.
    let (status, stdout, _) =
        run(env!("CARGO_BIN_EXE_keyward"), &["agent-env", "--agent", "worker-1", "-c", config], &home, &[]).await;
    assert!(status.success());
    assert!(stdout.contains("HTTPS_PROXY=http://worker-1:<agent-key>@127.0.0.1:"), "{stdout}");
    assert!(!stdout.contains(WORKER_KEY));
    // A wrong key, or an unknown agent, is refused.
    let wrong = [("KEYWARD_AGENT_KEY".to_string(), "kw_notTheKey".to_string())];
    let (status, _, stderr) = run(
        env!("CARGO_BIN_EXE_keyward"),
        &["agent-env", "--agent", "worker-1", "--with-key", "-c", config],
        &home,
        &wrong,
    )
    .await;
    assert!(!status.success() && stderr.contains("is not the key of agent 'worker-1'"), "{stderr}");
    let (status, _, stderr) =
        run(env!("CARGO_BIN_EXE_keyward"), &["agent-env", "--agent", "nobody", "-c", config], &home, &[]).await;
    assert!(!status.success() && stderr.contains("no agent 'nobody'"), "{stderr}");
    // `ca export` prints the CA the running proxy uses (generated on its first start, key 0600).
    let (status, pem, _) = run(env!("CARGO_BIN_EXE_keyward"), &["ca", "export", "-c", config], &home, &[]).await;
    assert!(status.success());
    assert_eq!(pem, std::fs::read_to_string(forward.keyward_ca()).unwrap());
    // A bundle: the system's roots, then keyward's CA.
    let (status, bundle, _) =
        run(env!("CARGO_BIN_EXE_keyward"), &["ca", "export", "--bundle", "-c", config], &home, &[]).await;
    assert!(status.success());
    assert!(bundle.ends_with(&pem) && bundle.matches("BEGIN CERTIFICATE").count() > 1);
    let bundle_file = forward.dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, &bundle).unwrap();
    let (status, out, err) = run("openssl", &["storeutl", "-certs", bundle_file.to_str().unwrap()], &home, &[]).await;
    assert!(status.success(), "the bundle is valid PEM: {out}{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(forward.dir.path().join("forward-ca.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    forward.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http1_and_http2_gets_an_answer_made_with_the_real_credential() {
    let forward = Forward::start().await;
    let home = forward.home();
    let mut received = String::new();
    for version in ["--http1.1", "--http2"] {
        let args = ["-sS", version, "-w", "\n%{http_code} %{http_version}", "https://api.github.com/user"];
        let (status, stdout, stderr) = run("curl", &args, &home, &forward.env).await;
        assert!(status.success(), "curl {version}: {stderr}");
        let expected = if version == "--http2" { "200 2" } else { "200 1.1" };
        assert!(stdout.ends_with(expected), "curl {version}: {stdout}");
        // The fake echoes the Authorization it got; the agent sees it scrubbed.
        assert!(stdout.contains("\"login\": \"octocat\""), "{stdout}");
        received.push_str(&stdout);
        received.push_str(&stderr);
    }
    // The upstream got the real credential, and only the route's.
    let requests = forward.upstream.requests();
    let users: Vec<_> = requests.iter().filter(|r| r["path"] == "/user").collect();
    assert_eq!(users.len(), 2);
    for request in &users {
        assert_eq!(Upstream::header(request, "authorization"), Some(format!("Bearer {CANARY_GITHUB}").as_str()));
        assert_eq!(request["host"], "api.github.com");
        assert_eq!(Upstream::header(request, "proxy-authorization"), None);
    }
    // A redirect goes back to the agent, never followed.
    let (_, stdout, _) = run(
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", "https://api.github.com/redirect"],
        &home,
        &forward.env,
    )
    .await;
    assert_eq!(stdout, "302 https://evil.example/steal");
    assert!(!forward.upstream.requests().iter().any(|r| r["path"] == "/steal"));
    assert_nothing_leaked(&forward, &received);
    let records = forward.stop().await;
    let outcomes: Vec<_> = records.iter().filter(|r| r["type"] == "request" && r["path"] == "/user").collect();
    assert_eq!(outcomes.len(), 2);
    for record in outcomes {
        assert_eq!(record["via"], "forward");
        assert_eq!(record["connectHost"], "api.github.com");
        assert_eq!(record["route"], "github");
        assert_eq!(record["agentId"], "worker-1");
        assert_eq!(record["credential"], "GITHUB_TOKEN");
        assert_eq!(record["outcome"], "success");
    }
    let released = records.iter().filter(|r| r["type"] == "request.released" && r["via"] == "forward").count();
    assert!(released >= 2, "each call's release is recorded with via");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_and_fetch_through_the_forward_proxy_with_injected_basic_auth() {
    let forward = Forward::start().await;
    let home = forward.home();
    let clone = home.join("clone");
    let url = "https://github.com/org/private-repo.git";
    git(&home, &["clone", "-q", url, clone.to_str().unwrap()], &forward.env).await;
    assert_eq!(std::fs::read_to_string(clone.join("README.md")).unwrap(), "first\n");
    // A new commit upstream, then a fetch.
    let seed = home.join("seed");
    commit(&home, &seed, "NEWS.md", "second\n").await;
    let bare = forward.dir.path().join("repos/org/private-repo.git");
    git(&home, &["-C", seed.to_str().unwrap(), "push", "-q", bare.to_str().unwrap(), "main"], &[]).await;
    git(&home, &["-C", clone.to_str().unwrap(), "fetch", "-q", "origin"], &forward.env).await;
    let log = git(&home, &["-C", clone.to_str().unwrap(), "log", "--format=%s", "origin/main"], &[]).await;
    assert_eq!(log, "second\nfirst\n");
    // A push is not granted: git-receive-pack is refused inside the tunnel.
    let (status, _, stderr) =
        run("git", &["-C", clone.to_str().unwrap(), "push", "-q", "origin", "main:other"], &home, &forward.env).await;
    assert!(!status.success(), "a push must not be granted");
    // keyward answers 403 before the pack body has been sent; over HTTP/2 curl then sometimes
    // reports the stream's reset instead of the status (seen on a loaded machine). The audit
    // record below checks the 403 itself.
    assert!(stderr.contains("403") || stderr.contains("HTTP/2"), "{stderr}");
    let config = std::fs::read_to_string(clone.join(".git/config")).unwrap();
    assert_nothing_leaked(&forward, &format!("{config}{stderr}"));
    // The upstream checked x-access-token:<the real token> on every git request.
    let git_requests: Vec<_> =
        forward.upstream.requests().into_iter().filter(|r| r["path"].as_str().unwrap().contains(".git/")).collect();
    assert!(git_requests.len() >= 4, "{git_requests:?}");
    let records = forward.stop().await;
    let pack = records
        .iter()
        .filter(|r| r["type"] == "request" && r["route"] == "github-git" && r["outcome"] == "success")
        .count();
    assert!(pack >= 4, "refs and upload-pack for clone and fetch are audited");
    let push =
        records.iter().find(|r| r["type"] == "request" && r["path"].as_str().unwrap().ends_with("/git-receive-pack"));
    let push = push.expect("the refused push is audited");
    assert_eq!((push["status"].as_u64(), push["errorCode"].as_str()), (Some(403), Some("forbidden")));
    assert_eq!(push["via"], "forward");
    assert_eq!(push["connectHost"], "github.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_and_strict_verification_through_the_forward_proxy() {
    let forward = Forward::start().await;
    let home = forward.home();
    let leaf = forward.dir.path().join("leaf.pem");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/py/forward_clients.py");
    let (status, stdout, stderr) = run("python3", &[script, leaf.to_str().unwrap()], &home, &forward.env).await;
    assert!(status.success(), "forward_clients.py failed: {stderr}");
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(out["requests"]["status"], 200, "{out}");
    assert_eq!(out["requests_forbidden"]["status"], 403, "{out}");
    assert!(out["requests_forbidden"]["body"].as_str().unwrap().contains("\"forbidden\""));
    assert_eq!(out["requests_redirect"]["status"], 302);
    assert_eq!(out["httpx_h1"]["statuses"], serde_json::json!([200, 200, 200]));
    assert_eq!(out["httpx_h1"]["version"], "HTTP/1.1");
    assert_eq!(out["httpx_h2"]["statuses"], serde_json::json!([200, 200, 200]));
    assert_eq!(out["httpx_h2"]["version"], "HTTP/2");
    assert_eq!(out["openai"], serde_json::json!(["gpt-fake"]));
    assert!(out["strict_connect"].as_str().unwrap().starts_with("HTTP/1.1 200"), "{out}");
    assert!(out["strict_tls"].as_str().unwrap().starts_with("TLSv1."), "{out}");
    // OpenSSL 3's strict verification of the CA and the leaf the tunnel presented.
    let ca = forward.keyward_ca();
    let (status, verified, err) = run(
        "openssl",
        &["verify", "-x509_strict", "-CAfile", ca.to_str().unwrap(), leaf.to_str().unwrap()],
        &home,
        &[],
    )
    .await;
    assert!(status.success(), "openssl verify -x509_strict: {verified}{err}");
    let (status, text, _) = run("openssl", &["x509", "-in", ca.to_str().unwrap(), "-noout", "-text"], &home, &[]).await;
    assert!(status.success());
    for extension in ["CA:TRUE, pathlen:0", "Certificate Sign, CRL Sign", "X509v3 Subject Key Identifier", "critical"] {
        assert!(text.contains(extension), "CA lacks {extension}: {text}");
    }
    let (_, text, _) = run("openssl", &["x509", "-in", leaf.to_str().unwrap(), "-noout", "-text"], &home, &[]).await;
    for extension in
        ["DNS:api.github.com", "X509v3 Authority Key Identifier", "TLS Web Server Authentication", "CA:FALSE"]
    {
        assert!(text.contains(extension), "leaf lacks {extension}: {text}");
    }
    // The SDK's placeholder key and the agent key never reached the upstream; the real one did.
    let requests = forward.upstream.requests();
    let models = requests.iter().find(|r| r["path"] == "/v1/models").expect("the SDK reached the fake");
    assert_eq!(Upstream::header(models, "authorization"), Some(format!("Bearer {CANARY_OPENAI}").as_str()));
    assert!(!std::fs::read_to_string(&forward.upstream.log).unwrap().contains("sk-placeholder"));
    assert_nothing_leaked(&forward, &format!("{stdout}{stderr}"));
    forward.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gh_api_user_through_the_forward_proxy() {
    if std::process::Command::new("gh").arg("--version").output().is_err() {
        eprintln!("skipped: the gh CLI is not installed (scripts/test.sh installs Debian's gh)");
        return;
    }
    let forward = Forward::start().await;
    let home = forward.home();
    // gh wants a token before it calls; a placeholder is all the agent has.
    let env = forward.env_with(&[
        ("GH_TOKEN", "placeholder-not-a-credential"),
        ("GH_PROMPT_DISABLED", "1"),
        ("GH_NO_UPDATE_NOTIFIER", "1"),
    ]);
    let (status, stdout, stderr) = run("gh", &["api", "/user"], &home, &env).await;
    assert!(status.success(), "gh api /user: {stdout}{stderr}");
    let user: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(user["login"], "octocat");
    let request = forward.upstream.requests().into_iter().rfind(|r| r["path"] == "/user").unwrap();
    assert_eq!(Upstream::header(&request, "authorization"), Some(format!("Bearer {CANARY_GITHUB}").as_str()));
    assert_nothing_leaked(&forward, &format!("{stdout}{stderr}"));
    forward.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_answered_and_audited() {
    let forward = Forward::start().await;
    let auth = |key: &str| {
        use base64::Engine;
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("worker-1:{key}"))
        )
    };
    let good = auth(WORKER_KEY);
    let connect = |target: &str, auth: &str| format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    // No key, an unknown key: 407 with Proxy-Authenticate.
    for (auth, reason) in [("", "no Proxy-Authorization"), (auth("kw_unknownKey0123456789").as_str(), "not recognised")]
    {
        let answer = forward.raw(&connect("api.github.com:443", auth)).await;
        assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("proxy-authenticate: basic realm=\"keyward\""), "{answer}");
        assert!(answer.contains("\"proxy_auth_required\"") && answer.contains(reason), "{answer}");
    }
    // Hosts no route names, IP literals, metadata and loopback, a port the route does not allow,
    // and a tunnel host that resolves to loopback: 403.
    for (target, reason) in [
        ("evil.example:443", "no route names this host"),
        ("93.184.216.34:443", "IP-literal targets are refused"),
        ("169.254.169.254:443", "cloud metadata addresses are refused"),
        ("[fd00:ec2::254]:443", "cloud metadata addresses are refused"),
        ("127.0.0.1:443", "loopback addresses are refused"),
        ("10.0.0.1:443", "private addresses are refused"),
        ("api.github.com:8443", "does not allow this port"),
        (&format!("localhost:{}", forward.upstream.port), "must resolve to public addresses"),
    ] {
        let answer = forward.raw(&connect(target, &good)).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
        assert!(answer.contains("\"connect_refused\"") && answer.contains(reason), "{target}: {answer}");
    }
    // A plain request to the proxy itself is not a proxy request.
    let answer = forward.raw("GET /user HTTP/1.1\r\nHost: api.github.com\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // A plain-HTTP absolute-form request is identified and goes upstream over TLS.
    let answer = forward
        .raw(&format!(
            "GET http://api.github.com/user HTTP/1.1\r\nHost: api.github.com\r\n{good}Connection: close\r\n\r\n"
        ))
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = forward
        .raw("GET http://api.github.com/user HTTP/1.1\r\nHost: api.github.com\r\nConnection: close\r\n\r\n")
        .await;
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");

    // Inside the tunnel: another Host (421), a path the grant does not cover (403), a WebSocket
    // upgrade (501), all through curl.
    let home = forward.home();
    let code = |args: &'static [&'static str]| {
        let env = forward.env.clone();
        let home = home.clone();
        async move {
            let mut all = vec!["-sS", "-w", "\n%{http_code}"];
            all.extend_from_slice(args);
            let (_, stdout, _) = run("curl", &all, &home, &env).await;
            stdout
        }
    };
    let mismatch = code(&["-H", "Host: evil.example", "https://api.github.com/user"]).await;
    assert!(mismatch.ends_with("421") && mismatch.contains("host_mismatch"), "{mismatch}");
    let forbidden = code(&["https://api.github.com/orgs/acme/members"]).await;
    assert!(forbidden.ends_with("403") && forbidden.contains("is not granted GET /orgs/acme/members"), "{forbidden}");
    let upgrade = code(&[
        "--http1.1",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "https://api.github.com/user",
    ])
    .await;
    assert!(upgrade.ends_with("501") && upgrade.contains("upgrade_unsupported"), "{upgrade}");
    // An agent that does not trust keyward's CA fails the handshake: nothing is sent upstream.
    let untrusting: Vec<(String, String)> =
        forward.env.iter().filter(|(k, _)| k != "CURL_CA_BUNDLE" && k != "SSL_CERT_FILE").cloned().collect();
    let before = forward.upstream.requests().len();
    let (status, _, _) = run("curl", &["-sS", "https://api.github.com/user"], &home, &untrusting).await;
    assert!(!status.success());
    assert_eq!(forward.upstream.requests().len(), before);
    // A head the parser refuses is recorded too.
    let answer = forward.raw("GET\x01 / HTTP/1.1\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_nothing_leaked(&forward, &format!("{mismatch}{forbidden}{upgrade}"));

    let records = forward.stop().await;
    let refused: Vec<_> = records.iter().filter(|r| r["type"] == "forward.refused").collect();
    let codes: Vec<(&str, u64)> =
        refused.iter().map(|r| (r["errorCode"].as_str().unwrap(), r["status"].as_u64().unwrap())).collect();
    assert_eq!(codes.iter().filter(|c| **c == ("proxy_auth_required", 407)).count(), 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == ("connect_refused", 403)).count(), 8, "{codes:?}");
    assert!(codes.contains(&("invalid_request_target", 400)));
    assert!(codes.contains(&("invalid_request_head", 400)), "{codes:?}");
    let handshake =
        records.iter().find(|r| r["type"] == "forward.handshake_failed").expect("the failed handshake is audited");
    assert_eq!((handshake["agentId"].as_str(), handshake["host"].as_str()), (Some("worker-1"), Some("api.github.com")));
    let unknown = refused.iter().find(|r| r["keyFingerprint"].is_string()).expect("an unknown key is fingerprinted");
    assert!(unknown["agentId"].is_null());
    let metadata = refused.iter().find(|r| r["host"] == "169.254.169.254").unwrap();
    assert_eq!(metadata["agentId"], "worker-1");
    assert_eq!(metadata["method"], "CONNECT");
    let inside =
        |code: &str| records.iter().any(|r| r["type"] == "request" && r["via"] == "forward" && r["errorCode"] == code);
    for code in ["host_mismatch", "forbidden", "upgrade_unsupported"] {
        assert!(inside(code), "no audited {code} inside the tunnel");
    }
    let plain =
        records.iter().find(|r| r["type"] == "request" && r["via"] == "forward" && r["outcome"] == "success").unwrap();
    assert_eq!(plain["connectHost"], "api.github.com");
    let trail: String = records.iter().map(|r| format!("{r}\n")).collect();
    assert_no_canary("the audit trail", &trail);
    assert!(!trail.contains(WORKER_KEY), "the agent key is in the audit trail");
}

/// Quotas and hot reload are the pipeline's, so they hold on the forward proxy too: a grant's
/// rate answers 429 inside the tunnel, and a reload that drops a host stops its interception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_reload_apply_to_the_forward_proxy() {
    let forward = Forward::start().await;
    let home = forward.home();
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (_, stdout, _) =
            run("curl", &["-sS", "-w", "\n%{http_code}", "https://api.github.com/limited"], &home, &forward.env).await;
        codes.push(stdout.lines().last().unwrap().to_string());
        if codes.len() == 3 {
            assert!(stdout.contains("rate_limited"), "{stdout}");
        }
    }
    assert_eq!(codes, ["200", "200", "429"]);
    let limited = forward.upstream.requests().into_iter().filter(|r| r["path"] == "/limited").count();
    assert_eq!(limited, 2, "the throttled call never reached the upstream");

    let text = std::fs::read_to_string(&forward.config).unwrap();
    std::fs::write(&forward.config, text.replace("hosts = [\"api.openai.com\"]", "hosts = [\"api2.openai.com\"]"))
        .unwrap();
    let state = forward.running.as_ref().unwrap().state.clone();
    tokio::task::spawn_blocking(move || keyward::reload::reload(&state))
        .await
        .unwrap()
        .expect("the reload is accepted");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("worker-1:{WORKER_KEY}"));
    let answer = forward
        .raw(&format!("CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\nProxy-Authorization: Basic {auth}\r\n\r\n"))
        .await;
    assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("no route names this host"), "{answer}");

    let records = forward.stop().await;
    let throttled = records.iter().find(|r| r["type"] == "request" && r["errorCode"] == "rate_limited").unwrap();
    assert_eq!((throttled["via"].as_str(), throttled["outcome"].as_str()), (Some("forward"), Some("throttled")));
}

/// The compose and Kubernetes examples each have an agent that uses the forward proxy with no
/// base-URL change: its environment is HTTPS_PROXY (its own key only), NO_PROXY and the CA
/// variables, and it mounts the CA certificate and nothing else of keyward's.
#[test]
fn the_deploy_examples_have_an_agent_on_the_forward_proxy() {
    use serde::Deserialize;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let yaml = |path: &str| -> Vec<serde_norway::Value> {
        let text = std::fs::read_to_string(root.join(path)).unwrap();
        serde_norway::Deserializer::from_str(&text).map(|d| serde_norway::Value::deserialize(d).unwrap()).collect()
    };
    let expected = [
        "HTTPS_PROXY",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "GIT_SSL_CAINFO",
    ];
    let compose = &yaml("deploy/compose/compose.yaml")[0];
    let tool = &compose["services"]["tool-agent"];
    let env = tool["environment"].as_mapping().unwrap();
    let mut names: Vec<&str> = env.keys().filter_map(|k| k.as_str()).collect();
    names.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(names, want);
    assert!(env["HTTPS_PROXY"].as_str().unwrap().contains("@127.0.0.1:8081"));
    assert_eq!(tool["volumes"].as_sequence().unwrap().len(), 1);
    assert!(
        tool["volumes"][0].as_str().unwrap().starts_with("keyward-ca:")
            && tool["volumes"][0].as_str().unwrap().ends_with(":ro")
    );

    let docs = yaml("deploy/kubernetes/deployment.yaml");
    let pod = &docs.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    let tool = pod["containers"].as_sequence().unwrap().iter().find(|c| c["name"] == "tool-agent").unwrap();
    let env: Vec<&str> = tool["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(env[0], "KEYWARD_AGENT_KEY", "its own agent key, from a Secret");
    for name in expected {
        assert!(env.contains(&name), "{name}");
    }
    assert_eq!(tool["volumeMounts"].as_sequence().unwrap().len(), 1);
    assert_eq!(tool["volumeMounts"][0]["name"], "keyward-ca");
    assert_eq!(tool["volumeMounts"][0]["readOnly"], true);
    // The CA key is written where only keyward mounts.
    let configmap = &yaml("deploy/kubernetes/configmap.yaml")[0];
    let config = configmap["data"]["keyward.toml"].as_str().unwrap();
    assert!(config.contains("ca_key_file = \"/var/lib/keyward/audit/forward-ca.key\""));
}
