//! Flags and config values a run cannot use are refused up front, in one line naming the flag
//! or the key, with a non-zero exit: never a panic, never a worker restarted on them.

use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cxrclip-bad-values-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn refused(args: &[&str], want: &str) {
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} accepted: {err}");
    assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    assert!(err.contains(want), "{args:?}: {err}");
}

#[test]
fn bad_flags_are_one_line_before_anything_starts() {
    let run = tmp("run");
    let run = run.to_str().unwrap();
    let train = |extra: &[&str]| {
        let mut a = vec!["--workers", "1", "--synthetic", "8", "--steps", "2", "--run-dir", run];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, want) in [
        (&["--width", "0"][..], "--width"),
        (&["--heads", "0"], "--heads"),
        (&["--weight-decay", "nan"], "--weight-decay"),
        (&["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
        (&["--register-timeout", "0"], "--register-timeout"),
    ] {
        let a = train(extra);
        refused(&a.iter().map(String::as_str).collect::<Vec<_>>(), want);
    }
    assert!(!PathBuf::from(run).exists(), "a refused run made its folder");
    refused(&["bench", "train-step", "--steps", "0"], "--steps");
    refused(&["bench", "train-step", "--width", "0", "--steps", "1"], "--width");
    let out = tmp("synth");
    refused(
        &["synth", "--out", out.to_str().unwrap(), "--studies", "4", "--dataset", "mimic", "--prevalence", "nan"],
        "--prevalence",
    );
    assert!(!out.exists(), "a refused synth wrote {}", out.display());
}

/// A small model folder made by `coordinator init`, to start runs from.
fn small_init(name: &str) -> PathBuf {
    let init = tmp(name);
    std::fs::create_dir_all(&init).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["init", "--out", init.to_str().unwrap(), "--width", "64", "--layers", "1", "--heads", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    init
}

/// A --init model whose config.json asks for absurd sizes, or a layer-norm eps of 0, is
/// refused with the model's size (or the key, for layers past the cap) before anything is
/// allocated.
#[test]
fn an_init_config_with_absurd_sizes_is_refused_with_its_size() {
    let init = small_init("init");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(init.join("config.json")).unwrap()).unwrap();
    let run = tmp("init-run");
    for (tower, key, value, want) in [
        ("vision_config", "num_hidden_layers", serde_json::json!(1_000_000_000u64), "num_hidden_layers"),
        ("text_config", "intermediate_size", serde_json::json!(1_000_000_000_000u64), "parameters"),
        ("text_config", "vocab_size", serde_json::json!(1u64 << 40), "parameters"),
        ("text_config", "layer_norm_eps", serde_json::json!(0.0), "layer_norm_eps"),
    ] {
        let mut c = good.clone();
        c[tower][key] = value;
        std::fs::write(init.join("config.json"), c.to_string()).unwrap();
        refused(
            &[
                "--workers",
                "1",
                "--synthetic",
                "8",
                "--steps",
                "2",
                "--init",
                init.to_str().unwrap(),
                "--run-dir",
                run.to_str().unwrap(),
            ],
            want,
        );
    }
    std::fs::remove_dir_all(&init).unwrap();
}

/// `--init` sets the model's sizes: size flags beside it are refused, not ignored.
#[test]
fn size_flags_beside_init_are_refused() {
    let init = small_init("init-sizes");
    let run = tmp("init-sizes-run");
    let (init_s, run_s) = (init.to_str().unwrap(), run.to_str().unwrap());
    refused(&["--workers", "1", "--synthetic", "8", "--init", init_s, "--width", "32", "--run-dir", run_s], "--init");
    std::fs::remove_dir_all(&init).unwrap();
}
