//! `coordinator estimate`: memory and time of one training step per GPU, for an operator
//! sizing a cluster run before booking it.
//!
//! Memory is the account of what the code allocates (`model::memory`: the parameters, their
//! gradients, AdamW's moments, one micro-batch's activations as `Clip::new` allocates them)
//! plus the contrastive loss's buffers as `model::step` allocates them (the local features and
//! their gradients kept across micro-batches, the gathered texts and their gradients, the
//! column statistics). Time is FLOPs at a stated fraction of the device's matrix rate, and the
//! collectives' bytes at stated bandwidths; every assumption is printed with the figures.

use anyhow::{ensure, Context, Result};
use clap::{Args, ValueEnum};
use model::memory::{self, Storage};
use model::ClipConfig;
use serde_json::json;

use crate::init_cmd::{preset_config, Preset};
use crate::sizes::ModelSizes;

#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// The model's shapes (`custom`: the size flags).
    #[arg(long, value_enum, default_value_t = Preset::VitB16)]
    pub preset: Preset,
    /// A Hugging Face CLIP folder instead of a preset (its config.json).
    #[arg(long, conflicts_with = "preset")]
    pub init: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub size: ModelSizes,
    /// GPUs (ranks) in the run.
    #[arg(long, default_value_t = 8)]
    pub gpus: usize,
    #[arg(long)]
    pub global_batch: usize,
    /// Pairs per rank embedded at a time (gradient caching); default: the whole local batch.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// The device's rates and memory.
    #[arg(long, value_enum, default_value_t = DeviceProfile::H200)]
    pub device: DeviceProfile,
    /// GPUs per node (the collectives cross the network beyond one node).
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: usize,
    /// The fraction of the matrix rate the step's products reach.
    #[arg(long, default_value_t = 0.4)]
    pub efficiency: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceProfile {
    H200,
    H100,
    A100,
    /// This kind of machine's CPU backend (to check the memory model against a measured run).
    Cpu,
}

/// What the estimate assumes of a device.
struct Rates {
    name: &'static str,
    memory_gb: f64,
    /// Dense matrix rate, TFLOP/s (bf16 on GPUs, f32 on the CPU).
    matrix_tflops: f64,
    /// NCCL bus bandwidth within a node, GB/s.
    intra_gbs: f64,
    /// Network bandwidth per GPU between nodes, GB/s.
    inter_gbs: f64,
    /// Memory the runtime holds besides the tensors (CUDA context, cuBLAS workspace).
    runtime_gb: f64,
    storage: Storage,
    /// FLOPs of the loss per L x G x D: the CUDA kernels recompute the block in their backward
    /// passes (12), the CPU's once (8).
    loss_flops_per_lgd: f64,
}

impl DeviceProfile {
    fn rates(self) -> Rates {
        let gpu = |name, memory_gb, matrix_tflops, intra_gbs| Rates {
            name,
            memory_gb,
            matrix_tflops,
            intra_gbs,
            inter_gbs: 50.0,
            runtime_gb: 0.6,
            storage: memory::CUDA,
            // The CUDA kernels: a one-pass forward, a two-pass backward (kernels/cuda/infonce.cu).
            loss_flops_per_lgd: 10.0,
        };
        match self {
            // HBM3e 141 GB; 989 dense bf16 TFLOP/s; NVLink 4 (900 GB/s both ways, NCCL's bus
            // bandwidth ~360 GB/s); 400 Gb/s per GPU between nodes.
            DeviceProfile::H200 => gpu("H200", 141.0, 989.0, 360.0),
            DeviceProfile::H100 => gpu("H100 SXM", 80.0, 989.0, 360.0),
            DeviceProfile::A100 => gpu("A100 SXM", 80.0, 312.0, 240.0),
            DeviceProfile::Cpu => Rates {
                name: "CPU backend (2 cores, f32)",
                memory_gb: 23.0,
                matrix_tflops: 0.157,
                intra_gbs: 2.0,
                inter_gbs: 1.0,
                runtime_gb: 0.0,
                storage: memory::CPU,
                loss_flops_per_lgd: 8.0,
            },
        }
    }
}

/// Per-GPU bytes of one step, by part.
struct Memory {
    weights: f64,
    optimizer: f64,
    gradients: f64,
    activations: f64,
    /// The local features and their gradients, kept across micro-batches.
    local_features: f64,
    /// The gathered texts, their gradients and the column statistics.
    gathered: f64,
    runtime: f64,
}

impl Memory {
    fn total(&self) -> f64 {
        self.weights
            + self.optimizer
            + self.gradients
            + self.activations
            + self.local_features
            + self.gathered
            + self.runtime
    }
}

