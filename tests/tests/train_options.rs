//! The paper's training choices on real coordinator and worker processes: adapters mode with
//! the one-cycle schedule and the AdamW, views and report options reaches the workers (the
//! rates they report, the checkpoint's adapters, which tensors move), `run.json` records the
//! options, a bad option is refused without touching the run, and `--resume` continues the run
//! with them.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::path::Path;

use e2e::*;
use serde_json::Value;

/// Tensor name -> raw bytes of a safetensors file (8-byte header size, JSON header, data).
fn tensors(path: &Path) -> HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors header");
    let data = &bytes[8 + n..];
    header
        .as_object()
        .expect("header object")
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let (a, b) =
                (v["data_offsets"][0].as_u64().unwrap() as usize, v["data_offsets"][1].as_u64().unwrap() as usize);
            (k.clone(), data[a..b].to_vec())
        })
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("json")
}

/// The `lr` of every line of `metrics.jsonl`.
fn rates(run_dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("metrics line")["lr"].as_f64().expect("lr"))
        .collect()
}

/// PyTorch's OneCycleLR (cosine, div_factor 25, final_div_factor 1e4) at 0-based `step` of
/// `total` when phase one ends before step 0 (`pct * total < 1`, as here): all of the run is
/// the cosine from the peak, whose phase starts at step `pct * total - 1`.
fn one_cycle_down(base: f64, total: u64, pct: f64, step: u64) -> f64 {
    let min = base / 25.0 / 1e4;
    let start = pct * total as f64 - 1.0;
    let frac = (step as f64 - start) / (total as f64 - 1.0 - start);
    min + (base - min) / 2.0 * ((PI * frac).cos() + 1.0)
}

/// A rate the worker reported (an f32) against the reference.
fn assert_rate(what: &str, got: f64, want: f64) {
    assert!(!got.is_nan() && (got - want).abs() <= 1e-15 + 1e-6 * want.abs(), "{what}: {got} vs {want}");
}

fn is_adapter_or_norm(name: &str) -> bool {
    name.contains(".adapter.") || ["layer_norm", "layrnorm", "layernorm"].iter().any(|n| name.contains(n))
}

#[test]
fn the_papers_options_train_are_recorded_and_resume() {
    let _g = serial();
    let dir = fresh_dir("train-options");
    let mut args = train_args(&dir, 2, 4);
    args.extend(
        [
            "--mode",
            "adapters",
            "--adapter-width",
            "16",
            "--schedule",
            "one-cycle",
            "--warmup-fraction",
            "0.1",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--views",
            "all",
            "--sections",
            "impression",
        ]
        .map(String::from),
    );
    run_ok(&args);

    let check_record = |when: &str| {
        let a = &json(&dir.join("run.json"))["args"];
        let want = [
            ("mode", Value::from("adapters")),
            ("adapter_width", 16.into()),
            ("schedule", "one-cycle".into()),
            ("warmup_fraction", 0.1.into()),
            ("beta1", 0.9.into()),
            ("beta2", 0.98.into()),
            ("eps", 1e-6.into()),
            ("views", "all".into()),
            ("sections", "impression".into()),
            ("uncertain", "zeros".into()),
            ("augment_rotate", 45.0.into()),
            ("augment_scale", serde_json::json!([0.9, 1.1])),
            ("augment_translate", 0.15.into()),
            ("no_shuffle_sentences", false.into()),
        ];
        for (key, value) in want {
            assert_eq!(a[key], value, "run.json {when}: {key}");
        }
    };
    check_record("after the first run");
    let config = json(&dir.join("checkpoints/step-000004/config.json"));
    assert_eq!(config["adapter_dim"], 16);

    // The workers ran the one-cycle schedule: 4 steps, 10% warm-up (phase one ends at step
    // -0.6), from the default rate 5e-4.
    let lr = rates(&dir);
    assert_eq!(lr.len(), 4);
    for (k, got) in lr.iter().enumerate() {
        assert_rate(&format!("lr of step {}", k + 1), *got, one_cycle_down(5e-4, 4, 0.1, k as u64));
    }

    // A bad option is refused in one line before anything starts, and the run in the folder
    // is left as it was.
    let mut bad = args.clone();
    bad.extend(["--augment-scale", "1.2,0.8"].map(String::from));
    let out = coordinator().args(&bad).output().expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--augment-scale 1.2,0.8"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(dir.join("checkpoints/step-000004/model.safetensors").exists());

    let first = losses(&dir);
    let out = run_ok(&[
        "--resume".into(),
        dir.to_string_lossy().into_owned(),
        "--steps".into(),
        "6".into(),
        "--workers".into(),
        "1".into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let more = losses(&dir);
    assert_eq!(more.len(), 6, "{err}");
    assert_eq!(&more[..4], &first[..]);
    check_record("after --resume");
    assert_eq!(json(&dir.join("checkpoints/step-000006/config.json"))["adapter_dim"], 16);
    // The resumed steps ran one-cycle over the 6 steps asked for now.
    let lr = rates(&dir);
    for (k, got) in lr.iter().enumerate().skip(4) {
        assert_rate(&format!("resumed lr of step {}", k + 1), *got, one_cycle_down(5e-4, 6, 0.1, k as u64));
    }

    // The resumed steps trained the adapters and the layer norms, and nothing else.
    let before = tensors(&dir.join("checkpoints/step-000004/model.safetensors"));
    let after = tensors(&dir.join("checkpoints/step-000006/model.safetensors"));
    assert_eq!(before.len(), after.len());
    let adapters = before.keys().filter(|k| k.contains(".adapter.")).count();
    assert_eq!(adapters, 16, "2 layers x 2 towers x 4 adapter tensors");
    for (name, b) in &before {
        let moved = after[name] != *b;
        assert_eq!(moved, is_adapter_or_norm(name), "{name}: moved {moved}");
    }
}
