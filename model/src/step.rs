//! The one training step of every caller (the worker's jobs, `forward-backward`, `bench
//! train-step`, `gpu-check`, the tests): zero the gradients, upload, both towers' forward, the
//! InfoNCE loss over the gathered features, both towers' backward with the gradient summed
//! over the ranks, AdamW. Written once over [`Collectives`], so a single process (a world of
//! one, [`crate::collectives::Single`]) runs exactly what each rank of a distributed run runs.
//!
//! Each rank holds `b` pairs of a global batch of `world * b`. Only the text features are
//! all-gathered: each rank computes one similarity block, its images against all texts
//! (`offset = rank * b`), whose rows give the image-to-text terms of its images whole and whose
//! columns give its share of every text's text-to-image log-sum-exp; those column statistics
//! (a maximum and a sum of exponentials per text) are combined over the ranks by two small
//! all-reduces, so the per-rank losses sum to the global mean loss of both directions. The
//! backward writes the local images' gradient directly; the texts' gradient goes back to the
//! ranks that own them by reduce-scatter; the parameter gradients are summed over the ranks in
//! buckets while the backward runs. The gradient of a step is thus the single-process gradient
//! of the global batch, whatever the world size.

use anyhow::{ensure, Result};
use kernels::{Backend, DType, InfoNceDims, Tensor};

use crate::clip::Clip;
use crate::collectives::{Buckets, Collectives, Ready, ReduceOp, DEFAULT_BUCKET_VALUES};
use crate::gradcache::{self, FeatureCache};
use crate::optim::AdamW;

type T<B> = Tensor<B>;

/// The InfoNCE loss's buffers for a local batch capacity and a world size, and the gradient
/// buckets of the model's trainable set. Its capacity is the local batch, independent of the
/// model's: a local batch above the model's capacity runs in micro-batches of that capacity
/// ([`crate::gradcache`]), its features cached in buffers the loss owns.
pub struct InfoNceLoss<B: Backend> {
    capacity: usize,
    dim: usize,
    world: usize,
    loss: T<B>,
    /// The block's row log-sum-exps and positive logits (`capacity`).
    row_lse: T<B>,
    pos: T<B>,
    /// Per gathered text: this rank's column maximum and sum of exponentials, the maximum
    /// over the ranks, and the column log-sum-exp (`world * capacity` each).
    col_max: T<B>,
    col_sum: T<B>,
    global_max: T<B>,
    col_lse: T<B>,
    all_txt: T<B>,
    d_all_txt: T<B>,
    /// The parameter gradient's sum over the ranks.
    pub grad_sum: GradientSum,
    /// The local batch's features and their gradients, when the capacity exceeds the model's.
    pub(crate) features: Option<FeatureCache<B>>,
}

/// The local features a loss reads and where it writes their gradients (`[b, dim]` each, f32).
pub struct Features<'a, B: Backend> {
    pub img: &'a T<B>,
    pub txt: &'a T<B>,
    pub d_img: &'a T<B>,
    pub d_txt: &'a T<B>,
}

/// The parameter gradient's sum over the ranks, in buckets of the model's trainable set,
/// overlapped with the towers' backward.
pub struct GradientSum {
    buckets: Buckets,
    bucket_values: usize,
    /// The trainable set the buckets were made for.
    buckets_for: Vec<bool>,
}

impl GradientSum {
    /// Buckets of `CXRCLIP_GRAD_BUCKET_MB` (else [`DEFAULT_BUCKET_VALUES`]) for `model`'s
    /// trainable set.
    pub fn new<B: Backend>(model: &Clip<B>) -> Result<Self> {
        Ok(Self::with_bucket_values(model, bucket_values()?))
    }

    /// Buckets of at least `values` values (0: one per finished range).
    pub fn with_bucket_values<B: Backend>(model: &Clip<B>, values: usize) -> Self {
        Self { buckets: Buckets::new(model, values), bucket_values: values, buckets_for: model.trainable().to_vec() }
    }

    /// The towers' backward from the embeddings' gradients, with the trainable gradient summed
    /// over the ranks bucket by bucket as the backward finishes it.
    pub fn backward_and_sum<B: Backend>(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives<B>,
        b: usize,
        towers: Towers,
    ) -> Result<()> {
        self.backward_and_sum_observed(model, comm, b, towers, &mut |_| Ok(()))
    }

