//! The SDK's source layout rules, checked on its own source:
//! - no file over 800 lines (a file a reader can hold);
//! - no import circle among the crate's top-level modules: `owner`,
//!   `worker`, `core`, `actor`, ... depend on each other in one direction
//!   only (the crate root, which composes them, imports all and is
//!   imported by none);
//! - the owner's state machines (`owner`) import no module that does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LINES_MAX: usize = 800;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a source file belongs to (`lib` for the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel
        .components()
        .next()
        .expect("a component")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The names a line of code reaches through `crate::`: `crate::a::b` gives
/// `a`, `crate::{a, b::c}` gives `a` and `b`. Comments are skipped.
fn crate_paths(code: &str) -> Vec<String> {
    let code = code.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
        rest = after;
    }
    out
}

#[test]
fn no_source_file_is_over_800_lines() {
    let mut files = Vec::new();
    sources(&src_dir(), &mut files);
    assert!(files.len() > 10, "found the sources: {files:?}");
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).expect("read").lines().count();
            (lines > LINES_MAX).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {LINES_MAX} lines: {long:?}");
}

#[test]
fn the_top_level_modules_import_each_other_in_one_direction_only() {
    let src = src_dir();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    // Module -> the modules it imports, with one place each does.
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let text = std::fs::read_to_string(file).expect("read");
        for (n, line) in text.lines().enumerate() {
            for name in crate_paths(line) {
                // A name that is no module is an item of the crate root.
                let to = if modules.contains(&name) {
                    name
                } else {
                    "lib".to_string()
                };
                if to != from {
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_insert_with(|| format!("{}:{}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        edges.get("core").is_some_and(|e| e.contains_key("owner")),
        "the scan sees core's imports: {:?}",
        edges.get("core")
    );
    // The owner's state machines do no I/O: they import none of the
    // modules that hold connections, runtimes or user handles.
    let io = [
        "core",
        "worker",
        "rt",
        "process",
        "driver",
        "actor",
        "object_ref",
        "local",
        "client",
        "lib",
    ];
    let owner: Vec<_> = edges
        .get("owner")
        .into_iter()
        .flatten()
        .filter(|(to, _)| io.contains(&to.as_str()))
        .collect();
    assert!(owner.is_empty(), "owner imports I/O modules: {owner:?}");
    // Depth-first search for a cycle, reported with the lines that make it.
    fn visit(
        at: &str,
        edges: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == at) {
            let mut cycle = path[start..].to_vec();
            cycle.push(at.to_string());
            return Some(cycle);
        }
        if done.contains(at) {
            return None;
        }
        path.push(at.to_string());
        for next in edges.get(at).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(at.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for module in &modules {
        if let Some(cycle) = visit(module, &edges, &mut Vec::new(), &mut done) {
            let lines: Vec<&String> = cycle.windows(2).map(|w| &edges[&w[0]][&w[1]]).collect();
            panic!("import circle {cycle:?}, at {lines:?}");
        }
    }
}

#[test]
fn the_scan_reads_grouped_and_plain_paths() {
    assert_eq!(
        crate_paths("use crate::{core, worker::Executor}; // crate::lib"),
        vec!["core", "worker"]
    );
    assert_eq!(crate_paths("let x = crate::rt::runtime();"), vec!["rt"]);
}
