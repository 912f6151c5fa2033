//! `coordinator gpu-check` and `coordinator bench kernels`: the CUDA backend's checks and
//! kernel benchmarks in the release binary, so that one carried binary runs them on a GPU
//! machine without Rust (see `scripts/gpu-check.sh`).
//!
//! **Not yet run on a GPU** (written in a session without one).

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use kernels::cuda::{bench, check, libs, nvtx};
use kernels::{Backend, Cpu, Cuda};
use model::collectives::Single;
use model::optim::{AdamW, AdamWConfig};
use model::step::{self, InfoNceLoss, LocalBatch};
use model::{Clip, ClipConfig};
use serde_json::json;
use worker::Device;

#[derive(Args)]
pub struct GpuCheckArgs {
    /// Small sizes only (about a minute less).
    #[arg(long)]
    pub quick: bool,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// One op family only (elementwise, linear, layernorm, l2norm, activation, attention,
    /// embed, infonce, bce, adamw), without the training step.
    #[arg(long)]
    pub op: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InfonceVariantArg {
    Fused,
    Baseline,
    Both,
}

#[derive(Args)]
pub struct BenchKernelsArgs {
    #[arg(long, value_enum, default_value_t = Device::Cuda)]
    pub device: Device,
    /// One op family (elementwise, linear, layernorm, l2norm, activation, attention, embed,
    /// infonce, bce, adamw), or `ceilings` (the CUDA matrix rate and copy bandwidth alone).
    #[arg(long)]
    pub op: Option<String>,
    /// InfoNCE: the local batch (rows of this rank), with `--global` and `--dim`.
    #[arg(long, requires_all = ["global", "dim"])]
    pub local: Option<usize>,
    /// InfoNCE: the global batch (columns: every rank's texts), with `--local` and `--dim`.
    #[arg(long, requires_all = ["local", "dim"])]
    pub global: Option<usize>,
    /// InfoNCE: the feature width, with `--local` and `--global`.
    #[arg(long, requires_all = ["local", "global"])]
    pub dim: Option<usize>,
    /// InfoNCE: the fused op, OpenCLIP's baseline (the logits materialised), or both.
    #[arg(long, value_enum, default_value_t = InfonceVariantArg::Both)]
    pub variant: InfonceVariantArg,
    /// Smaller sizes (a quick look, not the figures).
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

fn result_json(r: &check::CheckResult) -> serde_json::Value {
    let num = |x: f64| if x.is_finite() { json!(x) } else { json!(null) };
    json!({
        "op": r.op, "size": r.size, "output": r.output, "rel_err": num(r.rel_err), "worst": num(r.worst),
        "tol": r.tol, "passed": r.passed, "note": r.note,
    })
}

/// `coordinator gpu-check`: libraries, device, every op against the CPU, one training step.
pub fn run_gpu_check(a: GpuCheckArgs) -> Result<()> {
    // An unknown family is refused before anything is loaded.
    if let Some(op) = &a.op {
        kernels::families::find(op)?;
    }
    let mut libs_found: Vec<(&str, String)> = libs::report()
        .into_iter()
        .map(|(n, r)| (n, r.err().map(|e| format!("{e:#}")).unwrap_or_else(|| "found".into())))
        .collect();
    // Optional: NVTX ranges for nsys / ncu (see README's GPU section).
    libs_found.push((
        "nvtx (optional)",
        nvtx::library().unwrap_or_else(|| format!("none of {} found: no op ranges", nvtx::LIBRARIES.join(", "))),
    ));
    if !a.json {
        for (n, s) in &libs_found {
            println!("{n:<16} {s}");
        }
    }
    let cuda = Cuda::new(a.gpu)?;
    if !a.json {
        println!("device           {}", cuda.describe());
    }
    let (seed, res) = match &a.op {
        Some(op) => check::run_family(&cuda, op, a.quick)?,
        None => {
            let (seed, mut res) = check::run_all(&cuda, a.quick);
            // Head dimension 64 (ViT-B's) and 32 (the default small CLIP's, what `--gpus N` trains).
            for heads in [2, 4] {
                res.extend(train_step_check(a.gpu, heads, seed));
            }
            (seed, res)
        }
    };
    let failed = res.iter().filter(|r| !r.passed).count();
    if a.json {
        let out = json!({
            "device": cuda.describe(),
            "libraries": libs_found.iter().map(|(n, s)| json!({"name": n, "status": s})).collect::<Vec<_>>(),
            "seed": seed,
            "checks": res.iter().map(result_json).collect::<Vec<_>>(),
            "passed": res.len() - failed,
            "failed": failed,
        });
        println!("{out}");
    } else {
        print!("{}", check::table(&res));
        println!("gpu-check: {} passed, {failed} failed (seed {seed})", res.len() - failed);
    }
    if failed > 0 {
        bail!("gpu-check: {failed} of {} checks failed", res.len());
    }
    Ok(())
}

/// One CLS training step of a small CLIP (width 128, `heads` heads) on CUDA against the CPU:
/// loss, every gradient and the parameters after AdamW. The model takes its backend by value,
/// so the CUDA side gets a backend of its own on the same device.
fn train_step_check(gpu: usize, heads: usize, seed: u64) -> Vec<check::CheckResult> {
    let (image, patch, width, layers, batch) = (32, 8, 128, 2, 8);
    let size = format!("image={image} patch={patch} width={width} layers={layers} heads={heads} b={batch}");
    let cpu_out = one_step(Cpu, image, patch, width, layers, heads, batch, seed);
    let gpu_out = Cuda::new(gpu).and_then(|c| one_step(c, image, patch, width, layers, heads, batch, seed));
    let mut out = Vec::new();
    match (cpu_out, gpu_out) {
        (Ok(c), Ok(g)) => {
            for ((name, r), (_, x)) in c.iter().zip(&g) {
                let mut j = check::judge("train step", &size, name, r, x, 5e-2);
                // A whole model in bf16: judged on the relative norm (NaN still fails).
                j.passed = j.note.is_empty() && j.rel_err <= j.tol;
                out.push(j);
            }
        }
        (Err(e), _) | (_, Err(e)) => out.push(check::CheckResult {
            op: "train step".into(),
            size,
            output: "-".into(),
            rel_err: f64::NAN,
            worst: f64::NAN,
            tol: 5e-2,
            passed: false,
            note: format!("{e:#}"),
        }),
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn one_step<B: Backend>(
    backend: B,
    image: usize,
    patch: usize,
    width: usize,
    layers: usize,
    heads: usize,
    b: usize,
    seed: u64,
) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let config = ClipConfig::small(image, patch, width, layers, heads);
    let clip = Clip::random(backend, config, b, seed)?;
    let mut loss_fn = InfoNceLoss::new(&clip, 1)?;
    let mut opt = AdamW::new(&clip, AdamWConfig::default())?;
    let mut rng = check::Rng::new(seed ^ 0x5eed);
    let pixels = rng.vec(b * 3 * image * image, 2.0);
    let ctx = clip.context_len();
    let ids: Vec<i32> = (0..b * ctx)
        .map(|i| match i % ctx {
            0 => 49406,
            k if k == ctx - 1 => 49407,
            _ => rng.below(49406) as i32,
        })
        .collect();
    let loss = step::forward_backward(&clip, &mut loss_fn, &mut Single, &LocalBatch { pixels: &pixels, ids: &ids, b })?;
    let grads = clip.grads_to_host()?;
    opt.step(&clip, 1e-3)?;
    clip.backend.synchronize()?;
    let params = clip.params_to_host()?;
    Ok(vec![("loss", vec![loss]), ("gradients", grads), ("params after AdamW", params)])
}

/// `coordinator bench kernels`: fused kernels against their unfused baselines (CUDA), or the
/// CPU backend's ops.
pub fn run_bench_kernels(a: BenchKernelsArgs) -> Result<()> {
    let opts = bench_options(&a)?;
    let (device, rows) = match a.device {
        Device::Cuda => {
            let cuda = Cuda::new(a.gpu)?;
            (cuda.describe(), bench::run_cuda(&cuda, opts)?)
        }
        Device::Cpu => ("cpu".to_string(), bench::run_cpu(opts)?),
    };
    if a.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "op": r.op, "variant": r.variant, "size": r.size, "ms": r.ms, "tflops": r.tflops,
                    "gbs": r.gbs, "floor_ms": r.floor_ms, "peak_bytes": r.peak_bytes, "note": r.note,
                })
            })
            .collect();
        println!("{}", json!({ "device": device, "rows": rows }));
    } else {
        println!("device: {device}");
        print!("{}", bench::table(&rows));
    }
    Ok(())
}

