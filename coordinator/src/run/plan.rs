//! Everything a run resolves before a worker starts: the options (stored ones on `--resume`),
//! the run folder, the world and its device, and for CUDA the model against the kernels' limits
//! and the local GPUs and libraries. Whatever is wrong is one line here, not a worker restarted.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use worker::Device;

use super::folder::{self, random_hex, RunLock, RunRecord};
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
    /// The run folder's lock, held while the plan lives (`None`: a job that needs none).
    pub(super) _lock: Option<RunLock>,
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

/// Options a resumed run takes from the command line when given (they change how the run is
/// served and supervised, not what it trains); the world flags and `--steps` are handled apart.
const APPLIED_ON_RESUME: &[&str] = &[
    "listen",
    "device",
    "worker_bin",
    "max_restarts",
    "heartbeat_timeout",
    "step_timeout",
    "register_timeout",
    "keep_checkpoints",
    "tls_cert",
    "tls_key",
    "loader_threads",
];

/// The options of a resumed run: the stored ones, with the world the operator gives now (when
/// given), `--steps` (when given: the schedule is then that of the new total, see the README),
/// and the options of [`APPLIED_ON_RESUME`] given now (each said). Any other option given with
/// a value other than the run's is refused in one line naming it: `--resume` continues a run,
/// it does not change what it trains.
fn resumed_options(dir: &std::path::Path, mut stored: TrainArgs, given: &TrainArgs) -> Result<TrainArgs> {
    let defaults = serde_json::to_value(TrainArgs::defaults())?;
    let now = serde_json::to_value(given)?;
    let before = serde_json::to_value(&stored)?;
    const WORLD_AND_LENGTH: &[&str] = &["workers", "gpus", "expect_workers", "steps", "resume", "run_dir"];
    let mut applied = serde_json::Map::new();
    if let (Some(now), Some(defaults)) = (now.as_object(), defaults.as_object()) {
        for (key, value) in now {
            if WORLD_AND_LENGTH.contains(&key.as_str()) || defaults.get(key) == Some(value) {
                continue;
            }
            let was = &before[key.as_str()];
            if was == value {
                continue;
            }
            let flag = format!("--{}", key.replace('_', "-"));
            ensure!(
                APPLIED_ON_RESUME.contains(&key.as_str()),
                "{flag} {}: the run in {} trained with {}; --resume continues it as it started (leave the flag out, or start a new run in another --run-dir)",
                show(value),
                dir.display(),
                show(was)
            );
            eprintln!("coordinator: --resume: {flag} {} (the run had {})", show(value), show(was));
            applied.insert(key.clone(), value.clone());
        }
    }
    if !applied.is_empty() {
        let mut merged = before;
        if let Some(m) = merged.as_object_mut() {
            m.extend(applied);
        }
        stored = serde_json::from_value(merged).context("applying the options given on --resume")?;
    }
    if given.workers.is_some() || given.gpus.is_some() || given.expect_workers.is_some() {
        stored.workers = given.workers;
        stored.gpus = given.gpus;
        stored.expect_workers = given.expect_workers;
    }
    if let Some(steps) = given.steps.filter(|&s| Some(s) != stored.steps) {
        let was = stored.steps.map_or("one epoch".to_string(), |s| format!("{s} steps"));
        eprintln!("coordinator: --resume: --steps {steps} (the run had {was}); the schedule now spans {steps} steps");
        stored.steps = Some(steps);
    }
    stored.resume = None;
    Ok(stored)
}

