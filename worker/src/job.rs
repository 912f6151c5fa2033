//! The CLS training job of one rank: data feed, the step loop, metrics and checkpoints.
//!
//! The coordinator owns the pair index: for each epoch it streams this rank's pairs in step
//! order (a permutation seeded by (seed, epoch), cut into global batches, each cut into
//! per-rank slices), so the data of a step does not depend on the world size. The data crate's
//! loader turns those pairs into batches ([`crate::feed`]), with the training augmentation on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use kernels::Backend;
use model::optim::AdamW;
use model::tokenizer::ClipTokenizer;
use model::train_state::{self, RunPosition};
use model::Clip;
use proto::tonic::transport::Channel;
use proto::v1::coordinator_client::CoordinatorClient;
use proto::v1::{Job, JobResult, ResultKind, Session, ShardEntry, ShardRequest, StepMetrics};

use model::collectives::Collectives;
use model::step::{train_step, InfoNceLoss, LocalBatch};

use crate::failure::Permanent;
use crate::feed::Feed;
use crate::{rpc, train_opts};

/// The folder of the checkpoint taken after `step` updates.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// What the job needs from the coordinator connection.
#[derive(Clone)]
pub struct Link {
    pub client: CoordinatorClient<Channel>,
    pub session: Session,
    pub handle: tokio::runtime::Handle,
}

impl Link {
    /// This rank's pairs of `epoch`, in step order, and the epoch's spares (the same on every
    /// rank).
    pub fn shard(&self, epoch: u64) -> Result<(Vec<ShardEntry>, Vec<ShardEntry>)> {
        self.shard_of(epoch, "")
    }

    /// This rank's share of another part of the job's items (`"valid"`: a fine-tuning job's
    /// validation images).
    pub fn shard_part(&self, epoch: u64, part: &str) -> Result<Vec<ShardEntry>> {
        Ok(self.shard_of(epoch, part)?.0)
    }

    fn shard_of(&self, epoch: u64, part: &str) -> Result<(Vec<ShardEntry>, Vec<ShardEntry>)> {
        let mut client = self.client.clone();
        let req = ShardRequest { session: Some(self.session.clone()), epoch, part: part.to_string() };
        let fetch = async move {
            let mut stream = client.get_shard(req).await?.into_inner();
            let (mut out, mut spares) = (Vec::new(), Vec::new());
            while let Some(chunk) = stream.message().await? {
                out.extend(chunk.entries);
                spares.extend(chunk.spares);
            }
            Ok::<_, proto::tonic::Status>((out, spares))
        };
        self.handle
            .block_on(rpc::with_deadline(rpc::SHARD_DEADLINE, fetch))
            .map_err(|s| anyhow!("fetching the shard of epoch {epoch}: {}", rpc::status_text(&s)))
    }

    /// Reports the job's failure; `permanent`: a restart cannot change it; `lost_peer`: the
    /// failure is that this rank lost that rank (see `failure::PeerLost`).
    pub fn report_failure(&self, message: &str, permanent: bool, lost_peer: Option<usize>) -> Result<()> {
        let mut client = self.client.clone();
        let req = JobResult {
            session: Some(self.session.clone()),
            kind: ResultKind::ResultFailed as i32,
            message: message.to_string(),
            final_loss: f64::NAN,
            permanent,
            lost_peer: lost_peer.map(|r| r as u32),
            ..JobResult::default()
        };
        self.handle
            .block_on(rpc::with_deadline(rpc::REPORT_DEADLINE, client.report_result(req)))
            .map_err(|s| anyhow!("reporting to the coordinator: {}", rpc::status_text(&s)))?;
        Ok(())
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
            ..JobResult::default()
        };
        self.handle
            .block_on(rpc::with_deadline(rpc::REPORT_DEADLINE, client.report_result(req)))
            .map_err(|s| anyhow!("reporting to the coordinator: {}", rpc::status_text(&s)))?;
        Ok(())
    }
}

/// Runs the job the coordinator handed out, by its kind; returns the last step's loss (0 for a
/// job without one).
pub fn run<B: Backend>(be: B, job: &Job, comm: &mut dyn Collectives<B>, link: &Link) -> Result<f32> {
    match job.kind.as_str() {
        "" | "cls-train" => train(be, job, comm, link),
        "finetune" => crate::finetune::finetune(be, job, comm, link),
        "embed" => crate::embed::run(be, job, comm.rank(), comm.world(), link).map(|()| 0.0),
        other => Err(anyhow!("unknown job kind '{other}' (cls-train, finetune, embed)")),
    }
}

