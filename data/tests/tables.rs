//! Malformed tables lose no rows quietly: an unbalanced quote costs its row alone, a truncated
//! gzip is an error naming the file, a missing label column is an error unless allowed,
//! duplicated metadata rows are counted and dropped, and image paths that leave the data root
//! are refused as bad rows.

use std::fs;
use std::io::Read;
use std::path::Path;

use data::dataset::ProblemKind;
use data::synth::{generate, SynthConfig};
use data::{read, Dataset, DatasetKind, LabelValue, ReadOptions, Views};

fn tree(dir: &Path, dataset: DatasetKind, studies: usize, seed: u64) {
    let cfg = SynthConfig { studies, dataset, seed, size: 48, ..Default::default() };
    generate(dir, &cfg).unwrap();
}

fn gunzip(path: &Path) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap()).read_to_string(&mut s).unwrap();
    s
}

fn all_views() -> ReadOptions {
    ReadOptions { views: Views::All, ..Default::default() }
}

fn count(d: &Dataset, kind: ProblemKind) -> usize {
    d.problems.sorted().iter().filter(|p| p.kind == kind).count()
}

const META: &str = "mimic-cxr-2.0.0-metadata.csv";

#[test]
fn unbalanced_quote_in_mimic_metadata_costs_one_row() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Mimic, 30, 11);
    let clean = read(DatasetKind::Mimic, t.path(), &all_views()).unwrap();
    let text = gunzip(&t.path().join(format!("{META}.gz")));
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    // A row in the first half: before the fix the rest of the file went into one cell.
    let k = lines.len() / 3;
    let dicom = lines[k].split(',').next().unwrap().to_string();
    lines[k] = format!("\"{}", lines[k]);
    fs::write(t.path().join(META), lines.join("\n") + "\n").unwrap();
    let d = read(DatasetKind::Mimic, t.path(), &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len() - 1, "{}", d.problems.summary());
    assert!(d.pairs.iter().all(|p| !p.image.to_string_lossy().contains(&dicom)));
    let bad = d.problems.sorted();
    assert_eq!(bad.len(), 1, "{}", d.problems.summary());
    assert_eq!(bad[0].kind, ProblemKind::MalformedRow);
    assert!(bad[0].place.ends_with(&format!("{META}:{}", k + 1)), "{:?}", bad[0]);
    assert!(bad[0].detail.contains("quote"), "{:?}", bad[0]);
}

#[test]
fn unbalanced_quote_in_chexpert_csv_costs_one_row() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 40, 12);
    let clean = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    let csv = t.path().join("CheXpert-v1.0-small/train.csv");
    let mut lines: Vec<String> = fs::read_to_string(&csv).unwrap().lines().map(String::from).collect();
    let k = 2;
    // An opening quote in the Sex cell that never closes.
    let mut cells: Vec<String> = lines[k].split(',').map(String::from).collect();
    cells[1] = format!("\"{}", cells[1]);
    lines[k] = cells.join(",");
    fs::write(&csv, lines.join("\n") + "\n").unwrap();
    let d = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len() - 1, "{}", d.problems.summary());
    assert_eq!(d.problems.len(), 1, "{}", d.problems.summary());
    assert_eq!(count(&d, ProblemKind::MalformedRow), 1);
    assert!(d.problems.sorted()[0].place.ends_with(&format!("train.csv:{}", k + 1)));
}

#[test]
fn truncated_gzip_table_is_an_error_naming_the_file() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Mimic, 30, 13);
    let gz = t.path().join(format!("{META}.gz"));
    let bytes = fs::read(&gz).unwrap();
    fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", read(DatasetKind::Mimic, t.path(), &all_views()).unwrap_err());
    assert!(e.contains(&gz.display().to_string()) && e.contains("truncated"), "{e}");
}