/// The bench's options from the flags: the op checked, the InfoNCE size and variant only with
/// `--op infonce`.
fn bench_options(a: &BenchKernelsArgs) -> Result<bench::BenchOptions<'_>> {
    if let Some(op) = &a.op {
        bench::check_op(op)?;
    }
    let infonce_flags = a.local.is_some() || a.variant != InfonceVariantArg::Both;
    if infonce_flags && a.op.as_deref() != Some("infonce") {
        bail!("--local, --global, --dim and --variant size the InfoNCE bench: add --op infonce");
    }
    let size = match (a.local, a.global, a.dim) {
        (Some(l), Some(g), Some(d)) => {
            if l == 0 || d == 0 || l > g {
                bail!("InfoNCE sizes need 0 < --local <= --global and --dim > 0 (got {l}, {g}, {d})");
            }
            Some((l, g, d))
        }
        _ => None,
    };
    let variant = match a.variant {
        InfonceVariantArg::Fused => bench::InfonceVariant::Fused,
        InfonceVariantArg::Baseline => bench::InfonceVariant::Baseline,
        InfonceVariantArg::Both => bench::InfonceVariant::Both,
    };
    Ok(bench::BenchOptions { op: a.op.as_deref(), quick: a.quick, infonce: bench::InfonceShape { size, variant } })
}
