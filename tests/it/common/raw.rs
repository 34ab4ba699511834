//! A hostile upstream on raw TCP: it writes exact bytes that hyper's own server would not (any
//! reason phrase, header names built from the credential, trailers, transfer codings with or
//! without chunked, close-delimited bodies), built from the credential it received by header,
//! basic or query injection; plus the routes that reach it and decoders an agent could use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use base64::Engine;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};

use super::CANARY_OPENAI;

/// The routes to a raw upstream, one per injection form; all inject `OPENAI_API_KEY`.
pub const RAW_ROUTES: [&str; 3] = ["raw-header", "raw-basic", "raw-query"];

/// Config for `RAW_ROUTES`, to append to the test config.
pub fn raw_routes(raw: SocketAddr) -> String {
    format!(
        r#"
[[routes]]
name = "raw-header"
prefix = "/raw-header"
upstream = "http://{raw}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ header = "authorization", value = "Bearer {{{{secret}}}}" }}

[[routes]]
name = "raw-basic"
prefix = "/raw-basic"
upstream = "http://{raw}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ basic = {{ username = "u", password = "{{{{secret}}}}" }} }}

[[routes]]
name = "raw-query"
prefix = "/raw-query"
upstream = "http://{raw}"
agent_key = {{ header = "authorization", scheme = "Bearer" }}
inject = {{ query = "key", value = "{{{{secret}}}}" }}
"#
    )
}

/// The config text with GET on every path of `RAW_ROUTES` granted to the worker role.
pub fn grant_raw_routes(text: String) -> String {
    let grants: String = RAW_ROUTES
        .iter()
        .map(|r| {
            format!("  {{ route = \"{r}\", secret = \"OPENAI_API_KEY\", methods = [\"GET\"], paths = [\"/**\"] }},\n")
        })
        .collect();
    text.replacen("[roles.worker]\ngrants = [\n", &format!("[roles.worker]\ngrants = [\n{grants}"), 1)
}

/// The credential the upstream received, however it was injected.
pub fn received_credential(head: &str) -> String {
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        if !name.eq_ignore_ascii_case("authorization") {
            continue;
        }
        let value = value.trim();
        if let Some(token) = value.strip_prefix("Bearer ") {
            return token.to_string();
        }
        if let Some(basic) = value.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(basic).unwrap_or_default();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            return decoded.split_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();
        }
    }
    let target = head.split(' ').nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let key = query.split('&').find_map(|p| p.strip_prefix("key=")).unwrap_or("");
    percent_decode(key.as_bytes()).decode_utf8_lossy().into_owned()
}

/// A raw-TCP upstream: reads a request head, writes `answer(path, credential)`, closes.
pub fn raw_upstream(answer: fn(&str, &str) -> Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let secret = received_credential(&head);
                assert_eq!(secret, CANARY_OPENAI, "the credential was injected");
                let path = head.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("").to_string();
                let _ = stream.write_all(&answer(&path, &secret));
                let _ = stream.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

pub fn compressed(deflate: bool, data: &[u8]) -> Vec<u8> {
    if deflate {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    } else {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }
}

/// `body` in HTTP/1.1 chunked framing, `size` bytes a chunk.
pub fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in body.chunks(size.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Undoes any gzip or zlib layers an agent could strip itself.
pub fn inflate_all(mut body: Vec<u8>) -> Vec<u8> {
    for _ in 0..3 {
        let mut gz = Vec::new();
        let mut zlib = Vec::new();
        if flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut gz).is_ok() {
            body = gz;
        } else if flate2::read::ZlibDecoder::new(&body[..]).read_to_end(&mut zlib).is_ok() {
            body = zlib;
        } else {
            break;
        }
    }
    body
}

/// The reason phrases, header-name forms, framings and body encodings `hostile_answer` knows.
pub const REASONS: [&str; 5] = ["ok", "raw", "lower", "hex", "b64"];
pub const NAMES: [&str; 4] = ["none", "lower", "hex", "bare"];
pub const FRAMINGS: [&str; 9] = [
    "length",
    "close",
    "chunked",
    "gzip-chunked",
    "deflate-chunked",
    "gzip-close",
    "gzip-gzip",
    "compress",
    "chunked-gzip",
];
/// Framings keyward must refuse (502): the body cannot be inspected.
pub const REFUSED_FRAMINGS: [&str; 2] = ["compress", "chunked-gzip"];
pub const ENCODINGS: [&str; 15] = [
    "raw",
    "hex",
    "hexup",
    "utf16le",
    "utf16be",
    "mime",
    "lf",
    "pem",
    "quote",
    "component",
    "pctall",
    "gojson",
    "uall",
    "htmldec",
    "htmlhex",
];

const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
const COMPONENT: &AsciiSet = &UNRESERVED.remove(b'!').remove(b'*').remove(b'\'').remove(b'(').remove(b')');

fn wrap(text: &str, width: usize, eol: &str) -> String {
    text.as_bytes().chunks(width).map(|l| std::str::from_utf8(l).unwrap()).collect::<Vec<_>>().join(eol)
}

/// `secret` in `encoding`, after `lead` bytes of other text (which moves base64 alignment and
/// the place on a line).
pub fn encode(encoding: &str, secret: &str, lead: usize) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let padded = format!("{}{secret} and more", ".".repeat(lead));
    match encoding {
        "raw" => padded.into_bytes(),
        "hex" => padded.bytes().map(|b| format!("{b:02x}")).collect::<String>().into_bytes(),
        "hexup" => padded.bytes().map(|b| format!("{b:02X}")).collect::<String>().into_bytes(),
        "utf16le" => padded.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        "utf16be" => padded.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        "mime" => wrap(&b64.encode(&padded), 76, "\r\n").into_bytes(),
        "lf" => wrap(&b64.encode(&padded), 76, "\n").into_bytes(),
        "pem" => wrap(&b64.encode(&padded), 64, "\n").into_bytes(),
        "quote" => utf8_percent_encode(&padded, UNRESERVED).to_string().into_bytes(),
        "component" => utf8_percent_encode(&padded, COMPONENT).to_string().into_bytes(),
        "pctall" => padded.bytes().map(|b| format!("%{b:02X}")).collect::<String>().into_bytes(),
        "gojson" => serde_json::to_string(&format!("<{padded}>&"))
            .unwrap()
            .replace('<', "\\u003c")
            .replace('>', "\\u003e")
            .replace('&', "\\u0026")
            .into_bytes(),
        "uall" => padded.chars().map(|c| format!("\\u{:04x}", c as u32)).collect::<String>().into_bytes(),
        "htmldec" => padded.chars().map(|c| format!("&#{};", c as u32)).collect::<String>().into_bytes(),
        "htmlhex" => padded.chars().map(|c| format!("&#x{:x};", c as u32)).collect::<String>().into_bytes(),
        other => panic!("unknown encoding {other}"),
    }
}

