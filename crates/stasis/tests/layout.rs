//! The crates' modules import one another without circles (issue 14's layout): a module that
//! reaches, through the modules it imports, back to itself makes every change to one of them
//! a change to all. Read from the source files themselves: each `crate::…` and `super::…`
//! path outside comments and test modules is an edge to the deepest module it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside its crate (`["snapshots", "capture"]`; the root is empty).
type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code of a file without its comments and without its `#[cfg(test)] mod tests`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module paths a file's code names: `crate::a::b`, `super::a`, and `use crate::{a, b::c}`.
fn named_paths(me: &Module, code: &str) -> Vec<Module> {
    let ident = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut out = Vec::new();
    for (start, _) in code.match_indices("crate::").chain(code.match_indices("super::")) {
        if start > 0 && code[..start].chars().last().is_some_and(|c| ident(c) || c == ':') {
            continue;
        }
        let mut rest = &code[start..];
        let mut base: Module = if rest.starts_with("super::") {
            // `super` is the parent, for `a/b.rs` and `a/b/mod.rs` alike; one per `super::`.
            let mut base = me.clone();
            while let Some(next) = rest.strip_prefix("super::") {
                base.pop();
                rest = next;
            }
            base
        } else {
            rest = &rest["crate::".len()..];
            Vec::new()
        };
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let mut path = base.clone();
                path.extend(
                    item.trim()
                        .split("::")
                        .take_while(|s| !s.is_empty() && s.chars().all(ident))
                        .map(str::to_string),
                );
                out.push(path);
            }
            continue;
        }
        let mut cursor = rest;
        loop {
            let len = cursor.find(|c: char| !ident(c)).unwrap_or(cursor.len());
            if len == 0 {
                break;
            }
            base.push(cursor[..len].to_string());
            cursor = &cursor[len..];
            match cursor.strip_prefix("::") {
                Some(next) => cursor = next,
                None => break,
            }
        }
        out.push(base);
    }
    out
}

/// The circles (strongly connected groups of two or more modules) of a crate's imports.
fn circles(src: &Path) -> Vec<Vec<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<Module, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let resolve = |mut path: Module| -> Option<Module> {
        while !path.is_empty() {
            if modules.contains_key(&path) {
                return Some(path);
            }
            path.pop();
        }
        None
    };
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (me, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap();
        for path in named_paths(me, &code(&text)) {
            if let Some(target) = resolve(path) {
                if &target != me {
                    edges.entry(me.clone()).or_default().insert(target);
                }
            }
        }
    }
    // Tarjan's strongly connected components.
    struct Walk<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on_stack: BTreeSet<Module>,
        found: Vec<Vec<String>>,
    }
    impl Walk<'_> {
        fn visit(&mut self, v: &Module) {
            let i = self.index.len();
            self.index.insert(v.clone(), i);
            self.low.insert(v.clone(), i);
            self.stack.push(v.clone());
            self.on_stack.insert(v.clone());
            for w in self.edges.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(&w) {
                    self.visit(&w);
                    let lw = self.low[&w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(&w) {
                    let iw = self.index[&w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(&w);
                    let done = &w == v;
                    group.push(if w.is_empty() {
                        "(root)".to_string()
                    } else {
                        w.join("/")
                    });
                    if done {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        edges: &edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for m in modules.keys() {
        if !walk.index.contains_key(m) {
            walk.visit(m);
        }
    }
    walk.found
}

#[test]
fn no_crate_has_an_import_circle() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut found = Vec::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(crates).unwrap() {
        let src = entry.unwrap().path().join("src");
        if !src.is_dir() {
            continue;
        }
        checked += 1;
        for circle in circles(&src) {
            found.push(format!("{}: {}", src.display(), circle.join(" -> ")));
        }
    }
    assert!(checked >= 8, "only {checked} crates found under {}", crates.display());
    assert!(found.is_empty(), "import circles:\n{}", found.join("\n"));
}

#[test]
fn a_circle_is_found_when_there_is_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "use crate::b::Thing;\npub mod inner;\n").unwrap();
    std::fs::write(src.join("a/inner.rs"), "use super::super::c;\n").unwrap();
    // A comment and a test module name `a` too; neither is an import.
    std::fs::write(
        src.join("b.rs"),
        "// crate::a::X\nuse crate::{c::One, a::inner::Two};\n#[cfg(test)]\nmod tests {\n    use crate::a::Y;\n}\n",
    )
    .unwrap();
    std::fs::write(src.join("c.rs"), "pub struct One;\n").unwrap();
    assert!(
        circles(&src).is_empty(),
        "a -> b -> {{c, a/inner}}, a/inner -> c: no circle"
    );
    std::fs::write(src.join("c.rs"), "use crate::a::Thing;\npub struct One;\n").unwrap();
    // b -> a/inner -> c -> a -> b: all four.
    assert_eq!(
        circles(&src),
        vec![vec!["a".to_string(), "a/inner".into(), "b".into(), "c".into()]]
    );
}
