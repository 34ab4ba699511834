//! The tamper-evident hash chain: each record carries `seq`, `prev_hash` and `hash`, where `hash`
//! is SHA-256 over the record's canonical JSON without `hash` (keys sorted, no whitespace, line
//! separators and display controls escaped).
//! Verification is pure: it reads lines and reports the first place the chain breaks.

use std::io::Write;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::event::AUDIT_PRUNED;

/// `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Whether `c` is escaped as `\uHHHH` in audit records: characters that line-based tools count
/// as line breaks (U+0085 and the other C1 controls, U+2028, U+2029) and invisible characters
/// that reorder or hide text in a viewer (bidi embeddings, overrides and isolates, zero-width
/// characters, the BOM). serde_json already escapes the C0 controls. Delegation labels refuse them.
pub fn is_line_break_or_display_control(c: char) -> bool {
    matches!(c,
        '\u{80}'..='\u{9f}'
        | '\u{61c}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}')
}

/// serde_json's compact output, with `is_line_break_or_display_control` characters escaped, so
/// a record is one line for every tool and shows what it holds.
#[derive(Clone, Copy, Default)]
pub struct CanonicalFormatter;

impl serde_json::ser::Formatter for CanonicalFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if fragment.is_ascii() {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (at, c) in fragment.char_indices() {
            if is_line_break_or_display_control(c) {
                writer.write_all(&fragment.as_bytes()[start..at])?;
                write!(writer, "\\u{:04x}", c as u32)?;
                start = at + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Writes `value` as compact JSON with `CanonicalFormatter` (a struct's fields in declaration
/// order: records declare them sorted).
pub fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut serializer = serde_json::Serializer::with_formatter(out, CanonicalFormatter);
    value.serialize(&mut serializer).expect("audit values always serialize");
}

/// Serializes with object keys sorted at every level, whatever map type serde_json uses.
pub fn canonical(value: &Value) -> String {
    let mut out = Vec::with_capacity(512);
    write_canonical(value, &mut out, CanonicalFormatter);
    into_string(out)
}

/// Writes straight into one buffer: no string per key or scalar (this runs twice per request on
/// the audit writer's thread).
fn write_canonical<F: serde_json::ser::Formatter + Copy>(value: &Value, out: &mut Vec<u8>, formatter: F) {
    match value {
        Value::Object(map) => write_object(map, out, formatter),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out, formatter);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out, formatter),
    }
}

fn write_scalar<T: serde::Serialize + ?Sized, F: serde_json::ser::Formatter>(
    value: &T,
    out: &mut Vec<u8>,
    formatter: F,
) {
    let mut serializer = serde_json::Serializer::with_formatter(out, formatter);
    value.serialize(&mut serializer).expect("scalars serialize");
}

/// An object with its keys sorted.
fn write_object<F: serde_json::ser::Formatter + Copy>(map: &Map<String, Value>, out: &mut Vec<u8>, formatter: F) {
    let mut fields: Vec<(&String, &Value)> = map.iter().collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (key, value)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_scalar(key, out, formatter);
        out.push(b':');
        write_canonical(value, out, formatter);
    }
    out.push(b'}');
}

fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("serde_json writes UTF-8")
}

/// The hash as records written before display controls were escaped computed it (serde_json's
/// plain escaping), so `audit verify` still verifies older files.
fn legacy_hash_of(record_without_hash: &Value) -> String {
    /// serde_json's compact output as it is (the trait's default methods).
    #[derive(Clone, Copy)]
    struct Plain;
    impl serde_json::ser::Formatter for Plain {}
    let mut out = Vec::with_capacity(512);
    write_canonical(record_without_hash, &mut out, Plain);
    hex::encode(Sha256::digest(&out))
}

pub fn hash_of(record_without_hash: &Value) -> String {
    hex::encode(Sha256::digest(canonical(record_without_hash).as_bytes()))
}

/// The keys the chain adds to every record, in their sorted order.
const CHAIN_KEYS: [&str; 3] = ["hash", "prev_hash", "seq"];

