//! The data feed of a training job: this rank's pairs of every epoch, as the coordinator streams
//! them, through the data crate's loader (decode, the job's augmentation, CLIP normalisation,
//! grey to 3 channels, sentence shuffling and tokenisation, on background threads a few batches
//! ahead of the step loop).
//!
//! Determinism: the loader seeds each sample's randomness from (seed, epoch, sample id), where the
//! id indexes its source. The source built here is indexed by the pair's id in the coordinator's
//! index, not by its position in this rank's shard, so a pair gets the same crop, rotation and
//! sentence order whatever the world size, and a job resumed at step k draws what an
//! uninterrupted one drew at step k.
//!
//! Pixels: from the tree's image files, or, when the job's data root is a prepared folder
//! (`coordinator prepare`, or a run's `--shards`), from its packed shards ([`Pixels`]). The
//! source is indexed by pair id either way and the text and labels come from the coordinator's
//! entries either way, so a run from shards trains on the same pairs, in the same order, with
//! the same draws, as a run from the tree they were packed from; the pixels are the same bit for
//! bit when the shards kept the images' own size (no image larger than the packed short side).
//!
//! Threads: [`loader_threads`] from the job (`--loader-threads`) or from the cores the rank has
//! ([`rank_cores`]), one left to the rank's own step thread, at least two.
//!
//! Unreadable images: the loader replaces one by a substitute drawn, by a hash of (seed, epoch,
//! pair id), from the epoch's spares, a list of training pairs the coordinator sends every rank
//! alike (so the substitute, like everything else a step sees, does not depend on the world size
//! or on where a job resumed), since the step needs exactly `b` pairs on every rank. Each bad
//! image is written to stderr once, when met, and the feed's [`Skips`] holds them all for a
//! summary, printed when the feed ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use data::loader::{Batch, Loader, LoaderConfig, Recovery, Skips, Source, NO_SLOT};
use data::report::Tokenize;
use data::shards::ShardSet;
use data::{LabelValue, Pair, Split, NUM_LABELS};
use proto::v1::{Job, ShardEntry};

use crate::failure::Permanent;
use crate::job::Link;
use crate::train_opts;

/// Where a job's pixels come from.
#[derive(Clone)]
pub enum Pixels {
    /// A dataset tree: each image decoded from its file under this root.
    Files(PathBuf),
    /// A prepared folder's packed shards (decoded once, memory-mapped).
    Shards(Arc<ShardSet>),
}

impl Pixels {
    /// The pixels of the data root a job names: a prepared folder (`meta.json` and
    /// `pairs.jsonl`, see `data::shards`) opens its shards, anything else is a tree of files.
    pub fn open(root: &Path) -> Result<Pixels> {
        if data::shards::is_prepared(root) {
            let set = ShardSet::open(root).with_context(|| format!("opening the shards at {}", root.display()))?;
            Ok(Pixels::Shards(set))
        } else {
            Ok(Pixels::Files(root.to_path_buf()))
        }
    }
}

