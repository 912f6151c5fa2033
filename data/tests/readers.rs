//! Readers on generated trees of all three layouts, clean and with bad input.

use std::fs;
use std::io::Read;
use std::path::Path;

use data::dataset::ProblemKind;
use data::report::{select_text, SectionPolicy};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, LabelValue, ReadOptions, Views};

fn tree(dir: &Path, dataset: DatasetKind, studies: usize, seed: u64) {
    let cfg = SynthConfig { studies, dataset, seed, size: 64, ..Default::default() };
    generate(dir, &cfg).unwrap();
}

fn gunzip(path: &Path) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap()).read_to_string(&mut s).unwrap();
    s
}

fn kinds(d: &data::Dataset) -> Vec<ProblemKind> {
    d.problems.sorted().iter().map(|p| p.kind).collect()
}

#[test]
fn mimic_clean_tree_reads_whole() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Mimic, 40, 1);
    let meta = gunzip(&t.path().join("mimic-cxr-2.0.0-metadata.csv.gz"));
    let rows: Vec<&str> = meta.lines().skip(1).collect();
    let frontal = rows.iter().filter(|r| r.contains(",PA,") || r.contains(",AP,")).count();
    let d = read(DatasetKind::Mimic, t.path(), &ReadOptions::default()).unwrap();
    assert!(d.problems.is_empty(), "{}", d.problems.summary());
    assert_eq!(d.pairs.len(), frontal);
    assert_eq!(d.studies, 40);
    let all = read(DatasetKind::Mimic, t.path(), &ReadOptions { views: Views::All, ..Default::default() }).unwrap();
    assert_eq!(all.pairs.len(), rows.len());
    assert!(all.pairs.iter().any(|p| p.view == "LATERAL"));
    // Paper text drops technique and comparison; impression text is shorter.
    for p in &d.pairs {
        assert!(!p.text.contains("Chest PA and lateral") && !p.text.contains("FINAL REPORT"), "{}", p.text);
        assert!(d.image_path(p).is_file());
    }
    // The labels read back as the labeller would from the report's impression (else findings).
    for p in &d.pairs {
        let rep = fs::read_to_string(t.path().join(format!(
            "files/p{}/p{}/s{}.txt",
            &p.subject_id[..2],
            p.subject_id,
            p.study_id
        )))
        .unwrap();
        let imp = select_text(&rep, SectionPolicy::Impression).to_lowercase();
        if p.labels[10] == LabelValue::Positive {
            assert!(imp.contains("effusion"), "effusion label without mention: {imp}");
        }
        if p.labels[2] == LabelValue::Positive {
            assert!(imp.contains("cardiomegaly") || imp.contains("heart") || imp.contains("cardiac"), "{imp}");
        }
        if p.labels[0] == LabelValue::Positive {
            assert!((1..13).all(|i| !matches!(p.labels[i], LabelValue::Positive | LabelValue::Uncertain)));
        }
    }
    // Negbio labels are read from their own file.
    let nb = read(
        DatasetKind::Mimic,
        t.path(),
        &ReadOptions { label_file: "negbio".parse().unwrap(), ..Default::default() },
    )
    .unwrap();
    assert_eq!(nb.pairs.len(), d.pairs.len());
}

