//! A prepared folder reads as the tree it was packed from: the same pairs in the same order
//! (an image that fails to decode included), the same batches bit for bit when the shards keep
//! the images' own size, and bad folders refused with one line.

use std::path::Path;
use std::sync::Arc;

use data::loader::{Batch, Loader, LoaderConfig, Recovery, Source};
use data::report::SectionPolicy;
use data::shards::{prepare, read_prepared, ShardSet};
use data::synth::{generate, SynthConfig};
use data::{read, Dataset, DatasetKind, ReadOptions, Views};
use rand::{Rng, SeedableRng};

fn fake_tokens(t: &str) -> Vec<i32> {
    t.split_whitespace().take(77).map(|w| w.len() as i32).collect()
}

/// A generated tree of `size` px images with one image damaged where the reader cannot see it
/// (start and end markers intact, the scan zeroed), as a file gone bad on disk would be.
fn damaged_tree(dir: &Path, seed: u64, size: usize) -> (Dataset, usize) {
    let root = dir.join("mimic");
    let synth = SynthConfig { studies: 20, dataset: DatasetKind::Mimic, seed, size, ..Default::default() };
    generate(&root, &synth).unwrap();
    let all = read(DatasetKind::Mimic, &root, &ReadOptions::default()).unwrap();
    let victim = rand_chacha::ChaCha8Rng::seed_from_u64(seed).random_range(0..all.pairs.len());
    let path = all.image_path(&all.pairs[victim]);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[3..n - 64].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let ds = read(DatasetKind::Mimic, &root, &ReadOptions::default()).unwrap();
    assert_eq!(ds.pairs.len(), all.pairs.len(), "seed {seed}: the reader keeps the damaged image");
    (ds, victim)
}

fn same_pairs(got: &Dataset, want: &Dataset) {
    assert_eq!(got.pairs.len(), want.pairs.len());
    for (k, (g, w)) in got.pairs.iter().zip(&want.pairs).enumerate() {
        let key = |p: &data::Pair| {
            (
                p.subject_id.clone(),
                p.study_id.clone(),
                p.image.clone(),
                p.split,
                p.view.clone(),
                p.labels,
                p.text.clone(),
            )
        };
        assert_eq!(key(g), key(w), "pair {k}");
    }
}

fn batches(src: &Source, ids: &[usize], cfg: &LoaderConfig) -> Vec<Batch> {
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(fake_tokens);
    let rec = Recovery::new(Arc::new(ids.to_vec()));
    Loader::with_recovery(src.clone(), ids.to_vec(), cfg.clone(), tok, rec).unwrap().map(|b| b.unwrap()).collect()
}

#[test]
fn a_prepared_folder_trains_as_the_tree_it_was_packed_from() {
    let seed: u64 = rand::rng().random();
    let t = tempfile::tempdir().unwrap();
    // 64 px images: the smaller side is under the packed 256, so the shards keep the decoded
    // pixels as they are.
    let (ds, victim) = damaged_tree(t.path(), seed, 64);
    let opts = ReadOptions::default();
    let out = t.path().join("shards");
    let s = prepare(&ds, "mimic", &opts, &out, 256, 7, &|_, _| {}).unwrap();
    assert_eq!((s.images, s.failed), (ds.pairs.len() - 1, 1), "seed {seed}");
    let packed = read_prepared(&out, &opts).unwrap();
    same_pairs(&packed, &ds);
    assert_eq!(packed.root, out);
    let set = ShardSet::open(&out).unwrap();
    assert_eq!(set.image(victim).1, 0, "seed {seed}: the damaged image is listed, without pixels");

    // The loader over both, in a shuffled order, with the damaged image substituted: the same
    // batches bit for bit (ids, pixels, tokens, targets).
    let mut ids: Vec<usize> = (0..ds.pairs.len()).collect();
    rand::seq::SliceRandom::shuffle(&mut ids[..], &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 1));
    let cfg = LoaderConfig { batch: 5, size: 48, workers: 2, prefetch: 1, seed, epoch: 3, ..Default::default() };
    let files = Source::Files { root: ds.root.clone(), pairs: Arc::new(ds.pairs.clone()) };
    let a = batches(&files, &ids, &cfg);
    let b = batches(&Source::Shards(set.clone()), &ids, &cfg);
    assert_eq!(a.len(), ids.len().div_ceil(5));
    let held: Vec<usize> = a.iter().flat_map(|x| x.ids.clone()).collect();
    assert!(!held.contains(&victim), "seed {seed}: the damaged image was substituted");
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.ids, y.ids, "seed {seed}: batch {k}");
        assert!(x.pixels.iter().all(|v| v.is_finite()));
        assert!(x.pixels == y.pixels, "seed {seed}: batch {k}: pixels differ");
        assert_eq!((&x.tokens, &x.targets, &x.mask), (&y.tokens, &y.targets, &y.mask), "seed {seed}: batch {k}");
    }

    // Shards resized (64 -> 40 px smaller side): the same pairs, tokens and labels; pixels
    // within the resize's reach (a triangle filter before the warp's bilinear sampling, against
    // bilinear sampling from the larger image): mean |difference| under 0.06 in normalised units
    // (about 4 of 255 grey levels), and 98% of the pixels within 0.25 (17 levels). Single pixels
    // can differ by the whole range: the resized side is rounded (a 64 x 77 image becomes
    // 40 x 48, not 40 x 48.1), which moves the film's edge by a fraction of a pixel, and a pixel
    // on the edge is film in one and black air in the other.
    let small = t.path().join("shards-40");
    prepare(&ds, "mimic", &opts, &small, 40, 7, &|_, _| {}).unwrap();
    let c = batches(&Source::Shards(ShardSet::open(&small).unwrap()), &ids, &LoaderConfig { size: 32, ..cfg.clone() });
    let a32 = batches(&files, &ids, &LoaderConfig { size: 32, ..cfg.clone() });
    let (mut sum, mut far, mut count) = (0.0f64, 0usize, 0usize);
    for (x, y) in a32.iter().zip(&c) {
        assert_eq!((&x.ids, &x.tokens, &x.targets), (&y.ids, &y.tokens, &y.targets), "seed {seed}");
        for (p, q) in x.pixels.iter().zip(&y.pixels) {
            let d = (p - q).abs();
            assert!(!d.is_nan());
            sum += d as f64;
            far += usize::from(d > 0.25);
            count += 1;
        }
    }
    let mean = sum / count as f64;
    let far = far as f64 / count as f64;
    eprintln!("resized shards against the tree: mean |difference| {mean:.4}, {:.2}% over 0.25", 100.0 * far);
    assert!(mean > 0.0 && mean < 0.06, "seed {seed}: mean |shards - jpeg| = {mean}");
    assert!(far < 0.02, "seed {seed}: {:.2}% of the pixels differ by more than 0.25", 100.0 * far);
}

