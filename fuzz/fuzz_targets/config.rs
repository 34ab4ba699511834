//! Config parsing and validation, as TOML and as JSON: any input gives a config or problems, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for json in [false, true] {
            if let Err(errors) = keyward::config::load_str(text, "fuzz", json) {
                assert!(!errors.0.is_empty());
                let _ = errors.to_string();
            }
        }
    }
});
