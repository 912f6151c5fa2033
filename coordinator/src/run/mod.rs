//! The training run: `coordinator [--gpus N | --workers N --device cpu] [options]`.
//!
//! The coordinator resolves the data and the model ([`plan`], [`data_source`]), serves
//! `cxrclip.v1.Coordinator` ([`server`]), spawns one `worker` process per CPU rank or GPU (or
//! waits for `--expect-workers` started elsewhere), and supervises them ([`supervisor`]):
//! metrics into `metrics.jsonl` and the progress bar, checkpoints recorded in `run.json`
//! ([`folder`]), and on a dead worker (exit, kill, heartbeat timeout) every worker stopped and
//! the job restarted from the last checkpoint, up to `--max-restarts` times. The options are
//! [`args`]; what they mean for the job, [`train_opts`].

mod args;
mod data_source;
pub mod finetune;
mod folder;
pub mod index;
mod plan;
mod retention;
mod server;
#[cfg(test)]
mod server_fuzz;
mod supervisor;
mod train_opts;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use proto::v1::Job;

pub use args::TrainArgs;
pub use folder::{checkpoint_dir, write_json_atomically, RunRecord};
use index::PairIndex;
pub use plan::{preflight_local_gpus, Plan};
pub use supervisor::{launch, Finished, OnValidation};
pub use train_opts::{Mode, ScheduleKind};

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

async fn train_inner(args: TrainArgs) -> Result<(Finished, PathBuf, u64, u64)> {
    let mut p = plan::plan(args)?;
    let a = p.args.clone();
    let config = train_opts::model_config(&a)?;
    let root = match (&a.data, a.synthetic) {
        (Some(d), _) => d.clone(),
        (None, Some(n)) => data_source::synthetic_tree(&a, n)?,
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
    let token = folder::token(&run_dir, p.resumed)?;
    let mut record =
        RunRecord { run_id: p.run_id.clone(), args: a.clone(), last_checkpoint: p.last_checkpoint, finished: false };
    write_json_atomically(&run_dir.join("run.json"), &record)?;
    folder::truncate_metrics(&run_dir.join("metrics.jsonl"), p.last_checkpoint)?;

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
        device: p.device.name().into(),
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
    let (world, local, device) = plan::world_of(&args)?;
    fs::create_dir_all(&e.run_dir).with_context(|| format!("creating {}", e.run_dir.display()))?;
    let run_dir = fs::canonicalize(&e.run_dir)?;
    let parts_dir = run_dir.join("parts");
    let _ = fs::remove_dir_all(&parts_dir);
    let run_id = folder::random_hex(8);
    let token = folder::token(&run_dir, false)?;
    let p = Plan {
        args: args.clone(),
        run_dir: run_dir.clone(),
        run_id: run_id.clone(),
        last_checkpoint: 0,
        world,
        local,
        device,
        steps: 1,
        resumed: false,
        _lock: Some(folder::RunLock::take(&run_dir)?),
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
        device: device.name().into(),
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
