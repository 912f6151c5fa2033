//! Reading a training run's `metrics.jsonl` into series over steps.
//!
//! The file is being appended to while a plan runs: a missing file, an unfinished last line
//! or a line without some field are normal, and give shorter series (and a note), not errors.

use std::collections::BTreeMap;
use std::fs;

use serde_json::Value;

use super::TrainingCurve;

/// A run's series, each sorted by step, one point per step (the last line of a step wins).
pub struct Series {
    pub run: String,
    pub setting: String,
    pub kind: String,
    /// The metrics file read.
    pub metrics: String,
    pub loss: Vec<(f64, f64)>,
    pub logit_scale: Vec<(f64, f64)>,
    pub valid_macro_auc: Vec<(f64, f64)>,
}

impl Series {
    pub fn is_empty(&self) -> bool {
        self.loss.is_empty() && self.logit_scale.is_empty() && self.valid_macro_auc.is_empty()
    }
}

/// Every curve's series; what could not be read is said in `notes`.
pub fn read_all(curves: &[TrainingCurve], notes: &mut Vec<String>) -> Vec<Series> {
    curves.iter().map(|c| read(c, notes)).collect()
}

fn read(curve: &TrainingCurve, notes: &mut Vec<String>) -> Series {
    let mut loss = BTreeMap::new();
    let mut scale = BTreeMap::new();
    let mut auc = BTreeMap::new();
    match fs::read_to_string(&curve.metrics) {
        Err(e) => notes.push(format!("training curve of {}: {} not read ({e})", curve.run, curve.metrics)),
        Ok(text) => {
            let mut bad = 0usize;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let Ok(v) = serde_json::from_str::<Value>(line) else {
                    bad += 1;
                    continue;
                };
                let Some(step) = v.get("step").and_then(Value::as_f64).filter(|s| s.is_finite()) else {
                    bad += 1;
                    continue;
                };
                // Steps are whole numbers; the key keeps their order without float compares.
                let key = step as i64;
                let field = |name: &str| v.get(name).and_then(Value::as_f64).filter(|x| x.is_finite());
                if let Some(x) = field("loss") {
                    loss.insert(key, (step, x));
                }
                if let Some(x) = field("logit_scale") {
                    scale.insert(key, (step, x));
                }
                if let Some(x) = field("valid_macro_auc") {
                    auc.insert(key, (step, x));
                }
            }
            if bad > 0 {
                notes.push(format!(
                    "training curve of {}: {bad} unreadable line(s) in {} skipped",
                    curve.run, curve.metrics
                ));
            }
        }
    }
    Series {
        run: curve.run.clone(),
        setting: curve.setting.clone(),
        kind: curve.kind.clone(),
        metrics: curve.metrics.clone(),
        loss: loss.into_values().collect(),
        logit_scale: scale.into_values().collect(),
        valid_macro_auc: auc.into_values().collect(),
    }
}
