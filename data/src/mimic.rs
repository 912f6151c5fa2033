//! MIMIC-CXR-JPG as distributed: `files/pXX/pSUBJECT/sSTUDY/DICOM.jpg`, the metadata, split and
//! label csv files (plain or gzipped), and the MIMIC-CXR reports `files/pXX/pSUBJECT/sSTUDY.txt`
//! under the same root or a reports root of their own.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rayon::prelude::*;

use crate::csvio::{find_table, parse_table, read_table_bytes};
use crate::dataset::{
    check_jpeg, stays_under_root, Dataset, DatasetKind, LabelFile, Pair, ProblemKind, Problems, ReadOptions, Split,
};
use crate::labels::{label_index, LabelValue, LABELS, NUM_LABELS};
use crate::report::select_text;

pub const METADATA: &str = "mimic-cxr-2.0.0-metadata.csv";
pub const SPLIT: &str = "mimic-cxr-2.0.0-split.csv";
pub const CHEXPERT: &str = "mimic-cxr-2.0.0-chexpert.csv";
pub const NEGBIO: &str = "mimic-cxr-2.0.0-negbio.csv";

/// A table: its header and its (line number, cells) rows.
pub(crate) type Table = (Vec<String>, Vec<(u64, Vec<String>)>);

/// Reads a csv table as header + rows. A row that does not parse (an unbalanced quote) or has
/// another width than the header is reported with its line and left out; a truncated gzip or a
/// table without a header is an error naming the file.
pub(crate) fn read_rows(path: &Path, problems: &Problems) -> Result<Table> {
    let bytes = read_table_bytes(path)?;
    let t = parse_table(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for (line, why) in t.bad {
        problems.add(ProblemKind::MalformedRow, format!("{}:{line}", path.display()), why);
    }
    let width = t.header.len();
    let mut rows = Vec::with_capacity(t.rows.len());
    for (line, r) in t.rows {
        if r.len() != width {
            problems.add(
                ProblemKind::MalformedRow,
                format!("{}:{line}", path.display()),
                format!("{} fields, expected {width}", r.len()),
            );
            continue;
        }
        rows.push((line, r));
    }
    Ok((t.header, rows))
}

pub(crate) fn col(header: &[String], name: &str, path: &Path) -> Result<usize> {
    header.iter().position(|h| h == name).ok_or_else(|| anyhow::anyhow!("{} has no '{name}' column", path.display()))
}

/// Checks that a labels table has every one of the 14 label columns. A missing column is an
/// error naming the file and the columns, unless `allow` (then each is one problem and its
/// labels read as blank).
pub(crate) fn require_label_columns(header: &[String], path: &Path, allow: bool, problems: &Problems) -> Result<()> {
    let missing: Vec<&str> = LABELS.iter().copied().filter(|l| !header.iter().any(|h| h == l)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !allow {
        bail!(
            "{} has no column for {} (of the 14 labels): a damaged or foreign labels table; \
             --allow-missing-labels reads those labels as blank",
            path.display(),
            missing.join(", ")
        );
    }
    for l in missing {
        problems.add(ProblemKind::MissingLabelColumn, path.display().to_string(), format!("no '{l}' column"));
    }
    Ok(())
}

/// Parses the 14 labels of a row by header name; an unknown value is reported and fails the row.
pub(crate) fn parse_labels(
    header: &[String],
    row: &[String],
    place: &dyn Fn() -> String,
    problems: &Problems,
) -> Option<[LabelValue; NUM_LABELS]> {
    let mut l = [LabelValue::Blank; NUM_LABELS];
    for (h, cell) in header.iter().zip(row) {
        if let Some(i) = label_index(h) {
            match LabelValue::parse(cell) {
                Some(v) => l[i] = v,
                None => {
                    problems.add(ProblemKind::UnknownLabel, place(), format!("'{cell}' for {h}"));
                    return None;
                }
            }
        }
    }
    Some(l)
}

fn image_rel(subject: &str, study: &str, dicom: &str) -> PathBuf {
    let prefix = &subject[..subject.len().min(2)];
    PathBuf::from("files")
        .join(format!("p{prefix}"))
        .join(format!("p{subject}"))
        .join(format!("s{study}"))
        .join(format!("{dicom}.jpg"))
}

/// Finds a study's report under a reports root given as the folder holding `files/` or `files/`
/// itself.
fn report_path(reports: &Path, subject: &str, study: &str) -> Option<PathBuf> {
    let prefix = &subject[..subject.len().min(2)];
    let tail = PathBuf::from(format!("p{prefix}")).join(format!("p{subject}")).join(format!("s{study}.txt"));
    let a = reports.join("files").join(&tail);
    if a.is_file() {
        return Some(a);
    }
    let b = reports.join(&tail);
    b.is_file().then_some(b)
}

/// Reads a MIMIC-CXR-JPG root.
pub fn read(root: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let label_name = match opts.label_file {
        LabelFile::Chexpert => CHEXPERT,
        LabelFile::Negbio => NEGBIO,
    };
    let meta = find_table(root, METADATA);
    let split = find_table(root, SPLIT);
    let labels = find_table(root, label_name);
    let mut missing = Vec::new();
    for (t, n) in [(&meta, METADATA), (&split, SPLIT), (&labels, label_name)] {
        if t.is_none() {
            missing.push(format!("{n}(.gz)"));
        }
    }
    if !root.join("files").is_dir() {
        missing.push("files/".into());
    }
    if !missing.is_empty() {
        bail!("{} is not a MIMIC-CXR-JPG root: missing {}", root.display(), missing.join(", "));
    }
    let (meta, split, labels) = (meta.unwrap_or_default(), split.unwrap_or_default(), labels.unwrap_or_default());
    let problems = Problems::default();

    let (h, rows) = read_rows(&split, &problems)?;
    let (cd, cs) = (col(&h, "dicom_id", &split)?, col(&h, "split", &split)?);
    let mut splits: HashMap<String, Split> = HashMap::with_capacity(rows.len());
    for (line, r) in rows {
        match Split::parse(&r[cs]) {
            Some(s) => {
                splits.insert(r[cd].trim().to_string(), s);
            }
            None => problems.add(
                ProblemKind::MalformedRow,
                format!("{}:{line}", split.display()),
                format!("unknown split '{}'", r[cs]),
            ),
        }
    }

    let (h, rows) = read_rows(&labels, &problems)?;
    let cst = col(&h, "study_id", &labels)?;
    require_label_columns(&h, &labels, opts.allow_missing_labels, &problems)?;
    let mut study_labels: HashMap<String, Option<[LabelValue; NUM_LABELS]>> = HashMap::with_capacity(rows.len());
    for (line, r) in &rows {
        let place = || format!("{}:{line}", labels.display());
        // A row with an unknown value is skipped whole: its study's pairs go with it.
        study_labels.insert(r[cst].trim().to_string(), parse_labels(&h, r, &place, &problems));
    }

    let (h, rows) = read_rows(&meta, &problems)?;
    let (cdi, csu, cst, cv) = (
        col(&h, "dicom_id", &meta)?,
        col(&h, "subject_id", &meta)?,
        col(&h, "study_id", &meta)?,
        col(&h, "ViewPosition", &meta)?,
    );
    // A repeated image would be trained on twice: the first row of each dicom_id is kept.
    let mut first_line: HashMap<&str, u64> = HashMap::with_capacity(rows.len());
    let mut unique = Vec::with_capacity(rows.len());
    for (line, r) in &rows {
        match first_line.get(r[cdi].trim()) {
            Some(first) => problems.add(
                ProblemKind::DuplicateRow,
                format!("{}:{line}", meta.display()),
                format!("dicom_id {} repeats line {first}; dropped", r[cdi].trim()),
            ),
            None => {
                first_line.insert(r[cdi].trim(), *line);
                unique.push((*line, r));
            }
        }
    }
    let reports_root = opts.reports_root.clone().unwrap_or_else(|| root.to_path_buf());
    let results: Vec<(bool, Option<Pair>)> = unique
        .par_iter()
        .filter(|(_, r)| opts.views.keeps(&r[cv]))
        .map(|(line, r)| {
            let (dicom, subject, study) = (r[cdi].trim(), r[csu].trim(), r[cst].trim());
            let place = format!("{}:{line}", meta.display());
            if dicom.is_empty() || subject.is_empty() || study.is_empty() {
                problems.add(ProblemKind::NoFileNamed, place, "empty dicom_id, subject_id or study_id");
                return (false, None);
            }
            let rel = image_rel(subject, study, dicom);
            if !stays_under_root(&rel) {
                problems.add(ProblemKind::OutsideRoot, place, format!("{} leaves {}", rel.display(), root.display()));
                return (false, None);
            }
            if let Err((kind, detail)) = check_jpeg(&root.join(&rel)) {
                problems.add(kind, root.join(&rel).display().to_string(), detail);
                return (false, None);
            }
            let Some(sp) = splits.get(dicom) else {
                problems.add(ProblemKind::MissingSplit, place, format!("{dicom} is not in {}", split.display()));
                return (true, None);
            };
            let lab = match study_labels.get(study) {
                Some(Some(l)) => *l,
                // The row was bad (already reported): skip without counting twice.
                Some(None) => return (true, None),
                // Studies the labeller did not cover keep blank labels, as in the real files.
                None => [LabelValue::Blank; NUM_LABELS],
            };
            let Some(rp) = report_path(&reports_root, subject, study) else {
                problems.add(
                    ProblemKind::MissingReport,
                    reports_root
                        .join(format!("files/p{}/p{subject}/s{study}.txt", &subject[..subject.len().min(2)]))
                        .display()
                        .to_string(),
                    "no report for study",
                );
                return (true, None);
            };
            let text = match std::fs::read(&rp) {
                Ok(b) => select_text(&String::from_utf8_lossy(&b), opts.sections),
                Err(e) => {
                    problems.add(ProblemKind::MissingReport, rp.display().to_string(), e.to_string());
                    return (true, None);
                }
            };
            let pair = Pair {
                subject_id: subject.to_string(),
                study_id: study.to_string(),
                image: rel,
                split: *sp,
                view: r[cv].trim().to_string(),
                labels: lab,
                text,
                boxes: Vec::new(),
            };
            (true, Some(pair))
        })
        .collect();
    let images = results.iter().filter(|(ok, _)| *ok).count();
    let pairs: Vec<Pair> = results.into_iter().filter_map(|(_, p)| p).collect();
    let studies = pairs.iter().map(|p| p.study_id.as_str()).collect::<HashSet<_>>().len();
    Ok(Dataset { kind: DatasetKind::Mimic, root: root.to_path_buf(), pairs, studies, images, problems })
}
