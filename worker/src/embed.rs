//! Feature extraction: the normalised image and text embeddings of a checkpoint, for the linear
//! probe, zero-shot prompts, retrieval and fine-tuning's validation.
//!
//! The coordinator cuts the items (images and texts of one or more splits) into one contiguous
//! share per rank, streamed as the shard of epoch 0. Each rank embeds its share with the
//! evaluation preprocessing (resize and centre crop, no augmentation) and writes one part file
//! ([`write_part`]) that the coordinator merges by item id. When the checkpoint holds a
//! fine-tuning head ([`model::head::LabelHead`]), the part also holds its logits.
//!
//! An image that cannot be decoded does not stop the job: its id is listed in the part with the
//! reason, and the coordinator leaves it out of every table and counts it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use data::loader::{fill_batch, Loader, LoaderConfig, Recovery, Skips};
use data::report::Tokenize;
use kernels::Backend;
use model::checkpoint::{parse_safetensors, read_safetensors, to_f32, to_i64, write_tables, Column};
use model::head::LabelHead;
use model::tokenizer::ClipTokenizer;
use model::Clip;
use proto::v1::{Job, ShardEntry};

use crate::feed::{epoch_source, loader_threads, prefetch, rank_cores, Pixels};
use crate::job::Link;

/// One rank's (or, merged, the whole job's) embeddings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embedded {
    pub dim: usize,
    /// Item ids of the embedded images, and their `[n, dim]` embeddings.
    pub image_ids: Vec<u64>,
    pub image: Vec<f32>,
    /// `[n, labels]` logits of the checkpoint's head (empty without one).
    pub logits: Vec<f32>,
    pub labels: usize,
    pub text_ids: Vec<u64>,
    pub text: Vec<f32>,
    /// Images that could not be read: item id and why.
    pub failed: Vec<(u64, String)>,
}

/// Embeds the images and texts of `entries` (an entry with an image path is an image item; one
/// with a text is a text item; one may be both) in batches of up to `b`.
pub fn embed_entries<B: Backend>(
    clip: &Clip<B>,
    head: Option<&LabelHead>,
    root: &Path,
    entries: &[ShardEntry],
    b: usize,
    tok: Arc<dyn Tokenize>,
) -> Result<Embedded> {
    ensure!(b > 0 && b <= clip.capacity(), "embedding batch {b} outside 1..={}", clip.capacity());
    let dim = clip.config.projection_dim;
    let mut out = Embedded { dim, labels: head.map_or(0, |h| h.labels), ..Embedded::default() };
    if let Some(h) = head {
        ensure!(h.dim == dim, "the head reads {} features; the model gives {dim}", h.dim);
    }
    let images: Vec<ShardEntry> = entries.iter().filter(|e| !e.image.is_empty()).cloned().collect();
    if !images.is_empty() {
        embed_images(clip, head, root, &images, b, tok.clone(), &mut out)?;
    }
    let texts: Vec<&ShardEntry> = entries.iter().filter(|e| !e.text.is_empty()).collect();
    for chunk in texts.chunks(b) {
        let ids: Vec<i32> = chunk.iter().flat_map(|e| tok.encode(&e.text)).collect();
        clip.forward_text(&ids, chunk.len())?;
        let mut host = vec![0.0f32; chunk.len() * dim];
        clip.backend.download_f32(&clip.text_embeds(chunk.len()), &mut host)?;
        out.text.extend_from_slice(&host);
        out.text_ids.extend(chunk.iter().map(|e| e.pair_id));
    }
    Ok(out)
}

fn embed_images<B: Backend>(
    clip: &Clip<B>,
    head: Option<&LabelHead>,
    root: &Path,
    images: &[ShardEntry],
    b: usize,
    tok: Arc<dyn Tokenize>,
    out: &mut Embedded,
) -> Result<()> {
    let dim = out.dim;
    let (source, ids) = epoch_source(&Pixels::open(root)?, images)?;
    // Sized as the training feed's default (an embed job has no --loader-threads).
    let threads = loader_threads(0, rank_cores());
    let cfg = LoaderConfig {
        batch: b,
        size: clip.image_size(),
        augment: false,
        workers: threads,
        prefetch: prefetch(threads),
        context: clip.context_len(),
        ..LoaderConfig::default()
    };
    // No substitutes: a bad image fails its batch, which is then rebuilt without it.
    let skips = Arc::new(Skips::default());
    let rec = Recovery { pool: Arc::new(Vec::new()), skips: skips.clone() };
    let loader = Loader::with_recovery(source.clone(), ids.clone(), cfg.clone(), tok.clone(), rec)?;
    let mut host = vec![0.0f32; b * dim];
    for (k, batch) in loader.enumerate() {
        let want = &ids[k * b..((k + 1) * b).min(ids.len())];
        let batch = match batch {
            Ok(batch) => batch,
            Err(_) => {
                // Find the unreadable images one by one, then build the batch of the others.
                let mut good = Vec::new();
                for &id in want {
                    match data::loader::build_batch(&source, &[id], &cfg, tok.as_ref()) {
                        Ok(_) => good.push(id),
                        Err(e) => out.failed.push((id as u64, format!("{e:#}"))),
                    }
                }
                if good.is_empty() {
                    continue;
                }
                let mut batch = data::loader::Batch::default();
                fill_batch(&mut batch, &source, &good, &cfg, tok.as_ref())?;
                batch
            }
        };
        let n = batch.ids.len();
        clip.upload_pixels(&batch.pixels, n)?;
        clip.forward_vision(n)?;
        let emb = &mut host[..n * dim];
        clip.backend.download_f32(&clip.image_embeds(n), emb)?;
        out.image.extend_from_slice(emb);
        out.image_ids.extend(batch.ids.iter().map(|&i| i as u64));
        if let Some(h) = head {
            out.logits.extend(h.logits(emb));
        }
    }
    Ok(())
}

