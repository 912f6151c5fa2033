//! A CUDA run is refused before any worker starts when it cannot run: one line naming what is
//! missing (the driver, GPUs, a library) or the kernels' limit, a non-zero exit, in seconds.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs the coordinator in a fresh folder; (exit code, stderr, elapsed, whether it made a run folder).
fn coordinator(args: &[&str]) -> (Option<i32>, String, Duration, bool) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let t = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .current_dir(dir.path())
        .args(args)
        .arg("--run-dir")
        .arg(&run)
        .output()
        .expect("start coordinator");
    (o.status.code(), String::from_utf8_lossy(&o.stderr).trim().to_string(), t.elapsed(), Path::new(&run).exists())
}

fn one_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "expected one line, got:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gpus_without_enough_devices_is_one_line_in_seconds() {
    // The default sizes (width 128, 4 heads: head dimension 32), as an operator types it.
    let (code, err, took, made) = coordinator(&["--gpus", "64", "--steps", "1"]);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!made, "a refused run made its folder");
    // What it names depends on the machine: no driver, no usable GPU, or too few of them.
    let named =
        ["CUDA driver", "cuInit", "CUDA devices visible", "NCCL", "NVRTC", "cuBLAS", "cuda_bf16.h", "head dimension"];
    assert!(named.iter().any(|n| err.contains(n)), "{err}");
    assert!(err.contains("--gpus 64") || err.contains("head dimension"), "{err}");
}

#[test]
fn a_model_the_kernels_cannot_run_is_refused_before_workers() {
    // Head dimension 24 (width 96, 4 heads): no CUDA attention kernel takes it; the CPU does.
    let (code, err, took, made) = coordinator(&["--gpus", "1", "--steps", "1", "--width", "96", "--heads", "4"]);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(err.contains("head dimension") && err.contains("has 24"), "{err}");
    assert!(took < Duration::from_secs(10));
    assert!(!made);
    // The same for workers started by hand on GPU machines: the coordinator still checks.
    let (code, err, _, _) =
        coordinator(&["--expect-workers", "2", "--device", "cuda", "--steps", "1", "--width", "96", "--heads", "4"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("head dimension"), "{err}");
}

#[test]
fn a_plan_on_missing_gpus_stops_before_any_run() {
    let plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans/demo.toml");
    let (code, err, took, made) = coordinator(&["--gpus", "64", plan.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    one_line(&err);
    assert!(err.contains("--gpus 64"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!made, "a refused plan made its folder");
}
