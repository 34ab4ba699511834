//! The dashboard in a real browser: headless Chromium loads `/admin/ui` against a seeded trail;
//! the heat map and the secrets table must render real data, a screenshot is kept as an
//! artifact, and Chromium's net log must show no request outside the admin listener. A second
//! test signs in through the form over the DevTools protocol, typing a wrong token first.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
    let budget = "[[budgets]]\nname = \"worker-day\"\nrole = \"worker\"\ntokens = 100000\nwindow = \"day\"\n";
    let h = Harness::start_with(&format!("{budget}{}", admin_block())).await;
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
    assert!(secrets.contains("<td>OPENAI_API_KEY</td><td>static</td><td>files</td>"), "{secrets}");
    assert!(secrets.contains("<td>GITHUB_TOKEN</td>"), "{secrets}");
    let denials = dom.split("id=\"denials\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(denials.contains("forbidden") && denials.contains("unknown_agent_key"), "{denials}");
    // The four answered calls, each ended by the upstream.
    let endings = dom.split("id=\"endings\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(endings.contains("<td>4</td><td>0</td><td>0</td><td>0</td>"), "{endings}");
    // Each chat call was charged the 12 tokens the fake reported: spend per agent and the
    // budget's burn.
    let spend = dom.split("id=\"spend\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(spend.contains("<td>worker-1</td><td>2</td><td>24</td>"), "{spend}");
    let budgets = dom.split("id=\"budgets\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(budgets.contains("<td>worker-day</td><td>worker-1</td><td>day</td><td>24 / 100000</td>"), "{budgets}");
    let shadow = dom.split("id=\"would-deny\"").nth(1).unwrap().split("</table>").next().unwrap();
    assert!(shadow.contains("<td>none</td>"), "{shadow}");
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

/// Headless Chromium driven over the DevTools protocol (one page), killed when dropped.
struct Browser {
    child: std::process::Child,
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--no-pings",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium not found: ./scripts/test.sh installs it (apt-get install chromium)");
        // Chromium writes the port it picked into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let port = loop {
            if let Some(port) =
                std::fs::read_to_string(&port_file).ok().and_then(|t| t.lines().next()?.parse::<u16>().ok())
            {
                break port;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let targets: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await.unwrap().json().await.unwrap();
        let page = targets.as_array().unwrap().iter().find(|t| t["type"] == "page").expect("a page target");
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser { child, socket, next_id: 0, _profile: profile }
    }

    /// Sends one DevTools command and waits (bounded) for its result; events are skipped.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.next_id += 1;
        let id = self.next_id;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        self.socket.send(Message::text(command.to_string())).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(message) = self.socket.next().await {
                let Ok(Message::Text(text)) = message else { continue };
                let value: serde_json::Value = serde_json::from_str(&text).unwrap();
                if value["id"] == id {
                    return value;
                }
            }
            panic!("the DevTools connection closed");
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let result =
            self.call("Runtime.evaluate", serde_json::json!({ "expression": expression, "returnByValue": true })).await;
        result["result"]["value"].clone()
    }

    /// Waits (bounded) until the page's `data-loaded` is `state`.
    async fn wait_for(&mut self, state: &str) {
        let started = Instant::now();
        loop {
            let now = self.eval("document.body ? document.body.dataset.loaded || '' : ''").await;
            if now == state {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "the page stayed '{now}', expected '{state}'");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the focused element as keyboard input.
    async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", serde_json::json!({ "text": text })).await;
    }

    async fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            let mut event =
                serde_json::json!({ "type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13 });
            if kind == "keyDown" {
                event["text"] = "\r".into();
            }
            self.call("Input.dispatchKeyEvent", event).await;
        }
    }

    /// Clicks the middle of the element with `id`, as a mouse would.
    async fn click(&mut self, id: &str) {
        let at = self
            .eval(&format!(
                "(() => {{ const r = document.getElementById('{id}').getBoundingClientRect(); \
                 return [r.left + r.width / 2, r.top + r.height / 2]; }})()"
            ))
            .await;
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            let event = serde_json::json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 });
            self.call("Input.dispatchMouseEvent", event).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sign_in_form_takes_a_corrected_token() {
    let h = Harness::start_with(&admin_block()).await;
    let r =
        h.client.post(h.url("/openai/v1/chat/completions")).bearer_auth(WORKER_KEY).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut browser = Browser::launch().await;
    browser.call("Page.enable", serde_json::json!({})).await;
    browser.call("Page.navigate", serde_json::json!({ "url": format!("{}/admin/ui", h.admin) })).await;

    // No token yet: the form, not a blocking prompt, and no dashboard.
    browser.wait_for("login").await;
    assert_eq!(browser.eval("document.getElementById('login').hidden").await, false);
    assert_eq!(browser.eval("document.getElementById('dashboard').hidden").await, true);
    assert_eq!(browser.eval("document.activeElement.id").await, "token", "the token field has the focus");

    // A typo: refused, said so, and the form is back with an empty field.
    browser.type_text(&format!("{ADMIN_TOKEN}x")).await;
    browser.press_enter().await;
    browser.wait_for("login").await;
    let started = Instant::now();
    while browser.eval("document.getElementById('login-error').textContent").await == "" {
        assert!(started.elapsed() < Duration::from_secs(20), "no message after a wrong token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let message = browser.eval("document.getElementById('login-error').textContent").await;
    assert!(message.as_str().unwrap().contains("not accepted"), "{message}");
    assert_eq!(browser.eval("document.getElementById('token').value").await, "");
    assert_eq!(browser.eval("sessionStorage.getItem('keyward-admin-token')").await, serde_json::Value::Null);
    assert_eq!(browser.eval("document.getElementById('dashboard').hidden").await, true);

    // The right token, with the Sign in button: the dashboard with real data.
    browser.type_text(ADMIN_TOKEN).await;
    browser.click("signin").await;
    browser.wait_for("true").await;
    assert_eq!(browser.eval("document.getElementById('login').hidden").await, true);
    assert_eq!(browser.eval("document.getElementById('error').textContent").await, "");
    let secrets = browser.eval("document.getElementById('secrets').innerText").await;
    assert!(secrets.as_str().unwrap().contains("OPENAI_API_KEY"), "{secrets}");
    let heat = browser.eval("document.getElementById('heat-agent').innerText").await;
    assert!(heat.as_str().unwrap().contains("worker-1"), "{heat}");

    // A reload keeps the session (this tab only); signing out brings the form back.
    browser.call("Page.reload", serde_json::json!({})).await;
    browser.wait_for("true").await;
    browser.click("signout").await;
    browser.wait_for("login").await;
    assert_eq!(browser.eval("sessionStorage.getItem('keyward-admin-token')").await, serde_json::Value::Null);
    h.stop().await;
}
