//! The modules of `src/` stand in layers, and no import runs up them: the CRM side and the
//! Kafka side know nothing of the streams, operations or commands built on them.
//!
//! From the bottom: `config`, `net`, `telemetry`; `crm`, `kafka`; `events`, `sim`; `stream`;
//! `ops`, `state_tool`; `run`; `check`, `demo`; `main`. A module's counters live in the
//! module that counts them and `ops` reads them (`crm::CrmStats`, `kafka::sink::SinkStats`,
//! `stream::poller::StreamStats`); pollers report cursors and cycles through
//! `stream::poller::Report`, which `ops::Registry` implements; fingerprints are computed in
//! `crm::fingerprint`, below both the CRM pages and `stream::change`.
//!
//! The check reads the source text: every `crate::<module>` path outside comments and outside
//! the `#[cfg(test)]` module at a file's end (tests may use the simulator), grouped imports
//! (`use crate::{a::X, b::Y}`) included.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The lower modules, and the modules each may use besides itself.
const ALLOWED: &[(&str, &[&str])] = &[
    ("config", &[]),
    ("net", &[]),
    ("telemetry", &[]),
    ("crm", &["config", "net", "telemetry"]),
    ("kafka", &["config", "net", "telemetry"]),
    // `events tail` reads topics through the Kafka client settings (kafka never imports
    // events: the sink takes encoded bytes).
    ("events", &["config", "net", "telemetry", "crm", "kafka"]),
    ("sim", &["config", "net", "telemetry", "crm"]),
    (
        "stream",
        &["config", "net", "telemetry", "crm", "kafka", "events"],
    ),
];

/// Imports known to run up, each with its file and the module it reaches: the state restore
/// reads the state topic into `stream::state::State` (left for a change of its own: the
/// restore's callers and tests name the type).
const KNOWN: &[(&str, &str)] = &[("src/kafka/restore.rs", "stream")];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).expect("src/ is readable") {
        let path = entry.expect("src/ is readable").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Returns the source without its trailing test module and without `//` comments.
fn code(text: &str) -> String {
    let end = text.find("\n#[cfg(test)]").unwrap_or(text.len());
    text[..end]
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Returns the top modules of `crate` a source text names.
fn modules_used(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut used = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b::{Y, Z}}`: the first name of each top-level member.
            let mut depth = 0;
            let mut member_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => member_start = true,
                    c if member_start && !c.is_whitespace() => {
                        used.insert(ident(&group[i..]));
                        member_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            used.insert(ident(rest));
        }
    }
    used.retain(|m| !m.is_empty());
    used
}

/// Returns every import of `src/` that runs up the layers, as `file -> module`.
fn upward_imports(src: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for (module, allowed) in ALLOWED {
        let dir = src.join(module);
        let root = if dir.is_dir() {
            dir
        } else {
            src.join(format!("{module}.rs"))
        };
        for file in rust_files(&root) {
            let text = std::fs::read_to_string(&file).expect("a source file is readable");
            let shown = file
                .strip_prefix(src.parent().expect("src/ has a parent"))
                .unwrap_or(&file)
                .display()
                .to_string();
            for used in modules_used(&code(&text)) {
                let ok = used == *module
                    || allowed.contains(&used.as_str())
                    || KNOWN.contains(&(shown.as_str(), used.as_str()));
                if !ok {
                    found.push(format!("{shown} -> crate::{used}"));
                }
            }
        }
    }
    found
}

#[test]
fn no_import_runs_up_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = upward_imports(&src);
    assert!(
        found.is_empty(),
        "imports that run up the layers (see tests/layers.rs): {found:#?}"
    );
}

#[test]
fn the_check_sees_plain_grouped_and_nested_imports_but_not_comments_or_tests() {
    let text = "use crate::config::Config;\n\
                use crate::{ops::CrmStats,\n    stream::{change::Reading, state::State}};\n\
                // crate::run in a comment\n\
                fn f() { crate::net::client_builder(); }\n\
                #[cfg(test)]\nmod tests { use crate::sim::Kind; }\n";
    let used: Vec<String> = modules_used(&code(text)).into_iter().collect();
    assert_eq!(used, ["config", "net", "ops", "stream"]);
}
