//! The training loader: a rank's pair ids in, batches out: pixels augmented (by default as
//! published: random rotation up to ±45°, shift 0.15, scale 0.9-1.1 after resizing the smaller
//! side to the model's size and centre cropping; see [`Augment`]), CLIP-normalised, grey replicated to 3 channels (NCHW f32), text
//! sentence-shuffled and tokenised, labels through the uncertain policy. Worker threads fill
//! batches a few ahead of the consumer; batch order and content depend only on the seed.
//!
//! Bad images: a training batch must hold exactly `batch` pairs (every rank of a step takes the
//! same number), so a sample whose image cannot be read (corrupt or truncated file, missing file,
//! an image that failed when packed) is replaced by a substitute drawn from a pool of pair ids
//! (by default the loader's own ids) by a hash of (seed, epoch, id, attempt): the same choice on
//! every run, whatever the thread count. Up to [`MAX_SUBSTITUTES`] substitutes are tried. Each bad
//! image is recorded once in a shared [`Skips`], with its path and the reason, so that a caller
//! can report it once and summarise at the end; later epochs do not decode it again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dataset::Pair;
use crate::labels::{LabelValue, UncertainPolicy, NUM_LABELS};
use crate::report::{shuffle_sentences, Tokenize};
use crate::shards::ShardSet;
use crate::synth::mix;

/// CLIP's per-channel normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Where the pixels come from.
#[derive(Clone)]
pub enum Source {
    /// Packed shards (the fast path), sample `i` the set's pair `i`.
    Shards(Arc<ShardSet>),
    /// An unpacked tree: JPEG / DICOM decoded per sample.
    Files { root: PathBuf, pairs: Arc<Vec<Pair>> },
    /// Packed shards under a caller's numbering: sample `i` is `pairs[i]` (text, labels, path)
    /// with the pixels of the set's pair `slots[i]` ([`NO_SLOT`] for a placeholder that is
    /// never read). A training feed numbers its samples by the coordinator's pair ids, from
    /// shards as from files, so that both draw the same randomness for a pair.
    Packed { set: Arc<ShardSet>, pairs: Arc<Vec<Pair>>, slots: Arc<Vec<usize>> },
}

/// The slot of a [`Source::Packed`] sample that has no pixels in the set.
pub const NO_SLOT: usize = usize::MAX;

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Shards(s) => s.pairs.len(),
            Source::Files { pairs, .. } | Source::Packed { pairs, .. } => pairs.len(),
        }
    }
    fn text(&self, i: usize) -> &str {
        match self {
            Source::Shards(s) => &s.pairs[i].text,
            Source::Files { pairs, .. } | Source::Packed { pairs, .. } => &pairs[i].text,
        }
    }
    fn labels(&self, i: usize) -> [LabelValue; NUM_LABELS] {
        match self {
            Source::Shards(s) => s.pairs[i].label_values(),
            Source::Files { pairs, .. } | Source::Packed { pairs, .. } => pairs[i].labels,
        }
    }
    /// Where sample `i`'s image lives, for messages: the file, or (packed) the image's path
    /// relative to the dataset root it was packed from.
    pub fn path(&self, i: usize) -> PathBuf {
        match self {
            Source::Shards(s) => PathBuf::from(&s.pairs[i].image),
            Source::Files { root, pairs } => root.join(&pairs[i].image),
            Source::Packed { pairs, .. } => pairs[i].image.clone(),
        }
    }
}

/// How many substitutes a bad sample may try before the batch fails.
pub const MAX_SUBSTITUTES: u64 = 8;

/// One unreadable image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// Its sample (pair) id in the source.
    pub id: usize,
    pub path: PathBuf,
    /// Why it could not be read (the decoder's or the file system's message).
    pub reason: String,
}

/// The unreadable images met so far, each once, shared by a run's loaders (one per epoch).
#[derive(Debug, Default)]
pub struct Skips {
    inner: Mutex<SkipsInner>,
}

