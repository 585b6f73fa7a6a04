//! `cargo xtask imports`: the module import graph of qimg-cli must have no
//! cycle (issue #18: verbs depend on the argument groups and the format
//! layer, never the reverse). Every `crate::NAME` path in
//! `qimg-cli/src/*.rs` outside comments is an edge from that file's module
//! to `NAME` (`use crate::{a, b::c}` groups included). A cycle fails the
//! check and is printed, module by module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Where the checked modules live, relative to the workspace root.
const SRC: &str = "qimg-cli/src";

/// Edges allowed although they close a cycle, each with the reason. Only
/// cycles through the format layer that issue #18's format layer (one
/// opened `Image` answering the verbs) will remove belong here.
const ALLOWED: &[(&str, &str, &str)] = &[];

/// Module name -> the modules it names.
pub(crate) type Graph = BTreeMap<String, BTreeSet<String>>;

/// Runs the check over qimg-cli's sources.
pub(crate) fn check() -> Result<(), String> {
    eprintln!("xtask: == import cycles in {SRC}");
    let dir = crate::root().join(SRC);
    let graph = read_graph(&dir)?;
    let allowed: BTreeSet<(&str, &str)> = ALLOWED.iter().map(|(a, b, _)| (*a, *b)).collect();
    // An allowed edge that is gone must leave the list, so it only shrinks.
    for (from, to, why) in ALLOWED {
        if !graph.get(*from).is_some_and(|t| t.contains(*to)) {
            return Err(format!(
                "{SRC}: allowed import {from} -> {to} ({why}) no longer exists; \
                 remove it from xtask/src/imports.rs ALLOWED"
            ));
        }
    }
    let mut kept = Graph::new();
    for (from, tos) in &graph {
        let tos = tos
            .iter()
            .filter(|to| !allowed.contains(&(from.as_str(), to.as_str())))
            .cloned()
            .collect();
        kept.insert(from.clone(), tos);
    }
    let tangles = tangles(&kept);
    if tangles.is_empty() {
        eprintln!(
            "xtask: {} modules, {} imports, no cycle ({} allowed back edges, issue #18)",
            graph.len(),
            graph.values().map(BTreeSet::len).sum::<usize>(),
            ALLOWED.len()
        );
        return Ok(());
    }
    let mut msg = format!("{} import cycle(s) in {SRC}:", tangles.len());
    for t in &tangles {
        let c = cycle_in(&kept, t);
        msg.push_str(&format!(
            "\n  {}\n    (modules that all reach each other: {})",
            c.join(" -> "),
            t.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Err(msg)
}

/// Reads every `*.rs` file directly in `dir` into the graph (`main.rs` and
/// `lib.rs` are the crate root, `crate`); a directory `NAME/` is the module
/// `NAME`, all its `*.rs` files together (with `NAME.rs`, if there is one).
fn read_graph(dir: &Path) -> Result<Graph, String> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let text = if path.is_dir() {
            dir_text(&path)?
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            continue;
        };
        let name = match stem {
            "main" | "lib" => "crate".to_string(),
            s => s.to_string(),
        };
        files.entry(name).or_default().push_str(&text);
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    Ok(files
        .iter()
        .map(|(name, text)| {
            let mut tos = references(text, &modules);
            tos.remove(name);
            (name.clone(), tos)
        })
        .collect())
}

/// Every `*.rs` file under the module directory `dir`, one after another.
fn dir_text(dir: &Path) -> Result<String, String> {
    let mut text = String::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            text.push_str(&dir_text(&path)?);
        } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
            text.push_str(
                &std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?,
            );
            text.push('\n');
        }
    }
    Ok(text)
}

/// The modules of `modules` that `text` names as `crate::NAME`.
pub(crate) fn references(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = strip_comment(line);
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            // `xcrate::` or `my_crate::` is another path.
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d as e}` on this line.
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    add(first_ident(item.trim()), modules, &mut out);
                }
            } else {
                add(first_ident(rest), modules, &mut out);
            }
        }
    }
    out
}

fn add(name: &str, modules: &BTreeSet<String>, out: &mut BTreeSet<String>) {
    if modules.contains(name) {
        out.insert(name.to_string());
    }
}

/// The identifier at the start of `s`.
fn first_ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// `line` without a `//` comment (doc comments included; a `//` inside a
/// string literal is rare enough in these sources to cut there too).
fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

