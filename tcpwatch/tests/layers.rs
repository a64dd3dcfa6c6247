//! The layer rule (docs/architecture.md), checked on the source: which top-level module may
//! import which, `model` free of I/O, clocks and process globals, and no import cycle
//! between files. A forbidden import fails here, so the rule stays true.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the modules it may import (itself always; the unit tests' shared
/// fixtures, `testkit`, everywhere).
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("source", &["model"]),
    ("ebpf", &["model"]),
    ("output", &["model"]),
    ("cli", &["model"]),
    // Build-time helpers (the packages' completions and man pages): the command line only.
    ("bin", &["cli"]),
    ("settings", &["cli", "model", "ebpf", "source"]),
    ("session", &["model", "source", "ebpf", "settings"]),
    ("server", &["model", "output"]),
    ("recorder", &["model"]),
    (
        "daemon",
        &[
            "model", "source", "ebpf", "settings", "session", "recorder", "server", "output",
        ],
    ),
    (
        "cmd",
        &[
            "cli", "model", "source", "ebpf", "output", "settings", "session", "server",
            "recorder", "daemon",
        ],
    ),
];

/// What `model` must never touch: I/O, clocks, the process, globals.
const MODEL_FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::io::stdin",
    "std::io::stdout",
    "std::io::stderr",
    "std::net::TcpStream",
    "std::net::UdpSocket",
    "std::process",
    "std::env",
    "std::thread",
    "Instant::now",
    "SystemTime",
    "clock_gettime",
    "OnceLock",
    "LazyLock",
    "thread_local!",
    "static mut",
    "Mutex",
    "println!",
    "eprintln!",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `model/findings/mod.rs` → [model, findings].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The code of a file without its inline test modules (`#[cfg(test)] mod x { .. }`): tests
/// may reach across layers, the architecture is what ships.
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let Some(m) = rest.find("mod ") else { break };
        let brace = rest[m..].find(['{', ';']).map(|b| m + b);
        match brace {
            Some(b) if rest.as_bytes()[b] == b'{' && !rest[12..m].contains(['{', ';']) => {
                let mut depth = 0;
                let mut end = rest.len();
                for (k, c) in rest[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                out.replace_range(at..at + end, "");
            }
            // `#[cfg(test)] mod tests;` or an attribute on something else: drop the attribute.
            _ => out.replace_range(at..at + 12, ""),
        }
    }
    out
}

/// Code without comments and string literals (a path in a doc comment is no import).
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"'.
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every path this code names that starts at `crate::`, `super::` or a child module, made
/// absolute (a `use a::{b, c}` group counts as `a`).
fn referenced(code: &str, here: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && (ident(bytes[i - 1]) || bytes[i - 1] == b':')) {
            i += 1;
            continue;
        }
        // A path starting here: segments joined by `::`.
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < bytes.len() && ident(bytes[j]) {
                j += 1;
            }
            segs.push(code[s..j].to_string());
            if code[j..].starts_with("::") && j + 2 < bytes.len() && ident(bytes[j + 2]) {
                j += 2;
            } else {
                break;
            }
        }
        i = j.max(i + 1);
        // `use a::{b, c::d}` names `a::b` and `a::c::d`; `use a::*` names module `a`.
        let mut paths = Vec::new();
        if code[j..].starts_with("::{") {
            let end = code[j..].find('}').map_or(code.len(), |e| j + e);
            for item in code[j + 3..end].split(',') {
                let item = item.trim().split(" as ").next().unwrap_or("").trim();
                if item.is_empty() || item == "self" {
                    paths.push(segs.clone());
                    continue;
                }
                let mut p = segs.clone();
                p.extend(item.split("::").map(|x| x.trim().to_string()));
                paths.push(p);
            }
        } else if code[j..].starts_with("::*") || segs.len() > 1 {
            paths.push(segs);
        }
        for segs in paths {
            if let Some(abs) = absolute(&segs, here, children) {
                out.push(abs);
            }
        }
    }
    out
}

/// `segs` made absolute from module `here`, if it is a path into this crate.
fn absolute(segs: &[String], here: &[String], children: &BTreeSet<String>) -> Option<Vec<String>> {
    Some(match segs[0].as_str() {
        "crate" => segs[1..].to_vec(),
        "super" => {
            let mut base = here.to_vec();
            let mut k = 0;
            while segs.get(k).is_some_and(|s| s == "super") {
                base.pop();
                k += 1;
            }
            base.extend(segs[k..].iter().cloned());
            base
        }
        "self" => {
            let mut base = here.to_vec();
            base.extend(segs[1..].iter().cloned());
            base
        }
        s if children.contains(s) => {
            let mut base = here.to_vec();
            base.extend(segs.iter().cloned());
            base
        }
        _ => return None,
    })
}