/// What an agent gets back by undoing `encoding` on `body` (masked text decodes to filler).
pub fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(body);
    let unhex = |t: &str| -> Vec<u8> {
        let digits: Vec<u8> = t.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    };
    match encoding {
        "hex" | "hexup" => unhex(&text),
        "utf16le" | "utf16be" => {
            // Both byte orders at once: dropping the NULs of ASCII text leaves the text.
            body.iter().copied().filter(|&b| b != 0).collect()
        }
        "mime" | "lf" | "pem" => {
            let clean: Vec<u8> = body
                .iter()
                .filter(|b| !matches!(b, b'\r' | b'\n'))
                .map(|&b| if b.is_ascii_alphanumeric() || b"+/=".contains(&b) { b } else { b'A' })
                .collect();
            base64::engine::general_purpose::STANDARD.decode(&clean).unwrap_or_default()
        }
        "quote" | "component" | "pctall" => percent_decode(body).collect(),
        "gojson" | "uall" => {
            serde_json::from_str::<String>(&format!("\"{text}\"")).map(String::into_bytes).unwrap_or_else(|_| {
                text.split("\\u")
                    .filter_map(|u| u.get(..4).and_then(|h| u8::from_str_radix(&h[2..], 16).ok()))
                    .collect()
            })
        }
        "htmldec" | "htmlhex" => text
            .split("&#")
            .filter_map(|e| {
                let e = e.split(';').next()?;
                match e.strip_prefix('x') {
                    Some(hex) => u8::from_str_radix(hex, 16).ok(),
                    None => e.parse().ok(),
                }
            })
            .collect(),
        _ => body.to_vec(),
    }
}

/// The answer for `/…/{reason}/{names}/{framing}/{encoding}/{lead}`: a status line with that
/// reason phrase, headers named after the secret, that framing, and the secret in that encoding.
pub fn hostile_answer(path: &str, secret: &str) -> Vec<u8> {
    let parts: Vec<&str> = path.rsplit('/').take(5).collect();
    let [lead, encoding, framing, names, reason] = parts[..] else { panic!("bad hostile path {path}") };
    let lead: usize = lead.parse().unwrap();
    let lower = secret.to_ascii_lowercase();
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let reason = match reason {
        "ok" => "OK".to_string(),
        "raw" => format!("key {secret}"),
        "lower" => lower.clone(),
        "hex" => hex.clone(),
        _ => base64::engine::general_purpose::STANDARD.encode(secret),
    };
    let mut head = format!("HTTP/1.1 200 {reason}\r\n");
    match names {
        "lower" => head.push_str(&format!("x-{lower}: 1\r\n")),
        "hex" => head.push_str(&format!("x-k-{hex}: 1\r\n")),
        "bare" => head.push_str(&format!("{lower}: 1\r\n")),
        _ => {}
    }
    let body = encode(encoding, secret, lead);
    let size = 1 + lead % 50;
    let (framing_head, wire) = match framing {
        "length" => (format!("content-length: {}\r\n", body.len()), body),
        "close" => (String::new(), body),
        "chunked" => ("transfer-encoding: chunked\r\n".to_string(), chunked(&body, size)),
        "gzip-chunked" => {
            ("transfer-encoding: gzip, chunked\r\n".to_string(), chunked(&compressed(false, &body), size))
        }
        "deflate-chunked" => {
            ("transfer-encoding: deflate, chunked\r\n".to_string(), chunked(&compressed(true, &body), size))
        }
        "gzip-close" => ("transfer-encoding: gzip\r\n".to_string(), compressed(false, &body)),
        "gzip-gzip" => (
            "content-encoding: gzip\r\ntransfer-encoding: gzip, chunked\r\n".to_string(),
            chunked(&compressed(false, &compressed(false, &body)), size),
        ),
        "compress" => {
            ("transfer-encoding: compress, chunked\r\n".to_string(), chunked(&compressed(false, &body), size))
        }
        "chunked-gzip" => {
            ("transfer-encoding: chunked, gzip\r\n".to_string(), compressed(false, &chunked(&body, size)))
        }
        other => panic!("unknown framing {other}"),
    };
    head.push_str(&framing_head);
    head.push_str("connection: close\r\n\r\n");
    let mut out = head.into_bytes();
    out.extend(wire);
    out
}
