//! The CLS training job of one rank: data feed, the step loop, metrics and checkpoints.
//!
//! The coordinator owns the pair index: for each epoch it streams this rank's pairs in step
//! order (a permutation seeded by (seed, epoch), cut into global batches, each cut into
//! per-rank slices), so the data of a step does not depend on the world size. Images are
//! decoded, centre-cropped to a square, resized to the model's size and CLIP-normalised (grey
//! replicated to 3 channels); texts are tokenised with the CLIP tokenizer.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use kernels::Backend;
use model::optim::{AdamW, AdamWConfig};
use model::schedule::Schedule;
use model::tokenizer::ClipTokenizer;
use model::train_state::{self, RunPosition};
use model::{Clip, ClipConfig};
use proto::tonic::transport::Channel;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{Job, JobResult, ResultKind, Session, ShardEntry, ShardRequest, StepMetrics};
use rayon::prelude::*;

use crate::comm::Collectives;
use crate::dist::{train_step, DistLoss, LocalBatch};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// The folder of the checkpoint taken after `step` updates.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// What the job needs from the coordinator connection.
pub struct Link {
    pub client: CoordinatorClient<Channel>,
    pub session: Session,
    pub handle: tokio::runtime::Handle,
}

impl Link {
    fn shard(&self, epoch: u64) -> Result<Vec<ShardEntry>> {
        let mut client = self.client.clone();
        let req = ShardRequest { session: Some(self.session.clone()), epoch };
        self.handle
            .block_on(async move {
                let mut stream = client.get_shard(req).await?.into_inner();
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    out.extend(chunk.entries);
                }
                Ok::<_, proto::tonic::Status>(out)
            })
            .map_err(|s| anyhow!("fetching the shard of epoch {epoch}: {}", s.message()))
    }

    pub fn report(&self, kind: ResultKind, step: u64, path: &str, message: &str, final_loss: f64) -> Result<()> {
        let mut client = self.client.clone();
        let req = JobResult {
            session: Some(self.session.clone()),
            kind: kind as i32,
            step,
            path: path.to_string(),
            message: message.to_string(),
            final_loss,
        };
        self.handle
            .block_on(async move { client.report_result(req).await })
            .map_err(|s| anyhow!("reporting to the coordinator: {}", s.message()))?;
        Ok(())
    }
}

