//! A job's training choices made concrete: the model it starts from (with its adapters), which
//! parameters train, AdamW's settings, the learning-rate schedule, the augmentation and the
//! label policy. The coordinator has validated them; they are checked again here, since a job
//! is a message and a bad value would otherwise train something nobody asked for.

use std::path::PathBuf;

use crate::failure::Permanent;
use anyhow::{bail, ensure, Context, Result};
use data::loader::Augment;
use data::UncertainPolicy;
use kernels::Backend;
use model::freeze::ADAPTERS_AND_NORMS;
use model::optim::AdamWConfig;
use model::schedule::Schedule;
use model::{Clip, ClipConfig};
use proto::v1::{Job, TrainOptions};

/// The mode in which every parameter trains.
pub const MODE_FULL: &str = "full";
/// The mode in which only the adapters and the layer norms train (the logit scale, the
/// projections, the embeddings and the blocks' own weights stay as they start).
pub const MODE_ADAPTERS: &str = "adapters";
pub const SCHEDULE_COSINE: &str = "cosine";
pub const SCHEDULE_ONE_CYCLE: &str = "one-cycle";

/// The job's training options (absent only from a job of an older coordinator).
pub fn options(job: &Job) -> Result<&TrainOptions> {
    job.options.as_ref().context("the job carries no training options (a coordinator of an older revision?)")
}

/// The model's configuration, adapters included (`adapter_dim`).
pub fn model_config(job: &Job) -> Result<ClipConfig> {
    serde_json::from_str(&job.config_json).context("the job's model config")
}

/// The model the job starts from, with `capacity` pairs of activations, and the step it starts
/// at: the checkpoint of `resume_step` (whose adapters must be the job's), else the `init_dir`
/// weights under the job's config (adapters it lacks start as the identity), else a random
/// initialisation. Which parameters train is set by [`apply_mode`].
pub fn build_model<B: Backend>(be: B, job: &Job, capacity: usize) -> Result<(Clip<B>, u64)> {
    let config = model_config(job)?;
    if job.resume_step > 0 {
        let dir = PathBuf::from(&job.resume_dir);
        let (clip, _) =
            Clip::from_pretrained(be, &dir, capacity).with_context(|| format!("loading {}", dir.display()))?;
        ensure!(
            clip.config.adapter_dim == config.adapter_dim,
            "the checkpoint {} has adapters of width {}, the job asks for {}",
            dir.display(),
            width(clip.config.adapter_dim),
            width(config.adapter_dim)
        );
        return Ok((clip, job.resume_step));
    }
    if !job.init_dir.is_empty() {
        let dir = PathBuf::from(&job.init_dir);
        let (clip, _) = Clip::from_pretrained_with(be, &dir, config, capacity)
            .with_context(|| format!("loading {}", dir.display()))
            .context(Permanent("the --init model does not load"))?;
        return Ok((clip, 0));
    }
    Ok((Clip::random(be, config, capacity, job.seed)?, 0))
}

fn width(dim: Option<usize>) -> String {
    dim.map_or("none".to_string(), |d| d.to_string())
}

/// Pairs of activations the model holds for a local batch of `b`: the job's micro-batch
/// (`--micro-batch`) when it is smaller than `b` (the step then runs in micro-batches, see
/// `model::gradcache`), else `b` (one pass, as without the option).
pub fn model_capacity(job: &Job, b: usize) -> Result<usize> {
    match options(job)?.micro_batch {
        0 => Ok(b),
        m => Ok((m as usize).min(b)),
    }
}

/// Freezes what the job's mode leaves out. Call before building the optimiser, whose update
/// runs follow the trainable set.
pub fn apply_mode<B: Backend>(clip: &mut Clip<B>, job: &Job) -> Result<()> {
    match options(job)?.mode.as_str() {
        MODE_FULL => {
            clip.set_trainable(vec![true; clip.layout.specs.len()])?;
        }
        MODE_ADAPTERS => {
            ensure!(clip.config.adapter_dim.is_some(), "mode {MODE_ADAPTERS} needs a model with adapters");
            clip.train_only(ADAPTERS_AND_NORMS)?;
        }
        other => bail!("unknown training mode {other:?} ({MODE_FULL} or {MODE_ADAPTERS})"),
    }
    Ok(())
}

/// AdamW with the job's betas, epsilon and weight decay (gradients clipped to norm 1, as the
/// default).
pub fn adamw_config(job: &Job) -> Result<AdamWConfig> {
    let o = options(job)?;
    for (name, beta) in [("beta1", o.beta1), ("beta2", o.beta2)] {
        ensure!((0.0..1.0).contains(&beta), "AdamW {name} {beta} is outside [0, 1)");
    }
    ensure!(o.eps.is_finite() && o.eps > 0.0, "AdamW eps {} must be positive", o.eps);
    ensure!(
        job.weight_decay.is_finite() && job.weight_decay >= 0.0,
        "weight decay {} must be 0 or more",
        job.weight_decay
    );
    Ok(AdamWConfig {
        beta1: o.beta1 as f32,
        beta2: o.beta2 as f32,
        eps: o.eps as f32,
        weight_decay: job.weight_decay as f32,
        ..AdamWConfig::default()
    })
}

