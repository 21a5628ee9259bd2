//! hv-core's modules form a DAG: each top-level module of `hv-core/src` may use only
//! modules below it. This test reads the sources (no KVM), builds the graph of
//! `crate::<module>` references between top-level modules and finds its cycles.
//!
//! The redesign that removes the remaining cycle is under way: the modules still in it
//! are listed in [`STILL_IN_A_CYCLE`]. The test fails when a module not on that list
//! joins a cycle (a new upward dependency), and when one on the list has left every
//! cycle (so that the list only shrinks: take it off).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules still in the import cycle through `domain` (the domain's shared state),
/// until the PV MMU (`mmu::hypercalls`, the trapped-write path), the grants, the
/// device back-ends (a context at attach time instead of `&DomainShared`), the
/// hypercalls that take the whole domain and the domain itself are split.
const STILL_IN_A_CYCLE: &[&str] = &[
    "devices",
    "domain",
    "fdlimit",
    "grant",
    "hypercall",
    "mmu",
    "registry",
    "sched",
    "vcpu",
    "vcpu_op",
];

fn sources(dir: &Path, out: &mut String) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&code(&std::fs::read_to_string(&p).expect("read source")));
            out.push('\n');
        }
    }
}

/// Top-level module name -> its code (file, or directory with its files), without
/// comments and unit tests.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(&src).expect("src") {
        let p = e.expect("entry").path();
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut text = String::new();
        if p.is_dir() {
            sources(&p, &mut text);
        } else if p.extension().is_some_and(|x| x == "rs") {
            text = code(&std::fs::read_to_string(&p).expect("read source"));
        } else {
            continue;
        }
        m.entry(name).or_insert_with(String::new).push_str(&text);
    }
    m
}

/// One file's code: without its unit tests (what they name is not a dependency of
/// the module) and its comments (`//` to the end of the line: doc links are not
/// dependencies either).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `text`'s code names as `crate::<name>` (in paths and `use`
/// statements, including `use crate::{a, b}`), other than itself.
fn uses(me: &str, text: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let group = rest.strip_prefix('{');
        let words: Vec<&str> = match group {
            Some(g) => g
                .split('}')
                .next()
                .unwrap_or("")
                .split(',')
                .map(|w| w.trim())
                .collect(),
            None => vec![rest],
        };
        for w in words {
            let name: String = w
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != me && names.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

/// Modules in a cycle (strongly connected components larger than one).
fn in_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    // Reachability closure: fine for a few dozen modules.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(n) = stack.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    stack.push(m.clone());
                }
            }
        }
        seen
    };
    graph
        .keys()
        .filter(|n| reach(n).contains(*n))
        .cloned()
        .collect()
}

#[test]
fn top_level_modules_form_a_dag_apart_from_the_known_cycle() {
    let mods = modules();
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    let graph: BTreeMap<String, BTreeSet<String>> = mods
        .iter()
        .map(|(n, t)| (n.clone(), uses(n, t, &names)))
        .collect();
    let cyclic = in_cycles(&graph);
    let known: BTreeSet<String> = STILL_IN_A_CYCLE.iter().map(|s| s.to_string()).collect();
    let joined: Vec<_> = cyclic.difference(&known).collect();
    let left: Vec<_> = known.difference(&cyclic).collect();
    let edges: Vec<String> = cyclic
        .iter()
        .map(|n| {
            let out: Vec<_> = graph[n].iter().filter(|m| cyclic.contains(*m)).collect();
            format!("{n} -> {out:?}")
        })
        .collect();
    assert!(
        joined.is_empty(),
        "modules that joined an import cycle: {joined:?}\ncycle edges:\n{}",
        edges.join("\n")
    );
    assert!(
        left.is_empty(),
        "modules no longer in a cycle (take them off STILL_IN_A_CYCLE): {left:?}"
    );
}

#[test]
fn the_leaves_depend_on_nothing_in_hv_core() {
    let mods = modules();
    let names: BTreeSet<String> = mods.keys().cloned().collect();
    for leaf in ["gpa", "params"] {
        let text = &mods[leaf];
        let u = uses(leaf, text, &names);
        assert!(u.is_empty(), "{leaf} uses {u:?}");
    }
}
