//! The crate's module graph, read from `src/`: no import circle among modules, and the layering
//! rules the design relies on (the FFI layer never imports the statistics it feeds).
//!
//! Nodes are modules (one per file: `src/a/mod.rs` and `src/a.rs` are `a`, `src/a/b.rs` is
//! `a::b`; inline `mod x { … }` blocks belong to their file). An edge `A → B` is a path that
//! names B from A: a `use crate::…`/`use super::…`/`use self::…` statement (groups expanded) or a
//! `crate::…`/`super::…` path in code, resolved to the deepest module it names. Edges from a
//! module to its own descendants are containment (`mod x;`, `pub use x::Item;`), not
//! dependency, and are left out; a child naming its parent's items counts. Comments are skipped;
//! macros, `#[path]` and glob re-exports are not followed. Each crate root (`src/lib.rs`,
//! `src/main.rs`, `src/bin/*.rs`, `src/bin/*/main.rs`) is its own graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The crate roots under `src/`, each with the directory its modules live in.
fn crate_roots(src: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut roots = Vec::new();
    for f in ["lib.rs", "main.rs"] {
        if src.join(f).is_file() {
            roots.push((src.join(f), src.to_path_buf()));
        }
    }
    if let Ok(rd) = std::fs::read_dir(src.join("bin")) {
        let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            if p.extension().is_some_and(|e| e == "rs") {
                // a single-file binary: its modules would sit beside it, which we do not model
                roots.push((p.clone(), PathBuf::new()));
            } else if p.join("main.rs").is_file() {
                roots.push((p.join("main.rs"), p.clone()));
            }
        }
    }
    roots
}

/// Module files below `dir` (the root file's directory), by module path; `src/bin` is a
/// crate of its own and is left out of the library's tree.
fn module_files(root: &Path, dir: &Path, src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    out.insert(Vec::new(), root.to_path_buf());
    if dir.as_os_str().is_empty() {
        return out;
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if d == src && p.file_name().is_some_and(|n| n == "bin") {
                    continue;
                }
                stack.push(p);
                continue;
            }
            if p == root || p.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            if d == src && p.file_name().is_some_and(|n| n == "main.rs" || n == "lib.rs") {
                continue;
            }
            let rel = p.strip_prefix(dir).expect("below dir");
            let mut m: Module = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
            let last = m.pop().expect("a file name");
            if last != "mod.rs" {
                m.push(last.trim_end_matches(".rs").to_owned());
            }
            out.insert(m, p);
        }
    }
    out
}

