//! A finished run's record (`done.json` in its folder: written last, so its presence means the
//! run is done and a resumed plan skips it), and the report gathered from all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plan::{Plan, RunKind};
use crate::report::{
    Comparison, Report, ResultRow, RetrievalRow, RocCurve, RocSet, TextToImageRow, TrainingCurve, ZeroShotRow,
};

use super::PlanDirs;

pub const DONE: &str = "done.json";

/// What a finished run left.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub name: String,
    pub kind: String,
    /// The paper's name of the setting ("CLS + LP", "FT", ...).
    pub setting: String,
    pub dataset: String,
    /// The model other runs start from (training runs).
    pub checkpoint: Option<PathBuf>,
    /// The training metrics (training runs).
    pub metrics: Option<PathBuf>,
    pub rows: Vec<ResultRow>,
    pub zero_shot: Vec<ZeroShotRow>,
    pub retrieval: Vec<RetrievalRow>,
    /// A text-to-image run's figure column data.
    #[serde(default)]
    pub text_to_image: Option<TextToImageRow>,
    /// Per evaluated row (dataset:split), its `predictions.csv`, for paired comparisons and ROC
    /// curves.
    pub predictions: BTreeMap<String, PathBuf>,
    /// Wall time of the run, seconds.
    pub seconds: f64,
}

impl RunResult {
    /// The record of the run in `dir`, if it finished.
    pub fn read(dir: &Path) -> Result<Option<RunResult>> {
        let path = dir.join(DONE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        model::checkpoint::write_file_atomically(&dir.join(DONE), serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// The pairs of settings whose paired difference the paper's claims rest on: (a, b) reads
/// "a minus b".
const CLAIMS: [(&str, &str); 5] =
    [("CLS + LP", "FT"), ("CLS + LP", "rand + LP"), ("FT", "rand + LP"), ("CLS + FT", "FT"), ("CLS + LP", "CLIP + LP")];

/// The report of every finished run of `plan`, with the paired comparisons of the main rows.
pub fn gather(plan: &Plan, dirs: &PlanDirs, title: &str, bootstrap: &eval::BootstrapConfig) -> Result<Report> {
    let mut report = Report { title: title.to_string(), ..Report::default() };
    let mut done: Vec<RunResult> = Vec::new();
    for run in &plan.runs {
        if let Some(r) = RunResult::read(&dirs.run(&run.name))? {
            done.push(r);
        }
    }
    for r in &done {
        report.rows.extend(r.rows.iter().cloned());
        report.zero_shot.extend(r.zero_shot.iter().cloned());
        report.retrieval.extend(r.retrieval.iter().cloned());
        report.text_to_image.extend(r.text_to_image.iter().cloned());
        if let Some(m) = &r.metrics {
            report.training.push(TrainingCurve {
                run: r.name.clone(),
                setting: r.setting.clone(),
                kind: r.kind.clone(),
                metrics: m.to_string_lossy().into_owned(),
            });
        }
    }
    // ROC curves and comparisons of the main rows (an ablation's full-data point has its own).
    let main: Vec<(&RunResult, &ResultRow)> = done
        .iter()
        .flat_map(|r| r.rows.iter().map(move |row| (r, row)))
        .filter(|(_, row)| row.ablation.is_none())
        .collect();
    for (r, row) in &main {
        let key = format!("{}:{}", row.dataset, row.split);
        let Some(path) = r.predictions.get(&key) else { continue };
        let p = eval::Predictions::read_csv(path)?;
        let mut curves = Vec::new();
        for (l, label) in p.labels.iter().enumerate() {
            let (scores, truth) = p.label_column(l);
            if let Some(auc) = eval::auc::roc_auc(&scores, &truth) {
                curves.push(RocCurve { label: label.clone(), auc, points: eval::auc::roc_curve(&scores, &truth) });
            }
        }
        report.rocs.push(RocSet {
            run: row.run.clone(),
            setting: row.setting.clone(),
            dataset: row.dataset.clone(),
            split: row.split.clone(),
            curves,
        });
    }
    for (sa, sb) in CLAIMS {
        for (ra, a) in main.iter().filter(|(_, row)| row.setting == sa) {
            for (rb, b) in main.iter().filter(|(_, row)| row.setting == sb) {
                if a.dataset != b.dataset || a.split != b.split {
                    continue;
                }
                let key = format!("{}:{}", a.dataset, a.split);
                let (Some(pa), Some(pb)) = (ra.predictions.get(&key), rb.predictions.get(&key)) else { continue };
                let (pa, pb) = (eval::Predictions::read_csv(pa)?, eval::Predictions::read_csv(pb)?);
                let d = eval::bootstrap::paired_difference(&pa, &pb, bootstrap)
                    .with_context(|| format!("comparing {} with {}", a.run, b.run))?;
                report.comparisons.push(Comparison {
                    a: a.run.clone(),
                    b: b.run.clone(),
                    setting_a: sa.to_string(),
                    setting_b: sb.to_string(),
                    dataset: a.dataset.clone(),
                    split: a.split.clone(),
                    diff: d.diff,
                    ci95: d.ci95,
                });
            }
        }
    }
    Ok(report)
}

/// The paper's name of a setting: what a run does, and what its model started as.
pub fn setting(kind: RunKind, origin: &str) -> String {
    match kind {
        RunKind::PretrainCls => "CLS".into(),
        RunKind::Finetune if origin == "CLS" => "CLS + FT".into(),
        RunKind::Finetune => "FT".into(),
        RunKind::LinearProbe => format!("{origin} + LP"),
        RunKind::ZeroShot => format!("{origin} zero-shot"),
        RunKind::Retrieval => format!("{origin} retrieval"),
        RunKind::TextToImage => format!("{origin} text-to-image"),
    }
}
