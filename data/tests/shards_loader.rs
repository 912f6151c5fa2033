//! Packed shards (resumable, memory-mapped) and the loader on a generated tree.

use std::sync::Arc;

use data::loader::{build_batch, Loader, LoaderConfig, Source, CLIP_MEAN, CLIP_STD};
use data::shards::{prepare, ShardSet};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, ReadOptions};

fn fake_tokens(t: &str) -> Vec<i32> {
    // Stand-in for the CLIP tokenizer: one id per word, padded by the loader.
    t.split_whitespace().take(77).map(|w| w.len() as i32).collect()
}

#[test]
fn prepare_resumes_and_loader_is_deterministic() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    generate(&root, &SynthConfig { studies: 24, dataset: DatasetKind::Mimic, seed: 8, size: 80, ..Default::default() })
        .unwrap();
    let ds = read(DatasetKind::Mimic, &root, &ReadOptions::default()).unwrap();
    let out = t.path().join("shards");
    let s = prepare(&ds, "mimic", &ReadOptions::default(), &out, 64, 10, &|_, _| {}).unwrap();
    assert_eq!(s.images, ds.pairs.len());
    assert_eq!(s.shards, ds.pairs.len().div_ceil(10));
    // Resume: remove the last shard's index, rerun: only that shard is redone.
    let last = s.shards - 1;
    std::fs::remove_file(out.join(format!("shard-{last:05}.idx.json"))).unwrap();
    let s2 = prepare(&ds, "mimic", &ReadOptions::default(), &out, 64, 10, &|_, _| {}).unwrap();
    assert_eq!(s2.shards_skipped, s.shards - 1);
    assert_eq!(s2.images, s.images);
    // Another preparation into the same folder is refused.
    assert!(prepare(&ds, "mimic", &ReadOptions::default(), &out, 128, 10, &|_, _| {}).is_err());

    let set = ShardSet::open(&out).unwrap();
    assert_eq!(set.pairs.len(), ds.pairs.len());
    for i in 0..set.pairs.len() {
        let (px, w, h) = set.image(i);
        assert_eq!(w.min(h), 64, "short side resized");
        assert_eq!(px.len(), w * h);
        assert_eq!(set.pairs[i].text, ds.pairs[i].text);
    }

    let cfg = LoaderConfig { batch: 5, size: 48, workers: 2, prefetch: 2, seed: 3, ..Default::default() };
    let ids: Vec<usize> = (0..set.pairs.len()).rev().collect();
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(fake_tokens);
    let a: Vec<_> = Loader::new(Source::Shards(set.clone()), ids.clone(), cfg.clone(), tok.clone())
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(a.len(), ids.len().div_ceil(5));
    let one_worker = LoaderConfig { workers: 1, ..cfg.clone() };
    let b: Vec<_> = Loader::new(Source::Shards(set.clone()), ids.clone(), one_worker, tok.clone())
        .unwrap()
        .map(|b| b.unwrap())
        .collect();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ids, y.ids);
        assert_eq!(x.pixels, y.pixels, "same seed, any worker count: same batch");
        assert_eq!(x.tokens, y.tokens);
    }
    let first = &a[0];
    assert_eq!(first.pixels.len(), 5 * 3 * 48 * 48);
    assert_eq!(first.tokens.len(), 5 * 77);
    assert_eq!(first.targets.len(), 5 * 14);
    // Grey replicated: the three channels are the same value under each channel's normalisation.
    let plane = 48 * 48;
    for j in (0..plane).step_by(97) {
        let v0 = first.pixels[j] * CLIP_STD[0] + CLIP_MEAN[0];
        let v2 = first.pixels[2 * plane + j] * CLIP_STD[2] + CLIP_MEAN[2];
        assert!((v0 - v2).abs() < 1e-5 && (-1e-5..=1.0 + 1e-5).contains(&v0));
    }
    // Evaluation (no augmentation) from shards equals the JPEG fallback up to the resize.
    let eval = LoaderConfig { augment: false, ..cfg.clone() };
    let files = Source::Files { root: ds.root.clone(), pairs: Arc::new(ds.pairs.clone()) };
    let from_shards = build_batch(&Source::Shards(set.clone()), &[0, 1], &eval, &fake_tokens).unwrap();
    let from_files = build_batch(&files, &[0, 1], &eval, &fake_tokens).unwrap();
    let diff: f32 = from_shards.pixels.iter().zip(&from_files.pixels).map(|(a, b)| (a - b).abs()).sum::<f32>()
        / from_files.pixels.len() as f32;
    assert!(diff < 0.1, "mean |shards - jpeg| = {diff}");
    assert_eq!(from_shards.tokens, from_files.tokens);
    // Augmentation changes pixels between epochs.
    let e1 = LoaderConfig { epoch: 1, ..cfg.clone() };
    let x0 = build_batch(&Source::Shards(set.clone()), &[0], &cfg, &fake_tokens).unwrap();
    let x1 = build_batch(&Source::Shards(set), &[0], &e1, &fake_tokens).unwrap();
    assert_ne!(x0.pixels, x1.pixels);
}
