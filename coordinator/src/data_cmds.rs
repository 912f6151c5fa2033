//! Data tools: `synth` (the synthetic radiograph generator), `data-stats` (read a dataset root
//! and summarise it as JSON) and `prepare` (pack images into shards).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::Args;
use data::synth::{generate, SynthConfig, Visibility};
use data::DatasetKind;

/// `coordinator synth --out DIR --studies N --dataset mimic|chexpert|rsna --seed S [--size 256]`
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Folder to write the tree into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of studies (MIMIC, CheXpert) or patients (RSNA).
    #[arg(long)]
    pub studies: usize,
    /// Which dataset's layout to write (`--layout` is the older name).
    #[arg(long, alias = "layout")]
    pub dataset: DatasetKind,
    /// Seed: the same seed writes the same tree.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (the smaller side; some sites write taller images): 32..=4096.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// How strongly findings show in the pixels (1 = as designed, lower = subtler): one number
    /// for every finding, finding=number pairs (`edema=0.5,cardiomegaly=0.7`), or both
    /// (`0.8,fracture=1.5`); `full` undoes the default's subtler drawing of edema, cardiomegaly,
    /// enlarged cardiomediastinum and effusion. Labels and reports do not change.
    #[arg(long, default_value = "1")]
    pub visibility: Visibility,
    /// Multiplies every finding's prevalence.
    #[arg(long, default_value_t = 1.0)]
    pub prevalence: f32,
}

pub fn run_synth(a: SynthArgs) -> Result<()> {
    ensure!(
        a.prevalence.is_finite() && a.prevalence >= 0.0,
        "--prevalence {} must be a number, 0 or more (a multiplier of every finding's prevalence)",
        a.prevalence
    );
    let cfg = SynthConfig {
        studies: a.studies,
        dataset: a.dataset,
        seed: a.seed,
        size: a.size,
        visibility: a.visibility,
        prevalence: a.prevalence,
    };
    let s = generate(&a.out, &cfg)?;
    eprintln!(
        "synth: {} studies, {} images, {} patients in {:.2} s on {} threads ({:.0} images/s, {:.0} images/s/core) -> {}",
        s.studies,
        s.images,
        s.patients,
        s.seconds,
        s.threads,
        s.images as f64 / s.seconds.max(1e-9),
        s.images_per_s_per_core(),
        a.out.display()
    );
    Ok(())
}