/// The embed job: this rank's share of the items, embedded with the checkpoint in
/// `job.init_dir` in batches of `global_batch / world`, written to `run_dir/parts`.
pub fn run<B: Backend>(be: B, job: &Job, rank: usize, world: usize, link: &Link) -> Result<()> {
    ensure!(!job.init_dir.is_empty(), "the embed job names no checkpoint");
    let b = (job.global_batch as usize / world).max(1);
    let dir = PathBuf::from(&job.init_dir);
    let (clip, _) = Clip::from_pretrained(be, &dir, b).with_context(|| format!("loading {}", dir.display()))?;
    let head = LabelHead::load(&dir.join(model::checkpoint::WEIGHTS))?;
    let (entries, _) = link.shard(0)?;
    let tok = ClipTokenizer::new()?;
    let ctx = clip.context_len();
    ensure!(
        ctx == model::tokenizer::CONTEXT_LEN,
        "the model's text context is {ctx} tokens; the CLIP tokenizer needs {}",
        model::tokenizer::CONTEXT_LEN
    );
    let tok: Arc<dyn Tokenize> = Arc::new(move |t: &str| tok.encode(t));
    let out = embed_entries(&clip, head.as_ref(), Path::new(&job.data_root), &entries, b, tok)?;
    for (id, why) in &out.failed {
        eprintln!("worker {rank}: skipping unreadable image (item {id}): {why}");
    }
    write_part(&part_path(&PathBuf::from(&job.run_dir).join("parts"), rank), &out)
}

/// The part file of `rank` under `dir`.
pub fn part_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rank-{rank:04}.safetensors"))
}

/// Writes `e` as a safetensors part (atomically): `image_ids`, `image`, `logits`, `text_ids`,
/// `text`, `failed_ids`, with the failure reasons as JSON in the metadata.
pub fn write_part(path: &Path, e: &Embedded) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let i64s = |v: &[u64]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let (image_ids, text_ids) = (i64s(&e.image_ids), i64s(&e.text_ids));
    let failed_ids: Vec<i64> = e.failed.iter().map(|(i, _)| *i as i64).collect();
    let (ni, nt) = (e.image_ids.len(), e.text_ids.len());
    let tensors = vec![
        ("image_ids".to_string(), Column::I64(vec![ni], &image_ids)),
        ("image".to_string(), Column::F32(vec![ni, e.dim], &e.image)),
        ("logits".to_string(), Column::F32(vec![if e.labels > 0 { ni } else { 0 }, e.labels], &e.logits)),
        ("text_ids".to_string(), Column::I64(vec![nt], &text_ids)),
        ("text".to_string(), Column::F32(vec![nt, e.dim], &e.text)),
        ("failed_ids".to_string(), Column::I64(vec![failed_ids.len()], &failed_ids)),
    ];
    let reasons: Vec<&str> = e.failed.iter().map(|(_, r)| r.as_str()).collect();
    let meta = HashMap::from([("failed".to_string(), serde_json::to_string(&reasons)?)]);
    write_tables(path, &tensors, meta)
}

/// Reads a part written by [`write_part`].
pub fn read_part(path: &Path) -> Result<Embedded> {
    let bytes = read_safetensors(path)?;
    let st = parse_safetensors(&bytes, path)?;
    let get = |name: &str| st.tensor(name).map_err(|e| anyhow!("{}: no tensor {name} ({e})", path.display()));
    let ids = |name: &str| -> Result<Vec<u64>> {
        Ok(to_i64(&get(name)?, name, path)?.into_iter().map(|x| x as u64).collect())
    };
    let image = get("image")?;
    let logits = get("logits")?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let reasons: Vec<String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("failed"))
        .map(|s| serde_json::from_str(s))
        .transpose()?
        .unwrap_or_default();
    let failed_ids = ids("failed_ids")?;
    ensure!(
        reasons.len() == failed_ids.len(),
        "{}: {} failure reasons for {} ids",
        path.display(),
        reasons.len(),
        failed_ids.len()
    );
    Ok(Embedded {
        dim: image.shape().get(1).copied().unwrap_or(0),
        image_ids: ids("image_ids")?,
        image: to_f32(&image, "image", path)?,
        labels: logits.shape().get(1).copied().unwrap_or(0),
        logits: to_f32(&logits, "logits", path)?,
        text_ids: ids("text_ids")?,
        text: to_f32(&get("text")?, "text", path)?,
        failed: failed_ids.into_iter().zip(reasons).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip() {
        let e = Embedded {
            dim: 3,
            image_ids: vec![4, 9],
            image: vec![0.1, 0.2, 0.3, -0.4, 0.5, -0.6],
            logits: vec![1.5, -2.5],
            labels: 1,
            text_ids: vec![7],
            text: vec![0.7, 0.8, -0.9],
            failed: vec![(11, "no JPEG end-of-image marker".into())],
        };
        let dir = std::env::temp_dir().join(format!("cxrclip-part-{}", std::process::id()));
        let path = part_path(&dir, 3);
        write_part(&path, &e).unwrap();
        assert_eq!(read_part(&path).unwrap(), e);
        let empty = Embedded { dim: 3, ..Embedded::default() };
        write_part(&path, &empty).unwrap();
        assert_eq!(read_part(&path).unwrap(), empty);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
