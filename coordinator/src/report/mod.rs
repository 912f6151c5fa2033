//! The study's report: `results.md`, `results.json`, `results.csv` and `plots/*.png`, written
//! into a folder from plain data (a [`Report`]), and [`table`], the paper's table for the
//! terminal.
//!
//! The report knows nothing of workers or plans: the plan executor gathers the finished runs'
//! numbers into a [`Report`] and calls [`write`] after each run, so every file is rewritten
//! whole each call (temporary name, then rename) and a plan that is half done gives a report
//! with empty cells and fewer plots, never an error. AUCs, CIs and differences are on the 0-1
//! scale in the input and in `results.json` / `results.csv`; the tables show them in %.
//!
//! Files:
//! - `results.md`: the paper's table (settings x datasets, macro AUC % [95% CI], the published
//!   ViT-B/32 figure beside ours where a setting matches the paper), the paired differences, the
//!   per-label tables, the ablation tables, retrieval, zero-shot and training, the run folder of
//!   every number, links to the plots and notes on what could not be read or drawn.
//! - `results.json`: `{"title", "rows", "comparisons", "retrieval", "zero_shot", "training"}`,
//!   the input as given (a non-finite number is `null`); ROC points are left out (they are in
//!   each run's `predictions.csv`).
//! - `results.csv`: long format, one line per row and label: the columns are `run, setting,
//!   kind, dataset, split, fraction, ablation, ablation_value, label, auc, ci95_low, ci95_high,
//!   images, patients, run_dir`; each row gives first a line with label `(macro)` (the macro
//!   AUC and its CI), then one line per label (CI empty). Zero-shot and retrieval are in the
//!   other two files only.
//! - `plots/training.png` (loss per run kind, logit scale, validation AUC over steps),
//!   `plots/roc_<dataset>_<split>.png` (a panel per label, a line per setting),
//!   `plots/ablation_<name>_<dataset>_<split>.png` (macro AUC against the swept value, 95% CI
//!   as error bars). PNGs this call did not draw are removed from `plots/`.

mod csv;
mod layout;
mod markdown;
mod metrics;
mod plots;
mod terminal;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use model::checkpoint::write_file_atomically;
use serde::{Deserialize, Serialize};

/// Everything the report shows, gathered by the caller from the finished runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The heading, e.g. "cxrclip demo study".
    pub title: String,
    /// Linear-probe and fine-tuning evaluations (main settings and ablations).
    pub rows: Vec<ResultRow>,
    /// Paired differences between two rows on the same test images.
    pub comparisons: Vec<Comparison>,
    pub retrieval: Vec<RetrievalRow>,
    pub zero_shot: Vec<ZeroShotRow>,
    /// Training runs whose `metrics.jsonl` is plotted.
    pub training: Vec<TrainingCurve>,
    /// ROC curves of the main settings, one set per evaluated run.
    pub rocs: Vec<RocSet>,
    /// Text-to-image runs: one row of the figure each.
    #[serde(default)]
    pub text_to_image: Vec<TextToImageRow>,
}

/// A text-to-image run: per finding, the image generated from a report sentence naming it and
/// the real test image that sentence comes from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextToImageRow {
    pub run: String,
    /// The model's setting: "rand", "CLIP", "CLS", ...
    pub setting: String,
    pub steps: usize,
    pub size: usize,
    pub cells: Vec<TextToImageCell>,
    pub seconds: f64,
    pub run_dir: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TextToImageCell {
    pub finding: String,
    /// The text the image was optimised for (the real report's sentence when there is one).
    pub prompt: String,
    /// PNG paths: the generated image, and the real one resampled to the same size.
    pub generated: String,
    pub real: Option<String>,
    /// The real image's file in the dataset.
    pub real_source: Option<String>,
    /// cos(generated image, its prompt), the image seen whole.
    pub similarity: f64,
    /// Whether its own prompt is the most similar of the run's prompts.
    pub own_prompt_wins: bool,
    /// A linear probe fitted on the model's features of the real training images: the
    /// generated image's probability of its finding, and the mean probability over the real
    /// test images positive and negative for it (`None`: the dataset's labels lack it).
    #[serde(default)]
    pub probe: Option<f64>,
    #[serde(default)]
    pub probe_real_positive: Option<f64>,
    #[serde(default)]
    pub probe_real_negative: Option<f64>,
}

/// One evaluation: a setting on a dataset's split (at a fraction, maybe in an ablation).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultRow {
    pub run: String,
    /// The paper's name for the setting: "rand + LP", "CLIP + LP", "FT", "CLS + FT", "CLS + LP"
    /// (others are shown after these, in the order they come).
    pub setting: String,
    /// The run kind, e.g. "linear-probe" or "finetune".
    pub kind: String,
    pub dataset: String,
    pub split: String,
    /// The fraction of the training labels used, when not all.
    pub fraction: Option<f64>,
    /// Set on the rows of a sweep; rows without it are the main table's.
    pub ablation: Option<Ablation>,
    /// Mean ROC AUC over the labels with both classes in the split, 0-1.
    pub macro_auc: f64,
    /// 95% confidence interval of `macro_auc`, [low, high].
    pub ci95: [f64; 2],
    /// ROC AUC per label, 0-1 (non-finite when the split has one class only).
    pub per_label: BTreeMap<String, f64>,
    /// Test images and patients evaluated.
    pub images: usize,
    pub patients: usize,
    /// The run folder the numbers come from (shown beside every number).
    pub run_dir: String,
}

