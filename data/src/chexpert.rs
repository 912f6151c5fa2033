//! CheXpert (`CheXpert-v1.0` and `-small`, or the same files under a folder of any name):
//! `train.csv` / `valid.csv` with Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 labels. There
//! are no reports.
//!
//! Splits, as the published study used them: `valid.csv` (radiologist labels) is the **test**
//! split; a seeded 10% of the training patients ([`VALIDATION_FRACTION`], drawn by patient, so no
//! patient straddles two splits) is the **validation** split; the rest of `train.csv` trains.
//!
//! Paths: the csv's `Path` column starts with the distribution's folder name
//! (`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`). The reader resolves it
//! against the folder that holds the csv whatever that folder is called (users rename it, mirrors
//! ship it as `chexpert/`): it tries the path with 0 to 3 leading components dropped on a sample of
//! rows and keeps the one under which most images exist (the distribution's layout first on a
//! tie). `Dataset::root` is that folder and `Pair::image` is relative to it
//! (`train/patient00001/...`). When no image resolves at all, reading fails with one line that says
//! how many rows there are, an example path tried and what to check.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use crate::dataset::{
    check_jpeg, stays_under_root, Dataset, DatasetKind, Pair, ProblemKind, Problems, ReadOptions, Split,
};
use crate::mimic::{col, parse_labels, read_rows, require_label_columns};
use crate::splits::stratified_split;

/// The five labels of the CheXpert competition, evaluated beside all 14.
pub use crate::labels::COMPETITION_FIVE;

/// The distribution's folder names.
pub const FOLDER_NAMES: [&str; 2] = ["CheXpert-v1.0-small", "CheXpert-v1.0"];

/// Share of the training patients that form the validation split.
pub const VALIDATION_FRACTION: f64 = 0.1;

/// Leading path components the reader may drop from the csv's paths.
const MAX_STRIP: usize = 3;

/// Rows looked at to decide how paths resolve.
const SAMPLE: usize = 64;