/// Runs the contrastive training job on backend `be` with the collectives `comm` (NCCL on the
/// device, or the TCP ring through the host); returns the last step's loss.
pub fn train<B: Backend>(be: B, job: &Job, comm: &mut dyn Collectives<B>, link: &Link) -> Result<f32> {
    let (rank, world) = (comm.rank(), comm.world());
    let g = job.global_batch as usize;
    ensure!(g.is_multiple_of(world), "global batch {g} is not a multiple of the world size {world}");
    let b = g / world;
    let run_dir = PathBuf::from(&job.run_dir);
    // With --micro-batch the model holds one micro-batch's activations and the loss the whole
    // local batch's features (model::gradcache).
    let (mut clip, start) = train_opts::build_model(be, job, train_opts::model_capacity(job, b)?)?;
    train_opts::apply_mode(&mut clip, job)?;
    let mut opt = AdamW::new(&clip, train_opts::adamw_config(job)?)?;
    if start > 0 {
        let pos = train_state::load(&PathBuf::from(&job.resume_dir).join("train_state.safetensors"), &clip, &mut opt)?;
        ensure!(pos.step == start, "checkpoint {} holds step {}, expected {start}", job.resume_dir, pos.step);
    }
    let mut loss = InfoNceLoss::for_batch(&clip, b, world)?;
    let schedule = train_opts::build_schedule(job)?;
    let (image, ctx) = (clip.image_size(), clip.context_len());
    // The tokenizer frames every text in exactly CONTEXT_LEN ids; a model with a shorter context
    // would lose the end token, which its text pooling reads.
    ensure!(
        ctx == model::tokenizer::CONTEXT_LEN,
        "the model's text context is {ctx} tokens; the CLIP tokenizer needs {}",
        model::tokenizer::CONTEXT_LEN
    );
    let tok = ClipTokenizer::new()?;
    let mut feed = Feed::new(link.clone(), job, b, image, ctx, Arc::new(move |t: &str| tok.encode(t)))?;

    // Rank 0 streams its metrics for the whole job; the stream ends when `tx` is dropped.
    let (tx, rx) = tokio::sync::mpsc::channel::<StepMetrics>(1024);
    let metrics_call = (rank == 0).then(|| {
        let mut client = link.client.clone();
        link.handle.spawn(async move { client.stream_metrics(tokio_stream::wrappers::ReceiverStream::new(rx)).await })
    });
    let mut last = f32::NAN;
    let fault = crate::fault::Fault::from_env()?;
    for step in start..job.steps {
        crate::fault::check(&fault, rank, step + 1)?;
        let batch = feed.batch(step)?;
        let t0 = Instant::now();
        let lr = schedule.lr(job.lr, step) as f32;
        let lb = LocalBatch { pixels: &batch.pixels, ids: &batch.tokens, b };
        let out = train_step(&clip, &mut opt, &mut loss, comm, &lb, lr)?;
        feed.recycle(batch);
        if !out.loss.is_finite() {
            return Err(anyhow!("step {}: the loss is {}", step + 1, out.loss)
                .context(Permanent("the training diverged (a restart from the checkpoint repeats it)")));
        }
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
                rss_mb: crate::memory::peak_rss_mb(),
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
            .map_err(|s| anyhow!("metrics stream: {}", rpc::status_text(&s)))?;
    }
    Ok(last)
}

/// Model, tokenizer and train state into `dir`, made visible by one rename.
fn save_checkpoint<B: Backend>(clip: &Clip<B>, opt: &AdamW<B>, pos: &RunPosition, dir: &Path) -> Result<()> {
    write_checkpoint(dir, |staging| {
        clip.save_pretrained(staging, &[])?;
        ClipTokenizer::new()?.save_json(staging.join("tokenizer.json"))?;
        train_state::save(&staging.join("train_state.safetensors"), clip, opt, pos)
    })
}

/// Writes a checkpoint folder through `fill` into a staging folder beside `dir`, then makes it
/// visible by one rename; a failed write (a full disk) names the checkpoint and leaves no
/// staging folder behind.
pub(crate) fn write_checkpoint(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = dir.with_file_name(format!(".{name}.staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let write = || -> Result<()> {
        fill(&staging)?;
        if dir.exists() {
            // A checkpoint of the same step left by an aborted generation: replaced whole.
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&staging, dir)
            .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        e.context(format!("writing checkpoint {}", dir.display()))
    })
}
