//! The training choices of a run (mode and adapters, schedule, AdamW, data policies,
//! augmentation): validated before anything starts, each bad value refused in one line that
//! names its flag, then turned into the model config, the reader's options and the job's
//! `TrainOptions`.

use std::path::Path;

use anyhow::{bail, ensure, Result};
use clap::ValueEnum;
use data::report::SectionPolicy;
use data::{UncertainPolicy, Views};
use model::ClipConfig;
use proto::v1::TrainOptions;
use serde::{Deserialize, Serialize};

use super::TrainArgs;

/// What trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every parameter.
    #[default]
    Full,
    /// The adapters and the layer norms only.
    Adapters,
}

impl Mode {
    /// The name the job carries (and the flag takes).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Adapters => "adapters",
        }
    }
}

/// The learning-rate schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warm-up over --warmup steps, then a cosine decay to 0.
    #[default]
    Cosine,
    /// PyTorch's OneCycleLR with cosine annealing.
    OneCycle,
}

impl ScheduleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::OneCycle => "one-cycle",
        }
    }
}

/// One-cycle's warm-up fraction when none is given: PyTorch's `pct_start` default.
pub const DEFAULT_WARMUP_FRACTION: f64 = 0.3;

// The defaults of the options a run.json written before they existed lacks: the flags'
// defaults, which are what those runs trained with.
pub fn default_beta1() -> f64 {
    0.9
}
pub fn default_beta2() -> f64 {
    0.98
}
pub fn default_eps() -> f64 {
    1e-6
}
pub fn default_views() -> String {
    "PA,AP".into()
}
pub fn default_sections() -> String {
    "paper".into()
}
pub fn default_uncertain() -> String {
    "zeros".into()
}
pub fn default_augment_rotate() -> f64 {
    45.0
}
pub fn default_augment_scale() -> (f64, f64) {
    (0.9, 1.1)
}
pub fn default_augment_translate() -> f64 {
    0.15
}

/// `--augment-scale LO,HI`.
pub fn parse_scale(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("expected LO,HI such as 0.9,1.1, got {s:?}");
    let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
    let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
    let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
    Ok((lo, hi))
}

/// Checks every training choice; fills in one-cycle's default warm-up fraction, so that
/// `run.json` records the value the run used.
pub fn validate(a: &mut TrainArgs) -> Result<()> {
    if let Some(w) = a.adapter_width {
        ensure!(w > 0, "--adapter-width must be positive");
    }
    match a.schedule {
        ScheduleKind::Cosine => {
            if let Some(f) = a.warmup_fraction {
                bail!("--warmup-fraction {f} belongs to --schedule one-cycle; cosine warms up over --warmup steps");
            }
        }
        ScheduleKind::OneCycle => {
            ensure!(
                a.warmup == 0,
                "--warmup {} counts warm-up steps of --schedule cosine; one-cycle takes --warmup-fraction",
                a.warmup
            );
            let f = *a.warmup_fraction.get_or_insert(DEFAULT_WARMUP_FRACTION);
            ensure!((0.0..=1.0).contains(&f), "--warmup-fraction {f} must be in [0, 1]");
        }
    }
    for (flag, beta) in [("--beta1", a.beta1), ("--beta2", a.beta2)] {
        ensure!((0.0..1.0).contains(&beta), "{flag} {beta} must be in [0, 1)");
    }
    ensure!(a.eps.is_finite() && a.eps > 0.0, "--eps {} must be positive", a.eps);
    ensure!(a.weight_decay.is_finite() && a.weight_decay >= 0.0, "--weight-decay {} must be 0 or more", a.weight_decay);
    read_options(a)?;
    ensure!(
        (0.0..=180.0).contains(&a.augment_rotate),
        "--augment-rotate {} must be in [0, 180] degrees",
        a.augment_rotate
    );
    let (lo, hi) = a.augment_scale;
    ensure!(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi, "--augment-scale {lo},{hi} needs 0 < LO <= HI");
    ensure!(
        (0.0..=1.0).contains(&a.augment_translate),
        "--augment-translate {} must be in [0, 1] (a fraction of the image side)",
        a.augment_translate
    );
    if let Some(n) = a.loader_threads {
        ensure!(n > 0, "--loader-threads must be at least 1 (leave it out to size them from the cores)");
        ensure!(n <= 1024, "--loader-threads {n}: more threads than any node has cores");
    }
    if let Some(m) = a.micro_batch {
        ensure!(m > 0, "--micro-batch must be at least 1 pair (leave it out to embed the local batch in one pass)");
        ensure!(u32::try_from(m).is_ok(), "--micro-batch {m}: more pairs than a job can carry");
    }
    Ok(())
}

