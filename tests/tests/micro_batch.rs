//! `--micro-batch M` end to end: real coordinator and worker processes train the same losses
//! with the local batch embedded M pairs at a time (gradient caching) as in one pass, for
//! contrastive training and fine-tuning; every metrics line carries the rank-0 worker's peak
//! resident memory; a micro-batch of no pairs is refused in one line before any worker starts.

use std::path::Path;

use e2e::*;

const STEPS: u64 = 4;

/// Every step line's `rss_mb`: present and positive on Linux.
fn assert_rss_on_every_line(dir: &Path) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let mut n = 0;
    for line in text.lines().filter(|l| l.contains("\"loss\"")) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json line");
        let rss = v["rss_mb"].as_f64().unwrap_or_else(|| panic!("no rss_mb in {line}"));
        assert!(rss > 1.0, "rss_mb {rss} in {line}");
        n += 1;
    }
    assert_eq!(n, STEPS as usize, "{text}");
}

/// Runs `extra` on 2 workers (local batch 8) with and without `--micro-batch 3` (which does
/// not divide it); the losses agree to 1e-4 relative.
fn same_losses_with_micro_batches(name: &str, extra: &[&str]) {
    let _g = serial();
    let mut got = Vec::new();
    for micro in [None, Some("3")] {
        let dir = fresh_dir(&format!("{name}-{}", micro.unwrap_or("one-pass")));
        let mut args = train_args(&dir, 2, STEPS);
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(m) = micro {
            args.extend(["--micro-batch".to_string(), m.to_string()]);
        }
        run_ok(&args);
        let l = losses(&dir);
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
        assert_rss_on_every_line(&dir);
        got.push(l);
    }
    for ((step, one_pass), (_, micro)) in got[0].iter().zip(&got[1]) {
        assert_close(&format!("{name}: loss of step {step}"), *micro, *one_pass, 1e-4);
    }
    // The steps train (the comparison is not of constants).
    assert!(got[0].iter().any(|x| x.1 != got[0][0].1), "{:?}", got[0]);
}

#[test]
fn contrastive_losses_with_micro_batches_equal_one_pass() {
    same_losses_with_micro_batches("micro-cls", &[]);
}

#[test]
fn finetune_losses_with_micro_batches_equal_one_pass() {
    same_losses_with_micro_batches("micro-ft", &["--task", "finetune", "--lr", "1e-3"]);
}

#[test]
fn a_micro_batch_of_no_pairs_is_refused_in_one_line() {
    let dir = fresh_dir("micro-zero");
    let mut args = train_args(&dir, 2, STEPS);
    args.extend(["--micro-batch", "0"].map(String::from));
    let out = coordinator().args(&args).output().expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--micro-batch"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!dir.join("metrics.jsonl").exists(), "a worker started: {}", dir.display());
}
