//! `coordinator`: the cxrclip command line.
//!
//! Subcommands run one job each (a forward/backward check, a benchmark, data tools); without a
//! subcommand, `coordinator [--gpus N | --workers N --device cpu] [options]` is the training run
//! (see `run/`).

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench_cmd;
mod data_cmds;
mod device;
mod fb_cmd;
mod gpu_cmds;
mod init_cmd;
// The plan executor (issue 9) calls `report::write` after each finished run and prints
// `report::table` at the end; until it lands nothing in the binary calls the report.
#[allow(dead_code)]
mod report;
mod run;
mod sizes;

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "cxrclip: contrastive language supervision for chest radiographs",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: a CLS training run.
    #[command(flatten)]
    train: run::TrainArgs,
}

#[derive(Subcommand)]
enum Command {
    // Each subcommand's arguments and code live in their own module.
    /// Forward, CLIP loss and backward of a checkpoint on given inputs; writes every gradient.
    ForwardBackward(fb_cmd::ForwardBackwardArgs),
    /// Write a randomly initialised CLIP as a Hugging Face folder.
    Init(init_cmd::InitArgs),
    /// Benchmarks (`bench train-step`, ...).
    Bench(bench_cmd::BenchArgs),
    /// Write a synthetic dataset tree (MIMIC-CXR-JPG, CheXpert or RSNA layout).
    Synth(data_cmds::SynthArgs),
    /// Read a dataset root and print a JSON summary (and optionally some pairs).
    DataStats(data_cmds::DataStatsArgs),
    /// Decode a dataset once into memory-mappable shards plus a pairs table (resumable).
    Prepare(data_cmds::PrepareArgs),
    /// Every CUDA op against the CPU backend, and a training step (needs a GPU).
    GpuCheck(gpu_cmds::GpuCheckArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One clear line, non-zero exit: the error chain joined, not a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else { return run::run(cli.train) };
    match command {
        Command::ForwardBackward(a) => fb_cmd::run(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Init(a) => init_cmd::run(a),
        Command::Synth(a) => data_cmds::run_synth(a),
        Command::DataStats(a) => data_cmds::run_data_stats(a),
        Command::Prepare(a) => data_cmds::run_prepare(a),
        Command::GpuCheck(a) => gpu_cmds::run_gpu_check(a),
    }
}
