//! Helpers for the end-to-end tests: build and find the `coordinator` and `worker` binaries,
//! start runs, read their metrics, find and kill their workers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The folder holding the binaries (`target/debug`), built once per test process: cargo
/// builds only the test crate's own targets, and these are other packages' binaries.
/// `scripts/test.sh` runs `cargo test --workspace`, which has already built both (the
/// coordinator's and the worker's own integration tests need them), and says so with
/// `CXRCLIP_E2E_BIN_DIR`: a second build there would compile the tree again under another
/// feature set.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("CXRCLIP_E2E_BIN_DIR") {
            let dir = PathBuf::from(dir);
            for bin in ["coordinator", "worker"] {
                assert!(dir.join(bin).is_file(), "CXRCLIP_E2E_BIN_DIR has no {bin}: {}", dir.display());
            }
            return dir;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "coordinator", "-p", "worker"])
            .current_dir(&root)
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building coordinator and worker failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
        target.join("debug")
    })
}

/// One run at a time: the machines these run on have two cores, and concurrent runs would
/// only slow each other down.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn coordinator() -> Command {
    let mut c = Command::new(bin_dir().join("coordinator"));
    c.stdin(Stdio::null());
    c
}

pub fn worker() -> Command {
    let mut c = Command::new(bin_dir().join("worker"));
    c.stdin(Stdio::null());
    c
}

/// A fresh run folder under the target folder. Folders that earlier test processes left (a
/// failed test's, kept to look at) go once their process is gone, so they do not pile up.
pub fn fresh_dir(name: &str) -> PathBuf {
    let root = bin_dir().join("e2e");
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let file = e.file_name();
        let Some((tag, pid)) = file.to_str().and_then(|f| f.rsplit_once('-')) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if tag == name && pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let d = root.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("run dir");
    d
}

/// The common flags of the test runs: a small model on a shared generated tree.
pub fn train_args(run_dir: &Path, workers: usize, steps: u64) -> Vec<String> {
    let tree = bin_dir().join("e2e").join("synthetic-96");
    [
        "--workers",
        &workers.to_string(),
        "--device",
        "cpu",
        "--synthetic",
        "96",
        "--synthetic-dir",
        tree.to_str().expect("utf-8 path"),
        "--synthetic-size",
        "64",
        "--image",
        "32",
        "--patch",
        "8",
        "--width",
        "64",
        "--layers",
        "2",
        "--heads",
        "2",
        "--global-batch",
        "16",
        "--steps",
        &steps.to_string(),
        "--checkpoint-every",
        "4",
        "--seed",
        "7",
        "--run-dir",
        run_dir.to_str().expect("utf-8 path"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// [`train_args`] on the tree or prepared folder `data` instead of the shared generated tree.
pub fn train_args_on(run_dir: &Path, data: &Path, workers: usize, steps: u64) -> Vec<String> {
    let mut args = train_args(run_dir, workers, steps);
    let at = args.iter().position(|a| a == "--synthetic").expect("--synthetic");
    // --synthetic, --synthetic-dir and --synthetic-size with their values.
    args.drain(at..at + 6);
    args.extend(["--data".to_string(), data.to_str().expect("utf-8 path").to_string()]);
    args
}

/// A generated MIMIC tree of 96 studies at 64 px in `fresh_dir(name)`, with every `every`-th
/// image (from the `first`-th, in path order) broken so that it still passes the index's cheap
/// check (start and end markers in place) and fails only when decoded.
pub fn tree_with_broken_images(name: &str, seed: u64, every: usize, first: usize) -> PathBuf {
    let tree = fresh_dir(name);
    let out = coordinator()
        .args(["synth", "--out", tree.to_str().expect("utf-8 path"), "--studies", "96", "--dataset", "mimic"])
        .args(["--seed", &seed.to_string(), "--size", "64"])
        .output()
        .expect("synth");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut images: Vec<_> =
        files_under(&tree.join("files")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jpg")).collect();
    images.sort();
    assert!(images.len() > 90, "{} images", images.len());
    for (k, p) in images.iter().enumerate().filter(|(k, _)| k % every == first) {
        let mut broken = vec![0xFF, 0xD8, 0xFF, 0x01];
        broken.extend(format!("not a radiograph {k}").bytes());
        broken.extend([0xFF, 0xD9]);
        std::fs::write(p, broken).expect("break");
    }
    tree
}

/// `(step, loss)` of every step line of `metrics.jsonl`.
pub fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        // Fine-tuning's epoch-end validation lines carry no loss.
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().expect("step"), v["loss"].as_f64().expect("loss")))
        .collect()
}

/// Runs to completion; panics with the output when it fails.
pub fn run_ok(args: &[String]) -> Output {
    let out = coordinator().args(args).output().expect("starting coordinator");
    assert!(
        out.status.success(),
        "coordinator {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Pids of the live processes whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so read after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()));
        if ppid == Some(parent) && state != Some("Z") {
            out.push(pid);
        }
    }
    out
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Kills a process group leader's child with SIGKILL.
pub fn sigkill(pid: u32) {
    // SAFETY: sending a signal has no memory-safety concerns.
    let r = unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}");
}

/// Waits for a child, killing it after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            panic!("process {} did not finish within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn assert_close(what: &str, got: f64, want: f64, rtol: f64) {
    assert!(!got.is_nan() && (got - want).abs() <= 1e-7 + rtol * want.abs(), "{what}: {got} vs {want}");
}

