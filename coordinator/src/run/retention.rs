//! Which checkpoints a run keeps on disk. A checkpoint holds the model and its optimiser state
//! (84 MB for the demo's small CLIP, ~1.8 GB for ViT-B/32), and runs write one every few steps:
//! kept forever they fill the disk (the demo's 1,200 CLS steps at the default interval wrote
//! 10 GB). After each new checkpoint the coordinator removes older ones beyond the newest
//! `keep`, never the one a fine-tuning run's `best.json` names (the run's result).

use std::fs;
use std::path::{Path, PathBuf};

/// The complete checkpoints under `run_dir/checkpoints` (`step-NNNNNN`; staging folders start
/// with a dot and are not counted), by step.
fn checkpoints(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(run_dir.join("checkpoints")) else { return Vec::new() };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let step = name.to_str()?.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Removes the checkpoints of `run_dir` at steps up to `last` (the newest the run has recorded)
/// other than the newest `keep` of them and `pinned`; returns how many went. `keep` 0 keeps
/// all. Checkpoints past `last` (written by a generation that then failed) are left: the
/// restart overwrites them.
pub fn prune(run_dir: &Path, last: u64, keep: usize, pinned: Option<&Path>) -> std::io::Result<usize> {
    if keep == 0 {
        return Ok(0);
    }
    let done: Vec<(u64, PathBuf)> = checkpoints(run_dir).into_iter().filter(|(s, _)| *s <= last).collect();
    let old = done.len().saturating_sub(keep);
    let mut removed = 0;
    for (_, path) in &done[..old] {
        if pinned.is_some_and(|p| same_folder(p, path)) {
            continue;
        }
        fs::remove_dir_all(path)?;
        removed += 1;
    }
    Ok(removed)
}

fn same_folder(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(run: &Path, steps: &[u64]) {
        for s in steps {
            let d = run.join("checkpoints").join(format!("step-{s:06}"));
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("model.safetensors"), b"x").unwrap();
        }
    }

    fn left(run: &Path) -> Vec<u64> {
        checkpoints(run).into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn keeps_the_newest_and_the_pinned_and_leaves_staging_and_later_ones() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path();
        make(run, &[10, 20, 30, 40, 50, 60]);
        fs::create_dir_all(run.join("checkpoints/.step-000070.staging-1")).unwrap();
        let pinned = run.join("checkpoints/step-000020");
        // 60 was written by a generation that failed before recording it: not counted, not removed.
        assert_eq!(prune(run, 50, 2, Some(&pinned)).unwrap(), 2);
        assert_eq!(left(run), vec![20, 40, 50, 60]);
        assert!(run.join("checkpoints/.step-000070.staging-1").exists());
        // Without a pin the old best goes too; keep 0 removes nothing.
        assert_eq!(prune(run, 60, 0, None).unwrap(), 0);
        assert_eq!(prune(run, 60, 1, None).unwrap(), 3);
        assert_eq!(left(run), vec![60]);
        // No checkpoints folder: nothing to do.
        assert_eq!(prune(&run.join("absent"), 10, 1, None).unwrap(), 0);
    }
}
