//! The coordinator's side of a fine-tuning run: its settings, and the validation at every
//! epoch's end, which picks the run's result (the best epoch's checkpoint, in `best.json`).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::index::PairIndex;
use super::OnValidation;

/// `best.json` in a fine-tuning run folder: the epoch whose validation macro AUC was best.
pub const BEST: &str = "best.json";

/// What a fine-tuning run trains on.
pub struct FtSettings {
    /// Label names (in head order) and their indices in `data::LABELS`.
    pub labels: Vec<String>,
    pub columns: Vec<usize>,
    pub policy: data::UncertainPolicy,
    /// Per label negatives / positives; empty when unweighted.
    pub pos_weight: Vec<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Best {
    pub step: u64,
    pub valid_macro_auc: f64,
    pub checkpoint: PathBuf,
}

impl Best {
    pub fn read(run_dir: &Path) -> Option<Best> {
        let text = std::fs::read_to_string(run_dir.join(BEST)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// The supervisor's hook for a fine-tuning run: merges the ranks' validation logits of a step,
/// computes the validation macro AUC over the run's labels, and records the best step.
pub fn validation_hook(run_dir: &Path, ft: FtSettings, index: &PairIndex) -> Result<OnValidation<'static>> {
    let n = index.valid.len();
    let l = ft.columns.len();
    // Truth of every validation image (by its id, its position in the list), under the policy.
    let mut truth: Vec<Option<bool>> = vec![None; n * l];
    for e in &index.valid {
        let row = e.pair_id as usize;
        ensure!(row < n, "validation entry {row} out of range");
        for (k, &c) in ft.columns.iter().enumerate() {
            let v = worker::feed::decode_label(e.label_values.get(c));
            truth[row * l + k] = ft.policy.apply(v).map(|t| t > 0.5);
        }
    }
    let images: Vec<String> = index.valid.iter().map(|e| e.image.clone()).collect();
    let run_dir = run_dir.to_path_buf();
    let labels = ft.labels.clone();
    let mut best = Best::read(&run_dir);
    Ok(Box::new(move |step: u64, parts: Vec<PathBuf>| {
        let mut scores = vec![f64::NAN; n * l];
        let mut seen = vec![false; n];
        let mut failed = 0usize;
        for path in &parts {
            let part = worker::embed::read_part(path)?;
            ensure!(part.labels == l, "{}: {} logits per image, expected {l}", path.display(), part.labels);
            for (k, &id) in part.image_ids.iter().enumerate() {
                let row = id as usize;
                ensure!(row < n && !seen[row], "{}: validation image {id} out of range or twice", path.display());
                seen[row] = true;
                for j in 0..l {
                    scores[row * l + j] = part.logits[k * l + j] as f64;
                }
            }
            failed += part.failed.len();
        }
        // Unreadable images are left out of the validation AUC.
        let keep: Vec<usize> = (0..n).filter(|&i| seen[i]).collect();
        ensure!(!keep.is_empty(), "no validation image could be read at step {step}");
        let preds = eval::Predictions {
            images: keep.iter().map(|&i| images[i].clone()).collect(),
            patients: keep.iter().map(|&i| images[i].clone()).collect(),
            labels: labels.clone(),
            scores: keep.iter().flat_map(|&i| scores[i * l..(i + 1) * l].iter().copied()).collect(),
            truth: keep.iter().flat_map(|&i| truth[i * l..(i + 1) * l].iter().copied()).collect(),
        };
        let m = preds.macro_auc()?;
        // A tiny validation split may hold no label with both classes: then there is nothing to
        // choose by, the step is reported without a value and the run's result stays the last
        // epoch's checkpoint.
        let Some(auc) = m.macro_auc else {
            return Ok(json!({ "step": step, "valid_macro_auc": null, "valid_images": keep.len(),
                "note": "no label has both classes in the validation split" }));
        };
        if best.as_ref().is_none_or(|b| auc > b.valid_macro_auc) {
            let b = Best { step, valid_macro_auc: auc, checkpoint: super::checkpoint_dir(&run_dir, step) };
            super::write_json_atomically(&run_dir.join(BEST), &b)?;
            best = Some(b);
        }
        Ok(json!({ "step": step, "valid_macro_auc": auc, "valid_images": keep.len(), "valid_unreadable": failed }))
    }))
}
