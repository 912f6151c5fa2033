//! The fine-tuning job (FT): the image tower and a linear label head
//! ([`model::head::LabelHead`]) trained with binary cross-entropy on the dataset's labels.
//!
//! It runs on the same runtime as contrastive training: the coordinator streams each rank its
//! slice of every global batch (labels ride in the shard entries), the loader applies the same
//! augmentation, the parameter gradient is summed over the ranks in buckets during the
//! backward, and every rank applies the same update. The loss is the mean over the unmasked
//! (image, label) entries of the global batch (the count is summed over the ranks first), so
//! the gradient of a step does not depend on the world size.
//!
//! At each epoch's end every rank embeds its share of the validation images and writes the
//! head's logits as a part file; the coordinator computes the validation macro AUC from the
//! parts and keeps the best epoch's checkpoint as the run's result. Rank 0 checkpoints at every
//! epoch's end (and every `checkpoint_every` steps).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, ensure, Result};
use kernels::Backend;
use model::head::{HostAdamW, LabelHead, Targets};
use model::optim::AdamW;
use model::tokenizer::ClipTokenizer;
use model::train_state::{self, RunPosition};
use model::Clip;
use proto::v1::{Job, ResultKind, StepMetrics};

use model::collectives::Collectives;
use model::gradcache::vision_accumulate;
use model::step::GradientSum;

use crate::embed::{embed_entries, part_path, write_part};
use crate::failure::Permanent;
use crate::feed::Feed;
use crate::job::{checkpoint_dir, Link};

/// The head's optimiser state in a fine-tuning checkpoint.
pub const HEAD_STATE: &str = "head_state.safetensors";

/// The parameters that train in each mode: the image tower (and its projection, which the head
/// reads through), or only its adapters and layer norms (the published adapter setup).
fn trainable_patterns(mode: &str) -> Result<&'static [&'static str]> {
    match mode {
        "" | "full" => Ok(&["vision_model.*", "visual_projection.*"]),
        "adapters" => Ok(&[
            "vision_model.*.adapter.*",
            "vision_model.*layer_norm*",
            "vision_model.pre_layrnorm.*",
            "vision_model.post_layernorm.*",
        ]),
        other => Err(anyhow!("fine-tuning mode '{other}': expected full or adapters")),
    }
}

/// The label indices (into `data::LABELS`) of the head, in head order.
fn label_columns(job: &Job) -> Result<Vec<usize>> {
    ensure!(!job.labels.is_empty(), "the fine-tuning job names no labels");
    job.labels.iter().map(|l| data::labels::label_index(l).ok_or_else(|| anyhow!("unknown label '{l}'"))).collect()
}