    /// [`GradientSum::backward_and_sum`], calling `after` as each tower's backward ends.
    pub fn backward_and_sum_observed<B: Backend>(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives<B>,
        b: usize,
        towers: Towers,
        after: Observer<'_>,
    ) -> Result<()> {
        let mut observed = Ok(());
        self.sum_during(model, comm, &mut |ready| {
            model.backward_vision_with(b, ready);
            observed = after(Phase::VisionBackward);
            if towers == Towers::Both {
                model.backward_text_with(b, ready);
                let text = after(Phase::TextBackward);
                if observed.is_ok() {
                    observed = text;
                }
            }
        })?;
        observed
    }

    /// Runs `backward` (which reports the towers' finished ranges to the closure it is given)
    /// with the trainable gradient summed over the ranks bucket by bucket. The logit scale's
    /// range is reported first: the loss wrote its gradient before any tower's backward.
    pub(crate) fn sum_during<B: Backend>(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives<B>,
        backward: &mut dyn FnMut(Ready<'_>),
    ) -> Result<()> {
        if self.buckets_for != model.trainable() {
            self.buckets = Buckets::new(model, self.bucket_values);
            self.buckets_for = model.trainable().to_vec();
        }
        let scale = model.grad_order().logit_scale.clone();
        comm.backward_and_sum(model, &mut self.buckets, &mut |ready| {
            // (Frozen in fine-tuning: the buckets then leave it out.)
            ready(scale.clone());
            backward(ready);
        })
    }
}

/// The parts of a step, in order, for an observer that times them (`bench train-step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    VisionForward,
    TextForward,
    Loss,
    VisionBackward,
    TextBackward,
    AdamW,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::VisionForward,
        Phase::TextForward,
        Phase::Loss,
        Phase::VisionBackward,
        Phase::TextBackward,
        Phase::AdamW,
    ];

    /// The name reports use (`bench train-step`'s `phases_ms`).
    pub fn name(self) -> &'static str {
        match self {
            Phase::VisionForward => "vision_fwd",
            Phase::TextForward => "text_fwd",
            Phase::Loss => "loss",
            Phase::VisionBackward => "vision_bwd",
            Phase::TextBackward => "text_bwd",
            Phase::AdamW => "adamw",
        }
    }
}

/// Called as each [`Phase`] of a step ends (it may synchronise the device to time it).
pub type Observer<'a> = &'a mut dyn FnMut(Phase) -> Result<()>;

/// Which towers a backward runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Towers {
    /// Both (contrastive training).
    Both,
    /// The vision tower alone, from [`Clip::image_embeds_grad`] (fine-tuning: the text tower
    /// and the logit scale are frozen and take no part in the step).
    Vision,
}

impl<B: Backend> InfoNceLoss<B> {
    /// Buffers for `model`'s batch capacity on each of `world` ranks.
    pub fn new(model: &Clip<B>, world: usize) -> Result<Self> {
        Self::for_batch(model, model.capacity(), world)
    }

    /// Buffers for a local batch of up to `capacity` pairs on each of `world` ranks. Above the
    /// model's capacity a step runs in micro-batches of the model's capacity (gradient caching,
    /// [`crate::gradcache`]); the loss then also holds the local features and their gradients.
    pub fn for_batch(model: &Clip<B>, capacity: usize, world: usize) -> Result<Self> {
        ensure!(world > 0, "a world of no ranks");
        ensure!(capacity > 0, "a local batch of no pairs");
        let be = &model.backend;
        let (cap, d) = (capacity, model.config.projection_dim);
        let g = world * cap * d;
        let cols = || be.alloc(world * cap, DType::F32);
        let features = if cap > model.capacity() { Some(FeatureCache::new(be, cap, d)?) } else { None };
        Ok(Self {
            capacity: cap,
            dim: d,
            world,
            loss: be.alloc(1, DType::F32)?,
            row_lse: be.alloc(cap, DType::F32)?,
            pos: be.alloc(cap, DType::F32)?,
            col_max: cols()?,
            col_sum: cols()?,
            global_max: cols()?,
            col_lse: cols()?,
            all_txt: be.alloc(g, DType::F32)?,
            d_all_txt: be.alloc(g, DType::F32)?,
            grad_sum: GradientSum::new(model)?,
            features,
        })
    }

