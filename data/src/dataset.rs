//! What every reader produces: pairs (an image, its report text, its labels, its split) and an
//! account of the bad input it skipped.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use crate::labels::{LabelValue, UncertainPolicy, NUM_LABELS};
use crate::report::SectionPolicy;

/// Which split a pair belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Validate,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validate => "validate",
            Split::Test => "test",
        }
    }
    pub fn parse(s: &str) -> Option<Split> {
        match s.trim() {
            "train" => Some(Split::Train),
            "validate" | "valid" | "val" | "validation" => Some(Split::Validate),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// One image with its study's report and labels.
#[derive(Clone, Debug)]
pub struct Pair {
    pub subject_id: String,
    pub study_id: String,
    /// Image path relative to the dataset root.
    pub image: PathBuf,
    pub split: Split,
    /// View position as the dataset states it (PA, AP, LATERAL, LL, ...).
    pub view: String,
    pub labels: [LabelValue; NUM_LABELS],
    /// Report text after the section policy (empty where a dataset has no reports).
    pub text: String,
    /// Bounding boxes (x, y, width, height) in pixels: RSNA only.
    pub boxes: Vec<[f32; 4]>,
}

/// Which datasets exist: what a root is read as, and which layout the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    Mimic,
    Chexpert,
    Rsna,
}

impl DatasetKind {
    pub const ALL: [DatasetKind; 3] = [DatasetKind::Mimic, DatasetKind::Chexpert, DatasetKind::Rsna];

    /// The name the command line and the plan use.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mimic => "mimic",
            DatasetKind::Chexpert => "chexpert",
            DatasetKind::Rsna => "rsna",
        }
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DatasetKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown dataset '{s}' (mimic, chexpert, rsna)"))
    }
}

/// RSNA Pneumonia's one label.
const PNEUMONIA_ONLY: [&str; 1] = ["Pneumonia"];

/// The labels a dataset has, by name as in [`crate::LABELS`]: MIMIC-CXR and CheXpert the 14,
/// RSNA Pneumonia only Pneumonia.
pub fn dataset_labels(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Mimic | DatasetKind::Chexpert => &crate::labels::LABELS,
        DatasetKind::Rsna => &PNEUMONIA_ONLY,
    }
}

/// The labels evaluated by default, as the published study did: MIMIC-CXR the 14, CheXpert the
/// five competition labels, RSNA Pneumonia.
pub fn default_eval_labels(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Mimic => &crate::labels::LABELS,
        DatasetKind::Chexpert => &crate::labels::COMPETITION_FIVE,
        DatasetKind::Rsna => &PNEUMONIA_ONLY,
    }
}

/// Which views to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Views {
    All,
    Only(Vec<String>),
}

impl Default for Views {
    fn default() -> Self {
        Views::Only(vec!["PA".into(), "AP".into()])
    }
}

impl Views {
    pub fn keeps(&self, view: &str) -> bool {
        match self {
            Views::All => true,
            Views::Only(v) => v.iter().any(|x| x.eq_ignore_ascii_case(view.trim())),
        }
    }
}

impl FromStr for Views {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(Views::All);
        }
        let v: Vec<String> = s.split(',').map(|x| x.trim().to_ascii_uppercase()).filter(|x| !x.is_empty()).collect();
        if v.is_empty() {
            return Err("--views needs a list such as PA,AP or 'all'".into());
        }
        Ok(Views::Only(v))
    }
}

/// MIMIC ships two labellers' outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LabelFile {
    #[default]
    Chexpert,
    Negbio,
}

impl FromStr for LabelFile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chexpert" => Ok(LabelFile::Chexpert),
            "negbio" => Ok(LabelFile::Negbio),
            o => Err(format!("unknown label file '{o}' (chexpert, negbio)")),
        }
    }
}

/// How RSNA Pneumonia is split (see `rsna`): by patient, or by csv row as the published study did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RsnaSplit {
    /// One pair per patient; 80 / 10 / 10 by patient, stratified by Target.
    #[default]
    Grouped,
    /// One pair per csv row (a patient with several boxes gives several pairs of the same image);
    /// 80 / 10 / 10 by row, stratified by Target, so such a patient can straddle the splits.
    Rows,
}