fn memory_of(config: &ClipConfig, rates: &Rates, world: usize, local: usize, micro: usize) -> Memory {
    let p = memory::parameter_state_bytes(config);
    let d = config.projection_dim as f64;
    let g = (world * local) as f64;
    // Without micro-batches the model's own head buffers hold the features.
    let cached = if micro < local { 4.0 * local as f64 * d * 4.0 } else { 0.0 };
    Memory {
        weights: p.weights as f64,
        optimizer: p.optimizer as f64,
        gradients: p.gradients as f64,
        activations: memory::activation_bytes(config, micro, rates.storage) as f64,
        local_features: cached,
        gathered: 2.0 * g * d * 4.0 + 4.0 * g * 4.0,
        runtime: rates.runtime_gb * 1e9,
    }
}

/// Forward FLOPs of one pair through both towers (products and attention).
fn forward_flops_per_pair(c: &ClipConfig) -> f64 {
    let tower = |t: f64, w: f64, inner: f64, layers: f64| {
        layers * (2.0 * t * (4.0 * w * w + 2.0 * w * inner) + 4.0 * t * t * w)
    };
    let v = &c.vision_config;
    let np = v.num_patches() as f64;
    let (cv, pd) = (v.hidden_size as f64, c.projection_dim as f64);
    let patch = 2.0 * np * (3 * v.patch_size * v.patch_size) as f64 * cv;
    let vision = patch + tower(np + 1.0, cv, v.intermediate_size as f64, v.num_hidden_layers as f64) + 2.0 * cv * pd;
    let t = &c.text_config;
    let ct = t.hidden_size as f64;
    let text = tower(t.max_position_embeddings as f64, ct, t.intermediate_size as f64, t.num_hidden_layers as f64)
        + 2.0 * ct * pd;
    vision + text
}

/// Per-GPU seconds of one step, by part.
struct Time {
    towers: f64,
    loss: f64,
    features_comm: f64,
    gradient_comm: f64,
}

fn time_of(config: &ClipConfig, a: &EstimateArgs, rates: &Rates, local: usize, micro: usize) -> Time {
    let rate = rates.matrix_tflops * 1e12 * a.efficiency;
    // Forward, and a backward of twice its FLOPs; gradient caching embeds every pair twice.
    let passes = if micro < local { 4.0 } else { 3.0 };
    let towers = passes * forward_flops_per_pair(config) * local as f64 / rate;
    let (l, g, d) = (local as f64, (a.gpus * local) as f64, config.projection_dim as f64);
    let loss = rates.loss_flops_per_lgd * l * g * d / rate;
    let bw = if a.gpus > a.gpus_per_node { rates.inter_gbs } else { rates.intra_gbs } * 1e9;
    let share = (a.gpus as f64 - 1.0) / a.gpus as f64;
    // Texts gathered, their gradients reduce-scattered, two all-reduces of G column values.
    let features_comm = share * (2.0 * g * d * 4.0 + 2.0 * 2.0 * g * 4.0) / bw;
    let params = memory::parameters(config) as f64;
    let gradient_comm = 2.0 * share * params * 4.0 / bw;
    Time { towers, loss, features_comm, gradient_comm }
}

