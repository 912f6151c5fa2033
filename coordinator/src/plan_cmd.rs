//! Running a plan: `coordinator [--gpus N | --workers N --device cpu] PLAN.toml [--run-dir DIR]`,
//! and the demo (`coordinator` with no arguments, or `coordinator demo [--quick]`): the demo plan
//! compiled into the binary (also `plans/demo.toml`) on generated data, into `./runs/demo`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;

use crate::exec::{self, ExecOptions};
use crate::plan::{self, Overrides, Plan};
use crate::run::TrainArgs;

/// The demo plan, compiled in: a fresh clone runs it with nothing but the binary.
pub const DEMO: &str = include_str!("../../plans/demo.toml");
/// A tiny version of it, for an end-to-end test in CI time.
pub const DEMO_QUICK: &str = include_str!("../../plans/demo-quick.toml");

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The tiny demo (seconds, not minutes): the same runs on tiny data and models.
    #[arg(long)]
    pub quick: bool,
    /// The plan folder (default ./runs/demo, or ./runs/demo-quick with --quick).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Local CPU workers (default: one, using every core).
    #[arg(long, conflicts_with = "gpus")]
    pub workers: Option<usize>,
    /// One worker per GPU instead. Not the default yet: the CUDA runtime has not run the whole
    /// plan on a GPU.
    #[arg(long)]
    pub gpus: Option<usize>,
    /// Bootstrap resamples of every confidence interval.
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs { quick: false, run_dir: None, workers: None, gpus: None, resamples: 1000 }
    }
}

/// The demo: the compiled-in plan on generated trees (made on first use), on the local CPUs, or
/// the GPUs when there are some.
pub fn run_demo(a: DemoArgs) -> Result<()> {
    let (text, name, dir) = if a.quick {
        (DEMO_QUICK, "plans/demo-quick.toml (compiled in)", "runs/demo-quick")
    } else {
        (DEMO, "plans/demo.toml (compiled in)", "runs/demo")
    };
    let plan = parse_or_report(plan::parse_str(text, name, &Overrides::default()), name)?;
    let mut world = TrainArgs::defaults();
    match (a.workers, a.gpus) {
        (_, Some(n)) => world.gpus = Some(n),
        (Some(n), None) => world.workers = Some(n),
        (None, None) => world.workers = Some(1),
    }
    if !a.quick {
        // An 84 MB checkpoint every 10 steps cost the demo's CLS run ~10% of its time; a
        // restart now repeats at most 100 steps (under a minute). The quick demo keeps the
        // default, so that the tests' interrupted runs resume from a checkpoint.
        world.checkpoint_every = 100;
    }
    let dir = a.run_dir.unwrap_or_else(|| PathBuf::from(dir));
    run(&plan, world, &dir, "cxrclip demo study (generated data)", a.resamples)
}

/// A plan file on the world the training options describe.
pub fn run_file(path: &Path, world: TrainArgs) -> Result<()> {
    let plan = parse_or_report(plan::load(path, &Overrides::default()), &path.display().to_string())?;
    let stem = path.file_stem().map_or("plan".into(), |s| s.to_string_lossy().into_owned());
    let dir = world.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&stem));
    run(&plan, world, &dir, &format!("cxrclip: {}", path.display()), 1000)
}

fn parse_or_report(r: Result<Plan, Vec<plan::PlanError>>, name: &str) -> Result<Plan> {
    match r {
        Ok(p) => Ok(p),
        Err(problems) => {
            for p in &problems {
                eprintln!("{p}");
            }
            bail!("{name}: {} problem(s); nothing ran", problems.len())
        }
    }
}

fn run(plan: &Plan, mut world: TrainArgs, dir: &Path, title: &str, resamples: usize) -> Result<()> {
    if world.gpus.is_none() && world.workers.is_none() && world.expect_workers.is_none() {
        world.workers = Some(1);
    }
    // A plan on GPUs that are not there stops now, not after its data is generated.
    let local_cuda = world.gpus.or(world.workers.filter(|_| world.device == worker::Device::Cuda));
    if let Some(n) = local_cuda {
        crate::run::preflight_local_gpus(&world, n)?;
    }
    // The executor names each run's folder; these belong to single runs.
    world.run_dir = None;
    world.resume = None;
    let opts = ExecOptions {
        world,
        dir: dir.to_path_buf(),
        title: title.to_string(),
        bootstrap: eval::BootstrapConfig { resamples, ..eval::BootstrapConfig::default() },
        embed_batch: 64,
    };
    eprintln!("coordinator: plan of {} runs into {}", plan.runs.len(), dir.display());
    let report = exec::run_plan(plan, &opts)?;
    println!("{}", crate::report::table(&report));
    Ok(())
}