    /// The largest local batch a step with this loss takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Gradient buckets of at least `values` values (0: one per finished range).
    pub fn with_bucket_values(mut self, model: &Clip<B>, values: usize) -> Self {
        self.grad_sum = GradientSum::with_bucket_values(model, values);
        self
    }

    /// The global mean loss of the last forward of both towers on `b` local pairs per rank;
    /// writes the embeddings' gradients (and the logit scale's, if it trains) so that the
    /// towers' backward can run.
    pub fn forward_backward(&mut self, model: &Clip<B>, comm: &mut dyn Collectives<B>, b: usize) -> Result<f32> {
        ensure!(b > 0 && b <= model.capacity(), "local batch {b} outside the model's 1..={}", model.capacity());
        let (img, txt) = (model.image_embeds(b), model.text_embeds(b));
        let (d_img, d_txt) = (model.image_embeds_grad(b), model.text_embeds_grad(b));
        self.forward_backward_features(model, comm, b, Features { img: &img, txt: &txt, d_img: &d_img, d_txt: &d_txt })
    }

    /// The global mean loss of `b` local feature pairs per rank (`f.img`, `f.txt`); writes
    /// their gradients into `f.d_img` and `f.d_txt` (and the logit scale's into the model's
    /// gradient, if it trains). `model` gives the backend and the logit scale.
    pub fn forward_backward_features(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives<B>,
        b: usize,
        f: Features<'_, B>,
    ) -> Result<f32> {
        ensure!(b > 0 && b <= self.capacity, "local batch {b} outside 1..={}", self.capacity);
        ensure!(
            comm.world() == self.world,
            "communicator of {} ranks for a loss built for {}",
            comm.world(),
            self.world
        );
        let be = &model.backend;
        let d = self.dim;
        let n = b * d;
        for (name, t) in [("img", f.img), ("txt", f.txt), ("d_img", f.d_img), ("d_txt", f.d_txt)] {
            ensure!(t.len() == n, "loss features {name}: {} values for {b} rows of {d}", t.len());
        }
        let global = b * self.world;
        let dims = InfoNceDims { local: b, global, dim: d, offset: comm.rank() * b };
        let (img, txt) = (f.img, f.txt);
        let all_txt = self.all_txt.slice(0, global * d);
        comm.all_gather(be, txt, &all_txt)?;
        let scale = &model.logit_scale().value;
        let (row_lse, pos) = (self.row_lse.slice(0, b), self.pos.slice(0, b));
        let col = |t: &T<B>| t.slice(0, global);
        let (col_max, col_sum, global_max, col_lse) =
            (col(&self.col_max), col(&self.col_sum), col(&self.global_max), col(&self.col_lse));
        be.infonce_block_fwd(&row_lse, &pos, &col_max, &col_sum, img, &all_txt, scale, dims);
        // The texts' log-sum-exps over all images: the maxima over the ranks, each rank's sums
        // brought to them, summed.
        be.copy(&global_max, &col_max);
        comm.all_reduce(be, &global_max, ReduceOp::Max)?;
        be.infonce_col_rescale(&col_sum, &col_max, &global_max);
        comm.all_reduce(be, &col_sum, ReduceOp::Sum)?;
        be.infonce_block_loss(&self.loss, &col_lse, &row_lse, &pos, &global_max, &col_sum, dims);
        let d_all_txt = self.d_all_txt.slice(0, global * d);
        be.fill(f.d_img, 0.0);
        be.fill(&d_all_txt, 0.0);
        let d_scale = model.logit_scale().train.then_some(&model.logit_scale().grad);
        be.infonce_block_bwd(f.d_img, &d_all_txt, d_scale, 1.0, img, &all_txt, scale, &row_lse, &col_lse, dims);
        // Every text's gradient comes from the columns of every rank's block.
        comm.reduce_scatter(be, &d_all_txt, f.d_txt)?;
        // Each rank's share sums to the global loss.
        let mut loss = [0.0f32];
        be.download_f32(&self.loss, &mut loss)?;
        comm.all_reduce_host(&mut loss)?;
        Ok(loss[0])
    }