/// `coordinator data-stats --dataset mimic|chexpert|rsna --root DIR [--views PA,AP|all]
/// [--sections paper|impression|findings+impression] [--uncertain zeros|ones|ignore] --json
/// [--dump-pairs K]`
#[derive(Args, Debug)]
pub struct DataStatsArgs {
    /// Which dataset layout the root holds.
    #[arg(long)]
    pub dataset: data::DatasetKind,
    /// The dataset root as distributed.
    #[arg(long)]
    pub root: PathBuf,
    /// Views to keep: a list such as PA,AP (the default) or `all`.
    #[arg(long, default_value = "PA,AP")]
    pub views: data::Views,
    /// Report text policy: paper, impression or findings+impression.
    #[arg(long, default_value = "paper")]
    pub sections: data::report::SectionPolicy,
    /// Uncertain / blank label policy: zeros, ones or ignore (applies to dumped pairs).
    #[arg(long, default_value = "zeros")]
    pub uncertain: data::UncertainPolicy,
    /// MIMIC label file: chexpert or negbio.
    #[arg(long, default_value = "chexpert")]
    pub labels: data::dataset::LabelFile,
    /// MIMIC-CXR reports root, when the reports are not under --root.
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// Keep only one split (train, validate, test).
    #[arg(long)]
    pub split: Option<String>,
    /// Seed of the splits made where a dataset has none (CheXpert validation, RSNA).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// RSNA only: grouped (by patient, the default) or rows (the published split by csv row,
    /// where a patient with several boxes can straddle two splits).
    #[arg(long, default_value = "grouped")]
    pub rsna_split: data::RsnaSplit,
    /// CheXpert and RSNA: the share held out for validation (default 0.1).
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// RSNA only: the share held out for testing (default 0.1).
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Read a labels table that lacks some of the 14 label columns, those labels blank (by
    /// default a missing label column is an error).
    #[arg(long)]
    pub allow_missing_labels: bool,
    /// Print the summary as one JSON object (the only output format).
    #[arg(long)]
    pub json: bool,
    /// Also print K pairs, one JSON object a line.
    #[arg(long, value_name = "K")]
    pub dump_pairs: Option<usize>,
}

pub fn run_data_stats(a: DataStatsArgs) -> Result<()> {
    let opts = data::ReadOptions {
        views: a.views,
        sections: a.sections,
        uncertain: a.uncertain,
        label_file: a.labels,
        reports_root: a.reports,
        seed: a.seed,
        rsna_split: a.rsna_split,
        valid_fraction: a.valid_fraction,
        test_fraction: a.test_fraction,
        allow_missing_labels: a.allow_missing_labels,
    };
    let mut ds = data::read(a.dataset, &a.root, &opts)?;
    if let Some(s) = &a.split {
        let want =
            data::Split::parse(s).ok_or_else(|| anyhow::anyhow!("unknown split '{s}' (train, validate, test)"))?;
        ds.pairs.retain(|p| p.split == want);
    }
    // Bad input: each item once with its place, then one summary line (all on stderr, so that
    // stdout stays machine-readable).
    let problems = ds.problems.sorted();
    const SHOW: usize = 50;
    for p in problems.iter().take(SHOW) {
        eprintln!("skipped: {}: {} ({})", p.kind, p.place, p.detail);
    }
    if problems.len() > SHOW {
        eprintln!("skipped: ... and {} more", problems.len() - SHOW);
    }
    eprintln!("data-stats: {}", ds.problems.summary());
    println!("{}", data::stats::summary_json(&ds));
    if let Some(k) = a.dump_pairs {
        for p in ds.pairs.iter().take(k) {
            println!("{}", data::stats::pair_json(ds.kind, p, a.uncertain));
        }
    }
    Ok(())
}

/// `coordinator prepare --dataset mimic --root DIR --out SHARDS`
#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Which dataset layout the root holds.
    #[arg(long)]
    pub dataset: data::DatasetKind,
    /// The dataset root as distributed.
    #[arg(long)]
    pub root: PathBuf,
    /// Shards folder to write (a second run resumes, skipping finished shards).
    #[arg(long)]
    pub out: PathBuf,
    /// Views to keep: a list such as PA,AP (the default) or `all`.
    #[arg(long, default_value = "PA,AP")]
    pub views: data::Views,
    /// Report text policy stored in the pairs table.
    #[arg(long, default_value = "paper")]
    pub sections: data::report::SectionPolicy,
    /// MIMIC label file: chexpert or negbio.
    #[arg(long, default_value = "chexpert")]
    pub labels: data::dataset::LabelFile,
    /// MIMIC-CXR reports root, when the reports are not under --root.
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// Seed of the splits made where a dataset has none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// RSNA only: grouped (by patient, the default) or rows (the published split by csv row,
    /// where a patient with several boxes can straddle two splits).
    #[arg(long, default_value = "grouped")]
    pub rsna_split: data::RsnaSplit,
    /// CheXpert and RSNA: the share held out for validation (default 0.1).
    #[arg(long)]
    pub valid_fraction: Option<f64>,
    /// RSNA only: the share held out for testing (default 0.1).
    #[arg(long)]
    pub test_fraction: Option<f64>,
    /// Read a labels table that lacks some of the 14 label columns, those labels blank (by
    /// default a missing label column is an error).
    #[arg(long)]
    pub allow_missing_labels: bool,
    /// The largest smaller side stored: bigger images are resized down to it (the published
    /// setup used 256), smaller ones are stored as decoded (never upscaled): 16..=8192.
    #[arg(long, default_value_t = 256)]
    pub short_side: usize,
    /// Images per shard file.
    #[arg(long, default_value_t = 2048)]
    pub shard_size: usize,
}

pub fn run_prepare(a: PrepareArgs) -> Result<()> {
    // Refused before the (long) read of the dataset.
    data::shards::check_short_side(a.short_side)?;
    let opts = data::ReadOptions {
        views: a.views,
        sections: a.sections,
        uncertain: data::UncertainPolicy::Zeros,
        label_file: a.labels,
        reports_root: a.reports,
        seed: a.seed,
        rsna_split: a.rsna_split,
        valid_fraction: a.valid_fraction,
        test_fraction: a.test_fraction,
        allow_missing_labels: a.allow_missing_labels,
    };
    let ds = data::read(a.dataset, &a.root, &opts)?;
    let name = format!("{:?}", a.dataset).to_lowercase();
    let progress = |done: usize, total: usize| {
        // A one-line progress bar on stderr.
        let width = 40;
        let filled = (done * width).checked_div(total).unwrap_or(width);
        eprint!("\rprepare [{}{}] {done}/{total} shards", "#".repeat(filled), " ".repeat(width - filled));
        if done == total {
            eprintln!();
        }
    };
    let s = data::shards::prepare(&ds, &name, &opts, &a.out, a.short_side, a.shard_size.max(1), &progress)?;
    for p in ds.problems.sorted().iter().take(50) {
        eprintln!("skipped: {}: {} ({})", p.kind, p.place, p.detail);
    }
    for why in &s.shards_redone {
        eprintln!("prepare: redone a finished shard that was damaged: {why}");
    }
    eprintln!(
        "prepare: {} images in {} shards ({} already done, skipped; {} damaged, redone) in {:.1} s; {} -> {}",
        s.images,
        s.shards,
        s.shards_skipped,
        s.shards_redone.len(),
        s.seconds,
        ds.problems.summary(),
        a.out.display()
    );
    Ok(())
}