/// The cores this rank has: `CXRCLIP_CORES` (the coordinator's share of the node for each local
/// worker), else `RAYON_NUM_THREADS` (a CPU worker's compute threads), else the cores this
/// process may run on (its affinity mask: what Slurm or `taskset` bound it to).
pub fn rank_cores() -> usize {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    env("CXRCLIP_CORES")
        .or_else(|| env("RAYON_NUM_THREADS"))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Loader threads of a rank: `asked` when not 0 (`--loader-threads`), else one per core of the
/// rank but one, which its step thread keeps (on a GPU it launches the kernels; on a CPU it runs
/// the step with the rank's compute threads, and a loader thread that is ahead sleeps), and at
/// least two: with two, one batch is built while the other waits for the step, and on a 2-core
/// CPU machine one thread measured 2-6% fewer images/s per step than two (BENCHMARKS.md).
pub fn loader_threads(asked: u32, cores: usize) -> usize {
    if asked > 0 {
        asked as usize
    } else {
        cores.saturating_sub(1).max(MIN_LOADER_THREADS)
    }
}

/// The fewest loader threads a rank gets by default (see [`loader_threads`]).
pub const MIN_LOADER_THREADS: usize = 2;

/// Batches each loader thread may hold ready: two for one or two threads, one for more (the
/// threads together are then as many batches ahead, and a 224 px batch of 256 pairs is 154 MB).
pub fn prefetch(threads: usize) -> usize {
    if threads <= 2 {
        2
    } else {
        1
    }
}

/// The batches of steps `start..end`, in order.
pub struct Feed {
    link: Link,
    pixels: Pixels,
    cfg: LoaderConfig,
    tok: Arc<dyn Tokenize>,
    steps_per_epoch: u64,
    end: u64,
    /// The loader of the epoch being consumed.
    current: Option<(u64, Loader)>,
    /// Unreadable images of the whole job, shared by the epochs' loaders.
    skips: Arc<Skips>,
    /// Prefix of the stderr lines ("worker 3").
    who: String,
}

impl Feed {
    /// A feed of `job`'s local batches of `b` pairs at `size` pixels, `context` ids per text.
    pub fn new(link: Link, job: &Job, b: usize, size: usize, context: usize, tok: Arc<dyn Tokenize>) -> Result<Feed> {
        ensure!(job.steps_per_epoch > 0, "the job has no steps per epoch");
        let threads = loader_threads(train_opts::options(job)?.loader_threads, rank_cores());
        let cfg = LoaderConfig {
            batch: b,
            size,
            augment: true,
            augmentation: train_opts::augmentation(job)?,
            uncertain: train_opts::uncertain_policy(job)?,
            seed: job.seed,
            epoch: 0,
            workers: threads,
            prefetch: prefetch(threads),
            context,
        };
        Ok(Feed {
            who: format!("worker {}", link.session.rank),
            link,
            pixels: Pixels::open(Path::new(&job.data_root))?,
            cfg,
            tok,
            steps_per_epoch: job.steps_per_epoch,
            end: job.steps,
            current: None,
            skips: Arc::default(),
        })
    }

    /// The local batch of `step`. Steps must be asked for in order (from any first step).
    pub fn batch(&mut self, step: u64) -> Result<Batch> {
        let spe = self.steps_per_epoch;
        let epoch = step / spe;
        if self.current.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.current = Some((epoch, self.start_epoch(epoch, step % spe)?));
        }
        let (_, loader) = self.current.as_mut().expect("started above");
        let batch = loader.next().ok_or_else(|| anyhow!("the loader of epoch {epoch} ran out at step {step}"))?;
        // A sample none of whose substitutes decode fails the same way on every retry (they
        // are drawn from the step's seed): the data, not the run, needs fixing.
        let batch = batch.map_err(|e| {
            if format!("{e:#}").contains("substitutes drawn for it were unreadable too") {
                e.context(Permanent("the images cannot be read"))
            } else {
                e
            }
        })?;
        for s in self.skips.take_new() {
            eprintln!("{}: skipping unreadable image {}: {}", self.who, s.path.display(), s.reason);
        }
        // The epoch's last batch is out: start the next epoch's loader now, so that its first
        // batches are made while this step trains rather than after it.
        if (step + 1).is_multiple_of(spe) && step + 1 < self.end {
            self.current = Some((epoch + 1, self.start_epoch(epoch + 1, 0)?));
        }
        Ok(batch)
    }

    /// The unreadable images met so far, each once (see the module note).
    pub fn skips(&self) -> &Arc<Skips> {
        &self.skips
    }

    /// Hands a consumed batch back, so that the loader refills its buffers instead of allocating.
    pub fn recycle(&self, b: Batch) {
        if let Some((_, loader)) = &self.current {
            loader.recycle(b);
        }
    }

    /// Fetches this rank's shard of `epoch` and starts a loader from its batch `first` on.
    fn start_epoch(&self, epoch: u64, first: u64) -> Result<Loader> {
        let (mut entries, spares) = self.link.shard(epoch)?;
        let b = self.cfg.batch;
        let need = self.steps_per_epoch as usize * b;
        ensure!(
            entries.len() >= need,
            "the shard of epoch {epoch} has {} pairs, fewer than {} steps of {b}",
            entries.len(),
            self.steps_per_epoch
        );
        ensure!(!spares.is_empty(), "the coordinator sent no spares for epoch {epoch}");
        entries.truncate(need);
        entries.extend(spares);
        let (source, mut ids) = epoch_source(&self.pixels, &entries)?;
        let pool = ids.split_off(need);
        let rec = Recovery { pool: Arc::new(pool), skips: self.skips.clone() };
        let ids = ids[first as usize * b..].to_vec();
        Loader::with_recovery(source, ids, LoaderConfig { epoch, ..self.cfg.clone() }, self.tok.clone(), rec)
    }
}