/// Finds the CheXpert folder: the root itself, a `CheXpert-v1.0*` folder inside it, or else the
/// one folder inside it that holds a `train.csv`.
fn locate(root: &Path) -> Option<PathBuf> {
    if root.join("train.csv").is_file() {
        return Some(root.to_path_buf());
    }
    for name in FOLDER_NAMES {
        let d = root.join(name);
        if d.join("train.csv").is_file() {
            return Some(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|d| d.join("train.csv").is_file())
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

/// The csv's path with its first `strip` components dropped, or None when nothing is left.
fn strip_components(rel: &str, strip: usize) -> Option<PathBuf> {
    let comps: Vec<&str> = rel.split(['/', '\\']).filter(|c| !c.is_empty() && *c != ".").collect();
    (comps.len() > strip).then(|| comps[strip..].iter().collect())
}

/// How many leading components to drop from the csv's paths so that they name files under `dir`:
/// the count under which most of an evenly spread sample of rows exists; on a tie, dropping the
/// first component when it is the distribution's folder name, else keeping the path whole.
/// When no sampled row resolves, all rows are tried before giving up with one line.
fn choose_strip(dir: &Path, rels: &[&str]) -> Result<usize> {
    if rels.is_empty() {
        return Ok(0);
    }
    let first_is_folder = FOLDER_NAMES.iter().any(|n| rels[0].starts_with(&format!("{n}/")));
    let mut preference: Vec<usize> = (0..=MAX_STRIP).collect();
    if first_is_folder {
        preference.swap(0, 1);
    }
    let exists = |rel: &str, k: usize| strip_components(rel, k).is_some_and(|p| dir.join(p).is_file());
    let step = rels.len().div_ceil(SAMPLE);
    let sample: Vec<&str> = rels.iter().step_by(step).copied().collect();
    let hits = |k: usize| sample.iter().filter(|r| exists(r, k)).count();
    let counts: Vec<(usize, usize)> = preference.iter().map(|&k| (k, hits(k))).collect();
    // max_by_key keeps the last maximum: reverse so that the preferred count wins ties.
    let (best, n) = counts.iter().rev().max_by_key(|(_, n)| *n).copied().unwrap_or((0, 0));
    if n > 0 {
        return Ok(best);
    }
    // The sample may have missed the few images that exist: look at every row.
    for &k in &preference {
        if rels.iter().any(|r| exists(r, k)) {
            return Ok(k);
        }
    }
    let ex = rels[0];
    let tried: Vec<String> = preference[..2]
        .iter()
        .filter_map(|&k| strip_components(ex, k))
        .map(|p| dir.join(p).display().to_string())
        .collect();
    bail!(
        "{}: none of the {} image paths in train.csv/valid.csv exists under it (e.g. {ex} looked for as {}); \
         check that the images were unpacked beside train.csv (its train/ and valid/ folders)",
        dir.display(),
        rels.len(),
        tried.join(" and ")
    )
}

/// A path that names a place from the file system's root (`/x`, `\\x`, `C:x`) rather than
/// from the dataset folder.
fn is_absolute_like(rel: &str) -> bool {
    let b = rel.as_bytes();
    rel.starts_with(['/', '\\']) || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// A row kept from the csv before its path is resolved.
struct Row {
    /// `file.csv:line`
    place: String,
    rel: String,
    pair: Pair,
    from_valid: bool,
}

/// Reads a CheXpert root (the dataset folder, whatever its name, or the folder holding it).
pub fn read(root: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let Some(dir) = locate(root) else {
        bail!(
            "{} is not a CheXpert root: missing train.csv (looked in it, in CheXpert-v1.0-small/, CheXpert-v1.0/ \
             and in its subfolders)",
            root.display()
        );
    };
    let problems = Problems::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut all_paths: Vec<String> = Vec::new();
    // Path -> where it was first read: a repeated row would count its image twice.
    let mut first_place: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (file, from_valid) in [("train.csv", false), ("valid.csv", true)] {
        let path = dir.join(file);
        if !path.is_file() {
            if from_valid {
                continue;
            }
            bail!("{} is not a CheXpert root: missing {file}", root.display());
        }
        let (h, table) = read_rows(&path, &problems)?;
        let (cp, cf, cap) = (col(&h, "Path", &path)?, col(&h, "Frontal/Lateral", &path)?, col(&h, "AP/PA", &path)?);
        require_label_columns(&h, &path, opts.allow_missing_labels, &problems)?;
        for (line, r) in table {
            let place = || format!("{}:{line}", path.display());
            let rel = r[cp].trim();
            if rel.is_empty() {
                problems.add(ProblemKind::NoFileNamed, place(), "empty Path");
                continue;
            }
            if is_absolute_like(rel) || rel.split(['/', '\\']).any(|c| c == "..") {
                problems.add(ProblemKind::OutsideRoot, place(), format!("'{rel}' leaves {}", dir.display()));
                continue;
            }
            if let Some(first) = first_place.get(rel) {
                problems.add(ProblemKind::DuplicateRow, place(), format!("{rel} repeats {first}; dropped"));
                continue;
            }
            first_place.insert(rel.to_string(), place());
            all_paths.push(rel.to_string());
            let view = if r[cf].trim().eq_ignore_ascii_case("lateral") {
                "LATERAL".to_string()
            } else {
                r[cap].trim().to_string()
            };
            if !opts.views.keeps(&view) {
                continue;
            }
            let Some(labels) = parse_labels(&h, &r, &place, &problems) else { continue };
            // Path: <folder>/<part>/patientNNNNN/studyN/viewN_kind.jpg
            let parts: Vec<&str> = rel.split('/').collect();
            let patient = parts.iter().find(|p| p.starts_with("patient")).copied().unwrap_or(rel).to_string();
            let study = parts.iter().find(|p| p.starts_with("study")).copied().unwrap_or("study1");
            rows.push(Row {
                place: place(),
                rel: rel.to_string(),
                pair: Pair {
                    subject_id: patient.clone(),
                    study_id: format!("{patient}/{study}"),
                    image: PathBuf::new(),
                    split: if from_valid { Split::Test } else { Split::Train },
                    view,
                    labels,
                    text: String::new(),
                    boxes: Vec::new(),
                },
                from_valid,
            });
        }
    }
    // Decided on every row, whatever the view filter keeps, so that the choice does not depend on it.
    let strip = choose_strip(&dir, &all_paths.iter().map(String::as_str).collect::<Vec<_>>())?;
    // Validation patients: a seeded fraction of the training patients (VALIDATION_FRACTION
    // unless the options say), by patient.
    let mut train_patients: Vec<(String, usize)> = rows
        .iter()
        .filter(|r| !r.from_valid)
        .map(|r| r.pair.subject_id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .map(|p| (p, 0))
        .collect();
    train_patients.sort();
    let valid = opts.valid_fraction.unwrap_or(VALIDATION_FRACTION);
    ensure!(valid > 0.0 && valid < 1.0, "the validation fraction {valid} is not in (0, 1)");
    let split = stratified_split(&train_patients, [1.0 - valid, valid, 0.0], opts.seed);
    let checked: Vec<Option<Pair>> = rows
        .into_par_iter()
        .map(|Row { place, rel, mut pair, from_valid }| {
            let Some(image) = strip_components(&rel, strip) else {
                problems.add(
                    ProblemKind::NoFileNamed,
                    place,
                    format!("'{rel}' has fewer than {} components", strip + 1),
                );
                return None;
            };
            if !stays_under_root(&image) {
                problems.add(ProblemKind::OutsideRoot, place, format!("'{rel}' leaves {}", dir.display()));
                return None;
            }
            let full = dir.join(&image);
            if let Err((kind, detail)) = check_jpeg(&full) {
                problems.add(kind, full.display().to_string(), detail);
                return None;
            }
            pair.image = image;
            if !from_valid {
                pair.split = split.get(&pair.subject_id).copied().unwrap_or(Split::Train);
            }
            Some(pair)
        })
        .collect();
    let pairs: Vec<Pair> = checked.into_iter().flatten().collect();
    let studies = pairs.iter().map(|p| p.study_id.as_str()).collect::<HashSet<_>>().len();
    let images = pairs.len();
    Ok(Dataset { kind: DatasetKind::Chexpert, root: dir, pairs, studies, images, problems })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_components_drops_leading_folders() {
        let r = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg";
        assert_eq!(strip_components(r, 0).unwrap(), PathBuf::from(r));
        assert_eq!(
            strip_components(r, 1).unwrap(),
            PathBuf::from("train").join("patient00001").join("study1").join("view1_frontal.jpg")
        );
        assert_eq!(strip_components("./train/a.jpg", 1).unwrap(), PathBuf::from("a.jpg"));
        assert!(strip_components("a.jpg", 1).is_none());
    }
}