/// One image as the model's input: `[3, size, size]`, CLIP-normalised.
pub fn load_pixels(path: &Path, size: usize, out: &mut [f32]) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let img = image::load_from_memory(&bytes).with_context(|| format!("decoding {}", path.display()))?.to_luma8();
    let (w, h) = img.dimensions();
    let side = w.min(h);
    ensure!(side > 0, "{} is an empty image", path.display());
    let crop = image::imageops::crop_imm(&img, (w - side) / 2, (h - side) / 2, side, side).to_image();
    let small = image::imageops::resize(&crop, size as u32, size as u32, image::imageops::FilterType::Triangle);
    let plane = size * size;
    for (i, p) in small.as_raw().iter().enumerate() {
        let v = *p as f32 / 255.0;
        for c in 0..3 {
            out[c * plane + i] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    Ok(())
}

/// A step's local batch on the host.
struct HostBatch {
    step: u64,
    pixels: Vec<f32>,
    ids: Vec<i32>,
}

/// Produces the batches of steps `start..steps` in a thread of its own, two ahead.
fn spawn_feed(
    link: &Link,
    job: &Job,
    b: usize,
    image: usize,
    ctx: usize,
    start: u64,
) -> Result<mpsc::Receiver<Result<HostBatch>>> {
    let (tx, rx) = mpsc::sync_channel(2);
    let link = Link { client: link.client.clone(), session: link.session.clone(), handle: link.handle.clone() };
    let (root, steps, spe) = (PathBuf::from(&job.data_root), job.steps, job.steps_per_epoch);
    let tok = ClipTokenizer::new()?;
    std::thread::Builder::new().name("feed".into()).spawn(move || {
        let mut shard: Option<(u64, Vec<ShardEntry>)> = None;
        for step in start..steps {
            let mut make = || -> Result<HostBatch> {
                let (epoch, j) = (step / spe, (step % spe) as usize);
                if shard.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    shard = Some((epoch, link.shard(epoch)?));
                }
                let entries = &shard.as_ref().expect("fetched").1;
                ensure!(entries.len() >= (j + 1) * b, "the shard of epoch {epoch} is too short for step {step}");
                let mine = &entries[j * b..(j + 1) * b];
                let mut pixels = vec![0.0f32; b * 3 * image * image];
                pixels
                    .par_chunks_mut(3 * image * image)
                    .zip(mine.par_iter())
                    .try_for_each(|(out, e)| load_pixels(&root.join(&e.image), image, out))?;
                let mut ids = vec![0i32; b * ctx];
                for (row, e) in ids.chunks_mut(ctx).zip(mine) {
                    tok.try_encode_into(&e.text, row)?;
                }
                Ok(HostBatch { step, pixels, ids })
            };
            let item = make();
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    })?;
    Ok(rx)
}

/// Runs the job on backend `be` with communicator `comm`; returns the last step's loss.
pub fn train<B: Backend>(be: B, job: &Job, comm: &mut dyn Collectives, link: &Link) -> Result<f32> {
    let (rank, world) = (comm.rank(), comm.world());
    let g = job.global_batch as usize;
    ensure!(g.is_multiple_of(world), "global batch {g} is not a multiple of the world size {world}");
    let b = g / world;
    let run_dir = PathBuf::from(&job.run_dir);
    let (mut clip, start) = if job.resume_step > 0 {
        let dir = PathBuf::from(&job.resume_dir);
        let (clip, _) = Clip::from_pretrained(be, &dir, b).with_context(|| format!("loading {}", dir.display()))?;
        (clip, job.resume_step)
    } else if !job.init_dir.is_empty() {
        let dir = PathBuf::from(&job.init_dir);
        let config = ClipConfig::from_file(&dir.join(model::checkpoint::CONFIG))?;
        let (clip, _) = Clip::from_pretrained_with(be, &dir, config, b)?;
        (clip, 0)
    } else {
        let config: ClipConfig = serde_json::from_str(&job.config_json).context("the job's model config")?;
        (Clip::random(be, config, b, job.seed)?, 0)
    };
    let mut opt = AdamW::new(&clip, AdamWConfig { weight_decay: job.weight_decay as f32, ..AdamWConfig::default() })?;
    if start > 0 {
        let pos = train_state::load(&PathBuf::from(&job.resume_dir).join("train_state.safetensors"), &clip, &mut opt)?;
        ensure!(pos.step == start, "checkpoint {} holds step {}, expected {start}", job.resume_dir, pos.step);
    }
    let mut loss = DistLoss::new(&clip, world)?;
    let schedule = Schedule::WarmupCosine { warmup: job.warmup, total: job.steps, min_ratio: 0.0 };
    let (image, ctx) = (clip.image_size(), clip.context_len());
    let feed = spawn_feed(link, job, b, image, ctx, start)?;

    // Rank 0 streams its metrics for the whole job; the stream ends when `tx` is dropped.
    let (tx, rx) = tokio::sync::mpsc::channel::<StepMetrics>(1024);
    let metrics_call = (rank == 0).then(|| {
        let mut client = link.client.clone();
        link.handle.spawn(async move { client.stream_metrics(tokio_stream::wrappers::ReceiverStream::new(rx)).await })
    });
    let mut last = f32::NAN;
    for step in start..job.steps {
        let batch = feed.recv().map_err(|_| anyhow!("the data feed stopped"))??;
        debug_assert_eq!(batch.step, step);
        let t0 = Instant::now();
        let lr = schedule.lr(job.lr, step) as f32;
        let lb = LocalBatch { pixels: &batch.pixels, ids: &batch.ids, b };
        let out = train_step(&mut clip, &mut opt, &mut loss, comm, &lb, lr)?;
        ensure!(out.loss.is_finite(), "step {}: the loss is {}", step + 1, out.loss);
        last = out.loss;
        let secs = t0.elapsed().as_secs_f64();
        if rank == 0 {
            let mut scale = [0.0f32];
            clip.backend.download_f32(&clip.logit_scale().value, &mut scale)?;
            let m = StepMetrics {
                session: Some(link.session.clone()),
                step: step + 1,
                loss: out.loss as f64,
                lr: lr as f64,
                grad_norm: out.grad_norm as f64,
                logit_scale: scale[0] as f64,
                images_per_s: g as f64 / secs.max(1e-9),
                step_seconds: secs,
            };
            link.handle.block_on(tx.send(m)).map_err(|_| anyhow!("the metrics stream closed"))?;
        }
        let done = step + 1;
        let due = job.checkpoint_every > 0 && done.is_multiple_of(job.checkpoint_every);
        if rank == 0 && (due || done == job.steps) {
            let dir = checkpoint_dir(&run_dir, done);
            let pos = RunPosition {
                step: done,
                rng: Vec::new(),
                data_epoch: done / job.steps_per_epoch,
                data_batch: done % job.steps_per_epoch,
            };
            save_checkpoint(&clip, &opt, &pos, &dir)?;
            // The metrics up to this step must be in before the coordinator records it.
            link.report(ResultKind::ResultCheckpoint, done, &dir.to_string_lossy(), "", out.loss as f64)?;
        }
    }
    drop(tx);
    if let Some(call) = metrics_call {
        link.handle
            .block_on(call)
            .map_err(|e| anyhow!("metrics stream task: {e}"))?
            .map_err(|s| anyhow!("metrics stream: {}", s.message()))?;
    }
    Ok(last)
}

/// Model, tokenizer and train state into `dir`, made visible by one rename.
fn save_checkpoint<B: Backend>(clip: &Clip<B>, opt: &AdamW<B>, pos: &RunPosition, dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = dir.with_file_name(format!(".{name}.staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    clip.save_pretrained(&staging, &[])?;
    ClipTokenizer::new()?.save_json(staging.join("tokenizer.json"))?;
    train_state::save(&staging.join("train_state.safetensors"), clip, opt, pos)?;
    if dir.exists() {
        // A checkpoint of the same step left by an aborted generation: replaced whole.
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::rename(&staging, dir).with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))
}
