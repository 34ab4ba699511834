//! The scrubber: a canary inserted anywhere, in any supported encoding, never survives, whatever
//! the chunking, and the output keeps the input's length.
#![no_main]

use std::sync::Arc;

use keyward::scrub::{Scrubber, StreamScrubber};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_/+=.";

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (head, body) = data.split_at(4);
    let len = 8 + head[0] as usize % 40;
    let canary: String = (0..len).map(|i| ALPHABET[(head[1] as usize + i * 7 + head[2] as usize * i) % ALPHABET.len()] as char).collect();
    let secret = SecretString::from(canary.clone());
    let scrubber = Arc::new(Scrubber::new([("CANARY", &secret)]));
    let mut input = body.to_vec();
    let at = if input.is_empty() { 0 } else { head[3] as usize % (input.len() + 1) };
    input.splice(at..at, canary.bytes());

    let whole = scrubber.scrub(&input).into_owned();
    assert_eq!(whole.len(), input.len());
    assert!(!whole.windows(canary.len()).any(|w| w == canary.as_bytes()), "canary survived whole-buffer scrub");

    let mut stream = StreamScrubber::new(scrubber.clone());
    let mut out = Vec::new();
    let mut rest = &input[..];
    let mut step = 0usize;
    while !rest.is_empty() {
        let n = 1 + (body.get(step % body.len().max(1)).copied().unwrap_or(1) as usize % 23);
        let n = n.min(rest.len());
        out.extend_from_slice(&stream.push(&rest[..n]));
        rest = &rest[n..];
        step += 1;
    }
    out.extend_from_slice(&stream.finish());
    assert_eq!(out, whole, "streaming differs from whole-buffer scrubbing");
});
