//! The run folder's files: `run.json` (what `--resume` needs), `token` (the run's secret,
//! readable by its owner only), `metrics.jsonl` (cut back to a checkpoint on restart) and the
//! checkpoints' names.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::TrainArgs;

/// `run.json`: what `--resume` needs.
#[derive(Serialize, Deserialize)]
pub struct RunRecord {
    pub(super) run_id: String,
    pub(super) args: TrainArgs,
    /// Step of the last complete checkpoint (0: none).
    pub(super) last_checkpoint: u64,
    pub(super) finished: bool,
}

pub fn write_json_atomically(path: &Path, v: &impl Serialize) -> Result<()> {
    model::checkpoint::write_file_atomically(path, serde_json::to_string_pretty(v)?.as_bytes())
}

/// The folder of the checkpoint of `step`, as the workers name it.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    worker::job::checkpoint_dir(run_dir, step)
}

/// `bytes` random bytes in hex: a run id (8) or a run token (32).
pub(super) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes).map(|_| format!("{:02x}", rng.random::<u8>())).collect()
}

/// The run's token, written to `token`: a resumed run keeps its own, so that workers started
/// by hand can rejoin it. A kept token file that others could read (its mode no longer 0600) is
/// set back to 0600, and the operator told: whoever read it can join the run until its token
/// changes (a fresh start in another folder).
pub(super) fn token(run_dir: &Path, resumed: bool) -> Result<String> {
    let path = run_dir.join("token");
    let token = if resumed && path.exists() {
        if let Some(mode) = restrict_to_owner(&path)? {
            eprintln!(
                "coordinator: warning: {} was readable by others (mode {mode:04o}); set to 0600. \
                 Whoever read it can join this run: start it afresh in another folder for a new token",
                path.display()
            );
        }
        fs::read_to_string(&path)?.trim().to_string()
    } else {
        random_hex(32)
    };
    write_secret(&path, &token)?;
    Ok(token)
}

/// Sets `path` to mode 0600 when its group or others may read or write it; returns the mode it
/// had then.
fn restrict_to_owner(path: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(None);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting {} to mode 0600", path.display()))?;
    Ok(Some(mode))
}

pub(super) fn write_secret(path: &Path, s: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(s.as_bytes())?;
    f.write_all(b"\n")?;
    // The mode given at creation does not apply to a file that already exists.
    restrict_to_owner(path)?;
    Ok(())
}

/// Keeps the lines of steps up to `step` (what the checkpoint a restart starts from covers).
pub(super) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    model::checkpoint::write_file_atomically(path, kept.as_bytes())
}

/// An exclusive advisory lock (`flock`) on the run folder's `lock` file, held for the run's
/// life: a second coordinator on the same folder is refused, and the kernel releases the lock
/// when the process ends however it ends (no stale lock after a kill).
pub struct RunLock {
    _file: fs::File,
}

/// The lock file's name in a run folder (it holds the owner's pid).
pub const LOCK: &str = "lock";

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), or says who holds it.
    pub fn take(run_dir: &Path) -> Result<RunLock> {
        use std::os::unix::io::AsRawFd;
        let path = run_dir.join(LOCK);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; LOCK_NB makes it return at once.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).with_context(|| format!("locking {}", path.display()));
            }
            let pid = fs::read_to_string(&path).unwrap_or_default().trim().to_string();
            let url = fs::read_to_string(run_dir.join("coordinator.url")).unwrap_or_default().trim().to_string();
            let pid = if pid.is_empty() { "unknown".into() } else { pid };
            let url = if url.is_empty() { "not serving yet".into() } else { url };
            bail!(
                "{} is in use by another coordinator (pid {pid}, serving {url}); wait for it to end or use another --run-dir",
                run_dir.display()
            );
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(RunLock { _file: file })
    }
}

/// What a fresh start does with a folder that holds a run: refuse it, unless `force` asks to
/// start over (then the old run's checkpoints and metrics go). Called with the folder's lock
/// held, so that a live run's files are never touched.
pub(super) fn clear_for_fresh_start(run_dir: &Path, force: bool) -> Result<()> {
    let path = run_dir.join("run.json");
    if !path.exists() {
        return Ok(());
    }
    let what = match fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<RunRecord>(&t).ok()) {
        Some(r) if r.finished => {
            format!("a finished run ({}, last checkpoint at step {})", r.run_id, r.last_checkpoint)
        }
        Some(r) => format!("a run ({}, last checkpoint at step {})", r.run_id, r.last_checkpoint),
        None => "a run".into(),
    };
    ensure!(
        force,
        "{} holds {what}: continue it with --resume {0}, start over with --force (deletes its checkpoints and metrics), or give another --run-dir",
        run_dir.display()
    );
    eprintln!("coordinator: --force: deleting the checkpoints and metrics of {what} in {}", run_dir.display());
    let checkpoints = run_dir.join("checkpoints");
    if checkpoints.exists() {
        fs::remove_dir_all(&checkpoints).with_context(|| format!("removing {}", checkpoints.display()))?;
    }
    for file in ["metrics.jsonl", "run.json"] {
        let p = run_dir.join(file);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Whether the checkpoint folder `dir` would load: its config parses and every tensor file in
/// it (the model and the train state at least) is whole (a truncated file fails here, where
/// its header's offsets run past its end).
pub(super) fn check_checkpoint(dir: &Path) -> Result<()> {
    ensure!(dir.is_dir(), "{} is missing", dir.display());
    model::ClipConfig::from_file(&dir.join(model::checkpoint::CONFIG))?;
    for need in [model::checkpoint::WEIGHTS, "train_state.safetensors"] {
        ensure!(dir.join(need).is_file(), "{} has no {need}", dir.display());
    }
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = model::checkpoint::read_safetensors(&path)?;
            model::checkpoint::parse_safetensors(&bytes, &path)?;
        }
    }
    Ok(())
}

