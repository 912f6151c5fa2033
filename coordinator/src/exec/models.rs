//! The models a plan's runs start from: a random initialisation written once as a Hugging Face
//! folder, the plan's init folder, or another run's result (a CLS run's last checkpoint, a
//! fine-tuning run's best epoch).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use model::{Clip, ClipConfig};

use crate::plan::{Plan, RandomModel, RunKind, Start};

use super::results::RunResult;
use super::PlanDirs;

/// The checkpoint folder a run starting from `start` loads, and a short key naming it (for
/// feature tables shared by the runs of one checkpoint).
pub fn checkpoint_of(plan: &Plan, dirs: &PlanDirs, start: &Start, seed: u64) -> Result<(PathBuf, String)> {
    match start {
        Start::Init => {
            let dir = plan.model.init.clone().ok_or_else(|| anyhow!("the plan has no [model] init folder"))?;
            Ok((dir, "init".into()))
        }
        Start::Random => {
            let key = format!("random-seed{seed}");
            let dir = dirs.models.join(&key);
            if !dir.join(model::checkpoint::WEIGHTS).exists() {
                write_random(plan, &dir, seed)?;
            }
            Ok((dir, key))
        }
        Start::Run(name) => {
            let done = RunResult::read(&dirs.run(name))?
                .ok_or_else(|| anyhow!("run {name} has not finished (no done.json in {})", dirs.run(name).display()))?;
            let dir = done.checkpoint.ok_or_else(|| anyhow!("run {name} left no checkpoint"))?;
            Ok((dir, dirs.slug(name)))
        }
    }
}

/// What kind of model a start is, for naming settings ("rand", "CLIP", "CLS", "FT").
pub fn origin_kind(plan: &Plan, start: &Start) -> Option<RunKind> {
    match start {
        Start::Run(name) => plan.run(name).map(|r| r.kind()),
        _ => None,
    }
}

/// A random CLIP (the plan's random sizes, or the init folder's shapes) as a Hugging Face folder.
fn write_random(plan: &Plan, dir: &Path, seed: u64) -> Result<()> {
    let config = match plan.model.random {
        RandomModel::Sizes(s) => s.config(),
        RandomModel::LikeInit => {
            let init = plan.model.init.as_ref().ok_or_else(|| anyhow!("random like init, but no init folder"))?;
            ClipConfig::from_file(&init.join(model::checkpoint::CONFIG))?
        }
    };
    config.validate().context("the plan's model sizes")?;
    let clip = Clip::random(kernels::Cpu, config, 1, seed)?;
    let tok = model::tokenizer::ClipTokenizer::new()?;
    let json = tok.inner().to_string(false).map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    clip.save_pretrained(dir, &[(model::checkpoint::TOKENIZER, json.as_bytes())])
        .with_context(|| format!("writing the random model {}", dir.display()))
}
