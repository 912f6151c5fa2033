//! A split's predictions (one score per image and label, with the truth or a mask), their macro
//! AUC and AP, and the `predictions.csv` file that every evaluated run folder holds.
//!
//! `predictions.csv` is a contract read by people and by the report: columns `image`, `patient`,
//! then for each label `<label>` (the score) and `<label>:truth` (`1`, `0`, or empty when the
//! label is masked for that image). Scores are written in Rust's shortest round-trip form, so a
//! file read back gives the same numbers bit for bit.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::auc::{average_precision, roc_auc};

const TRUTH_SUFFIX: &str = ":truth";

/// One split's predictions: `n` images by `L` labels, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    /// Image identifiers, unique.
    pub images: Vec<String>,
    /// The patient of each image (the bootstrap resamples patients).
    pub patients: Vec<String>,
    pub labels: Vec<String>,
    /// `n x L` row-major scores; any order-preserving score works (probabilities, logits).
    pub scores: Vec<f64>,
    /// `n x L` row-major truth; `None` = masked (left out of that label's metrics).
    pub truth: Vec<Option<bool>>,
}

/// A macro mean over the labels that have both classes among their unmasked rows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MacroAuc {
    /// Mean of the defined per-label AUCs; `None` when no label has both classes.
    pub macro_auc: Option<f64>,
    /// Per label, in `labels` order; `None` where a class is absent.
    pub per_label: Vec<Option<f64>>,
    /// How many labels the macro mean is over.
    pub used: usize,
}

/// Average precision per label and its macro mean, over the same labels as [`MacroAuc`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MacroAp {
    pub macro_ap: Option<f64>,
    pub per_label: Vec<Option<f64>>,
    pub used: usize,
}

impl Predictions {
    pub fn rows(&self) -> usize {
        self.images.len()
    }

    /// Checks shapes, unique images and label names, and that no score is NaN (the metrics would
    /// otherwise have to drop the label silently).
    pub fn validate(&self) -> Result<()> {
        let (n, l) = (self.images.len(), self.labels.len());
        ensure!(l > 0, "predictions have no label");
        ensure!(self.patients.len() == n, "predictions: {} patients for {} images", self.patients.len(), n);
        ensure!(self.scores.len() == n * l, "predictions: {} scores for {n} images x {l} labels", self.scores.len());
        ensure!(self.truth.len() == n * l, "predictions: {} truth cells for {n} images x {l} labels", self.truth.len());
        let mut seen = HashSet::new();
        for label in &self.labels {
            ensure!(!label.is_empty(), "predictions: an empty label name");
            ensure!(label != "image" && label != "patient", "predictions: label name {label:?} is a reserved column");
            ensure!(!label.ends_with(TRUTH_SUFFIX), "predictions: label name {label:?} ends with {TRUTH_SUFFIX:?}");
            ensure!(seen.insert(label.as_str()), "predictions: label {label:?} appears twice");
        }
        let mut seen = HashSet::new();
        for image in &self.images {
            ensure!(seen.insert(image.as_str()), "predictions: image {image:?} appears twice");
        }
        if let Some(k) = self.scores.iter().position(|s| s.is_nan()) {
            bail!("predictions: the score of image {:?}, label {:?} is NaN", self.images[k / l], self.labels[k % l]);
        }
        Ok(())
    }

    /// The unmasked `(scores, truth)` of label `l`.
    pub fn label_column(&self, l: usize) -> (Vec<f64>, Vec<bool>) {
        let nl = self.labels.len();
        let mut scores = Vec::new();
        let mut truth = Vec::new();
        for i in 0..self.rows() {
            if let Some(t) = self.truth[i * nl + l] {
                scores.push(self.scores[i * nl + l]);
                truth.push(t);
            }
        }
        (scores, truth)
    }

