//! CheXpert (`CheXpert-v1.0` and `-small`): `train.csv` / `valid.csv` with Path, Sex, Age,
//! Frontal/Lateral, AP/PA and the 14 labels. There are no reports. `valid.csv` (radiologist
//! labels) is our test split; a seeded 5% of the training patients form the validation split.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::dataset::{check_jpeg, Dataset, DatasetKind, Pair, ProblemKind, Problems, ReadOptions, Split};
use crate::mimic::{col, parse_labels, read_rows};
use crate::splits::stratified_split;

/// The five labels of the CheXpert competition, evaluated beside all 14.
pub use crate::labels::COMPETITION_FIVE;

/// Finds the CheXpert folder: the root itself or a `CheXpert-v1.0*` folder inside it.
fn locate(root: &Path) -> Option<PathBuf> {
    if root.join("train.csv").is_file() {
        return Some(root.to_path_buf());
    }
    for name in ["CheXpert-v1.0-small", "CheXpert-v1.0"] {
        let d = root.join(name);
        if d.join("train.csv").is_file() {
            return Some(d);
        }
    }
    None
}

/// Reads a CheXpert root (the dataset folder or the folder holding it).
pub fn read(root: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let Some(dir) = locate(root) else {
        bail!(
            "{} is not a CheXpert root: missing train.csv (looked in it and in CheXpert-v1.0-small/, CheXpert-v1.0/)",
            root.display()
        );
    };
    // Paths in the csv start with the dataset folder's own name: they are relative to its parent.
    let base = dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let problems = Problems::default();
    let mut raw: Vec<(Pair, bool)> = Vec::new();
    for (file, is_valid) in [("train.csv", false), ("valid.csv", true)] {
        let path = dir.join(file);
        if !path.is_file() {
            if is_valid {
                continue;
            }
            bail!("{} is not a CheXpert root: missing {file}", root.display());
        }
        let (h, rows) = read_rows(&path, &problems)?;
        let (cp, cf, cap) = (col(&h, "Path", &path)?, col(&h, "Frontal/Lateral", &path)?, col(&h, "AP/PA", &path)?);
        for (line, r) in rows {
            let place = || format!("{}:{line}", path.display());
            let rel = r[cp].trim();
            if rel.is_empty() {
                problems.add(ProblemKind::NoFileNamed, place(), "empty Path");
                continue;
            }
            let view = if r[cf].trim().eq_ignore_ascii_case("lateral") {
                "LATERAL".to_string()
            } else {
                r[cap].trim().to_string()
            };
            if !opts.views.keeps(&view) {
                continue;
            }
            let Some(labels) = parse_labels(&h, &r, &place, &problems) else { continue };
            let mut comps = rel.split('/');
            let image: PathBuf = if rel.starts_with(&format!("{dir_name}/")) {
                PathBuf::from(rel)
            } else {
                PathBuf::from(&dir_name).join(rel)
            };
            // Path: <dir>/<part>/patientNNNNN/studyN/viewN_kind.jpg
            let _ = comps.next();
            let parts: Vec<&str> = rel.split('/').collect();
            let patient = parts.iter().find(|p| p.starts_with("patient")).copied().unwrap_or(rel).to_string();
            let study = parts.iter().find(|p| p.starts_with("study")).copied().unwrap_or("study1");
            raw.push((
                Pair {
                    subject_id: patient.clone(),
                    study_id: format!("{patient}/{study}"),
                    image,
                    split: if is_valid { Split::Test } else { Split::Train },
                    view,
                    labels,
                    text: String::new(),
                    boxes: Vec::new(),
                },
                is_valid,
            ));
        }
    }
    // Validation patients: 5% of the training patients, seeded, by patient.
    let train_patients: Vec<(String, usize)> = raw
        .iter()
        .filter(|(_, v)| !v)
        .map(|(p, _)| p.subject_id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|p| (p, 0))
        .collect();
    let split = stratified_split(&train_patients, [0.95, 0.05, 0.0], opts.seed);
    let checked: Vec<Option<Pair>> = raw
        .into_par_iter()
        .map(|(mut p, valid)| {
            let full = base.join(&p.image);
            if let Err((kind, detail)) = check_jpeg(&full) {
                problems.add(kind, full.display().to_string(), detail);
                return None;
            }
            if !valid {
                p.split = split.get(&p.subject_id).copied().unwrap_or(Split::Train);
            }
            Some(p)
        })
        .collect();
    let pairs: Vec<Pair> = checked.into_iter().flatten().collect();
    let studies = pairs.iter().map(|p| p.study_id.as_str()).collect::<HashSet<_>>().len();
    let images = pairs.len();
    Ok(Dataset { kind: DatasetKind::Chexpert, root: base, pairs, studies, images, problems })
}
