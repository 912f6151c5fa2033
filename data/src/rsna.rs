//! RSNA Pneumonia: `stage_2_train_labels.csv` (patientId, x, y, width, height, Target; one row per
//! box, one row with Target 0 for a patient without) and DICOM images
//! `stage_2_train_images/{patientId}.dcm`.
//!
//! Splits (`ReadOptions::rsna_split`), both 80 / 10 / 10 train / validate / test ([`FRACTIONS`],
//! or `ReadOptions::valid_fraction` / `test_fraction`;
//! the published study's 10% test), stratified by Target and seeded:
//! - `grouped` (the default): one pair per patient with all its boxes, split by patient;
//! - `rows`: the published study's split by csv row. One pair per csv row (its own box), so a
//!   patient with several boxes gives several pairs of the same image, and these can fall in
//!   different splits (the study's leak of patients into test). `Dataset::images` still counts
//!   each image once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use crate::dataset::{
    stays_under_root, Dataset, DatasetKind, Pair, ProblemKind, Problems, ReadOptions, RsnaSplit, Split,
};
use crate::labels::{LabelValue, NUM_LABELS};
use crate::mimic::{col, read_rows};
use crate::splits::stratified_split;

pub const LABELS_CSV: &str = "stage_2_train_labels.csv";
pub const IMAGES: &str = "stage_2_train_images";
/// Index of Pneumonia in the 14 labels: RSNA's one label.
pub const PNEUMONIA: usize = 7;
/// Train / validate / test shares (the published study's 10% test).
pub const FRACTIONS: [f64; 3] = [0.8, 0.1, 0.1];