#[test]
fn mimic_bad_input_is_counted_reported_and_skipped() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    tree(root, DatasetKind::Mimic, 30, 2);
    let clean = read(DatasetKind::Mimic, root, &ReadOptions::default()).unwrap();
    let n = clean.pairs.len();
    let imgs: Vec<_> = clean.pairs.iter().map(|p| clean.image_path(p)).collect();
    // Truncated, corrupt, missing.
    let bytes = fs::read(&imgs[0]).unwrap();
    fs::write(&imgs[0], &bytes[..bytes.len() / 2]).unwrap();
    fs::write(&imgs[1], b"this is not a jpeg at all").unwrap();
    fs::remove_file(&imgs[2]).unwrap();
    // Plain csv files take precedence over the .gz ones: add a malformed line and a row naming
    // no file to the metadata, and an unknown label value to the labels.
    let mut meta = gunzip(&root.join("mimic-cxr-2.0.0-metadata.csv.gz"));
    meta.push_str("broken,line\n");
    meta.push_str(
        ",10000032,50000014,CHEST (PA AND LAT),PA,64,64,21000101,000000.000,Chest X-Ray,postero-anterior,Erect\n",
    );
    fs::write(root.join("mimic-cxr-2.0.0-metadata.csv"), meta).unwrap();
    let labels = gunzip(&root.join("mimic-cxr-2.0.0-chexpert.csv.gz"));
    let mut lines: Vec<String> = labels.lines().map(String::from).collect();
    // Pick a study whose images are untouched above.
    let bad_study =
        clean.pairs.iter().rev().find(|p| !imgs[..3].contains(&clean.image_path(p))).unwrap().study_id.clone();
    let li = lines.iter().position(|l| l.split(',').nth(1) == Some(bad_study.as_str())).unwrap();
    let mut cells: Vec<String> = lines[li].split(',').map(String::from).collect();
    cells[2] = "2.0".into();
    lines[li] = cells.join(",");
    fs::write(root.join("mimic-cxr-2.0.0-chexpert.csv"), lines.join("\n") + "\n").unwrap();

    let d = read(DatasetKind::Mimic, root, &ReadOptions::default()).unwrap();
    let k = kinds(&d);
    for want in [
        ProblemKind::CorruptImage,
        ProblemKind::MissingFile,
        ProblemKind::MalformedRow,
        ProblemKind::NoFileNamed,
        ProblemKind::UnknownLabel,
    ] {
        assert!(k.contains(&want), "{want:?} not reported: {}", d.problems.summary());
    }
    assert_eq!(k.iter().filter(|x| **x == ProblemKind::CorruptImage).count(), 2);
    let in_bad_study = clean.pairs.iter().filter(|p| p.study_id == bad_study).count();
    assert_eq!(d.pairs.len(), n - 3 - in_bad_study);
    // Each problem names its place.
    let probs = d.problems.sorted();
    assert!(probs.iter().any(|p| p.place.ends_with(&imgs[1].file_name().unwrap().to_string_lossy().to_string())));
    assert!(probs.iter().any(|p| p.kind == ProblemKind::MalformedRow && p.place.contains("metadata.csv:")));
    let json: serde_json::Value = serde_json::from_str(&data::stats::summary_json(&d)).unwrap();
    assert_eq!(json["skipped"].as_u64().unwrap() as usize, d.problems.len());
    assert_eq!(json["pairs"].as_u64().unwrap() as usize, d.pairs.len());
}

#[test]
fn missing_layout_is_one_clear_error() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("mimic-cxr-2.0.0-split.csv"), "dicom_id,study_id,subject_id,split\n").unwrap();
    let e = read(DatasetKind::Mimic, t.path(), &ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("not a MIMIC-CXR-JPG root"), "{e}");
    assert!(e.contains("mimic-cxr-2.0.0-metadata.csv") && e.contains("files/") && !e.contains("split.csv"), "{e}");
    let e = read(DatasetKind::Chexpert, t.path(), &ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("train.csv"), "{e}");
    let e = read(DatasetKind::Rsna, t.path(), &ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("stage_2_train_labels.csv") && e.contains("stage_2_train_images/"), "{e}");
}

