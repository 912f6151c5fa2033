//! The runs as a graph by `from`: every reference resolved, cycles found, and an order in which
//! each run comes after the run it starts from (file order among runs that are ready together).

use std::collections::{BTreeMap, BTreeSet};

use super::validate::{BaseRun, FromRef};
use super::values::Checker;

/// The upstream run of each run (an index into `runs`), or `None` for random and init.
/// Reports unknown names, runs that leave no model, and cycles. `declared` holds every name
/// in the file, also of runs dropped for other problems (not reported again here).
pub fn upstreams(c: &mut Checker<'_>, runs: &[BaseRun], declared: &BTreeMap<String, usize>) -> Vec<Option<usize>> {
    let index: BTreeMap<&str, usize> = runs.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
    let mut up = vec![None; runs.len()];
    for (i, r) in runs.iter().enumerate() {
        let FromRef::Run { base, .. } = &r.from else { continue };
        match index.get(base.as_str()) {
            Some(&j) => {
                let u = &runs[j];
                if !u.kind.produces_model() {
                    c.at_span(
                        &r.from_span,
                        format!(
                            "`from` = \"{base}\": a {} run leaves no model to start from (name a pretrain-cls or finetune run, random or init)",
                            u.kind
                        ),
                    );
                }
                up[i] = Some(j);
            }
            None if declared.contains_key(base) => {}
            None => {
                c.at_span(
                    &r.from_span,
                    format!("unknown `from` = \"{base}\": no run has that name ({})", suggest(base, declared)),
                );
            }
        }
    }
    cycles(c, runs, &up);
    up
}

/// Each run has at most one upstream, so a cycle is found by walking up from each run.
fn cycles(c: &mut Checker<'_>, runs: &[BaseRun], up: &[Option<usize>]) {
    let mut reported: BTreeSet<usize> = BTreeSet::new();
    for start in 0..runs.len() {
        let mut path = vec![start];
        let mut at = start;
        while let Some(next) = up[at] {
            if let Some(pos) = path.iter().position(|&p| p == next) {
                let cycle = &path[pos..];
                // Report each cycle once, at the run of the cycle that comes first in the file.
                let first = *cycle.iter().min().expect("a cycle has runs");
                if reported.insert(first) {
                    let rot = cycle.iter().position(|&p| p == first).expect("first is in the cycle");
                    let mut names: Vec<&str> =
                        cycle[rot..].iter().chain(&cycle[..rot]).map(|&i| runs[i].name.as_str()).collect();
                    names.push(&runs[first].name);
                    // Each arrow reads "starts from": the list walks up the `from` chain.
                    let msg = if cycle.len() == 1 {
                        format!("run `{}` starts from itself", runs[first].name)
                    } else {
                        format!("cycle of `from`: {}", names.join(" -> "))
                    };
                    c.at_span(&runs[first].from_span, msg);
                }
                break;
            }
            if path.len() > runs.len() {
                break;
            }
            path.push(next);
            at = next;
        }
    }
}

/// The order the runs go in: each after its upstream, otherwise in file order. `None` when
/// there is a cycle.
pub fn order(up: &[Option<usize>]) -> Option<Vec<usize>> {
    let n = up.len();
    let mut done = vec![false; n];
    let mut out = Vec::with_capacity(n);
    // Repeatedly take the first run in file order whose upstream is done: O(n^2), and plans
    // hold tens of runs.
    while out.len() < n {
        let next = (0..n).find(|&i| !done[i] && up[i].is_none_or(|u| done[u]))?;
        done[next] = true;
        out.push(next);
    }
    Some(out)
}

/// The nearest declared names, for the message.
fn suggest(name: &str, declared: &BTreeMap<String, usize>) -> String {
    if declared.is_empty() {
        return "the plan declares no runs".into();
    }
    let mut by_distance: Vec<(usize, &str)> = declared.keys().map(|k| (edit_distance(name, k), k.as_str())).collect();
    by_distance.sort();
    match by_distance.first() {
        Some(&(d, k)) if d <= 2.max(name.len() / 3) => format!("did you mean `{k}`?"),
        _ => {
            let names: Vec<&str> = declared.keys().map(|k| k.as_str()).collect();
            format!("runs: {}", names.join(", "))
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_each_run_after_its_upstream_and_keeps_file_order_otherwise() {
        // 2 starts from 0 and 1 from 2; 3 from nothing: 1 waits for 2, which waits for 0.
        let up = vec![None, Some(2), Some(0), None];
        assert_eq!(order(&up), Some(vec![0, 2, 1, 3]));
        assert_eq!(order(&[Some(1), Some(0)]), None);
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("cls", "cls"), 0);
        assert_eq!(edit_distance("clss", "cls"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
