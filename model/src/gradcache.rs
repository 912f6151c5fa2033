//! Gradient caching: a local batch larger than the model's activations, trained exactly.
//!
//! A contrastive loss couples every pair of the global batch, so the batch cannot simply be cut
//! into micro-batches whose gradients are summed (their negatives would be the micro-batch's
//! only). It can be cut in two passes instead (Gao et al., "Scaling Deep Contrastive Learning
//! Batch Size under Memory Limited Setup", 2021):
//!
//! 1. embed the local batch a micro-batch at a time (the model's capacity), keeping only the
//!    features: they are copied into buffers of the loss's capacity ([`FeatureCache`]);
//! 2. the loss over all of them (gathered over the ranks as in the one-pass step) gives the loss
//!    and the gradient with respect to every local feature;
//! 3. embed each micro-batch again, this time keeping its activations, and back-propagate its
//!    rows of the cached feature gradients; the towers' backward adds into `grads`, so the
//!    micro-batches' parameter gradients accumulate. The last micro-batch's backward runs with
//!    the bucketed sum over the ranks, so the sum still overlaps a backward.
//!
//! The gradient is the one-pass gradient: every micro-batch sees the same pixels and ids in both
//! passes (the step keeps the local batch on the host and uploads each slice again; the
//! augmentation was drawn from seed, epoch and pair id when the batch was built), and the loss
//! and its feature gradients are computed once over the whole batch. Only the order of the
//! floating-point sums over micro-batches differs.
//!
//! Each tower runs its micro-batches on its own: all images, then all texts, in both passes
//! (the towers share no activation buffer). Pass 2 walks the micro-batches backwards, so the
//! last one's activations, still in the model after pass 1, are used without a recompute.
//!
//! Memory: one micro-batch's activations, the local features and their gradients (4 x b x D),
//! and the loss's gathered features (4 x world x b x D).
//!
//! Fine-tuning's loss is per sample, so it needs no cache: [`vision_accumulate`] runs forward,
//! loss and backward per micro-batch and accumulates (plain gradient accumulation, exact because
//! the loss is normalised by the global batch's count, known before the first micro-batch).

use std::ops::Range;

use anyhow::{ensure, Context, Result};
use kernels::{Backend, DType, Tensor};

use crate::clip::Clip;
use crate::collectives::Collectives;
use crate::step::{Features, GradientSum, InfoNceLoss, LocalBatch, Observer, Phase, Towers};

type T<B> = Tensor<B>;

/// The local batch's features and their gradients, `[capacity, dim]` each (f32).
pub struct FeatureCache<B: Backend> {
    img: T<B>,
    txt: T<B>,
    d_img: T<B>,
    d_txt: T<B>,
}

impl<B: Backend> Clone for FeatureCache<B> {
    fn clone(&self) -> Self {
        Self { img: self.img.clone(), txt: self.txt.clone(), d_img: self.d_img.clone(), d_txt: self.d_txt.clone() }
    }
}

impl<B: Backend> FeatureCache<B> {
    pub fn new(be: &B, capacity: usize, dim: usize) -> Result<Self> {
        let n = capacity * dim;
        Ok(Self {
            img: be.alloc(n, DType::F32)?,
            txt: be.alloc(n, DType::F32)?,
            d_img: be.alloc(n, DType::F32)?,
            d_txt: be.alloc(n, DType::F32)?,
        })
    }
}

/// The micro-batches of a local batch of `b` pairs: consecutive ranges of `m` pairs, the last
/// one shorter when `m` does not divide `b`.
pub fn micro_batches(b: usize, m: usize) -> Vec<Range<usize>> {
    assert!(m > 0, "micro-batches of no pairs");
    (0..b).step_by(m).map(|s| s..(s + m).min(b)).collect()
}