/// The swept parameter of an ablation row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ablation {
    /// "label fraction", "pretraining-data fraction", "global batch", "seed", ...
    pub name: String,
    pub value: f64,
}

/// A paired difference `macro_auc(a) - macro_auc(b)` on the same test images.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    /// Run names.
    pub a: String,
    pub b: String,
    pub setting_a: String,
    pub setting_b: String,
    pub dataset: String,
    pub split: String,
    /// 0-1 scale.
    pub diff: f64,
    pub ci95: [f64; 2],
}

/// Retrieval on a test split (one report per study).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetrievalRow {
    pub run: String,
    /// The checkpoint's setting, e.g. "CLS" or "CLIP".
    pub setting: String,
    pub dataset: String,
    pub split: String,
    pub image_to_report: Recall,
    pub report_to_image: Recall,
    pub images: usize,
    pub reports: usize,
    pub run_dir: String,
}

/// Recall@K (0-1) and the median rank (1 = first) of the right item, one direction.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Recall {
    pub at1: f64,
    pub at5: f64,
    pub at10: f64,
    pub median_rank: f64,
}

/// Zero-shot classification with one scoring method.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZeroShotRow {
    pub run: String,
    /// The checkpoint's setting, e.g. "CLS" or "CLIP".
    pub setting: String,
    pub dataset: String,
    pub split: String,
    /// "prompt pair" or "neutral prompt".
    pub method: String,
    pub macro_auc: f64,
    pub ci95: [f64; 2],
    pub per_label: BTreeMap<String, f64>,
    pub run_dir: String,
}

/// A training run's metrics file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainingCurve {
    pub run: String,
    pub setting: String,
    /// "pretrain-cls" or "finetune": losses of different kinds get different panels.
    pub kind: String,
    /// Path of its `metrics.jsonl` (lines `{"step", "loss", "lr", "logit_scale", ...}`, and
    /// `{"step", "valid_macro_auc"}` at the epoch ends of a fine-tuning run).
    pub metrics: String,
}

/// ROC curves of one evaluated run, one per label.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RocSet {
    pub run: String,
    pub setting: String,
    pub dataset: String,
    pub split: String,
    pub curves: Vec<RocCurve>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RocCurve {
    pub label: String,
    pub auc: f64,
    /// (false positive rate, true positive rate), from (0, 0) to (1, 1).
    pub points: Vec<(f64, f64)>,
}

/// What [`write`] did.
#[derive(Debug, Default)]
pub struct Written {
    /// Every file written, tables first, then plots.
    pub files: Vec<PathBuf>,
    /// What was skipped and why (a metrics file not there yet, a plot that failed); also at
    /// the end of `results.md`.
    pub notes: Vec<String>,
}

/// Writes the report into `dir` (created if needed), replacing an earlier one.
pub fn write(report: &Report, dir: &Path) -> Result<Written> {
    let plot_dir = dir.join("plots");
    fs::create_dir_all(&plot_dir).with_context(|| format!("creating {}", plot_dir.display()))?;
    let mut notes = Vec::new();
    let curves = metrics::read_all(&report.training, &mut notes);
    // A plot that cannot be drawn is a note, not a failed report: the tables matter more.
    let drawn = plots::draw_all(report, &curves, &plot_dir, &mut notes);
    remove_stale_plots(&plot_dir, &drawn)?;

    let mut files = Vec::new();
    let md = markdown::render(report, &curves, &drawn, &notes);
    let json = serde_json::to_vec_pretty(&JsonReport::of(report)).context("encoding results.json")?;
    for (name, bytes) in [("results.md", md.into_bytes()), ("results.json", json), ("results.csv", csv::render(report))]
    {
        let path = dir.join(name);
        write_file_atomically(&path, &bytes)?;
        files.push(path);
    }
    files.extend(drawn.iter().map(|p| p.path.clone()));
    Ok(Written { files, notes })
}

/// The paper's table and the paired differences as aligned text, for the terminal.
pub fn table(report: &Report) -> String {
    terminal::render(report)
}

/// `results.json`: the report without the ROC points.
#[derive(Serialize)]
struct JsonReport<'a> {
    title: &'a str,
    rows: &'a [ResultRow],
    comparisons: &'a [Comparison],
    retrieval: &'a [RetrievalRow],
    zero_shot: &'a [ZeroShotRow],
    training: &'a [TrainingCurve],
    text_to_image: &'a [TextToImageRow],
}

impl<'a> JsonReport<'a> {
    fn of(r: &'a Report) -> Self {
        JsonReport {
            title: &r.title,
            rows: &r.rows,
            comparisons: &r.comparisons,
            retrieval: &r.retrieval,
            zero_shot: &r.zero_shot,
            training: &r.training,
            text_to_image: &r.text_to_image,
        }
    }
}

/// Removes the PNGs of an earlier call that this call did not draw (a plot whose data went
/// away, e.g. a rerun plan without an ablation), so `plots/` holds this report's plots only.
fn remove_stale_plots(plot_dir: &Path, drawn: &[plots::Drawn]) -> Result<()> {
    for entry in fs::read_dir(plot_dir).with_context(|| format!("listing {}", plot_dir.display()))? {
        let path = entry?.path();
        let is_png = path.extension().is_some_and(|e| e == "png");
        if is_png && !drawn.iter().any(|d| d.path == path) {
            fs::remove_file(&path).with_context(|| format!("removing the stale plot {}", path.display()))?;
        }
    }
    Ok(())
}