/// A record ready to be sealed: its canonical JSON object (keys sorted at every level, no chain
/// keys), and where each chain key goes among its top-level keys. Built on the request's own
/// thread, so the writer only hashes and appends.
pub struct Line {
    bytes: Vec<u8>,
    /// For `hash`, `prev_hash`, `seq`: the offset of the first top-level key that sorts after
    /// it, or of the closing brace.
    slots: [usize; 3],
}

impl Line {
    /// `bytes` must be a canonical JSON object without chain keys (checked in debug builds).
    pub fn from_canonical(bytes: Vec<u8>) -> Line {
        let slots = chain_slots(&bytes);
        debug_assert!(serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| canonical(&v).as_bytes() == bytes));
        Line { bytes, slots }
    }

    /// Any JSON object; chain keys it carries are dropped (the chain sets them).
    pub fn from_value(mut value: Value) -> Line {
        if let Some(map) = value.as_object_mut() {
            for key in CHAIN_KEYS {
                map.remove(key);
            }
        }
        Line::from_canonical(canonical(&value).into_bytes())
    }
}

impl From<Value> for Line {
    fn from(value: Value) -> Line {
        Line::from_value(value)
    }
}

/// Appends one object member to `buf` and returns where it is: before a key it reads `"k":v,`;
/// at the closing brace `,"k":v`, or `"k":v` when nothing precedes it in the object.
fn push_member(
    buf: &mut Vec<u8>,
    name: &str,
    value: &[u8],
    quoted: bool,
    before_key: bool,
    preceded: bool,
) -> std::ops::Range<usize> {
    let start = buf.len();
    if !before_key && preceded {
        buf.push(b',');
    }
    buf.push(b'"');
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\":");
    if quoted {
        buf.push(b'"');
    }
    buf.extend_from_slice(value);
    if quoted {
        buf.push(b'"');
    }
    if before_key {
        buf.push(b',');
    }
    start..buf.len()
}

/// For each chain key, the offset where it belongs among the object's top-level keys.
fn chain_slots(object: &[u8]) -> [usize; 3] {
    let end = object.len().saturating_sub(1);
    let mut slots = [end; 3];
    let mut found = 0;
    let mut i = 1; // past '{'
    while i < end && found < CHAIN_KEYS.len() {
        // At a key's opening quote; canonical keys hold no escaped quote before their end.
        let key_end = string_end(object, i);
        let key = &object[i + 1..key_end - 1];
        while found < CHAIN_KEYS.len() && key > CHAIN_KEYS[found].as_bytes() {
            slots[found] = i;
            found += 1;
        }
        i = value_end(object, key_end + 1); // past ':'
        if object.get(i) == Some(&b',') {
            i += 1;
        }
    }
    slots
}

/// `at` is an opening quote; returns the offset just past the closing one.
fn string_end(bytes: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The offset just past the JSON value that starts at `at`.
fn value_end(bytes: &[u8], at: usize) -> usize {
    let mut depth = 0usize;
    let mut i = at;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i = string_end(bytes, i);
                if depth == 0 {
                    return i;
                }
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                if depth == 0 {
                    return i;
                }
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            b',' if depth == 0 => return i,
            _ => {}
        }
        i += 1;
    }
    i
}

/// The chain's position: the next record gets `seq` and links to `prev_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub prev_hash: String,
}

impl ChainHead {
    pub fn genesis() -> ChainHead {
        ChainHead { seq: 0, prev_hash: GENESIS.to_string() }
    }

    /// Adds `seq`, `prev_hash` and `hash` to `record`, advances the head, and returns the line:
    /// the canonical JSON of the record with its hash, whose hash is that of the same JSON without it.
    pub fn seal(&mut self, record: Value) -> String {
        let mut out = Vec::with_capacity(1024);
        self.seal_into(&Line::from_value(record), &mut out);
        into_string(out)
    }

