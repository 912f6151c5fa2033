//! A rank's feed from shards holds the same pairs, in the same order, with the same draws, as
//! its feed from the JPEG tree the shards were packed from: the loader source the worker builds
//! for an epoch (`feed::epoch_source`) from the coordinator's entries, over both.

use std::sync::Arc;

use data::loader::{Batch, Loader, LoaderConfig, Recovery};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, ReadOptions};
use proto::v1::ShardEntry;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use worker::feed::{epoch_source, loader_threads, Pixels};

fn fake_tokens(t: &str) -> Vec<i32> {
    t.split_whitespace().take(77).map(|w| w.len() as i32).collect()
}

/// This rank's epoch as `Feed` runs it: its entries then the spares, the loader over the
/// entries with the spares as the substitutes' pool.
fn feed(pixels: &Pixels, entries: &[ShardEntry], spares: &[ShardEntry], cfg: &LoaderConfig) -> Vec<Batch> {
    let all: Vec<ShardEntry> = entries.iter().chain(spares).cloned().collect();
    let (source, mut ids) = epoch_source(pixels, &all).unwrap();
    let pool = ids.split_off(entries.len());
    let rec = Recovery::new(Arc::new(pool));
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(fake_tokens);
    Loader::with_recovery(source, ids, cfg.clone(), tok, rec).unwrap().map(|b| b.unwrap()).collect()
}

#[test]
fn a_feed_from_shards_is_the_feed_from_the_tree() {
    let seed: u64 = rand::rng().random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    generate(&root, &SynthConfig { studies: 40, dataset: DatasetKind::Mimic, seed, size: 64, ..Default::default() })
        .unwrap();
    let opts = ReadOptions::default();
    let ds = read(DatasetKind::Mimic, &root, &opts).unwrap();
    // One training image gone bad after the tree was read (its scan zeroed, markers intact).
    let train: Vec<usize> = (0..ds.pairs.len()).filter(|&i| ds.pairs[i].split == data::Split::Train).collect();
    assert!(train.len() >= 20, "seed {seed}: {} training pairs", train.len());
    let victim = train[rng.random_range(0..train.len())];
    let path = ds.image_path(&ds.pairs[victim]);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[3..n - 64].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let out = t.path().join("shards");
    data::shards::prepare(&ds, "mimic", &opts, &out, 256, 9, &|_, _| {}).unwrap();
    let packed = data::shards::read_prepared(&out, &opts).unwrap();

    // The coordinator's entries: the training pairs numbered in order (here from each source's
    // own reading: they must agree), a shuffled epoch, rank 1 of 2 taking every other pair.
    let entries = |ds: &data::Dataset| -> Vec<ShardEntry> {
        ds.pairs
            .iter()
            .filter(|p| p.split == data::Split::Train)
            .enumerate()
            .map(|(k, p)| ShardEntry {
                pair_id: k as u64,
                image: p.image.to_string_lossy().into_owned(),
                text: p.text.clone(),
                label_values: worker::feed::encode_labels(&p.labels),
            })
            .collect()
    };
    let (from_tree, from_shards) = (entries(&ds), entries(&packed));
    assert_eq!(from_tree, from_shards, "seed {seed}: the same pairs under the same ids");
    let mut order: Vec<usize> = (0..from_tree.len()).collect();
    order.shuffle(&mut rng);
    let mine: Vec<ShardEntry> = order.iter().skip(1).step_by(2).map(|&i| from_tree[i].clone()).collect();
    // The victim among this rank's pairs, so that a substitute is drawn.
    let victim_id = train.iter().position(|&i| i == victim).unwrap() as u64;
    let mut mine = mine;
    if !mine.iter().any(|e| e.pair_id == victim_id) {
        mine[0] = from_tree[victim_id as usize].clone();
    }
    let spares: Vec<ShardEntry> = order.iter().take(6).map(|&i| from_tree[i].clone()).collect();

    let tree = Pixels::open(&root).unwrap();
    assert!(matches!(tree, Pixels::Files(_)));
    let shards = Pixels::open(&out).unwrap();
    assert!(matches!(shards, Pixels::Shards(_)));
    let cfg = LoaderConfig { batch: 3, size: 40, workers: 2, prefetch: 2, seed, epoch: 2, ..Default::default() };
    let a = feed(&tree, &mine, &spares, &cfg);
    let b = feed(&shards, &mine, &spares, &LoaderConfig { workers: 3, prefetch: 1, ..cfg.clone() });
    assert_eq!(a.len(), mine.len().div_ceil(3));
    let asked: Vec<usize> = mine.iter().map(|e| e.pair_id as usize).collect();
    let held: Vec<usize> = a.iter().flat_map(|x| x.ids.clone()).collect();
    let replaced: Vec<usize> = (0..asked.len()).filter(|&k| asked[k] != held[k]).collect();
    assert_eq!(replaced.len(), 1, "seed {seed}: only the bad image is substituted");
    assert_eq!(asked[replaced[0]], victim_id as usize);
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.ids, y.ids, "seed {seed}: batch {k}: pairs");
        assert!(x.pixels.iter().all(|v| v.is_finite()));
        assert!(x.pixels == y.pixels, "seed {seed}: batch {k}: pixels");
        assert_eq!((&x.tokens, &x.targets, &x.mask), (&y.tokens, &y.targets, &y.mask), "seed {seed}: batch {k}");
    }

    // An entry the shards do not hold is named.
    let stranger = ShardEntry { pair_id: 0, image: "files/p10/p1/s1/none.jpg".into(), ..ShardEntry::default() };
    let e = format!("{:#}", epoch_source(&shards, &[stranger]).err().unwrap());
    assert!(e.contains("none.jpg") && e.contains("not in the shards"), "{e}");
}

#[test]
fn loader_threads_leave_the_step_a_core() {
    assert_eq!(loader_threads(0, 1), 2, "at least two");
    assert_eq!(loader_threads(0, 2), 2);
    assert_eq!(loader_threads(0, 3), 2);
    assert_eq!(loader_threads(0, 24), 23);
    assert_eq!(loader_threads(5, 2), 5, "the flag wins");
    assert_eq!(worker::feed::prefetch(1), 2);
    assert_eq!(worker::feed::prefetch(8), 1);
}
