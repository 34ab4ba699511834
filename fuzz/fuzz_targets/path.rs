//! Path normalisation and joining: an accepted path never holds traversal, and a matched route's
//! remainder always joins below the upstream's base path.
#![no_main]

use keyward::policy::{PathPattern, RouteTable, check_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let Ok(path) = check_path(raw) else { return };
    let decoded = path.decoded.as_ref();
    assert!(decoded.starts_with('/'));
    assert!(!decoded.contains('\\'));
    for segment in decoded[1..].trim_end_matches('/').split('/') {
        let name = segment.split(';').next().unwrap_or(segment).trim();
        assert!(name != "." && name != "..", "traversal accepted: {raw}");
    }
    let table = RouteTable::new(["/openai", "/openai/v2", "/github"]);
    if let Some(m) = table.find(&path) {
        assert!(m.raw_rest.is_empty() || m.raw_rest.starts_with('/'));
        assert!(m.rest.is_empty() || m.rest.starts_with('/'));
        let joined = format!("/base{}", m.raw_rest);
        assert!(joined.starts_with("/base"));
        for pattern in ["/**", "/v1/*", "/repos/**/pulls"] {
            let _ = PathPattern::parse(pattern).unwrap().matches(&m.rest);
        }
    }
});
