//! The pair index the coordinator owns, and each rank's shard of an epoch.
//!
//! An epoch's order is a permutation of the training pairs seeded by (seed, epoch); step `k`
//! takes the global batch `order[k*G .. (k+1)*G]` and rank `r` of `W` its slice
//! `[r*G/W .. (r+1)*G/W]` of it. The pairs a step trains on therefore do not depend on `W`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use proto::v1::ShardEntry;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Spares per epoch: enough that eight draws (the loader's tries) almost never all meet bad
/// images, few enough to cost nothing in the shard stream.
pub const SPARES: usize = 64;

pub struct PairIndex {
    /// Every training pair: image path relative to the root, report text and (for jobs that
    /// read labels) the raw labels; `pair_id` is the pair's position here.
    pub pairs: Vec<ShardEntry>,
    /// Validation images, for jobs that validate (fine-tuning); cut into one contiguous share
    /// per rank.
    pub valid: Vec<ShardEntry>,
    pub seed: u64,
    pub global_batch: usize,
}

/// What a run's workers are fed: training pairs by epoch, or a fixed list of items (images and
/// texts to embed) cut into one contiguous share per rank.
pub enum Work {
    Train(PairIndex),
    Items(Vec<ShardEntry>),
}

/// The contiguous share of `items` that `rank` of `world` takes (near-equal, in order).
pub fn share(items: &[ShardEntry], rank: usize, world: usize) -> Vec<ShardEntry> {
    let (q, r) = (items.len() / world, items.len() % world);
    let start = rank * q + rank.min(r);
    let len = q + usize::from(rank < r);
    items[start..start + len].to_vec()
}

impl Work {
    /// Rank `rank`'s entries of `epoch` (an item list has a single "epoch", the same always).
    pub fn shard(&self, epoch: u64, rank: usize, world: usize) -> Vec<ShardEntry> {
        match self {
            Work::Train(ix) => ix.shard(epoch, rank, world),
            Work::Items(items) => share(items, rank, world),
        }
    }

    pub fn spares(&self, epoch: u64) -> Vec<ShardEntry> {
        match self {
            Work::Train(ix) => ix.spares(epoch),
            Work::Items(_) => Vec::new(),
        }
    }

    /// Rank `rank`'s share of another part of the work (`valid`).
    pub fn part(&self, part: &str, rank: usize, world: usize) -> Result<Vec<ShardEntry>, String> {
        match (self, part) {
            (Work::Train(ix), "valid") => Ok(share(&ix.valid, rank, world)),
            (_, other) => Err(format!("this run has no part '{other}'")),
        }
    }
}

/// The pairs of a MIMIC-CXR-JPG root, or of a folder prepared from one (the same pairs in the
/// same order: see `data::shards::read_prepared`), read with `opts`.
fn read_dataset(root: &Path, opts: &data::ReadOptions) -> Result<data::Dataset> {
    let ds = if data::shards::is_prepared(root) {
        data::shards::read_prepared(root, opts).with_context(|| format!("--data {}", root.display()))?
    } else {
        data::read(data::DatasetKind::Mimic, root, opts).with_context(|| format!("reading {}", root.display()))?
    };
    if !ds.problems.is_empty() {
        eprintln!("coordinator: {}: {}", root.display(), ds.problems.summary());
    }
    Ok(ds)
}

impl PairIndex {
    /// The training pairs of a MIMIC-CXR-JPG root or a folder prepared from one (official
    /// train split, `fraction` of the training patients) read with `opts` (views, report
    /// sections; `opts.seed` seeds the fraction and the epochs' order).
    pub fn read(root: &Path, opts: &data::ReadOptions, fraction: f64, global_batch: usize) -> Result<Self> {
        let seed = opts.seed;
        let ds = read_dataset(root, opts)?;
        let ids = data::splits::training_fraction(&ds.pairs, fraction, seed);
        let pairs: Vec<ShardEntry> = ids
            .iter()
            .enumerate()
            .map(|(k, &i)| ShardEntry {
                pair_id: k as u64,
                image: ds.pairs[i].image.to_string_lossy().into_owned(),
                text: ds.pairs[i].text.clone(),
                label_values: Vec::new(),
            })
            .collect();
        ensure!(
            pairs.len() >= global_batch,
            "{} has {} training pairs, fewer than one global batch of {global_batch}",
            root.display(),
            pairs.len()
        );
        Ok(Self { pairs, valid: Vec::new(), seed, global_batch })
    }

    /// The training pairs of a MIMIC-CXR-JPG root (or prepared folder) with their labels (fine-tuning: `fraction`
    /// of the training patients), and the validation split's images.
    pub fn read_labelled(root: &Path, opts: &data::ReadOptions, fraction: f64, global_batch: usize) -> Result<Self> {
        let ds = read_dataset(root, opts)?;
        let entry = |k: usize, p: &data::Pair| ShardEntry {
            pair_id: k as u64,
            image: p.image.to_string_lossy().into_owned(),
            text: String::new(),
            label_values: worker::feed::encode_labels(&p.labels),
        };
        let ids = data::splits::training_fraction(&ds.pairs, fraction, opts.seed);
        let pairs: Vec<ShardEntry> = ids.iter().enumerate().map(|(k, &i)| entry(k, &ds.pairs[i])).collect();
        let valid: Vec<ShardEntry> = ds
            .pairs
            .iter()
            .filter(|p| p.split == data::Split::Validate)
            .enumerate()
            .map(|(k, p)| entry(k, p))
            .collect();
        ensure!(
            pairs.len() >= global_batch,
            "{} has {} training images, fewer than one global batch of {global_batch}",
            root.display(),
            pairs.len()
        );
        ensure!(!valid.is_empty(), "{} has no validation images to choose the best epoch with", root.display());
        Ok(Self { pairs, valid, seed: opts.seed, global_batch })
    }

