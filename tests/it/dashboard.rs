//! The dashboard in a real browser: headless Chromium loads `/admin/ui` against a seeded trail;
//! the heat map and the secrets table must render real data, a screenshot is kept as an
//! artifact, and Chromium's net log must show no request outside the admin listener.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const ADMIN_TOKEN: &str = "kwadm_dashboardToken0123456789abcdefghijklmno";

/// Runs headless Chromium with `args`, bounded in time, and returns its stdout.
fn chromium(profile: &Path, args: &[String]) -> String {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter,AutofillServerCommunication",
            // Nothing but loopback resolves, so a test browser cannot reach the network at all.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium not found: ./scripts/test.sh installs it (apt-get install chromium)");
    let started = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_the_trail_in_headless_chromium() {
    let h = Harness::start_with(&format!("\n[admin]\ntoken_sha256 = \"{}\"\n", sha(ADMIN_TOKEN))).await;
    for (key, method, path) in [
        (WORKER_KEY, "POST", "/openai/v1/chat/completions"),
        (WORKER_KEY, "POST", "/openai/v1/chat/completions"),
        (WORKER_KEY, "GET", "/github/user"),
        (READER_KEY, "GET", "/openai/v1/models"),
        (WORKER_KEY, "DELETE", "/github/repos/o/r"),
        ("kw_stranger", "GET", "/github/user"),
    ] {
        let r =
            h.client.request(method.parse().unwrap(), h.url(path)).bearer_auth(key).body("{}").send().await.unwrap();
        let _ = r.text().await;
    }
    h.audit();
    let admin = h.admin.clone();
    let work = tempfile::tempdir().unwrap();
    let profile = work.path().join("profile");
    let netlog = work.path().join("netlog.json");
    let url = format!("{admin}/admin/ui#token={ADMIN_TOKEN}");
    let dom = tokio::task::spawn_blocking({
        let (profile, netlog, url) = (profile.clone(), netlog.clone(), url.clone());
        move || {
            chromium(
                &profile,
                &[
                    "--virtual-time-budget=15000".to_string(),
                    format!("--log-net-log={}", netlog.display()),
                    "--dump-dom".to_string(),
                    url,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(dom.contains("data-loaded=\"true\""), "the page did not finish loading:\n{dom}");
    // Heat map rows for the agents that used credentials, with per-hour cells.
    let heat = dom.split("id=\"heat-agent\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(heat.contains("<td>worker-1</td>") && heat.contains("<td>reader-1</td>"), "{heat}");
    assert!(heat.matches("class=\"cell\"").count() >= 48, "{heat}");
    assert!(heat.contains("worker-1") && heat.contains(": 3\""), "worker-1 made 3 allowed calls: {heat}");
    // The secrets table with names and sources, and the recent denials.
    let secrets = dom.split("id=\"secrets\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(secrets.contains("<td>OPENAI_API_KEY</td><td>files</td>"), "{secrets}");
    assert!(secrets.contains("<td>GITHUB_TOKEN</td>"), "{secrets}");
    let denials = dom.split("id=\"denials\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(denials.contains("forbidden") && denials.contains("unknown_agent_key"), "{denials}");
    // The four answered calls, each ended by the upstream.
    let endings = dom.split("id=\"endings\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(endings.contains("<td>4</td><td>0</td><td>0</td><td>0</td>"), "{endings}");
    assert_no_canary("the dashboard", &dom);

    // Every request the page made went to the admin listener. Page requests carry the page's
    // network isolation key; Chromium's own background fetches carry another (and cannot
    // resolve anything here anyway).
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&netlog).unwrap()).unwrap();
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].as_u64().unwrap();
    let page_urls: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start_job))
        .filter(|e| e["params"]["network_isolation_key"] == "http://127.0.0.1 http://127.0.0.1")
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
        .collect();
    for url in &page_urls {
        assert!(url.starts_with(&admin), "the dashboard requested {url}");
    }
    for expected in ["/admin/ui", "/admin/ui.js", "/admin/audit/summary", "/admin/secrets"] {
        assert!(
            page_urls.iter().any(|u| u.split(['?', '#']).next().unwrap().ends_with(expected)),
            "{expected} not requested: {page_urls:?}"
        );
    }

    // A screenshot for people to look at.
    let artifact_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifact_dir).unwrap();
    let shot = artifact_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    tokio::task::spawn_blocking({
        let (profile, shot) = (work.path().join("profile2"), shot.clone());
        move || {
            chromium(
                &profile,
                &[
                    "--virtual-time-budget=15000".to_string(),
                    "--window-size=1400,1000".to_string(),
                    format!("--screenshot={}", shot.display()),
                    url,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
    eprintln!("dashboard screenshot: {}", shot.display());
    h.stop().await;
}
