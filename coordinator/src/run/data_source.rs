//! Which folder a training run's workers read: the tree given (`--data`, `--synthetic`), a
//! prepared folder given as `--data`, or the shards `--shards DIR` packs from the tree once;
//! and the `--synthetic N` tree, generated once and reused.
//!
//! A prepared folder is what `coordinator prepare` writes (see `data::shards`): its pairs table
//! lists the tree's pairs one for one, so the index built from it (`index::PairIndex`) has the
//! same pair ids in the same order as the tree's, and the workers read the packed pixels
//! (`worker::feed::Pixels`) instead of decoding JPEGs.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use model::config::ClipConfig;

use super::{train_opts, TrainArgs};

/// The smaller side `--shards` packs at, unless the model reads larger images: the published
/// setup's, enough for a 224 px crop zoomed out to 0.9.
pub const SHARDS_SHORT_SIDE: usize = 256;
/// Images per shard file (`coordinator prepare`'s default).
const SHARD_SIZE: usize = 2048;

/// The data root the workers read: `root` itself, or with `--shards DIR` the shards packed from
/// `root` into DIR (prepared now where DIR holds none or an unfinished preparation).
pub fn resolve(a: &TrainArgs, config: &ClipConfig, root: PathBuf) -> Result<PathBuf> {
    let prepared = data::shards::is_prepared(&root);
    let Some(dir) = &a.shards else {
        if prepared {
            let meta = data::shards::read_meta(&root)?;
            ensure!(
                meta.dataset == "mimic",
                "--data {}: holds {} shards; training reads MIMIC-CXR pairs",
                root.display(),
                meta.dataset
            );
        }
        return Ok(root);
    };
    ensure!(!prepared, "--data {} is a prepared folder already: leave out --shards (it packs a tree)", root.display());
    let short_side = SHARDS_SHORT_SIDE.max(config.vision_config.image_size);
    prepare(a, &root, dir, short_side)?;
    Ok(dir.clone())
}

/// Packs `tree` into `dir` unless it is done: a finished preparation of the same tree and
/// options is reused as it is, an unfinished one is resumed, one of another tree is refused.
fn prepare(a: &TrainArgs, tree: &Path, dir: &Path, short_side: usize) -> Result<()> {
    let opts = train_opts::read_options(a)?;
    let ds =
        data::read(data::DatasetKind::Mimic, tree, &opts).with_context(|| format!("reading {}", tree.display()))?;
    if data::shards::is_prepared(dir) {
        let meta = data::shards::read_meta(dir)?;
        let root = std::fs::canonicalize(tree).unwrap_or_else(|_| tree.to_path_buf());
        if Path::new(&meta.root) != root {
            bail!(
                "--shards {}: holds shards of {}, not of {}; choose another folder",
                dir.display(),
                meta.root,
                tree.display()
            );
        }
    }
    let t0 = Instant::now();
    let root = std::fs::canonicalize(tree).with_context(|| format!("reading {}", tree.display()))?;
    // Recorded as the canonical path, so that a later run names the same tree however it is given.
    let ds = data::Dataset { root, ..ds };
    let s = data::shards::prepare(&ds, "mimic", &opts, dir, short_side, SHARD_SIZE, &|_, _| {})
        .with_context(|| format!("--shards {}", dir.display()))?;
    if s.shards_skipped < s.shards {
        eprintln!(
            "coordinator: packed {} images into {} shards in {:.1} s -> {} ({} failed to decode)",
            s.images,
            s.shards,
            t0.elapsed().as_secs_f64(),
            dir.display(),
            s.failed
        );
    }
    Ok(())
}

/// The generated tree for `--synthetic N`, made once (atomically, by rename) and then reused by
/// runs of the same generator version, study count, seed and size.
pub(super) fn synthetic_tree(a: &TrainArgs, studies: usize) -> Result<PathBuf> {
    let dir = a.synthetic_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "cxrclip-synthetic-v{}-{studies}-seed{}-size{}",
            data::synth::VERSION,
            a.seed,
            a.synthetic_size
        ))
    });
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let cfg = data::synth::SynthConfig {
        studies,
        dataset: data::DatasetKind::Mimic,
        seed: a.seed,
        size: a.synthetic_size,
        visibility: data::synth::Visibility::default(),
        prevalence: 1.0,
    };
    let t0 = Instant::now();
    data::synth::generate(&tmp, &cfg).with_context(|| format!("generating {}", tmp.display()))?;
    fs::write(tmp.join(".complete"), b"")?;
    if fs::rename(&tmp, &dir).is_err() {
        // Another run made it meanwhile: use theirs.
        let _ = fs::remove_dir_all(&tmp);
        ensure!(dir.join(".complete").exists(), "cannot put the synthetic tree at {}", dir.display());
    } else {
        eprintln!(
            "coordinator: generated {studies} synthetic studies in {:.1} s -> {}",
            t0.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    Ok(dir)
}
