//! A plan's datasets: their roots (generated trees made on first use), and each split's images,
//! patients, studies and label truth under the dataset's label policy, as the feature tables
//! and the probes need them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use data::{Split, Views};

use crate::plan::{DataSource, DatasetSpec};

use super::features::SplitTable;

/// The root of `spec`'s tree, generating it under `data_dir` when it is synthetic and not made
/// yet (atomically: a tree is complete or absent).
pub fn root(name: &str, spec: &DatasetSpec, data_dir: &Path) -> Result<PathBuf> {
    let (studies, size, seed) = match &spec.source {
        DataSource::Path(p) => return Ok(p.clone()),
        DataSource::Synthetic { studies, size, seed } => (*studies, *size, *seed),
    };
    let dir = data_dir.join(format!("{name}-{studies}-seed{seed}-size{size}-v{}", data::synth::VERSION));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let tmp = data_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let cfg =
        data::synth::SynthConfig { studies, dataset: spec.kind, seed, size, ..data::synth::SynthConfig::default() };
    let t0 = Instant::now();
    data::synth::generate(&tmp, &cfg).with_context(|| format!("generating the {name} tree"))?;
    fs::write(tmp.join(".complete"), b"")?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&tmp, &dir).with_context(|| format!("putting the {name} tree at {}", dir.display()))?;
    eprintln!("coordinator: generated a {name} tree of {studies} studies in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(dir)
}

/// Reader options for `spec` (its label policy, RSNA split and held-out fractions) with the
/// run's view filter.
pub fn read_options(spec: &DatasetSpec, views: &Views, seed: u64) -> data::ReadOptions {
    data::ReadOptions {
        views: views.clone(),
        uncertain: spec.uncertain,
        seed,
        rsna_split: spec.split.unwrap_or_default(),
        valid_fraction: spec.valid_fraction,
        test_fraction: spec.test_fraction,
        ..data::ReadOptions::default()
    }
}

/// The name a feature table gives a split.
pub fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Validate => "valid",
        Split::Test => "test",
    }
}

/// A dataset's splits by name, and one report per test study (study index, text).
pub type Tables = (BTreeMap<String, SplitTable>, Vec<(usize, String)>);

/// Every split's images with their truth for `spec.labels`, and one report per test study
/// (study index, text) where the dataset has reports.
pub fn tables(ds: &data::Dataset, spec: &DatasetSpec) -> Result<Tables> {
    let columns: Vec<usize> = spec
        .labels
        .iter()
        .map(|l| data::labels::label_index(l).ok_or_else(|| anyhow!("unknown label '{l}'")))
        .collect::<Result<_>>()?;
    let mut out: BTreeMap<String, SplitTable> = BTreeMap::new();
    let mut study_index: HashMap<(String, String), usize> = HashMap::new();
    let mut reports = Vec::new();
    for p in &ds.pairs {
        let name = split_name(p.split);
        let t = out.entry(name.to_string()).or_default();
        let key = (name.to_string(), p.study_id.clone());
        let study = *study_index.entry(key).or_insert_with(|| {
            t.studies.push(p.study_id.clone());
            if p.split == Split::Test && !p.text.trim().is_empty() {
                reports.push((t.studies.len() - 1, p.text.clone()));
            }
            t.studies.len() - 1
        });
        t.images.push(p.image.to_string_lossy().into_owned());
        t.patients.push(p.subject_id.clone());
        t.study.push(study);
        for &c in &columns {
            t.truth.push(spec.uncertain.apply(p.labels[c]).map(|v| v > 0.5));
        }
    }
    for s in ["train", "valid", "test"] {
        ensure!(
            out.get(s).is_some_and(|t| !t.is_empty()),
            "{}: the {s} split is empty (every split is needed: train and valid for the probe, test to score)",
            ds.root.display()
        );
    }
    Ok((out, reports))
}
