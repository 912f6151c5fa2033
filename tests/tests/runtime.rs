//! Real coordinator and worker processes on loopback, on a generated tree: world-size
//! invariance, a worker killed with SIGKILL mid-run, a rank failing mid-run, a worker with a
//! wrong token, and resume.

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use e2e::*;

const STEPS: u64 = 12;

/// The uninterrupted 2-worker run every other test compares with.
fn reference() -> &'static Vec<(u64, f64)> {
    static REF: OnceLock<Vec<(u64, f64)>> = OnceLock::new();
    REF.get_or_init(|| {
        let dir = fresh_dir("reference");
        run_ok(&train_args(&dir, 2, STEPS));
        let l = losses(&dir);
        assert_eq!(l.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
        assert!(dir.join("checkpoints/step-000012/model.safetensors").exists());
        assert!(dir.join("checkpoints/step-000012/train_state.safetensors").exists());
        l
    })
}

#[test]
fn one_and_two_workers_give_the_same_losses() {
    let _g = serial();
    let two = reference();
    let dir = fresh_dir("one-worker");
    run_ok(&train_args(&dir, 1, STEPS));
    let one = losses(&dir);
    assert_eq!(one.len(), two.len());
    for ((s1, l1), (_, l2)) in one.iter().zip(two) {
        assert_close(&format!("loss of step {s1}"), *l1, *l2, 1e-4);
    }
}

