//! RSNA Pneumonia: `stage_2_train_labels.csv` (patientId, x, y, width, height, Target; one row per
//! box) and DICOM images `stage_2_train_images/{patientId}.dcm`. One pair per patient, its boxes
//! listed; split train / validate / test 70 / 15 / 15, stratified by Target and grouped by patient
//! (the published setup split by row, which leaks patients with several boxes into test).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::dataset::{Dataset, DatasetKind, Pair, ProblemKind, Problems, ReadOptions, Split};
use crate::labels::{LabelValue, NUM_LABELS};
use crate::mimic::{col, read_rows};
use crate::splits::stratified_split;

pub const LABELS_CSV: &str = "stage_2_train_labels.csv";
pub const IMAGES: &str = "stage_2_train_images";
/// Index of Pneumonia in the 14 labels: RSNA's one label.
pub const PNEUMONIA: usize = 7;

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
    // patientId -> (target, boxes); BTreeMap keeps the pair order independent of hashing.
    let mut patients: BTreeMap<String, (bool, Vec<[f32; 4]>)> = BTreeMap::new();
    for (line, r) in rows {
        let place = format!("{}:{line}", csv.display());
        let id = r[cid].trim();
        if id.is_empty() {
            problems.add(ProblemKind::NoFileNamed, place, "empty patientId");
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
        let e = patients.entry(id.to_string()).or_insert((false, Vec::new()));
        e.0 |= target;
        if target {
            let v: Option<Vec<f32>> = [cx, cy, cw, ch].iter().map(|&c| r[c].trim().parse::<f32>().ok()).collect();
            match v {
                Some(b) => e.1.push([b[0], b[1], b[2], b[3]]),
                None => problems.add(ProblemKind::MalformedRow, place, "Target 1 without a numeric box"),
            }
        }
    }
    let groups: Vec<(String, usize)> = patients.iter().map(|(k, v)| (k.clone(), v.0 as usize)).collect();
    let split = stratified_split(&groups, [0.7, 0.15, 0.15], opts.seed);
    let pairs: Vec<Option<Pair>> = patients
        .into_par_iter()
        .map(|(id, (target, boxes))| {
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
            let mut labels = [LabelValue::Blank; NUM_LABELS];
            labels[PNEUMONIA] = if target { LabelValue::Positive } else { LabelValue::Negative };
            Some(Pair {
                subject_id: id.clone(),
                study_id: id.clone(),
                image: rel,
                split: split.get(&id).copied().unwrap_or(Split::Train),
                view,
                labels,
                text: String::new(),
                boxes,
            })
        })
        .collect();
    let pairs: Vec<Pair> = pairs.into_iter().flatten().collect();
    let n = pairs.len();
    Ok(Dataset { kind: DatasetKind::Rsna, root: root.to_path_buf(), pairs, studies: n, images: n, problems })
}

/// Opens a DICOM file and checks that its pixel data is all there; returns its ViewPosition.
fn check_dicom(path: &Path) -> Result<String> {
    use dicom_dictionary_std::tags;
    let obj = dicom_object::open_file(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows = obj.element(tags::ROWS).map_err(|e| anyhow::anyhow!("{e}"))?.to_int::<u32>()?;
    let cols = obj.element(tags::COLUMNS).map_err(|e| anyhow::anyhow!("{e}"))?.to_int::<u32>()?;
    let bits = obj.element(tags::BITS_ALLOCATED).map_err(|e| anyhow::anyhow!("{e}"))?.to_int::<u32>()?;
    let px = obj.element(tags::PIXEL_DATA).map_err(|e| anyhow::anyhow!("{e}"))?;
    let need = rows as usize * cols as usize * (bits as usize).div_ceil(8);
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
