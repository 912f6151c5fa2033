//! The validated plan the executor consumes: datasets, the model, and the runs with their sweeps
//! expanded, in dependency order. Everything here is checked: ranges hold, names resolve, every
//! setting applies to its run's kind.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use data::report::SectionPolicy;
use data::{DatasetKind, Split, UncertainPolicy, Views};

/// A whole plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// By name; the name is the dataset's layout (`mimic`, `chexpert` or `rsna`).
    pub data: BTreeMap<String, DatasetSpec>,
    pub model: ModelSpec,
    /// Expanded runs, each after every run it starts from.
    pub runs: Vec<RunSpec>,
}

impl Plan {
    /// The run with this (expanded) name.
    #[allow(dead_code)] // the executor's look-up when it resumes a plan
    pub fn run(&self, name: &str) -> Option<&RunSpec> {
        self.runs.iter().find(|r| r.name == name)
    }
}

/// One dataset of `[data]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSpec {
    pub kind: DatasetKind,
    pub source: DataSource,
    /// The labels evaluated on this dataset, names from `data::LABELS`, in the plan's order.
    pub labels: Vec<String>,
    /// What uncertain (-1) and blank labels become.
    pub uncertain: UncertainPolicy,
    /// RSNA only: how patients are split (`None` for the other datasets).
    pub split: Option<data::RsnaSplit>,
    /// Fraction of training patients held out for validation where the dataset has no
    /// validation split (CheXpert, RSNA); `None`: the reader's default.
    pub valid_fraction: Option<f64>,
    /// RSNA only: fraction of patients held out for testing; `None`: the reader's default.
    pub test_fraction: Option<f64>,
}

/// Where a dataset's files come from.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    /// A tree as distributed (checked to exist).
    Path(PathBuf),
    /// A tree the executor generates (`coordinator synth` with these settings and the dataset's
    /// layout) when it does not exist yet.
    Synthetic { studies: usize, size: usize, seed: u64 },
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The Hugging Face CLIP folder that `from = "init"` loads (checked to hold config.json
    /// when a run needs it).
    pub init: Option<PathBuf>,
    /// What `from = "random"` builds.
    pub random: RandomModel,
}

/// The shapes of a randomly initialised model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomModel {
    /// The init folder's configuration with fresh weights (the paper's "random init").
    LikeInit,
    /// A small CLIP with the same sizes in both towers (`ClipConfig::small`).
    Sizes(ModelSizes),
}

pub use crate::sizes::ModelSizes;

/// The kinds of run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunKind {
    PretrainCls,
    Finetune,
    LinearProbe,
    ZeroShot,
    Retrieval,
    TextToImage,
}

impl RunKind {
    pub const ALL: [RunKind; 6] = [
        RunKind::PretrainCls,
        RunKind::Finetune,
        RunKind::LinearProbe,
        RunKind::ZeroShot,
        RunKind::Retrieval,
        RunKind::TextToImage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RunKind::PretrainCls => "pretrain-cls",
            RunKind::Finetune => "finetune",
            RunKind::LinearProbe => "linear-probe",
            RunKind::ZeroShot => "zero-shot",
            RunKind::Retrieval => "retrieval",
            RunKind::TextToImage => "text-to-image",
        }
    }

    /// Whether the run leaves a model that other runs can start from.
    pub fn produces_model(self) -> bool {
        matches!(self, RunKind::PretrainCls | RunKind::Finetune)
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a run starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Fresh weights (`ModelSpec::random`).
    Random,
    /// The init folder.
    Init,
    /// The result of another run (its expanded name, earlier in `Plan::runs`).
    Run(String),
}

impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Start::Random => f.write_str("random"),
            Start::Init => f.write_str("init"),
            Start::Run(r) => f.write_str(r),
        }
    }
}

/// An evaluated split: `dataset:split`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalSplit {
    pub dataset: String,
    pub split: Split,
}

impl fmt::Display for EvalSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self.split {
            Split::Train => "train",
            Split::Validate => "valid",
            Split::Test => "test",
        };
        write!(f, "{}:{s}", self.dataset)
    }
}

