//! The documentation's links: every relative link in README.md, SECURITY.md and docs/ names a
//! file in the repository and, with `#anchor`, a heading in it; no link leaves the repository.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The anchors GitHub gives a Markdown file's headings (code fences skipped).
fn anchors(text: &str) -> HashSet<String> {
    let mut fence = false;
    let mut found = HashSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fence = !fence;
        }
        if fence || !line.starts_with('#') {
            continue;
        }
        let heading = line.trim_start_matches('#').trim().to_lowercase();
        let slug: String = heading
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        found.insert(slug);
    }
    found
}

/// `[label](target)` links outside code fences and inline code.
fn links(text: &str) -> Vec<String> {
    let mut fence = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fence = !fence;
            continue;
        }
        if fence {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            let target = &after[..end];
            if !target.contains(' ') {
                out.push(target.to_string());
            }
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_documentation_link_resolves_inside_the_repository() {
    let mut pages: Vec<PathBuf> = vec![repo_root().join("README.md"), repo_root().join("SECURITY.md")];
    if let Ok(entries) = std::fs::read_dir(repo_root().join("docs")) {
        pages.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "md")));
    }
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in links(&text) {
            assert!(
                !target.starts_with("http://") && !target.starts_with("https://"),
                "{} links outside the repository: {target}",
                page.display()
            );
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            assert!(resolved.exists(), "{}: the link {target} names no file", page.display());
            if !anchor.is_empty() {
                let text = std::fs::read_to_string(&resolved).unwrap();
                assert!(anchors(&text).contains(anchor), "{}: the link {target} names no heading", page.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} links checked");
}