/// The model: `--init`'s config or a small random CLIP of the size flags, with adapters of
/// `--adapter-width` (an `--init` that has adapters keeps them).
pub fn model_config(a: &TrainArgs) -> Result<ClipConfig> {
    let mut config = match &a.init {
        Some(dir) => ClipConfig::from_file(&dir.join(model::checkpoint::CONFIG))?,
        None => {
            a.size.check()?;
            a.size.config()
        }
    };
    match (a.adapter_width, config.adapter_dim) {
        (Some(w), Some(have)) if w != have => bail!(
            "--adapter-width {w}: the --init model in {} has adapters of width {have}",
            a.init.as_deref().map_or(Path::new(""), |p| p).display()
        ),
        (Some(w), _) => config.adapter_dim = Some(w),
        (None, _) => {}
    }
    ensure!(
        a.mode != Mode::Adapters || config.adapter_dim.is_some(),
        "--mode adapters needs --adapter-width N (or an --init model that has adapters)"
    );
    Ok(config)
}

/// How the pairs are read: the views kept, the report's sections, the label policy.
pub fn read_options(a: &TrainArgs) -> Result<data::ReadOptions> {
    let views: Views = a.views.parse().map_err(|_| {
        anyhow::anyhow!("--views {:?}: expected 'all' or a comma-separated list such as PA,AP", a.views)
    })?;
    let sections: SectionPolicy = a.sections.parse().map_err(|e| anyhow::anyhow!("--sections: {e}"))?;
    let uncertain: UncertainPolicy = a.uncertain.parse().map_err(|e| anyhow::anyhow!("--uncertain: {e}"))?;
    Ok(data::ReadOptions { views, sections, uncertain, seed: a.seed, ..Default::default() })
}