/// The settings a sweep varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SweepKey {
    DataFraction,
    LabelFraction,
    GlobalBatch,
    Seed,
}

impl SweepKey {
    /// In the order a run's own sweep is expanded (and named).
    pub const ALL: [SweepKey; 4] =
        [SweepKey::DataFraction, SweepKey::LabelFraction, SweepKey::GlobalBatch, SweepKey::Seed];

    pub fn name(self) -> &'static str {
        match self {
            SweepKey::DataFraction => "data_fraction",
            SweepKey::LabelFraction => "label_fraction",
            SweepKey::GlobalBatch => "global_batch",
            SweepKey::Seed => "seed",
        }
    }

    pub fn parse(s: &str) -> Option<SweepKey> {
        SweepKey::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A swept value: a fraction, or a count (batch, seed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SweepValue {
    Fraction(f64),
    Count(u64),
}

impl SweepValue {
    pub fn as_f64(self) -> f64 {
        match self {
            SweepValue::Fraction(v) => v,
            SweepValue::Count(v) => v as f64,
        }
    }
}

impl fmt::Display for SweepValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            // 1.0 prints as "1.0", not "1": the name reads as the fraction it is.
            SweepValue::Fraction(v) if v.fract() == 0.0 => write!(f, "{v:.1}"),
            SweepValue::Fraction(v) => write!(f, "{v}"),
            SweepValue::Count(v) => write!(f, "{v}"),
        }
    }
}

/// One value of a sweep that made an expanded run.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepPoint {
    pub key: SweepKey,
    pub value: SweepValue,
    /// The run (name in the file) whose `[run.sweep]` lists it: this run, or one it starts from.
    pub declared_by: String,
}

/// One expanded run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// Unique: the name in the file, plus `[key=value,...]` when sweeps made it.
    pub name: String,
    /// The `name` in the file.
    pub base: String,
    /// Line of the run's `name` in the plan file.
    pub line: usize,
    pub from: Start,
    /// Training dataset (finetune, linear-probe, pretrain-cls) or evaluated dataset.
    pub dataset: String,
    /// Evaluated splits (empty for pretrain-cls).
    pub test: Vec<EvalSplit>,
    pub views: Views,
    pub seed: u64,
    /// The sweep values that made this run, inherited ones (from the runs it starts from)
    /// first; empty when no sweep applies.
    pub sweep: Vec<SweepPoint>,
    pub job: Job,
}

impl RunSpec {
    pub fn kind(&self) -> RunKind {
        self.job.kind()
    }
}

/// What a run does, with the settings of its kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Job {
    PretrainCls {
        train: Training,
        data_fraction: f64,
        sections: SectionPolicy,
        augment: Augment,
    },
    /// `head_lr`: the head's peak learning rate (`None`: the run's `lr`).
    Finetune {
        train: Training,
        label_fraction: f64,
        pos_weight: bool,
        head_lr: Option<f64>,
        augment: Augment,
    },
    LinearProbe {
        label_fraction: f64,
        grid: ProbeGrid,
    },
    ZeroShot {
        templates: Templates,
    },
    Retrieval {
        sections: SectionPolicy,
    },
    /// Images optimised by CLIP guidance from a report sentence naming each finding, beside a
    /// real test image with that sentence (`coordinator imagine`'s optimisation).
    TextToImage {
        findings: Vec<String>,
        steps: usize,
        size: usize,
    },
}

/// The findings of the paper's figure.
pub const TEXT_TO_IMAGE_FINDINGS: [&str; 4] = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema"];
/// Optimisation steps of a text-to-image run unless `steps` says otherwise.
pub const TEXT_TO_IMAGE_STEPS: usize = 100;
/// Side of its images unless `image_size` says otherwise.
pub const TEXT_TO_IMAGE_SIZE: usize = 128;

impl Job {
    pub fn kind(&self) -> RunKind {
        match self {
            Job::PretrainCls { .. } => RunKind::PretrainCls,
            Job::Finetune { .. } => RunKind::Finetune,
            Job::LinearProbe { .. } => RunKind::LinearProbe,
            Job::ZeroShot { .. } => RunKind::ZeroShot,
            Job::Retrieval { .. } => RunKind::Retrieval,
            Job::TextToImage { .. } => RunKind::TextToImage,
        }
    }

