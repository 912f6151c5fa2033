//! A training loader over a tree with unreadable images: every batch comes, full, the bad
//! images are replaced by substitutes drawn deterministically, and each is recorded once with
//! its path.

use std::collections::HashSet;
use std::sync::Arc;

use data::loader::{build_batch, Batch, Loader, LoaderConfig, Recovery, Source};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, ReadOptions};
use rand::{Rng, SeedableRng};

fn fake_tokens(t: &str) -> Vec<i32> {
    t.split_whitespace().take(77).map(|w| w.len() as i32).collect()
}

fn run(src: &Source, ids: &[usize], cfg: &LoaderConfig, rec: Recovery) -> Vec<Batch> {
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(fake_tokens);
    Loader::with_recovery(src.clone(), ids.to_vec(), cfg.clone(), tok, rec).unwrap().map(|b| b.unwrap()).collect()
}

#[test]
fn corrupt_image_is_replaced_counted_once_and_named() {
    // A fresh tree and a fresh victim each run.
    let seed: u64 = rand::rng().random();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    let synth = SynthConfig { studies: 16, dataset: DatasetKind::Mimic, seed, size: 64, ..Default::default() };
    generate(&root, &synth).unwrap();
    let ds = read(DatasetKind::Mimic, &root, &ReadOptions::default()).unwrap();
    let n = ds.pairs.len();
    assert!(n >= 12, "seed {seed}: {n} pairs");
    // Damaged after indexing (as a file going bad on shared storage would be): cut mid-scan.
    let victim = rng.random_range(0..n);
    let path = ds.image_path(&ds.pairs[victim]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();

    let src = Source::Files { root: ds.root.clone(), pairs: Arc::new(ds.pairs.clone()) };
    let ids: Vec<usize> = (0..n).rev().collect();
    let cfg = LoaderConfig { batch: 4, size: 32, workers: 3, prefetch: 1, seed: 5, ..Default::default() };

    // Without a recovery, the batch holding the victim is one error naming the file.
    let err = build_batch(&src, &[victim], &cfg, &fake_tokens).unwrap_err();
    assert!(format!("{err:#}").contains(&path.display().to_string()), "seed {seed}: {err:#}");

    let rec = Recovery::new(Arc::new(ids.clone()));
    let a = run(&src, &ids, &cfg, rec.clone());
    assert_eq!(a.len(), n.div_ceil(4), "seed {seed}: every batch comes");
    for (k, b) in a.iter().enumerate() {
        let want = (n - 4 * k).min(4);
        assert_eq!(b.ids.len(), want, "seed {seed}: batch {k} is full");
        assert_eq!(b.pixels.len(), want * 3 * 32 * 32);
        assert_eq!(b.tokens.len(), want * 77);
        assert!(b.pixels.iter().all(|v| v.is_finite()));
    }
    let held: Vec<usize> = a.iter().flat_map(|b| b.ids.iter().copied()).collect();
    assert!(!held.contains(&victim), "seed {seed}: the bad image is not in any batch");
    // Every other sample sits where it was asked for; the victim's slot holds a substitute.
    let slot = ids.iter().position(|&i| i == victim).unwrap();
    for (j, (&got, &asked)) in held.iter().zip(&ids).enumerate() {
        if j != slot {
            assert_eq!(got, asked);
        }
    }
    let sub = held[slot];
    assert!(ids.contains(&sub));
    assert_eq!(rec.skips.count(), 1, "seed {seed}");
    let list = rec.skips.list();
    assert_eq!(list[0].id, victim);
    assert_eq!(list[0].path, path);
    assert!(!list[0].reason.is_empty());
    assert!(rec.skips.summary().starts_with("1 unreadable image skipped"));
    assert!(rec.skips.summary().contains(&path.display().to_string()));
    // Reported once: the first take hands it out, later ones do not.
    assert_eq!(rec.skips.take_new(), list);
    assert!(rec.skips.take_new().is_empty());

    // The substitute's slot has the substitute's text (no augmentation: text as it is).
    let plain = LoaderConfig { augment: false, ..cfg.clone() };
    let p = run(&src, &ids, &plain, Recovery::new(Arc::new(ids.clone())));
    let mut expect = fake_tokens(&ds.pairs[sub].text);
    expect.resize(77, 0);
    assert_eq!(&p[slot / 4].tokens[(slot % 4) * 77..(slot % 4 + 1) * 77], &expect[..]);

    // Deterministic: one worker, a fresh record: the same batches and the same substitute.
    let one = LoaderConfig { workers: 1, ..cfg.clone() };
    let b = run(&src, &ids, &one, Recovery::new(Arc::new(ids.clone())));
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.ids, y.ids);
        assert_eq!(x.pixels, y.pixels);
        assert_eq!(x.tokens, y.tokens);
    }
    // A loader resumed at the victim's batch, given the epoch's whole pool, draws the same
    // substitute as the uninterrupted one.
    let from = (slot / 4) * 4;
    let r = run(&src, &ids[from..], &cfg, Recovery::new(Arc::new(ids.clone())));
    assert_eq!(r[0].ids, a[slot / 4].ids);
    assert_eq!(r[0].pixels, a[slot / 4].pixels);

    // The next epoch shares the record: still one, nothing new to report.
    let e1 = LoaderConfig { epoch: 1, ..cfg.clone() };
    let c = run(&src, &ids, &e1, rec.clone());
    assert_eq!(c.iter().map(|b| b.ids.len()).sum::<usize>(), n);
    assert_eq!(rec.skips.count(), 1);
    assert!(rec.skips.take_new().is_empty());

    // A missing file is the same kind of event: two distinct bad images now.
    let other = (victim + 1 + rng.random_range(0..n - 1)) % n;
    let other_path = ds.image_path(&ds.pairs[other]);
    std::fs::remove_file(&other_path).unwrap();
    let rec2 = Recovery::new(Arc::new(ids.clone()));
    let d = run(&src, &ids, &cfg, rec2.clone());
    let held: HashSet<usize> = d.iter().flat_map(|b| b.ids.iter().copied()).collect();
    assert!(!held.contains(&victim) && !held.contains(&other));
    assert_eq!(d.iter().map(|b| b.ids.len()).sum::<usize>(), n);
    let paths: Vec<_> = rec2.skips.list().into_iter().map(|s| s.path).collect();
    assert_eq!(paths.len(), 2);
    assert!(paths.contains(&path) && paths.contains(&other_path));

    // A pool with nothing readable in it: one clear error, not a hang or a panic.
    let bad_pool = Recovery::new(Arc::new(vec![victim, other]));
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(fake_tokens);
    let mut l = Loader::with_recovery(src.clone(), vec![victim], cfg.clone(), tok, bad_pool).unwrap();
    let e = l.next().unwrap().unwrap_err();
    assert!(format!("{e:#}").contains("substitutes"), "{e:#}");
}
