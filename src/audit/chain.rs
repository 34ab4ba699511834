//! The tamper-evident hash chain: each record carries `seq`, `prev_hash` and `hash`, where `hash`
//! is SHA-256 over the record's canonical JSON without `hash` (keys sorted, no whitespace).
//! Verification is pure: it reads lines and reports the first place the chain breaks.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the very first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Serializes with object keys sorted at every level, whatever map type serde_json uses.
pub fn canonical(value: &Value) -> String {
    let mut out = Vec::with_capacity(512);
    write_canonical(value, &mut out);
    into_string(out)
}

/// Writes straight into one buffer: no string per key or scalar (this runs twice per request on
/// the audit writer's thread).
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            write_object(map, None, out);
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalars serialize"),
    }
}

/// An object with its keys sorted. Returns where a field named `slot` (a key the map does not
/// have) would start, if some key sorts after it: the offset of the first such key.
fn write_object(map: &Map<String, Value>, slot: Option<&str>, out: &mut Vec<u8>) -> Option<usize> {
    let mut fields: Vec<(&String, &Value)> = map.iter().collect();
    fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    let mut at = None;
    for (i, (key, value)) in fields.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if at.is_none() && slot.is_some_and(|slot| key.as_str() > slot) {
            at = Some(out.len());
        }
        serde_json::to_writer(&mut *out, key).expect("strings serialize");
        out.push(b':');
        write_canonical(value, out);
    }
    out.push(b'}');
    at
}

fn into_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("serde_json writes UTF-8")
}

pub fn hash_of(record_without_hash: &Value) -> String {
    hex::encode(Sha256::digest(canonical(record_without_hash).as_bytes()))
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
    pub fn seal(&mut self, mut record: Value) -> String {
        let map = record.as_object_mut().expect("audit records are JSON objects");
        map.remove("hash");
        map.insert("seq".to_string(), Value::from(self.seq));
        map.insert("prev_hash".to_string(), Value::from(std::mem::take(&mut self.prev_hash)));
        let mut out = Vec::with_capacity(1024);
        let at = write_object(map, Some("hash"), &mut out).expect("prev_hash and seq sort after hash");
        let hash = hex::encode(Sha256::digest(&out));
        // The same bytes with `"hash":"…",` in its sorted place (hex needs no escaping).
        out.splice(at..at, format!("\"hash\":\"{hash}\",").into_bytes());
        self.seq += 1;
        self.prev_hash = hash;
        into_string(out)
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
        let is_pruning = map.get("type").and_then(Value::as_str) == Some("audit.pruned");
        if map.get("type").and_then(Value::as_str) == Some("audit.pruned")
            && let Some(anchor) = map.get("first_surviving_hash").and_then(Value::as_str)
        {
            self.pruned_anchors.push(anchor.to_string());
        }
        if hash_of(&value) != claimed {
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