#[derive(Debug, Default)]
struct SkipsInner {
    by_id: BTreeMap<usize, Skipped>,
    /// Ids recorded but not yet handed out by [`Skips::take_new`].
    fresh: Vec<usize>,
}

impl Skips {
    fn lock(&self) -> std::sync::MutexGuard<'_, SkipsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn record(&self, id: usize, path: PathBuf, reason: String) {
        let mut g = self.lock();
        if let std::collections::btree_map::Entry::Vacant(e) = g.by_id.entry(id) {
            e.insert(Skipped { id, path, reason });
            g.fresh.push(id);
        }
    }
    fn is_bad(&self, id: usize) -> bool {
        self.lock().by_id.contains_key(&id)
    }
    /// Distinct unreadable images so far.
    pub fn count(&self) -> usize {
        self.lock().by_id.len()
    }
    /// All of them, by id.
    pub fn list(&self) -> Vec<Skipped> {
        self.lock().by_id.values().cloned().collect()
    }
    /// Those recorded since the last call (by id): for reporting each one once, as met.
    pub fn take_new(&self) -> Vec<Skipped> {
        let mut g = self.lock();
        let mut fresh = std::mem::take(&mut g.fresh);
        fresh.sort_unstable();
        fresh.iter().map(|id| g.by_id[id].clone()).collect()
    }
    /// "2 unreadable images skipped (replaced by substitutes): a.jpg (reason); b.jpg (reason)".
    pub fn summary(&self) -> String {
        let v = self.list();
        let places: Vec<String> = v.iter().map(|s| format!("{} ({})", s.path.display(), s.reason)).collect();
        let noun = if v.len() == 1 { "image" } else { "images" };
        format!("{} unreadable {noun} skipped (replaced by substitutes): {}", v.len(), places.join("; "))
    }
}

/// What a loader does with a bad sample: draw a substitute from `pool`, record it in `skips`.
#[derive(Clone, Debug)]
pub struct Recovery {
    /// Ids a substitute may be drawn from. Give a training loader the same pool for the whole
    /// epoch (not only the ids left after a resume), so that a resumed run substitutes as an
    /// uninterrupted one did; keep other splits out of it.
    pub pool: Arc<Vec<usize>>,
    pub skips: Arc<Skips>,
}

impl Recovery {
    pub fn new(pool: Arc<Vec<usize>>) -> Recovery {
        Recovery { pool, skips: Arc::default() }
    }
}

/// The strengths of the training augmentation; the default is the published one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Rotation drawn uniformly from (-rotate_deg, rotate_deg) degrees.
    pub rotate_deg: f32,
    /// Zoom drawn uniformly from [lo, hi) (1: the resized and centre-cropped image).
    pub scale: (f32, f32),
    /// Shift along each axis drawn uniformly from (-translate, translate) times the side.
    pub translate: f32,
    /// The report's sentences in a random order.
    pub shuffle_sentences: bool,
}

impl Augment {
    /// The paper's: rotation up to 45 degrees, zoom 0.9-1.1, shift up to 0.15 of the side,
    /// shuffled sentences.
    pub const PAPER: Augment =
        Augment { rotate_deg: 45.0, scale: (0.9, 1.1), translate: 0.15, shuffle_sentences: true };

    /// Whether the strengths make sense: rotation in [0, 180] degrees, a zoom range
    /// 0 < lo <= hi, a shift in [0, 1] of the side (all finite).
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.scale;
        ensure!(
            (0.0..=180.0).contains(&self.rotate_deg),
            "augmentation rotation {} degrees is outside [0, 180]",
            self.rotate_deg
        );
        ensure!(
            lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi,
            "augmentation zoom range {lo}-{hi} needs 0 < lo <= hi"
        );
        ensure!((0.0..=1.0).contains(&self.translate), "augmentation shift {} is outside [0, 1]", self.translate);
        Ok(())
    }
}

