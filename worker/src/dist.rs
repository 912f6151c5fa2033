//! The exact data-parallel CLS step.
//!
//! Each rank holds `b` pairs of a global batch of `world * b`. The image and text features are
//! all-gathered; each rank computes the InfoNCE terms of its own rows against all columns with
//! the fused kernels (`offset = rank * b`), so the per-rank losses sum to the global mean loss;
//! the column gradients go back to the ranks that own those features by reduce-scatter and are
//! added to the row gradients; the parameter gradients are summed over the ranks in buckets
//! while the backward runs ([`crate::grad_sum`]). The gradient of a step is thus the
//! single-process gradient of the global batch, whatever the world size.

use anyhow::{ensure, Result};
use kernels::{Backend, DType, InfoNceDims, Tensor};
use model::optim::AdamW;
use model::Clip;

use crate::comm::Collectives;
use crate::grad_sum::{backward_host_overlap, Buckets, DeviceSum, DEFAULT_BUCKET_VALUES};

type T<B> = Tensor<B>;

/// Buffers of the distributed loss for a local batch capacity.
pub struct DistLoss<B: Backend> {
    capacity: usize,
    dim: usize,
    world: usize,
    loss: T<B>,
    lse_img: T<B>,
    lse_txt: T<B>,
    all_img: T<B>,
    all_txt: T<B>,
    d_img: T<B>,
    d_txt: T<B>,
    d_all_img: T<B>,
    d_all_txt: T<B>,
    /// The reduce-scattered column gradient of this rank's rows.
    d_cols: T<B>,
    host_local: Vec<f32>,
    host_all: Vec<f32>,
    /// The gradient buckets, for the trainable set they were made for.
    buckets: Buckets,
    bucket_values: usize,
    buckets_for: Vec<bool>,
    /// Host buffers of the buckets, kept from step to step.
    spare: Vec<Vec<f32>>,
    /// Sums the buckets on the device instead of through the host (NCCL on a GPU).
    device_sum: Option<Box<dyn DeviceSum<B>>>,
}

impl<B: Backend> DistLoss<B> {
    pub fn new(model: &Clip<B>, world: usize) -> Result<Self> {
        let be = &model.backend;
        let (cap, d) = (model.capacity(), model.config.projection_dim);
        let g = world * cap * d;
        let values = bucket_values()?;
        Ok(Self {
            capacity: cap,
            dim: d,
            world,
            loss: be.alloc(1, DType::F32)?,
            lse_img: be.alloc(cap, DType::F32)?,
            lse_txt: be.alloc(cap, DType::F32)?,
            all_img: be.alloc(g, DType::F32)?,
            all_txt: be.alloc(g, DType::F32)?,
            d_img: be.alloc(cap * d, DType::F32)?,
            d_txt: be.alloc(cap * d, DType::F32)?,
            d_all_img: be.alloc(g, DType::F32)?,
            d_all_txt: be.alloc(g, DType::F32)?,
            d_cols: be.alloc(cap * d, DType::F32)?,
            host_local: Vec::new(),
            host_all: Vec::new(),
            buckets: Buckets::new(model, values),
            bucket_values: values,
            buckets_for: model.trainable().to_vec(),
            spare: Vec::new(),
            device_sum: None,
        })
    }

    /// Gradient buckets of at least `values` values (0: one per finished range).
    pub fn with_bucket_values(mut self, model: &Clip<B>, values: usize) -> Self {
        self.bucket_values = values;
        self.buckets = Buckets::new(model, values);
        self
    }

    /// Sums the gradient buckets with `sum` (on the device) instead of through the host.
    pub fn with_device_sum(mut self, sum: Box<dyn DeviceSum<B>>) -> Self {
        self.device_sum = Some(sum);
        self
    }

    /// All-gathers one tower's local features into `all`.
    fn gather(&mut self, be: &B, comm: &mut dyn Collectives, local: &T<B>, all: &T<B>, n: usize) -> Result<()> {
        self.host_local.resize(n, 0.0);
        self.host_all.resize(n * self.world, 0.0);
        be.download_f32(local, &mut self.host_local)?;
        comm.all_gather(&self.host_local, &mut self.host_all)?;
        be.upload_f32(all, &self.host_all)
    }

    /// Reduce-scatters one tower's column gradients and adds this rank's share to its row
    /// gradients, writing the embeddings' gradient.
    fn scatter_into(
        &mut self,
        be: &B,
        comm: &mut dyn Collectives,
        d_all: &T<B>,
        d_rows: &T<B>,
        out: &T<B>,
        n: usize,
    ) -> Result<()> {
        self.host_all.resize(n * self.world, 0.0);
        self.host_local.resize(n, 0.0);
        be.download_f32(d_all, &mut self.host_all)?;
        comm.reduce_scatter(&self.host_all, &mut self.host_local)?;
        let cols = self.d_cols.slice(0, n);
        be.upload_f32(&cols, &self.host_local)?;
        be.add(out, d_rows, &cols);
        Ok(())
    }

