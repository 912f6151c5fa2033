//! Loader speed: images/s per core from packed shards at 224 px with augmentation, and JPEG
//! decode speed (zune-jpeg against the `image` crate).
//! `cargo run --release -p data --example loader_speed -- [studies]`

use std::sync::Arc;
use std::time::Instant;

use data::imageio::{decode_jpeg, decode_jpeg_image_crate};
use data::loader::{build_batch, fill_batch, Batch, LoaderConfig, Source};
use data::shards::{prepare, ShardSet};
use data::synth::{generate, SynthConfig};
use data::{read, DatasetKind, ReadOptions};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(400);
    let t = tempfile::tempdir()?;
    let root = t.path().join("mimic");
    generate(
        &root,
        &SynthConfig { studies: n, dataset: DatasetKind::Mimic, seed: 1, size: 256, ..Default::default() },
    )?;
    let ds = read(DatasetKind::Mimic, &root, &ReadOptions::default())?;
    let out = t.path().join("shards");
    let s = prepare(&ds, "mimic", &ReadOptions::default(), &out, 256, 1024, &|_, _| {})?;
    println!(
        "prepare: {} images in {:.2} s ({:.0} images/s, all threads)",
        s.images,
        s.seconds,
        s.images as f64 / s.seconds
    );
    let set = ShardSet::open(&out)?;
    let tok = |t: &str| -> Vec<i32> { t.split_whitespace().take(77).map(|w| w.len() as i32).collect() };
    for augment in [true, false] {
        let cfg = LoaderConfig { batch: 64, size: 224, augment, ..Default::default() };
        let src = Source::Shards(set.clone());
        let ids: Vec<usize> = (0..set.pairs.len()).collect();
        let t0 = Instant::now();
        let mut imgs = 0;
        let mut b = Batch::default();
        // One thread, so the figure is per core; the batch buffer is reused as the loader does.
        for _ in 0..3 {
            for chunk in ids.chunks(64) {
                fill_batch(&mut b, &src, chunk, &cfg, &tok)?;
                imgs += b.ids.len();
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        println!("loader from shards, 224 px, augment={augment}: {:.0} images/s on one core", imgs as f64 / dt);
    }
    let files = Source::Files { root: ds.root.clone(), pairs: Arc::new(ds.pairs.clone()) };
    let cfg = LoaderConfig { batch: 64, size: 224, ..Default::default() };
    let ids: Vec<usize> = (0..ds.pairs.len()).collect();
    let t0 = Instant::now();
    for chunk in ids.chunks(64) {
        build_batch(&files, chunk, &cfg, &tok)?;
    }
    println!(
        "loader from JPEG files, 224 px, augment=true: {:.0} images/s on one core",
        ids.len() as f64 / t0.elapsed().as_secs_f64()
    );
    let jpgs: Vec<Vec<u8>> = ds.pairs.iter().map(|p| std::fs::read(ds.image_path(p))).collect::<Result<_, _>>()?;
    for (name, f) in [
        ("zune-jpeg", decode_jpeg as fn(&[u8]) -> anyhow::Result<data::dicom::GreyImage>),
        ("image", decode_jpeg_image_crate),
    ] {
        let t0 = Instant::now();
        for _ in 0..3 {
            for j in &jpgs {
                f(j)?;
            }
        }
        println!(
            "JPEG decode ({name}), 256 px grey: {:.0} images/s on one core",
            3.0 * jpgs.len() as f64 / t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
