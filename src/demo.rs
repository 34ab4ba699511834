//! `keyward demo`: a fake upstream, a proxy with a demo secret, and one agent request, printed
//! from three sides: what the agent sent, what the upstream received, and the audit line. Then
//! the agent key where each official client puts it, each answered, none forwarded upstream.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config;
use crate::fake_upstream::FakeUpstream;
use crate::identity;

/// Shows the first characters of a value and its length, never the whole of it.
pub fn mask(value: &str) -> String {
    let shown: String = value.chars().take(4).collect();
    format!("{shown}…[masked, {} chars]", value.chars().count())
}

/// The default config's `[[routes]]` tables (each official client's key placement), every one
/// pointed at `upstream`: the demo and the test harness serve exactly the routes keyward ships.
pub fn shipped_routes_to(upstream: &str) -> String {
    let text = config::EMBEDDED_DEFAULT;
    let start = text.find("[[routes]]").expect("the default config has routes");
    let end = text[start..].find("\n[roles.").map_or(text.len(), |i| start + i + 1);
    let mut routes = String::new();
    for line in text[start..end].lines() {
        if line.starts_with("upstream = ") {
            routes.push_str(&format!("upstream = \"{upstream}\""));
        } else {
            routes.push_str(line);
        }
        routes.push('\n');
    }
    routes
}

/// Runs the demo and returns the text it prints.
pub async fn run() -> anyhow::Result<String> {
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let upstream = FakeUpstream::start().await.context("cannot start the fake upstream")?;
    let demo_secret = format!("sk-demo-{}", &identity::generate_key()[3..]);
    let secrets_path = dir.path().join("secrets.json");
    std::fs::write(&secrets_path, serde_json::json!({ "OPENAI_API_KEY": demo_secret }).to_string())?;
    std::fs::set_permissions(&secrets_path, std::fs::Permissions::from_mode(0o600))?;
    let agent_key = identity::generate_key();
    let audit_path = dir.path().join("audit.jsonl");
    let config_text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[audit]
path = "{audit}"
metadata = {{ env = "demo" }}

[[sources]]
name = "demo"
provider = "file"
path = "{secrets}"

{routes}
[roles.worker]
grants = [
  {{ route = "openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/chat/completions"] }},
  {{ route = "anthropic", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1/messages"] }},
  {{ route = "github", secret = "OPENAI_API_KEY", methods = ["GET"], paths = ["/user"] }},
  {{ route = "azure-openai", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/openai/deployments/*/chat/completions"] }},
  {{ route = "gemini", secret = "OPENAI_API_KEY", methods = ["POST"], paths = ["/v1beta/models/*"] }},
]

[[agents]]
id = "demo-agent"
role = "worker"
key_sha256 = "{hash}"
"#,
        audit = audit_path.display(),
        secrets = secrets_path.display(),
        routes = shipped_routes_to(&upstream.url()),
        hash = hex::encode(identity::hash_key(&agent_key)),
    );
    let config = config::load_str(&config_text, "<demo>", false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let running = crate::instance::start(config).await?;

    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;
    let url = format!("http://{}/openai/v1/chat/completions", running.proxy_addr.expect("the demo listens on TCP"));
    let request = Request::post(&url)
        .header("authorization", format!("Bearer {agent_key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.context("the demo request failed")?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    let received = upstream.last().context("the fake upstream received nothing")?;

    // The agent key where each official client puts it today.
    let base = format!("http://{}", running.proxy_addr.expect("the demo listens on TCP"));
    let bearer = format!("Bearer {agent_key}");
    let token = format!("token {agent_key}");
    // (client, method, path, header, value)
    let placements: [(&str, &str, &str, &str, &str); 6] = [
        ("anthropic (api_key)", "POST", "/anthropic/v1/messages", "authorization", &bearer),
        ("anthropic (x-api-key)", "POST", "/anthropic/v1/messages", "x-api-key", &agent_key),
        ("azure openai", "POST", "/azure-openai/openai/deployments/gpt/chat/completions", "api-key", &agent_key),
        ("google genai", "POST", "/gemini/v1beta/models/gemini:generateContent", "x-goog-api-key", &agent_key),
        ("github (Bearer)", "GET", "/github/user", "authorization", &bearer),
        ("github (token)", "GET", "/github/user", "authorization", &token),
    ];
    let mut placement_lines = Vec::new();
    let mut forwarded_a_key = false;
    for (who, method, path, header, value) in placements {
        let request = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(header, value)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))?;
        let status = client.request(request).await.context("a demo request failed")?.status();
        let sent = upstream.last().context("the fake upstream received nothing")?;
        let leaked = sent.headers.iter().any(|(_, v)| String::from_utf8_lossy(v.as_bytes()).contains(&agent_key));
        forwarded_a_key |= leaked || !status.is_success();
        placement_lines.push(format!(
            "{who:<22} {} {:<28} agent key forwarded: {}",
            status.as_u16(),
            header,
            if leaked { "YES" } else { "no" }
        ));
    }
    running.shutdown().await;

    let mut out = String::new();
    writeln!(out, "── what the agent sent ─────────────────────────────")?;
    writeln!(out, "POST {url}")?;
    writeln!(out, "authorization: Bearer {}   (its own agent key, worthless elsewhere)", mask(&agent_key))?;
    writeln!(out, "{body}")?;
    writeln!(out)?;
    writeln!(out, "── what the upstream received ──────────────────────")?;
    writeln!(out, "{} {}{}", received.method, upstream.url(), received.target)?;
    for (name, value) in &received.headers {
        let text = String::from_utf8_lossy(value.as_bytes());
        let shown = match text.split_once(' ') {
            Some((scheme, credential)) if name == "authorization" => format!("{scheme} {}", mask(credential)),
            _ => text.into_owned(),
        };
        writeln!(out, "{name}: {shown}")?;
    }
    let injected =
        received.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {demo_secret}"));
    writeln!(out, "(the real credential was injected: {})", if injected { "yes" } else { "NO" })?;
    writeln!(out)?;
    writeln!(out, "── what the agent got back ─────────────────────────")?;
    writeln!(out, "{status}")?;
    writeln!(out, "{}", String::from_utf8_lossy(&answer))?;
    writeln!(out)?;
    writeln!(out, "── the audit record ────────────────────────────────")?;
    let audit = std::fs::read_to_string(&audit_path).context("cannot read the demo audit file")?;
    let first = audit.lines().take_while(|line| !line.contains(r#""type":"request""#)).count();
    for line in audit.lines().take(first + 1) {
        writeln!(out, "{line}")?;
    }
    writeln!(out)?;
    writeln!(out, "── the agent key where each official client puts it ─")?;
    for line in &placement_lines {
        writeln!(out, "{line}")?;
    }
    let leaked = audit.contains(&demo_secret) || String::from_utf8_lossy(&answer).contains(&demo_secret);
    if !injected || !status.is_success() || leaked || forwarded_a_key {
        std::io::stdout().write_all(out.as_bytes())?;
        anyhow::bail!("the demo did not behave as expected");
    }
    Ok(out)
}
