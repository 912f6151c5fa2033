//! `coordinator init`: a randomly initialised CLIP written as a Hugging Face folder (the
//! "random init" arm of the study, and a model to try the tools on).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kernels::Cpu;
use model::checkpoint::TOKENIZER;
use model::tokenizer::ClipTokenizer;
use model::{Clip, ClipConfig};

use crate::sizes::ModelSizes;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// OpenAI's ViT-B/32 shapes (224 px, patch 32, width 768 / 512).
    VitB32,
    /// OpenAI's ViT-B/16 shapes.
    VitB16,
    /// OpenAI's ViT-L/14 shapes (224 px, patch 14, vision 1024 x 24 layers, text 768 x 12,
    /// projection 768).
    VitL14,
    /// The sizes given by --image/--patch/--width/--layers/--heads in both towers.
    Custom,
}

#[derive(Args)]
pub struct InitArgs {
    /// Folder to write (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Preset::Custom)]
    pub preset: Preset,
    /// Sizes for `--preset custom`.
    #[command(flatten)]
    pub size: ModelSizes,
    /// quick_gelu (OpenAI CLIP) or gelu.
    #[arg(long, default_value = "quick_gelu")]
    pub act: String,
    /// Add bottleneck adapters of this width after every block.
    #[arg(long)]
    pub adapter_dim: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn config_for(args: &InitArgs) -> ClipConfig {
    let mut c = preset_config(args.preset, &args.size);
    if matches!(args.preset, Preset::Custom) {
        c.vision_config.hidden_act = args.act.clone();
        c.text_config.hidden_act = args.act.clone();
    }
    c.adapter_dim = args.adapter_dim;
    c
}

/// A preset's config (`custom`: `size` in both towers).
pub fn preset_config(preset: Preset, size: &ModelSizes) -> ClipConfig {
    // transformers' CLIPConfig defaults are OpenAI's ViT-B/32.
    let base = || -> ClipConfig { serde_json::from_str("{}").expect("defaults") };
    match preset {
        Preset::VitB32 => base(),
        Preset::VitB16 => {
            let mut c = base();
            c.vision_config.patch_size = 16;
            c
        }
        Preset::VitL14 => {
            let mut c = base();
            let v = &mut c.vision_config;
            (v.patch_size, v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads) =
                (14, 1024, 4096, 24, 16);
            let t = &mut c.text_config;
            (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) = (768, 3072, 12, 12);
            c.projection_dim = 768;
            c
        }
        Preset::Custom => size.config(),
    }
}

pub fn run(args: InitArgs) -> Result<()> {
    let config = config_for(&args);
    let clip = Clip::random(Cpu, config, 1, args.seed)?;
    let tokenizer = ClipTokenizer::new()?;
    let json = tokenizer.inner().to_string(false).map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    clip.save_pretrained(&args.out, &[(TOKENIZER, json.as_bytes())])
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote a random CLIP ({} parameters) to {}", clip.layout.total, args.out.display());
    Ok(())
}