/// Reads an RSNA Pneumonia root.
pub fn read(root: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let csv = root.join(LABELS_CSV);
    let mut missing = Vec::new();
    if !csv.is_file() {
        missing.push(LABELS_CSV.to_string());
    }
    if !root.join(IMAGES).is_dir() {
        missing.push(format!("{IMAGES}/"));
    }
    if !missing.is_empty() {
        bail!("{} is not an RSNA Pneumonia root: missing {}", root.display(), missing.join(", "));
    }
    let problems = Problems::default();
    let (h, rows) = read_rows(&csv, &problems)?;
    let (cid, cx, cy, cw, ch, ct) = (
        col(&h, "patientId", &csv)?,
        col(&h, "x", &csv)?,
        col(&h, "y", &csv)?,
        col(&h, "width", &csv)?,
        col(&h, "height", &csv)?,
        col(&h, "Target", &csv)?,
    );
    // patientId -> its rows; BTreeMap keeps the pair order independent of hashing.
    let mut patients: BTreeMap<String, Patient> = BTreeMap::new();
    for (line, r) in rows {
        let place = format!("{}:{line}", csv.display());
        let id = r[cid].trim();
        if id.is_empty() {
            problems.add(ProblemKind::NoFileNamed, place, "empty patientId");
            continue;
        }
        if !stays_under_root(Path::new(id)) || id.contains(['/', '\\']) {
            problems.add(ProblemKind::OutsideRoot, place, format!("patientId '{id}' is not a file name"));
            continue;
        }
        let target = match r[ct].trim() {
            "1" | "1.0" => true,
            "0" | "0.0" => false,
            o => {
                problems.add(ProblemKind::UnknownLabel, place, format!("Target '{o}'"));
                continue;
            }
        };
        let e = patients.entry(id.to_string()).or_default();
        let bx = if target {
            let v: Option<Vec<f32>> = [cx, cy, cw, ch].iter().map(|&c| r[c].trim().parse::<f32>().ok()).collect();
            match v {
                Some(b) => Some([b[0], b[1], b[2], b[3]]),
                // Still a positive patient: only the box is lost.
                None => {
                    problems.add(ProblemKind::MalformedRow, place, "Target 1 without a numeric box");
                    None
                }
            }
        } else {
            None
        };
        e.target |= target;
        e.boxes.extend(bx);
        e.rows.push((target, bx));
    }
    // The units split: patients, or csv rows keyed `patientId#k` (its k-th row).
    let groups: Vec<(String, usize)> = match opts.rsna_split {
        RsnaSplit::Grouped => patients.iter().map(|(k, v)| (k.clone(), v.target as usize)).collect(),
        RsnaSplit::Rows => patients
            .iter()
            .flat_map(|(k, v)| v.rows.iter().enumerate().map(move |(i, r)| (format!("{k}#{i}"), r.0 as usize)))
            .collect(),
    };
    let valid = opts.valid_fraction.unwrap_or(FRACTIONS[1]);
    let test = opts.test_fraction.unwrap_or(FRACTIONS[2]);
    ensure!(
        valid > 0.0 && test > 0.0 && valid + test < 1.0,
        "validation {valid} and test {test} fractions must be > 0 and leave training data"
    );
    let split = stratified_split(&groups, [1.0 - valid - test, valid, test], opts.seed);
    let per_patient: Vec<Option<Vec<Pair>>> = patients
        .into_par_iter()
        .map(|(id, Patient { target, boxes, rows })| {
            let rel = PathBuf::from(IMAGES).join(format!("{id}.dcm"));
            let full = root.join(&rel);
            if !full.is_file() {
                problems.add(ProblemKind::MissingFile, full.display().to_string(), "no such file");
                return None;
            }
            let view = match check_dicom(&full) {
                Ok(v) => v,
                Err(e) => {
                    problems.add(ProblemKind::CorruptImage, full.display().to_string(), format!("{e:#}"));
                    return None;
                }
            };
            if !opts.views.keeps(&view) && !view.is_empty() {
                return None;
            }
            let pair = |target: bool, boxes: Vec<[f32; 4]>, key: &str| {
                let mut labels = [LabelValue::Blank; NUM_LABELS];
                labels[PNEUMONIA] = if target { LabelValue::Positive } else { LabelValue::Negative };
                Pair {
                    subject_id: id.clone(),
                    study_id: id.clone(),
                    image: rel.clone(),
                    split: split.get(key).copied().unwrap_or(Split::Train),
                    view: view.clone(),
                    labels,
                    text: String::new(),
                    boxes,
                }
            };
            Some(match opts.rsna_split {
                RsnaSplit::Grouped => vec![pair(target, boxes, &id)],
                RsnaSplit::Rows => rows
                    .iter()
                    .enumerate()
                    .map(|(i, (t, b))| pair(*t, b.iter().copied().collect(), &format!("{id}#{i}")))
                    .collect(),
            })
        })
        .collect();
    let images = per_patient.iter().flatten().count();
    let pairs: Vec<Pair> = per_patient.into_iter().flatten().flatten().collect();
    Ok(Dataset { kind: DatasetKind::Rsna, root: root.to_path_buf(), pairs, studies: images, images, problems })
}

/// A patient's rows as read: any Target 1, its boxes, and each row's (Target, box).
#[derive(Default)]
struct Patient {
    target: bool,
    boxes: Vec<[f32; 4]>,
    rows: Vec<(bool, Option<[f32; 4]>)>,
}

/// Opens a DICOM file and checks that its pixel data is all there; returns its ViewPosition.
fn check_dicom(path: &Path) -> Result<String> {
    use dicom_dictionary_std::tags;
    let obj = crate::dicom::open_checked(path)?;
    let (cols, rows) = crate::dicom::checked_dims(&obj)?;
    let bits = obj.element(tags::BITS_ALLOCATED).map_err(|e| anyhow::anyhow!("{e}"))?.to_int::<u32>()?;
    let px = obj.element(tags::PIXEL_DATA).map_err(|e| anyhow::anyhow!("{e}"))?;
    let need = rows * cols * (bits as usize).div_ceil(8);
    if let Ok(bytes) = px.value().to_bytes() {
        // Encapsulated (compressed) data has no fixed size; native data must be complete.
        if px.value().fragments().is_none() && bytes.len() < need {
            bail!("pixel data has {} bytes, {need} needed (truncated)", bytes.len());
        }
    }
    let view = obj
        .element_opt(tags::VIEW_POSITION)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()))
        .unwrap_or_default();
    Ok(view)
}