impl Default for Augment {
    fn default() -> Self {
        Augment::PAPER
    }
}

/// A uniform draw from [lo, hi). An empty range (a strength of 0) gives `lo` and still takes
/// one draw, so that turning one augmentation off leaves the others' draws where they were.
fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    if lo < hi {
        rng.random_range(lo..hi)
    } else {
        let _: u32 = rng.random();
        lo
    }
}

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch: usize,
    /// The model's input side (224 for ViT-B/32).
    pub size: usize,
    /// Random affine and sentence shuffling (training) or resize + centre crop only (evaluation).
    pub augment: bool,
    /// The strengths of that augmentation (when `augment` is on).
    pub augmentation: Augment,
    pub seed: u64,
    /// Epoch, mixed into every sample's randomness.
    pub epoch: u64,
    pub workers: usize,
    /// Batches each worker may hold ready.
    pub prefetch: usize,
    pub uncertain: UncertainPolicy,
    /// Token ids per text.
    pub context: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch: 64,
            size: 224,
            augment: true,
            augmentation: Augment::PAPER,
            seed: 0,
            epoch: 0,
            workers: 2,
            prefetch: 2,
            uncertain: UncertainPolicy::Zeros,
            context: 77,
        }
    }
}

/// One batch, ready to copy to a device.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub ids: Vec<usize>,
    /// `batch x 3 x size x size`, CLIP-normalised.
    pub pixels: Vec<f32>,
    /// `batch x context` token ids.
    pub tokens: Vec<i32>,
    /// `batch x 14` targets and mask (mask 0 = ignored under the policy).
    pub targets: Vec<f32>,
    pub mask: Vec<f32>,
}

/// The affine of one sample: output pixel -> source pixel.
#[derive(Clone, Copy, Debug)]
pub struct Warp {
    // src = m * (out - c_out) + c_src
    m: [f32; 4],
    c_out: (f32, f32),
    c_src: (f32, f32),
}

/// The warp of a `w x h` image to the model's `size`: resize the smaller side to `size` and
/// centre crop, then (with `augment`) a random rotation, zoom and shift drawn from `rng`.
pub fn make_warp(w: usize, h: usize, size: usize, augment: Option<&Augment>, rng: &mut impl Rng) -> Warp {
    let k0 = size as f32 / w.min(h) as f32;
    let (theta, scale, tx, ty) = if let Some(a) = augment {
        let s = size as f32;
        (
            uniform(rng, -a.rotate_deg, a.rotate_deg).to_radians(),
            uniform(rng, a.scale.0, a.scale.1),
            uniform(rng, -a.translate, a.translate) * s,
            uniform(rng, -a.translate, a.translate) * s,
        )
    } else {
        (0.0, 1.0, 0.0, 0.0)
    };
    let (s, c) = theta.sin_cos();
    let k = 1.0 / (k0 * scale);
    // Inverse rotation and scale.
    let m = [c * k, s * k, -s * k, c * k];
    let half = size as f32 * 0.5;
    Warp { m, c_out: (half + tx, half + ty), c_src: (w as f32 * 0.5, h as f32 * 0.5) }
}

/// The `ox` range `[lo, hi)` of a row where `start + ox * step` stays in `[0, limit)`.
fn valid_range(start: f32, step: f32, limit: f32, size: usize) -> (f32, f32) {
    if step.abs() < 1e-12 {
        return if (0.0..limit).contains(&start) { (0.0, size as f32) } else { (0.0, 0.0) };
    }
    let a = (0.0 - start) / step;
    let b = (limit - start) / step;
    (a.min(b), a.max(b))
}

