//! Agent-key extraction: any headers give a key or a 401, and a key is always a whitespace-free
//! substring of what was sent.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use keyward::config::AgentKeySpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let specs = [
        AgentKeySpec { header: HeaderName::from_static("authorization"), schemes: vec!["Bearer".into()] },
        AgentKeySpec { header: HeaderName::from_static("authorization"), schemes: vec!["Bearer".into(), "token".into()] },
        AgentKeySpec { header: HeaderName::from_static("x-api-key"), schemes: vec![] },
    ];
    // One place, or the Anthropic route's two places.
    let anthropic = [specs[2].clone(), specs[0].clone()];
    let places: &[AgentKeySpec] = match selector as usize % 4 {
        3 => &anthropic,
        i => std::slice::from_ref(&specs[i]),
    };
    let names = ["authorization", "x-api-key", "proxy-authorization"];
    let mut headers = HeaderMap::new();
    for (i, value) in rest.split(|b| *b == b'\n').take(6).enumerate() {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(names[i % names.len()]), value);
        }
    }
    if let Ok(key) = keyward::identity::extract_key(places, &headers, "fuzz") {
        assert!(!key.is_empty());
        assert!(key.bytes().all(|b| b.is_ascii_graphic()));
        assert!(headers.values().any(|v| v.to_str().is_ok_and(|v| v.contains(key))));
    }
});