impl Drop for Feed {
    /// The summary: how many images were skipped and where (nothing when none was).
    fn drop(&mut self) {
        // Stop the loaders first, so that no image is recorded after the summary.
        self.current = None;
        if self.skips.count() > 0 {
            eprintln!("{}: {}", self.who, self.skips.summary());
        }
    }
}

/// The loader's source and ids for `entries`: a table indexed by pair id, where the ids this rank
/// does not hold are empty placeholders the loader never reads (see the module note), with the
/// pixels of `pixels` (an entry's image is looked up in the shards by its path).
pub fn epoch_source(pixels: &Pixels, entries: &[ShardEntry]) -> Result<(Source, Vec<usize>)> {
    let ids = entries
        .iter()
        .map(|e| usize::try_from(e.pair_id).map_err(|_| anyhow!("pair id {} is out of range", e.pair_id)))
        .collect::<Result<Vec<usize>>>()?;
    let len = ids.iter().max().map_or(0, |&m| m + 1);
    let mut table = vec![placeholder(); len];
    for (e, &id) in entries.iter().zip(&ids) {
        table[id].image = PathBuf::from(&e.image);
        table[id].text.clone_from(&e.text);
        if !e.label_values.is_empty() {
            table[id].labels = decode_labels(&e.label_values)?;
        }
    }
    let source = match pixels {
        Pixels::Files(root) => Source::Files { root: root.clone(), pairs: Arc::new(table) },
        Pixels::Shards(set) => {
            let mut slots = vec![NO_SLOT; len];
            for (e, &id) in entries.iter().zip(&ids) {
                slots[id] = set.position(&e.image).ok_or_else(|| {
                    anyhow!(
                        "pair {id}: {} is not in the shards at {} (prepared from another tree?)",
                        e.image,
                        set.dir.display()
                    )
                })?;
            }
            Source::Packed { set: set.clone(), pairs: Arc::new(table), slots: Arc::new(slots) }
        }
    };
    Ok((source, ids))
}

/// The wire form of a pair's 14 raw labels (see `ShardEntry.label_values`).
pub fn encode_labels(labels: &[LabelValue; NUM_LABELS]) -> Vec<i32> {
    labels
        .iter()
        .map(|v| match v {
            LabelValue::Positive => 1,
            LabelValue::Negative => 0,
            LabelValue::Uncertain => -1,
            LabelValue::Blank => 2,
        })
        .collect()
}

/// One label of the wire form (1, 0, -1, 2); an unknown code reads as blank (see
/// [`decode_labels`] for the checked form).
pub fn decode_label(code: Option<&i32>) -> LabelValue {
    match code {
        Some(1) => LabelValue::Positive,
        Some(0) => LabelValue::Negative,
        Some(-1) => LabelValue::Uncertain,
        _ => LabelValue::Blank,
    }
}

fn decode_labels(codes: &[i32]) -> Result<[LabelValue; NUM_LABELS]> {
    ensure!(codes.len() == NUM_LABELS, "a shard entry has {} label values, not {NUM_LABELS}", codes.len());
    let mut out = [LabelValue::Blank; NUM_LABELS];
    for (o, c) in out.iter_mut().zip(codes) {
        ensure!(matches!(c, -1..=2), "label code {c} is not 1, 0, -1 or 2");
        *o = decode_label(Some(c));
    }
    Ok(out)
}

/// A pair with no image or text; empty strings and paths do not allocate, so the table costs a
/// few words per pair of the index.
fn placeholder() -> Pair {
    Pair {
        subject_id: String::new(),
        study_id: String::new(),
        image: PathBuf::new(),
        split: Split::Train,
        view: String::new(),
        // Contrastive training reads no labels (their targets are unused); fine-tuning's entries
        // carry theirs.
        labels: [LabelValue::Blank; NUM_LABELS],
        text: String::new(),
        boxes: Vec::new(),
    }
}
