//! The module structure is part of the design: this test fails when it decays.
//!
//! Within each crate, the top-level modules (`src/x.rs` or `src/x/`) must not import each other
//! in a cycle, and the data plane's modules must import only modules of lower layers, in the
//! order ARCHITECTURE.md draws. Imports are read from the source: every `crate::name` path,
//! grouped `use crate::{a, b}` included, with names re-exported at the crate root resolved to
//! the module that defines them. Test code is left out (everything from a file's first
//! `#[cfg(test)]`, and the test-only `testing` helpers): a test may use any helper.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// safelb-proxy, lowest layer first: a module may import only modules of earlier layers.
const PROXY_LAYERS: &[&[&str]] = &[
    // Leaves: no import inside the crate.
    &["worker", "transport"],
    &["clock", "error", "headers", "stats", "failures", "tls", "role", "body"],
    // h1 reads which fields are hop-by-hop from `headers`.
    &["access_log", "backend", "hedge", "ratelimit", "samples", "h1"],
    &["metrics", "client_io", "upstream"],
    &["balance", "health", "registry", "actions"],
    &["snapshot"],
    &["shadow"],
    &["handle"],
    &["proxy", "exposition"],
    &["server", "fuzzing"],
];

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("source directory is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Source text without its tests and without `//` comments (doc links name modules without
/// importing them).
fn code(text: &str) -> String {
    uncommented(text.split("#[cfg(test)]").next().unwrap_or(""))
}

fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| line.find("//").map_or(line, |i| &line[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    (end > 0).then(|| &s[..end])
}

/// The first path segment of every item named in `crate::{...}`, given the text after `{`.
fn group(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.extend(ident(&s[start..i]));
                return out;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.extend(ident(&s[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// Every name that follows `crate::` in `text`.
fn crate_paths(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `safelb_crate::`, not this crate.
        }
        match rest.strip_prefix('{') {
            Some(inner) => out.extend(group(inner)),
            None => out.extend(ident(rest)),
        }
    }
    out
}

/// Which module defines each name re-exported at the crate root (`pub use module::{A, B}`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    // The whole of lib.rs: a `#[cfg(test)] mod testing;` may come before the re-exports.
    for stmt in uncommented(lib).split(';') {
        let Some(path) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        let names = match items.strip_prefix('{') {
            Some(inner) => group(inner),
            None => items.rsplit("::").next().and_then(ident).into_iter().collect(),
        };
        for name in names {
            out.insert(name.to_string(), module.to_string());
        }
    }
    out
}

/// Module -> the modules it imports, for one crate.
fn imports(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = crates_dir().join(krate).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let module_of = |path: &Path| -> String {
        let rel = path.strip_prefix(&src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("non-empty")
            .as_os_str()
            .to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files
        .iter()
        .map(|p| module_of(p))
        .filter(|m| m != "lib" && m != "main" && m != "testing")
        .collect();
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let reexported = reexports(&lib);
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let from = module_of(file);
        if !modules.contains(&from) {
            continue;
        }
        let text = code(&fs::read_to_string(file).expect("source is readable"));
        for name in crate_paths(&text) {
            let to = if modules.contains(name) {
                Some(name.to_string())
            } else {
                reexported.get(name).cloned()
            };
            if let Some(to) = to.filter(|to| *to != from) {
                graph.get_mut(&from).expect("known module").insert(to);
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn no_crate_has_a_module_cycle() {
    for krate in [
        "safelb-config",
        "safelb-proxy",
        "safelb-control",
        "safelb",
        "safelb-testkit",
    ] {
        let graph = imports(krate);
        assert!(
            graph.len() > 1 || krate == "safelb-testkit",
            "{krate}: found no modules"
        );
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate} has a module cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_data_plane_imports_only_lower_layers() {
    let graph = imports("safelb-proxy");
    let layer = |m: &str| PROXY_LAYERS.iter().position(|l| l.contains(&m));
    let mut problems = Vec::new();
    for (from, tos) in &graph {
        let Some(from_layer) = layer(from) else {
            problems.push(format!(
                "module `{from}` has no layer: add it to PROXY_LAYERS (and ARCHITECTURE.md)"
            ));
            continue;
        };
        for to in tos {
            match layer(to) {
                Some(l) if l < from_layer => {}
                _ => problems.push(format!(
                    "`{from}` (layer {from_layer}) imports `{to}`, which is not below it"
                )),
            }
        }
    }
    assert!(problems.is_empty(), "safelb-proxy layering:\n{}", problems.join("\n"));
}

#[test]
fn the_import_reader_sees_grouped_reexported_and_qualified_paths() {
    let text = code(
        "use crate::a::X;\nuse crate::{b::{Y, Z}, c};\nfn f() { crate::d::g(); safelb_crate::e(); }\n// crate::f\n",
    );
    assert_eq!(crate_paths(&text), vec!["a", "b", "c", "d"]);
    let lib = "pub use handle::{Canary, ProxyHandle};\npub use role::Role;\n";
    let map = reexports(lib);
    assert_eq!(map.get("ProxyHandle").map(String::as_str), Some("handle"));
    assert_eq!(map.get("Role").map(String::as_str), Some("role"));
    let mut cyclic = BTreeMap::new();
    cyclic.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    cyclic.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycle(&cyclic), Some(vec!["a".into(), "b".into(), "a".into()]));
}
