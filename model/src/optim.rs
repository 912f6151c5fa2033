//! AdamW over the flat parameter buffer, gradient clipping by global norm, and the
//! logit-scale clamp.

use anyhow::Result;
use kernels::{AdamWStep, Backend, DType, Tensor};

use crate::clip::Clip;

/// The logit scale is clamped to ln(100) after every step, as CLIP does.
pub const LOGIT_SCALE_MAX: f32 = 4.605_170_2;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (as `torch.nn.utils.clip_grad_norm_`).
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    /// open_clip's defaults for ViT models.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.2, max_grad_norm: Some(1.0) }
    }
}

/// A run of adjacent parameters updated alike (one kernel launch each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub offset: usize,
    pub len: usize,
    pub decay: bool,
}

pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    /// First and second moments, in the parameter layout.
    pub m: Tensor<B>,
    pub v: Tensor<B>,
    /// Updates done so far.
    pub step: u64,
    runs: Vec<Run>,
    norm: Tensor<B>,
}

/// The trainable parameters grouped into maximal runs of the same decay.
pub fn trainable_runs<B: Backend>(model: &Clip<B>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (spec, &train) in model.layout.specs.iter().zip(model.trainable()) {
        if !train {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.decay == spec.decay && r.offset + r.len == spec.offset => r.len += spec.len,
            _ => runs.push(Run { offset: spec.offset, len: spec.len, decay: spec.decay }),
        }
    }
    runs
}

impl<B: Backend> AdamW<B> {
    pub fn new(model: &Clip<B>, config: AdamWConfig) -> Result<Self> {
        let be = &model.backend;
        Ok(Self {
            config,
            m: be.alloc(model.layout.total, DType::F32)?,
            v: be.alloc(model.layout.total, DType::F32)?,
            step: 0,
            runs: trainable_runs(model),
            norm: be.alloc(1, DType::F32)?,
        })
    }

    /// Call after changing which parameters train.
    pub fn refresh(&mut self, model: &Clip<B>) {
        self.runs = trainable_runs(model);
    }

    /// The global L2 norm of the trainable parameters' gradients.
    pub fn grad_norm(&self, model: &Clip<B>) -> Result<f32> {
        let be = &model.backend;
        be.fill(&self.norm, 0.0);
        for r in &self.runs {
            be.sum_squares(&self.norm, &model.grads.slice(r.offset, r.len));
        }
        let mut sq = [0.0f32];
        be.download_f32(&self.norm, &mut sq)?;
        Ok(sq[0].sqrt())
    }

    /// Clips the gradients (if configured), applies one AdamW update at rate `lr` and clamps
    /// the logit scale. Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &Clip<B>, lr: f32) -> Result<f32> {
        let be = &model.backend;
        let norm = self.grad_norm(model)?;
        if let Some(max) = self.config.max_grad_norm {
            // torch multiplies by min(1, max / (norm + 1e-6)) whatever the norm.
            let coef = (max / (norm + 1e-6)).min(1.0);
            for r in &self.runs {
                be.scale(&model.grads.slice(r.offset, r.len), coef);
            }
        }
        self.step += 1;
        let c = self.config;
        for r in &self.runs {
            let hp = AdamWStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: if r.decay { c.weight_decay } else { 0.0 },
                step: self.step,
            };
            let (o, n) = (r.offset, r.len);
            be.adamw(&model.params.slice(o, n), &model.grads.slice(o, n), &self.m.slice(o, n), &self.v.slice(o, n), hp);
        }
        if model.logit_scale().train {
            be.clamp_max(&model.logit_scale().value, LOGIT_SCALE_MAX);
        }
        Ok(norm)
    }
}