    /// The global mean loss of the last forward of both towers on `b` local pairs per rank;
    /// writes the embeddings' gradients so that the towers' backward can run.
    pub fn forward_backward(&mut self, model: &Clip<B>, comm: &mut dyn Collectives, b: usize) -> Result<f32> {
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
        let global = b * self.world;
        let dims = InfoNceDims { local: b, global, dim: d, offset: comm.rank() * b };
        let (img, txt) = (model.image_embeds(b), model.text_embeds(b));
        let (all_img, all_txt) = (self.all_img.slice(0, global * d), self.all_txt.slice(0, global * d));
        self.gather(be, comm, &img, &all_img, n)?;
        self.gather(be, comm, &txt, &all_txt, n)?;
        let scale = &model.logit_scale().value;
        let (lse_img, lse_txt) = (self.lse_img.slice(0, b), self.lse_txt.slice(0, b));
        be.infonce_fwd(&self.loss, &lse_img, &lse_txt, &img, &txt, &all_img, &all_txt, scale, dims);
        let (d_img, d_txt) = (self.d_img.slice(0, n), self.d_txt.slice(0, n));
        let (d_all_img, d_all_txt) = (self.d_all_img.slice(0, global * d), self.d_all_txt.slice(0, global * d));
        for g in [&d_img, &d_txt, &d_all_img, &d_all_txt] {
            be.fill(g, 0.0);
        }
        let d_scale = model.logit_scale().train.then_some(&model.logit_scale().grad);
        be.infonce_bwd(
            &d_img, &d_txt, &d_all_img, &d_all_txt, d_scale, 1.0, &img, &txt, &all_img, &all_txt, scale, &lse_img,
            &lse_txt, dims,
        );
        self.scatter_into(be, comm, &d_all_img, &d_img, &model.image_embeds_grad(b), n)?;
        self.scatter_into(be, comm, &d_all_txt, &d_txt, &model.text_embeds_grad(b), n)?;
        // Each rank's share sums to the global loss.
        let mut loss = [0.0f32];
        be.download_f32(&self.loss, &mut loss)?;
        comm.all_reduce(&mut loss)?;
        Ok(loss[0])
    }

    /// Both towers' backward from the embeddings' gradients, with the trainable gradient summed
    /// over the ranks bucket by bucket as the backward finishes it.
    pub fn backward_and_sum(&mut self, model: &Clip<B>, comm: &mut dyn Collectives, b: usize) -> Result<()> {
        self.backward_towers_and_sum(model, comm, b, true)
    }

    /// [`DistLoss::backward_and_sum`] of the vision tower alone, from
    /// [`Clip::image_embeds_grad`] (fine-tuning: the text tower and the logit scale are frozen
    /// and take no part in the step).
    pub fn backward_vision_and_sum(&mut self, model: &Clip<B>, comm: &mut dyn Collectives, b: usize) -> Result<()> {
        self.backward_towers_and_sum(model, comm, b, false)
    }

    fn backward_towers_and_sum(
        &mut self,
        model: &Clip<B>,
        comm: &mut dyn Collectives,
        b: usize,
        text: bool,
    ) -> Result<()> {
        if comm.world() == 1 {
            model.backward_vision(b);
            if text {
                model.backward_text(b);
            }
            return Ok(());
        }
        if self.buckets_for != model.trainable() {
            self.buckets = Buckets::new(model, self.bucket_values);
            self.buckets_for = model.trainable().to_vec();
        }
        // The loss wrote the logit scale's gradient: it is final before the towers start.
        let scale = model.grad_order().logit_scale.clone();
        let Some(dev) = self.device_sum.as_mut() else {
            return backward_host_overlap(model, comm, &mut self.buckets, &mut self.spare, |ready| {
                ready(scale);
                model.backward_vision_with(b, ready);
                if text {
                    model.backward_text_with(b, ready);
                }
            });
        };
        let be = &model.backend;
        let mut failed: Option<anyhow::Error> = None;
        let mut enqueue = |ranges: Vec<std::ops::Range<usize>>| {
            if failed.is_none() {
                failed = dev.bucket(be, &model.grads, &ranges).err();
            }
        };
        let buckets = &mut self.buckets;
        let mut ready = |r| {
            if let Some(bucket) = buckets.push(r) {
                enqueue(bucket);
            }
        };
        ready(scale);
        model.backward_vision_with(b, &mut ready);
        if text {
            model.backward_text_with(b, &mut ready);
        }
        if let Some(bucket) = buckets.flush() {
            enqueue(bucket);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        dev.finish(be)
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

/// Forward, distributed loss, backward and gradient sum: the model's `grads` then hold the
/// global batch's gradient.
pub fn forward_backward<B: Backend>(
    model: &mut Clip<B>,
    loss: &mut DistLoss<B>,
    comm: &mut dyn Collectives,
    batch: &LocalBatch,
) -> Result<f32> {
    let b = batch.b;
    model.zero_grads();
    model.upload_pixels(batch.pixels, b)?;
    model.forward_vision(b)?;
    model.forward_text(batch.ids, b)?;
    let l = loss.forward_backward(model, comm, b)?;
    loss.backward_and_sum(model, comm, b)?;
    Ok(l)
}

/// A whole training step: [`forward_backward`], then AdamW at rate `lr` (every rank applies
/// the same update to the same parameters, so they stay equal without a broadcast).
pub fn train_step<B: Backend>(
    model: &mut Clip<B>,
    opt: &mut AdamW<B>,
    loss: &mut DistLoss<B>,
    comm: &mut dyn Collectives,
    batch: &LocalBatch,
    lr: f32,
) -> Result<StepOut> {
    let l = forward_backward(model, loss, comm, batch)?;
    let grad_norm = opt.step(model, lr)?;
    Ok(StepOut { loss: l, grad_norm })
}