/// An option's value as the operator would type it.
fn show(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "(none)".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => a.iter().map(show).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub(super) fn plan(mut args: TrainArgs) -> Result<Plan> {
    let resumed = args.resume.is_some();
    let (run_dir, run_id, last_checkpoint) = if let Some(dir) = args.resume.clone() {
        let path = dir.join("run.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("--resume {}: no run.json there", dir.display()))?;
        let rec: RunRecord = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // The stored options, with the world, the step count and the operational settings the
        // operator gives now; a training option given that differs from the run's is refused.
        args = resumed_options(&dir, rec.args, &args)?;
        (dir, rec.run_id, rec.last_checkpoint)
    } else {
        // Bad training options are refused before an older run in the folder is cleared.
        train_opts::validate(&mut args)?;
        ensure!(
            args.init.is_none() || args.size == crate::sizes::DEFAULT,
            "--init {} sets the model's sizes: leave out --image, --patch, --width, --layers and --heads",
            args.init.as_deref().map_or(String::new(), |p| p.display().to_string())
        );
        train_opts::model_config(&args)?;
        let dir = args.run_dir.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            PathBuf::from("runs").join(format!("run-{t}"))
        });
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
    ensure!(args.heartbeat_timeout > 0, "--heartbeat-timeout must be at least 1 second");
    ensure!(args.register_timeout > 0, "--register-timeout must be at least 1 second");
    // (Again for a resumed run: its stored options, the defaults filled in for older ones.)
    train_opts::validate(&mut args)?;
    // The folder is locked for the run's life before anything in it is read for the run or
    // changed; a fresh start is refused where a run is (unless --force).
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let lock = RunLock::take(&run_dir)?;
    if !resumed {
        folder::clear_for_fresh_start(&run_dir, args.force)?;
    }
    folder::clean_leftovers(&run_dir)?;
    let last_checkpoint = if resumed { folder::resumable_step(&run_dir, last_checkpoint) } else { 0 };
    Ok(Plan { steps: 0, resumed, args, run_dir, run_id, last_checkpoint, world, local, device, _lock: Some(lock) })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn given(flags: &[&str]) -> TrainArgs {
        let mut argv = vec!["coordinator", "--resume", "/runs/r"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().train
    }

    /// What the run was started with.
    fn stored() -> TrainArgs {
        Cli::try_parse_from([
            "coordinator",
            "--workers",
            "2",
            "--synthetic",
            "96",
            "--width",
            "64",
            "--lr",
            "0.001",
            "--steps",
            "12",
        ])
        .unwrap()
        .train
    }

    #[test]
    fn a_training_option_that_differs_from_the_runs_is_refused_naming_it() {
        let dir = std::path::Path::new("/runs/r");
        for (flags, want) in [
            (&["--lr", "0.01"][..], "--lr 0.01: the run in /runs/r trained with 0.001"),
            (&["--width", "32"], "--width 32: the run in /runs/r trained with 64"),
            (&["--seed", "3"], "--seed 3"),
            (&["--augment-scale", "0.5,1"], "--augment-scale 0.5,1"),
            (&["--synthetic", "8"], "--synthetic 8"),
        ] {
            let e = resumed_options(dir, stored(), &given(flags)).expect_err("accepted").to_string();
            assert!(e.contains(want), "{flags:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_world_steps_and_operational_options_given_on_resume_apply() {
        let dir = std::path::Path::new("/runs/r");
        // The run's own values given again are no conflict.
        let a = resumed_options(dir, stored(), &given(&["--lr", "0.001", "--width", "64"])).unwrap();
        assert_eq!((a.lr, a.size.width, a.steps, a.workers), (0.001, 64, Some(12), Some(2)));
        let a = resumed_options(
            dir,
            stored(),
            &given(&["--gpus", "4", "--steps", "20", "--max-restarts", "7", "--listen", "0.0.0.0:50051"]),
        )
        .unwrap();
        assert_eq!((a.gpus, a.workers, a.steps, a.max_restarts), (Some(4), None, Some(20), 7));
        assert_eq!((a.listen.as_str(), a.lr, a.size.width, a.synthetic), ("0.0.0.0:50051", 0.001, 64, Some(96)));
        assert!(a.resume.is_none());
        // Nothing given: the stored run as it was (and the stored address, not the default).
        let mut s = stored();
        s.listen = "0.0.0.0:6000".into();
        let a = resumed_options(dir, s, &given(&[])).unwrap();
        assert_eq!((a.listen.as_str(), a.workers, a.steps), ("0.0.0.0:6000", Some(2), Some(12)));
    }
}
