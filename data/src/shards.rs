//! Packed shards: every image decoded once, its smaller side brought down to at most 256 (never
//! up: a smaller image is stored as decoded), and the grey pixels stored back to back in
//! memory-mappable files with an index, beside a pairs table.
//!
//! Layout of a shards folder (a "prepared folder"):
//! - `meta.json`: dataset, root, short side, shard size, pair count, the reading options that made
//!   the pairs (views, report sections, label file) and the format revision (a resume must match
//!   it all);
//! - `shard-NNNNN.bin`: uint8 pixels; `shard-NNNNN.idx.json`: `[offset, w, h]` per image (w = 0 for
//!   an image that failed to decode). The index is renamed into place last: it marks the shard done;
//! - `pairs.jsonl`: one pair a line with its shard, offset and size: every pair the reader gave,
//!   in its order, those whose image failed to decode too (w = h = 0), so that the table is the
//!   dataset's pairs one for one and a training run indexes them as it would the tree's
//!   ([`read_prepared`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, DatasetKind, LabelFile, Pair, ProblemKind, Problems, ReadOptions, Split, Views};
use crate::imageio::{load_grey, resize_short_side};
use crate::labels::{LabelValue, NUM_LABELS};
use crate::report::SectionPolicy;

/// The format revision `prepare` writes: 2 lists failed images in `pairs.jsonl` and never
/// upscales. Earlier folders (no revision in `meta.json`) cannot train: their table leaves
/// failed images out, so its pair ids would not be the tree's.
pub const FORMAT: u32 = 2;

/// The `--short-side` values `prepare` accepts: 0 would store 1 x 1 images, and a side past
/// the largest image any dataset holds only asks for huge buffers.
pub const SHORT_SIDE_RANGE: std::ops::RangeInclusive<usize> = 16..=8192;

/// Refuses a short side outside [`SHORT_SIDE_RANGE`] with one line naming the range.
pub fn check_short_side(short_side: usize) -> Result<()> {
    ensure!(
        SHORT_SIDE_RANGE.contains(&short_side),
        "--short-side {short_side} is out of range: {}..={} pixels",
        SHORT_SIDE_RANGE.start(),
        SHORT_SIDE_RANGE.end()
    );
    Ok(())
}

/// `shard-NNNNN.idx.json`: what its `.bin` must hold, recorded when it was written, so that a
/// resumed `prepare` trusts a finished shard only when its file is whole.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardIndex {
    /// Length of the `.bin` file in bytes.
    pub bytes: u64,
    /// CRC-32 (the gzip polynomial) of the `.bin` file.
    pub crc32: u32,
    /// `[offset, w, h]` per image (w = h = 0 for an image that failed to decode).
    pub images: Vec<[u64; 3]>,
}

impl ShardIndex {
    /// Parses an index file's bytes and checks that it is consistent (every image inside
    /// `bytes`). An index of the first format (a bare list) or garbage is an error.
    pub fn parse(raw: &[u8]) -> Result<ShardIndex> {
        let idx: ShardIndex = serde_json::from_slice(raw).context("not a shard index")?;
        for (j, &[o, w, h]) in idx.images.iter().enumerate() {
            let end = w.checked_mul(h).and_then(|n| n.checked_add(o));
            ensure!(
                end.is_some_and(|e| e <= idx.bytes),
                "image {j} ({w} x {h} at {o}) lies past the shard's {} bytes",
                idx.bytes
            );
        }
        Ok(idx)
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(bytes);
    c.sum()
}

/// Why finished shard `k` cannot be trusted on resume, or None when its index parses, names
/// `images` images and its `.bin` has the recorded length and checksum.
fn shard_damage(out: &Path, k: usize, images: usize) -> Option<String> {
    let idx_path = out.join(shard_name(k, "idx.json"));
    let raw = match fs::read(&idx_path) {
        Ok(r) => r,
        Err(e) => return Some(format!("{}: {e}", idx_path.display())),
    };
    let idx = match ShardIndex::parse(&raw) {
        Ok(i) => i,
        Err(e) => return Some(format!("{}: {e:#}", idx_path.display())),
    };
    if idx.images.len() != images {
        return Some(format!("{}: {} images, {images} expected", idx_path.display(), idx.images.len()));
    }
    let bin_path = out.join(shard_name(k, "bin"));
    let bin = match fs::read(&bin_path) {
        Ok(b) => b,
        Err(e) => return Some(format!("{}: {e}", bin_path.display())),
    };
    if bin.len() as u64 != idx.bytes {
        return Some(format!("{}: {} bytes, {} recorded (truncated?)", bin_path.display(), bin.len(), idx.bytes));
    }
    if crc32(&bin) != idx.crc32 {
        return Some(format!("{}: checksum differs from the one recorded (damaged)", bin_path.display()));
    }
    None
}

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
    /// The pair as the dataset reader gave it (its image path relative to the packed root).
    pub fn to_pair(&self) -> Pair {
        Pair {
            subject_id: self.subject_id.clone(),
            study_id: self.study_id.clone(),
            image: PathBuf::from(&self.image),
            split: self.split(),
            view: self.view.clone(),
            labels: self.label_values(),
            text: self.text.clone(),
            boxes: self.boxes.clone(),
        }
    }
}