/// Warps grey `src` into three normalised channels of `out` (3 x size x size), bilinear,
/// black outside the source (air, as at a film's edge).
pub fn warp_normalise(src: &[u8], w: usize, h: usize, size: usize, wp: &Warp, out: &mut [f32]) {
    let plane = size * size;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let (wf, hf) = (w as f32 - 1.0, h as f32 - 1.0);
    // First the grey plane (into the red channel), then the three channels from it: the
    // sampling loop stays scalar, the normalisation loops vectorise.
    for oy in 0..size {
        let dy = oy as f32 + 0.5 - wp.c_out.1;
        let dx0 = 0.5 - wp.c_out.0;
        let sx0 = wp.m[0] * dx0 + wp.m[1] * dy + wp.c_src.0 - 0.5;
        let sy0 = wp.m[2] * dx0 + wp.m[3] * dy + wp.c_src.1 - 0.5;
        // The columns whose source lies inside the image: an interval, since the map is affine.
        let (ax, bx) = valid_range(sx0, wp.m[0], wf, size);
        let (ay, by) = valid_range(sy0, wp.m[2], hf, size);
        let lo = (ax.max(ay).max(0.0).ceil() as usize).min(size);
        let hi = (bx.min(by).min(size as f32).ceil() as usize).clamp(lo, size);
        let row = &mut r[oy * size..(oy + 1) * size];
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        if lo >= hi {
            continue;
        }
        // 16.16 fixed point: integer stepping and weights are cheaper than float floor/fract.
        const ONE: f32 = 65536.0;
        let lim_x = ((wf - 1e-3) * ONE) as i64;
        let lim_y = ((hf - 1e-3) * ONE) as i64;
        let mut fxp = ((sx0 + wp.m[0] * lo as f32) * ONE) as i64;
        let mut fyp = ((sy0 + wp.m[2] * lo as f32) * ONE) as i64;
        let (stx, sty) = ((wp.m[0] * ONE) as i64, (wp.m[2] * ONE) as i64);
        for o in &mut row[lo..hi] {
            let sx = fxp.clamp(0, lim_x);
            let sy = fyp.clamp(0, lim_y);
            let (x0, y0) = ((sx >> 16) as usize, (sy >> 16) as usize);
            let (fx, fy) = ((sx & 0xFFFF) as i32 >> 8, (sy & 0xFFFF) as i32 >> 8);
            let i = y0 * w + x0;
            // One bounds check for the 2 x 2 neighbourhood.
            let q = &src[i..i + w + 2];
            let (p00, p01, p10, p11) = (q[0] as i32, q[1] as i32, q[w] as i32, q[w + 1] as i32);
            let top = (p00 << 8) + (p01 - p00) * fx;
            let bot = (p10 << 8) + (p11 - p10) * fx;
            *o = ((top << 8) + (bot - top) * fy) as f32 * (1.0 / 65536.0);
            fxp += stx;
            fyp += sty;
        }
    }
    // v in [0, 255] -> (v / 255 - mean) / std, per channel: a * v + c.
    let a = [1.0 / (255.0 * CLIP_STD[0]), 1.0 / (255.0 * CLIP_STD[1]), 1.0 / (255.0 * CLIP_STD[2])];
    let c = [-CLIP_MEAN[0] / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]];
    for ((rv, gv), bv) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let v = *rv;
        *gv = a[1] * v + c[1];
        *bv = a[2] * v + c[2];
        *rv = a[0] * v + c[0];
    }
}

/// Decodes sample `id`'s image and warps it into `pixels` with `rng`'s augmentation.
fn fill_pixels(src: &Source, id: usize, cfg: &LoaderConfig, rng: &mut ChaCha8Rng, pixels: &mut [f32]) -> Result<()> {
    match src {
        Source::Shards(s) => fill_packed(s, id, cfg, rng, pixels)?,
        Source::Packed { set, slots, .. } => {
            ensure!(slots[id] != NO_SLOT, "sample {id} has no image in the shards at {}", set.dir.display());
            fill_packed(set, slots[id], cfg, rng, pixels)?
        }
        Source::Files { root, pairs } => {
            let img = crate::imageio::load_grey(&root.join(&pairs[id].image))?;
            if img.w == 0 || img.h == 0 {
                bail!("the image is empty ({}x{})", img.w, img.h);
            }
            let wp = make_warp(img.w, img.h, cfg.size, cfg.augment.then_some(&cfg.augmentation), rng);
            warp_normalise(&img.pixels, img.w, img.h, cfg.size, &wp, pixels);
        }
    }
    Ok(())
}