#[test]
fn chexpert_tree_reads_with_splits_and_bad_rows() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 120, 3);
    let d = read(DatasetKind::Chexpert, t.path(), &ReadOptions::default()).unwrap();
    assert!(d.problems.is_empty(), "{}", d.problems.summary());
    assert!(d.pairs.iter().all(|p| p.view == "AP" || p.view == "PA"));
    assert!(d.pairs.iter().any(|p| p.split == data::Split::Test), "valid.csv is the test split");
    // Reading the dataset folder itself gives the same pairs.
    let d2 = read(DatasetKind::Chexpert, &t.path().join("CheXpert-v1.0-small"), &ReadOptions::default()).unwrap();
    assert_eq!(d.pairs.len(), d2.pairs.len());
    // No patient in two splits.
    let mut seen = std::collections::HashMap::new();
    for p in &d.pairs {
        assert_eq!(*seen.entry(p.subject_id.clone()).or_insert(p.split), p.split);
    }
    let csv = t.path().join("CheXpert-v1.0-small/train.csv");
    let mut s = fs::read_to_string(&csv).unwrap();
    s.push_str("CheXpert-v1.0-small/train/patient99999/study1/view1_frontal.jpg,Male,50,Frontal,PA,1.0,,,,,,,,,,,,,\n");
    s.push_str("short,row\n");
    fs::write(&csv, s).unwrap();
    let d3 = read(DatasetKind::Chexpert, t.path(), &ReadOptions::default()).unwrap();
    let k = kinds(&d3);
    assert!(
        k.contains(&ProblemKind::MissingFile) && k.contains(&ProblemKind::MalformedRow),
        "{}",
        d3.problems.summary()
    );
    assert_eq!(d3.pairs.len(), d.pairs.len());
}

/// Moves every file under `from` to the same relative place under `to`.
fn rename(from: &Path, to: &Path) {
    fs::rename(from, to).unwrap();
}

#[test]
fn chexpert_under_another_folder_name_reads_whole() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 40, 7);
    let std = read(DatasetKind::Chexpert, t.path(), &ReadOptions::default()).unwrap();
    assert!(std.problems.is_empty() && !std.pairs.is_empty(), "{}", std.problems.summary());
    let key = |d: &data::Dataset| {
        let mut v: Vec<_> = d.pairs.iter().map(|p| (p.image.clone(), p.split, p.labels)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // Renamed: the csv still says CheXpert-v1.0-small/train/..., the folder is my-chexpert/.
    let renamed = t.path().join("my-chexpert");
    rename(&t.path().join("CheXpert-v1.0-small"), &renamed);
    let d = read(DatasetKind::Chexpert, &renamed, &ReadOptions::default()).unwrap();
    assert!(d.problems.is_empty(), "{}", d.problems.summary());
    assert_eq!(key(&d), key(&std));
    assert_eq!(d.root, renamed);
    assert!(d
        .pairs
        .iter()
        .all(|p| d.image_path(p).is_file() && (p.image.starts_with("train") || p.image.starts_with("valid"))));
    // The folder holding it (its one subfolder with a train.csv) reads the same.
    let parent = read(DatasetKind::Chexpert, t.path(), &ReadOptions::default()).unwrap();
    assert_eq!(key(&parent), key(&std));
    // A mirror whose csv paths start at train/ (no folder name), and one with an extra leading folder.
    for (prefix, with) in [("CheXpert-v1.0-small/", ""), ("CheXpert-v1.0-small/", "archive/CheXpert-v1.0-small/")] {
        for f in ["train.csv", "valid.csv"] {
            let p = renamed.join(f);
            let txt = fs::read_to_string(&p).unwrap();
            let fixed: String = txt.lines().map(|l| l.replacen(prefix, with, 1) + "\n").collect();
            fs::write(&p, fixed).unwrap();
        }
        let d = read(DatasetKind::Chexpert, &renamed, &ReadOptions::default()).unwrap();
        assert!(d.problems.is_empty(), "{with}: {}", d.problems.summary());
        assert_eq!(key(&d), key(&std), "{with}");
        // Back to the distribution's form for the next round.
        for f in ["train.csv", "valid.csv"] {
            let p = renamed.join(f);
            let txt = fs::read_to_string(&p).unwrap();
            let back: String = txt
                .lines()
                .enumerate()
                .map(|(i, l)| if i == 0 { l.to_string() } else { format!("{prefix}{}", &l[with.len()..]) } + "\n")
                .collect();
            fs::write(&p, back).unwrap();
        }
    }
    // Images not unpacked: one error line naming the row count, a path tried and what to check.
    let rows = ["train.csv", "valid.csv"]
        .iter()
        .map(|f| fs::read_to_string(renamed.join(f)).unwrap().lines().count() - 1)
        .sum::<usize>();
    rename(&renamed.join("train"), &t.path().join("elsewhere-train"));
    rename(&renamed.join("valid"), &t.path().join("elsewhere-valid"));
    let e = read(DatasetKind::Chexpert, &renamed, &ReadOptions::default()).unwrap_err().to_string();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains(&format!("none of the {rows} image paths")), "{e}");
    assert!(e.contains(&renamed.join("train").display().to_string()), "{e}");
    assert!(e.contains("CheXpert-v1.0-small/train/patient") && e.contains("check that the images"), "{e}");
}