    /// The towers' backward with the gradient summed over the ranks ([`GradientSum`]).
    pub fn backward_and_sum(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives<B>,
        b: usize,
        towers: Towers,
    ) -> Result<()> {
        self.grad_sum.backward_and_sum(model, comm, b, towers)
    }
}

/// Values per gradient bucket: `CXRCLIP_GRAD_BUCKET_MB` (MiB of f32, 0 = one bucket per
/// finished range), else [`DEFAULT_BUCKET_VALUES`]. A huge value gives one bucket summed after
/// the whole backward (no overlap).
fn bucket_values() -> Result<usize> {
    match std::env::var("CXRCLIP_GRAD_BUCKET_MB") {
        Err(_) => Ok(DEFAULT_BUCKET_VALUES),
        Ok(v) => {
            let mb: f64 =
                v.trim().parse().map_err(|_| anyhow::anyhow!("CXRCLIP_GRAD_BUCKET_MB={v:?} is not a number"))?;
            ensure!(mb.is_finite() && mb >= 0.0, "CXRCLIP_GRAD_BUCKET_MB={v:?} must be a size in MiB, 0 or more");
            Ok((mb * (1 << 20) as f64 / 4.0).min(usize::MAX as f64) as usize)
        }
    }
}

/// One step's inputs on this rank: `b` images (normalised, `[b, 3, s, s]`) and their token ids.
pub struct LocalBatch<'a> {
    pub pixels: &'a [f32],
    pub ids: &'a [i32],
    pub b: usize,
}

/// What a step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepOut {
    pub loss: f32,
    pub grad_norm: f32,
}

/// Forward, loss, backward and gradient sum: the model's `grads` then hold the global batch's
/// gradient; returns the global mean loss. A local batch above the model's capacity (up to the
/// loss's) runs in micro-batches of the model's capacity with the same loss and gradient
/// ([`crate::gradcache`]); one that fits runs in one pass.
pub fn forward_backward<B: Backend>(
    model: &Clip<B>,
    loss: &mut InfoNceLoss<B>,
    comm: &mut dyn Collectives<B>,
    batch: &LocalBatch,
) -> Result<f32> {
    forward_backward_observed(model, loss, comm, batch, &mut |_| Ok(()))
}

/// [`forward_backward`], calling `after` as each phase ends.
pub fn forward_backward_observed<B: Backend>(
    model: &Clip<B>,
    loss: &mut InfoNceLoss<B>,
    comm: &mut dyn Collectives<B>,
    batch: &LocalBatch,
    after: Observer<'_>,
) -> Result<f32> {
    let b = batch.b;
    if b > model.capacity() {
        // The local batch does not fit the model's activations: micro-batches of its capacity.
        return gradcache::forward_backward(model, loss, comm, batch, after);
    }
    model.zero_grads();
    model.upload_pixels(batch.pixels, b)?;
    model.forward_vision(b)?;
    after(Phase::VisionForward)?;
    model.forward_text(batch.ids, b)?;
    after(Phase::TextForward)?;
    let l = loss.forward_backward(model, comm, b)?;
    after(Phase::Loss)?;
    loss.grad_sum.backward_and_sum_observed(model, comm, b, Towers::Both, after)?;
    Ok(l)
}

/// A whole training step: [`forward_backward`], then AdamW at rate `lr` (every rank applies
/// the same update to the same parameters, so they stay equal without a broadcast).
pub fn train_step<B: Backend>(
    model: &Clip<B>,
    opt: &mut AdamW<B>,
    loss: &mut InfoNceLoss<B>,
    comm: &mut dyn Collectives<B>,
    batch: &LocalBatch,
    lr: f32,
) -> Result<StepOut> {
    train_step_observed(model, opt, loss, comm, batch, lr, &mut |_| Ok(()))
}

/// [`train_step`], calling `after` as each phase ends.
pub fn train_step_observed<B: Backend>(
    model: &Clip<B>,
    opt: &mut AdamW<B>,
    loss: &mut InfoNceLoss<B>,
    comm: &mut dyn Collectives<B>,
    batch: &LocalBatch,
    lr: f32,
    after: Observer<'_>,
) -> Result<StepOut> {
    let l = forward_backward_observed(model, loss, comm, batch, after)?;
    let grad_norm = opt.step(model, lr)?;
    after(Phase::AdamW)?;
    Ok(StepOut { loss: l, grad_norm })
}
