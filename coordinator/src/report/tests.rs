//! The report from hand-made data: every file written, the JSON contract, the table cells,
//! the plots decoded and looked at pixel by pixel, and the partial and empty cases.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::layout::{self, Col};
use super::*;

const MIMIC_LABELS: [&str; 6] = ["Atelectasis", "Cardiomegaly", "Edema", "No Finding", "Pleural Effusion", "Pneumonia"];
const CHEXPERT_LABELS: [&str; 3] = ["Cardiomegaly", "Edema", "Pleural Effusion"];

/// Equal to one part in 10^15: the JSON reader rounds the last digit of a few numbers that the
/// writer wrote exactly (shortest round-trip form).
fn same(got: &Value, want: f64) -> bool {
    got.as_f64().is_some_and(|g| (g - want).abs() <= 1e-15 * want.abs())
}

/// A fresh folder under the system temp folder, removed by the test when it passes.
fn scratch(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("cxrclip-report-{name}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn rng() -> ChaCha8Rng {
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

fn row(
    setting: &str,
    kind: &str,
    dataset: &str,
    auc: f64,
    ci: [f64; 2],
    labels: &[&str],
    rng: &mut ChaCha8Rng,
) -> ResultRow {
    let slug = layout::slug(setting);
    let mut per_label: BTreeMap<String, f64> =
        labels.iter().map(|l| (l.to_string(), rng.random_range(0.55..0.95))).collect();
    // One label with a single class in the split: its AUC is not defined.
    if labels.len() > 4 {
        per_label.insert(labels[labels.len() - 1].to_string(), f64::NAN);
    }
    ResultRow {
        run: format!("{slug}-{dataset}"),
        setting: setting.to_string(),
        kind: kind.to_string(),
        dataset: dataset.to_string(),
        split: "test".to_string(),
        fraction: None,
        ablation: None,
        macro_auc: auc,
        ci95: ci,
        per_label,
        images: rng.random_range(200..2000),
        patients: rng.random_range(50..200),
        run_dir: format!("runs/demo/{slug}-{dataset}"),
    }
}

/// The ROC curve of scores drawn from two normal-ish distributions `gap` apart.
fn roc_curve(label: &str, gap: f64, rng: &mut ChaCha8Rng) -> RocCurve {
    let mut scored: Vec<(f64, bool)> = (0..300)
        .map(|_| {
            let positive = rng.random_bool(0.3);
            let noise: f64 = (0..4).map(|_| rng.random_range(-1.0..1.0)).sum();
            (noise + if positive { gap } else { 0.0 }, positive)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = scored.iter().filter(|s| s.1).count() as f64;
    let neg = scored.len() as f64 - pos;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut points = vec![(0.0, 0.0)];
    for (_, positive) in scored {
        if positive {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        points.push((fp / neg, tp / pos));
    }
    let auc = points.windows(2).map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0).sum();
    RocCurve { label: label.to_string(), auc, points }
}

/// Writes a contrastive run's metrics (with an unfinished last line, as while it runs) and a
/// fine-tuning run's (with validation AUC lines at the epoch ends).
fn metrics_files(dir: &Path, rng: &mut ChaCha8Rng) -> (String, String) {
    let cls = dir.join("cls-metrics.jsonl");
    let mut text = String::new();
    for step in 1..=150u32 {
        let s = step as f64;
        let loss = 4.0 * (-s / 60.0).exp() + 1.0 + rng.random_range(-0.2..0.2);
        let scale = 2.659 + 1.2 * (1.0 - (-s / 80.0).exp());
        text.push_str(&format!("{{\"step\":{step},\"loss\":{loss},\"lr\":0.0003,\"logit_scale\":{scale}}}\n"));
    }
    text.push_str("{\"step\":151,\"lo");
    fs::write(&cls, text).unwrap();
    let ft = dir.join("ft-metrics.jsonl");
    let mut text = String::new();
    for step in 1..=90u32 {
        let loss = 0.7 * (-(step as f64) / 40.0).exp() + 0.3 + rng.random_range(-0.05..0.05);
        text.push_str(&format!("{{\"step\":{step},\"loss\":{loss},\"lr\":0.00001,\"logit_scale\":2.659}}\n"));
        if step % 30 == 0 {
            let auc = 0.6 + 0.05 * (step / 30) as f64 + rng.random_range(-0.01..0.01);
            text.push_str(&format!("{{\"step\":{step},\"epoch\":{},\"valid_macro_auc\":{auc}}}\n", step / 30));
        }
    }
    fs::write(&ft, text).unwrap();
    (cls.display().to_string(), ft.display().to_string())
}

/// Three settings on MIMIC, CLS + LP also on CheXpert, a label-fraction sweep, comparisons,
/// retrieval, zero-shot, two training runs and ROC curves.
fn sample(dir: &Path, rng: &mut ChaCha8Rng) -> Report {
    let mut rows = vec![
        row("CLS + LP", "linear-probe", "mimic", 0.778, [0.769, 0.786], &MIMIC_LABELS, rng),
        row("rand + LP", "linear-probe", "mimic", rng.random_range(0.6..0.7), [0.6, 0.7], &MIMIC_LABELS, rng),
        row("FT", "finetune", "mimic", rng.random_range(0.7..0.8), [0.69, 0.81], &MIMIC_LABELS, rng),
        row("CLS + LP", "linear-probe", "chexpert", 0.851, [0.83, 0.87], &CHEXPERT_LABELS, rng),
    ];
    for setting in ["CLS + LP", "FT"] {
        for (i, fraction) in [0.01, 0.1, 1.0].into_iter().enumerate() {
            let auc = 0.6 + 0.06 * i as f64 + rng.random_range(0.0..0.03);
            let mut r = row(setting, "linear-probe", "mimic", auc, [auc - 0.03, auc + 0.025], &MIMIC_LABELS, rng);
            r.run = format!("{}-frac{fraction}", layout::slug(setting));
            r.run_dir = format!("runs/demo/{}-frac{fraction}", layout::slug(setting));
            r.fraction = Some(fraction);
            r.ablation = Some(Ablation { name: "label fraction".to_string(), value: fraction });
            rows.push(r);
        }
    }
    let comparisons = vec![
        Comparison {
            a: "cls-lp-mimic".into(),
            b: "ft-mimic".into(),
            setting_a: "CLS + LP".into(),
            setting_b: "FT".into(),
            dataset: "mimic".into(),
            split: "test".into(),
            diff: 0.006,
            ci95: [-0.004, 0.016],
        },
        Comparison {
            a: "cls-lp-mimic".into(),
            b: "rand-lp-mimic".into(),
            setting_a: "CLS + LP".into(),
            setting_b: "rand + LP".into(),
            dataset: "mimic".into(),
            split: "test".into(),
            diff: 0.112,
            ci95: [0.095, 0.13],
        },
    ];
    let recall = |a: f64| Recall { at1: a, at5: a * 2.5, at10: a * 3.5, median_rank: 17.0 };
    let retrieval = vec![RetrievalRow {
        run: "retrieval".into(),
        setting: "CLS".into(),
        dataset: "mimic".into(),
        split: "test".into(),
        image_to_report: recall(0.12),
        report_to_image: recall(0.11),
        images: 500,
        reports: 480,
        run_dir: "runs/demo/retrieval".into(),
    }];
    let zero_shot = ["prompt pair", "neutral prompt"]
        .iter()
        .map(|method| ZeroShotRow {
            run: "zero-shot".into(),
            setting: "CLS".into(),
            dataset: "mimic".into(),
            split: "test".into(),
            method: method.to_string(),
            macro_auc: rng.random_range(0.55..0.7),
            ci95: [0.5, 0.75],
            per_label: MIMIC_LABELS.iter().map(|l| (l.to_string(), rng.random_range(0.5..0.8))).collect(),
            run_dir: "runs/demo/zero-shot".into(),
        })
        .collect();
    let (cls, ft) = metrics_files(dir, rng);
    let training = vec![
        TrainingCurve { run: "cls".into(), setting: "CLS".into(), kind: "pretrain-cls".into(), metrics: cls },
        TrainingCurve { run: "ft".into(), setting: "FT".into(), kind: "finetune".into(), metrics: ft },
    ];
    let rocs = [("rand + LP", "rand-lp-mimic", 0.6), ("FT", "ft-mimic", 1.6), ("CLS + LP", "cls-lp-mimic", 2.0)]
        .iter()
        .map(|&(setting, run, gap)| RocSet {
            run: run.into(),
            setting: setting.into(),
            dataset: "mimic".into(),
            split: "test".into(),
            curves: MIMIC_LABELS.iter().map(|l| roc_curve(l, gap, rng)).collect(),
        })
        .collect();
    Report {
        title: "cxrclip test study".into(),
        rows,
        comparisons,
        retrieval,
        zero_shot,
        training,
        rocs,
        text_to_image: Vec::new(),
    }
}

/// The markdown table that follows `heading`: header cells, then rows of cells.
fn md_table(md: &str, heading: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let start = md.find(heading).unwrap_or_else(|| panic!("no {heading:?} in results.md"));
    let lines: Vec<&str> =
        md[start..].lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).collect();
    let cells = |l: &str| -> Vec<String> {
        l.trim().trim_start_matches('|').trim_end_matches('|').split(" | ").map(|c| c.trim().to_string()).collect()
    };
    assert!(lines.len() >= 2, "no table under {heading:?}");
    (cells(lines[0]), lines[2..].iter().map(|l| cells(l)).collect())
}

fn cell<'a>(table: &'a (Vec<String>, Vec<Vec<String>>), row: &str, col: usize) -> &'a str {
    let r = table.1.iter().find(|r| r[0] == row).unwrap_or_else(|| panic!("no row {row:?}"));
    &r[col]
}

#[test]
fn a_report_writes_every_file() {
    let dir = scratch("files");
    let report = sample(&dir, &mut rng());
    let out = dir.join("report");
    let written = write(&report, &out).unwrap();
    let names: Vec<String> =
        written.files.iter().map(|p| p.strip_prefix(&out).unwrap().display().to_string()).collect();
    assert_eq!(
        names,
        [
            "results.md",
            "results.json",
            "results.csv",
            "plots/training.png",
            "plots/roc_mimic_test.png",
            "plots/ablation_label-fraction_mimic_test.png",
        ]
    );
    for f in &written.files {
        assert!(fs::metadata(f).unwrap().len() > 100, "{} is (nearly) empty", f.display());
    }
    // The unfinished last line of a running pretraining is skipped and said.
    assert_eq!(written.notes.len(), 1, "{:?}", written.notes);
    assert!(written.notes[0].contains("1 unreadable line"), "{:?}", written.notes);
    // No temporary file left behind.
    let leftovers: Vec<_> = fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 4, "{leftovers:?}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn results_json_holds_the_contract_fields() {
    let dir = scratch("json");
    let report = sample(&dir, &mut rng());
    write(&report, &dir).unwrap();
    let json: Value = serde_json::from_slice(&fs::read(dir.join("results.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), report.rows.len());
    for (got, want) in rows.iter().zip(&report.rows) {
        assert_eq!(got["run"], want.run.as_str());
        assert_eq!(got["kind"], want.kind.as_str());
        assert_eq!(got["dataset"], want.dataset.as_str());
        assert_eq!(got["split"], want.split.as_str());
        match want.fraction {
            Some(f) => assert!(same(&got["fraction"], f)),
            None => assert!(got["fraction"].is_null()),
        }
        assert!(same(&got["macro_auc"], want.macro_auc), "{} against {}", got["macro_auc"], want.macro_auc);
        assert!(same(&got["ci95"][0], want.ci95[0]) && same(&got["ci95"][1], want.ci95[1]), "{}", got["ci95"]);
        assert_eq!(got["ci95"].as_array().map(Vec::len), Some(2));
        assert_eq!(got["images"].as_u64(), Some(want.images as u64));
        assert_eq!(got["patients"].as_u64(), Some(want.patients as u64));
        let per_label = got["per_label"].as_object().unwrap();
        assert_eq!(per_label.len(), want.per_label.len());
        for (label, auc) in &want.per_label {
            // An undefined AUC is null, never a number.
            if auc.is_finite() {
                assert!(same(&per_label[label], *auc), "{label}: {} against {auc}", per_label[label]);
            } else {
                assert!(per_label[label].is_null(), "{label}");
            }
        }
    }
    let comparisons = json["comparisons"].as_array().unwrap();
    assert_eq!(comparisons.len(), 2);
    for (got, want) in comparisons.iter().zip(&report.comparisons) {
        assert_eq!(got["a"], want.a.as_str());
        assert_eq!(got["b"], want.b.as_str());
        assert_eq!(got["dataset"], want.dataset.as_str());
        assert!(same(&got["diff"], want.diff));
        assert!(same(&got["ci95"][0], want.ci95[0]) && same(&got["ci95"][1], want.ci95[1]), "{}", got["ci95"]);
    }
    assert!(same(&json["retrieval"][0]["image_to_report"]["at1"], 0.12));
    assert_eq!(json["zero_shot"].as_array().unwrap().len(), 2);
    assert_eq!(json["zero_shot"][1]["method"], "neutral prompt");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_markdown_table_has_the_right_cells() {
    let dir = scratch("markdown");
    let report = sample(&dir, &mut rng());
    write(&report, &dir).unwrap();
    let md = fs::read_to_string(dir.join("results.md")).unwrap();

    let main = md_table(&md, "## The paper's table");
    assert_eq!(main.0, ["setting", "mimic test", "paper", "chexpert test", "paper"]);
    // The paper's order, whatever the order of the rows.
    let settings: Vec<&str> = main.1.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(settings, ["rand + LP", "FT", "CLS + LP"]);
    assert_eq!(cell(&main, "CLS + LP", 1), "77.8 [76.9, 78.6]");
    assert_eq!(cell(&main, "CLS + LP", 2), "77.8");
    assert_eq!(cell(&main, "CLS + LP", 3), "85.1 [83.0, 87.0]");
    assert_eq!(cell(&main, "CLS + LP", 4), "87.2");
    let ft = &report.rows[2];
    assert_eq!(cell(&main, "FT", 1), layout::auc_ci(ft.macro_auc, ft.ci95));
    assert_eq!(cell(&main, "FT", 2), "77.2");
    assert_eq!(cell(&main, "rand + LP", 2), "66.5");
    // Not run: empty cells, and no published figure for a setting the paper did not transfer.
    assert_eq!(cell(&main, "FT", 3), "");
    assert_eq!(cell(&main, "FT", 4), "");
    assert!(md.contains(layout::PUBLISHED_NOTE));

    let diffs = md_table(&md, "## Paired differences");
    assert_eq!(cell(&diffs, "CLS + LP - FT", 2), "+0.6 [-0.4, +1.6]");
    assert_eq!(cell(&diffs, "CLS + LP - FT", 3), "no");
    assert_eq!(cell(&diffs, "CLS + LP - rand + LP", 2), "+11.2 [+9.5, +13.0]");
    assert_eq!(cell(&diffs, "CLS + LP - rand + LP", 3), "yes: CLS + LP higher");
    assert_eq!(cell(&diffs, "CLS + LP - rand + LP", 4), "`runs/demo/cls-lp-mimic`; `runs/demo/rand-lp-mimic`");

    let labels = md_table(&md, "### mimic test");
    assert_eq!(labels.0, ["label", "rand + LP", "FT", "CLS + LP"]);
    let cls = &report.rows[0];
    assert_eq!(cell(&labels, "Edema", 3), layout::pct(cls.per_label["Edema"]));
    assert_eq!(cell(&labels, "Pneumonia", 3), "n/a");
    assert_eq!(cell(&labels, "run folder", 3), "`runs/demo/cls-lp-mimic`");

    let sweep = md_table(&md, "### label fraction, mimic test");
    assert_eq!(sweep.0, ["label fraction", "FT", "CLS + LP"]);
    let values: Vec<&str> = sweep.1.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(values, ["0.01", "0.1", "1"]);
    let r = report.rows.iter().find(|r| r.run == "cls-lp-frac0.1").unwrap();
    assert_eq!(cell(&sweep, "0.1", 2), layout::auc_ci(r.macro_auc, r.ci95));

    // Every number's run folder is named, and every linked plot is there.
    for r in &report.rows {
        assert!(md.contains(&format!("`{}`", r.run_dir)), "{} not in results.md", r.run_dir);
    }
    assert!(md.contains("`runs/demo/retrieval`") && md.contains("`runs/demo/zero-shot`"));
    let links: Vec<&str> =
        md.match_indices("](plots/").map(|(i, _)| &md[i + 2..i + 2 + md[i + 2..].find(')').unwrap()]).collect();
    assert_eq!(links.len(), 3, "{links:?}");
    for l in links {
        assert!(dir.join(l).is_file(), "{l} linked but not written");
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_terminal_table_is_aligned() {
    let dir = scratch("terminal");
    let report = sample(&dir, &mut rng());
    let text = table(&report);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("cxrclip test study"), "{text}");
    // The grid: header, rule, one line per setting, all as wide as the rule.
    let grid = &lines[1..6];
    assert!(grid[0].starts_with("setting") && grid[1].chars().all(|c| c == '-'), "{text}");
    let width = grid[1].len();
    for l in grid {
        assert_eq!(l.chars().count(), width, "{l:?} in\n{text}");
    }
    let cls = grid.iter().find(|l| l.starts_with("CLS + LP")).unwrap();
    let cells: Vec<&str> = cls.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells, ["CLS + LP", "77.8 [76.9, 78.6]", "77.8", "85.1 [83.0, 87.0]", "87.2"], "{text}");
    // Numbers are right-aligned: a cell ends where its header ends.
    let end_of = |l: &str, s: &str| l.find(s).unwrap() + s.len();
    assert_eq!(end_of(grid[0], "chexpert test"), end_of(cls, "85.1 [83.0, 87.0]"));
    assert!(text.contains("CLS + LP - rand + LP") && text.contains("+11.2 [+9.5, +13.0]  CI excludes 0"), "{text}");
    fs::remove_dir_all(&dir).unwrap();
}

/// Splits a CSV line on commas outside quotes.
fn csv_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

#[test]
fn the_csv_has_a_macro_line_and_a_line_per_label() {
    let dir = scratch("csv");
    let mut report = sample(&dir, &mut rng());
    report.rows[0].run_dir = "runs/demo/cls, \"lp\"".into();
    write(&report, &dir).unwrap();
    let text = fs::read_to_string(dir.join("results.csv")).unwrap();
    let lines: Vec<Vec<String>> = text.lines().map(csv_fields).collect();
    let expected: usize = 1 + report.rows.iter().map(|r| 1 + r.per_label.len()).sum::<usize>();
    assert_eq!(lines.len(), expected);
    assert!(lines.iter().all(|l| l.len() == 15), "every line has the header's 15 fields");
    let col = |name: &str| lines[0].iter().position(|h| h == name).unwrap();
    let first = &lines[1];
    assert_eq!(first[col("run_dir")], "runs/demo/cls, \"lp\"");
    assert_eq!(first[col("label")], "(macro)");
    assert_eq!(first[col("auc")].parse::<f64>().unwrap(), 0.778);
    assert_eq!(first[col("ci95_high")].parse::<f64>().unwrap(), 0.786);
    let edema = lines.iter().find(|l| l[col("run")] == "cls-lp-mimic" && l[col("label")] == "Edema").unwrap();
    assert_eq!(edema[col("auc")].parse::<f64>().unwrap(), report.rows[0].per_label["Edema"]);
    assert_eq!(edema[col("ci95_low")], "");
    let swept = lines.iter().find(|l| l[col("run")] == "ft-frac0.01").unwrap();
    assert_eq!((swept[col("ablation")].as_str(), swept[col("ablation_value")].as_str()), ("label fraction", "0.01"));
    // An undefined AUC is an empty field.
    let pneumonia = lines.iter().find(|l| l[col("run")] == "ft-mimic" && l[col("label")] == "Pneumonia").unwrap();
    assert_eq!(pneumonia[col("auc")], "");
    fs::remove_dir_all(&dir).unwrap();
}

/// (width, height, pixels of exactly this colour, share of non-white pixels).
fn look(path: &Path, colour: [u8; 3]) -> (u32, u32, usize, f64) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display())).to_rgb8();
    let n = img.pixels().filter(|p| p.0 == colour).count();
    let ink = img.pixels().filter(|p| p.0 != [255, 255, 255]).count() as f64 / (img.width() * img.height()) as f64;
    (img.width(), img.height(), n, ink)
}

#[test]
fn the_plots_decode_and_show_each_setting() {
    let dir = scratch("plots");
    let report = sample(&dir, &mut rng());
    write(&report, &dir).unwrap();
    let plots = dir.join("plots");
    let (red, blue, grey, orange) = ([214, 39, 40], [31, 119, 180], [127, 127, 127], [255, 127, 14]);

    // Six labels: a 3 x 2 grid of panels; a line of each setting's colour.
    let roc = plots.join("roc_mimic_test.png");
    for colour in [red, blue, grey] {
        let (w, h, n, ink) = look(&roc, colour);
        assert_eq!((w, h), (3 * 360, 2 * 360 + 50));
        assert!(n > 500, "{n} pixels of {colour:?} in the ROC plot");
        assert!((0.03..0.6).contains(&ink), "ink {ink}");
    }
    // Two panels of losses, the logit scale and the validation AUC: a 2 x 2 grid; the runs in
    // the first two colours.
    let training = plots.join("training.png");
    for colour in [blue, orange] {
        let (w, h, n, ink) = look(&training, colour);
        assert_eq!((w, h), (2 * 720, 2 * 440 + 50));
        assert!(n > 500, "{n} pixels of {colour:?} in the training plot");
        assert!((0.03..0.6).contains(&ink), "ink {ink}");
    }
    // CLS + LP in red, FT in blue.
    let sweep = plots.join("ablation_label-fraction_mimic_test.png");
    for colour in [red, blue] {
        let (_, _, n, ink) = look(&sweep, colour);
        assert!(n > 300, "{n} pixels of {colour:?} in the ablation plot");
        assert!((0.03..0.6).contains(&ink), "ink {ink}");
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_report_writes_tables_and_no_plots() {
    let dir = scratch("empty");
    let written = write(&Report::default(), &dir).unwrap();
    assert_eq!(written.files.len(), 3);
    assert!(written.notes.is_empty());
    assert_eq!(fs::read_dir(dir.join("plots")).unwrap().count(), 0);
    let json: Value = serde_json::from_slice(&fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["rows"], serde_json::json!([]));
    assert_eq!(json["comparisons"], serde_json::json!([]));
    let md = fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("No linear-probe or fine-tuning evaluation has finished yet."));
    assert_eq!(fs::read_to_string(dir.join("results.csv")).unwrap().lines().count(), 1);
    assert!(table(&Report::default()).contains("no linear-probe or fine-tuning evaluation has finished yet"));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_rewrite_drops_stale_plots_and_notes_a_missing_metrics_file() {
    let dir = scratch("rewrite");
    let mut report = sample(&dir, &mut rng());
    write(&report, &dir).unwrap();
    assert!(dir.join("plots/ablation_label-fraction_mimic_test.png").is_file());
    report.rows.retain(|r| r.ablation.is_none());
    report.training.truncate(1);
    report.training[0].metrics = dir.join("not-yet/metrics.jsonl").display().to_string();
    report.rows[0].macro_auc = 0.801;
    let written = write(&report, &dir).unwrap();
    let mut plots: Vec<String> =
        fs::read_dir(dir.join("plots")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    plots.sort();
    assert_eq!(plots, ["roc_mimic_test.png"]);
    assert_eq!(written.notes.len(), 1, "{:?}", written.notes);
    assert!(written.notes[0].contains("not-yet/metrics.jsonl"), "{:?}", written.notes);
    let md = fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("80.1 [76.9, 78.6]") && !md.contains("## Ablations") && md.contains("not-yet/metrics.jsonl"));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn undefined_numbers_are_written_as_such() {
    let dir = scratch("nan");
    let mut rng = rng();
    let mut report = sample(&dir, &mut rng);
    report.rows[0].macro_auc = f64::NAN;
    report.rows[0].ci95 = [f64::NAN, f64::INFINITY];
    report.rows[5].macro_auc = f64::NAN; // a point of the sweep
    report.rocs[0].curves[0].points.push((f64::NAN, 0.5));
    report.comparisons[0].ci95 = [f64::NAN, 0.1];
    report.training[0].metrics = dir.join("bad.jsonl").display().to_string();
    fs::write(dir.join("bad.jsonl"), "{\"step\":1,\"loss\":null}\n{\"step\":2,\"loss\":1e999}\nnot json\n").unwrap();
    write(&report, &dir).unwrap();
    let md = fs::read_to_string(dir.join("results.md")).unwrap();
    let main = md_table(&md, "## The paper's table");
    assert_eq!(cell(&main, "CLS + LP", 1), "n/a");
    let diffs = md_table(&md, "## Paired differences");
    assert_eq!(cell(&diffs, "CLS + LP - FT", 2), "+0.6");
    assert_eq!(cell(&diffs, "CLS + LP - FT", 3), "no");
    let json: Value = serde_json::from_slice(&fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert!(json["rows"][0]["macro_auc"].is_null());
    assert!(table(&report).contains("n/a"));
    for png in ["roc_mimic_test.png", "ablation_label-fraction_mimic_test.png", "training.png"] {
        assert!(dir.join("plots").join(png).is_file(), "{png}");
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn settings_and_columns_follow_the_paper_then_arrival() {
    let order = layout::ordered_settings(["mine", "CLS + LP", "ft", "Random + LP", "other", "CLIP+LP"]);
    assert_eq!(order, ["Random + LP", "CLIP+LP", "ft", "CLS + LP", "mine", "other"]);
    let col = |d: &str, s: &str| Col { dataset: d.into(), split: s.into() };
    let cols =
        layout::ordered_cols([col("rsna", "test"), col("mine", "test"), col("mimic", "valid"), col("mimic", "test")]);
    assert_eq!(cols, [col("mimic", "test"), col("mimic", "valid"), col("rsna", "test"), col("mine", "test")]);
    // Published figures: test splits only (CheXpert's test set is its valid.csv).
    assert_eq!(layout::published("CLS + LP", &col("mimic", "test")), Some(77.8));
    assert_eq!(layout::published("cls+lp", &col("rsna-pneumonia", "test")), Some(90.7));
    assert_eq!(layout::published("CLS + LP", &col("chexpert", "valid")), Some(87.2));
    assert_eq!(layout::published("CLS + LP", &col("mimic", "valid")), None);
    assert_eq!(layout::published("FT", &col("chexpert", "test")), None);
    assert_eq!(layout::published("CLS + LP", &col("mine", "test")), None);
}

#[test]
fn numbers_are_written_the_same_way_everywhere() {
    assert_eq!(layout::auc_ci(0.7781, [0.7691, 0.7862]), "77.8 [76.9, 78.6]");
    assert_eq!(layout::auc_ci(0.5, [f64::NAN, 0.6]), "50.0");
    assert_eq!(layout::diff_ci(-0.0123, [-0.02, 0.0]), "-1.2 [-2.0, +0.0]");
    assert_eq!(layout::excludes_zero([0.001, 0.02]), Some(true));
    assert_eq!(layout::excludes_zero([-0.02, -0.001]), Some(false));
    assert_eq!(layout::excludes_zero([-0.02, 0.001]), None);
    assert_eq!(layout::excludes_zero([0.0, 0.02]), None);
    assert_eq!(layout::value(0.010000000000000002), "0.01");
    assert_eq!(layout::value(192.0), "192");
    assert_eq!(layout::value(0.03), "0.03");
    assert_eq!(layout::count(1234567), "1,234,567");
    assert_eq!(layout::count(999), "999");
    assert_eq!(layout::slug("Pretraining-data fraction!"), "pretraining-data-fraction");
    assert_eq!(layout::slug("%%"), "unnamed");
}

/// A gray PNG of `side` x `side` at one level, for the text-to-image figure.
fn flat_png(path: &Path, side: u32, level: u8) -> String {
    image::GrayImage::from_pixel(side, side, image::Luma([level])).save(path).unwrap();
    path.display().to_string()
}

#[test]
fn the_text_to_image_figure_shows_each_image_in_its_column() {
    let dir = scratch("t2i");
    let side = 64u32;
    let findings = ["Cardiomegaly", "Edema"];
    // Levels chosen so each image can be found in the figure: generated 40/80 (rand), 120/160
    // (CLS), real 200/240.
    let row = |setting: &str, base: u8, real: bool| TextToImageRow {
        run: format!("t2i-{setting}"),
        setting: setting.into(),
        steps: 5,
        size: side as usize,
        cells: findings
            .iter()
            .enumerate()
            .map(|(k, f)| TextToImageCell {
                finding: f.to_string(),
                prompt: format!("Moderate {} seen here.", f.to_lowercase()),
                generated: flat_png(&dir.join(format!("{setting}-{k}.png")), side, base + 40 * k as u8),
                real: real.then(|| flat_png(&dir.join(format!("real-{k}.png")), side, 200 + 40 * k as u8)),
                real_source: None,
                similarity: 0.25 + k as f64 / 10.0,
                own_prompt_wins: k == 1,
                probe: Some(0.5 + k as f64 / 10.0),
                probe_real_positive: Some(0.7),
                probe_real_negative: None,
            })
            .collect(),
        seconds: 1.0,
        run_dir: format!("runs/t2i-{setting}"),
    };
    let report = Report { text_to_image: vec![row("rand", 40, true), row("CLS", 120, true)], ..Report::default() };
    let written = write(&report, &dir).unwrap();
    assert!(written.notes.is_empty(), "{:?}", written.notes);
    let fig = image::open(dir.join("plots/text_to_image.png")).unwrap().to_rgb8();
    // Every image's level appears as a block of at least side x side pixels.
    for level in [40u8, 80, 120, 160, 200, 240] {
        let n = fig.pixels().filter(|p| p.0 == [level, level, level]).count();
        assert!(n >= (side * side) as usize, "level {level}: {n} pixels");
    }
    // Column order: the rand cardiomegaly image (40) left of its edema image (80), the rand row
    // above the CLS row (120), and the real row (200) below both.
    // Searched in the image area only (right of the row labels, below the headers, above the
    // sentences), where anti-aliased text cannot match a level by chance.
    let images_area = |x: u32, y: u32| x >= 120 && (28..28 + 3 * (side + 8)).contains(&y);
    let first = |level: u8| {
        let (x, y, _) = fig
            .enumerate_pixels()
            .find(|(x, y, p)| images_area(*x, *y) && p.0 == [level, level, level])
            .unwrap_or_else(|| panic!("level {level} not in the image area"));
        (x, y)
    };
    assert!(first(40).0 < first(80).0);
    assert!(first(40).1 < first(120).1 && first(120).1 < first(200).1);
    let md = fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("## Text to image"), "{md}");
    assert!(md.contains("![generated (rows per model) and real test images per finding](plots/text_to_image.png)"));
    let t = md_table(&md, "## Text to image");
    assert_eq!(t.0[..3], ["setting", "Cardiomegaly", "Edema"]);
    assert_eq!(cell(&t, "CLS", 1), "0.250");
    assert_eq!(cell(&t, "CLS", 3), "1/2");
    assert!(md.contains("- Edema: \"Moderate edema seen here.\""));
    let probe = md_table(&md, "A linear probe fitted");
    assert_eq!(cell(&probe, "CLS", 1), "0.50 (0.70 / -)");
    assert_eq!(cell(&probe, "rand", 2), "0.60 (0.70 / -)");
    let json: Value = serde_json::from_slice(&fs::read(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["text_to_image"][1]["cells"][0]["similarity"], 0.25);
    fs::remove_dir_all(&dir).unwrap();
}