    /// Appends the sealed `line` (without a newline) to `out` and advances the head.
    pub fn seal_into(&mut self, line: &Line, out: &mut Vec<u8>) {
        let [at_hash, at_prev, at_seq] = line.slots;
        let bytes = &line.bytes;
        let brace = bytes.len() - 1;
        let has_members = bytes.len() > 2;
        let mut seq_digits = Vec::with_capacity(20);
        write!(seq_digits, "{}", self.seq).expect("writing to a Vec cannot fail");
        // Each chain member, as it reads in the line: the one `prev_hash` and `seq` text serves
        // both the hash (computed without `hash`) and the line, except when all three sit at the
        // closing brace of an empty object, where only the line has `hash` before `prev_hash`.
        let mut members = Vec::with_capacity(192);
        let prev =
            push_member(&mut members, "prev_hash", self.prev_hash.as_bytes(), true, at_prev < brace, has_members);
        let seq = push_member(&mut members, "seq", &seq_digits, false, at_seq < brace, has_members || at_prev == brace);
        let mut hasher = Sha256::new();
        hasher.update(&bytes[..at_prev]);
        hasher.update(&members[prev.clone()]);
        hasher.update(&bytes[at_prev..at_seq]);
        hasher.update(&members[seq.clone()]);
        hasher.update(&bytes[at_seq..]);
        let mut hash = [0u8; 64];
        hex::encode_to_slice(hasher.finalize(), &mut hash).expect("64 hex digits for 32 bytes");
        let hash_member = push_member(&mut members, "hash", &hash, true, at_hash < brace, has_members);
        let prev = if !has_members && at_hash == brace {
            push_member(&mut members, "prev_hash", self.prev_hash.as_bytes(), true, false, true)
        } else {
            prev
        };
        out.reserve(bytes.len() + members.len());
        out.extend_from_slice(&bytes[..at_hash]);
        out.extend_from_slice(&members[hash_member]);
        out.extend_from_slice(&bytes[at_hash..at_prev]);
        out.extend_from_slice(&members[prev]);
        out.extend_from_slice(&bytes[at_prev..at_seq]);
        out.extend_from_slice(&members[seq]);
        out.extend_from_slice(&bytes[at_seq..]);
        self.seq += 1;
        self.prev_hash = String::from_utf8(hash.to_vec()).expect("hex is ASCII");
    }

    /// The head after an existing sealed line (for resuming the chain at start-up).
    pub fn after(line: &str) -> Option<ChainHead> {
        let value: Value = serde_json::from_str(line).ok()?;
        Some(ChainHead { seq: value.get("seq")?.as_u64()? + 1, prev_hash: value.get("hash")?.as_str()?.to_string() })
    }
}

/// Where and why a chain check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub file: String,
    pub line: usize,
    pub seq: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{}:{}: seq {}: {}", self.file, self.line, seq, self.reason),
            None => write!(f, "{}:{}: {}", self.file, self.line, self.reason),
        }
    }
}

/// Checks a sequence of lines (from files in chain order). The first record may start mid-chain
/// only if a later `audit.pruned` record names its hash as the first surviving one.
#[derive(Default)]
pub struct Verifier {
    expected: Option<ChainHead>,
    first: Option<(String, usize, u64, String)>,
    pruned_anchors: Vec<String>,
    pub records: u64,
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    pub fn check_line(&mut self, file: &str, line_no: usize, line: &str) -> Result<(), Break> {
        let broken = |seq: Option<u64>, reason: String| Break { file: file.to_string(), line: line_no, seq, reason };
        let mut value: Value =
            serde_json::from_str(line).map_err(|e| broken(None, format!("not a JSON record ({e})")))?;
        let Some(map) = value.as_object_mut() else { return Err(broken(None, "not a JSON object".to_string())) };
        let seq = map.get("seq").and_then(Value::as_u64);
        let Some(claimed) = map.remove("hash").and_then(|h| h.as_str().map(str::to_string)) else {
            return Err(broken(seq, "no hash".to_string()));
        };
        let Some(seq) = seq else { return Err(broken(None, "no seq".to_string())) };
        let prev = map.get("prev_hash").and_then(Value::as_str).unwrap_or_default().to_string();
        let is_pruning = map.get("type").and_then(Value::as_str) == Some(AUDIT_PRUNED);
        if is_pruning && let Some(anchor) = map.get("first_surviving_hash").and_then(Value::as_str) {
            self.pruned_anchors.push(anchor.to_string());
        }
        if hash_of(&value) != claimed && legacy_hash_of(&value) != claimed {
            return Err(broken(Some(seq), "hash does not match the record: it was edited".to_string()));
        }
        match &self.expected {
            None => {
                // A trail may start with its own pruning record (everything older expired).
                if (seq != 0 || prev != GENESIS) && !is_pruning {
                    self.first = Some((file.to_string(), line_no, seq, claimed.clone()));
                }
            }
            Some(head) => {
                if seq != head.seq {
                    let why = if seq > head.seq {
                        format!("expected seq {}: records were deleted", head.seq)
                    } else {
                        format!("expected seq {}: records were reordered or inserted", head.seq)
                    };
                    return Err(broken(Some(seq), why));
                }
                if prev != head.prev_hash {
                    return Err(broken(Some(seq), "prev_hash does not match the previous record".to_string()));
                }
            }
        }
        self.expected = Some(ChainHead { seq: seq + 1, prev_hash: claimed });
        self.records += 1;
        Ok(())
    }

