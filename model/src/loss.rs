//! The symmetric InfoNCE (CLIP) loss on top of the two towers.
//!
//! [`ContrastiveLoss::forward_backward`] is the world-of-one case: the gathered features are
//! the local ones, and the column gradients are added to the row gradients directly. The
//! distributed runtime uses the same kernels with all-gathered columns and reduce-scatters
//! the column gradients instead.

use anyhow::{ensure, Result};
use kernels::{Backend, DType, InfoNceDims, Tensor};

use crate::clip::Clip;

type T<B> = Tensor<B>;

pub struct ContrastiveLoss<B: Backend> {
    capacity: usize,
    dim: usize,
    loss: T<B>,
    lse_img: T<B>,
    lse_txt: T<B>,
    d_img: T<B>,
    d_txt: T<B>,
    d_all_img: T<B>,
    d_all_txt: T<B>,
}

impl<B: Backend> ContrastiveLoss<B> {
    pub fn new(model: &Clip<B>) -> Result<Self> {
        let be = &model.backend;
        let (cap, d) = (model.capacity(), model.config.projection_dim);
        Ok(Self {
            capacity: cap,
            dim: d,
            loss: be.alloc(1, DType::F32)?,
            lse_img: be.alloc(cap, DType::F32)?,
            lse_txt: be.alloc(cap, DType::F32)?,
            d_img: be.alloc(cap * d, DType::F32)?,
            d_txt: be.alloc(cap * d, DType::F32)?,
            d_all_img: be.alloc(cap * d, DType::F32)?,
            d_all_txt: be.alloc(cap * d, DType::F32)?,
        })
    }

    /// Loss of the last forward of both towers on `b` pairs; writes the gradients of the
    /// embeddings (and of the logit scale, if it trains) so that the towers' backward can run.
    pub fn forward_backward(&self, model: &Clip<B>, b: usize) -> Result<f32> {
        ensure!(b <= self.capacity, "batch {b} above the loss capacity {}", self.capacity);
        let be = &model.backend;
        let d = self.dim;
        let dims = InfoNceDims { local: b, global: b, dim: d, offset: 0 };
        let (img, txt) = (model.image_embeds(b), model.text_embeds(b));
        let scale = &model.logit_scale().value;
        let lse_img = self.lse_img.slice(0, b);
        let lse_txt = self.lse_txt.slice(0, b);
        be.infonce_fwd(&self.loss, &lse_img, &lse_txt, &img, &txt, &img, &txt, scale, dims);
        let n = b * d;
        let (d_img, d_txt) = (self.d_img.slice(0, n), self.d_txt.slice(0, n));
        let (d_all_img, d_all_txt) = (self.d_all_img.slice(0, n), self.d_all_txt.slice(0, n));
        for g in [&d_img, &d_txt, &d_all_img, &d_all_txt] {
            be.fill(g, 0.0);
        }
        let d_scale = model.logit_scale().train.then_some(&model.logit_scale().grad);
        be.infonce_bwd(
            &d_img, &d_txt, &d_all_img, &d_all_txt, d_scale, 1.0, &img, &txt, &img, &txt, scale, &lse_img, &lse_txt,
            dims,
        );
        // A local feature is both a row and a column: its gradient is the sum of both.
        be.add(&model.image_embeds_grad(b), &d_img, &d_all_img);
        be.add(&model.text_embeds_grad(b), &d_txt, &d_all_txt);
        let mut loss = [0.0f32];
        be.download_f32(&self.loss, &mut loss)?;
        Ok(loss[0])
    }
}

/// `logits_per_image[i, j] = exp(logit_scale) * img_i . txt_j` on the host, for reports and
/// the forward/backward command (training never materialises it).
pub fn logits_per_image(img: &[f32], txt: &[f32], b: usize, d: usize, logit_scale: f32) -> Vec<f32> {
    let s = logit_scale.exp();
    let mut out = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            let dot: f64 = (0..d).map(|k| img[i * d + k] as f64 * txt[j * d + k] as f64).sum();
            out[i * b + j] = (s as f64 * dot) as f32;
        }
    }
    out
}
