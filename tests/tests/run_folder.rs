//! What a run folder promises: a fresh start never deletes a run there without `--force`, one
//! coordinator at a time holds it (a lock the kernel drops with its process), and `--resume`
//! falls back past a damaged checkpoint and clears what an interrupted write left.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use e2e::{assert_close, coordinator, fresh_dir, losses, run_ok, serial, sigkill, train_args, wait_child, wait_for};

fn arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_run_folder_is_refused_locked_and_resumed_past_a_damaged_checkpoint() {
    let _g = serial();
    let dir = fresh_dir("run-folder");
    let mut args = train_args(&dir, 1, 4);
    let at = args.iter().position(|a| a == "--checkpoint-every").expect("--checkpoint-every");
    args[at + 1] = "2".into();
    args.extend(["--keep-checkpoints".to_string(), "0".to_string()]);
    run_ok(&args);
    let first = losses(&dir);
    assert_eq!(first.len(), 4);
    assert_eq!(checkpoints(&dir), ["step-000002", "step-000004"]);

    // A fresh start in the folder is refused in one line and deletes nothing.
    let out = coordinator().args(&args).output().expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    assert_eq!(checkpoints(&dir), ["step-000002", "step-000004"], "{err}");
    assert_eq!(losses(&dir), first);

    // A truncated latest checkpoint and an interrupted write's leftovers: --resume skips the
    // first (saying why), clears the second, and redoes steps 3 and 4 from step 2's checkpoint.
    let weights = dir.join("checkpoints/step-000004/model.safetensors");
    let len = std::fs::metadata(&weights).expect("weights").len();
    std::fs::OpenOptions::new().write(true).open(&weights).expect("open").set_len(len / 2).expect("truncate");
    let staging = dir.join("checkpoints/.step-000006.staging-4194000");
    std::fs::create_dir_all(&staging).expect("staging");
    std::fs::write(staging.join("model.safetensors"), b"partial").expect("partial");
    std::fs::write(dir.join(".metrics.jsonl.tmp-4194000"), b"partial").expect("tmp");
    let out = run_ok(&["--resume".into(), arg(&dir)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("skipping the checkpoint of step 4") && err.contains("model.safetensors"), "{err}");
    assert!(!staging.exists() && !dir.join(".metrics.jsonl.tmp-4194000").exists(), "{err}");
    let again = losses(&dir);
    assert_eq!(again.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3, 4], "{err}");
    for ((s, g), (_, w)) in again.iter().zip(&first) {
        assert_close(&format!("loss of step {s}"), *g, *w, 1e-5);
    }

    // A coordinator waiting for its workers holds the folder: a second one, resuming or
    // starting over, is refused with the first one's pid and address, and touches nothing.
    let old_url = std::fs::read_to_string(dir.join("coordinator.url")).expect("url");
    let mut holder = coordinator()
        .args(["--resume", &arg(&dir), "--steps", "6", "--expect-workers", "1"])
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator");
    let pid = holder.id().to_string();
    let serving = || std::fs::read_to_string(dir.join("coordinator.url")).ok().filter(|u| *u != old_url);
    assert!(wait_for(Duration::from_secs(60), || serving().is_some()), "the first coordinator did not serve");
    let url = serving().expect("url").trim().to_string();
    for second in [vec!["--resume".to_string(), arg(&dir), "--workers".into(), "1".into()], {
        let mut a = args.clone();
        a.push("--force".into());
        a
    }] {
        let out = coordinator().args(&second).output().expect("coordinator");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{second:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(&format!("pid {pid}")) && err.contains(&url), "{err}");
        assert_eq!(checkpoints(&dir), ["step-000002", "step-000004"], "{err}");
    }
    // The kernel drops the lock of a killed coordinator: the run goes on from step 4.
    sigkill(holder.id());
    wait_child(&mut holder, Duration::from_secs(10));
    let out = run_ok(&["--resume".into(), arg(&dir), "--workers".into(), "1".into()]);
    let more = losses(&dir);
    assert_eq!(more.len(), 6, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&more[..4], &again[..]);
}
