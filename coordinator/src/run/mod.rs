//! The training run: `coordinator [--gpus N | --workers N --device cpu] [options]`.
//!
//! The coordinator resolves the data and the model, serves `cxrclip.v1.Coordinator`, spawns
//! one `worker` process per CPU rank or GPU (or waits for `--expect-workers` started elsewhere),
//! and supervises them: metrics into `metrics.jsonl` and the progress bar, checkpoints recorded
//! in `run.json`, and on a dead worker (exit, kill, heartbeat timeout) every worker stopped and
//! the job restarted from the last checkpoint, up to `--max-restarts` times.

mod data_source;
pub mod finetune;
pub mod index;
mod retention;
mod server;
mod train_opts;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use proto::tonic::transport::{Identity, Server, ServerTlsConfig};
use proto::v1::coordinator_server::CoordinatorServer;
use proto::v1::{Command, Job};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use index::PairIndex;
use server::{Event, Inner, Service, Shared};
pub use train_opts::{Mode, ScheduleKind};

/// Options of a CLS training run (the top-level form of `coordinator`).
#[derive(Args, Debug, Clone, Serialize, Deserialize, Default)]
pub struct TrainArgs {
    /// One worker per GPU (CUDA_VISIBLE_DEVICES=0..N-1), NCCL collectives.
    #[arg(long, conflicts_with_all = ["workers", "expect_workers"])]
    pub gpus: Option<usize>,
    /// Local CPU workers (a TCP ring on loopback).
    #[arg(long, conflicts_with = "expect_workers")]
    pub workers: Option<usize>,
    /// cpu or cuda (cuda is implied by --gpus).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Wait for N workers started elsewhere (`worker --coordinator URL`) instead of spawning.
    #[arg(long)]
    pub expect_workers: Option<usize>,
    /// Address to serve on. The default takes a free loopback port; other nodes need an
    /// address they can reach (e.g. 0.0.0.0:50051), preferably with --tls-cert/--tls-key.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// A MIMIC-CXR-JPG root to train on, or a folder `coordinator prepare` wrote from one (its
    /// packed shards are then read instead of the JPEGs: same pairs, same order).
    #[arg(long, conflicts_with = "synthetic")]
    pub data: Option<PathBuf>,
    /// Pack the --data tree (or the --synthetic one) into shards in DIR once, as `coordinator
    /// prepare` does (smaller side at most 256, or the model's image size when larger), and
    /// train from them; a later run given the same DIR reuses them.
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub shards: Option<PathBuf>,
    /// Threads that load and augment each rank's batches (default: the rank's share of the
    /// node's cores, less one for its step thread, at least two).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub loader_threads: Option<usize>,
    /// Pairs per micro-batch on each rank: the local batch is embedded M at a time and the
    /// step's loss and gradient stay those of the whole batch (gradient caching), so the batch
    /// is limited by the features' memory, not the activations'. Default: one pass.
    #[arg(long, value_name = "M")]
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Train on a generated MIMIC-CXR-JPG tree of N studies (made once, then reused).
    #[arg(long)]
    pub synthetic: Option<usize>,
    /// Where the --synthetic tree lives (default: the system temp folder, by size and seed).
    #[arg(long)]
    pub synthetic_dir: Option<PathBuf>,
    /// Pixel width of the generated images.
    #[arg(long, default_value_t = 128)]
    pub synthetic_size: usize,
    /// Fraction of the training patients to train on.
    #[arg(long, default_value_t = 1.0)]
    pub train_fraction: f64,
    /// A Hugging Face CLIP folder to start from (default: a small random CLIP of the sizes below).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub image: usize,
    #[arg(long, default_value_t = 8)]
    pub patch: usize,
    /// Width of both towers and of the projection.
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// What trains: `full`, every parameter; `adapters`, only the adapters and the layer norms
    /// (the paper's: the logit scale, the projections, the embeddings and the blocks' own
    /// weights stay as they start). Adapters need --adapter-width or an --init that has them.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    #[serde(default)]
    pub mode: Mode,
    /// Bottleneck adapters of width N after every block of both towers (the paper: 256). With
    /// --mode full they are added and train with everything else; an --init model that has
    /// adapters keeps them (N must then be their width).
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub adapter_width: Option<usize>,
    /// Optimiser steps (default: one epoch).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs, when --steps is not given.
    #[arg(long)]
    pub epochs: Option<u64>,
    #[arg(long, default_value_t = 32)]
    pub global_batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Learning-rate schedule: `cosine`, a linear warm-up over --warmup steps then a cosine
    /// decay to 0; `one-cycle`, PyTorch's OneCycleLR with cosine annealing (from lr/25 up to lr
    /// over --warmup-fraction of the steps, then down to lr/25/1e4; beta1 does not cycle).
    #[arg(long, value_enum, default_value_t = ScheduleKind::Cosine)]
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Linear warm-up steps before the cosine decay (--schedule cosine).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// One-cycle's warm-up as a fraction of the steps, in [0, 1] (PyTorch's pct_start; default
    /// 0.3; the paper's 0.05).
    #[arg(long, value_name = "F")]
    #[serde(default)]
    pub warmup_fraction: Option<f64>,
    #[arg(long, default_value_t = 0.2)]
    pub weight_decay: f64,
    /// AdamW's first-moment decay, in [0, 1).
    #[arg(long, default_value_t = 0.9)]
    #[serde(default = "train_opts::default_beta1")]
    pub beta1: f64,
    /// AdamW's second-moment decay, in [0, 1).
    #[arg(long, default_value_t = 0.98)]
    #[serde(default = "train_opts::default_beta2")]
    pub beta2: f64,
    /// AdamW's epsilon.
    #[arg(long, default_value_t = 1e-6)]
    #[serde(default = "train_opts::default_eps")]
    pub eps: f64,
    /// Views to train on: `all` (the paper's) or a comma-separated list.
    #[arg(long, default_value = "PA,AP")]
    #[serde(default = "train_opts::default_views")]
    pub views: String,
    /// Report text: `paper` (all but technique, comparison, date and examination),
    /// `impression`, or `findings+impression`.
    #[arg(long, default_value = "paper")]
    #[serde(default = "train_opts::default_sections")]
    pub sections: String,
    /// Uncertain and blank labels: `zeros` (the paper's), `ones` or `ignore`. Contrastive
    /// training reads no labels; the run records the policy for the runs built on it.
    #[arg(long, default_value = "zeros")]
    #[serde(default = "train_opts::default_uncertain")]
    pub uncertain: String,
    /// Augmentation: rotation drawn from +-DEG degrees, in [0, 180] (0: none).
    #[arg(long, value_name = "DEG", default_value_t = 45.0)]
    #[serde(default = "train_opts::default_augment_rotate")]
    pub augment_rotate: f64,
    /// Augmentation: zoom drawn from [LO, HI), 0 < LO <= HI (1,1: none).
    #[arg(long, value_name = "LO,HI", value_parser = train_opts::parse_scale, default_value = "0.9,1.1")]
    #[serde(default = "train_opts::default_augment_scale")]
    pub augment_scale: (f64, f64),
    /// Augmentation: shift on each axis drawn from +-F of the image side, in [0, 1] (0: none).
    #[arg(long, value_name = "F", default_value_t = 0.15)]
    #[serde(default = "train_opts::default_augment_translate")]
    pub augment_translate: f64,
    /// Keep each report's sentences in order (by default they are shuffled).
    #[arg(long)]
    #[serde(default)]
    pub no_shuffle_sentences: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 10)]
    pub checkpoint_every: u64,
    /// Checkpoints kept on disk: the newest N (0: all), and a fine-tuning run's best.
    #[arg(long, default_value_t = 2)]
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: usize,
    /// The run folder: metrics.jsonl, checkpoints/, run.json, token.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Restarts from the last checkpoint after a worker dies, before giving up.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds without a heartbeat before a worker counts as dead.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_timeout: u64,
    /// Seconds to wait for the whole world to register.
    #[arg(long, default_value_t = 300)]
    pub register_timeout: u64,
    /// PEM certificate chain and key: serve over TLS (remote workers then need --tls-ca;
    /// local workers are given this chain as theirs).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The worker executable (default: this executable, in its `worker` role).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,

    // Fine-tuning (`--task finetune`): the image tower and a linear label head trained with
    // BCE on the labels of the --data root, validated at every epoch's end.
    /// cls (contrastive training on image/report pairs) or finetune (labels).
    #[arg(long, default_value = "cls")]
    #[serde(default = "default_task")]
    pub task: String,
    /// finetune: the labels of the head, comma-separated (default: all 14).
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub labels: Vec<String>,
    /// finetune: leave out the positive weight (negatives / positives per label, the paper's
    /// default) of the BCE loss.
    #[arg(long)]
    #[serde(default)]
    pub no_pos_weight: bool,
    /// finetune: the head's learning rate (default: --lr; it follows the same schedule).
    #[arg(long)]
    #[serde(default)]
    pub head_lr: Option<f64>,
}

