//! The whole response head and transfer-coded bodies are scrubbed: a raw-TCP upstream writes
//! exact bytes hyper's own server would not (a reason phrase, header names, transfer codings,
//! trailers), built from the credential it received by header, basic or query injection.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine;
use common::raw::*;
use common::*;

async fn harness(raw: SocketAddr) -> Harness {
    Harness::start_edited(&raw_routes(raw), grant_raw_routes).await
}

/// A body that compresses well, so no deflate block stores the secret as plain bytes.
fn echo_body(secret: &str) -> String {
    format!("{{\"echo\":\"{secret}\",\"again\":[\"{secret}\",\"{secret}\"],\"pad\":\"{}\"}}", "ab".repeat(200))
}

/// The exact bytes the hostile upstream answers `path` with, for `secret`.
fn answer(path: &str, secret: &str) -> Vec<u8> {
    let plain = echo_body(secret);
    let lower = secret.to_ascii_lowercase();
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let head = |extra: &str| format!("HTTP/1.1 200 OK\r\n{extra}connection: close\r\n\r\n").into_bytes();
    let behaviour = path.rsplit('/').next().unwrap_or("").split('?').next().unwrap_or("");
    let mut out = match behaviour {
        "reason" => {
            format!("HTTP/1.1 200 key {secret}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").into_bytes()
        }
        "reason-404" => {
            format!("HTTP/1.1 404 {secret} not found\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno").into_bytes()
        }
        "informational" => {
            let mut out = format!("HTTP/1.1 103 {secret}\r\nlink: </{secret}>\r\nx-{lower}: 1\r\n\r\n").into_bytes();
            out.extend(head("content-length: 2\r\n"));
            out.extend_from_slice(b"ok");
            out
        }
        "header-names" => {
            head(&format!("x-{lower}: 1\r\n{lower}: 2\r\nx-k-{hex}: 3\r\nx-fine: 4\r\ncontent-length: 2\r\n"))
                .into_iter()
                .chain(*b"ok")
                .collect()
        }
        "trailer" => {
            let mut out = head(&format!("transfer-encoding: chunked\r\ntrailer: x-{lower}, x-leak\r\n"));
            out.extend_from_slice(b"2\r\nok\r\n0\r\n");
            out.extend_from_slice(format!("x-leak: {secret}\r\nx-{lower}: 1\r\n\r\n").as_bytes());
            out
        }
        "gzip-chunked" | "deflate-chunked" => {
            let coding = behaviour.split('-').next().unwrap();
            let mut out = head(&format!("transfer-encoding: {coding}, chunked\r\n"));
            out.extend(chunked(&compressed(coding == "deflate", plain.as_bytes()), 40));
            out
        }
        "gzip-close" => {
            // No chunked: the body runs until the connection closes.
            let mut out = head("transfer-encoding: gzip\r\n");
            out.extend(compressed(false, plain.as_bytes()));
            out
        }
        "gzip-gzip-chunked" => {
            let mut out = head("content-encoding: gzip\r\ntransfer-encoding: gzip, chunked\r\n");
            out.extend(chunked(&compressed(false, &compressed(false, plain.as_bytes())), 40));
            out
        }
        "compress-chunked" => {
            let mut out = head("transfer-encoding: compress, chunked\r\n");
            out.extend(chunked(&compressed(false, plain.as_bytes()), 40));
            out
        }
        "chunked-gzip" => {
            // chunked not last: hyper reads to close and would keep the chunk framing.
            let mut out = head("transfer-encoding: chunked, gzip\r\n");
            out.extend(compressed(false, &chunked(plain.as_bytes(), 40)));
            out
        }
        other => panic!("unknown raw behaviour {other}"),
    };
    out.shrink_to_fit();
    out
}

/// Every form of the canary an agent could read back, including the lower-cased ones a header
/// name carries.
fn leaks(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
    let hex: String = CANARY_OPENAI.bytes().map(|b| format!("{b:02x}")).collect();
    [CANARY_OPENAI.to_ascii_lowercase(), hex].into_iter().find(|form| text.contains(form.as_str()))
}

