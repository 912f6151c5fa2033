//! Packed shards: every image decoded once, its smaller side resized to 256, and the grey pixels
//! stored back to back in memory-mappable files with an index, beside a pairs table.
//!
//! Layout of a shards folder:
//! - `meta.json`: dataset, root, short side, shard size, pair count (a resume must match it);
//! - `shard-NNNNN.bin`: uint8 pixels; `shard-NNNNN.idx.json`: `[offset, w, h]` per image (w = 0 for
//!   an image that failed to decode). The index is renamed into place last: it marks the shard done;
//! - `pairs.jsonl`: one pair a line with its shard, offset and size.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Pair, ProblemKind, Split};
use crate::imageio::{load_grey, resize_short_side};
use crate::labels::{LabelValue, NUM_LABELS};

/// A pair as stored in the shards folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackedPair {
    pub subject_id: String,
    pub study_id: String,
    pub image: String,
    pub split: String,
    pub view: String,
    /// Raw label cells ("1.0", "0.0", "-1.0", "").
    pub labels: Vec<String>,
    pub text: String,
    pub boxes: Vec<[f32; 4]>,
    pub shard: usize,
    pub offset: u64,
    pub w: u32,
    pub h: u32,
}

impl PackedPair {
    pub fn label_values(&self) -> [LabelValue; NUM_LABELS] {
        let mut l = [LabelValue::Blank; NUM_LABELS];
        for (i, c) in self.labels.iter().enumerate().take(NUM_LABELS) {
            l[i] = LabelValue::parse(c).unwrap_or(LabelValue::Blank);
        }
        l
    }
    pub fn split(&self) -> Split {
        Split::parse(&self.split).unwrap_or(Split::Train)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Meta {
    dataset: String,
    root: String,
    short_side: usize,
    shard_size: usize,
    pairs: usize,
}

/// What `prepare` did.
#[derive(Clone, Debug, Default)]
pub struct PrepareSummary {
    pub shards: usize,
    pub shards_skipped: usize,
    pub images: usize,
    pub failed: usize,
    pub seconds: f64,
}

fn shard_name(k: usize, ext: &str) -> String {
    format!("shard-{k:05}.{ext}")
}

/// Packs a dataset into `out`. Shards whose index already exists are skipped (resume).
/// `progress(done_shards, total_shards)` is called as shards finish.
pub fn prepare(
    ds: &Dataset,
    dataset_name: &str,
    out: &Path,
    short_side: usize,
    shard_size: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<PrepareSummary> {
    let start = std::time::Instant::now();
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let meta = Meta {
        dataset: dataset_name.into(),
        root: ds.root.display().to_string(),
        short_side,
        shard_size,
        pairs: ds.pairs.len(),
    };
    let meta_path = out.join("meta.json");
    if meta_path.is_file() {
        let old: Meta = serde_json::from_slice(&fs::read(&meta_path)?).context("reading meta.json")?;
        if old != meta {
            bail!(
                "{} holds shards of another preparation ({:?}); remove it or choose another --out",
                out.display(),
                old
            );
        }
    } else {
        fs::write(&meta_path, serde_json::to_vec_pretty(&meta)?)?;
    }
    let n_shards = ds.pairs.len().div_ceil(shard_size);
    let done = AtomicUsize::new(0);
    let skipped = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    // Shards are built one after another, each with all threads decoding its images: memory
    // stays at one shard and finished shards appear in order (resume loses at most one).
    for k in 0..n_shards {
        let idx_path = out.join(shard_name(k, "idx.json"));
        if idx_path.is_file() {
            skipped.fetch_add(1, Ordering::Relaxed);
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, n_shards);
            continue;
        }
        let slice = &ds.pairs[k * shard_size..((k + 1) * shard_size).min(ds.pairs.len())];
        let imgs: Vec<Option<crate::dicom::GreyImage>> = slice
            .par_iter()
            .map(|p| {
                let path = ds.image_path(p);
                match load_grey(&path) {
                    Ok(img) => Some(resize_short_side(&img, short_side)),
                    Err(e) => {
                        ds.problems.add(ProblemKind::CorruptImage, path.display().to_string(), format!("{e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            })
            .collect();
        let mut bin = Vec::new();
        let mut index: Vec<[u64; 3]> = Vec::with_capacity(imgs.len());
        for img in &imgs {
            match img {
                Some(g) => {
                    index.push([bin.len() as u64, g.w as u64, g.h as u64]);
                    bin.extend_from_slice(&g.pixels);
                }
                None => index.push([bin.len() as u64, 0, 0]),
            }
        }
        let bin_path = out.join(shard_name(k, "bin"));
        let tmp = out.join(shard_name(k, "bin.tmp"));
        fs::write(&tmp, &bin)?;
        fs::rename(&tmp, &bin_path)?;
        let tmp = out.join(shard_name(k, "idx.json.tmp"));
        fs::write(&tmp, serde_json::to_vec(&index)?)?;
        fs::rename(&tmp, &idx_path)?;
        progress(done.fetch_add(1, Ordering::Relaxed) + 1, n_shards);
    }
    // The pairs table, from every shard's index (including those a previous run wrote).
    let mut lines = String::new();
    let mut images = 0;
    for k in 0..n_shards {
        let index: Vec<[u64; 3]> = serde_json::from_slice(&fs::read(out.join(shard_name(k, "idx.json")))?)?;
        for (j, e) in index.iter().enumerate() {
            if e[1] == 0 {
                continue;
            }
            let p = &ds.pairs[k * shard_size + j];
            lines += &serde_json::to_string(&pack(p, k, e))?;
            lines.push('\n');
            images += 1;
        }
    }
    let tmp = out.join("pairs.jsonl.tmp");
    fs::write(&tmp, lines)?;
    fs::rename(&tmp, out.join("pairs.jsonl"))?;
    Ok(PrepareSummary {
        shards: n_shards,
        shards_skipped: skipped.into_inner(),
        images,
        failed: failed.into_inner(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn pack(p: &Pair, shard: usize, e: &[u64; 3]) -> PackedPair {
    PackedPair {
        subject_id: p.subject_id.clone(),
        study_id: p.study_id.clone(),
        image: p.image.to_string_lossy().replace('\\', "/"),
        split: p.split.name().into(),
        view: p.view.clone(),
        labels: p.labels.iter().map(|l| l.as_csv().to_string()).collect(),
        text: p.text.clone(),
        boxes: p.boxes.clone(),
        shard,
        offset: e[0],
        w: e[1] as u32,
        h: e[2] as u32,
    }
}

/// An opened shards folder: the pairs table and the memory-mapped shard files.
pub struct ShardSet {
    pub dir: PathBuf,
    pub pairs: Vec<PackedPair>,
    maps: Vec<Mmap>,
}

impl ShardSet {
    pub fn open(dir: &Path) -> Result<Arc<ShardSet>> {
        let table = dir.join("pairs.jsonl");
        let text = fs::read_to_string(&table)
            .with_context(|| format!("{} is not a shards folder: missing pairs.jsonl", dir.display()))?;
        let pairs: Vec<PackedPair> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("reading pairs.jsonl")?;
        let n = pairs.iter().map(|p| p.shard + 1).max().unwrap_or(0);
        let mut maps = Vec::with_capacity(n);
        for k in 0..n {
            let f = fs::File::open(dir.join(shard_name(k, "bin")))?;
            // Safety: shard files are written once, renamed into place and never modified after.
            maps.push(unsafe { Mmap::map(&f)? });
        }
        for p in &pairs {
            let end = p.offset as usize + p.w as usize * p.h as usize;
            if p.shard >= maps.len() || end > maps[p.shard].len() {
                bail!("pairs.jsonl points past the end of shard {} ({})", p.shard, p.image);
            }
        }
        Ok(Arc::new(ShardSet { dir: dir.to_path_buf(), pairs, maps }))
    }

    /// The pixels of pair `i` (grey, row-major) and its width and height.
    pub fn image(&self, i: usize) -> (&[u8], usize, usize) {
        let p = &self.pairs[i];
        let (w, h) = (p.w as usize, p.h as usize);
        let o = p.offset as usize;
        (&self.maps[p.shard][o..o + w * h], w, h)
    }
}