/// Runs the job; returns the last step's loss.
pub fn finetune<B: Backend>(be: B, job: &Job, comm: &mut dyn Collectives<B>, link: &Link) -> Result<f32> {
    let (rank, world) = (comm.rank(), comm.world());
    let g = job.global_batch as usize;
    ensure!(g.is_multiple_of(world), "global batch {g} is not a multiple of the world size {world}");
    let b = g / world;
    let run_dir = PathBuf::from(&job.run_dir);
    let columns = label_columns(job)?;
    let n_labels = columns.len();
    let resume = (job.resume_step > 0).then(|| PathBuf::from(&job.resume_dir));
    // The model as the training job builds it (a checkpoint to resume, the init folder with the
    // job's config, adapters included, or a random initialisation).
    // With --micro-batch the model holds one micro-batch's activations; the step accumulates
    // over the local batch's micro-batches (model::gradcache::vision_accumulate).
    let (mut clip, start) = crate::train_opts::build_model(be, job, crate::train_opts::model_capacity(job, b)?)?;
    ensure!(
        job.mode != "adapters" || clip.config.adapter_dim.is_some(),
        "fine-tuning in adapters mode needs a model with adapters (its config has no adapter_dim)"
    );
    clip.train_only(trainable_patterns(&job.mode)?)?;
    let dim = clip.config.projection_dim;
    let cfg = crate::train_opts::adamw_config(job)?;
    let mut opt = AdamW::new(&clip, cfg)?;
    let (mut head, mut head_opt) = match &resume {
        Some(dir) => {
            let head = LabelHead::load(&dir.join(model::checkpoint::WEIGHTS))?
                .ok_or_else(|| anyhow!("checkpoint {} has no fine-tuning head", dir.display()))?;
            (head, load_head_state(&dir.join(HEAD_STATE), n_labels * dim + n_labels)?)
        }
        None => (LabelHead::random(n_labels, dim, job.seed), HostAdamW::new(n_labels * dim + n_labels)),
    };
    ensure!(
        head.labels == n_labels && head.dim == dim,
        "the checkpoint's head does not fit {n_labels} labels of {dim}"
    );
    if let Some(dir) = &resume {
        let pos = train_state::load(&dir.join("train_state.safetensors"), &clip, &mut opt)?;
        ensure!(pos.step == start, "checkpoint {} holds step {}, expected {start}", dir.display(), pos.step);
    }
    let pos_weight: Vec<f32> = if job.pos_weight.is_empty() { vec![1.0; n_labels] } else { job.pos_weight.clone() };
    ensure!(pos_weight.len() == n_labels, "{} positive weights for {n_labels} labels", pos_weight.len());
    let mut grad_sum = GradientSum::new(&clip)?;
    let schedule = crate::train_opts::build_schedule(job)?;
    let head_lr_ratio = if job.head_lr > 0.0 { job.head_lr / job.lr } else { 1.0 };
    let tok = ClipTokenizer::new()?;
    let tok: Arc<dyn data::report::Tokenize> = Arc::new(move |t: &str| tok.encode(t));
    let mut feed = Feed::new(link.clone(), job, b, clip.image_size(), clip.context_len(), tok.clone())?;

    let (tx, rx) = tokio::sync::mpsc::channel::<StepMetrics>(1024);
    let metrics_call = (rank == 0).then(|| {
        let mut client = link.client.clone();
        link.handle.spawn(async move { client.stream_metrics(tokio_stream::wrappers::ReceiverStream::new(rx)).await })
    });
    let mut last = f32::NAN;
    let (mut targets, mut mask) = (vec![0.0f32; b * n_labels], vec![0.0f32; b * n_labels]);
    let mut flat = vec![0.0f32; n_labels * dim + n_labels + 1];
    let fault = crate::fault::Fault::from_env()?;
    for step in start..job.steps {
        crate::fault::check(&fault, rank, step + 1)?;
        let batch = feed.batch(step)?;
        let t0 = Instant::now();
        let lr = schedule.lr(job.lr, step);
        // The head's targets: the job's label columns of the loader's 14.
        for i in 0..b {
            for (k, &c) in columns.iter().enumerate() {
                targets[i * n_labels + k] = batch.targets[i * data::NUM_LABELS + c];
                mask[i * n_labels + k] = batch.mask[i * data::NUM_LABELS + c];
            }
        }
        // The global count of unmasked entries first: every micro-batch's gradient is divided by
        // it, so that their sum is the global mean's gradient.
        let mut count = [mask.iter().sum::<f32>()];
        comm.all_reduce_host(&mut count)?;
        ensure!(count[0] > 0.0, "step {}: every label of the global batch is masked", step + 1);
        // The head's gradient and the loss, accumulated over the micro-batches, then summed over
        // the ranks in one call (one buffer for the run: weights, biases, then the loss).
        flat.fill(0.0);
        let mut loss_sum = 0.0f64;
        vision_accumulate(&clip, &mut grad_sum, comm, &batch.pixels, b, &mut |rows, embeds| {
            let cells = rows.start * n_labels..rows.end * n_labels;
            let t = Targets { targets: &targets[cells.clone()], mask: &mask[cells], pos_weight: &pos_weight };
            let hg = head.loss_backward(embeds, &t, count[0] as f64)?;
            for (acc, g) in flat.iter_mut().zip(hg.d_weight.iter().chain(&hg.d_bias)) {
                *acc += g;
            }
            loss_sum += hg.loss_sum;
            Ok(hg.d_embeds)
        })?;
        feed.recycle(batch);
        flat[n_labels * dim + n_labels] = loss_sum as f32;
        comm.all_reduce_host(&mut flat)?;
        let loss = flat[n_labels * dim + n_labels] / count[0];
        if !loss.is_finite() {
            return Err(anyhow!("step {}: the loss is {loss}", step + 1)
                .context(Permanent("the training diverged (a restart from the checkpoint repeats it)")));
        }
        let grad_norm = opt.step(&clip, lr as f32)?;
        head_opt.step += 1;
        let (dw, db) = flat[..n_labels * dim + n_labels].split_at(n_labels * dim);
        let (mw, mb) = head_opt.m.split_at_mut(n_labels * dim);
        let (vw, vb) = head_opt.v.split_at_mut(n_labels * dim);
        let head_lr = (lr * head_lr_ratio) as f32;
        HostAdamW::update(&mut head.weight, dw, mw, vw, head_opt.step, head_lr, &cfg, true);
        HostAdamW::update(&mut head.bias, db, mb, vb, head_opt.step, head_lr, &cfg, false);
        last = loss;
        let secs = t0.elapsed().as_secs_f64();
        if rank == 0 {
            let mut scale = [0.0f32];
            clip.backend.download_f32(&clip.logit_scale().value, &mut scale)?;
            let m = StepMetrics {
                session: Some(link.session.clone()),
                step: step + 1,
                loss: loss as f64,
                lr,
                grad_norm: grad_norm as f64,
                logit_scale: scale[0] as f64,
                images_per_s: g as f64 / secs.max(1e-9),
                step_seconds: secs,
                rss_mb: crate::memory::peak_rss_mb(),
            };
            link.handle.block_on(tx.send(m)).map_err(|_| anyhow!("the metrics stream closed"))?;
        }
        let done = step + 1;
        let epoch_end = done.is_multiple_of(job.steps_per_epoch) || done == job.steps;
        let due = job.checkpoint_every > 0 && done.is_multiple_of(job.checkpoint_every);
        if epoch_end {
            validate(&clip, &head, job, link, rank, clip.capacity(), done, tok.clone())?;
        }
        if rank == 0 && (due || epoch_end) {
            let dir = checkpoint_dir(&run_dir, done);
            let pos = RunPosition {
                step: done,
                rng: Vec::new(),
                data_epoch: done / job.steps_per_epoch,
                data_batch: done % job.steps_per_epoch,
            };
            save_checkpoint(&clip, &opt, &head, &head_opt, &pos, &dir)?;
            link.report(ResultKind::ResultCheckpoint, done, &dir.to_string_lossy(), "", loss as f64)?;
        }
    }
    drop(tx);
    if let Some(call) = metrics_call {
        link.handle
            .block_on(call)
            .map_err(|e| anyhow!("metrics stream task: {e}"))?
            .map_err(|s| anyhow!("metrics stream: {}", crate::rpc::status_text(&s)))?;
    }
    Ok(last)
}