    fn per_label(&self, metric: fn(&[f64], &[bool]) -> Option<f64>) -> Result<(Option<f64>, Vec<Option<f64>>, usize)> {
        self.validate()?;
        let mut per_label = Vec::with_capacity(self.labels.len());
        for l in 0..self.labels.len() {
            let (scores, truth) = self.label_column(l);
            let both = truth.iter().any(|&t| t) && truth.iter().any(|&t| !t);
            per_label.push(if both { metric(&scores, &truth) } else { None });
        }
        let defined: Vec<f64> = per_label.iter().flatten().copied().collect();
        let mean = (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64);
        Ok((mean, per_label, defined.len()))
    }

    /// ROC AUC per label and the macro mean over labels with both classes among unmasked rows.
    pub fn macro_auc(&self) -> Result<MacroAuc> {
        let (macro_auc, per_label, used) = self.per_label(roc_auc)?;
        Ok(MacroAuc { macro_auc, per_label, used })
    }

    /// Average precision per label and its macro mean, over the labels with both classes.
    pub fn macro_ap(&self) -> Result<MacroAp> {
        let (macro_ap, per_label, used) = self.per_label(average_precision)?;
        Ok(MacroAp { macro_ap, per_label, used })
    }

    /// Writes `predictions.csv` (see the module doc) to a temporary name beside `path`, then
    /// renames it into place, so a reader never sees half a file.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let file_name = path.file_name().with_context(|| format!("{} has no file name", path.display()))?;
        let tmp = path.with_file_name(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
        let write = || -> Result<()> {
            let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let mut w = csv::Writer::from_writer(std::io::BufWriter::new(file));
            let mut header = vec!["image".to_string(), "patient".to_string()];
            for label in &self.labels {
                header.push(label.clone());
                header.push(format!("{label}{TRUTH_SUFFIX}"));
            }
            w.write_record(&header)?;
            let l = self.labels.len();
            let mut record: Vec<String> = Vec::with_capacity(header.len());
            for i in 0..self.rows() {
                record.clear();
                record.push(self.images[i].clone());
                record.push(self.patients[i].clone());
                for k in 0..l {
                    // Debug is the shortest form that parses back to the same f64.
                    record.push(format!("{:?}", self.scores[i * l + k]));
                    record.push(match self.truth[i * l + k] {
                        Some(true) => "1".into(),
                        Some(false) => "0".into(),
                        None => String::new(),
                    });
                }
                w.write_record(&record)?;
            }
            let mut inner = w.into_inner().map_err(|e| anyhow::anyhow!("flushing: {}", e.error()))?;
            inner.flush()?;
            inner.get_ref().sync_all()?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(e.context(format!("writing {}", path.display())));
        }
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    }