/// Every strongly connected component of more than one module, each as one
/// concrete cycle (`a -> b -> ... -> a`), in a stable order.
#[cfg(test)]
pub(crate) fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    tangles(graph)
        .iter()
        .map(|comp| cycle_in(graph, comp))
        .collect()
}

/// The strongly connected components of more than one module: every
/// module in one reaches every other.
pub(crate) fn tangles(graph: &Graph) -> Vec<BTreeSet<String>> {
    components(graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .collect()
}

/// Strongly connected components (Kosaraju: finish order on the graph,
/// then reachability on the reversed graph), iteratively.
fn components(graph: &Graph) -> Vec<BTreeSet<String>> {
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(k, v)| std::iter::once(k.as_str()).chain(v.iter().map(String::as_str)))
        .collect();
    let empty = BTreeSet::new();
    let next = |n: &str| graph.get(n).unwrap_or(&empty);
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for &start in &nodes {
        if !seen.insert(start) {
            continue;
        }
        let mut stack: Vec<(&str, Vec<&str>)> =
            vec![(start, next(start).iter().map(String::as_str).collect())];
        while let Some((node, todo)) = stack.last_mut() {
            if let Some(n) = todo.pop() {
                if seen.insert(n) {
                    let succ = next(n).iter().map(String::as_str).collect();
                    stack.push((n, succ));
                }
            } else {
                order.push(*node);
                stack.pop();
            }
        }
    }
    let mut rev: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, tos) in graph {
        for to in tos {
            rev.entry(to.as_str()).or_default().push(from.as_str());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut comps = Vec::new();
    for &root in order.iter().rev() {
        if !assigned.insert(root) {
            continue;
        }
        let mut comp = BTreeSet::new();
        let mut todo = vec![root];
        while let Some(n) = todo.pop() {
            comp.insert(n.to_string());
            for &p in rev.get(n).map(Vec::as_slice).unwrap_or(&[]) {
                if assigned.insert(p) {
                    todo.push(p);
                }
            }
        }
        comps.push(comp);
    }
    comps.sort();
    comps
}

/// A shortest cycle through the first module of `comp` (breadth-first
/// search inside the component back to it).
fn cycle_in(graph: &Graph, comp: &BTreeSet<String>) -> Vec<String> {
    let Some(start) = comp.iter().next() else {
        return Vec::new();
    };
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.as_str()]);
    while let Some(n) = queue.pop_front() {
        for to in graph.get(n).into_iter().flatten() {
            if !comp.contains(to) {
                continue;
            }
            if to == start {
                // Walk the parents from `n` back to `start`.
                let mut back = Vec::new();
                let mut cur = n;
                while cur != start {
                    back.push(cur.to_string());
                    cur = parent.get(cur).copied().unwrap_or(start);
                }
                back.reverse();
                let mut path = vec![start.clone()];
                path.extend(back);
                path.push(start.clone());
                return path;
            }
            if !parent.contains_key(to.as_str()) {
                parent.insert(to, n);
                queue.push_back(to);
            }
        }
    }
    comp.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mods(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn graph(edges: &[(&str, &str)]) -> Graph {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    }

    #[test]
    fn references_reads_paths_groups_and_skips_comments() {
        let m = mods(&["args", "image", "format", "dev", "secret", "opts"]);
        let text = "use crate::args::SecretArgs;\n\
                    use crate::{format, dev::erased, CliError};\n\
                    /// See [`crate::secret::Secrets`].\n\
                    let x = crate::image::open(p); // crate::opts::x\n\
                    use other_crate::opts;\n";
        assert_eq!(
            references(text, &m),
            mods(&["args", "dev", "format", "image"])
        );
    }

    #[test]
    fn a_cycle_is_found_and_printed_in_order() {
        let g = graph(&[("cli", "info"), ("info", "args"), ("args", "cli")]);
        assert_eq!(
            cycles(&g),
            vec![vec!["args", "cli", "info", "args"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()]
        );
    }

    #[test]
    fn a_layered_graph_has_no_cycle() {
        let g = graph(&[
            ("cli", "info"),
            ("cli", "map"),
            ("info", "image"),
            ("map", "image"),
            ("image", "format"),
            ("info", "format"),
        ]);
        assert!(cycles(&g).is_empty());
    }

    #[test]
    fn two_separate_cycles_are_both_reported() {
        let g = graph(&[("a", "b"), ("b", "a"), ("c", "d"), ("d", "e"), ("e", "c")]);
        let c = cycles(&g);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0], vec!["a", "b", "a"]);
        assert_eq!(c[1], vec!["c", "d", "e", "c"]);
    }
}
