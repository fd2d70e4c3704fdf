//! The documentation's links resolve: every relative link in README.md and docs/*.md names a
//! file or folder that exists, and its `#anchor` (or an in-page `#anchor`) a heading of that
//! Markdown file, by GitHub's rule for heading anchors. Links inside code blocks and code spans
//! are not links; absolute URLs (`https:`, `http:`, `mailto:`) are not checked.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Returns the text without fenced code blocks and with code spans blanked (kept as `x` so a
/// link text made of code still reads as a link).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if fenced {
            out.push('\n');
            continue;
        }
        let mut in_code = false;
        for c in line.chars() {
            match (c, in_code) {
                ('`', _) => in_code = !in_code,
                (_, true) => {}
                (c, false) => out.push(c),
            }
            if c == '`' && !in_code {
                out.push('x');
            }
        }
        out.push('\n');
    }
    out
}

/// Returns the link targets of Markdown prose (`[text](target)`; autolinks `<…>` are absolute).
fn links(prose: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = prose.as_bytes();
    let mut i = 0;
    while let Some(at) = prose[i..].find("](") {
        let start = i + at + 2;
        let end = prose[start..]
            .find([')', ' ', '\n'])
            .map_or(prose.len(), |e| start + e);
        if bytes.get(end) == Some(&b')') || bytes.get(end) == Some(&b' ') {
            found.push(prose[start..end].to_owned());
        }
        i = start;
    }
    found
}

/// Returns the anchors GitHub gives a Markdown file's headings: lowercased, characters other
/// than letters, digits, spaces, `-` and `_` dropped, spaces turned into `-`; a repeated
/// anchor gets `-1`, `-2`, ….
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let mut unique = slug.clone();
        let mut n = 0;
        while seen.contains(&unique) {
            n += 1;
            unique = format!("{slug}-{n}");
        }
        seen.insert(unique);
    }
    seen
}

/// Returns every broken link of the Markdown files, as `file: target (why)`.
fn broken_links(files: &[PathBuf]) -> Vec<String> {
    let mut broken = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("a Markdown file is readable");
        let dir = file.parent().expect("a file has a folder");
        for target in links(&prose(&text)) {
            if ["http:", "https:", "mailto:"]
                .iter()
                .any(|scheme| target.starts_with(scheme))
            {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if resolved.extension().is_some_and(|e| e == "md") {
                let target_text =
                    std::fs::read_to_string(&resolved).expect("a Markdown file is readable");
                if !anchors(&target_text).contains(anchor) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    broken
}

fn documentation() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ is readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    files.extend(pages);
    files
}

#[test]
fn every_relative_link_of_the_documentation_resolves() {
    let files = documentation();
    assert!(
        files.len() >= 12,
        "README.md and the docs/ pages: {files:?}"
    );
    let broken = broken_links(&files);
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}

#[test]
fn every_docs_page_is_linked_from_the_readme() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let linked: HashSet<String> = links(&prose(&readme)).into_iter().collect();
    for page in documentation().iter().skip(1) {
        let name = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        assert!(
            linked
                .iter()
                .any(|l| l == &name || l.starts_with(&format!("{name}#"))),
            "README.md does not link {name}"
        );
    }
}

#[test]
fn the_check_finds_a_missing_file_and_a_missing_heading() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("a.md");
    std::fs::write(
        &page,
        "# A page\n\n## `eventId`: one id per change\n\n\
         [ok](a.md#eventid-one-id-per-change) [ok](#a-page) [`code`](a.md) <https://x.y>\n\
         [gone](b.md) [no heading](a.md#nowhere)\n\
         `[not a link](c.md)`\n```\n[in a block](d.md)\n```\n",
    )
    .unwrap();
    let broken = broken_links(&[page]);
    assert_eq!(broken.len(), 2, "{broken:#?}");
    assert!(broken[0].ends_with("b.md (no such file)"), "{broken:#?}");
    assert!(
        broken[1].ends_with("a.md#nowhere (no such heading)"),
        "{broken:#?}"
    );
}

/// docs/events.md states the `eventId` rule byte by byte; this computes it from that text's
/// recipe and compares with the code, so neither can change alone.
#[test]
fn the_event_id_rule_of_docs_events_md_is_the_code_s() {
    use ibstream::stream::change::event_id;
    use xxhash_rust::xxh3::xxh3_64;
    let documented = |stream: &str, key: &str, previous: Option<u64>, fingerprint: u64| {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(stream.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(0);
        match previous {
            None => bytes.push(0x00),
            Some(p) => {
                bytes.push(0x01);
                bytes.extend_from_slice(&p.to_le_bytes());
            }
        }
        bytes.extend_from_slice(&fingerprint.to_le_bytes());
        format!("{:016x}", xxh3_64(&bytes))
    };
    for (stream, key, previous, fingerprint) in [
        ("leads", "100231", None, 0x1234_5678_9abc_def0),
        ("positions", "mt4-live-01:77001234", Some(7), 8),
        ("transactions", "9", Some(0), 0),
    ] {
        let id = event_id(stream, key, previous, fingerprint);
        assert_eq!(id, documented(stream, key, previous, fingerprint));
        assert_eq!(id.len(), 16);
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
    let events =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/events.md")).unwrap();
    // Lines may wrap anywhere: compare with single spaces.
    let events = events.split_whitespace().collect::<Vec<_>>().join(" ");
    for phrase in [
        "a zero byte, the entity key",
        "`0x00` when there is no previous fingerprint",
        "`0x01` and the previous fingerprint (8 bytes, little-endian)",
        "16 lowercase hex digits",
    ] {
        assert!(
            events.contains(phrase),
            "docs/events.md no longer states: {phrase}"
        );
    }
}