    /// Call after the last line: a chain that starts mid-way must be explained by pruning.
    pub fn finish(&self) -> Result<(), Break> {
        if let Some((file, line, seq, hash)) = &self.first
            && !self.pruned_anchors.contains(hash)
        {
            return Err(Break {
                file: file.clone(),
                line: *line,
                seq: Some(*seq),
                reason: "the chain starts mid-way and no audit.pruned record names this record".to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: usize) -> Vec<String> {
        let mut head = ChainHead::genesis();
        (0..n).map(|i| head.seal(json!({ "type": "request", "n": i, "b": { "z": 1, "a": 2 } }))).collect()
    }

    fn verify(lines: &[String]) -> Result<u64, Break> {
        let mut v = Verifier::new();
        for (i, line) in lines.iter().enumerate() {
            v.check_line("audit.jsonl", i + 1, line)?;
        }
        v.finish()?;
        Ok(v.records)
    }

    /// Text that line-based tools split or that a viewer shows reordered.
    const TRICKY: &str = "/v1/a\u{2028}b\u{2029}c\u{85}d\u{202e}gpj.exe\u{2066}\u{200b}\u{feff}e\u{9f}";

    #[test]
    fn separators_and_display_controls_are_escaped_in_every_record() {
        let mut head = ChainHead::genesis();
        let line = head.seal(json!({ "type": "request", "path": TRICKY, TRICKY: [TRICKY] }));
        assert!(!line.chars().any(is_line_break_or_display_control), "{line:?}");
        for escaped in ["\\u2028", "\\u2029", "\\u0085", "\\u202e", "\\u2066", "\\u200b", "\\ufeff", "\\u009f"] {
            assert!(line.contains(escaped), "{escaped} missing in {line}");
        }
        // The same text reads back, and the record verifies.
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["path"], TRICKY);
        assert_eq!(verify(&[line]), Ok(1));
        // Ordinary non-ASCII text is left as it is.
        assert!(canonical(&json!({ "p": "café ☕" })).contains("café ☕"));
    }

    #[test]
    fn records_written_before_the_escaping_still_verify() {
        // As the previous release wrote it: serde_json's escaping, the separators raw.
        let body = format!(
            "\"path\":{},\"prev_hash\":\"{GENESIS}\",\"seq\":0,\"type\":\"request\"",
            serde_json::to_string(TRICKY).unwrap()
        );
        assert!(body.contains('\u{2028}'));
        let hash = hex::encode(Sha256::digest(format!("{{{body}}}").as_bytes()));
        let old = format!("{{\"hash\":\"{hash}\",{body}}}");
        let mut head = ChainHead::after(&old).unwrap();
        let new = head.seal(json!({ "type": "request", "path": TRICKY }));
        assert_eq!(verify(&[old.clone(), new]), Ok(2));
        // An edit is still caught in either form.
        let edited = old.replace("gpj", "gpx");
        assert!(verify(&[edited]).is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        assert_eq!(
            canonical(&json!({ "b": 1, "a": { "d": [3, { "y": 1, "x": 2 }], "c": null } })),
            r#"{"a":{"c":null,"d":[3,{"x":2,"y":1}]},"b":1}"#
        );
    }

    #[test]
    fn a_sealed_line_is_canonical_and_hashed_without_its_hash() {
        let mut head = ChainHead { seq: 7, prev_hash: "cd".repeat(32) };
        let line =
            head.seal(json!({ "type": "request", "z": "\u{e9}\"", "hash": "stale", "a": [{ "y": 1, "x": null }] }));
        let mut value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(canonical(&value), line);
        let hash = value.as_object_mut().unwrap().remove("hash").unwrap();
        assert_eq!(hash.as_str().unwrap(), hash_of(&value));
        assert_eq!(value["seq"], 7);
        assert_eq!(value["prev_hash"], "cd".repeat(32));
        assert_eq!((head.seq, head.prev_hash.as_str()), (8, hash.as_str().unwrap()));
    }

    #[test]
    fn chain_keys_land_in_sorted_place_whatever_the_record_holds() {
        let records = [
            json!({}),
            json!({ "a": 1 }),
            json!({ "z": 1 }),
            json!({ "a": { "q": [1, { "seq": "}" }] }, "i": "x\\\"y", "r": [], "t": { "hash": 2 } }),
            json!({ "hash": "stale", "prev_hash": "x", "seq": 9 }),
            json!({ "path": "a,b", "s": "q", "type": "request" }),
            json!({ "h": null, "q": true }),
        ];
        for record in records {
            let mut head = ChainHead { seq: 3, prev_hash: "ab".repeat(32) };
            let line = head.seal(record.clone());
            let mut value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(canonical(&value), line);
            let hash = value.as_object_mut().unwrap().remove("hash").unwrap();
            assert_eq!(hash.as_str().unwrap(), hash_of(&value), "{line}");
            assert_eq!(value["seq"], 3);
            assert_eq!(head.prev_hash, hash.as_str().unwrap());
        }
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
        let resumed = ChainHead::after(&chain(3)[2]).unwrap();
        assert_eq!(resumed.seq, 3);
    }

    #[test]
    fn each_kind_of_tampering_is_caught_at_its_place() {
        let lines = chain(5);
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("\"n\":2", "\"n\":7");
        let b = verify(&edited).unwrap_err();
        assert_eq!((b.line, b.seq), (3, Some(2)));
        assert!(b.reason.contains("edited"));

        let mut deleted = lines.clone();
        deleted.remove(2);
        let b = verify(&deleted).unwrap_err();
        assert_eq!((b.line, b.seq), (3, Some(3)));
        assert!(b.reason.contains("deleted"));

        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        let b = verify(&swapped).unwrap_err();
        assert_eq!(b.line, 2);

        let mut forged = lines.clone();
        let mut head = ChainHead { seq: 2, prev_hash: ChainHead::after(&lines[1]).unwrap().prev_hash };
        forged.insert(2, head.seal(json!({ "type": "request", "n": 99 })));
        let b = verify(&forged).unwrap_err();
        assert_eq!(b.line, 4, "{b}");

        let b = verify(&lines[2..]).unwrap_err();
        assert!(b.reason.contains("starts mid-way"));
    }

    #[test]
    fn a_trail_may_start_with_its_own_pruning_record() {
        let mut head = ChainHead { seq: 40, prev_hash: "ab".repeat(32) };
        let lines = vec![
            head.seal(json!({ "type": "audit.pruned", "first_surviving_hash": null })),
            head.seal(json!({ "type": "request", "n": 1 })),
        ];
        assert_eq!(verify(&lines), Ok(2));
    }

    #[test]
    fn a_pruned_start_verifies_when_a_pruning_record_names_it() {
        let mut head = ChainHead::genesis();
        let mut lines: Vec<String> = (0..4).map(|i| head.seal(json!({ "type": "request", "n": i }))).collect();
        let first_surviving = ChainHead::after(&lines[1]).unwrap().prev_hash;
        lines.push(head.seal(json!({ "type": "audit.pruned", "first_surviving_hash": first_surviving })));
        assert_eq!(verify(&lines[1..]), Ok(4));
    }
}
