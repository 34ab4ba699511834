//! Reading the trail back: which files form a chain, a lazy line-by-line record iterator (files
//! are never loaded whole), `verify`, and filtered, paged queries.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use super::chain::{Break, Verifier};
use super::sink::chain_files;

/// Expands paths into chain files in order: a directory gives every chain in it, an active file
/// gives its rotated files too, and a rotated file gives itself.
pub fn expand(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for path in paths {
        if path.is_dir() {
            let actives: BTreeSet<PathBuf> = std::fs::read_dir(path)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
                .map(|p| active_of(&p))
                .collect();
            for active in actives {
                chain_files(&active).into_iter().for_each(&mut push);
            }
        } else if active_of(path) == *path {
            chain_files(path).into_iter().for_each(&mut push);
        } else {
            push(path.clone());
        }
    }
    out
}

/// `x.20261123T220500123Z.jsonl` → `x.jsonl`; an active file maps to itself.
fn active_of(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() == 3 && parts[1].len() == 19 && parts[1].ends_with('Z') {
        path.with_file_name(format!("{}.{}", parts[0], parts[2]))
    } else {
        path.to_path_buf()
    }
}

/// One line of the trail.
pub struct Line {
    pub file: String,
    pub number: usize,
    pub text: String,
}

/// Every line of `files`, in order, read lazily.
pub fn lines(files: &[PathBuf]) -> impl Iterator<Item = std::io::Result<Line>> + '_ {
    files.iter().flat_map(|path| {
        let name = path.display().to_string();
        let reader: Box<dyn Iterator<Item = std::io::Result<String>>> = match File::open(path) {
            Ok(file) => Box::new(BufReader::new(file).lines()),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        reader.enumerate().map(move |(i, text)| text.map(|text| Line { file: name.clone(), number: i + 1, text }))
    })
}

/// Parsed records of `files`, skipping unparseable lines (verify reports those).
pub fn records(files: &[PathBuf]) -> impl Iterator<Item = Value> + '_ {
    lines(files).filter_map(|l| l.ok()).filter_map(|l| serde_json::from_str(&l.text).ok())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub records: u64,
}

/// Checks the whole chain across `files`; the first broken place, or what was verified.
pub fn verify(files: &[PathBuf]) -> Result<Verified, Break> {
    let mut verifier = Verifier::new();
    for line in lines(files) {
        let line = line.map_err(|e| Break { file: "?".to_string(), line: 0, seq: None, reason: e.to_string() })?;
        verifier.check_line(&line.file, line.number, &line.text)?;
    }
    verifier.finish()?;
    Ok(Verified { files: files.len(), records: verifier.records })
}

pub fn timestamp(record: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(record.get("timestamp")?.as_str()?).ok()
}

/// Filters for the admin query API; every field is optional.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    pub agent: Option<String>,
    pub credential: Option<String>,
    pub decision: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// RFC 3339 timestamps, or a duration ago such as `7d` or `90m`.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Return records with `seq` greater than this (the previous page's `next_after_seq`).
    pub after_seq: Option<u64>,
    pub limit: Option<usize>,
}

/// An RFC 3339 time, or a duration before now (`7d`, `12h`, `30m`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("'{text}' is neither an RFC 3339 time nor a duration like 7d"))?;
    Ok(SystemTime::now() - ago)
}

#[derive(Debug, Serialize)]
pub struct Page {
    pub records: Vec<Value>,
    /// Pass as `after_seq` to get the next page; absent on the last page.
    pub next_after_seq: Option<u64>,
}

pub const MAX_PAGE: usize = 1000;

pub fn query(files: &[PathBuf], filter: &Filter) -> Result<Page, String> {
    let since = filter.since.as_deref().map(parse_time).transpose()?;
    let until = filter.until.as_deref().map(parse_time).transpose()?;
    let limit = filter.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let field = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
    let mut matched = records(files)
        .filter(|r| {
            filter.after_seq.is_none_or(|after| r.get("seq").and_then(Value::as_u64).is_some_and(|s| s > after))
        })
        .filter(|r| filter.agent.as_ref().is_none_or(|a| field(r, "agentId").as_ref() == Some(a)))
        .filter(|r| filter.credential.as_ref().is_none_or(|c| field(r, "credential").as_ref() == Some(c)))
        .filter(|r| filter.decision.as_ref().is_none_or(|d| field(r, "decision").as_ref() == Some(d)))
        .filter(|r| filter.kind.as_ref().is_none_or(|k| field(r, "type").as_ref() == Some(k)))
        .filter(|r| since.is_none_or(|s| timestamp(r).is_some_and(|t| t >= s)))
        .filter(|r| until.is_none_or(|u| timestamp(r).is_some_and(|t| t <= u)));
    let records: Vec<Value> = matched.by_ref().take(limit).collect();
    let more = matched.next().is_some();
    let next_after_seq = if more { records.last().and_then(|r| r.get("seq")).and_then(Value::as_u64) } else { None };
    Ok(Page { records, next_after_seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::ChainHead;
    use serde_json::json;

    fn trail(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let mut head = ChainHead::genesis();
        let text: String = (0..n)
            .map(|i| {
                let agent = if i % 2 == 0 { "a" } else { "b" };
                head.seal(json!({ "type": "request", "agentId": agent, "decision": "allowed", "timestamp": "2026-11-23T10:00:00Z" })) + "\n"
            })
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn queries_filter_and_page_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let files = expand(&[trail(dir.path(), 25)]);
        let filter = Filter { agent: Some("a".into()), limit: Some(5), ..Filter::default() };
        let page = query(&files, &filter).unwrap();
        assert_eq!(page.records.len(), 5);
        assert_eq!(page.next_after_seq, Some(8));
        let page2 = query(&files, &Filter { after_seq: page.next_after_seq, ..filter.clone() }).unwrap();
        assert_eq!(page2.records[0]["seq"], 10);
        let last = query(&files, &Filter { after_seq: Some(20), ..filter }).unwrap();
        assert_eq!(last.records.len(), 2);
        assert_eq!(last.next_after_seq, None);
        assert!(query(&files, &Filter { since: Some("yesterday-ish".into()), ..Filter::default() }).is_err());
    }

    #[test]
    fn directories_expand_to_their_chains() {
        let dir = tempfile::tempdir().unwrap();
        let active = trail(dir.path(), 3);
        std::fs::copy(&active, dir.path().join("audit.20261101T000000000Z.jsonl")).unwrap();
        let files = expand(&[dir.path().to_path_buf()]);
        assert_eq!(files.len(), 2);
        assert_eq!(files[1], active);
        assert_eq!(verify(std::slice::from_ref(&active)).unwrap().records, 3);
    }
}
