//! `prepare` trusts a finished shard only when its file is whole (length and checksum recorded
//! at writing), every image dimension from a file or a flag is bounded before anything is
//! allocated, and write errors name their file.

use std::fs;
use std::path::Path;

use data::dicom::{encode_dicom, read_dicom, DicomMeta};
use data::shards::{prepare, ShardSet};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, ReadOptions};
use rand::{Rng, SeedableRng};

fn mimic(root: &Path, studies: usize, seed: u64) -> data::Dataset {
    generate(root, &SynthConfig { studies, dataset: DatasetKind::Mimic, seed, size: 40, ..Default::default() })
        .unwrap();
    read(DatasetKind::Mimic, root, &ReadOptions::default()).unwrap()
}

fn pixels(set: &ShardSet) -> Vec<(Vec<u8>, usize, usize)> {
    (0..set.pairs.len()).map(|i| set.image(i)).map(|(p, w, h)| (p.to_vec(), w, h)).collect()
}

#[test]
fn resume_redoes_truncated_deleted_damaged_and_garbage_shards() {
    let seed: u64 = rand::rng().random();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let t = tempfile::tempdir().unwrap();
    let ds = mimic(&t.path().join("mimic"), 24, seed % 1000);
    let out = t.path().join("shards");
    let opts = ReadOptions::default();
    let s = prepare(&ds, "mimic", &opts, &out, 32, 4, &|_, _| {}).unwrap();
    assert!(s.shards >= 5, "seed {seed}: {} shards", s.shards);
    let want = pixels(&ShardSet::open(&out).unwrap());
    let bin = |k: usize| out.join(format!("shard-{k:05}.bin"));
    // Truncated, deleted, one byte changed (same length: only the checksum sees it), and a
    // garbage index.
    let b0 = fs::read(bin(0)).unwrap();
    fs::write(bin(0), &b0[..b0.len() / 2]).unwrap();
    fs::remove_file(bin(1)).unwrap();
    let mut b2 = fs::read(bin(2)).unwrap();
    let at = rng.random_range(0..b2.len());
    b2[at] ^= 0x5a;
    fs::write(bin(2), &b2).unwrap();
    let idx3 = out.join("shard-00003.idx.json");
    fs::write(&idx3, b"{\"bytes\": 12, garbage").unwrap();

    let s2 = prepare(&ds, "mimic", &opts, &out, 32, 4, &|_, _| {}).unwrap();
    assert_eq!(s2.shards_redone.len(), 4, "seed {seed}: {:?}", s2.shards_redone);
    assert_eq!(s2.shards_skipped, s.shards - 4, "seed {seed}");
    let why = s2.shards_redone.join("\n");
    assert!(why.contains("shard-00000.bin") && why.contains("truncated"), "{why}");
    assert!(why.contains("shard-00001.bin"), "{why}");
    assert!(why.contains("shard-00002.bin") && why.contains("checksum"), "{why}");
    assert!(why.contains(&idx3.display().to_string()), "the garbage index is named: {why}");
    assert_eq!(pixels(&ShardSet::open(&out).unwrap()), want, "seed {seed}: the redone shards hold the same pixels");
    // A third run finds everything whole.
    let s3 = prepare(&ds, "mimic", &opts, &out, 32, 4, &|_, _| {}).unwrap();
    assert!(s3.shards_redone.is_empty() && s3.shards_skipped == s.shards, "{:?}", s3.shards_redone);
}

#[test]
fn write_errors_name_the_file() {
    let t = tempfile::tempdir().unwrap();
    let ds = mimic(&t.path().join("mimic"), 6, 3);
    // A folder where a file must go (what a read-only or full disk gives: the write fails).
    let out = t.path().join("shards");
    fs::create_dir_all(out.join("meta.json")).unwrap();
    let e = format!("{:#}", prepare(&ds, "mimic", &ReadOptions::default(), &out, 32, 4, &|_, _| {}).unwrap_err());
    assert!(e.contains(&out.join("meta.json").display().to_string()), "{e}");
    let out = t.path().join("shards2");
    fs::create_dir_all(out.join("shard-00000.bin.tmp")).unwrap();
    let e = format!("{:#}", prepare(&ds, "mimic", &ReadOptions::default(), &out, 32, 4, &|_, _| {}).unwrap_err());
    assert!(e.contains("shard-00000.bin.tmp"), "{e}");
}