/// Warps the set's pair `slot` into `pixels` (see [`fill_pixels`]).
fn fill_packed(
    set: &ShardSet,
    slot: usize,
    cfg: &LoaderConfig,
    rng: &mut ChaCha8Rng,
    pixels: &mut [f32],
) -> Result<()> {
    let (px, w, h) = set.image(slot);
    if w == 0 || h == 0 {
        bail!("the image failed to decode when the shards were packed");
    }
    let wp = make_warp(w, h, cfg.size, cfg.augment.then_some(&cfg.augmentation), rng);
    warp_normalise(px, w, h, cfg.size, &wp, pixels);
    Ok(())
}

/// Fills one sample of a batch; returns the id whose pair it holds: `id`, or with `rec` a
/// substitute when `id`'s image cannot be read. Without `rec` a bad image is an error.
///
/// The augmentation and sentence order come from (seed, epoch, id) of the slot, also when a
/// substitute fills it, so a substitute that is in the batch already is not an exact duplicate.
fn fill_sample(
    src: &Source,
    id: usize,
    cfg: &LoaderConfig,
    tok: &dyn Tokenize,
    rec: Option<&Recovery>,
    pixels: &mut [f32],
    tokens: &mut Vec<i32>,
) -> Result<usize> {
    let slot_seed = mix(cfg.seed, cfg.epoch, id as u64);
    let mut rng = ChaCha8Rng::seed_from_u64(slot_seed);
    let mut used = id;
    let mut attempt = 0u64;
    loop {
        let known_bad = rec.is_some_and(|r| r.skips.is_bad(used));
        let err = if known_bad {
            None
        } else {
            match fill_pixels(src, used, cfg, &mut rng, pixels) {
                Ok(()) => break,
                Err(e) => Some(e),
            }
        };
        let Some(rec) = rec else {
            let e = err.expect("no skips without a recovery");
            return Err(e.context(format!("sample {used}: {}", src.path(used).display())));
        };
        if let Some(e) = err {
            rec.skips.record(used, src.path(used), format!("{e:#}"));
        }
        if attempt == MAX_SUBSTITUTES || rec.pool.is_empty() {
            bail!(
                "sample {id} ({}): unreadable, and {attempt} substitutes drawn for it were unreadable too",
                src.path(id).display()
            );
        }
        // A fresh rng from the slot: what the substitute gets does not depend on how far the
        // failed decode went.
        let pick = mix(slot_seed, 0x5B5B_0000 + attempt, rec.pool.len() as u64);
        used = rec.pool[(pick % rec.pool.len() as u64) as usize];
        rng = ChaCha8Rng::seed_from_u64(slot_seed);
        attempt += 1;
    }
    let text = src.text(used);
    let shuffle = cfg.augment && cfg.augmentation.shuffle_sentences;
    let text = if shuffle { shuffle_sentences(text, &mut rng) } else { text.to_string() };
    let mut t = tok.encode(&text);
    t.resize(cfg.context, 0);
    tokens.extend_from_slice(&t);
    Ok(used)
}

/// Builds the batch of `ids` into fresh buffers.
pub fn build_batch(src: &Source, ids: &[usize], cfg: &LoaderConfig, tok: &dyn Tokenize) -> Result<Batch> {
    let mut b = Batch::default();
    fill_batch(&mut b, src, ids, cfg, tok)?;
    Ok(b)
}