#[test]
fn chexpert_small_tree_has_test_and_validation_patients() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 30, 1);
    let valid = fs::read_to_string(t.path().join("CheXpert-v1.0-small/valid.csv")).unwrap();
    assert!(valid.lines().count() > 1, "valid.csv has no rows:\n{valid}");
    let d = read(DatasetKind::Chexpert, t.path(), &ReadOptions { views: Views::All, ..Default::default() }).unwrap();
    let patients = |s: data::Split| {
        d.pairs.iter().filter(|p| p.split == s).map(|p| p.subject_id.clone()).collect::<std::collections::HashSet<_>>()
    };
    let all = d.pairs.iter().map(|p| p.subject_id.clone()).collect::<std::collections::HashSet<_>>().len();
    // max(3% of P, min(20, P / 4)) test patients; 10% of the rest validate.
    let test = patients(data::Split::Test).len();
    assert_eq!(test, ((all as f64 * 0.03).round() as usize).max(20.min(all / 4)), "{all} patients");
    assert!(test >= 3, "{test} test patients of {all}");
    let train_side = all - test;
    assert_eq!(patients(data::Split::Validate).len(), train_side - (train_side as f64 * 0.9).round() as usize);
}

#[test]
fn chexpert_validation_is_a_tenth_of_training_patients() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 150, 8);
    for seed in [0, 1] {
        let d = read(DatasetKind::Chexpert, t.path(), &ReadOptions { seed, views: Views::All, ..Default::default() })
            .unwrap();
        let count = |s: data::Split| {
            d.pairs
                .iter()
                .filter(|p| p.split == s)
                .map(|p| &p.subject_id)
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        let train_side = count(data::Split::Train) + count(data::Split::Validate);
        assert!(train_side >= 60, "{train_side}");
        let want = train_side - (train_side as f64 * 0.9).round() as usize;
        assert_eq!(count(data::Split::Validate), want, "seed {seed}: {train_side} training patients");
        // valid.csv rows are the test split, whatever the seed.
        let valid_rows =
            fs::read_to_string(t.path().join("CheXpert-v1.0-small/valid.csv")).unwrap().lines().count() - 1;
        assert_eq!(d.pairs.iter().filter(|p| p.split == data::Split::Test).count(), valid_rows);
    }
}

