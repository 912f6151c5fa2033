//! `coordinator bench feed`: the images per second one rank's training feed delivers (decode or
//! read the packed pixels, the training augmentation, CLIP normalisation, 3 channels, sentence
//! shuffling and the CLIP tokenizer) with N loader threads, from a tree's JPEGs or from the
//! shards packed from it, built as the worker builds it (`worker::feed::epoch_source`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use clap::{Args, ValueEnum};
use data::loader::{Loader, LoaderConfig};
use proto::v1::ShardEntry;
use serde_json::json;
use worker::feed::{epoch_source, Pixels};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FeedSource {
    /// Decode every image from the tree's JPEG files.
    Files,
    /// Read the pixels packed by `prepare` (smaller side at most 256).
    Shards,
}

#[derive(Args)]
pub struct FeedArgs {
    #[arg(long, value_enum)]
    pub source: FeedSource,
    /// Loader threads (the worker's --loader-threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// The model's input side.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Pairs per batch (one rank's share of a step).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Images to time (the tree's pairs over again as needed).
    #[arg(long, default_value_t = 3072)]
    pub images: usize,
    /// A MIMIC-CXR-JPG tree to read (default: a generated one of --studies studies at 256 px,
    /// made once in --dir).
    #[arg(long)]
    pub tree: Option<PathBuf>,
    #[arg(long, default_value_t = 400)]
    pub studies: usize,
    /// Where the generated tree and the shards live (default: the system temp folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: FeedArgs) -> Result<()> {
    ensure!(
        a.threads > 0 && a.batch > 0 && a.size > 0 && a.images > 0,
        "--threads, --batch, --size and --images must be positive"
    );
    let dir = a.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("cxrclip-bench-feed-v{}-{}", data::synth::VERSION, a.studies))
    });
    let tree = match &a.tree {
        Some(t) => t.clone(),
        None => generated_tree(&dir.join("tree"), a.studies)?,
    };
    let tree = std::fs::canonicalize(&tree).with_context(|| format!("reading {}", tree.display()))?;
    let opts = data::ReadOptions::default();
    let ds =
        data::read(data::DatasetKind::Mimic, &tree, &opts).with_context(|| format!("reading {}", tree.display()))?;
    ensure!(!ds.pairs.is_empty(), "{} holds no pairs", tree.display());
    let pixels = match a.source {
        FeedSource::Files => Pixels::Files(ds.root.clone()),
        FeedSource::Shards => {
            // Beside the generated tree, or named after the tree given.
            let name = tree.file_name().map_or("tree".into(), |n| n.to_string_lossy().into_owned());
            let shards = dir.join(format!("shards-{name}"));
            data::shards::prepare(&ds, "mimic", &opts, &shards, 256, 2048, &|_, _| {})?;
            Pixels::open(&shards)?
        }
    };
    let entries: Vec<ShardEntry> = ds
        .pairs
        .iter()
        .enumerate()
        .map(|(k, p)| ShardEntry {
            pair_id: k as u64,
            image: p.image.to_string_lossy().into_owned(),
            text: p.text.clone(),
            label_values: Vec::new(),
        })
        .collect();
    let (source, all) = epoch_source(&pixels, &entries)?;
    let ids: Vec<usize> = all.iter().copied().cycle().take(a.images).collect();
    let tok = Arc::new(model::tokenizer::ClipTokenizer::new()?);
    let cfg = LoaderConfig {
        batch: a.batch,
        size: a.size,
        augment: true,
        workers: a.threads,
        prefetch: worker::feed::prefetch(a.threads),
        ..LoaderConfig::default()
    };
    let t0 = Instant::now();
    let encode = tok.clone();
    let loader = Loader::new(source, ids, cfg, Arc::new(move |t: &str| encode.encode(t)))?;
    let mut images = 0;
    let mut loader = loader;
    while let Some(b) = loader.next() {
        let b = b?;
        images += b.ids.len();
        loader.recycle(b);
    }
    let secs = t0.elapsed().as_secs_f64();
    let rate = images as f64 / secs;
    // The CLIP tokenizer alone on the same texts, one thread: its share of a sample's cost.
    let t1 = Instant::now();
    let mut tokens = 0;
    for k in 0..images {
        tokens += tok.encode(&entries[k % entries.len()].text).len();
    }
    let tok_rate = images as f64 / t1.elapsed().as_secs_f64();
    std::hint::black_box(tokens);
    let source = format!("{:?}", a.source).to_lowercase();
    if a.json {
        println!(
            "{}",
            json!({"source": source, "threads": a.threads, "size": a.size, "batch": a.batch, "images": images,
                   "seconds": secs, "images_per_s": rate, "tokenizer_texts_per_s": tok_rate, "pairs": entries.len(), "tree": tree.display().to_string()})
        );
    } else {
        println!(
            "feed from {source}, {} px, batch {}, {} loader threads: {images} images in {secs:.2} s = {rate:.0} images/s; the tokenizer alone: {tok_rate:.0} texts/s on one thread",
            a.size, a.batch, a.threads
        );
    }
    Ok(())
}

/// A generated MIMIC tree at 256 px (the size `prepare` packs at), made once in `dir`.
fn generated_tree(dir: &Path, studies: usize) -> Result<PathBuf> {
    if dir.join(".complete").exists() {
        return Ok(dir.to_path_buf());
    }
    let cfg = data::synth::SynthConfig {
        studies,
        dataset: data::DatasetKind::Mimic,
        seed: 1,
        size: 256,
        ..Default::default()
    };
    let _ = std::fs::remove_dir_all(dir);
    data::synth::generate(dir, &cfg).with_context(|| format!("generating {}", dir.display()))?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(dir.to_path_buf())
}