    /// Reads a `predictions.csv`; refuses a file whose columns do not follow the contract.
    pub fn read_csv(path: &Path) -> Result<Predictions> {
        let read = || -> Result<Predictions> {
            let mut r = csv::Reader::from_path(path)?;
            let header: Vec<String> = r.headers()?.iter().map(str::to_string).collect();
            ensure!(
                header.len() >= 4 && header[0] == "image" && header[1] == "patient" && header.len().is_multiple_of(2),
                "the header must be image, patient, then <label>, <label>:truth pairs; found {header:?}"
            );
            let mut labels = Vec::new();
            for pair in header[2..].chunks(2) {
                ensure!(
                    pair[1] == format!("{}{TRUTH_SUFFIX}", pair[0]),
                    "column {:?} must be followed by {:?}, found {:?}",
                    pair[0],
                    format!("{}{TRUTH_SUFFIX}", pair[0]),
                    pair[1]
                );
                labels.push(pair[0].clone());
            }
            let mut p = Predictions { images: vec![], patients: vec![], labels, scores: vec![], truth: vec![] };
            for (k, record) in r.records().enumerate() {
                let record = record?;
                let line = k + 2;
                p.images.push(record[0].to_string());
                p.patients.push(record[1].to_string());
                for (j, label) in p.labels.iter().enumerate() {
                    let score = &record[2 + 2 * j];
                    let score: f64 = score
                        .parse()
                        .with_context(|| format!("line {line}: score {score:?} of {label:?} is not a number"))?;
                    p.scores.push(score);
                    p.truth.push(match &record[3 + 2 * j] {
                        "1" => Some(true),
                        "0" => Some(false),
                        "" => None,
                        other => bail!("line {line}: truth {other:?} of {label:?} is not 1, 0 or empty"),
                    });
                }
            }
            p.validate()?;
            Ok(p)
        };
        read().with_context(|| format!("reading {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_predictions(seed: u64, n: usize) -> Predictions {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let labels = vec!["Atelectasis".to_string(), "Pleural Effusion".into(), "Odd, \"quoted\" name".into()];
        let l = labels.len();
        Predictions {
            images: (0..n).map(|i| format!("p{}/s{i}/img{i}.jpg", i / 3)).collect(),
            patients: (0..n).map(|i| format!("p{}", i / 3)).collect(),
            scores: (0..n * l)
                .map(|k| match k % 7 {
                    0 => 1e-300 * rng.random::<f64>(),
                    1 => -rng.random::<f64>() * 1e5,
                    _ => rng.random::<f64>(),
                })
                .collect(),
            truth: (0..n * l).map(|_| [Some(true), Some(false), None][rng.random_range(0..3)]).collect(),
            labels,
        }
    }

    #[test]
    fn csv_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.csv");
        let p = random_predictions(3, 40);
        p.write_csv(&path).unwrap();
        let back = Predictions::read_csv(&path).unwrap();
        assert_eq!(back, p);
        // Only the file itself is left behind (the temporary was renamed).
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let text = fs::read_to_string(&path).unwrap();
        let header = text.lines().next().unwrap();
        assert_eq!(
            header,
            "image,patient,Atelectasis,Atelectasis:truth,Pleural Effusion,Pleural Effusion:truth,\
             \"Odd, \"\"quoted\"\" name\",\"Odd, \"\"quoted\"\" name:truth\""
        );
    }

    #[test]
    fn read_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        for (text, needle) in [
            ("image,patient,A,B:truth\nx,p,0.1,1\n", "must be followed by"),
            ("img,patient,A,A:truth\nx,p,0.1,1\n", "header"),
            ("image,patient,A,A:truth\nx,p,0.1,2\n", "line 2: truth \"2\""),
            ("image,patient,A,A:truth\nx,p,abc,1\n", "line 2: score \"abc\""),
            ("image,patient,A,A:truth\nx,p,NaN,1\n", "NaN"),
            ("image,patient,A,A:truth\nx,p,0.1,1\nx,p,0.2,0\n", "appears twice"),
        ] {
            fs::write(&path, text).unwrap();
            let err = format!("{:#}", Predictions::read_csv(&path).unwrap_err());
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn macro_auc_uses_labels_with_both_classes() {
        // Label A: AUC 1 (0.9 positive above 0.1 negative; row 3 masked would spoil it).
        // Label B: only positives among unmasked rows -> undefined, left out.
        // Label C: AUC 0.5 (a tie).
        let p = Predictions {
            images: vec!["a".into(), "b".into(), "c".into()],
            patients: vec!["p".into(), "q".into(), "r".into()],
            labels: vec!["A".into(), "B".into(), "C".into()],
            scores: vec![0.9, 0.2, 0.4, 0.1, 0.3, 0.4, 0.95, 0.7, 0.0],
            truth: vec![Some(true), Some(true), Some(true), Some(false), None, Some(false), None, Some(true), None],
        };
        let m = p.macro_auc().unwrap();
        assert_eq!(m.per_label, vec![Some(1.0), None, Some(0.5)]);
        assert_eq!(m.used, 2);
        assert_eq!(m.macro_auc, Some(0.75));
        let ap = p.macro_ap().unwrap();
        // A: one positive on top -> 1; C: the tie gives precision 1/2 at recall 1.
        assert_eq!(ap.per_label, vec![Some(1.0), None, Some(0.5)]);
        assert_eq!(ap.macro_ap, Some(0.75));
        let mut bad = p.clone();
        bad.scores[4] = f64::NAN;
        assert!(format!("{:#}", bad.macro_auc().unwrap_err()).contains("NaN"));
    }
}