/// The learning-rate schedule over the job's steps.
pub fn build_schedule(job: &Job) -> Result<Schedule> {
    let o = options(job)?;
    match o.schedule.as_str() {
        SCHEDULE_COSINE => Ok(Schedule::WarmupCosine { warmup: job.warmup, total: job.steps, min_ratio: 0.0 }),
        SCHEDULE_ONE_CYCLE => {
            let f = o.warmup_fraction;
            ensure!((0.0..=1.0).contains(&f), "one-cycle warm-up fraction {f} is outside [0, 1]");
            ensure!(job.warmup == 0, "one-cycle takes a warm-up fraction, not {} warm-up steps", job.warmup);
            Ok(Schedule::one_cycle(job.steps, f))
        }
        other => bail!("unknown schedule {other:?} ({SCHEDULE_COSINE} or {SCHEDULE_ONE_CYCLE})"),
    }
}

/// The augmentation's strengths.
pub fn augmentation(job: &Job) -> Result<Augment> {
    let o = options(job)?;
    let a = Augment {
        rotate_deg: o.augment_rotate_deg as f32,
        scale: (o.augment_scale_lo as f32, o.augment_scale_hi as f32),
        translate: o.augment_translate as f32,
        shuffle_sentences: o.shuffle_sentences,
    };
    a.validate()?;
    Ok(a)
}

/// What uncertain and blank labels become.
pub fn uncertain_policy(job: &Job) -> Result<UncertainPolicy> {
    options(job)?.uncertain.parse().map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job with the defaults the coordinator sends.
    pub(crate) fn job() -> Job {
        Job {
            steps: 100,
            options: Some(TrainOptions {
                mode: MODE_FULL.into(),
                schedule: SCHEDULE_COSINE.into(),
                warmup_fraction: 0.0,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-6,
                augment_rotate_deg: 45.0,
                augment_scale_lo: 0.9,
                augment_scale_hi: 1.1,
                augment_translate: 0.15,
                shuffle_sentences: true,
                uncertain: "zeros".into(),
                loader_threads: 0,
                micro_batch: 0,
            }),
            weight_decay: 0.2,
            ..Job::default()
        }
    }

    fn with(f: impl FnOnce(&mut TrainOptions)) -> Job {
        let mut j = job();
        f(j.options.as_mut().unwrap());
        j
    }

    #[test]
    fn the_defaults_are_todays_training() {
        let j = job();
        // The coordinator's defaults give what the job used before these were options.
        assert_eq!(adamw_config(&j).unwrap(), AdamWConfig { weight_decay: 0.2, ..AdamWConfig::default() });
        assert_eq!(augmentation(&j).unwrap(), Augment::PAPER);
        assert_eq!(build_schedule(&j).unwrap(), Schedule::WarmupCosine { warmup: 0, total: 100, min_ratio: 0.0 });
        assert_eq!(uncertain_policy(&j).unwrap(), UncertainPolicy::Zeros);
        assert_eq!(model_capacity(&j, 64).unwrap(), 64);
    }

    #[test]
    fn a_micro_batch_below_the_local_batch_sizes_the_model() {
        let j = with(|o| o.micro_batch = 16);
        assert_eq!(model_capacity(&j, 128).unwrap(), 16);
        // At or above the local batch: one pass, as without the option.
        assert_eq!(model_capacity(&j, 16).unwrap(), 16);
        assert_eq!(model_capacity(&j, 8).unwrap(), 8);
    }

    #[test]
    fn options_reach_their_consumers() {
        let j = with(|o| {
            o.schedule = SCHEDULE_ONE_CYCLE.into();
            o.warmup_fraction = 0.05;
            o.beta1 = 0.8;
            o.beta2 = 0.95;
            o.eps = 1e-8;
            o.augment_rotate_deg = 10.0;
            o.augment_scale_lo = 0.8;
            o.augment_scale_hi = 1.25;
            o.augment_translate = 0.05;
            o.shuffle_sentences = false;
            o.uncertain = "ignore".into();
        });
        assert_eq!(build_schedule(&j).unwrap(), Schedule::one_cycle(100, 0.05));
        let c = adamw_config(&j).unwrap();
        assert_eq!((c.beta1, c.beta2, c.eps, c.weight_decay), (0.8, 0.95, 1e-8, 0.2));
        assert_eq!(
            augmentation(&j).unwrap(),
            Augment { rotate_deg: 10.0, scale: (0.8, 1.25), translate: 0.05, shuffle_sentences: false }
        );
        assert_eq!(uncertain_policy(&j).unwrap(), UncertainPolicy::Ignore);
    }

    #[test]
    fn bad_jobs_are_refused_with_the_reason() {
        type Check = fn(&Job) -> Result<()>;
        let err = |j: Job, f: Check| f(&j).expect_err("accepted").to_string();
        let cases: Vec<(Job, Check, &str)> = vec![
            (Job { options: None, ..job() }, |j| adamw_config(j).map(drop), "no training options"),
            (with(|o| o.beta1 = 1.0), |j| adamw_config(j).map(drop), "beta1"),
            (with(|o| o.beta2 = -0.1), |j| adamw_config(j).map(drop), "beta2"),
            (with(|o| o.eps = 0.0), |j| adamw_config(j).map(drop), "eps"),
            (with(|o| o.schedule = "linear".into()), |j| build_schedule(j).map(drop), "unknown schedule"),
            (
                with(|o| {
                    o.schedule = SCHEDULE_ONE_CYCLE.into();
                    o.warmup_fraction = 1.5;
                }),
                |j| build_schedule(j).map(drop),
                "fraction",
            ),
            (with(|o| o.augment_scale_hi = 0.5), |j| augmentation(j).map(drop), "zoom"),
            (with(|o| o.uncertain = "maybe".into()), |j| uncertain_policy(j).map(drop), "maybe"),
        ];
        for (j, f, word) in cases {
            let e = err(j, f);
            assert!(e.contains(word), "{e}");
        }
    }
}