#[test]
fn a_sigkilled_worker_is_replaced_and_the_run_ends_with_the_same_loss() {
    let _g = serial();
    let want = reference();
    let dir = fresh_dir("killed");
    let mut coord = coordinator().args(train_args(&dir, 2, STEPS)).stderr(Stdio::piped()).spawn().expect("coordinator");
    // Past the checkpoint of step 4, before the end.
    assert!(wait_for(Duration::from_secs(60), || losses(&dir).len() >= 6), "the run did not reach step 6");
    let workers = children(coord.id());
    assert_eq!(workers.len(), 2, "expected two workers, found {workers:?}");
    sigkill(workers[1]);
    let status = wait_child(&mut coord, Duration::from_secs(120));
    let mut err = String::new();
    std::io::Read::read_to_string(coord.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert!(status.success(), "{status}\n{err}");
    assert!(err.contains("restarting from step"), "{err}");
    // The failure is named after the killed rank, not after its peer that noticed it first
    // (the peer's ring read fails at once and its report can come before the exit is seen).
    let killed = workers[1];
    let joined = err.lines().find(|l| l.contains("joined from") && l.ends_with(&format!("(pid {killed})")));
    let rank: usize = joined.and_then(|l| l.split_whitespace().nth(2)).and_then(|r| r.parse().ok()).expect("rank");
    assert!(!err.contains(&format!("rank {} failed", 1 - rank)), "{err}");
    assert!(
        err.contains(&format!("rank {rank} (pid {killed}) exited")) || err.contains(&format!("rank {rank} was lost")),
        "{err}"
    );
    let got = losses(&dir);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{err}");
    for ((s, g), (_, w)) in got.iter().zip(want) {
        assert_close(&format!("loss of step {s}"), *g, *w, 1e-5);
    }

    // The finished run continues with --resume to more steps, from its last checkpoint.
    let out = run_ok(&[
        "--resume".to_string(),
        dir.to_string_lossy().into_owned(),
        "--steps".into(),
        "14".into(),
        "--workers".into(),
        "1".into(),
    ]);
    let more = losses(&dir);
    assert_eq!(more.len(), 14, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&more[..12], &got[..]);
}

#[test]
fn a_rank_failing_mid_run_is_reported_with_its_reason_and_the_run_restarts_from_its_checkpoint() {
    let _g = serial();
    let want = reference();
    let dir = fresh_dir("fault");
    let fired = dir.join("fault-fired");
    // Rank 1 fails as it starts step 6 (after the checkpoint of step 4), once: rank 0 is then
    // inside step 6's feature gather, waiting on it.
    let fault = format!("rank=1,step=6,once={}", fired.display());
    let t = std::time::Instant::now();
    let out =
        coordinator().args(train_args(&dir, 2, STEPS)).env("CXRCLIP_FAULT", &fault).output().expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(fired.exists(), "the fault never fired");
    assert!(err.contains("rank 1 failed: injected fault (CXRCLIP_FAULT) at step 6"), "{err}");
    assert!(err.contains("restarting from step 4"), "{err}");
    // Well inside the heartbeat timeout (30 s): the other rank was not waited out.
    assert!(t.elapsed() < Duration::from_secs(90), "took {:?}", t.elapsed());
    let got = losses(&dir);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{err}");
    for ((s, g), (_, w)) in got.iter().zip(want) {
        assert_close(&format!("loss of step {s}"), *g, *w, 1e-5);
    }
    // A malformed drill is refused rather than silently never firing.
    let out = coordinator()
        .args(train_args(&fresh_dir("fault-bad"), 1, 2))
        .env("CXRCLIP_FAULT", "rank=0")
        .arg("--max-restarts")
        .arg("0")
        .output()
        .expect("coordinator");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CXRCLIP_FAULT"));
}

/// A rank that stops computing but keeps heartbeating (a wedged GPU, a collective that never
/// returns) is caught by the step watchdog, and the run restarts from its checkpoint.
#[test]
fn a_rank_hanging_mid_run_is_caught_by_the_step_watchdog_and_the_run_restarts() {
    let _g = serial();
    let want = reference();
    let dir = fresh_dir("hang");
    let fired = dir.join("hang-fired");
    let fault = format!("rank=1,step=6,hang,once={}", fired.display());
    let t = std::time::Instant::now();
    let out = coordinator()
        .args(train_args(&dir, 2, STEPS))
        .args(["--step-timeout", "5"])
        .env("CXRCLIP_FAULT", &fault)
        .output()
        .expect("coordinator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(fired.exists(), "the hang never happened");
    assert!(err.contains("no step finished for") && err.contains("a rank is stuck"), "{err}");
    assert!(err.contains("restarting from step 4"), "{err}");
    // Not the heartbeat's 30 s: the hung rank kept heartbeating.
    assert!(!err.contains("sent no heartbeat"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(120), "took {:?}", t.elapsed());
    let got = losses(&dir);
    assert_eq!(got.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "{err}");
    for ((s, g), (_, w)) in got.iter().zip(want) {
        assert_close(&format!("loss of step {s}"), *g, *w, 1e-5);
    }
}

#[test]
fn a_worker_with_a_wrong_token_is_refused_while_the_run_goes_on() {
    let _g = serial();
    let dir = fresh_dir("wrong-token");
    let mut coord = coordinator().args(train_args(&dir, 1, 10)).stderr(Stdio::null()).spawn().expect("coordinator");
    assert!(wait_for(Duration::from_secs(60), || !losses(&dir).is_empty()), "the run did not start");
    let url = std::fs::read_to_string(dir.join("coordinator.url")).expect("coordinator.url");
    let out = worker()
        .args(["--coordinator", url.trim(), "--coordinator-timeout", "10"])
        .env("CXRCLIP_TOKEN", "not-the-token")
        .output()
        .expect("worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("wrong run token"), "{err}");
    let status = wait_child(&mut coord, Duration::from_secs(120));
    assert!(status.success());
    assert_eq!(losses(&dir).len(), 10);
}

#[test]
fn bad_flags_fail_with_one_line() {
    let out = coordinator().args(["--workers", "3", "--synthetic", "8", "--global-batch", "32"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("multiple of the 3 workers"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Unreadable images in the tree: the runs go on, say which files they skipped, and a step's
/// substitute (drawn from the epoch's spares, the same on every rank) does not depend on the
/// world size, so 1 and 2 workers still give the same losses.
#[test]
fn unreadable_images_are_skipped_alike_on_any_world_size() {
    let _g = serial();
    // A third of the images broken (they fail only when decoded, in the workers): most steps
    // meet one.
    let tree = tree_with_broken_images("bad-images-tree", 11, 3, 1);
    let mut runs = Vec::new();
    for workers in [1, 2] {
        let dir = fresh_dir(&format!("bad-images-{workers}"));
        let out = run_ok(&train_args_on(&dir, &tree, workers, 6));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("skipping unreadable image"), "{err}");
        runs.push(losses(&dir));
    }
    assert_eq!(runs[0].len(), 6);
    for ((s, one), (_, two)) in runs[0].iter().zip(&runs[1]) {
        assert_close(&format!("loss of step {s}"), *one, *two, 1e-4);
    }
}

/// Workers started by hand as Slurm starts them (`SLURM_PROCID`, `SLURM_NTASKS`,
/// `SLURM_LOCALID`), rank 1 first, against a coordinator that waits for them: each gets the rank
/// Slurm gave it, their ring connects without the coordinator in the middle, and the losses are
/// those of the run whose workers the coordinator spawned.
#[test]
fn slurm_style_workers_get_their_procid_and_the_same_losses() {
    let _g = serial();
    let want = reference();
    let dir = fresh_dir("slurm");
    let mut args = train_args(&dir, 2, STEPS);
    let at = args.iter().position(|a| a == "--workers").expect("--workers");
    args[at] = "--expect-workers".into();
    let mut coord = coordinator().args(&args).stderr(Stdio::piped()).spawn().expect("coordinator");
    let url_file = dir.join("coordinator.url");
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n'))),
        "the coordinator did not start serving"
    );
    let url = std::fs::read_to_string(&url_file).expect("url").trim().to_string();
    let token = std::fs::read_to_string(dir.join("token")).expect("token").trim().to_string();
    let start = |procid: u32| {
        worker()
            .args(["--coordinator", &url, "--ring-host", "127.0.0.1"])
            .env("CXRCLIP_TOKEN", &token)
            .env("SLURM_PROCID", procid.to_string())
            .env("SLURM_NTASKS", "2")
            .env("SLURM_LOCALID", procid.to_string())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker")
    };
    let mut second = start(1);
    // Rank 1 is already registered when rank 0 arrives: ranks follow SLURM_PROCID, not arrival.
    std::thread::sleep(Duration::from_millis(500));
    let mut first = start(0);
    for w in [&mut first, &mut second] {
        let status = wait_child(w, Duration::from_secs(120));
        let mut err = String::new();
        std::io::Read::read_to_string(w.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
        assert!(status.success(), "{status}\n{err}");
        assert!(!err.contains("SLURM_NTASKS is"), "{err}");
    }
    let status = wait_child(&mut coord, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(coord.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert!(status.success(), "{status}\n{err}");
    for (rank, pid) in [(0, first.id()), (1, second.id())] {
        let line = err.lines().find(|l| l.contains(&format!("rank {rank} joined"))).unwrap_or_default();
        assert!(line.ends_with(&format!("(pid {pid})")), "rank {rank} should be pid {pid}:\n{err}");
    }
    let got = losses(&dir);
    assert_eq!(got.len(), want.len(), "{err}");
    for ((s, g), (_, w)) in got.iter().zip(want) {
        assert_close(&format!("loss of step {s}"), *g, *w, 1e-6);
    }
}

/// A worker started on the other backend is refused at registration with the flag to use, and
/// its slot stays free: a CPU rank among NCCL ranks (or the reverse) would wait in collectives
/// the others never join.
#[test]
fn a_worker_on_the_wrong_device_is_refused_at_registration() {
    let _g = serial();
    let dir = fresh_dir("wrong-device");
    let mut args = train_args(&dir, 1, 2);
    let at = args.iter().position(|a| a == "--workers").expect("--workers");
    args[at] = "--expect-workers".into();
    args.extend(["--register-timeout".to_string(), "60".to_string()]);
    let mut coord = coordinator().args(&args).stderr(Stdio::piped()).spawn().expect("coordinator");
    let url_file = dir.join("coordinator.url");
    assert!(
        wait_for(Duration::from_secs(60), || std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n'))),
        "the coordinator did not start serving"
    );
    let url = std::fs::read_to_string(&url_file).expect("url").trim().to_string();
    let token = std::fs::read_to_string(dir.join("token")).expect("token").trim().to_string();
    let start = |device: &str| {
        worker()
            .args(["--coordinator", &url, "--device", device])
            .env("CXRCLIP_TOKEN", &token)
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker")
    };
    let mut wrong = start("cuda");
    let status = wait_child(&mut wrong, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(wrong.stderr.as_mut().expect("stderr"), &mut err).expect("stderr");
    assert!(!status.success(), "{err}");
    assert!(err.contains("this run computes on cpu; start the worker with --device cpu"), "{err}");
    // The slot is still free: the right worker takes it and the run finishes.
    let mut right = start("cpu");
    assert!(wait_child(&mut right, Duration::from_secs(120)).success());
    let status = wait_child(&mut coord, Duration::from_secs(60));
    assert!(status.success(), "{status}");
    assert_eq!(losses(&dir).len(), 2);
}

/// Failures a restart cannot change are not retried: an --init model whose weights do not
/// load, and a loss gone NaN, stop the run at once with the cause (each worker says so in its
/// failure report), where a dead worker would be restarted.
#[test]
fn failures_a_restart_cannot_change_stop_the_run_at_once() {
    let _g = serial();
    let init = fresh_dir("bad-init");
    std::fs::write(init.join("config.json"), model_config_json()).expect("config");
    std::fs::write(init.join("model.safetensors"), b"not tensors").expect("weights");
    let mut a = train_args(&fresh_dir("bad-init-run"), 1, 4);
    // The --init model sets the sizes.
    for flag in ["--image", "--patch", "--width", "--layers", "--heads"] {
        let at = a.iter().position(|x| x == flag).expect(flag);
        a.drain(at..at + 2);
    }
    a.extend(["--init".to_string(), init.to_string_lossy().into_owned(), "--max-restarts".into(), "3".into()]);
    let mut b = train_args(&fresh_dir("nan-loss-run"), 1, 4);
    b.extend(["--lr".to_string(), "1e30".into(), "--max-restarts".into(), "3".into()]);
    for (args, cause) in [(a, "the --init model does not load"), (b, "the training diverged")] {
        let out = coordinator().args(&args).output().expect("coordinator");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(cause) && err.contains("not restarted"), "{err}");
        assert!(!err.contains("restarting from step"), "{err}");
    }
}

/// The config of `train_args`' model, as `coordinator init` writes it.
fn model_config_json() -> String {
    let dir = fresh_dir("bad-init-config");
    let out = coordinator()
        .args(["init", "--out", &dir.to_string_lossy(), "--image", "32", "--patch", "8", "--width", "64"])
        .args(["--layers", "2", "--heads", "2"])
        .output()
        .expect("init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(dir.join("config.json")).expect("config.json")
}
