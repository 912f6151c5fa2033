//! The plan's executor: runs a plan's runs in dependency order on the coordinator's workers
//! (training and fine-tuning jobs, feature extraction), fits the probes and scores zero-shot
//! prompts and retrieval here, and rewrites the report after each finished run.
//!
//! The plan folder holds `runs/<run>/` (one folder per expanded run; `done.json` marks a
//! finished one, so running the plan again skips it and continues an interrupted training run
//! from its checkpoint), `models/` (random initialisations), `features/<model>--<dataset>--<views>/`
//! (feature tables, shared by every evaluation of one model on one dataset), `data/` (generated
//! trees) and the report (`results.md`, `results.json`, `results.csv`, `plots/`).

pub mod datasets;
pub mod evaluate;
pub mod features;
pub mod models;
pub mod results;
pub mod text_to_image;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};

use crate::plan::{Job, Length, Mode, Plan, RunKind, RunSpec, Schedule, Start, SweepKey, Training};
use crate::report::{self, Ablation, Report};
use crate::run::{self, Finished, TrainArgs};

use evaluate::RowInfo;
use features::{EmbedRequest, FeatureTable, FEATURES};
use results::RunResult;

/// How the plan runs: the world (`--workers N --device cpu`, `--gpus N`, remote workers and
/// their serving options, as for a training run), the folder, and the statistics.
pub struct ExecOptions {
    pub world: TrainArgs,
    pub dir: PathBuf,
    pub title: String,
    pub bootstrap: eval::BootstrapConfig,
    /// Images per forward on each rank in feature extraction.
    pub embed_batch: usize,
}

/// The folders of a plan's run.
pub struct PlanDirs {
    pub root: PathBuf,
    pub runs: PathBuf,
    pub models: PathBuf,
    pub data: PathBuf,
    pub features: PathBuf,
}

impl PlanDirs {
    pub fn new(root: &Path) -> Result<PlanDirs> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = std::fs::canonicalize(root)?;
        Ok(PlanDirs {
            runs: root.join("runs"),
            models: root.join("models"),
            data: root.join("data"),
            features: root.join("features"),
            root,
        })
    }

    /// A run's folder name: its expanded name with the sweep brackets made path-friendly
    /// (`cls-lp[label_fraction=0.1]` -> `cls-lp@label_fraction=0.1`).
    pub fn slug(&self, name: &str) -> String {
        name.chars()
            .map(|c| match c {
                '[' => '@',
                ']' => '\0',
                ',' => '+',
                '/' | '\\' | ' ' => '_',
                c => c,
            })
            .filter(|&c| c != '\0')
            .collect()
    }

    pub fn run(&self, name: &str) -> PathBuf {
        self.runs.join(self.slug(name))
    }
}

/// Runs every run of `plan` not yet done, in order, rewriting the report after each; returns
/// the final report (also printed by the caller).
pub fn run_plan(plan: &Plan, opts: &ExecOptions) -> Result<Report> {
    let dirs = PlanDirs::new(&opts.dir)?;
    let mut roots = BTreeMap::new();
    for (name, spec) in &plan.data {
        roots.insert(name.clone(), datasets::root(name, spec, &dirs.data)?);
    }
    let total = plan.runs.len();
    let started = Instant::now();
    for (k, run) in plan.runs.iter().enumerate() {
        let dir = dirs.run(&run.name);
        if RunResult::read(&dir)?.is_some() {
            eprintln!("plan [{}/{total}] {}: done before, skipped", k + 1, run.name);
            continue;
        }
        eprintln!(
            "plan [{}/{total}] {} ({} from {} on {}; {:.0} s into the plan)",
            k + 1,
            run.name,
            run.kind(),
            run.from,
            run.dataset,
            started.elapsed().as_secs_f64()
        );
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t0 = Instant::now();
        let ctx = Ctx { plan, opts, dirs: &dirs, roots: &roots };
        let Some(mut result) = ctx.execute(run, &dir).with_context(|| format!("run {}", run.name))? else {
            bail!("interrupted during {}; run the same command again to continue where it stopped", run.name);
        };
        result.seconds = t0.elapsed().as_secs_f64();
        result.write(&dir)?;
        eprintln!("plan [{}/{total}] {}: done in {:.0} s", k + 1, run.name, result.seconds);
        let rep = results::gather(plan, &dirs, &opts.title, &opts.bootstrap)?;
        let written = report::write(&rep, &dirs.root)?;
        for note in &written.notes {
            eprintln!("report: {note}");
        }
    }
    let rep = results::gather(plan, &dirs, &opts.title, &opts.bootstrap)?;
    let written = report::write(&rep, &dirs.root)?;
    eprintln!("coordinator: the report ({} files) is in {}", written.files.len(), dirs.root.display());
    Ok(rep)
}