/// Builds the batch of `ids` into `b`, reusing its buffers: a fresh 38 MB pixel buffer per batch
/// (64 x 3 x 224 x 224 f32) costs thousands of page faults, more than the augmentation itself.
/// A bad image is an error here; see [`fill_batch_recovering`].
pub fn fill_batch(b: &mut Batch, src: &Source, ids: &[usize], cfg: &LoaderConfig, tok: &dyn Tokenize) -> Result<()> {
    fill_batch_recovering(b, src, ids, cfg, tok, None)
}

/// [`fill_batch`], where with `rec` a sample whose image cannot be read is replaced by a
/// substitute (see the module note); `b.ids` then names the pairs the batch really holds.
pub fn fill_batch_recovering(
    b: &mut Batch,
    src: &Source,
    ids: &[usize],
    cfg: &LoaderConfig,
    tok: &dyn Tokenize,
    rec: Option<&Recovery>,
) -> Result<()> {
    let plane = 3 * cfg.size * cfg.size;
    b.ids.clear();
    b.pixels.resize(ids.len() * plane, 0.0);
    b.tokens.clear();
    b.targets.clear();
    b.mask.clear();
    for (j, &id) in ids.iter().enumerate() {
        let used = fill_sample(src, id, cfg, tok, rec, &mut b.pixels[j * plane..(j + 1) * plane], &mut b.tokens)?;
        b.ids.push(used);
        let (t, m) = cfg.uncertain.targets(&src.labels(used));
        b.targets.extend_from_slice(&t);
        b.mask.extend_from_slice(&m);
    }
    Ok(())
}

/// Background batch producer. Iterate it to get batches in order.
pub struct Loader {
    rxs: Vec<Receiver<Result<Batch>>>,
    /// Consumed batches handed back for reuse (see [`Loader::recycle`]).
    recycle_tx: std::sync::mpsc::Sender<Batch>,
    next: usize,
    n_batches: usize,
    handles: Vec<JoinHandle<()>>,
    skips: Arc<Skips>,
}

impl Loader {
    /// Starts `cfg.workers` threads over `ids` (a rank's pair ids, in the coordinator's order).
    /// A bad image is replaced by a substitute drawn from `ids` (see the module note).
    pub fn new(src: Source, ids: Vec<usize>, cfg: LoaderConfig, tok: Arc<dyn Tokenize>) -> Result<Loader> {
        let rec = Recovery::new(Arc::new(ids.clone()));
        Loader::with_recovery(src, ids, cfg, tok, rec)
    }

    /// [`Loader::new`] with the substitutes' pool and the record of bad images given.
    pub fn with_recovery(
        src: Source,
        ids: Vec<usize>,
        cfg: LoaderConfig,
        tok: Arc<dyn Tokenize>,
        rec: Recovery,
    ) -> Result<Loader> {
        if let Some(&bad) = ids.iter().chain(rec.pool.iter()).find(|&&i| i >= src.len()) {
            bail!("pair id {bad} out of range ({} pairs)", src.len());
        }
        let n_batches = ids.len().div_ceil(cfg.batch.max(1));
        let workers = cfg.workers.max(1);
        let ids = Arc::new(ids);
        let mut rxs = Vec::new();
        let mut handles = Vec::new();
        let (recycle_tx, recycle_rx) = std::sync::mpsc::channel::<Batch>();
        let recycle_rx = Arc::new(std::sync::Mutex::new(recycle_rx));
        for w in 0..workers {
            let (tx, rx) = sync_channel(cfg.prefetch.max(1));
            let (src, ids, cfg, tok, rec) = (src.clone(), ids.clone(), cfg.clone(), tok.clone(), rec.clone());
            let recycled = recycle_rx.clone();
            handles.push(std::thread::spawn(move || {
                // Worker w builds batches w, w + workers, ...; the consumer takes them in turn.
                let mut k = w;
                while k < n_batches {
                    let lo = k * cfg.batch;
                    let hi = (lo + cfg.batch).min(ids.len());
                    let mut b = recycled.lock().ok().and_then(|r| r.try_recv().ok()).unwrap_or_default();
                    let b =
                        fill_batch_recovering(&mut b, &src, &ids[lo..hi], &cfg, tok.as_ref(), Some(&rec)).map(|_| b);
                    if tx.send(b).is_err() {
                        return; // the loader was dropped
                    }
                    k += workers;
                }
            }));
            rxs.push(rx);
        }
        Ok(Loader { rxs, recycle_tx, next: 0, n_batches, handles, skips: rec.skips })
    }