/// `meta.json`: what was packed, from where, and how it was read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub dataset: String,
    pub root: String,
    /// The largest smaller side stored (smaller images are stored as decoded).
    pub short_side: usize,
    pub shard_size: usize,
    pub pairs: usize,
    /// The reading options the pairs table was made with: `all` or a list such as `PA,AP`;
    /// `paper`, `impression` or `findings+impression`; `chexpert` or `negbio`.
    #[serde(default)]
    pub views: String,
    #[serde(default)]
    pub sections: String,
    #[serde(default)]
    pub labels: String,
    /// See [`FORMAT`]; 0 in folders written before it existed.
    #[serde(default)]
    pub format: u32,
}

fn views_name(v: &Views) -> String {
    match v {
        Views::All => "all".into(),
        Views::Only(list) => list.join(","),
    }
}

fn sections_name(s: SectionPolicy) -> &'static str {
    match s {
        SectionPolicy::Paper => "paper",
        SectionPolicy::Impression => "impression",
        SectionPolicy::FindingsImpression => "findings+impression",
    }
}

fn labels_name(l: LabelFile) -> &'static str {
    match l {
        LabelFile::Chexpert => "chexpert",
        LabelFile::Negbio => "negbio",
    }
}

/// Whether `dir` is a prepared folder (what [`prepare`] writes): it holds `meta.json` and
/// `pairs.jsonl`. Anything else given as data is a dataset tree.
pub fn is_prepared(dir: &Path) -> bool {
    dir.join("meta.json").is_file() && dir.join("pairs.jsonl").is_file()
}