/// What an HTTP/1.1 agent receives, byte for byte.
fn raw_get(h: &Harness, path: &str) -> Vec<u8> {
    let addr = h.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: keyward\r\nauthorization: Bearer {WORKER_KEY}\r\nte: trailers\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_head_never_carries_the_credential() {
    let raw = raw_upstream(answer);
    let h = harness(raw).await;
    for route in RAW_ROUTES {
        for (behaviour, status_line) in [
            ("reason", "HTTP/1.1 200 OK\r\n"),
            ("reason-404", "HTTP/1.1 404 Not Found\r\n"),
            ("header-names", "HTTP/1.1 200 OK\r\n"),
            ("informational", "HTTP/1.1 200 OK\r\n"),
            ("trailer", "HTTP/1.1 200 OK\r\n"),
        ] {
            let got = raw_get(&h, &format!("/{route}/{behaviour}"));
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with(status_line), "{route}/{behaviour}: the canonical phrase is sent:\n{text}");
            assert_eq!(leaks(&got), None, "{route}/{behaviour} leaked:\n{text}");
            if behaviour == "header-names" {
                assert!(text.contains("x-fine: 4"), "other headers stay:\n{text}");
            }
        }
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_coded_bodies_are_decoded_and_scrubbed_or_refused() {
    // The leak check sees through what an agent could undo itself.
    let plain = echo_body(CANARY_OPENAI);
    assert!(leaks(&inflate_all(compressed(false, &compressed(false, plain.as_bytes())))).is_some());
    assert!(leaks(&inflate_all(compressed(true, plain.as_bytes()))).is_some());
    let raw = raw_upstream(answer);
    let h = harness(raw).await;
    let h1 = reqwest::Client::builder().http1_only().build().unwrap();
    let h2c = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();
    for (agent, client) in [("http/1.1", &h1), ("h2c", &h2c)] {
        for route in RAW_ROUTES {
            for behaviour in ["gzip-chunked", "deflate-chunked", "gzip-close", "gzip-gzip-chunked"] {
                let response = client
                    .get(h.url(&format!("/{route}/{behaviour}")))
                    .bearer_auth(WORKER_KEY)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{agent} {route}/{behaviour}: {e}"));
                let what = format!("{agent} {route}/{behaviour}");
                assert_eq!(response.status(), 200, "{what}");
                assert!(response.headers().get("transfer-encoding").is_none_or(|v| v == "chunked"), "{what}");
                assert!(response.headers().get("content-encoding").is_none(), "{what}");
                let body = response.bytes().await.unwrap().to_vec();
                assert_eq!(leaks(&inflate_all(body.clone())), None, "{what} leaked");
                let text = String::from_utf8(body.clone())
                    .unwrap_or_else(|_| panic!("{what}: the body was not decoded: {body:02x?}"));
                assert!(text.starts_with("{\"echo\":\"[REDACTED:OPENAI_API_KEY]"), "{what}: {text}");
            }
            for behaviour in ["compress-chunked", "chunked-gzip"] {
                let response =
                    client.get(h.url(&format!("/{route}/{behaviour}"))).bearer_auth(WORKER_KEY).send().await.unwrap();
                let what = format!("{agent} {route}/{behaviour}");
                assert_eq!(response.status(), 502, "{what}");
                let body = response.bytes().await.unwrap().to_vec();
                assert_eq!(leaks(&inflate_all(body.clone())), None, "{what} leaked");
                assert!(String::from_utf8_lossy(&body).contains("upstream_encoding_unsupported"), "{what}");
            }
        }
    }
    h.stop().await;
}

/// Python's own encoders, each form as base64 of its bytes (some are UTF-16).
const PYTHON_FORMS: &str = r#"
import base64, binascii, email.base64mime, html, json, sys, textwrap, urllib.parse
s = sys.argv[1]
b = s.encode()
forms = {
    "quote(safe='')": urllib.parse.quote(s, safe=""),
    "quote()": urllib.parse.quote(s),
    "quote_plus": urllib.parse.quote_plus(s),
    "urlencode": urllib.parse.urlencode({"k": s})[2:],
    "json.dumps": json.dumps(s)[1:-1],
    "html.escape": html.escape(s),
    "html.escape(quote=False)": html.escape(s, quote=False),
    "decimal entities": "".join("&#%d;" % ord(c) for c in s),
    "hex entities": "".join("&#x%x;" % ord(c) for c in s),
    "hexlify": binascii.hexlify(b).decode(),
    "hexlify upper": binascii.hexlify(b).decode().upper(),
    "bytes.hex()": b.hex(),
    "utf-16-le": s.encode("utf-16-le"),
    "utf-16-be": s.encode("utf-16-be"),
    "utf-16 (BOM)": s.encode("utf-16"),
}
for lead in range(0, 80):
    data = b"." * lead + b + b" tail"
    forms["encodebytes lead %d" % lead] = base64.encodebytes(data).decode()
    forms["base64mime lead %d" % lead] = email.base64mime.body_encode(data, maxlinelen=76, eol="\r\n")
    forms["pem lead %d" % lead] = "\n".join(textwrap.wrap(base64.b64encode(data).decode(), 64))
    forms["urlsafe lead %d" % lead] = base64.urlsafe_b64encode(data).decode()
out = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in forms.items()}
print(json.dumps(out))
"#;

#[test]
fn python_encoders_of_a_secret_with_reserved_characters_are_all_masked() {
    const SPECIAL: &str = "pw-canary/RT+0123_abcdef~xyz&<>'\"!*();$@=,:?# end";
    let output = std::process::Command::new("python3").args(["-c", PYTHON_FORMS, SPECIAL]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let forms: std::collections::BTreeMap<String, String> = serde_json::from_slice(&output.stdout).unwrap();
    let value = secrecy::SecretString::from(SPECIAL);
    let scrubber = keyward::scrub::Scrubber::new([("SPECIAL", &value)]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut survived = Vec::new();
    for (encoder, form) in &forms {
        let form = b64.decode(form).unwrap();
        let mut input = b"before ".to_vec();
        input.extend_from_slice(&form);
        input.extend_from_slice(b" after");
        let out = scrubber.scrub(&input).into_owned();
        assert_eq!(out.len(), input.len(), "{encoder}");
        if encoder.contains("lead") {
            let engine = if encoder.starts_with("urlsafe") {
                base64::engine::general_purpose::URL_SAFE
            } else {
                base64::engine::general_purpose::STANDARD
            };
            let reveals = |text: &[u8]| {
                let body = &text[7..text.len() - 6];
                let clean: Vec<u8> = body
                    .iter()
                    .filter(|b| !matches!(b, b'\r' | b'\n'))
                    .map(|&b| if b.is_ascii_alphanumeric() || b"+/-_=".contains(&b) { b } else { b'A' })
                    .collect();
                let decoded = engine.decode(&clean).unwrap_or_default();
                decoded.windows(SPECIAL.len()).any(|w| w == SPECIAL.as_bytes())
            };
            assert!(reveals(&input), "{encoder}: the check must see the secret");
            if reveals(&out) {
                survived.push(format!("{encoder}: {}", String::from_utf8_lossy(&out)));
            }
        } else if out.windows(form.len()).any(|w| w == &form[..]) {
            survived.push(encoder.clone());
        }
    }
    assert!(survived.is_empty(), "forms that survived: {survived:#?}");
}

/// JavaScript's own encoders (Node), each form as base64 of its bytes.
const NODE_FORMS: &str = r#"
const s = process.argv[1];
const json = JSON.stringify(s);
const forms = {
  "encodeURIComponent": encodeURIComponent(s),
  "encodeURI": encodeURI(s),
  "escape": escape(s),
  "URLSearchParams": new URLSearchParams({ k: s }).toString().slice(2),
  "JSON.stringify": json.slice(1, -1),
  "hex": Buffer.from(s).toString("hex"),
  "utf16le": Buffer.from(s, "utf16le"),
  "base64url": Buffer.from("xy" + s).toString("base64url"),
};
const out = {};
for (const [k, v] of Object.entries(forms)) out[k] = Buffer.from(v).toString("base64");
console.log(JSON.stringify(out));
"#;

#[test]
fn javascript_encoders_of_a_secret_with_reserved_characters_are_all_masked() {
    const SPECIAL: &str = "pw-canary/RT+0123_abcdef~xyz&<>'\"!*();$@=,:?# end";
    let output = std::process::Command::new("node")
        .args(["-e", NODE_FORMS, SPECIAL])
        .output()
        .expect("node is installed (scripts/test.sh installs nodejs)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let forms: std::collections::BTreeMap<String, String> = serde_json::from_slice(&output.stdout).unwrap();
    let value = secrecy::SecretString::from(SPECIAL);
    let scrubber = keyward::scrub::Scrubber::new([("SPECIAL", &value)]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut survived = Vec::new();
    for (encoder, form) in &forms {
        let form = b64.decode(form).unwrap();
        let mut input = b"k=".to_vec();
        input.extend_from_slice(&form);
        input.extend_from_slice(b"&n=1");
        let out = scrubber.scrub(&input).into_owned();
        assert_eq!(out.len(), input.len(), "{encoder}");
        // Of base64 text, the part that comes from the secret alone.
        let form = if encoder == "base64url" { form[4..form.len() - 4].to_vec() } else { form };
        if out.windows(form.len()).any(|w| w == &form[..]) {
            survived.push(encoder.clone());
        }
    }
    assert!(survived.is_empty(), "forms that survived: {survived:#?}");
}
