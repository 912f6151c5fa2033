//! The study end to end: `coordinator demo --quick` (the compiled-in tiny plan: generated trees,
//! CLS, probes, fine-tuning, zero-shot, retrieval) writes the report, and a plan whose worker
//! and then coordinator are killed mid-way resumes to the same results; fine-tuning gives the
//! same losses on one and two workers.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use e2e::*;

fn demo(dir: &Path) -> Command {
    let mut c = coordinator();
    c.args(["demo", "--quick", "--resamples", "100", "--run-dir", dir.to_str().expect("utf-8 path")]);
    c
}

/// `(run, dataset, split, macro_auc, ci95)` of every row of `results.json`, sorted.
fn rows(dir: &Path) -> Vec<(String, String, String, f64, [f64; 2])> {
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("results.json parses");
    let mut out: Vec<_> = v["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let ci = r["ci95"].as_array().expect("ci95");
            (
                r["run"].as_str().expect("run").to_string(),
                r["dataset"].as_str().expect("dataset").to_string(),
                r["split"].as_str().expect("split").to_string(),
                r["macro_auc"].as_f64().expect("macro_auc"),
                [ci[0].as_f64().expect("low"), ci[1].as_f64().expect("high")],
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// The uninterrupted quick demo, run once per test process.
fn reference() -> &'static std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let _g = serial();
        let dir = fresh_dir("demo-quick");
        let out = demo(&dir).output().expect("starting the demo");
        assert!(out.status.success(), "demo --quick failed: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

#[test]
fn the_quick_demo_writes_the_report() {
    let dir = reference();
    for f in ["results.md", "results.json", "results.csv"] {
        assert!(dir.join(f).is_file(), "no {f}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let rows = v["rows"].as_array().expect("rows");
    assert!(!rows.is_empty());
    for r in rows {
        for key in
            ["run", "kind", "dataset", "split", "fraction", "macro_auc", "ci95", "per_label", "images", "patients"]
        {
            assert!(r.get(key).is_some(), "a row lacks {key}: {r}");
        }
        let auc = r["macro_auc"].as_f64().unwrap();
        let ci = r["ci95"].as_array().unwrap();
        assert!((0.0..=1.0).contains(&auc), "{r}");
        assert!(ci[0].as_f64().unwrap() <= auc + 1e-12 && auc <= ci[1].as_f64().unwrap() + 1e-12, "{r}");
    }
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"linear-probe") && kinds.contains(&"finetune"), "{kinds:?}");
    // Every evaluated row's predictions.csv holds the contract's columns.
    let csvs: Vec<_> = files_under(&dir.join("runs")).into_iter().filter(|p| p.ends_with("predictions.csv")).collect();
    assert!(!csvs.is_empty());
    for p in &csvs {
        let head = std::fs::read_to_string(p).unwrap();
        let first = head.lines().next().unwrap();
        assert!(first.starts_with("image,patient,"), "{}: {first}", p.display());
        assert!(first.contains(":truth"), "{}: {first}", p.display());
    }
    let pngs: Vec<_> =
        files_under(&dir.join("plots")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    assert!(!pngs.is_empty(), "no plots");
}

#[test]
fn a_plan_killed_mid_way_resumes_to_the_same_results() {
    let want = rows(reference());
    let _g = serial();
    let dir = fresh_dir("demo-killed");
    let mut child = demo(&dir).stderr(std::process::Stdio::null()).spawn().expect("starting the demo");
    let pid = child.id();
    // A worker of the CLS run dies mid-training: the run restarts from its checkpoint.
    let cls = dir.join("runs").join("cls").join("metrics.jsonl");
    assert!(wait_for(Duration::from_secs(300), || losses_in(&cls) >= 2), "the CLS run never got going");
    let workers = children(pid);
    assert!(!workers.is_empty(), "no worker to kill");
    sigkill(workers[0]);
    // Then the coordinator itself, once a later run has finished: the plan continues on a new
    // start, skipping what is done.
    let later = dir.join("runs").join("cls").join("done.json");
    assert!(wait_for(Duration::from_secs(300), || later.exists()), "the CLS run never finished");
    sigkill(pid);
    let _ = child.wait();
    let out = demo(&dir).output().expect("restarting the demo");
    assert!(out.status.success(), "the resumed demo failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped"), "nothing was skipped on the resume");
    let got = rows(&dir);
    assert_eq!(got.len(), want.len(), "{got:?}\nvs\n{want:?}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.0, &g.1, &g.2), (&w.0, &w.1, &w.2));
        assert_close(&format!("{} {} macro AUC", g.0, g.1), g.3, w.3, 1e-9);
    }
}

fn losses_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Fine-tuning's loss is the mean over the global batch: one and two workers agree.
#[test]
fn finetune_on_one_and_two_workers_gives_the_same_losses() {
    let _g = serial();
    let mut got = Vec::new();
    for workers in [1, 2] {
        let dir = fresh_dir(&format!("ft-{workers}"));
        let mut args = train_args(&dir, workers, 6);
        args.extend(["--task", "finetune", "--lr", "1e-3"].map(String::from));
        run_ok(&args);
        let l = losses(&dir);
        assert_eq!(l.len(), 6, "{l:?}");
        assert!(validation_lines(&dir) >= 1, "no epoch-end validation in {}", dir.display());
        got.push(l);
    }
    assert_eq!(got[0].len(), got[1].len());
    for ((s1, l1), (s2, l2)) in got[0].iter().zip(&got[1]) {
        assert_eq!(s1, s2);
        assert_close(&format!("step {s1}"), *l2, *l1, 2e-5);
    }
}

/// Lines of `metrics.jsonl` that are epoch-end validations (no loss).
fn validation_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("valid_macro_auc"))
        .count()
}