/// Embeds this rank's share of the validation images and writes the head's logits as a part.
#[allow(clippy::too_many_arguments)]
fn validate<B: Backend>(
    clip: &Clip<B>,
    head: &LabelHead,
    job: &Job,
    link: &Link,
    rank: usize,
    b: usize,
    step: u64,
    tok: Arc<dyn data::report::Tokenize>,
) -> Result<()> {
    let entries = link.shard_part(0, "valid")?;
    // The validation images only (texts are not needed).
    let images: Vec<_> = entries
        .into_iter()
        .map(|mut e| {
            e.text.clear();
            e
        })
        .collect();
    let out = embed_entries(clip, Some(head), Path::new(&job.data_root), &images, b, tok)?;
    let dir = PathBuf::from(&job.run_dir).join("valid").join(format!("step-{step:06}"));
    let path = part_path(&dir, rank);
    write_part(&path, &out)?;
    link.report(ResultKind::ResultValidation, step, &path.to_string_lossy(), "", f64::NAN)
}

fn save_checkpoint<B: Backend>(
    clip: &Clip<B>,
    opt: &AdamW<B>,
    head: &LabelHead,
    head_opt: &HostAdamW,
    pos: &RunPosition,
    dir: &Path,
) -> Result<()> {
    crate::job::write_checkpoint(dir, |staging| {
        clip.save_pretrained_with(staging, &[], &head.tensors())?;
        ClipTokenizer::new()?.save_json(staging.join("tokenizer.json"))?;
        train_state::save(&staging.join("train_state.safetensors"), clip, opt, pos)?;
        save_head_state(&staging.join(HEAD_STATE), head_opt)
    })
}

fn save_head_state(path: &Path, s: &HostAdamW) -> Result<()> {
    use model::checkpoint::Column;
    let step = [s.step as i64];
    let t = vec![
        ("m".to_string(), Column::F32(vec![s.m.len()], &s.m)),
        ("v".to_string(), Column::F32(vec![s.v.len()], &s.v)),
        ("step".to_string(), Column::I64(vec![1], &step)),
    ];
    model::checkpoint::write_tables(path, &t, Default::default())
}

fn load_head_state(path: &Path, len: usize) -> Result<HostAdamW> {
    use model::checkpoint::{parse_safetensors, read_safetensors, to_f32, to_i64};
    let bytes = read_safetensors(path)?;
    let st = parse_safetensors(&bytes, path)?;
    let get = |n: &str| st.tensor(n).map_err(|e| anyhow!("{}: no tensor {n} ({e})", path.display()));
    let s = HostAdamW {
        m: to_f32(&get("m")?, "m", path)?,
        v: to_f32(&get("v")?, "v", path)?,
        step: to_i64(&get("step")?, "step", path)?.first().copied().unwrap_or(0) as u64,
    };
    ensure!(
        s.m.len() == len && s.v.len() == len,
        "{}: head moments of {} values, expected {len}",
        path.display(),
        s.m.len()
    );
    Ok(s)
}
