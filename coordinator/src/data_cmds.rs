//! Data tools: `synth` (the synthetic radiograph generator), `data-stats` (read a dataset root
//! and summarise it as JSON) and `prepare` (pack images into shards).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use data::synth::{generate, Layout, SynthConfig};

/// `coordinator synth --out DIR --studies N --layout mimic|chexpert|rsna --seed S [--size 256]`
#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Folder to write the tree into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of studies (MIMIC, CheXpert) or patients (RSNA).
    #[arg(long)]
    pub studies: usize,
    /// Which dataset's layout to write.
    #[arg(long, value_parser = parse_layout)]
    pub layout: Layout,
    /// Seed: the same seed writes the same tree.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (the smaller side; some sites write taller images).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// How strongly findings show (1 = as designed, lower = subtler).
    #[arg(long, default_value_t = 1.0)]
    pub visibility: f32,
    /// Multiplies every finding's prevalence.
    #[arg(long, default_value_t = 1.0)]
    pub prevalence: f32,
}

fn parse_layout(s: &str) -> std::result::Result<Layout, String> {
    s.parse()
}

pub fn run_synth(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        studies: a.studies,
        layout: a.layout,
        seed: a.seed,
        size: a.size,
        visibility: a.visibility,
        prevalence: a.prevalence,
    };
    let s = generate(&a.out, &cfg)?;
    eprintln!(
        "synth: {} studies, {} images, {} patients in {:.2} s on {} threads ({:.0} images/s, {:.0} images/s/core) -> {}",
        s.studies,
        s.images,
        s.patients,
        s.seconds,
        s.threads,
        s.images as f64 / s.seconds.max(1e-9),
        s.images_per_s_per_core(),
        a.out.display()
    );
    Ok(())
}