impl RsnaSplit {
    pub fn name(self) -> &'static str {
        match self {
            RsnaSplit::Grouped => "grouped",
            RsnaSplit::Rows => "rows",
        }
    }
}

impl FromStr for RsnaSplit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grouped" => Ok(RsnaSplit::Grouped),
            "rows" => Ok(RsnaSplit::Rows),
            o => Err(format!("unknown RSNA split '{o}' (grouped, rows)")),
        }
    }
}

impl fmt::Display for RsnaSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reader options.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    pub views: Views,
    pub sections: SectionPolicy,
    pub uncertain: UncertainPolicy,
    pub label_file: LabelFile,
    /// Where the MIMIC-CXR reports are, when not under the image root.
    pub reports_root: Option<PathBuf>,
    /// Seed of the splits made where a dataset has none.
    pub seed: u64,
    /// RSNA Pneumonia's split: grouped by patient (the default) or the published study's by row.
    pub rsna_split: RsnaSplit,
    /// The fraction of the training patients (CheXpert) or of all units (RSNA) held out for
    /// validation; `None`: the reader's default (0.1 for both).
    pub valid_fraction: Option<f64>,
    /// RSNA only: the fraction of units held out for testing; `None`: 0.1.
    pub test_fraction: Option<f64>,
    /// Read a labels table that lacks some of the 14 label columns, those labels blank (and
    /// listed among the problems); by default a missing column is an error.
    pub allow_missing_labels: bool,
}

/// Whether a path taken from a table stays under the root it is joined to: relative, and made
/// only of plain names (no `..`, no root or drive prefix), so that a csv cannot point the
/// reader at `../../etc/passwd` or `/etc/passwd`.
pub fn stays_under_root(rel: &Path) -> bool {
    use std::path::Component;
    rel.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && !rel.to_string_lossy().contains('\\')
}

/// What kind of bad input was met.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    MissingFile,
    CorruptImage,
    MalformedRow,
    UnknownLabel,
    NoFileNamed,
    MissingReport,
    MissingSplit,
    /// A row repeating an earlier row's image (dropped: it would count the image twice).
    DuplicateRow,
    /// A row whose image path leaves the data root (`..`, an absolute path).
    OutsideRoot,
    /// A label column the table lacks, read as blank because the options allow it.
    MissingLabelColumn,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::MissingFile => "missing file",
            ProblemKind::CorruptImage => "corrupt or truncated image",
            ProblemKind::MalformedRow => "malformed csv line",
            ProblemKind::UnknownLabel => "unknown label value",
            ProblemKind::NoFileNamed => "row names no file",
            ProblemKind::MissingReport => "missing report",
            ProblemKind::MissingSplit => "no split for image",
            ProblemKind::DuplicateRow => "duplicate row",
            ProblemKind::OutsideRoot => "image path outside the data root",
            ProblemKind::MissingLabelColumn => "missing label column (read as blank)",
        })
    }
}

/// One skipped item.
#[derive(Clone, Debug)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The file (and line, for csv rows) concerned.
    pub place: String,
    pub detail: String,
}

/// Bad input met while reading: each counted once, kept with its place, summarised at the end.
#[derive(Debug, Default)]
pub struct Problems {
    list: Mutex<Vec<Problem>>,
}