#[test]
fn rsna_tree_reads_dicom_groups_patients_and_skips_truncated() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Rsna, 80, 4);
    let d = read(DatasetKind::Rsna, t.path(), &ReadOptions::default()).unwrap();
    assert!(d.problems.is_empty(), "{}", d.problems.summary());
    assert_eq!(d.pairs.len(), 80);
    let csv = fs::read_to_string(t.path().join("stage_2_train_labels.csv")).unwrap();
    let boxes = csv.lines().filter(|l| l.ends_with(",1")).count();
    assert_eq!(d.pairs.iter().map(|p| p.boxes.len()).sum::<usize>(), boxes);
    assert!(d.pairs.iter().any(|p| p.labels[7] == LabelValue::Positive));
    // Every pair decodes; MONOCHROME1 files come back with bone white (mean like the others).
    for p in d.pairs.iter().take(12) {
        let img = data::dicom::read_dicom(&d.image_path(p)).unwrap();
        assert_eq!((img.w, img.h), (64, 64));
        let mean = img.pixels.iter().map(|&x| x as f64).sum::<f64>() / img.pixels.len() as f64;
        // Radiographs are dark around the body: the corners are darker than the middle.
        assert!((img.pixels[0] as f64) < mean + 10.0, "inverted image? {} vs {mean}", img.pixels[0]);
    }
    let victim = d.image_path(&d.pairs[0]);
    let bytes = fs::read(&victim).unwrap();
    fs::write(&victim, &bytes[..bytes.len() - 500]).unwrap();
    let d2 = read(DatasetKind::Rsna, t.path(), &ReadOptions::default()).unwrap();
    assert_eq!(d2.pairs.len(), 79);
    assert_eq!(kinds(&d2), vec![ProblemKind::CorruptImage]);
}

/// Train / validate / test counts that `splits::stratified_split` gives `n` units with
/// `valid` and `test` held out.
fn split_sizes(n: usize, valid: f64, test: f64) -> [usize; 3] {
    let train = 1.0 - valid - test;
    let (a, b) = ((n as f64 * train).round() as usize, (n as f64 * (train + valid)).round() as usize);
    [a, b - a, n - b]
}

fn eighty_ten_ten(n: usize) -> [usize; 3] {
    split_sizes(n, 0.1, 0.1)
}

#[test]
fn held_out_fractions_are_the_options_when_given() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Chexpert, 150, 8);
    let opts = |v: f64| ReadOptions { valid_fraction: Some(v), views: Views::All, ..Default::default() };
    let d = read(DatasetKind::Chexpert, t.path(), &opts(0.25)).unwrap();
    let patients = |s: data::Split| {
        d.pairs.iter().filter(|p| p.split == s).map(|p| &p.subject_id).collect::<std::collections::HashSet<_>>().len()
    };
    let train_side = patients(data::Split::Train) + patients(data::Split::Validate);
    assert_eq!(patients(data::Split::Validate), train_side - (train_side as f64 * 0.75).round() as usize);
    let e = read(DatasetKind::Chexpert, t.path(), &opts(1.0)).unwrap_err().to_string();
    assert!(e.contains("validation fraction 1"), "{e}");

    let r = tempfile::tempdir().unwrap();
    tree(r.path(), DatasetKind::Rsna, 120, 9);
    let opts = |v: f64, t: f64| ReadOptions { valid_fraction: Some(v), test_fraction: Some(t), ..Default::default() };
    let g = read(DatasetKind::Rsna, r.path(), &opts(0.2, 0.3)).unwrap();
    let c = split_counts(g.pairs.iter().map(|p| (p.labels[7] == LabelValue::Positive, p.split)));
    for positive in [0, 1] {
        assert_eq!(c[positive], split_sizes(c[positive].iter().sum(), 0.2, 0.3), "positive {positive}");
    }
    let e = read(DatasetKind::Rsna, r.path(), &opts(0.5, 0.5)).unwrap_err().to_string();
    assert!(e.contains("leave training data"), "{e}");
}

fn split_counts(units: impl Iterator<Item = (bool, data::Split)>) -> [[usize; 3]; 2] {
    let mut c = [[0; 3]; 2];
    for (positive, s) in units {
        c[positive as usize][s as usize] += 1;
    }
    c
}