/// The largest global batch (a multiple of the GPUs) whose step fits in the device's memory.
fn largest_fitting(config: &ClipConfig, rates: &Rates, world: usize, micro: usize) -> usize {
    let fits = |local: usize| memory_of(config, rates, world, local, micro.min(local)).total() <= rates.memory_gb * 1e9;
    if !fits(1) {
        return 0;
    }
    let (mut lo, mut hi) = (1usize, 2usize);
    while fits(hi) && hi < 1 << 40 {
        (lo, hi) = (hi, hi * 2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo * world
}

pub fn run(a: EstimateArgs) -> Result<()> {
    ensure!(a.gpus > 0, "--gpus must be at least 1");
    ensure!(a.gpus_per_node > 0, "--gpus-per-node must be at least 1");
    ensure!(
        a.global_batch > 0 && a.global_batch.is_multiple_of(a.gpus),
        "--global-batch {} must be a positive multiple of the {} GPUs",
        a.global_batch,
        a.gpus
    );
    ensure!(a.efficiency > 0.0 && a.efficiency <= 1.0, "--efficiency must be in (0, 1]");
    let config = match &a.init {
        Some(dir) => ClipConfig::from_file(&dir.join(model::checkpoint::CONFIG))
            .with_context(|| format!("--init {}", dir.display()))?,
        None => preset_config(a.preset, &a.size),
    };
    config.validate().context("the model")?;
    let local = a.global_batch / a.gpus;
    let micro = a.micro_batch.unwrap_or(local).min(local);
    ensure!(micro > 0, "--micro-batch must be at least 1");
    let rates = a.device.rates();
    let m = memory_of(&config, &rates, a.gpus, local, micro);
    let t = time_of(&config, &a, &rates, local, micro);
    let fit = largest_fitting(&config, &rates, a.gpus, micro);
    let gb = |b: f64| b / 1e9;
    let step = t.towers + t.loss + t.features_comm + t.gradient_comm;
    let params = memory::parameters(&config);
    if a.json {
        println!(
            "{}",
            json!({
                "device": rates.name, "gpus": a.gpus, "global_batch": a.global_batch, "local_batch": local,
                "micro_batch": micro, "parameters": params,
                "memory_gb": {
                    "weights": gb(m.weights), "optimizer": gb(m.optimizer), "gradients": gb(m.gradients),
                    "activations": gb(m.activations), "local_features": gb(m.local_features),
                    "gathered_features": gb(m.gathered), "runtime": gb(m.runtime), "total": gb(m.total()),
                    "device": rates.memory_gb,
                },
                "seconds": {
                    "towers": t.towers, "loss": t.loss, "feature_collectives": t.features_comm,
                    "gradient_sum": t.gradient_comm, "step": step,
                },
                "largest_global_batch": fit,
                "assumptions": {
                    "matrix_tflops": rates.matrix_tflops, "efficiency": a.efficiency,
                    "intra_node_gbs": rates.intra_gbs, "inter_node_gbs": rates.inter_gbs,
                    "gpus_per_node": a.gpus_per_node, "loss_flops_per_lgd": rates.loss_flops_per_lgd,
                },
            })
        );
        return Ok(());
    }
    println!(
        "{} on {} x {} (global batch {}, {} per GPU, micro-batch {}); {:.1} M parameters",
        match &a.init {
            Some(d) => d.display().to_string(),
            None => format!("{:?}", a.preset).to_lowercase(),
        },
        a.gpus,
        rates.name,
        a.global_batch,
        local,
        micro,
        params as f64 / 1e6
    );
    println!("memory per GPU (GB):");
    for (what, bytes) in [
        ("weights (f32)", m.weights),
        ("AdamW moments (f32)", m.optimizer),
        ("gradients (f32)", m.gradients),
        ("one micro-batch's activations", m.activations),
        ("local features + gradients", m.local_features),
        ("gathered texts + gradients + column stats", m.gathered),
        ("runtime (context, workspace)", m.runtime),
    ] {
        println!("  {what:<44} {:>10.2}", gb(bytes));
    }
    println!("  {:<44} {:>10.2} of {:.0}", "total", gb(m.total()), rates.memory_gb);
    println!("  the loss's tiles live on chip (shared memory), not in device memory");
    println!("time per step (s):");
    for (what, s) in [
        ("towers (forward, backward, re-embedding)", t.towers),
        ("InfoNCE block", t.loss),
        ("feature gather / scatter", t.features_comm),
        ("gradient sum (overlaps the backward)", t.gradient_comm),
    ] {
        println!("  {what:<44} {s:>10.3}");
    }
    println!("  {:<44} {step:>10.3}  ({:.0} pairs/s)", "step, nothing overlapped", a.global_batch as f64 / step);
    println!("largest global batch that fits at this micro-batch: {fit}");
    println!(
        "assumptions: {:.0} TFLOP/s matrix rate at {:.0}% ({:.0} TFLOP/s), NCCL bus bandwidth {:.0} GB/s within a \
         node of {}, {:.0} GB/s per GPU between nodes, loss {} L*G*D FLOPs, {:.1} GB runtime",
        rates.matrix_tflops,
        a.efficiency * 100.0,
        rates.matrix_tflops * a.efficiency,
        rates.intra_gbs,
        a.gpus_per_node,
        rates.inter_gbs,
        rates.loss_flops_per_lgd,
        rates.runtime_gb
    );
    if m.total() > rates.memory_gb * 1e9 {
        anyhow::bail!(
            "{:.1} GB per GPU does not fit in {:.0} GB: use a smaller --micro-batch or global batch (at most {fit})",
            gb(m.total()),
            rates.memory_gb
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_features_part_grows_with_the_global_batch_and_nothing_else_does() {
        let c = preset_config(Preset::VitB16, &ModelSizes::default());
        let r = DeviceProfile::H200.rates();
        let small = memory_of(&c, &r, 8, 1024, 256);
        let big = memory_of(&c, &r, 8, 4096, 256);
        assert_eq!(small.activations, big.activations);
        assert_eq!(small.weights, big.weights);
        assert!((big.gathered / small.gathered - 4.0).abs() < 1e-9);
        assert!((big.local_features / small.local_features - 4.0).abs() < 1e-9);
        // ViT-B/16: 149.6 M parameters (OpenAI's: 149,620,737).
        let p = memory::parameters(&c);
        assert!((149_000_000..150_500_000).contains(&p), "{p}");
    }

    #[test]
    fn the_largest_fitting_batch_fits_and_the_next_does_not() {
        let c = preset_config(Preset::VitL14, &ModelSizes::default());
        let r = DeviceProfile::H200.rates();
        let fit = largest_fitting(&c, &r, 8, 256);
        assert!(fit > 0 && fit.is_multiple_of(8));
        assert!(memory_of(&c, &r, 8, fit / 8, 256).total() <= r.memory_gb * 1e9);
        assert!(memory_of(&c, &r, 8, fit / 8 + 1, 256).total() > r.memory_gb * 1e9);
    }
}