impl Problems {
    pub fn add(&self, kind: ProblemKind, place: impl Into<String>, detail: impl Into<String>) {
        let p = Problem { kind, place: place.into(), detail: detail.into() };
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }
    pub fn len(&self) -> usize {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All problems, sorted by place so that reports do not depend on thread timing.
    pub fn sorted(&self) -> Vec<Problem> {
        let mut v = self.list.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort_by(|a, b| (a.kind, &a.place).cmp(&(b.kind, &b.place)));
        v
    }
    /// "N skipped: 2 missing file, 1 malformed csv line".
    pub fn summary(&self) -> String {
        let v = self.sorted();
        let mut counts: Vec<(ProblemKind, usize)> = Vec::new();
        for p in &v {
            match counts.iter_mut().find(|(k, _)| *k == p.kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((p.kind, 1)),
            }
        }
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        format!("{} skipped: {}", v.len(), if parts.is_empty() { "none".into() } else { parts.join(", ") })
    }
}

/// A dataset as read.
#[derive(Debug)]
pub struct Dataset {
    pub kind: DatasetKind,
    pub root: PathBuf,
    pub pairs: Vec<Pair>,
    /// Distinct studies among the pairs.
    pub studies: usize,
    /// Readable images that passed the view filter.
    pub images: usize,
    pub problems: Problems,
}

impl Dataset {
    /// The absolute path of a pair's image.
    pub fn image_path(&self, p: &Pair) -> PathBuf {
        self.root.join(&p.image)
    }
}

/// Reads any of the three datasets.
pub fn read(kind: DatasetKind, root: &Path, opts: &ReadOptions) -> anyhow::Result<Dataset> {
    match kind {
        DatasetKind::Mimic => crate::mimic::read(root, opts),
        DatasetKind::Chexpert => crate::chexpert::read(root, opts),
        DatasetKind::Rsna => crate::rsna::read(root, opts),
    }
}

/// A cheap JPEG check without decoding: a start-of-image marker first and an end-of-image marker
/// last (some encoders pad after it). Catches empty, truncated and non-JPEG files.
pub fn check_jpeg(path: &Path) -> Result<(), (ProblemKind, String)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err((ProblemKind::MissingFile, "no such file".into()))
        }
        Err(e) => return Err((ProblemKind::MissingFile, e.to_string())),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 4 {
        return Err((ProblemKind::CorruptImage, format!("{len} bytes")));
    }
    let mut head = [0u8; 3];
    let tail_n = len.min(64) as usize;
    let mut tail = vec![0u8; tail_n];
    let ok = f.read_exact(&mut head).is_ok()
        && f.seek(SeekFrom::End(-(tail_n as i64))).is_ok()
        && f.read_exact(&mut tail).is_ok();
    if !ok {
        return Err((ProblemKind::CorruptImage, "unreadable".into()));
    }
    if head != [0xFF, 0xD8, 0xFF] {
        return Err((ProblemKind::CorruptImage, "no JPEG start-of-image marker".into()));
    }
    let end = tail.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end == 0 || tail[end] != 0xD9 || tail[end - 1] != 0xFF {
        return Err((ProblemKind::CorruptImage, "no JPEG end-of-image marker (truncated?)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{label_index, COMPETITION_FIVE, LABELS};

    #[test]
    fn labels_per_dataset() {
        assert_eq!(dataset_labels(DatasetKind::Mimic), &LABELS[..]);
        assert_eq!(dataset_labels(DatasetKind::Chexpert), &LABELS[..]);
        assert_eq!(dataset_labels(DatasetKind::Rsna), &["Pneumonia"]);
        assert_eq!(default_eval_labels(DatasetKind::Mimic).len(), 14);
        assert_eq!(default_eval_labels(DatasetKind::Chexpert), &COMPETITION_FIVE[..]);
        assert_eq!(default_eval_labels(DatasetKind::Rsna), &["Pneumonia"]);
        // Evaluated labels are labels the dataset has, and RSNA's is the reader's index.
        for kind in [DatasetKind::Mimic, DatasetKind::Chexpert, DatasetKind::Rsna] {
            assert!(default_eval_labels(kind).iter().all(|l| dataset_labels(kind).contains(l)));
        }
        assert_eq!(label_index(dataset_labels(DatasetKind::Rsna)[0]), Some(crate::rsna::PNEUMONIA));
    }

    #[test]
    fn rsna_split_names() {
        assert_eq!("grouped".parse::<RsnaSplit>().unwrap(), RsnaSplit::Grouped);
        assert_eq!("rows".parse::<RsnaSplit>().unwrap(), RsnaSplit::Rows);
        assert_eq!(RsnaSplit::default(), RsnaSplit::Grouped);
        assert_eq!(RsnaSplit::Rows.to_string(), "rows");
        let e = "patient".parse::<RsnaSplit>().unwrap_err();
        assert!(e.contains("grouped, rows"), "{e}");
    }
}