#[test]
fn rsna_splits_by_patient_or_by_row() {
    let t = tempfile::tempdir().unwrap();
    tree(t.path(), DatasetKind::Rsna, 120, 9);
    let csv = fs::read_to_string(t.path().join("stage_2_train_labels.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let positive_rows = rows.iter().filter(|l| l.ends_with(",1")).count();
    let rows_opts = |seed| ReadOptions { seed, rsna_split: "rows".parse().unwrap(), ..Default::default() };
    let straddles = |d: &data::Dataset| {
        let mut seen = std::collections::HashMap::new();
        d.pairs.iter().any(|p| *seen.entry(p.subject_id.clone()).or_insert(p.split) != p.split)
    };
    let mut leaked = false;
    for seed in 0..8 {
        // Grouped (the default): one pair per patient, 80 / 10 / 10 within each Target class.
        let g = read(DatasetKind::Rsna, t.path(), &ReadOptions { seed, ..Default::default() }).unwrap();
        assert_eq!(g.pairs.len(), 120);
        let c = split_counts(g.pairs.iter().map(|p| (p.labels[7] == LabelValue::Positive, p.split)));
        for positive in [0, 1] {
            assert_eq!(c[positive], eighty_ten_ten(c[positive].iter().sum()), "seed {seed}, positive {positive}");
        }
        assert!(!straddles(&g), "seed {seed}: a patient in two splits under grouped");
        // Rows: one pair per csv row with its own box, 80 / 10 / 10 of the rows within each class.
        let r = read(DatasetKind::Rsna, t.path(), &rows_opts(seed)).unwrap();
        assert!(r.problems.is_empty(), "{}", r.problems.summary());
        assert_eq!((r.pairs.len(), r.images, r.studies), (rows.len(), 120, 120));
        assert!(r.pairs.iter().all(|p| p.boxes.len() == (p.labels[7] == LabelValue::Positive) as usize));
        assert_eq!(r.pairs.iter().filter(|p| p.labels[7] == LabelValue::Positive).count(), positive_rows);
        let c = split_counts(r.pairs.iter().map(|p| (p.labels[7] == LabelValue::Positive, p.split)));
        for positive in [0, 1] {
            assert_eq!(c[positive], eighty_ten_ten(c[positive].iter().sum()), "rows, seed {seed}");
        }
        leaked |= straddles(&r);
    }
    assert!(rows.len() > 120, "the tree needs patients with several boxes");
    assert!(leaked, "no multi-box patient straddled two splits by row in 8 seeds");
}

#[test]
fn dicom_round_trip_both_photometrics() {
    let px: Vec<u8> = (0..48 * 40).map(|i| (i % 251) as u8).collect();
    for mono1 in [false, true] {
        let m = data::dicom::DicomMeta {
            patient_id: "x".into(),
            sex: "F".into(),
            age: 40,
            view: "PA".into(),
            monochrome1: mono1,
            uid_seed: 9,
        };
        let bytes = data::dicom::encode_dicom(&px, 48, 40, &m).unwrap();
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a.dcm");
        fs::write(&p, bytes).unwrap();
        let img = data::dicom::read_dicom(&p).unwrap();
        assert_eq!((img.w, img.h), (48, 40));
        assert_eq!(img.pixels, px, "monochrome1={mono1}");
    }
}

#[test]
fn generator_is_deterministic_and_seed_sensitive() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    tree(a.path(), DatasetKind::Mimic, 12, 5);
    tree(b.path(), DatasetKind::Mimic, 12, 5);
    tree(c.path(), DatasetKind::Mimic, 12, 6);
    let list = |d: &Path| {
        let mut v = Vec::new();
        let mut stack = vec![d.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in fs::read_dir(&p).unwrap() {
                let e = e.unwrap().path();
                if e.is_dir() {
                    stack.push(e);
                } else {
                    v.push((e.strip_prefix(d).unwrap().to_path_buf(), fs::read(&e).unwrap()));
                }
            }
        }
        v.sort();
        v
    };
    assert_eq!(list(a.path()), list(b.path()));
    assert_ne!(list(a.path()), list(c.path()));
}