/// The step to resume from: `last` when its checkpoint loads, else the newest older one that
/// does (each one skipped is said, with why), else 0 (the start).
pub(super) fn resumable_step(run_dir: &Path, last: u64) -> u64 {
    let mut steps: Vec<u64> = fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .filter(|&s| s < last)
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    for step in std::iter::once(last).chain(steps).filter(|&s| s > 0) {
        match check_checkpoint(&checkpoint_dir(run_dir, step)) {
            Ok(()) => return step,
            Err(e) => eprintln!("coordinator: skipping the checkpoint of step {step}: {e:#}"),
        }
    }
    if last > 0 {
        eprintln!("coordinator: no checkpoint of {} loads; starting again from step 0", run_dir.display());
    }
    0
}

/// Removes what a killed or failed write left in the run folder: checkpoint staging folders
/// (`.step-N.staging-PID`) and the temporary files and folders of atomic writes
/// (`.NAME.tmp-PID`, `.NAME.old-PID`). Called with the folder's lock held, so no live writer
/// owns them.
pub(super) fn clean_leftovers(run_dir: &Path) -> Result<()> {
    for dir in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let leftover = name.starts_with('.')
                && [".staging-", ".tmp-", ".old-"].iter().any(|tag| {
                    name.rsplit_once(tag)
                        .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
                });
            if !leftover {
                continue;
            }
            let path = entry.path();
            let gone = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            gone.with_context(|| format!("removing {}, left by an interrupted write", path.display()))?;
            eprintln!("coordinator: removed {}, left by an interrupted write", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cxrclip-folder-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// flock belongs to an open file: a second open of the lock, even in this process, is
    /// refused with the holder's pid and address until the first lock is dropped.
    #[test]
    fn the_lock_is_exclusive_and_names_its_holder() {
        let d = scratch("lock");
        fs::write(d.join("coordinator.url"), "http://127.0.0.1:5123\n").unwrap();
        let held = RunLock::take(&d).unwrap();
        let e = RunLock::take(&d).err().expect("a second lock was granted").to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())) && e.contains("http://127.0.0.1:5123"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        drop(held);
        RunLock::take(&d).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_fresh_start_is_refused_where_a_run_is_unless_forced() {
        let d = scratch("fresh");
        clear_for_fresh_start(&d, false).unwrap();
        let rec = RunRecord { run_id: "abcd".into(), args: TrainArgs::default(), last_checkpoint: 8, finished: true };
        write_json_atomically(&d.join("run.json"), &rec).unwrap();
        fs::create_dir_all(d.join("checkpoints/step-000008")).unwrap();
        fs::write(d.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        let e = clear_for_fresh_start(&d, false).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--force") && e.contains("step 8"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(d.join("checkpoints/step-000008").exists() && d.join("metrics.jsonl").exists());
        clear_for_fresh_start(&d, true).unwrap();
        assert!(!d.join("checkpoints").exists() && !d.join("metrics.jsonl").exists() && !d.join("run.json").exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_the_leftovers_of_interrupted_writes_are_cleaned() {
        let d = scratch("leftovers");
        let ck = d.join("checkpoints");
        fs::create_dir_all(ck.join(".step-000006.staging-123")).unwrap();
        fs::create_dir_all(ck.join("step-000004")).unwrap();
        fs::write(d.join(".metrics.jsonl.tmp-77"), "x").unwrap();
        fs::write(d.join(".run.json.tmp-77"), "x").unwrap();
        // Not a writer's leftover: no pid after the tag, or a name of the user's.
        fs::write(d.join(".notes.tmp-"), "x").unwrap();
        fs::write(d.join("metrics.jsonl"), "x").unwrap();
        clean_leftovers(&d).unwrap();
        let mut left: Vec<_> = names(&d).into_iter().chain(names(&ck)).collect();
        left.sort();
        assert_eq!(left, [".notes.tmp-", "checkpoints", "metrics.jsonl", "step-000004"]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_resumed_token_file_readable_by_others_is_set_back_to_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("token-mode");
        let first = token(&d, false).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.join("token")), 0o600);
        fs::set_permissions(d.join("token"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(restrict_to_owner(&d.join("token")).unwrap(), Some(0o644));
        fs::set_permissions(d.join("token"), fs::Permissions::from_mode(0o640)).unwrap();
        // The resumed run keeps its token and the file is the owner's alone again.
        assert_eq!(token(&d, true).unwrap(), first);
        assert_eq!(mode(&d.join("token")), 0o600);
        assert_eq!(restrict_to_owner(&d.join("token")).unwrap(), None);
    }

    fn names(d: &Path) -> Vec<String> {
        fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }
}