struct Ctx<'a> {
    plan: &'a Plan,
    opts: &'a ExecOptions,
    dirs: &'a PlanDirs,
    roots: &'a BTreeMap<String, PathBuf>,
}

impl Ctx<'_> {
    /// One run; `None` when it was interrupted.
    fn execute(&self, run: &RunSpec, dir: &Path) -> Result<Option<RunResult>> {
        let (checkpoint, key) = models::checkpoint_of(self.plan, self.dirs, &run.from, run.seed)?;
        let origin = self.origin_name(&run.from);
        let setting = results::setting(run.kind(), &origin);
        let mut result = RunResult {
            name: run.name.clone(),
            kind: run.kind().to_string(),
            setting: setting.clone(),
            dataset: run.dataset.clone(),
            checkpoint: None,
            metrics: None,
            rows: Vec::new(),
            zero_shot: Vec::new(),
            retrieval: Vec::new(),
            text_to_image: None,
            predictions: BTreeMap::new(),
            seconds: 0.0,
        };
        let (fraction, ablation) = ablation_of(run);
        match &run.job {
            Job::PretrainCls { train, data_fraction, .. } => {
                let mut a = self.train_args(run, train, &checkpoint, dir)?;
                a.train_fraction = *data_fraction;
                let Some(ckpt) = self.train(a)? else { return Ok(None) };
                result.checkpoint = Some(ckpt);
                result.metrics = Some(dir.join("metrics.jsonl"));
            }
            Job::Finetune { train, label_fraction, pos_weight, head_lr, .. } => {
                let spec = self.dataset(&run.dataset)?;
                let mut a = self.train_args(run, train, &checkpoint, dir)?;
                a.task = "finetune".into();
                a.labels = spec.labels.clone();
                a.no_pos_weight = !*pos_weight;
                a.head_lr = *head_lr;
                a.train_fraction = *label_fraction;
                let Some(last) = self.train(a)? else { return Ok(None) };
                let best = run::finetune::Best::read(dir).map_or(last, |b| b.checkpoint);
                result.checkpoint = Some(best.clone());
                result.metrics = Some(dir.join("metrics.jsonl"));
                for e in &run.test {
                    ensure!(
                        e.dataset == run.dataset,
                        "fine-tuning is scored on its own dataset ({} here)",
                        run.dataset
                    );
                    let table =
                        self.features(&best, &self.dirs.slug(&run.name), &e.dataset, run, spec.labels.clone())?;
                    let info = RowInfo {
                        run: &run.name,
                        setting: &setting,
                        kind: "finetune",
                        dataset: &e.dataset,
                        fraction,
                        ablation: ablation.clone(),
                        run_dir: dir,
                    };
                    let (row, path) = evaluate::head(&table, &info, &self.opts.bootstrap)?;
                    result.predictions.insert(format!("{}:{}", row.dataset, row.split), path);
                    result.rows.push(row);
                }
            }
            Job::LinearProbe { label_fraction, grid } => {
                for e in &run.test {
                    let table = self.features(&checkpoint, &key, &e.dataset, run, Vec::new())?;
                    let sub = if run.test.len() > 1 { dir.join(&e.dataset) } else { dir.to_path_buf() };
                    std::fs::create_dir_all(&sub)?;
                    let info = RowInfo {
                        run: &run.name,
                        setting: &setting,
                        kind: "linear-probe",
                        dataset: &e.dataset,
                        fraction,
                        ablation: ablation.clone(),
                        run_dir: &sub,
                    };
                    let (row, path) =
                        evaluate::linear_probe(&table, &info, *label_fraction, run.seed, grid, &self.opts.bootstrap)?;
                    result.predictions.insert(format!("{}:{}", row.dataset, row.split), path);
                    result.rows.push(row);
                }
            }
            Job::ZeroShot { templates } => {
                for e in &run.test {
                    let table = self.features(&checkpoint, &key, &e.dataset, run, Vec::new())?;
                    let info = RowInfo {
                        run: &run.name,
                        setting: &origin,
                        kind: "zero-shot",
                        dataset: &e.dataset,
                        fraction: None,
                        ablation: None,
                        run_dir: dir,
                    };
                    let rows = evaluate::zero_shot(&table, &checkpoint, templates, &info, &self.opts.bootstrap)?;
                    result.zero_shot.extend(rows);
                }
            }
            Job::Retrieval { .. } => {
                for e in &run.test {
                    let table = self.features(&checkpoint, &key, &e.dataset, run, Vec::new())?;
                    let info = RowInfo {
                        run: &run.name,
                        setting: &origin,
                        kind: "retrieval",
                        dataset: &e.dataset,
                        fraction: None,
                        ablation: None,
                        run_dir: dir,
                    };
                    result.retrieval.push(evaluate::retrieval(&table, &info)?);
                }
            }
            Job::TextToImage { findings, steps, size } => {
                let spec = self.dataset(&run.dataset)?;
                let root = self.root(&run.dataset)?;
                let ds = data::read(spec.kind, root, &datasets::read_options(spec, &run.views, 0))
                    .with_context(|| format!("reading {}", root.display()))?;
                let device = self.opts.world.device;
                let (mut row, generated) = text_to_image::run(
                    &checkpoint,
                    &ds,
                    findings,
                    *steps,
                    *size,
                    run.seed,
                    device,
                    dir,
                    &run.name,
                    &origin,
                )?;
                // Does each generated image score as its finding? A probe on the real features.
                let table = self.features(&checkpoint, &key, &run.dataset, run, Vec::new())?;
                let probe = evaluate::probe_generated(&table, &generated.final_embeddings)?;
                text_to_image::add_probe(&mut row, &probe);
                result.text_to_image = Some(row);
            }
        }
        // The full-data point of a fraction sweep is also the main table's row for its setting.
        let full: Vec<_> = result
            .rows
            .iter()
            .filter(|r| r.ablation.as_ref().is_some_and(|a| a.name.ends_with("fraction") && a.value == 1.0))
            .map(|r| crate::report::ResultRow { ablation: None, ..r.clone() })
            .collect();
        result.rows.extend(full);
        Ok(Some(result))
    }

    /// "rand", "CLIP", "CLS", "FT": what a run's model started as.
    fn origin_name(&self, start: &Start) -> String {
        match start {
            Start::Random => "rand".into(),
            Start::Init => "CLIP".into(),
            Start::Run(_) => match models::origin_kind(self.plan, start) {
                Some(RunKind::Finetune) => "FT".into(),
                _ => "CLS".into(),
            },
        }
    }

    fn dataset(&self, name: &str) -> Result<&crate::plan::DatasetSpec> {
        self.plan.data.get(name).ok_or_else(|| anyhow!("the plan has no dataset {name}"))
    }

    fn root(&self, name: &str) -> Result<&PathBuf> {
        self.roots.get(name).ok_or_else(|| anyhow!("the plan has no dataset {name}"))
    }

    /// The training options of a run, on the plan's world.
    fn train_args(&self, run: &RunSpec, t: &Training, init: &Path, dir: &Path) -> Result<TrainArgs> {
        let mut a = self.opts.world.clone();
        a.data = Some(self.root(&run.dataset)?.clone());
        a.synthetic = None;
        a.init = Some(init.to_path_buf());
        a.global_batch = t.global_batch;
        a.micro_batch = t.micro_batch;
        a.lr = t.lr;
        a.weight_decay = t.weight_decay;
        a.seed = run.seed;
        match t.length {
            Length::Epochs(e) => a.epochs = Some(e),
            Length::Steps(s) => a.steps = Some(s),
        }
        match t.schedule {
            Schedule::Cosine { warmup } => {
                a.schedule = run::ScheduleKind::Cosine;
                a.warmup = warmup;
                a.warmup_fraction = None;
            }
            Schedule::OneCycle { warmup_fraction } => {
                a.schedule = run::ScheduleKind::OneCycle;
                a.warmup = 0;
                a.warmup_fraction = Some(warmup_fraction);
            }
        }
        (a.beta1, a.beta2, a.eps) = (t.betas[0], t.betas[1], t.eps);
        match t.mode {
            Mode::Full => a.mode = run::Mode::Full,
            Mode::Adapters { width } => {
                a.mode = run::Mode::Adapters;
                a.adapter_width = Some(width);
            }
        }
        a.views = match &run.views {
            data::Views::All => "all".into(),
            data::Views::Only(v) => v.join(","),
        };
        a.uncertain = self.dataset(&run.dataset)?.uncertain.to_string();
        let aug = match &run.job {
            Job::PretrainCls { augment, sections, .. } => {
                a.sections = match sections {
                    data::report::SectionPolicy::Paper => "paper",
                    data::report::SectionPolicy::Impression => "impression",
                    data::report::SectionPolicy::FindingsImpression => "findings+impression",
                }
                .to_string();
                Some(augment)
            }
            Job::Finetune { augment, .. } => Some(augment),
            _ => None,
        };
        if let Some(g) = aug {
            a.augment_rotate = g.rotate;
            a.augment_scale = (g.scale[0], g.scale[1]);
            a.augment_translate = g.translate;
            a.no_shuffle_sentences = !g.shuffle_sentences;
        }
        a.run_dir = Some(dir.to_path_buf());
        // An interrupted run continues from its checkpoint.
        a.resume = dir.join("run.json").exists().then(|| dir.to_path_buf());
        Ok(a)
    }

    /// Trains to the end; the final checkpoint, or `None` when interrupted.
    fn train(&self, a: TrainArgs) -> Result<Option<PathBuf>> {
        let t = run::block_on(run::train(a))?;
        match t.finished {
            Finished::Done(_) => Ok(Some(run::checkpoint_dir(&t.run_dir, t.steps))),
            Finished::Interrupted => Ok(None),
        }
    }

    /// The feature table of `checkpoint` on `dataset` (with the run's view filter), made by an
    /// embed job on the workers the first time and read back after.
    fn features(
        &self,
        checkpoint: &Path,
        key: &str,
        dataset: &str,
        run: &RunSpec,
        head_labels: Vec<String>,
    ) -> Result<FeatureTable> {
        let views = match &run.views {
            data::Views::All => "all".to_string(),
            data::Views::Only(v) => v.join(","),
        };
        let dir = self.dirs.features.join(format!("{key}--{dataset}--{views}"));
        let path = dir.join(FEATURES);
        if path.exists() {
            return FeatureTable::read(&path);
        }
        let spec = self.dataset(dataset)?;
        let root = self.root(dataset)?;
        let ds = data::read(spec.kind, root, &datasets::read_options(spec, &run.views, 0))
            .with_context(|| format!("reading {}", root.display()))?;
        if !ds.problems.is_empty() {
            eprintln!("coordinator: {}: {}", root.display(), ds.problems.summary());
        }
        let (splits, reports) = datasets::tables(&ds, spec)?;
        let req = EmbedRequest::new(spec.labels.clone(), splits, reports);
        eprintln!("coordinator: embedding {} items of {dataset} with {}", req.items.len(), checkpoint.display());
        let parts = run::block_on(run::embed(run::EmbedJob {
            world: self.opts.world.clone(),
            run_dir: dir.clone(),
            checkpoint: checkpoint.to_path_buf(),
            data_root: ds.root.clone(),
            batch: self.opts.embed_batch,
            items: req.items.clone(),
        }))?;
        let table = req.merge(&parts, head_labels)?;
        if !table.skipped.is_empty() {
            eprintln!("coordinator: {dataset}: {} unreadable images left out", table.skipped.len());
        }
        table.write(&path)?;
        Ok(table)
    }
}

/// The row's label fraction and, for a swept run, the ablation it belongs to.
fn ablation_of(run: &RunSpec) -> (Option<f64>, Option<Ablation>) {
    let fraction = match &run.job {
        Job::LinearProbe { label_fraction, .. } | Job::Finetune { label_fraction, .. } => Some(*label_fraction),
        _ => None,
    };
    let ablation = run.sweep.first().map(|p| Ablation {
        name: match p.key {
            SweepKey::LabelFraction => "label fraction",
            SweepKey::DataFraction => "pretraining-data fraction",
            SweepKey::GlobalBatch => "global batch",
            SweepKey::Seed => "seed",
        }
        .to_string(),
        value: p.value.as_f64(),
    });
    (fraction, ablation)
}