/// The `meta.json` of a prepared folder.
pub fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join("meta.json");
    let bytes = fs::read(&path).with_context(|| format!("{} is not a prepared folder", dir.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a shards meta.json", path.display()))
}

/// What `prepare` did.
#[derive(Clone, Debug, Default)]
pub struct PrepareSummary {
    pub shards: usize,
    pub shards_skipped: usize,
    /// Shards a previous run had finished whose files were damaged, truncated or deleted, with
    /// the reason: written again.
    pub shards_redone: Vec<String>,
    pub images: usize,
    pub failed: usize,
    pub seconds: f64,
}

fn shard_name(k: usize, ext: &str) -> String {
    format!("shard-{k:05}.{ext}")
}

/// Packs a dataset into `out`. Shards whose index already exists and whose `.bin` has the
/// length and checksum recorded in it are skipped (resume); a damaged one is written again.
/// `progress(done_shards, total_shards)` is called as shards finish.
///
/// `opts` must be the options `ds` was read with: they are recorded in `meta.json`, and a
/// training run from the folder must ask for the same (see [`read_prepared`]).
pub fn prepare(
    ds: &Dataset,
    dataset_name: &str,
    opts: &ReadOptions,
    out: &Path,
    short_side: usize,
    shard_size: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<PrepareSummary> {
    let start = std::time::Instant::now();
    check_short_side(short_side)?;
    ensure!(shard_size > 0, "--shard-size must be at least 1");
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let meta = Meta {
        dataset: dataset_name.into(),
        root: ds.root.display().to_string(),
        short_side,
        shard_size,
        pairs: ds.pairs.len(),
        views: views_name(&opts.views),
        sections: sections_name(opts.sections).into(),
        labels: labels_name(opts.label_file).into(),
        format: FORMAT,
    };
    let meta_path = out.join("meta.json");
    if meta_path.is_file() {
        let old = read_meta(out)?;
        if old != meta {
            bail!(
                "{} holds shards of another preparation ({:?}); remove it or choose another folder",
                out.display(),
                old
            );
        }
    } else {
        fs::write(&meta_path, serde_json::to_vec_pretty(&meta)?)
            .with_context(|| format!("writing {}", meta_path.display()))?;
    }
    let n_shards = ds.pairs.len().div_ceil(shard_size);
    let done = AtomicUsize::new(0);
    let skipped = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let mut redone = Vec::new();
    // Shards are built one after another, each with all threads decoding its images: memory
    // stays at one shard and finished shards appear in order (resume loses at most one).
    for k in 0..n_shards {
        let idx_path = out.join(shard_name(k, "idx.json"));
        let slice = &ds.pairs[k * shard_size..((k + 1) * shard_size).min(ds.pairs.len())];
        if idx_path.is_file() {
            match shard_damage(out, k, slice.len()) {
                None => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, n_shards);
                    continue;
                }
                Some(why) => redone.push(why),
            }
        }
        let imgs: Vec<Option<crate::dicom::GreyImage>> = slice
            .par_iter()
            .map(|p| {
                let path = ds.image_path(p);
                match load_grey(&path) {
                    // Down only: upscaling would store more bytes and no more detail.
                    Ok(img) if img.w.min(img.h) > short_side => Some(resize_short_side(&img, short_side)),
                    Ok(img) => Some(img),
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
        let record = ShardIndex { bytes: bin.len() as u64, crc32: crc32(&bin), images: index };
        write_renamed(&bin_path, &bin)?;
        write_renamed(&idx_path, &serde_json::to_vec(&record)?)?;
        progress(done.fetch_add(1, Ordering::Relaxed) + 1, n_shards);
    }
    // The pairs table, from every shard's index (including those a previous run wrote): every
    // pair, a failed image's too (w = 0), so that a line's position is the pair's in `ds`.
    let mut lines = String::new();
    let mut images = 0;
    for k in 0..n_shards {
        let path = out.join(shard_name(k, "idx.json"));
        let raw = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let index = ShardIndex::parse(&raw).with_context(|| format!("{}", path.display()))?.images;
        for (j, e) in index.iter().enumerate() {
            let p = &ds.pairs[k * shard_size + j];
            lines += &serde_json::to_string(&pack(p, k, e))?;
            lines.push('\n');
            images += usize::from(e[1] != 0);
        }
    }
    write_renamed(&out.join("pairs.jsonl"), lines.as_bytes())?;
    Ok(PrepareSummary {
        shards: n_shards,
        shards_skipped: skipped.into_inner(),
        shards_redone: redone,
        images,
        failed: failed.into_inner(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes `path` through a temporary beside it and a rename, so that a reader never sees half a
/// file; an error (a read-only folder, a full disk) names the file.
fn write_renamed(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
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

/// Parses `pairs.jsonl` (its text; `table` names it in errors): one packed pair a line, blank
/// lines skipped. A line that is not a pair is one error naming the file and line.
pub fn parse_pairs_table(text: &str, table: &Path) -> Result<Vec<PackedPair>> {
    let mut pairs: Vec<PackedPair> = Vec::new();
    for (k, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a packed pair (a damaged table?)", table.display(), k + 1))?;
        pairs.push(p);
    }
    Ok(pairs)
}

/// An opened shards folder: the pairs table and the memory-mapped shard files.
pub struct ShardSet {
    pub dir: PathBuf,
    pub pairs: Vec<PackedPair>,
    maps: Vec<Mmap>,
    /// Position in `pairs` by image path (the path relative to the packed root).
    by_image: HashMap<String, usize>,
}

impl ShardSet {
    /// Opens `dir`: reads `pairs.jsonl`, maps every shard it names and checks that each pair's
    /// pixels lie inside its shard. Bad input (a missing shard, a line that is not a pair, a
    /// pair past its shard's end) is one error naming the file and line.
    pub fn open(dir: &Path) -> Result<Arc<ShardSet>> {
        let table = dir.join("pairs.jsonl");
        let text = fs::read_to_string(&table)
            .with_context(|| format!("{} is not a shards folder: cannot read pairs.jsonl", dir.display()))?;
        let pairs = parse_pairs_table(&text, &table)?;
        let n = pairs.iter().map(|p| p.shard.saturating_add(1)).max().unwrap_or(0);
        let mut maps = Vec::with_capacity(n);
        for k in 0..n {
            let path = dir.join(shard_name(k, "bin"));
            let f = fs::File::open(&path)
                .with_context(|| format!("{}: shard {k} of {n} named by pairs.jsonl", path.display()))?;
            // Safety: shard files are written once, renamed into place and never modified after.
            maps.push(unsafe { Mmap::map(&f) }.with_context(|| format!("mapping {}", path.display()))?);
        }
        let mut by_image = HashMap::with_capacity(pairs.len());
        for (i, p) in pairs.iter().enumerate() {
            let end = (p.w as u64 * p.h as u64).saturating_add(p.offset);
            if end > maps[p.shard].len() as u64 {
                bail!(
                    "{}:{}: {} points past the end of {} ({end} > {} bytes): a truncated shard?",
                    table.display(),
                    i + 1,
                    p.image,
                    shard_name(p.shard, "bin"),
                    maps[p.shard].len()
                );
            }
            by_image.insert(p.image.clone(), i);
        }
        Ok(Arc::new(ShardSet { dir: dir.to_path_buf(), pairs, maps, by_image }))
    }

    /// The pixels of pair `i` (grey, row-major) and its width and height (0 x 0 for an image
    /// that failed to decode when packed).
    pub fn image(&self, i: usize) -> (&[u8], usize, usize) {
        let p = &self.pairs[i];
        let (w, h) = (p.w as usize, p.h as usize);
        let o = p.offset as usize;
        (&self.maps[p.shard][o..o + w * h], w, h)
    }

    /// The position in `pairs` of the pair whose image is `image` (relative to the packed root).
    pub fn position(&self, image: &str) -> Option<usize> {
        self.by_image.get(image).copied()
    }
}

/// The dataset of a prepared folder, as the reader gave it to [`prepare`]: the same pairs in the
/// same order (with the same ids for a training run), their image paths relative to the packed
/// root and `root` the folder itself. `opts` are the run's reading options: the report sections
/// and the label file must be those the folder was prepared with, and its views must cover the
/// run's (the pairs of other views are left out, as the reader leaves them out of a tree).
/// Refused with one line naming what differs; a folder of an older format is refused too.
pub fn read_prepared(dir: &Path, opts: &ReadOptions) -> Result<Dataset> {
    let meta = read_meta(dir)?;
    ensure!(
        meta.format == FORMAT,
        "{} was prepared by an older version (format {}, this one reads {FORMAT}): prepare it again into a new folder",
        dir.display(),
        meta.format
    );
    let kind: DatasetKind = meta.dataset.parse().map_err(|e: String| anyhow!("{}: meta.json: {e}", dir.display()))?;
    let (sections, labels) = (sections_name(opts.sections), labels_name(opts.label_file));
    ensure!(
        meta.sections == sections,
        "{} was prepared with --sections {}; this run asks for {sections}: prepare again with --sections {sections}",
        dir.display(),
        meta.sections
    );
    ensure!(
        meta.labels == labels,
        "{} was prepared with --labels {}; this run asks for {labels}: prepare again with --labels {labels}",
        dir.display(),
        meta.labels
    );
    let packed: Views = meta.views.parse().map_err(|e: String| anyhow!("{}: meta.json views: {e}", dir.display()))?;
    let covered = match (&packed, &opts.views) {
        (Views::All, _) => true,
        (Views::Only(_), Views::All) => false,
        (Views::Only(_), Views::Only(want)) => want.iter().all(|v| packed.keeps(v)),
    };
    ensure!(
        covered,
        "{} holds the views {}; this run asks for {}: prepare again with --views {}",
        dir.display(),
        meta.views,
        views_name(&opts.views),
        views_name(&opts.views)
    );
    let set = ShardSet::open(dir)?;
    ensure!(
        set.pairs.len() == meta.pairs,
        "{}: pairs.jsonl holds {} pairs, meta.json says {}: an unfinished or damaged preparation",
        dir.display(),
        set.pairs.len(),
        meta.pairs
    );
    let pairs: Vec<Pair> = set.pairs.iter().filter(|p| opts.views.keeps(&p.view)).map(PackedPair::to_pair).collect();
    let images = set.pairs.iter().filter(|p| p.w > 0 && opts.views.keeps(&p.view)).count();
    let studies = pairs.iter().map(|p| &p.study_id).collect::<std::collections::HashSet<_>>().len();
    Ok(Dataset { kind, root: dir.to_path_buf(), pairs, studies, images, problems: Problems::default() })
}