#[test]
fn short_side_and_synth_size_are_bounded_up_front() {
    let t = tempfile::tempdir().unwrap();
    let ds = mimic(&t.path().join("mimic"), 4, 5);
    for bad in [0, 1, 15, 8193, 100_000] {
        let out = t.path().join(format!("s{bad}"));
        let e = format!("{:#}", prepare(&ds, "mimic", &ReadOptions::default(), &out, bad, 4, &|_, _| {}).unwrap_err());
        assert!(e.contains(&format!("--short-side {bad}")) && e.contains("16..=8192"), "{e}");
        assert!(!out.exists(), "nothing written for --short-side {bad}");
    }
    for bad in [0, 31, 4097, 100_000] {
        let out = t.path().join(format!("synth{bad}"));
        let cfg = SynthConfig { studies: 1, dataset: DatasetKind::Mimic, size: bad, ..Default::default() };
        let e = format!("{:#}", generate(&out, &cfg).unwrap_err());
        assert!(e.contains(&format!("--size {bad}")) && e.contains("32..=4096"), "{e}");
    }
}

/// Sets the first (0028,0010) Rows or (0028,0011) Columns element of an explicit VR little
/// endian DICOM to `v`.
fn patch_us(bytes: &mut [u8], element: u8, v: u16) {
    let tag = [0x28, 0x00, element, 0x00, b'U', b'S', 0x02, 0x00];
    let at = bytes.windows(8).position(|w| w == tag).expect("tag present") + 8;
    bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn dicom_dimensions_out_of_range_are_refused_before_decoding() {
    let t = tempfile::tempdir().unwrap();
    let (w, h) = (24, 20);
    let px: Vec<u8> = (0..w * h).map(|i| (i * 7 % 251) as u8).collect();
    let meta = DicomMeta {
        patient_id: "p".into(),
        sex: "F".into(),
        age: 40,
        view: "PA".into(),
        monochrome1: false,
        uid_seed: 9,
    };
    let good = encode_dicom(&px, w, h, &meta).unwrap();
    let path = t.path().join("a.dcm");
    fs::write(&path, &good).unwrap();
    let img = read_dicom(&path).unwrap();
    assert_eq!((img.w, img.h, img.pixels), (w, h, px));
    for (element, name, v) in
        [(0x10, "Rows", 0u16), (0x11, "Columns", 0), (0x10, "Rows", 40_000), (0x11, "Columns", 65_535)]
    {
        let mut bytes = good.clone();
        patch_us(&mut bytes, element, v);
        fs::write(&path, &bytes).unwrap();
        let e = format!("{:#}", read_dicom(&path).unwrap_err());
        assert!(e.contains(&format!("{name} = {v} is out of range (1..=16384)")), "{e}");
    }
}

#[test]
fn rsna_reader_refuses_a_dicom_with_zero_rows() {
    let t = tempfile::tempdir().unwrap();
    generate(
        t.path(),
        &SynthConfig { studies: 12, dataset: DatasetKind::Rsna, seed: 4, size: 40, ..Default::default() },
    )
    .unwrap();
    let clean = read(DatasetKind::Rsna, t.path(), &ReadOptions::default()).unwrap();
    let victim = clean.image_path(&clean.pairs[0]);
    let mut bytes = fs::read(&victim).unwrap();
    patch_us(&mut bytes, 0x10, 0);
    fs::write(&victim, &bytes).unwrap();
    let d = read(DatasetKind::Rsna, t.path(), &ReadOptions::default()).unwrap();
    assert_eq!(d.images, clean.images - 1);
    let p = d.problems.sorted();
    assert!(
        p.iter().any(|p| p.place.ends_with(&victim.file_name().unwrap().to_string_lossy().to_string())
            && p.detail.contains("Rows = 0")),
        "{}",
        d.problems.summary()
    );
}

#[test]
fn dicom_element_longer_than_its_file_is_refused_before_allocating() {
    // The dicom parser zero-fills a declared length before reading: 4 GiB for this 700-byte file.
    let t = tempfile::tempdir().unwrap();
    let px: Vec<u8> = (0..16 * 16).map(|i| (i * 3 % 256) as u8).collect();
    let meta = DicomMeta {
        patient_id: "q".into(),
        sex: "M".into(),
        age: 50,
        view: "AP".into(),
        monochrome1: false,
        uid_seed: 2,
    };
    let mut bytes = encode_dicom(&px, 16, 16, &meta).unwrap();
    let tag = [0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0x00, 0x00];
    let at = bytes.windows(8).position(|w| w == tag).unwrap() + 8;
    bytes[at..at + 4].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
    let path = t.path().join("long.dcm");
    fs::write(&path, &bytes).unwrap();
    let e = format!("{:#}", read_dicom(&path).unwrap_err());
    assert!(e.contains("(7FE0,0010) declares 4294967040 bytes"), "{e}");
}