    /// Hands a consumed batch back so that a worker refills its buffers instead of allocating.
    pub fn recycle(&self, b: Batch) {
        let _ = self.recycle_tx.send(b);
    }

    pub fn batches(&self) -> usize {
        self.n_batches
    }

    /// The unreadable images met so far (shared with the [`Recovery`] it was started with).
    pub fn skips(&self) -> &Arc<Skips> {
        &self.skips
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.n_batches {
            return None;
        }
        let rx = &self.rxs[self.next % self.rxs.len()];
        self.next += 1;
        Some(rx.recv().unwrap_or_else(|_| Err(anyhow!("loader worker stopped"))))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the receivers makes blocked workers return; then join them.
        self.rxs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `make_warp` as it was before the strengths became settings (rotation 45, zoom 0.9-1.1,
    /// shift 0.15 written into it): the published augmentation must draw exactly this.
    fn published_warp(w: usize, h: usize, size: usize, rng: &mut impl Rng) -> Warp {
        let k0 = size as f32 / w.min(h) as f32;
        let s = size as f32;
        let (theta, scale, tx, ty) = (
            rng.random_range(-45f32..45.0).to_radians(),
            rng.random_range(0.9f32..1.1),
            rng.random_range(-0.15f32..0.15) * s,
            rng.random_range(-0.15f32..0.15) * s,
        );
        let (sn, c) = theta.sin_cos();
        let k = 1.0 / (k0 * scale);
        let m = [c * k, sn * k, -sn * k, c * k];
        let half = size as f32 * 0.5;
        Warp { m, c_out: (half + tx, half + ty), c_src: (w as f32 * 0.5, h as f32 * 0.5) }
    }

    fn bits(wp: &Warp) -> Vec<u32> {
        let mut v: Vec<u32> = wp.m.iter().map(|x| x.to_bits()).collect();
        v.extend([wp.c_out.0, wp.c_out.1, wp.c_src.0, wp.c_src.1].map(f32::to_bits));
        v
    }

    #[test]
    fn the_default_augmentation_draws_what_the_published_constants_drew() {
        assert_eq!(Augment::default(), Augment::PAPER);
        assert_eq!(LoaderConfig::default().augmentation, Augment::PAPER);
        let base: u64 = rand::rng().random();
        for k in 0..2000u64 {
            let (w, h, size) = (100 + (k % 37) as usize, 80 + (k % 53) as usize, [32, 64, 224][k as usize % 3]);
            let mut a = ChaCha8Rng::seed_from_u64(base ^ k);
            let mut b = a.clone();
            let got = make_warp(w, h, size, Some(&Augment::default()), &mut a);
            let want = published_warp(w, h, size, &mut b);
            assert_eq!(bits(&got), bits(&want), "seed {} ({w}x{h} -> {size})", base ^ k);
            // The sentence shuffle that follows draws from the same place too.
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
    }

    #[test]
    fn zero_strengths_leave_the_plain_resize_and_keep_the_other_draws() {
        let off = Augment { rotate_deg: 0.0, scale: (1.0, 1.0), translate: 0.0, shuffle_sentences: false };
        let seed: u64 = rand::rng().random();
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let got = make_warp(120, 90, 64, Some(&off), &mut r);
        let plain = make_warp(120, 90, 64, None, &mut ChaCha8Rng::seed_from_u64(seed));
        // Equal as numbers (a rotation drawn from [-0, 0) is -0, whose sine is -0).
        let vals = |w: &Warp| [w.m[0], w.m[1], w.m[2], w.m[3], w.c_out.0, w.c_out.1, w.c_src.0, w.c_src.1];
        assert_eq!(vals(&got), vals(&plain));
        // Rotation off: zoom and shift are drawn as with the published rotation.
        let no_rot = Augment { rotate_deg: 0.0, ..Augment::PAPER };
        let a = make_warp(120, 90, 64, Some(&no_rot), &mut ChaCha8Rng::seed_from_u64(seed));
        let b = make_warp(120, 90, 64, Some(&Augment::PAPER), &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(a.c_out.0.to_bits(), b.c_out.0.to_bits());
        assert_eq!(a.c_out.1.to_bits(), b.c_out.1.to_bits());
        assert_ne!(a.m, b.m, "the rotation did not change the warp");
        // Stronger settings reach further: over many draws some rotation exceeds the default's.
        let strong = Augment { rotate_deg: 90.0, ..Augment::PAPER };
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let max_angle = (0..200)
            .map(|_| {
                let wp = make_warp(64, 64, 64, Some(&strong), &mut r);
                wp.m[1].atan2(wp.m[0]).to_degrees().abs()
            })
            .fold(0.0f32, f32::max);
        assert!(max_angle > 60.0 && max_angle < 90.0, "{max_angle}");
    }

    #[test]
    fn bad_strengths_are_named() {
        assert!(Augment::PAPER.validate().is_ok());
        let cases = [
            (Augment { rotate_deg: -1.0, ..Augment::PAPER }, "rotation"),
            (Augment { rotate_deg: f32::NAN, ..Augment::PAPER }, "rotation"),
            (Augment { rotate_deg: 181.0, ..Augment::PAPER }, "rotation"),
            (Augment { scale: (1.1, 0.9), ..Augment::PAPER }, "zoom"),
            (Augment { scale: (0.0, 1.0), ..Augment::PAPER }, "zoom"),
            (Augment { scale: (0.9, f32::INFINITY), ..Augment::PAPER }, "zoom"),
            (Augment { translate: 1.5, ..Augment::PAPER }, "shift"),
        ];
        for (a, word) in cases {
            let e = a.validate().expect_err("accepted a bad strength").to_string();
            assert!(e.contains(word), "{e}");
        }
    }

    #[test]
    fn sentence_shuffling_follows_its_switch() {
        let text = "One. Two. Three. Four. Five. Six. Seven. Eight.";
        let pairs = vec![Pair {
            subject_id: "1".into(),
            study_id: "1".into(),
            image: PathBuf::from("film.jpg"),
            split: crate::Split::Train,
            view: "PA".into(),
            labels: [LabelValue::Blank; NUM_LABELS],
            text: text.into(),
            boxes: Vec::new(),
        }];
        // A 4 x 4 grey image the loader can decode.
        let dir = tempfile::tempdir().unwrap();
        image::GrayImage::from_fn(4, 4, |x, y| image::Luma([(x * 40 + y * 20) as u8]))
            .save(dir.path().join("film.jpg"))
            .unwrap();
        let src = Source::Files { root: dir.path().to_path_buf(), pairs: Arc::new(pairs) };
        let tok = |t: &str| t.bytes().map(i32::from).collect::<Vec<i32>>();
        let on = LoaderConfig { batch: 1, size: 8, context: text.len(), ..Default::default() };
        let off = LoaderConfig { augmentation: Augment { shuffle_sentences: false, ..Augment::PAPER }, ..on.clone() };
        let plain: Vec<i32> = text.bytes().map(i32::from).collect();
        let shuffled = (0..20u64)
            .any(|seed| build_batch(&src, &[0], &LoaderConfig { seed, ..on.clone() }, &tok).unwrap().tokens != plain);
        assert!(shuffled, "20 seeds never shuffled the sentences");
        for seed in 0..20u64 {
            assert_eq!(build_batch(&src, &[0], &LoaderConfig { seed, ..off.clone() }, &tok).unwrap().tokens, plain);
        }
    }
}
