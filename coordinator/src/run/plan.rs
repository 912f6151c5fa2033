//! Everything a run resolves before a worker starts: the options (stored ones on `--resume`),
//! the run folder, the world and its device, and for CUDA the model against the kernels' limits
//! and the local GPUs and libraries. Whatever is wrong is one line here, not a worker restarted.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use worker::Device;

use super::folder::{random_hex, RunRecord};
use super::{train_opts, TrainArgs};

/// Everything resolved before the workers start.
pub struct Plan {
    pub(super) args: TrainArgs,
    pub(super) run_dir: PathBuf,
    pub(super) run_id: String,
    pub(super) last_checkpoint: u64,
    pub(super) world: usize,
    /// Whether the workers are started here.
    pub(super) local: bool,
    pub(super) device: Device,
    pub(super) steps: u64,
    pub(super) resumed: bool,
}

/// The world size, whether its workers are started here, and the device.
pub(super) fn world_of(args: &TrainArgs) -> Result<(usize, bool, Device)> {
    let (world, local, device) = match (args.gpus, args.workers, args.expect_workers) {
        (Some(n), None, None) => (n, true, Device::Cuda),
        (None, Some(n), None) => (n, true, args.device),
        (None, None, Some(n)) => (n, false, args.device),
        (None, None, None) => bail!("say how many workers: --workers N --device cpu, --gpus N, or --expect-workers N"),
        _ => bail!("--gpus, --workers and --expect-workers exclude each other"),
    };
    ensure!(world > 0, "the world needs at least one worker");
    Ok((world, local, device))
}

/// A CUDA run is checked before any worker starts: the model against the kernels' limits
/// (wherever the workers run), and, for workers started here, the GPUs and libraries they
/// will load. One line naming what is missing, never a worker restarted on it.
fn preflight_cuda(args: &TrainArgs, world: usize, local: bool) -> Result<()> {
    let config = train_opts::model_config(args)?;
    config.check_limits(&kernels::limits::CUDA).context("the model cannot run on CUDA")?;
    if local {
        preflight_local_gpus(args, world)?;
    }
    Ok(())
}

/// The `world` local GPUs a `--gpus N` (or `--workers N --device cuda`) run or plan will use:
/// the driver, the devices, NVRTC with the CUDA headers, cuBLAS(Lt), and NCCL for more than one.
pub fn preflight_local_gpus(args: &TrainArgs, world: usize) -> Result<()> {
    let flag = if args.gpus.is_some() { format!("--gpus {world}") } else { format!("--workers {world} --device cuda") };
    kernels::cuda::probe::probe(world).with_context(|| flag.clone())?;
    if world > 1 {
        worker::comm::nccl_library().with_context(|| format!("{flag}: the ranks' collectives need NCCL"))?;
    }
    Ok(())
}

pub(super) fn plan(mut args: TrainArgs) -> Result<Plan> {
    let resumed = args.resume.is_some();
    let (run_dir, run_id, last_checkpoint) = if let Some(dir) = args.resume.clone() {
        let path = dir.join("run.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("--resume {}: no run.json there", dir.display()))?;
        let rec: RunRecord = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // The stored options, with the world and the step count the operator gives now.
        let mut stored = rec.args;
        if args.workers.is_some() || args.gpus.is_some() || args.expect_workers.is_some() {
            stored.workers = args.workers;
            stored.gpus = args.gpus;
            stored.expect_workers = args.expect_workers;
        }
        stored.steps = args.steps.or(stored.steps);
        stored.listen = args.listen.clone();
        stored.worker_bin = args.worker_bin.clone().or(stored.worker_bin);
        stored.resume = None;
        args = stored;
        (dir, rec.run_id, rec.last_checkpoint)
    } else {
        // Bad training options are refused before an older run in the folder is cleared.
        train_opts::validate(&mut args)?;
        train_opts::model_config(&args)?;
        let dir = args.run_dir.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            PathBuf::from("runs").join(format!("run-{t}"))
        });
        if dir.join("run.json").exists() {
            eprintln!("coordinator: {} held a run; starting afresh (use --resume to continue one)", dir.display());
            let _ = fs::remove_dir_all(dir.join("checkpoints"));
            let _ = fs::remove_file(dir.join("metrics.jsonl"));
        }
        (dir, random_hex(8), 0)
    };
    let (world, local, device) = world_of(&args)?;
    if device == Device::Cuda {
        preflight_cuda(&args, world, local)?;
    }
    ensure!(args.data.is_some() || args.synthetic.is_some(), "give the data: --data MIMIC_ROOT or --synthetic N");
    ensure!(
        args.global_batch > 0 && args.global_batch.is_multiple_of(world),
        "--global-batch {} must be a positive multiple of the {world} workers",
        args.global_batch
    );
    ensure!(args.train_fraction > 0.0 && args.train_fraction <= 1.0, "--train-fraction must be in (0, 1]");
    ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be positive");
    // (Again for a resumed run: its stored options, the defaults filled in for older ones.)
    train_opts::validate(&mut args)?;
    Ok(Plan { steps: 0, resumed, args, run_dir, run_id, last_checkpoint, world, local, device })
}
