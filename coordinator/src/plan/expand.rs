//! Sweeps: each run becomes one run per combination of its own sweep values (a cartesian
//! product), and a run that starts from a swept run is repeated once per upstream expansion, so
//! that `cls-lp` from `cls` swept over `data_fraction` is `cls-lp[data_fraction=0.1]` from
//! `cls[data_fraction=0.1]`, and so on. `from = "cls[data_fraction=1.0]"` picks expansions
//! instead of following them all.

use super::spec::{Job, RunSpec, Start, SweepKey, SweepPoint, SweepValue};
use super::validate::{Axis, BaseRun, FromRef};
use super::values::Checker;

/// One expansion of a run before its settings are filled in.
#[derive(Clone, Debug)]
pub struct Expansion {
    pub name: String,
    pub from: Start,
    /// Inherited points first, then the run's own.
    pub points: Vec<SweepPoint>,
}

/// The expansions of every run, indexed like `runs`; `order` puts upstreams first.
pub fn expand(c: &mut Checker<'_>, runs: &[BaseRun], up: &[Option<usize>], order: &[usize]) -> Vec<Vec<Expansion>> {
    let mut out: Vec<Vec<Expansion>> = vec![Vec::new(); runs.len()];
    for &i in order {
        let r = &runs[i];
        // (upstream start, points inherited from it)
        let parents: Vec<(Start, Vec<SweepPoint>)> = match (&r.from, up[i]) {
            (FromRef::Random, _) => vec![(Start::Random, Vec::new())],
            (FromRef::Init, _) => vec![(Start::Init, Vec::new())],
            // An upstream with no expansions had problems, reported already.
            (FromRef::Run { .. }, Some(j)) if out[j].is_empty() => continue,
            (FromRef::Run { select, .. }, Some(j)) => match pick(c, r, &runs[j].name, &out[j], select) {
                Some(p) => p,
                None => continue,
            },
            // An unresolved name was reported by `graph`.
            (FromRef::Run { .. }, None) => continue,
        };
        let inherited_keys: Vec<(SweepKey, String)> = parents
            .first()
            .map(|(_, pts)| pts.iter().map(|p| (p.key, p.declared_by.clone())).collect())
            .unwrap_or_default();
        if let Some((axis, by)) =
            r.sweep.iter().find_map(|a| inherited_keys.iter().find(|(k, _)| *k == a.key).map(|(_, by)| (a, by)))
        {
            c.at_span(
                &r.from_span,
                format!(
                    "run `{}` sweeps `{}`, and so does `{by}`, which it starts from: sweep it in one place, or pick one of `{by}`'s values in `from`",
                    r.name,
                    axis.key.name()
                ),
            );
            continue;
        }
        let own = product(&r.name, &r.sweep);
        for (start, inherited) in &parents {
            for combo in &own {
                let points: Vec<SweepPoint> = inherited.iter().chain(combo).cloned().collect();
                out[i].push(Expansion { name: expanded_name(&r.name, &points), from: start.clone(), points });
            }
        }
    }
    out
}

/// The upstream expansions a run starts from: all of them, or those matching the `from`'s
/// picked values (which are then not carried on: they no longer vary).
fn pick(
    c: &mut Checker<'_>,
    r: &BaseRun,
    base: &str,
    ups: &[Expansion],
    select: &[(SweepKey, SweepValue)],
) -> Option<Vec<(Start, Vec<SweepPoint>)>> {
    for (key, value) in select {
        let values: Vec<SweepValue> =
            ups.iter().flat_map(|e| e.points.iter().filter(|p| p.key == *key).map(|p| p.value)).collect();
        if values.is_empty() {
            c.at_span(&r.from_span, format!("`from`: run `{base}` is not swept over `{}`", key.name()));
            return None;
        }
        if !values.iter().any(|v| same(*v, *value)) {
            let mut listed: Vec<String> = Vec::new();
            for v in &values {
                let s = v.to_string();
                if !listed.contains(&s) {
                    listed.push(s);
                }
            }
            c.at_span(
                &r.from_span,
                format!("`from`: run `{base}` has no {}={value} (its values: {})", key.name(), listed.join(", ")),
            );
            return None;
        }
    }
    let chosen = ups
        .iter()
        .filter(|e| select.iter().all(|(k, v)| e.points.iter().any(|p| p.key == *k && same(p.value, *v))))
        .map(|e| {
            let carried = e.points.iter().filter(|p| !select.iter().any(|(k, _)| *k == p.key)).cloned().collect();
            (Start::Run(e.name.clone()), carried)
        })
        .collect();
    Some(chosen)
}

/// Sweep values as the file and `from` write them: fractions within rounding.
fn same(a: SweepValue, b: SweepValue) -> bool {
    match (a, b) {
        (SweepValue::Count(x), SweepValue::Count(y)) => x == y,
        _ => (a.as_f64() - b.as_f64()).abs() <= 1e-12 * a.as_f64().abs().max(1.0),
    }
}

/// Every combination of the axes' values, the first axis varying slowest.
fn product(run: &str, axes: &[Axis]) -> Vec<Vec<SweepPoint>> {
    let mut out: Vec<Vec<SweepPoint>> = vec![Vec::new()];
    for a in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                a.values.iter().map(move |&value| {
                    let mut p = prefix.clone();
                    p.push(SweepPoint { key: a.key, value, declared_by: run.to_string() });
                    p
                })
            })
            .collect();
    }
    out
}

fn expanded_name(base: &str, points: &[SweepPoint]) -> String {
    if points.is_empty() {
        return base.to_string();
    }
    let parts: Vec<String> = points.iter().map(|p| format!("{}={}", p.key.name(), p.value)).collect();
    format!("{base}[{}]", parts.join(","))
}

/// The run of one expansion: the template with its name, start and own sweep values set.
pub fn instantiate(template: &RunSpec, e: &Expansion) -> RunSpec {
    let mut r = template.clone();
    r.name = e.name.clone();
    r.from = e.from.clone();
    r.sweep = e.points.clone();
    for p in e.points.iter().filter(|p| p.declared_by == template.base) {
        match (p.key, p.value, &mut r.job) {
            (SweepKey::Seed, SweepValue::Count(s), _) => r.seed = s,
            (SweepKey::DataFraction, SweepValue::Fraction(f), Job::PretrainCls { data_fraction, .. }) => {
                *data_fraction = f
            }
            (SweepKey::LabelFraction, SweepValue::Fraction(f), Job::Finetune { label_fraction, .. })
            | (SweepKey::LabelFraction, SweepValue::Fraction(f), Job::LinearProbe { label_fraction, .. }) => {
                *label_fraction = f
            }
            (SweepKey::GlobalBatch, SweepValue::Count(b), Job::PretrainCls { train, .. })
            | (SweepKey::GlobalBatch, SweepValue::Count(b), Job::Finetune { train, .. }) => {
                train.global_batch = b as usize
            }
            // `validate` lets a sweep key through only for the kinds it applies to.
            (k, v, job) => unreachable!("sweep {}={v} on a {} run passed validation", k.name(), job.kind()),
        }
    }
    r
}
