//! The run folder's files: `run.json` (what `--resume` needs), `token` (the run's secret,
//! readable by its owner only), `metrics.jsonl` (cut back to a checkpoint on restart) and the
//! checkpoints' names.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
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
/// by hand can rejoin it.
pub(super) fn token(run_dir: &Path, resumed: bool) -> Result<String> {
    let path = run_dir.join("token");
    let token = if resumed && path.exists() { fs::read_to_string(&path)?.trim().to_string() } else { random_hex(32) };
    write_secret(&path, &token)?;
    Ok(token)
}

pub(super) fn write_secret(path: &Path, s: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(s.as_bytes())?;
    f.write_all(b"\n")?;
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