struct Tree {
    /// Module path → file (relative to src).
    modules: BTreeMap<Vec<String>, PathBuf>,
    /// File → its code.
    code: BTreeMap<PathBuf, String>,
}

fn tree() -> Tree {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let mut modules = BTreeMap::new();
    let mut code_of = BTreeMap::new();
    for f in all {
        let rel = f.strip_prefix(src()).unwrap().to_path_buf();
        if rel == Path::new("main.rs") {
            continue;
        }
        // Test-only files are no part of the architecture.
        if rel.file_name().is_some_and(|n| n == "tests.rs") || rel == Path::new("testkit.rs") {
            continue;
        }
        modules.insert(module_of(&rel), rel.clone());
        code_of.insert(
            rel,
            without_tests(&code(&std::fs::read_to_string(&f).unwrap())),
        );
    }
    Tree {
        modules,
        code: code_of,
    }
}

impl Tree {
    /// The file that defines what `path` names: the longest module prefix that is a file.
    fn file_of(&self, path: &[String]) -> Option<&PathBuf> {
        (1..=path.len())
            .rev()
            .find_map(|n| self.modules.get(&path[..n]))
    }

    fn children(&self, module: &[String]) -> BTreeSet<String> {
        self.modules
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .map(|m| m[module.len()].clone())
            .collect()
    }

    /// File → files it imports (not itself; the test-only fixtures are no part of it).
    fn edges(&self) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
        let mut out: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
        for (m, f) in &self.modules {
            if m.first().is_some_and(|t| t == "testkit") {
                continue;
            }
            let code = &self.code[f];
            let children = self.children(m);
            let e = out.entry(f.clone()).or_default();
            for p in referenced(code, m, &children) {
                if let Some(to) = self.file_of(&p)
                    && to != f
                    && !to.starts_with("testkit.rs")
                {
                    e.insert(to.clone());
                }
            }
        }
        out
    }
}

#[test]
fn top_level_modules_import_only_what_the_layer_rule_allows() {
    let t = tree();
    let mut bad = Vec::new();
    for (m, f) in &t.modules {
        let Some(top) = m.first() else { continue };
        if top == "testkit" {
            continue;
        }
        let Some((_, allowed)) = ALLOWED.iter().find(|(n, _)| n == top) else {
            bad.push(format!(
                "{}: module `{top}` has no row in the layer table (ALLOWED, docs/architecture.md)",
                f.display()
            ));
            continue;
        };
        for p in referenced(&t.code[f], m, &t.children(m)) {
            let target = &p[0];
            if target != top && target != "testkit" && !allowed.contains(&target.as_str()) {
                bad.push(format!("{} imports {}", f.display(), p.join("::")));
            }
        }
    }
    bad.sort();
    bad.dedup();
    assert!(bad.is_empty(), "layer rule broken:\n{}", bad.join("\n"));
}

#[test]
fn model_does_no_io_reads_no_clock_and_holds_no_globals() {
    let t = tree();
    let mut bad = Vec::new();
    for (rel, code) in &t.code {
        if !rel.starts_with("model") {
            continue;
        }
        for w in MODEL_FORBIDDEN {
            if code.contains(w) {
                bad.push(format!("{}: {w}", rel.display()));
            }
        }
        // libc is for constants there (errno values), never calls.
        for (i, _) in code.match_indices("libc::") {
            let rest = &code[i + 6..];
            if rest.starts_with(|c: char| c.is_ascii_lowercase()) {
                bad.push(format!(
                    "{}: calls libc::{}",
                    rel.display(),
                    rest.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or("")
                ));
            }
        }
    }
    assert!(bad.is_empty(), "model is not pure:\n{}", bad.join("\n"));
}

#[test]
fn no_import_cycles_between_files() {
    let t = tree();
    let edges = t.edges();
    // Tarjan's strongly connected components.
    struct S<'a> {
        edges: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        next: usize,
        sccs: Vec<Vec<&'a PathBuf>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a PathBuf) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let edges = s.edges;
        for w in edges.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut c = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                c.push(w);
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                s.sccs.push(c);
            }
        }
    }
    let mut s = S {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        sccs: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    let text: Vec<String> = s
        .sccs
        .iter()
        .map(|c| {
            let names: Vec<String> = c.iter().map(|p| p.display().to_string()).collect();
            names.join(" <-> ")
        })
        .collect();
    assert!(text.is_empty(), "import cycles:\n{}", text.join("\n"));
}
