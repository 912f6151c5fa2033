//! `coordinator bench ...`: benchmarks that print one JSON object (with `--json`).

use std::time::Instant;

use anyhow::{ensure, Result};
use clap::{Args, Subcommand};
use kernels::{Backend, Cpu};
use model::collectives::Single;
use model::optim::{AdamW, AdamWConfig};
use model::step::{self, InfoNceLoss, LocalBatch, Phase};
use model::Clip;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::sizes::ModelSizes;
use worker::Device;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// One CLS training step (forward, loss, backward, AdamW) of a small CLIP.
    TrainStep(TrainStepArgs),
    /// Fused kernels against their unfused baselines (`--device cuda|cpu`, `--op`, `--json`).
    Kernels(crate::gpu_cmds::BenchKernelsArgs),
    /// Images/s one rank's training feed delivers (`--source files|shards`, `--threads N`).
    Feed(crate::bench_feed::FeedArgs),
}

#[derive(Args)]
pub struct TrainStepArgs {
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    #[command(flatten)]
    pub size: ModelSizes,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long)]
    pub json: bool,
    /// Also time every CPU op (a table of ms per step, `ops_ms` in the JSON).
    #[arg(long)]
    pub profile: bool,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Kernels(a) => crate::gpu_cmds::run_bench_kernels(a),
        BenchCommand::Feed(a) => crate::bench_feed::run(a),
        BenchCommand::TrainStep(a) => match check_train_step(&a).map(|()| a.device)? {
            Device::Cpu => train_step(Cpu, &a),
            Device::Cuda => train_step(kernels::Cuda::new(0)?, &a),
        },
    }
}

/// The flags, before any device or model: one line naming the flag.
fn check_train_step(a: &TrainStepArgs) -> Result<()> {
    a.size.check()?;
    ensure!(a.batch > 0, "--batch must be at least 1");
    ensure!(a.steps > 0, "--steps must be at least 1 (the timed steps, after --warmup)");
    Ok(())
}

/// The training step's phases, timed on the host with a synchronisation at each boundary
/// (free on the synchronous CPU backend; on CUDA it costs a few launches' latency per phase).
fn train_step<B: Backend>(backend: B, a: &TrainStepArgs) -> Result<()> {
    let config = a.size.config();
    let z = &a.size;
    let b = a.batch;
    let clip = Clip::random(backend, config, b, 0)?;
    let mut loss_fn = InfoNceLoss::new(&clip, 1)?;
    let mut opt = AdamW::new(&clip, AdamWConfig::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let pixels: Vec<f32> = (0..b * 3 * z.image * z.image).map(|_| rng.random_range(-2.0..2.0)).collect();
    let ctx = clip.context_len();
    // Every text a full context: start, random tokens, end of text last.
    let ids: Vec<i32> = (0..b * ctx)
        .map(|i| match i % ctx {
            0 => 49406,
            k if k == ctx - 1 => 49407,
            _ => rng.random_range(0..49406),
        })
        .collect();
    let mut step_ms = Vec::new();
    let mut phase_ms = vec![Vec::new(); Phase::ALL.len()];
    let mut last_loss = f32::NAN;
    for s in 0..a.warmup + a.steps {
        kernels::profile::enable(a.profile && s >= a.warmup);
        let mut marks = Vec::with_capacity(Phase::ALL.len() + 1);
        let t0 = Instant::now();
        marks.push(t0);
        // The step every caller runs (a world of one), each phase timed to its device's end.
        let batch = LocalBatch { pixels: &pixels, ids: &ids, b };
        let be = &clip.backend;
        last_loss = step::train_step_observed(&clip, &mut opt, &mut loss_fn, &mut Single, &batch, 1e-4, &mut |_| {
            be.synchronize()?;
            marks.push(Instant::now());
            Ok(())
        })?
        .loss;
        if s >= a.warmup {
            step_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            for (i, w) in marks.windows(2).enumerate() {
                phase_ms[i].push((w[1] - w[0]).as_secs_f64() * 1e3);
            }
        }
    }
    kernels::profile::enable(false);
    let ops: serde_json::Map<String, serde_json::Value> = kernels::profile::take()
        .into_iter()
        .map(|(op, _, secs)| (op.to_string(), json!(secs * 1e3 / a.steps as f64)))
        .collect();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med = median(&mut step_ms);
    let min = step_ms[0];
    let phases: serde_json::Map<String, serde_json::Value> =
        Phase::ALL.iter().zip(phase_ms.iter_mut()).map(|(p, v)| (p.name().to_string(), json!(median(v)))).collect();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let out = json!({
        "device": clip.backend.name(),
        "image": z.image, "patch": z.patch, "width": z.width, "layers": z.layers, "heads": z.heads,
        "batch": b, "context": ctx, "steps": a.steps,
        "step_ms": med, "step_ms_min": min,
        "images_per_s": b as f64 / (med / 1e3),
        "phases_ms": phases,
        "threads": threads,
        "loss": last_loss,
    });
    let mut out = out;
    if a.profile {
        out["ops_ms"] = serde_json::Value::Object(ops.clone());
    }
    if a.json {
        println!("{out}");
    } else {
        println!(
            "train step: {:.1} ms median ({:.1} min), {:.1} images/s on {} threads; loss {:.4}",
            med,
            min,
            b as f64 / (med / 1e3),
            threads,
            last_loss
        );
        println!("phases (ms, median): {}", serde_json::Value::Object(phases));
        if a.profile {
            println!("ops (ms per step, largest first):");
            for (op, ms) in &ops {
                println!("  {op:<18} {:>9.1}", ms.as_f64().unwrap_or(0.0));
            }
        }
    }
    Ok(())
}
