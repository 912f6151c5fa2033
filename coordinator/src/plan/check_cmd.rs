//! `coordinator check-plan PLAN.toml [--dataset NAME=PATH]... [--init DIR]`: checks a plan and
//! prints its runs in the order they would go (stdout), or one `FILE:LINE: reason` line per
//! problem (stderr) and a non-zero exit.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::spec::{Augment, DataSource, Job, Length, Mode, Plan, RandomModel, RunSpec, Schedule, SweepValue};
use super::{load, Overrides};

#[derive(Args, Debug)]
pub struct CheckPlanArgs {
    /// The plan file.
    pub plan: PathBuf,
    /// Use this folder for a dataset of the plan instead of its path or synthetic spec
    /// (repeatable: --dataset mimic=/data/mimic --dataset rsna=/data/rsna).
    #[arg(long = "dataset", value_name = "NAME=PATH", value_parser = parse_dataset)]
    pub datasets: Vec<(String, PathBuf)>,
    /// Use this folder as the model that `from = "init"` loads.
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
}

fn parse_dataset(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("`{s}`: expected NAME=PATH, such as mimic=/data/mimic-cxr-jpg")),
    }
}

pub fn run(a: CheckPlanArgs) -> Result<()> {
    let mut over = Overrides { init: a.init.clone(), ..Default::default() };
    for (name, path) in &a.datasets {
        if over.datasets.insert(name.clone(), path.clone()).is_some() {
            bail!("--dataset {name} is given twice");
        }
    }
    match load(&a.plan, &over) {
        Ok(plan) => {
            print!("{}", describe(&plan));
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            let n = problems.len();
            bail!("{}: {n} problem{}; nothing would run", a.plan.display(), if n == 1 { "" } else { "s" })
        }
    }
}

/// The plan as the user checks it: datasets, model, then one line per run in order.
pub fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    for (name, d) in &plan.data {
        let source = match &d.source {
            DataSource::Path(p) => p.display().to_string(),
            DataSource::Synthetic { studies, size, seed } => {
                format!("generated, {studies} studies, {size} px, seed {seed}")
            }
        };
        let mut extra = String::new();
        if let Some(s) = d.split {
            extra += &format!(", {s} split");
        }
        if let Some(v) = d.valid_fraction {
            extra += &format!(", valid {v}");
        }
        if let Some(t) = d.test_fraction {
            extra += &format!(", test {t}");
        }
        let n = d.labels.len();
        let labels = if n == 1 { format!("label {}", d.labels[0]) } else { format!("{n} labels") };
        out += &format!("data {name}: {source}; {labels}, uncertain {}{extra}\n", d.uncertain);
    }
    let init = plan.model.init.as_ref().map_or("none".to_string(), |p| p.display().to_string());
    let random = match plan.model.random {
        RandomModel::LikeInit => "the init's shapes".to_string(),
        RandomModel::Sizes(s) => {
            format!("image {} patch {} width {} layers {} heads {}", s.image, s.patch, s.width, s.layers, s.heads)
        }
    };
    out += &format!("model: init {init}; random: {random}\n");
    out += &format!("{} runs, in order:\n", plan.runs.len());

    let rows: Vec<[String; 7]> = plan
        .runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let test: Vec<String> = r.test.iter().map(|t| t.to_string()).collect();
            [
                (i + 1).to_string(),
                r.name.clone(),
                r.kind().to_string(),
                r.from.to_string(),
                r.dataset.clone(),
                if test.is_empty() { "-".into() } else { test.join(",") },
                settings(r),
            ]
        })
        .collect();
    let header = ["#", "run", "kind", "from", "data", "test", "settings"].map(String::from);
    let mut width = [0usize; 7];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = format!("{:>w$}", row[0], w = width[0]);
        for (cell, w) in row.iter().zip(width).skip(1).take(5) {
            line += &format!("  {cell:<w$}");
        }
        line += &format!("  {}", row[6]);
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// A run's augmentation: `paper`, `none`, or its strengths.
fn augment_words(a: &Augment) -> String {
    if *a == Augment::PAPER {
        return "augment=paper".into();
    }
    if *a == Augment::NONE {
        return "augment=none".into();
    }
    let shuffle = if a.shuffle_sentences { "" } else { ",no-shuffle" };
    format!("augment(rot {},scale {}-{},shift {}{shuffle})", a.rotate, a.scale[0], a.scale[1], a.translate)
}

/// The settings that tell a run apart, in a few words.
fn settings(r: &RunSpec) -> String {
    let mut s: Vec<String> = Vec::new();
    if let Some(t) = r.job.training() {
        s.push(match t.length {
            Length::Epochs(n) => format!("epochs={n}"),
            Length::Steps(n) => format!("steps={n}"),
        });
        s.push(format!("batch={}", t.global_batch));
        if let Some(m) = t.micro_batch {
            s.push(format!("micro_batch={m}"));
        }
        s.push(format!("lr={:e}", t.lr));
        s.push(match t.schedule {
            Schedule::OneCycle { warmup_fraction } => format!("one-cycle(warmup {warmup_fraction})"),
            Schedule::Cosine { warmup } => format!("cosine(warmup {warmup} steps)"),
        });
        s.push(match t.mode {
            Mode::Full => "full".to_string(),
            Mode::Adapters { width } => format!("adapters({width})"),
        });
    }
    if let Job::PretrainCls { augment, .. } | Job::Finetune { augment, .. } = &r.job {
        s.push(augment_words(augment));
    }
    match &r.job {
        Job::PretrainCls { data_fraction, .. } => s.push(format!("data_fraction={}", fraction(*data_fraction))),
        Job::Finetune { label_fraction, pos_weight, head_lr, .. } => {
            s.push(format!("label_fraction={}", fraction(*label_fraction)));
            if let Some(h) = head_lr {
                s.push(format!("head_lr={h:e}"));
            }
            if !pos_weight {
                s.push("no pos_weight".into());
            }
        }
        Job::LinearProbe { label_fraction, grid } => {
            s.push(format!("label_fraction={}", fraction(*label_fraction)));
            s.push(format!("C={:e}..{:e} x{}", grid.low, grid.high, grid.values().len()));
        }
        Job::ZeroShot { templates } => {
            s.push(format!("{} prompt pair(s), neutral \"{}\"", templates.positive.len(), templates.neutral))
        }
        Job::Retrieval { .. } => {}
        Job::TextToImage { findings, steps, size } => {
            s.push(format!("findings={} image_steps={steps} image_size={size}", findings.join(",")))
        }
    }
    s.push(format!("seed={}", r.seed));
    s.join(" ")
}

/// A fraction as sweeps name it (1.0, not 1).
fn fraction(x: f64) -> String {
    SweepValue::Fraction(x).to_string()
}