/// The line without its `//` comment (a `//` inside a string literal is kept).
fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        i += 1;
    }
    line
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Expands a use tree (`a::{b, c::{d, self}}`, without `use` and `;`) into paths.
fn expand(tree: &str) -> Vec<Vec<String>> {
    fn go(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
        let s = s.trim();
        if s.is_empty() {
            return;
        }
        if let Some(open) = s.find('{') {
            let head: Vec<String> = s[..open].split("::").map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect();
            let inner = &s[open + 1..s.rfind('}').unwrap_or(s.len())];
            let mut p = prefix.to_vec();
            p.extend(head);
            // split at top-level commas
            let (mut depth, mut start) = (0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        go(&p, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            go(&p, &inner[start..], out);
        } else {
            let s = s.split(" as ").next().unwrap_or(s);
            let mut p = prefix.to_vec();
            p.extend(s.split("::").map(str::trim).filter(|x| !x.is_empty() && *x != "self" && *x != "*").map(String::from));
            if s.trim() == "self" || s.trim() == "*" || !p.is_empty() {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    go(&[], tree, &mut out);
    out
}

/// The module a path names from module `here` (`inline`: the inline modules around the use),
/// or `None` for another crate.
fn resolve(path: &[String], here: &Module, inline: &[String], modules: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    let mut base: Module = here.iter().chain(inline).cloned().collect();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &path[1..];
        }
        Some("super") | Some("self") => {
            while let Some(s) = rest.first() {
                match s.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        Some(first) => {
            // a bare path: a child module of the current one, else another crate
            let mut child = base.clone();
            child.push(first.to_owned());
            if !modules.contains_key(&child) {
                return None;
            }
        }
        None => return None,
    }
    let mut target = base;
    // inline module names are not files: fall back to the deepest file module
    while !modules.contains_key(&target) {
        target.pop();
    }
    for seg in rest {
        let mut next = target.clone();
        next.push(seg.clone());
        if modules.contains_key(&next) {
            target = next;
        } else {
            break;
        }
    }
    Some(target)
}

/// `from → to` edges of one crate, with the first line that made each.
fn edges(modules: &BTreeMap<Module, PathBuf>) -> BTreeMap<(Module, Module), String> {
    let mut out = BTreeMap::new();
    for (here, file) in modules {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut inline: Vec<(usize, String)> = Vec::new();
        let mut pending: Option<String> = None;
        let mut add = |path: &[String], inline: &[(usize, String)], line: &str| {
            let names: Vec<String> = inline.iter().map(|(_, n)| n.clone()).collect();
            if let Some(to) = resolve(path, here, &names, modules) {
                if !to.starts_with(here) {
                    out.entry((here.clone(), to)).or_insert_with(|| format!("{}: {}", file.display(), line.trim()));
                }
            }
        };
        for raw in text.lines() {
            let line = strip_comment(raw);
            let indent = line.len() - line.trim_start().len();
            let t = line.trim();
            if t == "}" && inline.last().is_some_and(|(i, _)| *i == indent) {
                inline.pop();
                continue;
            }
            let decl = t.trim_start_matches("pub(crate) ").trim_start_matches("pub(super) ").trim_start_matches("pub ");
            if let Some(rest) = decl.strip_prefix("mod ") {
                if let Some(n) = rest.strip_suffix('{') {
                    inline.push((indent, n.trim().to_owned()));
                    continue;
                }
            }
            // use statements, possibly over several lines
            if pending.is_none() && decl.starts_with("use ") {
                pending = Some(String::new());
            }
            if let Some(p) = pending.as_mut() {
                p.push_str(t);
                p.push(' ');
                if t.ends_with(';') {
                    let stmt = pending.take().expect("pending");
                    let tree = stmt.trim().trim_end_matches(';');
                    let tree = tree.split_once("use ").map_or("", |(_, r)| r);
                    for path in expand(tree) {
                        add(&path, &inline, raw);
                    }
                }
                continue;
            }
            // crate::… and super::… paths in code
            for key in ["crate::", "super::"] {
                let mut from = 0;
                while let Some(i) = t[from..].find(key) {
                    let at = from + i;
                    from = at + key.len();
                    let before = t[..at].chars().next_back();
                    if before.is_some_and(|c| is_ident(c) || c == ':' || c == '$') {
                        continue;
                    }
                    let end = t[at..].find(|c: char| !(is_ident(c) || c == ':')).map_or(t.len(), |e| at + e);
                    let path: Vec<String> = t[at..end].split("::").filter(|s| !s.is_empty()).map(String::from).collect();
                    add(&path, &inline, raw);
                }
            }
        }
    }
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(nodes: &BTreeSet<Module>, edges: &BTreeMap<(Module, Module), String>) -> Vec<Vec<Module>> {
    let idx: BTreeMap<&Module, usize> = nodes.iter().enumerate().map(|(i, m)| (m, i)).collect();
    let list: Vec<&Module> = nodes.iter().collect();
    let mut adj = vec![Vec::new(); list.len()];
    for (a, b) in edges.keys() {
        adj[idx[a]].push(idx[b]);
    }
    struct T {
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn visit(v: usize, adj: &[Vec<usize>], t: &mut T) {
        t.index[v] = Some(t.next);
        t.low[v] = t.next;
        t.next += 1;
        t.stack.push(v);
        t.on[v] = true;
        for &w in &adj[v] {
            match t.index[w] {
                None => {
                    visit(w, adj, t);
                    t.low[v] = t.low[v].min(t.low[w]);
                }
                Some(iw) if t.on[w] => t.low[v] = t.low[v].min(iw),
                _ => {}
            }
        }
        if Some(t.low[v]) == t.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                t.out.push(scc);
            }
        }
    }
    let n = list.len();
    let mut t = T { index: vec![None; n], low: vec![0; n], on: vec![false; n], stack: Vec::new(), next: 0, out: Vec::new() };
    for v in 0..n {
        if t.index[v].is_none() {
            visit(v, &adj, &mut t);
        }
    }
    t.out.into_iter().map(|s| s.into_iter().map(|i| list[i].clone()).collect()).collect()
}

struct Graph {
    root: PathBuf,
    modules: BTreeMap<Module, PathBuf>,
    edges: BTreeMap<(Module, Module), String>,
}

fn graphs() -> Vec<Graph> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    crate_roots(&src)
        .into_iter()
        .map(|(root, dir)| {
            let modules = module_files(&root, &dir, &src);
            let edges = edges(&modules);
            Graph { root, modules, edges }
        })
        .collect()
}

#[test]
fn no_import_cycle_among_modules() {
    let mut report = String::new();
    for g in graphs() {
        let nodes: BTreeSet<Module> = g.modules.keys().cloned().collect();
        for scc in cycles(&nodes, &g.edges) {
            let set: BTreeSet<&Module> = scc.iter().collect();
            let names: Vec<String> = scc.iter().map(|m| name(m)).collect();
            report.push_str(&format!("{}: cycle among {{{}}}\n", g.root.display(), names.join(", ")));
            for ((a, b), at) in &g.edges {
                if set.contains(a) && set.contains(b) {
                    report.push_str(&format!("    {} → {}   ({at})\n", name(a), name(b)));
                }
            }
        }
    }
    assert!(report.is_empty(), "import cycles:\n{report}");
}

/// The FFI layer hands what it reads to a trait it defines (`llama::sink::AttentionSink`); the
/// statistics implement it. `src/llama/**` therefore never names the statistics.
#[test]
fn llama_does_not_import_the_statistics() {
    let mut bad = Vec::new();
    for g in graphs().iter().filter(|g| g.root.ends_with("lib.rs")) {
        for ((a, b), at) in &g.edges {
            let from_llama = a.first().is_some_and(|s| s == "llama");
            let to_stats = b.first().is_some_and(|s| s == "stats" || s == "observe");
            if from_llama && to_stats {
                bad.push(format!("{} → {}   ({at})", name(a), name(b)));
            }
        }
    }
    assert!(bad.is_empty(), "llama/ imports the statistics:\n{}", bad.join("\n"));
}

#[test]
fn the_parser_reads_use_trees_and_resolves_paths() {
    assert_eq!(
        expand("crate::a::{self, b::{C, d}, E as F}"),
        vec![vec!["crate", "a"], vec!["crate", "a", "b", "C"], vec!["crate", "a", "b", "d"], vec!["crate", "a", "E"]]
    );
    assert_eq!(expand("super::*"), vec![vec!["super"]]);
    assert_eq!(strip_comment(r#"let s = "a // b"; // c"#), r#"let s = "a // b"; "#);
    let m = |s: &str| -> Module { if s.is_empty() { Vec::new() } else { s.split("::").map(String::from).collect() } };
    let modules: BTreeMap<Module, PathBuf> = ["", "engine", "engine::session", "engine::event", "stats"].iter().map(|s| (m(s), PathBuf::new())).collect();
    let p = |s: &str| -> Vec<String> { s.split("::").map(String::from).collect() };
    let here = m("engine::session");
    assert_eq!(resolve(&p("super::event::Event"), &here, &[], &modules), Some(m("engine::event")));
    assert_eq!(resolve(&p("super::Engine"), &here, &[], &modules), Some(m("engine")));
    assert_eq!(resolve(&p("crate::stats::Rows"), &here, &[], &modules), Some(m("stats")));
    // `use super::*` inside `mod tests { … }` is the file itself
    assert_eq!(resolve(&p("super"), &here, &["tests".into()], &modules), Some(here.clone()));
    assert_eq!(resolve(&p("std::time::Instant"), &here, &[], &modules), None);
}

/// `cargo test --test architecture -- --ignored --nocapture`: the module graph, one edge a line.
#[test]
#[ignore = "prints the graph"]
fn print_module_graph() {
    for g in graphs() {
        println!("# {}", g.root.display());
        for (a, b) in g.edges.keys() {
            println!("{} → {}", name(a), name(b));
        }
    }
}

/// A desktop app loads the engine once and shares it across worker threads.
#[test]
fn the_engine_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<csp_llava::Engine>();
    send_sync::<csp_llava::CancelHandle>();
}

/// llama.cpp's Rust bindings are named only behind the facade (`src/llama/`, and the C ABI in
/// `src/capi/`): everything else talks to `crate::llama`'s own types, so a change of bindings
/// or of llama.cpp's API touches one folder.
#[test]
fn only_the_llama_facade_names_the_bindings() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    let mut offenders = Vec::new();
    let mut seen = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(&src).unwrap().to_path_buf();
            if p.is_dir() {
                if rel != Path::new("llama") && rel != Path::new("capi") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&p).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = strip_comment(line);
                if code.contains("llama_cpp_2") || code.contains("llama_cpp_sys_2") {
                    offenders.push(format!("src/{}:{}: {}", rel.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(seen > 20, "read {seen} files: wrong folder?");
    assert!(offenders.is_empty(), "llama-cpp-2 named outside src/llama:\n{}", offenders.join("\n"));
}

/// Contexts own their model (an `Arc`), so sessions and contexts can be stored next to the
/// engine and moved to worker threads.
#[test]
fn contexts_are_send() {
    fn send<T: Send>() {}
    send::<csp_llava::llama::Context>();
    send::<csp_llava::llama::Mtmd>();
    send::<csp_llava::llama::Model>();
}

/// A session made from an `Arc<Engine>` is `'static` and `Send`: an app keeps it in its state
/// (a chat) and hands it to a worker thread.
#[test]
fn shared_sessions_are_send() {
    fn send<T: Send + 'static>() {}
    send::<csp_llava::engine::Session<'static>>();
}