#[test]
fn missing_label_column_is_an_error_unless_allowed() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Mimic, 30, 14);
    let clean = read(DatasetKind::Mimic, t.path(), &all_views()).unwrap();
    let text = gunzip(&t.path().join("mimic-cxr-2.0.0-chexpert.csv.gz"));
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let drop = header.iter().position(|h| *h == "Edema").unwrap();
    let cut: Vec<String> = text
        .lines()
        .map(|l| l.split(',').enumerate().filter(|(i, _)| *i != drop).map(|(_, c)| c).collect::<Vec<_>>().join(","))
        .collect();
    let csv = t.path().join("mimic-cxr-2.0.0-chexpert.csv");
    fs::write(&csv, cut.join("\n") + "\n").unwrap();
    let e = format!("{:#}", read(DatasetKind::Mimic, t.path(), &all_views()).unwrap_err());
    assert!(e.contains(&csv.display().to_string()) && e.contains("Edema"), "{e}");
    let allow = ReadOptions { allow_missing_labels: true, ..all_views() };
    let d = read(DatasetKind::Mimic, t.path(), &allow).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len());
    let edema = data::labels::label_index("Edema").unwrap();
    assert!(d.pairs.iter().all(|p| p.labels[edema] == LabelValue::Blank));
    // Said, not silent.
    assert_eq!(count(&d, ProblemKind::MissingLabelColumn), 1, "{}", d.problems.summary());
    assert!(d.problems.summary().contains("label column"), "{}", d.problems.summary());
}

#[test]
fn duplicated_metadata_rows_are_counted_and_dropped() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Mimic, 30, 15);
    let clean = read(DatasetKind::Mimic, t.path(), &all_views()).unwrap();
    let text = gunzip(&t.path().join(format!("{META}.gz")));
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<&str> = lines.clone();
    out.extend_from_slice(&lines[1..4]);
    out.push(lines[5]);
    fs::write(t.path().join(META), out.join("\n") + "\n").unwrap();
    let d = read(DatasetKind::Mimic, t.path(), &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len(), "{}", d.problems.summary());
    assert_eq!(count(&d, ProblemKind::DuplicateRow), 4, "{}", d.problems.summary());
    assert!(d.problems.summary().contains("4 duplicate"), "{}", d.problems.summary());

    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 30, 16);
    let clean = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    let csv = t.path().join("CheXpert-v1.0-small/train.csv");
    let mut s = fs::read_to_string(&csv).unwrap();
    let second = s.lines().nth(1).unwrap().to_string();
    s += &format!("{second}\n");
    fs::write(&csv, s).unwrap();
    let d = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len(), "{}", d.problems.summary());
    assert_eq!(count(&d, ProblemKind::DuplicateRow), 1, "{}", d.problems.summary());
}

#[test]
fn image_paths_outside_the_root_are_refused() {
    // MIMIC: ids that climb out of files/ to a real JPEG beside the root, with a split and a
    // report, so that nothing else stops the row.
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    tree(&root, DatasetKind::Mimic, 30, 17);
    let clean = read(DatasetKind::Mimic, &root, &all_views()).unwrap();
    fs::copy(clean.image_path(&clean.pairs[0]), t.path().join("outside.jpg")).unwrap();
    let p = &clean.pairs[0];
    let climb = "../../../../../outside";
    let mut meta = gunzip(&root.join(format!("{META}.gz")));
    meta += &format!(
        "{climb},{},{},CHEST,PA,48,48,21000101,000000.000,Chest X-Ray,postero-anterior,Erect\n",
        p.subject_id, p.study_id
    );
    fs::write(root.join(META), meta).unwrap();
    let mut split = gunzip(&root.join("mimic-cxr-2.0.0-split.csv.gz"));
    split += &format!("{climb},{},{},train\n", p.study_id, p.subject_id);
    fs::write(root.join("mimic-cxr-2.0.0-split.csv"), split).unwrap();
    let d = read(DatasetKind::Mimic, &root, &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len(), "{}", d.problems.summary());
    assert_eq!(count(&d, ProblemKind::OutsideRoot), 1, "{}", d.problems.summary());

    // CheXpert: a path that climbs out of the dataset folder, and an absolute one.
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 30, 18);
    let clean = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    let outside = t.path().join("outside.jpg");
    fs::copy(clean.image_path(&clean.pairs[0]), &outside).unwrap();
    let csv = t.path().join("CheXpert-v1.0-small/train.csv");
    let mut s = fs::read_to_string(&csv).unwrap();
    let tail = ",Male,50,Frontal,PA,1.0,,,,,,,,,,,,,";
    s += &format!("CheXpert-v1.0-small/../outside.jpg{tail}\n");
    s += &format!("{}{tail}\n", outside.display());
    fs::write(&csv, s).unwrap();
    let d = read(DatasetKind::Chexpert, t.path(), &all_views()).unwrap();
    assert_eq!(d.pairs.len(), clean.pairs.len(), "{}", d.problems.summary());
    assert_eq!(count(&d, ProblemKind::OutsideRoot), 2, "{}", d.problems.summary());
}