    /// Per label (in `columns`, indices into `data::LABELS`), negatives / positives among the
    /// training pairs under `policy` (PyTorch's `pos_weight`); 1 where a label has no positive.
    pub fn pos_weight(&self, columns: &[usize], policy: data::UncertainPolicy) -> Vec<f32> {
        let mut pos = vec![0u64; columns.len()];
        let mut neg = vec![0u64; columns.len()];
        for e in &self.pairs {
            for (k, &c) in columns.iter().enumerate() {
                let v = worker::feed::decode_label(e.label_values.get(c));
                match policy.apply(v) {
                    Some(t) if t > 0.5 => pos[k] += 1,
                    Some(_) => neg[k] += 1,
                    None => {}
                }
            }
        }
        pos.iter().zip(&neg).map(|(&p, &n)| if p == 0 { 1.0 } else { n as f32 / p as f32 }).collect()
    }

    /// Whole global batches per epoch (the remainder of an epoch is dropped).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.pairs.len() / self.global_batch) as u64
    }

    /// The order of the training pairs in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.pairs.len() as u32).collect();
        let key =
            self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch.wrapping_add(1).wrapping_mul(0xd1b5_4a32_d192_ed03);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
        order
    }

    /// The spares of `epoch`: up to [`SPARES`] training pairs drawn by (seed, epoch), the same
    /// for every rank, from which a rank draws a substitute for an unreadable image.
    pub fn spares(&self, epoch: u64) -> Vec<ShardEntry> {
        let mut order: Vec<u32> = (0..self.pairs.len() as u32).collect();
        let key = (self.seed ^ 0x5bd1_e995_5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ epoch.wrapping_add(1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        let (picked, _) = order.partial_shuffle(&mut ChaCha8Rng::seed_from_u64(key), SPARES);
        picked.iter().map(|&id| self.pairs[id as usize].clone()).collect()
    }

    /// Rank `rank`'s pairs of `epoch`, in step order (`global_batch / world` per step).
    pub fn shard(&self, epoch: u64, rank: usize, world: usize) -> Vec<ShardEntry> {
        let order = self.epoch_order(epoch);
        let g = self.global_batch;
        let b = g / world;
        let mut out = Vec::with_capacity(self.steps_per_epoch() as usize * b);
        for k in 0..self.steps_per_epoch() as usize {
            for &id in &order[k * g + rank * b..k * g + (rank + 1) * b] {
                out.push(self.pairs[id as usize].clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(n: usize, g: usize) -> PairIndex {
        let pairs = (0..n)
            .map(|i| ShardEntry {
                pair_id: i as u64,
                image: format!("img{i}.jpg"),
                text: format!("text {i}"),
                label_values: Vec::new(),
            })
            .collect();
        PairIndex { pairs, valid: Vec::new(), seed: 7, global_batch: g }
    }

    #[test]
    fn a_step_sees_the_same_pairs_on_any_world() {
        let ix = index(100, 8);
        for epoch in 0..3 {
            let one: Vec<u64> = ix.shard(epoch, 0, 1).iter().map(|e| e.pair_id).collect();
            for world in [2, 4, 8] {
                let shards: Vec<Vec<u64>> =
                    (0..world).map(|r| ix.shard(epoch, r, world).iter().map(|e| e.pair_id).collect()).collect();
                let b = 8 / world;
                for k in 0..ix.steps_per_epoch() as usize {
                    let step: Vec<u64> = shards.iter().flat_map(|s| s[k * b..(k + 1) * b].iter().copied()).collect();
                    assert_eq!(step, one[k * 8..(k + 1) * 8]);
                }
            }
        }
        // Spares: the same whatever asks, distinct, drawn anew each epoch.
        let sp: Vec<u64> = ix.spares(0).iter().map(|e| e.pair_id).collect();
        assert_eq!(sp.len(), SPARES);
        assert_eq!(sp, ix.spares(0).iter().map(|e| e.pair_id).collect::<Vec<_>>());
        assert_ne!(sp, ix.spares(1).iter().map(|e| e.pair_id).collect::<Vec<_>>());
        let mut d = sp.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), SPARES);
        assert_eq!(index(10, 2).spares(0).len(), 10);
        // Epochs differ, and an epoch holds no pair twice.
        assert_ne!(ix.epoch_order(0), ix.epoch_order(1));
        let mut e = ix.epoch_order(2);
        e.sort();
        e.dedup();
        assert_eq!(e.len(), 100);
    }

    #[test]
    fn shares_cover_the_items_once_in_order() {
        let items = index(11, 1).pairs;
        for world in [1, 2, 3, 4, 11, 12] {
            let all: Vec<u64> = (0..world).flat_map(|r| share(&items, r, world)).map(|e| e.pair_id).collect();
            assert_eq!(all, (0..11).collect::<Vec<u64>>(), "world {world}");
            let sizes: Vec<usize> = (0..world).map(|r| share(&items, r, world).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }
}
