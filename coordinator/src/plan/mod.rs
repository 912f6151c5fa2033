//! The experiment plan: a TOML file of runs that start from each other (docs/plans.md).
//!
//! Reading one goes: `schema` (the file's shape; unknown keys and wrong types refused with
//! their line) -> `resources` (`[data]`, `[model]`, paths checked) -> `validate` (each
//! `[[run]]` with `[defaults]` applied: keys against kinds, datasets, splits; `settings` types
//! and range-checks each kind's settings) -> `graph` (`from` resolved, cycles, the order) ->
//! `expand` (sweeps) -> a `Plan` of runs in the order they can go. Every problem found on the way is reported with its line, all at once where one
//! does not hide another.

mod error;
mod expand;
mod graph;
mod resources;
mod schema;
mod settings;
pub mod spec;
mod validate;
mod values;

pub mod check_cmd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use error::PlanError;
pub use spec::*;

use error::Source;
use validate::FromRef;
use values::Checker;

/// What the command line replaces in a plan.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--dataset NAME=PATH`: the dataset's folder, instead of the file's path or synthetic spec.
    pub datasets: BTreeMap<String, PathBuf>,
    /// `--init DIR`: the init model folder.
    pub init: Option<PathBuf>,
}

/// Reads and checks a plan file. Relative paths in it are taken from the file's folder.
pub fn load(path: &Path, overrides: &Overrides) -> Result<Plan, Vec<PlanError>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![PlanError { file: name.clone(), line: None, message: format!("cannot read the plan: {e}") }]
    })?;
    build(&text, &name, path.parent(), overrides)
}

/// Checks a plan given as text (the compiled-in demo); `name` is what problems are reported
/// by. Relative paths stay relative to the working folder.
#[allow(dead_code)] // the plan executor's entry for the compiled-in demo
pub fn parse_str(text: &str, name: &str, overrides: &Overrides) -> Result<Plan, Vec<PlanError>> {
    build(text, name, None, overrides)
}

fn build(text: &str, name: &str, base: Option<&Path>, over: &Overrides) -> Result<Plan, Vec<PlanError>> {
    let src = Source { name, text };
    let raw = schema::parse(&src).map_err(|e| vec![e])?;
    let mut c = Checker::new(src);
    let data = resources::datasets(&mut c, &raw.data, base, over);
    let (model, init_origin) = resources::model(&mut c, raw.model.as_ref(), base, over);
    let runs = validate::runs(&mut c, &raw.run, raw.defaults.as_ref(), &data);

    let needs_init = runs.runs.iter().find_map(|r| match r.from {
        FromRef::Init => Some((r, format!("run `{}` starts from init", r.name))),
        FromRef::Random if model.random == RandomModel::LikeInit => {
            Some((r, format!("run `{}` starts from random, which takes the init folder's shapes", r.name)))
        }
        _ => None,
    });
    if let Some((r, why)) = needs_init {
        let line = c.src.line(r.from_span.start);
        resources::check_init(&mut c, &model, init_origin.as_ref(), line, &why);
    }

    let up = graph::upstreams(&mut c, &runs.runs, &runs.names);
    let mut specs = Vec::new();
    if let Some(order) = graph::order(&up) {
        let expansions = expand::expand(&mut c, &runs.runs, &up, &order);
        if c.errors.is_empty() {
            for &i in &order {
                // No problem was recorded, so every run kept its template.
                let Some(t) = &runs.runs[i].template else { continue };
                specs.extend(expansions[i].iter().map(|e| expand::instantiate(t, e)));
            }
        }
    }
    if c.errors.is_empty() {
        return Ok(Plan { data: data.specs, model, runs: specs });
    }
    // By line (problems of the command line first), each once: a [defaults] value that is out
    // of range is met once per run it applies to.
    let mut errors = c.errors;
    errors.sort_by_key(|e| e.line);
    let mut unique: Vec<PlanError> = Vec::new();
    for e in errors {
        if !unique.contains(&e) {
            unique.push(e);
        }
    }
    Err(unique)
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