#[test]
fn a_run_may_ask_for_fewer_views_but_not_other_text() {
    let seed: u64 = rand::rng().random();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    generate(&root, &SynthConfig { studies: 24, dataset: DatasetKind::Mimic, seed, size: 48, ..Default::default() })
        .unwrap();
    let all = ReadOptions { views: Views::All, ..Default::default() };
    let ds = read(DatasetKind::Mimic, &root, &all).unwrap();
    let out = t.path().join("shards");
    prepare(&ds, "mimic", &all, &out, 256, 16, &|_, _| {}).unwrap();
    // Packed with every view: a PA,AP run gets the pairs the reader gives it from the tree.
    let frontal = ReadOptions::default();
    let want = read(DatasetKind::Mimic, &root, &frontal).unwrap();
    assert!(want.pairs.len() < ds.pairs.len(), "seed {seed}: the tree has laterals");
    same_pairs(&read_prepared(&out, &frontal).unwrap(), &want);
    same_pairs(&read_prepared(&out, &all).unwrap(), &ds);
    // Packed PA,AP: a run on every view is refused, as is another text or label file.
    let out2 = t.path().join("frontal");
    prepare(&want, "mimic", &frontal, &out2, 256, 16, &|_, _| {}).unwrap();
    let e = format!("{:#}", read_prepared(&out2, &all).unwrap_err());
    assert!(e.contains("--views all") && !e.contains('\n'), "{e}");
    let e = format!(
        "{:#}",
        read_prepared(&out2, &ReadOptions { sections: SectionPolicy::Impression, ..frontal.clone() }).unwrap_err()
    );
    assert!(e.contains("--sections impression"), "{e}");
    let negbio = ReadOptions { label_file: data::dataset::LabelFile::Negbio, ..frontal.clone() };
    assert!(format!("{:#}", read_prepared(&out2, &negbio).unwrap_err()).contains("--labels negbio"));
}

#[test]
fn bad_prepared_folders_are_one_line() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mimic");
    generate(&root, &SynthConfig { studies: 12, dataset: DatasetKind::Mimic, seed: 3, size: 48, ..Default::default() })
        .unwrap();
    let opts = ReadOptions::default();
    let ds = read(DatasetKind::Mimic, &root, &opts).unwrap();
    let good = t.path().join("good");
    prepare(&ds, "mimic", &opts, &good, 256, 4, &|_, _| {}).unwrap();
    assert!(read_prepared(&good, &opts).is_ok());
    let copy = |name: &str| {
        let d = t.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&good).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let expect = |dir: &Path, words: &[&str]| {
        let e = format!("{:#}", read_prepared(dir, &opts).err().unwrap_or_else(|| panic!("{} read", dir.display())));
        assert!(!e.contains('\n'), "more than one line: {e}");
        for w in words {
            assert!(e.contains(w), "{w:?} not in: {e}");
        }
    };
    // A shard missing.
    let d = copy("missing");
    std::fs::remove_file(d.join("shard-00001.bin")).unwrap();
    expect(&d, &["shard-00001.bin", "No such file"]);
    // A line of the table damaged.
    let d = copy("table");
    let text = std::fs::read_to_string(d.join("pairs.jsonl")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[2] = "{\"subject_id\": \"1\", \"stud";
    std::fs::write(d.join("pairs.jsonl"), lines.join("\n")).unwrap();
    expect(&d, &["pairs.jsonl:3", "not a packed pair"]);
    // A shard cut short.
    let d = copy("short");
    let bin = std::fs::read(d.join("shard-00000.bin")).unwrap();
    std::fs::write(d.join("shard-00000.bin"), &bin[..bin.len() / 2]).unwrap();
    expect(&d, &["points past the end of shard-00000.bin"]);
    // meta.json damaged, or from before the format revision.
    let d = copy("meta");
    std::fs::write(d.join("meta.json"), "{\"dataset\": ").unwrap();
    expect(&d, &["meta.json", "not a shards meta.json"]);
    let d = copy("old");
    let meta = std::fs::read_to_string(d.join("meta.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&meta).unwrap();
    v.as_object_mut().unwrap().remove("format");
    std::fs::write(d.join("meta.json"), v.to_string()).unwrap();
    expect(&d, &["older version", "prepare it again"]);
    // Fewer pairs than meta.json says (an unfinished table).
    let d = copy("unfinished");
    let text = std::fs::read_to_string(d.join("pairs.jsonl")).unwrap();
    let first: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(d.join("pairs.jsonl"), first.join("\n")).unwrap();
    expect(&d, &["holds 3 pairs", "unfinished"]);
}