    pub fn training(&self) -> Option<&Training> {
        match self {
            Job::PretrainCls { train, .. } | Job::Finetune { train, .. } => Some(train),
            _ => None,
        }
    }
}

/// The optimisation of a training run (pretrain-cls, finetune).
#[derive(Clone, Debug, PartialEq)]
pub struct Training {
    pub length: Length,
    pub global_batch: usize,
    /// Pairs per rank embedded at a time (gradient caching; `None`: the local batch at once).
    pub micro_batch: Option<usize>,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// AdamW's (beta1, beta2).
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    Epochs(u64),
    Steps(u64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// PyTorch's `OneCycleLR` with cosine annealing: the first `warmup_fraction` of the steps
    /// rise to the peak, the rest anneal.
    OneCycle { warmup_fraction: f64 },
    /// Linear warm-up over `warmup` steps, then cosine decay.
    Cosine { warmup: u64 },
}

/// Which parameters train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// All of them.
    Full,
    /// Bottleneck adapters of this width after every block of both towers, plus the layer norms.
    Adapters { width: usize },
}

/// The training augmentation (pixels, and sentence order for CLS).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Augment {
    /// Rotation drawn in [-rotate, rotate] degrees.
    pub rotate: f64,
    /// Scale drawn in [scale.0, scale.1].
    pub scale: [f64; 2],
    /// Translation drawn in [-translate, translate] times the image side, per axis.
    pub translate: f64,
    pub shuffle_sentences: bool,
}

impl Augment {
    /// The paper's (and the loader's): 45 degrees, scale 0.9-1.1, 15% shift, shuffled sentences.
    pub const PAPER: Augment = Augment { rotate: 45.0, scale: [0.9, 1.1], translate: 0.15, shuffle_sentences: true };
    pub const NONE: Augment = Augment { rotate: 0.0, scale: [1.0, 1.0], translate: 0.0, shuffle_sentences: false };
}

/// The linear probe's log-spaced grid of inverse regularisation strengths C.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeGrid {
    pub low: f64,
    pub high: f64,
    pub count: usize,
}

impl ProbeGrid {
    /// The grid's values, low to high, log-spaced.
    pub fn values(&self) -> Vec<f64> {
        if self.count == 1 {
            return vec![self.low];
        }
        let (a, b) = (self.low.ln(), self.high.ln());
        (0..self.count).map(|i| (a + (b - a) * i as f64 / (self.count - 1) as f64).exp()).collect()
    }
}

/// Zero-shot prompts. `{label}` stands for the label's name in lower case.
#[derive(Clone, Debug, PartialEq)]
pub struct Templates {
    /// Paired with `negative` by position: a softmax over each pair, averaged over the pairs.
    pub positive: Vec<String>,
    pub negative: Vec<String>,
    /// The label-free prompt of the neutral-prompt score (cosine to the label prompt minus
    /// cosine to this one).
    pub neutral: String,
}

impl Default for Templates {
    fn default() -> Self {
        Templates {
            positive: vec!["{label}".into()],
            negative: vec!["no {label}".into()],
            neutral: "a chest x-ray".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_grid_is_log_spaced_between_its_ends() {
        let g = ProbeGrid { low: 1e-3, high: 1e3, count: 13 };
        let v = g.values();
        assert_eq!(v.len(), 13);
        // Hand values: 10^(-3 + i/2).
        for (i, x) in v.iter().enumerate() {
            let want = 10f64.powf(-3.0 + i as f64 * 0.5);
            assert!((x - want).abs() <= 1e-12 + 1e-12 * want, "{i}: {x} vs {want}");
        }
        assert_eq!(ProbeGrid { low: 0.5, high: 0.5, count: 1 }.values(), vec![0.5]);
    }

    #[test]
    fn sweep_values_print_as_written() {
        assert_eq!(SweepValue::Fraction(1.0).to_string(), "1.0");
        assert_eq!(SweepValue::Fraction(0.03).to_string(), "0.03");
        assert_eq!(SweepValue::Count(576).to_string(), "576");
    }
}