/// The contrastive step of [`crate::step::forward_backward_observed`] for a local batch above
/// the model's capacity, in micro-batches of that capacity (see the module note): the model's
/// `grads` then hold the global batch's gradient summed over the ranks; returns the global mean
/// loss. `after` is called once per phase, as in the one-pass step (a forward phase covers all
/// of its tower's micro-batches of pass 1, a backward phase all of pass 2's recomputes and
/// backwards of its tower).
pub(crate) fn forward_backward<B: Backend>(
    model: &Clip<B>,
    loss: &mut InfoNceLoss<B>,
    comm: &mut dyn Collectives<B>,
    batch: &LocalBatch,
    after: Observer<'_>,
) -> Result<f32> {
    let b = batch.b;
    ensure!(b <= loss.capacity(), "local batch {b} above the loss's capacity {}", loss.capacity());
    let cache = loss.features.clone().context("the loss holds no feature cache (its capacity is the model's)")?;
    let (px, t, d) = (3 * model.image_size() * model.image_size(), model.context_len(), model.config.projection_dim);
    ensure!(batch.pixels.len() == b * px, "pixels: {} values for {b} images of {px}", batch.pixels.len());
    ensure!(batch.ids.len() == b * t, "{} token ids for {b} texts of {t}", batch.ids.len());
    let be = &model.backend;
    let chunks = micro_batches(b, model.capacity());
    let last = chunks.len() - 1;
    let rows = |x: &T<B>, r: &Range<usize>| x.slice(r.start * d, r.len() * d);
    let embed_images = |r: &Range<usize>| -> Result<()> {
        model.upload_pixels(&batch.pixels[r.start * px..r.end * px], r.len())?;
        model.forward_vision(r.len())
    };
    let embed_texts = |r: &Range<usize>| model.forward_text(&batch.ids[r.start * t..r.end * t], r.len());

    model.zero_grads();
    // Pass 1: the features, tower by tower.
    for r in &chunks {
        embed_images(r)?;
        be.copy(&rows(&cache.img, r), &model.image_embeds(r.len()));
    }
    after(Phase::VisionForward)?;
    for r in &chunks {
        embed_texts(r)?;
        be.copy(&rows(&cache.txt, r), &model.text_embeds(r.len()));
    }
    after(Phase::TextForward)?;
    let n = b * d;
    let features = Features {
        img: &cache.img.slice(0, n),
        txt: &cache.txt.slice(0, n),
        d_img: &cache.d_img.slice(0, n),
        d_txt: &cache.d_txt.slice(0, n),
    };
    let l = loss.forward_backward_features(model, comm, b, features)?;
    after(Phase::Loss)?;

    // Pass 2: each micro-batch again with its activations, back-propagated from its rows of the
    // feature gradients; the first micro-batch (done last) reports the finished ranges to the
    // sum over the ranks. An error in a recompute still runs every backward, so that this rank
    // takes part in every bucket's sum like the others, and is returned after.
    let mut failed: Result<()> = Ok(());
    let mut observed: Result<()> = Ok(());
    loss.grad_sum.sum_during(model, comm, &mut |ready| {
        for (k, r) in chunks.iter().enumerate().rev() {
            if k != last && failed.is_ok() {
                failed = embed_images(r);
            }
            be.copy(&model.image_embeds_grad(r.len()), &rows(&cache.d_img, r));
            if k == 0 {
                model.backward_vision_with(r.len(), ready);
            } else {
                model.backward_vision(r.len());
            }
        }
        observed = after(Phase::VisionBackward);
        for (k, r) in chunks.iter().enumerate().rev() {
            if k != last && failed.is_ok() {
                failed = embed_texts(r);
            }
            be.copy(&model.text_embeds_grad(r.len()), &rows(&cache.d_txt, r));
            if k == 0 {
                model.backward_text_with(r.len(), ready);
            } else {
                model.backward_text(r.len());
            }
        }
        let text = after(Phase::TextBackward);
        if observed.is_ok() {
            observed = text;
        }
    })?;
    failed.context("re-embedding a micro-batch")?;
    observed?;
    Ok(l)
}

/// A loss computed per sample on the host: given a micro-batch's rows of the local batch and
/// their embeddings (`[rows, dim]`), the loss's gradient with respect to those embeddings.
pub type SampleLoss<'a> = &'a mut dyn FnMut(Range<usize>, &[f32]) -> Result<Vec<f32>>;

/// The vision tower's step for a loss computed per sample (fine-tuning's head): zeroes the
/// gradients, then for each micro-batch of the model's capacity (one when `b` fits) uploads its
/// images, embeds them, asks `loss(rows, embeddings)` for the gradient of the loss with respect
/// to those embeddings (host `[rows, dim]`), and back-propagates it, adding into `grads`; the last
/// micro-batch's backward runs with the bucketed sum over the ranks. `loss` must normalise by the
/// global batch (not the micro-batch) for the sum to be the batch's gradient.
pub fn vision_accumulate<B: Backend>(
    model: &Clip<B>,
    grad_sum: &mut GradientSum,
    comm: &mut dyn Collectives<B>,
    pixels: &[f32],
    b: usize,
    loss: SampleLoss<'_>,
) -> Result<()> {
    let px = 3 * model.image_size() * model.image_size();
    ensure!(b > 0, "a batch of no images");
    ensure!(pixels.len() == b * px, "pixels: {} values for {b} images of {px}", pixels.len());
    let d = model.config.projection_dim;
    let chunks = micro_batches(b, model.capacity());
    let last = chunks.len() - 1;
    let mut embeds = vec![0.0f32; model.capacity().min(b) * d];
    model.zero_grads();
    for (k, r) in chunks.iter().enumerate() {
        let m = r.len();
        model.upload_pixels(&pixels[r.start * px..r.end * px], m)?;
        model.forward_vision(m)?;
        let e = &mut embeds[..m * d];
        model.backend.download_f32(&model.image_embeds(m), e)?;
        let d_embeds = loss(r.clone(), e)?;
        ensure!(d_embeds.len() == m * d, "the loss gave {} gradient values for {m} rows of {d}", d_embeds.len());
        model.backend.upload_f32(&model.image_embeds_grad(m), &d_embeds)?;
        if k == last {
            grad_sum.backward_and_sum(model, comm, m, Towers::Vision)?;
        } else {
            model.backward_vision(m);
        }
    }
    Ok(())
}
