//! `coordinator`: the cxrclip command line.
//!
//! Subcommands run one job each (a forward/backward check, a benchmark, data tools, the demo);
//! without a subcommand, `coordinator [--gpus N | --workers N --device cpu] PLAN.toml` runs a
//! plan (see `exec/`), `coordinator [--gpus N | --workers N --device cpu] [options]` is a single
//! training run (see `run/`), and `coordinator` alone runs the demo study.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod bench_cmd;
mod bench_feed;
mod data_cmds;
mod estimate;
mod exec;
mod fb_cmd;
mod gpu_cmds;
mod imagine;
mod init_cmd;
mod plan;
mod plan_cmd;
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
    /// A plan file (TOML; see docs/plans.md): runs its runs in order on the workers the options
    /// give, into --run-dir (default runs/<plan name>), resuming where it stopped.
    plan: Option<std::path::PathBuf>,
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
    /// Memory and time of a training step per GPU for a cluster run, before booking it.
    Estimate(estimate::EstimateArgs),
    /// Write a synthetic dataset tree (MIMIC-CXR-JPG, CheXpert or RSNA layout).
    Synth(data_cmds::SynthArgs),
    /// Read a dataset root and print a JSON summary (and optionally some pairs).
    DataStats(data_cmds::DataStatsArgs),
    /// Decode a dataset once into memory-mappable shards plus a pairs table (resumable).
    Prepare(data_cmds::PrepareArgs),
    /// Every CUDA op against the CPU backend, and a training step (needs a GPU); `--op NAME`
    /// checks one op family.
    GpuCheck(gpu_cmds::GpuCheckArgs),
    /// The demo study on generated data (what `coordinator` alone runs): CLS, probes,
    /// fine-tuning, zero-shot and retrieval, into ./runs/demo; prints the table.
    Demo(plan_cmd::DemoArgs),
    /// One rank of a run (what the coordinator starts for its local workers; the `worker`
    /// binary is the same code for other nodes).
    #[command(hide = true)]
    Worker(worker::cli::Args),
    /// Check an experiment plan and print its runs in the order they would go.
    CheckPlan(plan::check_cmd::CheckPlanArgs),
    /// Images optimised to match prompts by CLIP guidance: one PNG per prompt and a grid.
    Imagine(imagine::ImagineArgs),
}

/// The heap metered, so that `bench kernels --device cpu` reports each op's own peak heap use.
#[global_allocator]
static HEAP: kernels::cpu::heap::Metered = kernels::cpu::heap::Metered;

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One clear line, non-zero exit: the error chain joined, not a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let Some(command) = cli.command else {
        if let Some(plan) = &cli.plan {
            return plan_cmd::run_file(plan, cli.train);
        }
        if std::env::args_os().len() == 1 {
            return plan_cmd::run_demo(plan_cmd::DemoArgs::default());
        }
        return run::run(cli.train);
    };
    match command {
        Command::ForwardBackward(a) => fb_cmd::run(a),
        Command::Bench(a) => bench_cmd::run(a),
        Command::Init(a) => init_cmd::run(a),
        Command::Estimate(a) => estimate::run(a),
        Command::Synth(a) => data_cmds::run_synth(a),
        Command::DataStats(a) => data_cmds::run_data_stats(a),
        Command::Prepare(a) => data_cmds::run_prepare(a),
        Command::GpuCheck(a) => gpu_cmds::run_gpu_check(a),
        Command::Demo(a) => plan_cmd::run_demo(a),
        Command::Worker(a) => std::process::exit(worker::cli::main_with(a)),
        Command::CheckPlan(a) => plan::check_cmd::run(a),
        Command::Imagine(a) => imagine::run(a),
    }
}