/// The job's training options (from validated arguments).
pub fn job_options(a: &TrainArgs) -> Result<TrainOptions> {
    let uncertain: UncertainPolicy = a.uncertain.parse().map_err(|e| anyhow::anyhow!("--uncertain: {e}"))?;
    Ok(TrainOptions {
        mode: a.mode.as_str().into(),
        schedule: a.schedule.as_str().into(),
        warmup_fraction: a.warmup_fraction.unwrap_or(0.0),
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        augment_rotate_deg: a.augment_rotate,
        augment_scale_lo: a.augment_scale.0,
        augment_scale_hi: a.augment_scale.1,
        augment_translate: a.augment_translate,
        shuffle_sentences: !a.no_shuffle_sentences,
        uncertain: uncertain.to_string(),
        loader_threads: a.loader_threads.map_or(Ok(0), u32::try_from)?,
        micro_batch: a.micro_batch.map_or(Ok(0), u32::try_from)?,
    })
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

    fn parse(extra: &[&str]) -> Result<TrainArgs, clap::Error> {
        let mut argv = vec!["coordinator", "--workers", "1", "--synthetic", "8"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.train)
    }

    fn validated(extra: &[&str]) -> Result<TrainArgs> {
        let mut a = parse(extra).map_err(|e| anyhow::anyhow!("{e}"))?;
        validate(&mut a)?;
        Ok(a)
    }

    #[test]
    fn the_papers_options_parse_and_reach_the_job() {
        let a = validated(&[
            "--mode",
            "adapters",
            "--adapter-width",
            "16",
            "--schedule",
            "one-cycle",
            "--warmup-fraction",
            "0.05",
            "--beta1",
            "0.8",
            "--beta2",
            "0.95",
            "--eps",
            "1e-8",
            "--views",
            "all",
            "--sections",
            "findings+impression",
            "--uncertain",
            "ignore",
            "--augment-rotate",
            "10",
            "--augment-scale",
            "0.8, 1.25",
            "--augment-translate",
            "0.05",
            "--no-shuffle-sentences",
            "--loader-threads",
            "3",
            "--micro-batch",
            "4",
        ])
        .unwrap();
        assert_eq!((a.mode, a.adapter_width, a.schedule), (Mode::Adapters, Some(16), ScheduleKind::OneCycle));
        let o = job_options(&a).unwrap();
        let want = TrainOptions {
            mode: "adapters".into(),
            schedule: "one-cycle".into(),
            warmup_fraction: 0.05,
            beta1: 0.8,
            beta2: 0.95,
            eps: 1e-8,
            augment_rotate_deg: 10.0,
            augment_scale_lo: 0.8,
            augment_scale_hi: 1.25,
            augment_translate: 0.05,
            shuffle_sentences: false,
            uncertain: "ignore".into(),
            loader_threads: 3,
            micro_batch: 4,
        };
        assert_eq!(o, want);
        let r = read_options(&a).unwrap();
        assert_eq!(
            (r.views, r.sections, r.uncertain),
            (Views::All, SectionPolicy::FindingsImpression, UncertainPolicy::Ignore)
        );
        let c = model_config(&a).unwrap();
        assert_eq!(c.adapter_dim, Some(16));
        assert_eq!(c.vision_config.hidden_size, 128);
    }

    /// The flags' defaults are today's training (and what a run.json without the keys gets).
    #[test]
    fn defaults_are_the_training_before_these_options() {
        let a = validated(&[]).unwrap();
        let o = job_options(&a).unwrap();
        assert_eq!((o.mode.as_str(), o.schedule.as_str(), o.warmup_fraction), ("full", "cosine", 0.0));
        assert_eq!((o.beta1, o.beta2, o.eps), (0.9, 0.98, 1e-6));
        assert_eq!((o.augment_rotate_deg, o.augment_scale_lo, o.augment_scale_hi), (45.0, 0.9, 1.1));
        assert_eq!((o.augment_translate, o.shuffle_sentences, o.uncertain.as_str()), (0.15, true, "zeros"));
        assert_eq!(o.micro_batch, 0);
        let r = read_options(&a).unwrap();
        let before = data::ReadOptions::default();
        assert_eq!((r.views, r.sections, r.uncertain), (before.views, before.sections, before.uncertain));
        assert_eq!(model_config(&a).unwrap().adapter_dim, None);
        // One-cycle without a fraction takes PyTorch's default, recorded.
        let a = validated(&["--schedule", "one-cycle"]).unwrap();
        assert_eq!(a.warmup_fraction, Some(DEFAULT_WARMUP_FRACTION));
        // The names the job carries are the flags' (and run.json's) names.
        for m in Mode::value_variants() {
            assert_eq!(m.to_possible_value().unwrap().get_name(), m.as_str());
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        for s in ScheduleKind::value_variants() {
            assert_eq!(s.to_possible_value().unwrap().get_name(), s.as_str());
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    /// A run.json written before these options existed still loads, with the flags' defaults.
    #[test]
    fn an_older_run_json_loads_with_the_defaults() {
        let old = r#"{
          "run_id": "0123456789abcdef",
          "args": {
            "gpus": null, "workers": 2, "device": "cpu", "expect_workers": null,
            "listen": "127.0.0.1:0", "data": null, "synthetic": 96, "synthetic_dir": "/tmp/t",
            "synthetic_size": 64, "train_fraction": 1.0, "init": null, "image": 32, "patch": 8,
            "width": 64, "layers": 2, "heads": 2, "steps": 12, "epochs": null,
            "global_batch": 16, "lr": 0.0005, "warmup": 0, "weight_decay": 0.2, "seed": 7,
            "checkpoint_every": 4, "run_dir": "/tmp/r", "resume": null, "max_restarts": 3,
            "heartbeat_timeout": 30, "register_timeout": 300, "tls_cert": null, "tls_key": null,
            "worker_bin": null
          },
          "last_checkpoint": 8,
          "finished": false
        }"#;
        let rec: super::super::RunRecord = serde_json::from_str(old).unwrap();
        let flags = parse(&[]).unwrap();
        let a = rec.args;
        assert_eq!(
            (a.mode, a.adapter_width, a.schedule, a.warmup_fraction),
            (Mode::Full, None, ScheduleKind::Cosine, None)
        );
        assert_eq!((a.beta1, a.beta2, a.eps), (flags.beta1, flags.beta2, flags.eps));
        assert_eq!((&a.views, &a.sections, &a.uncertain), (&flags.views, &flags.sections, &flags.uncertain));
        assert_eq!(
            (a.augment_rotate, a.augment_scale, a.augment_translate),
            (flags.augment_rotate, flags.augment_scale, flags.augment_translate)
        );
        assert_eq!(a.no_shuffle_sentences, flags.no_shuffle_sentences);
        // And the options written now come back as written.
        let mut now = validated(&["--mode", "adapters", "--adapter-width", "4", "--schedule", "one-cycle"]).unwrap();
        now.augment_scale = (0.75, 1.0);
        let back: TrainArgs = serde_json::from_str(&serde_json::to_string(&now).unwrap()).unwrap();
        assert_eq!(job_options(&back).unwrap(), job_options(&now).unwrap());
        assert_eq!((back.mode, back.adapter_width), (Mode::Adapters, Some(4)));
    }

    #[test]
    fn bad_values_are_refused_in_one_line_naming_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--adapter-width", "0"], "--adapter-width"),
            (&["--mode", "adapters"], "--mode adapters needs --adapter-width"),
            (&["--warmup-fraction", "0.1"], "--warmup-fraction"),
            (&["--schedule", "one-cycle", "--warmup", "5"], "--warmup 5"),
            (&["--schedule", "one-cycle", "--warmup-fraction", "1.5"], "--warmup-fraction 1.5"),
            (&["--schedule", "one-cycle", "--warmup-fraction", "NaN"], "--warmup-fraction NaN"),
            (&["--beta1", "1"], "--beta1"),
            (&["--beta2=-0.5"], "--beta2"),
            (&["--eps", "0"], "--eps"),
            (&["--weight-decay=-1"], "--weight-decay"),
            (&["--views", ","], "--views"),
            (&["--sections", "summary"], "--sections"),
            (&["--uncertain", "maybe"], "--uncertain"),
            (&["--augment-rotate", "270"], "--augment-rotate"),
            (&["--augment-rotate=-5"], "--augment-rotate"),
            (&["--augment-scale", "1.2,0.8"], "--augment-scale"),
            (&["--augment-scale", "0,1"], "--augment-scale"),
            (&["--augment-translate", "2"], "--augment-translate"),
            (&["--micro-batch", "0"], "--micro-batch"),
        ];
        for (flags, want) in cases {
            let e = validated(flags).and_then(|a| model_config(&a).map(drop)).expect_err("accepted").to_string();
            assert!(e.contains(want), "{flags:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{flags:?}: {e}");
        }
        // Values that are not numbers or names are refused by the parser, naming the flag.
        for flags in
            [&["--mode", "partial"][..], &["--schedule", "linear"], &["--augment-scale", "0.9"], &["--beta1", "x"]]
        {
            let e = parse(flags).expect_err("parsed").to_string();
            assert!(e.lines().next().unwrap().contains(flags[0]), "{e}");
        }
    }

    #[test]
    fn adapters_of_an_init_model_are_kept_or_must_match() {
        let dir = std::env::temp_dir().join(format!("cxrclip-trainopts-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = ClipConfig::small(32, 8, 64, 2, 2);
        c.adapter_dim = Some(8);
        std::fs::write(dir.join(model::checkpoint::CONFIG), c.to_json()).unwrap();
        let init = dir.to_str().unwrap();
        let a = validated(&["--init", init, "--mode", "adapters"]).unwrap();
        assert_eq!(model_config(&a).unwrap().adapter_dim, Some(8));
        let a = validated(&["--init", init, "--adapter-width", "8"]).unwrap();
        assert_eq!(model_config(&a).unwrap().adapter_dim, Some(8));
        let a = validated(&["--init", init, "--adapter-width", "16"]).unwrap();
        let e = model_config(&a).unwrap_err().to_string();
        assert!(e.contains("--adapter-width 16") && e.contains("width 8"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn scale_pairs_parse() {
        assert_eq!(parse_scale("0.9,1.1"), Ok((0.9, 1.1)));
        assert_eq!(parse_scale(" 1 , 1 "), Ok((1.0, 1.0)));
        for bad in ["0.9", "a,b", "0.9,", ",1.1", "0.9;1.1"] {
            assert!(parse_scale(bad).is_err(), "{bad}");
        }
    }
}