/// Every file under `dir`, recursively (unordered); an unreadable folder contributes nothing.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A process the test started, killed when dropped (a failed assertion leaves none behind),
/// with its standard error in a file that can be read while it runs.
pub struct Spawned {
    pub child: Child,
    pub log: PathBuf,
}

impl Spawned {
    /// Starts `cmd` with its standard error (and output) appended to `log`.
    pub fn start(mut cmd: Command, log: &Path) -> Spawned {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        cmd.stdout(file.try_clone().expect("log file")).stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program()));
        Spawned { child, log: log.to_path_buf() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has written so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for its end, killing it (and panicking with its log) after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("pid {} did not finish within {timeout:?}:\n{}", self.child.id(), self.text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// [`train_args`] for a coordinator that waits for `workers` remote workers.
pub fn remote_args(run_dir: &Path, workers: usize, steps: u64) -> Vec<String> {
    let mut args = train_args(run_dir, workers, steps);
    let at = args.iter().position(|a| a == "--workers").expect("--workers");
    args[at] = "--expect-workers".into();
    args
}

/// A coordinator started with `cmd`'s arguments (a run that waits for remote workers), logging
/// to `log`; returns once it serves, with its URL and the run's token.
pub fn serve(cmd: Command, run_dir: &Path, log: &Path) -> (Spawned, String, String) {
    let _ = std::fs::remove_file(run_dir.join("coordinator.url"));
    let mut coord = Spawned::start(cmd, log);
    let url_file = run_dir.join("coordinator.url");
    let served = wait_for(Duration::from_secs(60), || {
        std::fs::read_to_string(&url_file).is_ok_and(|u| u.ends_with('\n')) || !coord.running()
    });
    assert!(served && coord.running(), "the coordinator did not start serving:\n{}", coord.text());
    let url = std::fs::read_to_string(&url_file).expect("url").trim().to_string();
    let token = std::fs::read_to_string(run_dir.join("token")).expect("token").trim().to_string();
    (coord, url, token)
}

/// A worker joining the run at `url` with `token` and `extra` flags, logging to `log`.
pub fn join(url: &str, token: &str, extra: &[&str], log: &Path) -> Spawned {
    let mut cmd = worker();
    cmd.args(["--coordinator", url]).args(extra).env("CXRCLIP_TOKEN", token);
    Spawned::start(cmd, log)
}