impl TrainArgs {
    /// The options as the command line defaults them (`Default` leaves strings empty).
    pub fn defaults() -> TrainArgs {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            a: TrainArgs,
        }
        <Wrap as clap::Parser>::parse_from(["coordinator"]).a
    }
}

fn default_task() -> String {
    "cls".into()
}

fn default_keep_checkpoints() -> usize {
    2
}

/// `run.json`: what `--resume` needs.
#[derive(Serialize, Deserialize)]
pub struct RunRecord {
    run_id: String,
    args: TrainArgs,
    /// Step of the last complete checkpoint (0: none).
    last_checkpoint: u64,
    finished: bool,
}

pub fn write_json_atomically(path: &Path, v: &impl Serialize) -> Result<()> {
    model::checkpoint::write_file_atomically(path, serde_json::to_string_pretty(v)?.as_bytes())
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    // The worker's naming (worker::job::checkpoint_dir); the coordinator does not link the worker.
    run_dir.join("checkpoints").join(format!("step-{step:06}"))
}

/// The generated tree for `--synthetic N`, made once (atomically, by rename) and then reused by
/// runs of the same generator version, study count, seed and size.
fn synthetic_tree(a: &TrainArgs, studies: usize) -> Result<PathBuf> {
    let dir = a.synthetic_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "cxrclip-synthetic-v{}-{studies}-seed{}-size{}",
            data::synth::VERSION,
            a.seed,
            a.synthetic_size
        ))
    });
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    let tmp = dir.with_file_name(format!(
        ".{}.tmp-{}",
        dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    let cfg = data::synth::SynthConfig {
        studies,
        layout: data::synth::Layout::Mimic,
        seed: a.seed,
        size: a.synthetic_size,
        visibility: data::synth::Visibility::default(),
        prevalence: 1.0,
    };
    let t0 = Instant::now();
    data::synth::generate(&tmp, &cfg).with_context(|| format!("generating {}", tmp.display()))?;
    fs::write(tmp.join(".complete"), b"")?;
    if fs::rename(&tmp, &dir).is_err() {
        // Another run made it meanwhile: use theirs.
        let _ = fs::remove_dir_all(&tmp);
        ensure!(dir.join(".complete").exists(), "cannot put the synthetic tree at {}", dir.display());
    } else {
        eprintln!(
            "coordinator: generated {studies} synthetic studies in {:.1} s -> {}",
            t0.elapsed().as_secs_f64(),
            dir.display()
        );
    }
    Ok(dir)
}

/// The command that starts one local worker: `--worker-bin` when given, else this very
/// executable in its `worker` role (so a fresh `cargo run -p coordinator` needs no separate
/// worker build, and a stale `worker` binary left beside it is never picked up by mistake).
fn worker_command(a: &TrainArgs) -> Result<Proc> {
    if let Some(p) = &a.worker_bin {
        ensure!(p.exists(), "--worker-bin {}: no such file", p.display());
        return Ok(Proc::new(p));
    }
    let exe = std::env::current_exe().context("finding the coordinator's own executable")?;
    let mut cmd = Proc::new(exe);
    cmd.arg("worker");
    Ok(cmd)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let code = block_on(run_async(args))?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// Runs `fut` on a runtime of its own (each run serves and supervises on one).
pub fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let out = rt.block_on(fut);
    rt.shutdown_timeout(Duration::from_secs(1));
    out
}

/// What a finished training run left.
pub struct Trained {
    pub finished: Finished,
    pub run_dir: PathBuf,
    /// The last step, whose checkpoint is the run's final one.
    pub steps: u64,
}

/// A training run (contrastive or fine-tuning) from start (or `--resume`) to its end, for the
/// plan's executor: like the command line's run, without printing the summary or exiting.
pub async fn train(args: TrainArgs) -> Result<Trained> {
    let (finished, run_dir, steps, _) = train_inner(args).await?;
    Ok(Trained { finished, run_dir, steps })
}

async fn run_async(args: TrainArgs) -> Result<i32> {
    let (finished, run_dir, steps, last_checkpoint) = train_inner(args).await?;
    match finished {
        Finished::Done(loss) => {
            eprintln!(
                "coordinator: done: {steps} steps, final loss {loss:.4}; checkpoint {}; metrics {}",
                checkpoint_dir(&run_dir, steps).display(),
                run_dir.join("metrics.jsonl").display()
            );
            Ok(0)
        }
        Finished::Interrupted => {
            eprintln!(
                "coordinator: interrupted; last checkpoint at step {last_checkpoint}; continue with: coordinator --resume {}",
                run_dir.display()
            );
            Ok(130)
        }
    }
}

/// Everything resolved before the workers start.
pub struct Plan {
    args: TrainArgs,
    run_dir: PathBuf,
    run_id: String,
    last_checkpoint: u64,
    world: usize,
    local: bool,
    device: String,
    steps: u64,
    resumed: bool,
}

/// The world size, whether its workers are started here, and the device.
fn world_of(args: &TrainArgs) -> Result<(usize, bool, String)> {
    let (world, local, device) = match (args.gpus, args.workers, args.expect_workers) {
        (Some(n), None, None) => (n, true, "cuda".to_string()),
        (None, Some(n), None) => (n, true, args.device.clone()),
        (None, None, Some(n)) => (n, false, args.device.clone()),
        (None, None, None) => bail!("say how many workers: --workers N --device cpu, --gpus N, or --expect-workers N"),
        _ => bail!("--gpus, --workers and --expect-workers exclude each other"),
    };
    ensure!(world > 0, "the world needs at least one worker");
    ensure!(device == "cpu" || device == "cuda", "--device {device}: expected cpu or cuda");
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

fn plan(mut args: TrainArgs) -> Result<Plan> {
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
        let id: [u8; 8] = rand::rng().random();
        (dir, id.iter().map(|b| format!("{b:02x}")).collect(), 0)
    };
    let (world, local, device) = world_of(&args)?;
    if device == "cuda" {
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

async fn train_inner(args: TrainArgs) -> Result<(Finished, PathBuf, u64, u64)> {
    let mut p = plan(args)?;
    let a = p.args.clone();
    let config = train_opts::model_config(&a)?;
    let root = match (&a.data, a.synthetic) {
        (Some(d), _) => d.clone(),
        (None, Some(n)) => synthetic_tree(&a, n)?,
        (None, None) => unreachable!("checked in plan"),
    };
    let root = data_source::resolve(&a, &config, root)?;
    let finetune = a.task == "finetune";
    let (index, ft) = if finetune {
        let (ix, ft) = finetune_index(&a, &root)?;
        (ix, Some(ft))
    } else {
        (PairIndex::read(&root, &train_opts::read_options(&a)?, a.train_fraction, a.global_batch)?, None)
    };
    let spe = index.steps_per_epoch();
    p.steps = a.steps.unwrap_or_else(|| a.epochs.unwrap_or(1) * spe);
    ensure!(p.steps > 0, "nothing to do: 0 steps");
    ensure!(p.last_checkpoint < p.steps, "the run in {} is already at step {}", p.run_dir.display(), p.last_checkpoint);
    fs::create_dir_all(&p.run_dir).with_context(|| format!("creating {}", p.run_dir.display()))?;
    let run_dir = fs::canonicalize(&p.run_dir)?;
    // A resumed run keeps its token, so that workers started by hand can rejoin it.
    let token = if p.resumed && run_dir.join("token").exists() {
        fs::read_to_string(run_dir.join("token"))?.trim().to_string()
    } else {
        let t: [u8; 32] = rand::rng().random();
        t.iter().map(|b| format!("{b:02x}")).collect()
    };
    write_secret(&run_dir.join("token"), &token)?;
    let mut record =
        RunRecord { run_id: p.run_id.clone(), args: a.clone(), last_checkpoint: p.last_checkpoint, finished: false };
    write_json_atomically(&run_dir.join("run.json"), &record)?;
    truncate_metrics(&run_dir.join("metrics.jsonl"), p.last_checkpoint)?;

    let job = Job {
        config_json: config.to_json(),
        init_dir: a
            .init
            .as_ref()
            .map(|d| fs::canonicalize(d).unwrap_or(d.clone()).to_string_lossy().into_owned())
            .unwrap_or_default(),
        data_root: fs::canonicalize(&root)?.to_string_lossy().into_owned(),
        steps: p.steps,
        global_batch: a.global_batch as u64,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        run_dir: run_dir.to_string_lossy().into_owned(),
        resume_step: 0,
        resume_dir: String::new(),
        steps_per_epoch: spe,
        device: p.device.clone(),
        options: Some(train_opts::job_options(&a)?),
        ..Job::default()
    };
    let job = match &ft {
        Some(ft) => Job {
            kind: "finetune".into(),
            labels: ft.labels.clone(),
            uncertain: ft.policy.to_string(),
            pos_weight: ft.pos_weight.clone(),
            head_lr: a.head_lr.unwrap_or(0.0),
            mode: a.mode.as_str().to_string(),
            ..job
        },
        None => job,
    };
    let hook = match ft {
        Some(ft) => Some(finetune::validation_hook(&run_dir, ft, &index)?),
        None => None,
    };
    let finished = launch(&p, &run_dir, &token, job, index::Work::Train(index), &mut record, hook).await?;
    Ok((finished, run_dir, p.steps, record.last_checkpoint))
}

/// The world an embed job runs on: the options of `world` (workers, device, serving) with
/// everything about training left out.
pub struct EmbedJob {
    pub world: TrainArgs,
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub data_root: PathBuf,
    /// Images per forward on each rank.
    pub batch: usize,
    pub items: Vec<proto::v1::ShardEntry>,
}

/// Runs an embed job to its end and returns the ranks' parts (see `worker::embed`).
pub async fn embed(e: EmbedJob) -> Result<Vec<worker::embed::Embedded>> {
    let mut args = e.world.clone();
    args.run_dir = Some(e.run_dir.clone());
    args.resume = None;
    let (world, local, device) = world_of(&args)?;
    fs::create_dir_all(&e.run_dir).with_context(|| format!("creating {}", e.run_dir.display()))?;
    let run_dir = fs::canonicalize(&e.run_dir)?;
    let parts_dir = run_dir.join("parts");
    let _ = fs::remove_dir_all(&parts_dir);
    let id: [u8; 8] = rand::rng().random();
    let run_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let t: [u8; 32] = rand::rng().random();
    let token: String = t.iter().map(|b| format!("{b:02x}")).collect();
    write_secret(&run_dir.join("token"), &token)?;
    let p = Plan {
        args: args.clone(),
        run_dir: run_dir.clone(),
        run_id: run_id.clone(),
        last_checkpoint: 0,
        world,
        local,
        device: device.clone(),
        steps: 1,
        resumed: false,
    };
    let mut record = RunRecord { run_id, args, last_checkpoint: 0, finished: false };
    let job = Job {
        kind: "embed".into(),
        init_dir: fs::canonicalize(&e.checkpoint)?.to_string_lossy().into_owned(),
        data_root: fs::canonicalize(&e.data_root)?.to_string_lossy().into_owned(),
        steps: 1,
        global_batch: (e.batch * world) as u64,
        run_dir: run_dir.to_string_lossy().into_owned(),
        steps_per_epoch: 1,
        device,
        ..Job::default()
    };
    match launch(&p, &run_dir, &token, job, index::Work::Items(e.items), &mut record, None).await? {
        Finished::Done(_) => {}
        Finished::Interrupted => bail!("interrupted"),
    }
    (0..world).map(|r| worker::embed::read_part(&worker::embed::part_path(&parts_dir, r))).collect()
}

/// The fine-tuning run's labelled pairs and settings.
fn finetune_index(a: &TrainArgs, root: &Path) -> Result<(PairIndex, finetune::FtSettings)> {
    let opts = train_opts::read_options(a)?;
    let policy = opts.uncertain;
    let ix = PairIndex::read_labelled(root, &opts, a.train_fraction, a.global_batch)?;
    let labels: Vec<String> =
        if a.labels.is_empty() { data::LABELS.iter().map(|s| s.to_string()).collect() } else { a.labels.clone() };
    let columns = labels
        .iter()
        .map(|l| {
            data::labels::label_index(l).ok_or_else(|| {
                anyhow!("--labels: unknown label '{l}' (the 14 CheXpert labels: {})", data::LABELS.join(", "))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let pos_weight = if a.no_pos_weight { Vec::new() } else { ix.pos_weight(&columns, policy) };
    Ok((ix, finetune::FtSettings { labels, columns, policy, pos_weight }))
}

/// How a launched job ended (a failure past the restarts is an error).
pub enum Finished {
    Done(f64),
    Interrupted,
}

/// Called when every rank has written its validation part of a step: returns the line to add
/// to the metrics (e.g. the validation macro AUC).
pub type OnValidation<'a> = Box<dyn FnMut(u64, Vec<PathBuf>) -> Result<serde_json::Value> + Send + 'a>;

/// Serves `job` over `work` to the world `p` describes, starts the local workers, and
/// supervises them to the end: metrics into `metrics.jsonl` and the progress bar, checkpoints
/// into `record` (`run.json`), and on a dead worker every worker stopped and the job restarted
/// from the last checkpoint, up to `--max-restarts` times.
pub async fn launch(
    p: &Plan,
    run_dir: &Path,
    token: &str,
    job: Job,
    work: index::Work,
    record: &mut RunRecord,
    on_validation: Option<OnValidation<'_>>,
) -> Result<Finished> {
    let a = &p.args;
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        token: token.to_string(),
        run_id: p.run_id.clone(),
        world: p.world,
        work,
        inner: Mutex::new(Inner {
            generation: 0,
            open: false,
            regs: (0..p.world).map(|_| None).collect(),
            job: job.clone(),
            command: Command::Continue,
            last_seen: vec![None; p.world],
            nccl_id: None,
        }),
        events: tx,
        register_wait: Duration::from_secs(a.register_timeout),
    });
    let url = serve(a, shared.clone()).await?;
    fs::write(run_dir.join("coordinator.url"), format!("{url}\n"))?;
    eprintln!(
        "coordinator: run {} in {}: {} steps of {} pairs ({} per epoch) on {} {} worker(s); serving {url}",
        p.run_id,
        run_dir.display(),
        p.steps,
        a.global_batch,
        job.steps_per_epoch * a.global_batch as u64,
        p.world,
        p.device
    );
    if !p.local {
        eprintln!(
            "coordinator: waiting for {} workers: CXRCLIP_TOKEN=$(cat {}) worker --coordinator {url}",
            p.world,
            run_dir.join("token").display()
        );
    }

    let bar = progress_bar(p.steps, p.last_checkpoint);
    let mut sup = Supervisor {
        p,
        shared: &shared,
        run_dir,
        token,
        url: &url,
        bar: &bar,
        children: Vec::new(),
        on_validation: None,
    };
    sup.on_validation = on_validation;
    let mut restarts = 0u32;
    let mut generation = 0u64;
    loop {
        generation += 1;
        sup.start_generation(generation, record.last_checkpoint, &job)?;
        let outcome = sup.watch(generation, &mut events, record).await?;
        match outcome {
            Outcome::Done(loss) => {
                shared.lock().command = Command::Shutdown;
                sup.reap(Duration::from_secs(10)).await;
                record.finished = true;
                write_json_atomically(&run_dir.join("run.json"), &*record)?;
                bar.finish_and_clear();
                return Ok(Finished::Done(loss));
            }
            Outcome::Interrupted => {
                {
                    let mut g = shared.lock();
                    g.command = Command::Shutdown;
                    g.open = false;
                }
                sup.reap(Duration::from_secs(5)).await;
                bar.abandon();
                return Ok(Finished::Interrupted);
            }
            Outcome::Failed(why) => {
                {
                    // A new generation: the old one's sessions turn stale and get an abort.
                    let mut g = shared.lock();
                    g.generation += 1;
                    g.open = false;
                    g.command = Command::Continue;
                }
                sup.kill_all().await;
                restarts += 1;
                if restarts > a.max_restarts {
                    bar.abandon();
                    bail!(
                        "{why}; gave up after {} restarts; last checkpoint at step {} (continue with --resume {})",
                        a.max_restarts,
                        record.last_checkpoint,
                        run_dir.display()
                    );
                }
                truncate_metrics(&run_dir.join("metrics.jsonl"), record.last_checkpoint)?;
                bar.set_position(record.last_checkpoint);
                bar.suspend(|| {
                    eprintln!(
                        "coordinator: {why}; restarting from step {} ({restarts}/{})",
                        record.last_checkpoint, a.max_restarts
                    )
                });
            }
        }
    }
}

fn write_secret(path: &Path, s: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(s.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

/// Keeps the lines of steps up to `step` (what the checkpoint a restart starts from covers).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    model::checkpoint::write_file_atomically(path, kept.as_bytes())
}

fn progress_bar(steps: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar
}

/// Binds the server (TLS when asked) and serves in the background; returns its URL.
async fn serve(a: &TrainArgs, shared: Arc<Shared>) -> Result<String> {
    let addr: SocketAddr = a.listen.parse().map_err(|e| anyhow!("--listen {}: {e}", a.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let mut builder = Server::builder();
    let tls = a.tls_cert.is_some();
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let c = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        let k = fs::read(key).with_context(|| format!("reading {}", key.display()))?;
        builder = builder.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(c, k)))?;
    } else if !bound.ip().is_loopback() {
        eprintln!("coordinator: warning: serving on {bound} without TLS; the run token travels in clear text");
    }
    let svc = CoordinatorServer::new(Service { shared })
        .max_decoding_message_size(proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(proto::MAX_MESSAGE_BYTES);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = builder
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(svc);
    tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming(incoming).await {
            eprintln!("coordinator: the gRPC server stopped: {e}");
        }
    });
    let host = if bound.ip().is_unspecified() { "127.0.0.1".to_string() } else { bound.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    Ok(format!("{}://{host}:{}", if tls { "https" } else { "http" }, bound.port()))
}

enum Outcome {
    Done(f64),
    Failed(String),
    Interrupted,
}

struct Supervisor<'a> {
    p: &'a Plan,
    shared: &'a Arc<Shared>,
    run_dir: &'a Path,
    token: &'a str,
    url: &'a str,
    bar: &'a ProgressBar,
    /// Local workers of the current generation.
    children: Vec<Child>,
    on_validation: Option<OnValidation<'a>>,
}

impl<'a> Supervisor<'a> {
    fn start_generation(&mut self, generation: u64, from: u64, job: &Job) -> Result<()> {
        {
            let mut g = self.shared.lock();
            g.generation = generation;
            let mut job = job.clone();
            if from > 0 {
                job.resume_step = from;
                job.resume_dir = checkpoint_dir(self.run_dir, from).to_string_lossy().into_owned();
            }
            g.job = job;
            g.regs.iter_mut().for_each(|r| *r = None);
            g.last_seen.iter_mut().for_each(|t| *t = None);
            g.nccl_id = None;
            g.command = Command::Continue;
            g.open = true;
        }
        if !self.p.local {
            return Ok(());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Each worker gets its share of the cores (more would oversubscribe them): a CPU
        // worker's compute threads, and every worker's loader threads (worker::feed).
        let threads = (cores / self.p.world).max(1);
        for i in 0..self.p.world {
            let mut cmd = worker_command(&self.p.args)?;
            cmd.args(["--coordinator", self.url, "--device", &self.p.device])
                .env("CXRCLIP_TOKEN", self.token)
                .env("CXRCLIP_CORES", threads.to_string())
                .stdin(Stdio::null());
            // Local workers trust the certificate chain the coordinator serves (a self-signed
            // certificate is its own authority; a chain file that ends in its root works too).
            if let Some(cert) = &self.p.args.tls_cert {
                cmd.arg("--tls-ca").arg(cert);
            }
            if self.p.device == "cuda" {
                cmd.env("CUDA_VISIBLE_DEVICES", i.to_string());
            } else {
                cmd.env("RAYON_NUM_THREADS", threads.to_string());
            }
            // SAFETY: prctl is async-signal-safe; it makes the kernel kill the worker if the
            // coordinator dies, so no worker outlives its run.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let child = cmd.spawn().with_context(|| format!("starting worker {i}: {:?}", cmd.get_program()))?;
            self.children.push(child);
        }
        Ok(())
    }

    async fn watch(
        &mut self,
        generation: u64,
        events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
        record: &mut RunRecord,
    ) -> Result<Outcome> {
        let world = self.p.world;
        let mut done: HashSet<usize> = HashSet::new();
        // Validation parts of a step, by rank, until every rank's is in.
        let mut validation: std::collections::BTreeMap<u64, std::collections::BTreeMap<usize, PathBuf>> =
            std::collections::BTreeMap::new();
        let mut last_loss = f64::NAN;
        let mut pid_rank: Vec<(u32, usize)> = Vec::new();
        let started = Instant::now();
        let metrics_path = self.run_dir.join("metrics.jsonl");
        let mut metrics = fs::OpenOptions::new().create(true).append(true).open(&metrics_path)?;
        let plain = !console_is_terminal();
        let every = (self.p.steps / 10).max(1);
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            tokio::select! {
                _ = &mut ctrl_c => return Ok(Outcome::Interrupted),
                ev = events.recv() => {
                    let Some(ev) = ev else { bail!("the gRPC service stopped") };
                    match ev {
                        Event::Registered { generation: g, rank, host, pid } if g == generation => {
                            pid_rank.push((pid, rank));
                            self.bar.suspend(|| eprintln!("coordinator: rank {rank} joined from {host} (pid {pid})"));
                        }
                        Event::Metrics { generation: g, m } if g == generation => {
                            let line = json!({
                                "step": m.step, "loss": m.loss, "lr": m.lr, "grad_norm": m.grad_norm,
                                "logit_scale": m.logit_scale, "images_per_s": m.images_per_s,
                                "step_seconds": m.step_seconds, "world": world, "generation": generation,
                                "rss_mb": m.rss_mb,
                            });
                            writeln!(metrics, "{line}")?;
                            metrics.flush()?;
                            self.bar.set_position(m.step);
                            self.bar.set_message(format!("loss {:.4}  {:.1} img/s", m.loss, m.images_per_s));
                            if plain && (m.step.is_multiple_of(every) || m.step == self.p.steps) {
                                eprintln!("step {}/{}  loss {:.4}  {:.1} img/s", m.step, self.p.steps, m.loss, m.images_per_s);
                            }
                        }
                        Event::Checkpoint { generation: g, step, path } if g == generation => {
                            record.last_checkpoint = step;
                            if plain {
                                eprintln!("coordinator: checkpoint {path}");
                            }
                            write_json_atomically(&self.run_dir.join("run.json"), record)?;
                            let best = finetune::Best::read(self.run_dir).map(|b| b.checkpoint);
                            let keep = self.p.args.keep_checkpoints;
                            if let Err(e) = retention::prune(self.run_dir, step, keep, best.as_deref()) {
                                // Disk hygiene only: the run goes on with the old checkpoints left.
                                self.bar.suspend(|| eprintln!("coordinator: removing old checkpoints: {e}"));
                            }
                        }
                        Event::Done { generation: g, rank, loss } if g == generation => {
                            done.insert(rank);
                            if rank == 0 { last_loss = loss; }
                            if done.len() == world { return Ok(Outcome::Done(last_loss)); }
                        }
                        Event::Failed { generation: g, rank, message } if g == generation => {
                            return Ok(Outcome::Failed(format!("rank {rank} failed: {message}")));
                        }
                        Event::Validation { generation: g, rank, step, path } if g == generation => {
                            let parts = validation.entry(step).or_default();
                            parts.insert(rank, PathBuf::from(path));
                            if parts.len() == world {
                                let paths = validation.remove(&step).unwrap_or_default().into_values().collect();
                                if let Some(hook) = self.on_validation.as_mut() {
                                    let line = hook(step, paths)?;
                                    writeln!(metrics, "{line}")?;
                                    metrics.flush()?;
                                    self.bar.suspend(|| eprintln!("coordinator: step {step}: {line}"));
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    for c in &mut self.children {
                        if let Ok(Some(status)) = c.try_wait() {
                            let pid = c.id();
                            let rank = pid_rank.iter().find(|(p, _)| *p == pid).map(|(_, r)| *r);
                            let finished = rank.is_some_and(|r| done.contains(&r));
                            if !(status.success() && finished) {
                                let who = rank.map_or(format!("worker pid {pid}"), |r| format!("rank {r} (pid {pid})"));
                                return Ok(Outcome::Failed(format!("{who} exited ({status})")));
                            }
                        }
                    }
                    let timeout = Duration::from_secs(self.p.args.heartbeat_timeout);
                    let g = self.shared.lock();
                    for (rank, seen) in g.last_seen.iter().enumerate() {
                        if seen.is_some_and(|t| t.elapsed() > timeout) && !done.contains(&rank) {
                            return Ok(Outcome::Failed(format!("rank {rank} sent no heartbeat for {} s", timeout.as_secs())));
                        }
                    }
                    let registered = g.regs.iter().filter(|r| r.is_some()).count();
                    if registered < world && started.elapsed() > Duration::from_secs(self.p.args.register_timeout) {
                        drop(g);
                        bail!("only {registered} of {world} workers registered within {} s", self.p.args.register_timeout);
                    }
                }
            }
        }
    }

    /// Waits up to `grace` for the local workers to exit, then kills the rest.
    async fn reap(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.children.iter_mut().any(|c| matches!(c.try_wait(), Ok(None))) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_all().await;
    }

    async fn kill_all(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn console_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
