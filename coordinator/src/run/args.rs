//! The training run's command-line options (`TrainArgs`), also stored in `run.json` so that
//! `--resume` continues with the options the run started with.

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};
use worker::Device;

use super::train_opts::{self, Mode, ScheduleKind};
use crate::sizes::ModelSizes;

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
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    #[serde(default)]
    pub device: Device,
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
    #[command(flatten)]
    #[serde(flatten)]
    pub size: ModelSizes,
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
    /// Start afresh in a --run-dir that holds a run: deletes that run's checkpoints and
    /// metrics (without it, such a folder is refused).
    #[arg(long, conflicts_with = "resume")]
    #[serde(skip)]
    pub force: bool,
    /// Restarts from the last checkpoint after a worker dies, before giving up.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds without a heartbeat before a worker counts as dead.
    #[arg(long, default_value_t = 30)]
    pub heartbeat_timeout: u64,
    /// Seconds without a finished step (after the first) before the run counts as stuck and
    /// restarts from its checkpoint: a rank whose GPU or collective hangs keeps heartbeating.
    /// 0 (the default): 20 times the slowest step so far, and at least 300 s.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    #[serde(default)]
    pub step_timeout: u64,
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

pub(super) fn default_task() -> String {
    "cls".into()
}

pub(super) fn default_keep_checkpoints() -> usize {
    2
}
