//! Plans in, runs or problems out: expansion, order, defaults, and each reason a plan is refused
//! with the line it is on.

use super::*;

const DEMO: &str = include_str!("../../../plans/demo.toml");
const DEMO_QUICK: &str = include_str!("../../../plans/demo-quick.toml");

/// A generated MIMIC dataset and a small model, so that plans need no folders.
const HEAD: &str = r#"
[data]
mimic = { synthetic = 40, size = 32 }
chexpert = { synthetic = 40, size = 32 }
rsna = { synthetic = 40, size = 32 }

[defaults]
dataset = "mimic"
epochs = 1
"#;

fn plan(body: &str) -> Plan {
    let text = format!("{HEAD}{body}");
    match parse_str(&text, "t.toml", &Overrides::default()) {
        Ok(p) => p,
        Err(e) => panic!("plan refused:\n{}", lines(&e).join("\n")),
    }
}

fn problems(text: &str) -> Vec<String> {
    match parse_str(text, "t.toml", &Overrides::default()) {
        Ok(p) => panic!("plan accepted, with runs {:?}", names(&p)),
        Err(e) => lines(&e),
    }
}

/// Problems of a run body after `HEAD`.
fn body_problems(body: &str) -> (String, Vec<String>) {
    let text = format!("{HEAD}{body}");
    let p = problems(&text);
    (text, p)
}

fn lines(e: &[PlanError]) -> Vec<String> {
    e.iter().map(|e| e.to_string()).collect()
}

fn names(p: &Plan) -> Vec<&str> {
    p.runs.iter().map(|r| r.name.as_str()).collect()
}

/// A run that needs nothing but a dataset.
fn zero_shot_on(dataset: &str) -> String {
    format!("[[run]]\nname = \"z\"\nkind = \"zero-shot\"\nfrom = \"random\"\ndataset = \"{dataset}\"\n")
}

/// 1-based line of the only line that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    assert_eq!(hits.len(), 1, "`{needle}` is on lines {hits:?}");
    hits[0]
}

/// Exactly one problem, on `needle`'s line, containing every one of `words`.
fn assert_one(text: &str, problems: &[String], needle: &str, words: &[&str]) {
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let want = format!("t.toml:{}: ", line_of(text, needle));
    assert!(problems[0].starts_with(&want), "{:?} should start with {want:?}", problems[0]);
    for w in words {
        assert!(problems[0].contains(w), "{:?} should say {w:?}", problems[0]);
    }
}

#[test]
fn the_demo_plans_are_valid_and_ordered_by_dependency() {
    let p = parse_str(DEMO, "plans/demo.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    assert_eq!(
        names(&p),
        [
            "rand-lp",
            "cls",
            "cls-lp[label_fraction=0.1]",
            "cls-lp[label_fraction=0.3]",
            "cls-lp[label_fraction=1.0]",
            "ft[label_fraction=0.1]",
            "ft[label_fraction=0.3]",
            "ft[label_fraction=1.0]",
            "cls-ft",
            "zero-shot",
            "retrieval",
            "text-to-image-rand",
            "text-to-image-cls",
            "cls-lp-chexpert",
            "rand-lp-chexpert",
            "cls-lp-rsna",
            "rand-lp-rsna",
        ]
    );
    let kinds: Vec<RunKind> = p.runs.iter().map(|r| r.kind()).collect();
    for k in RunKind::ALL {
        assert!(kinds.contains(&k), "the demo has no {k} run");
    }
    assert_eq!(p.model.random, RandomModel::Sizes(ModelSizes { image: 64, patch: 8, width: 128, layers: 2, heads: 4 }));
    assert_eq!(p.data["chexpert"].labels, data::labels::COMPETITION_FIVE);
    assert_eq!(p.data["rsna"].labels, ["Pneumonia"]);
    assert_eq!(p.data["rsna"].split, Some(data::RsnaSplit::Grouped));
    assert!(matches!(p.data["mimic"].source, DataSource::Synthetic { studies: 2000, size: 128, seed: 1 }));

    let q = parse_str(DEMO_QUICK, "plans/demo-quick.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    let kinds: Vec<RunKind> = q.runs.iter().map(|r| r.kind()).collect();
    for k in RunKind::ALL {
        assert!(kinds.contains(&k), "demo-quick has no {k} run");
    }
}

#[test]
fn every_run_comes_after_the_run_it_starts_from() {
    // Written upside down: the probe first, its model last.
    let p = plan(
        r#"
[[run]]
name = "probe"
kind = "linear-probe"
from = "ft"
[[run]]
name = "ft"
kind = "finetune"
from = "cls"
[[run]]
name = "rand"
kind = "linear-probe"
from = "random"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
"#,
    );
    assert_eq!(names(&p), ["rand", "cls", "ft", "probe"]);
    for (i, r) in p.runs.iter().enumerate() {
        if let Start::Run(up) = &r.from {
            let j = p.runs.iter().position(|x| &x.name == up).unwrap();
            assert!(j < i, "{} before {up}", r.name);
        }
    }
}

#[test]
fn sweeps_expand_as_a_product_and_follow_the_runs_they_start_from() {
    let p = plan(
        r#"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
[run.sweep]
seed = [3, 4]
data_fraction = [0.25, 1.0]

[[run]]
name = "lp"
kind = "linear-probe"
from = "cls"
seed = 9
[run.sweep]
label_fraction = [0.5, 1]
"#,
    );
    // Own axes in the fixed key order (data_fraction before seed), the first slowest.
    let cls = [
        "cls[data_fraction=0.25,seed=3]",
        "cls[data_fraction=0.25,seed=4]",
        "cls[data_fraction=1.0,seed=3]",
        "cls[data_fraction=1.0,seed=4]",
    ];
    assert_eq!(&names(&p)[..4], cls);
    assert_eq!(p.runs.len(), 4 + 8);
    for (i, c) in cls.iter().enumerate() {
        for (k, lf) in ["0.5", "1.0"].iter().enumerate() {
            let r = &p.runs[4 + 2 * i + k];
            let inner = &c["cls[".len()..c.len() - 1];
            assert_eq!(r.name, format!("lp[{inner},label_fraction={lf}]"));
            assert_eq!(r.from, Start::Run(c.to_string()));
            // The record names every value and who swept it, inherited first.
            let rec: Vec<(SweepKey, &str)> = r.sweep.iter().map(|s| (s.key, s.declared_by.as_str())).collect();
            assert_eq!(
                rec,
                [(SweepKey::DataFraction, "cls"), (SweepKey::Seed, "cls"), (SweepKey::LabelFraction, "lp")]
            );
            // Its own value is its setting; the inherited seed is not its seed.
            let Job::LinearProbe { label_fraction, .. } = r.job else { panic!("{:?}", r.job) };
            assert_eq!(label_fraction, [0.5, 1.0][k]);
            assert_eq!(r.seed, 9);
        }
    }
    let Job::PretrainCls { data_fraction, .. } = p.runs[2].job else { panic!() };
    assert_eq!((data_fraction, p.runs[2].seed), (1.0, 3));
}

#[test]
fn from_can_pick_one_expansion_of_a_swept_run() {
    let p = plan(
        r#"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
[run.sweep]
data_fraction = [0.1, 1.0]
global_batch = [8, 16]

[[run]]
name = "ft"
kind = "finetune"
from = "cls[data_fraction=1]"

[[run]]
name = "one"
kind = "zero-shot"
from = "cls[global_batch=16,data_fraction=0.1]"
"#,
    );
    let ft: Vec<(&str, String)> =
        p.runs.iter().filter(|r| r.base == "ft").map(|r| (r.name.as_str(), r.from.to_string())).collect();
    assert_eq!(
        ft,
        [
            ("ft[global_batch=8]", "cls[data_fraction=1.0,global_batch=8]".to_string()),
            ("ft[global_batch=16]", "cls[data_fraction=1.0,global_batch=16]".to_string())
        ]
    );
    let one = p.run("one").expect("picked expansion named plainly");
    assert_eq!(one.from, Start::Run("cls[data_fraction=0.1,global_batch=16]".into()));
    assert!(one.sweep.is_empty());
    let Some(Training { global_batch, .. }) = p.run("cls[data_fraction=0.1,global_batch=16]").unwrap().job.training()
    else {
        panic!()
    };
    assert_eq!(*global_batch, 16);
}

#[test]
fn defaults_apply_where_the_key_fits_and_runs_override_them() {
    let p = plan(
        r#"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
lr = 1e-3

[[run]]
name = "ft"
kind = "finetune"
from = "cls"
mode = "full"
head_lr = 1e-2

[[run]]
name = "lp"
kind = "linear-probe"
from = "cls"
"#,
    );
    let p2 = parse_str(
        &format!(
            "{HEAD}probe_grid = [1e-2, 1e2, 5]\nmode = \"adapters\"\nadapter_width = 16\nlabel_fraction = 0.5\n{}",
            r#"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
[[run]]
name = "ft"
kind = "finetune"
from = "cls"
mode = "full"
[[run]]
name = "lp"
kind = "linear-probe"
from = "cls"
"#
        ),
        "t.toml",
        &Overrides::default(),
    )
    .unwrap_or_else(|e| panic!("{}", lines(&e).join("\n")));
    // Paper defaults where neither the run nor [defaults] says.
    let t = p.runs[0].job.training().unwrap();
    assert_eq!((t.lr, t.global_batch, t.betas, t.eps, t.weight_decay), (1e-3, 192, [0.9, 0.98], 1e-6, 0.2));
    assert_eq!(t.schedule, Schedule::OneCycle { warmup_fraction: 0.05 });
    assert_eq!(t.length, Length::Epochs(1));
    assert_eq!(p.runs[0].views, data::Views::All);
    // [defaults] keys for one kind do not trouble the others; the run's own mode wins and the
    // default adapter width is then not used.
    let r = |n: &str| p2.run(n).unwrap();
    assert_eq!(r("cls").job.training().unwrap().mode, Mode::Adapters { width: 16 });
    assert_eq!(r("ft").job.training().unwrap().mode, Mode::Full);
    let Job::LinearProbe { label_fraction, grid } = r("lp").job else { panic!() };
    assert_eq!((label_fraction, grid), (0.5, ProbeGrid { low: 1e-2, high: 1e2, count: 5 }));
    let Job::Finetune { label_fraction, head_lr, .. } = r("ft").job else { panic!() };
    assert_eq!((label_fraction, head_lr), (0.5, None));
    let Job::Finetune { head_lr, .. } = p.run("ft").unwrap().job else { panic!() };
    assert_eq!(head_lr, Some(1e-2));
    let Job::PretrainCls { data_fraction, .. } = r("cls").job else { panic!() };
    assert_eq!(data_fraction, 1.0);
}

// ----- each reason a plan is refused, on its line ------------------------------------------

#[test]
fn a_cycle_is_refused_at_its_first_run() {
    let (t, p) = body_problems(
        r#"
[[run]]
name = "a"
kind = "finetune"
from = "c"      # A
[[run]]
name = "b"
kind = "finetune"
from = "a"
[[run]]
name = "c"
kind = "pretrain-cls"
from = "b"
"#,
    );
    assert_one(&t, &p, "# A", &["cycle", "a -> c -> b -> a"]);
    let (t, p) = body_problems("[[run]]\nname = \"x\"\nkind = \"finetune\"\nfrom = \"x\" # self\n");
    assert_one(&t, &p, "# self", &["`x` starts from itself"]);
}

#[test]
fn an_unknown_from_is_refused_with_a_suggestion() {
    let (t, p) = body_problems(
        r#"
[[run]]
name = "cls"
kind = "pretrain-cls"
from = "random"
[[run]]
name = "lp"
kind = "linear-probe"
from = "clss"
"#,
    );
    assert_one(&t, &p, "\"clss\"", &["unknown `from`", "clss", "did you mean `cls`"]);
}

#[test]
fn a_duplicate_name_is_refused_at_its_second_use() {
    let (t, p) = body_problems(
        r#"
[[run]]
name = "lp"
kind = "linear-probe"
from = "random"
[[run]]
name = "lp"   # again
kind = "linear-probe"
from = "init"
"#,
    );
    let first = t.lines().position(|l| l == "name = \"lp\"").unwrap() + 1;
    assert_one(&t, &p, "# again", &["duplicate run name `lp`", &format!("first at line {first}")]);
}

#[test]
fn an_unknown_key_is_refused_at_its_line() {
    let (t, p) =
        body_problems("[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\nlearning_rate = 1\n");
    assert_one(&t, &p, "learning_rate", &["unknown field `learning_rate`"]);
    // In a dataset's table, in a sweep, and a misspelt section.
    let t = "[data.rsna]\npath = \"/x\"\nlabel = [\"Pneumonia\"]\n";
    assert_one(t, &problems(t), "label =", &["unknown field `label`"]);
    let (t, p) = body_problems(
        "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\n[run.sweep]\nlabels_fraction = [0.5]\n",
    );
    assert_one(&t, &p, "labels_fraction", &["unknown field `labels_fraction`"]);
    let t = "[[runs]]\nname = \"x\"\n";
    assert_one(t, &problems(t), "[[runs]]", &["unknown field `runs`"]);
}

#[test]
fn a_missing_dataset_path_is_refused_at_its_line() {
    let here = env!("CARGO_MANIFEST_DIR");
    let t = format!(
        "[data]\nmimic = \"{here}\"\nchexpert = \"/no/such/chexpert\"\n[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\ndataset = \"mimic\"\n"
    );
    assert_one(&t, &problems(&t), "/no/such/chexpert", &["dataset `chexpert`", "does not exist"]);
    // The command line's folder replaces the file's and is checked the same way.
    let over = Overrides { datasets: [("mimic".to_string(), "/no/such/mimic".into())].into(), init: None };
    let e = lines(&parse_str(&t, "t.toml", &over).unwrap_err());
    assert!(e.iter().any(|l| l == "t.toml: --dataset mimic=/no/such/mimic: the folder does not exist"), "{e:#?}");
    let over = Overrides { datasets: [("chexpert".to_string(), here.into())].into(), init: None };
    assert!(parse_str(&t, "t.toml", &over).is_ok());
}

#[test]
fn a_fraction_outside_0_1_is_refused_at_its_line() {
    for (bad, key) in
        [("0.0", "label_fraction"), ("1.5", "label_fraction"), ("nan", "label_fraction"), ("-0.1", "label_fraction")]
    {
        let (t, p) = body_problems(&format!(
            "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\n{key} = {bad}\n"
        ));
        assert_one(&t, &p, &format!("{key} = {bad}"), &["outside (0, 1]"]);
    }
    let (t, p) = body_problems(
        "[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\n[run.sweep]\ndata_fraction = [0.5, 1.01]\n",
    );
    assert_one(&t, &p, "1.01", &["`data_fraction` = 1.01 is outside (0, 1]"]);
    let t = format!("[data.rsna]\nsynthetic = 10\nvalid_fraction = 1.0\n{}", zero_shot_on("rsna"));
    let t = t.as_str();
    assert_one(t, &problems(t), "valid_fraction", &["outside (0, 1)"]);
}

#[test]
fn a_label_the_dataset_does_not_have_is_refused() {
    let t = "[data.rsna]\nsynthetic = 10\nlabels = [\"Pneumonia\", \"Cardiomegaly\"]\n[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\ndataset = \"rsna\"\n";
    assert_one(t, &problems(t), "labels =", &["no label `Cardiomegaly`", "rsna has: Pneumonia"]);
    let t = "[data.chexpert]\nsynthetic = 10\nlabels = [\"Edema\", \"Pneumonitis\"]\n";
    assert!(problems(t).iter().any(|l| l.starts_with("t.toml:3:") && l.contains("no label `Pneumonitis`")));
    // A probe trained on RSNA (Pneumonia only) cannot score MIMIC's 14 labels.
    let (t, p) = body_problems(
        "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\ndataset = \"rsna\"\ntest = [\"rsna:test\", \"mimic:test\"]\n",
    );
    assert_one(&t, &p, "test =", &["trained on `rsna`", "to score on `mimic`"]);
}

#[test]
fn wrong_value_types_are_refused_at_their_line() {
    for (line, words) in [
        ("lr = \"fast\"", &["invalid type", "expected f64"][..]),
        ("epochs = 1.5", &["invalid type", "u64"]),
        ("betas = [0.9]", &["invalid length 1"]),
        ("views = 3", &["invalid type"]),
        ("views = \",\"", &["views needs \"all\""]),
        ("sections = \"summary\"", &["unknown section policy 'summary'"]),
        ("augment = \"strong\"", &["true, false or a table"]),
        ("mode = \"partial\"", &["unknown variant `partial`", "expected `full` or `adapters`"]),
    ] {
        let (t, p) =
            body_problems(&format!("[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\n{line}\n"));
        assert_one(&t, &p, line, words);
    }
    let t = "[data]\nmimic = 5\n";
    assert_one(t, &problems(t), "mimic = 5", &["a path, or a table"]);
    let t = "[data.mimic]\nsynthetic = 10\nuncertain = \"maybe\"\n";
    assert_one(t, &problems(t), "uncertain", &["unknown uncertain-label policy 'maybe'"]);
    // A TOML syntax error is reported with its line too.
    let t = "[data]\nmimic = \"/x\"\n[[run]]\nname = \"a\nkind = \"zero-shot\"\n";
    let p = problems(t);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("t.toml:4: "), "{p:?}");
}

#[test]
fn unknown_kinds_are_refused() {
    let (t, p) = body_problems("[[run]]\nname = \"a\"\nkind = \"pretrain\"\nfrom = \"random\"\n");
    assert_one(&t, &p, "\"pretrain\"", &["unknown variant `pretrain`", "`pretrain-cls`", "`retrieval`"]);
}

#[test]
fn keys_for_other_kinds_are_refused_naming_key_and_kind() {
    let (t, p) = body_problems(
        "[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\nprobe_grid = [1e-3, 1e3, 13]\n",
    );
    assert_one(&t, &p, "probe_grid", &["`probe_grid` does not apply to a pretrain-cls run", "linear-probe"]);
    let (t, p) = body_problems(
        "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\n[run.sweep]\nglobal_batch = [8, 16]\n",
    );
    assert_one(&t, &p, "global_batch", &["sweep over `global_batch` does not apply to a linear-probe run"]);
    let (t, p) = body_problems(
        "[[run]]\nname = \"ft\"\nkind = \"finetune\"\nfrom = \"random\"\nmode = \"full\"\nadapter_width = 8\n",
    );
    assert_one(&t, &p, "adapter_width", &["goes with mode = \"adapters\""]);
    let (t, p) =
        body_problems("[[run]]\nname = \"ft\"\nkind = \"finetune\"\nfrom = \"random\"\nschedule = \"cosine\"\nwarmup_fraction = 0.1\n");
    assert_one(&t, &p, "warmup_fraction", &["goes with schedule = \"one-cycle\""]);
}

#[test]
fn from_must_name_a_model_and_pick_existing_values() {
    let (t, p) = body_problems(
        "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\n[[run]]\nname = \"ft\"\nkind = \"finetune\"\nfrom = \"lp\" # here\n",
    );
    assert_one(&t, &p, "# here", &["a linear-probe run leaves no model"]);
    let cls = "[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\n[run.sweep]\ndata_fraction = [0.1, 1.0]\n";
    let (t, p) = body_problems(&format!(
        "{cls}[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"cls[data_fraction=0.5]\"\n"
    ));
    assert_one(&t, &p, "0.5]", &["run `cls` has no data_fraction=0.5", "its values: 0.1, 1.0"]);
    let (t, p) =
        body_problems(&format!("{cls}[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"cls[seed=1]\"\n"));
    assert_one(&t, &p, "seed=1", &["not swept over `seed`"]);
    let (t, p) =
        body_problems(&format!("{cls}[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"cls[lr=1]\"\n"));
    assert_one(&t, &p, "lr=1", &["`lr` is not a sweep key"]);
    // The same key swept up and down the chain would make names ambiguous.
    let seeds = "[[run]]\nname = \"c\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\n[run.sweep]\nseed = [0, 1]\n";
    let (t, p) = body_problems(&format!(
        "{seeds}[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"c\" # here\n[run.sweep]\nseed = [2, 3]\n"
    ));
    assert_one(&t, &p, "# here", &["sweeps `seed`, and so does `c`"]);
}

#[test]
fn init_is_needed_when_a_run_starts_from_it() {
    let (t, p) = body_problems("[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"init\"\n");
    assert_one(&t, &p, "\"init\"", &["starts from init", "no `init` folder"]);
    let t2 = t.replace("[defaults]", "[model]\ninit = \"/no/such/clip\"\n[defaults]");
    assert_one(&t2, &problems(&t2), "/no/such/clip", &["does not exist"]);
    // A folder without config.json is not a CLIP folder.
    let t3 = t.replace("[defaults]", &format!("[model]\ninit = \"{}\"\n[defaults]", env!("CARGO_MANIFEST_DIR")));
    assert_one(&t3, &problems(&t3), "init =", &["holds no config.json"]);
}

#[test]
fn datasets_are_named_by_layout_and_runs_need_fitting_ones() {
    let t = format!("[data]\nnih = \"/x\"\nmimic = {{ synthetic = 10 }}\n{}", zero_shot_on("mimic"));
    let t = t.as_str();
    assert_one(t, &problems(t), "nih", &["unknown dataset `nih`", "mimic, chexpert or rsna"]);
    let (t, p) =
        body_problems("[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\ndataset = \"rsna\"\n");
    assert_one(&t, &p, "dataset = \"rsna\"", &["needs reports", "only mimic"]);
    let (t, p) = body_problems(
        "[[run]]\nname = \"r\"\nkind = \"retrieval\"\nfrom = \"random\"\ntest = [\"mimic:valid\", \"mimic:holdout\"]\n",
    );
    assert_one(&t, &p, "test =", &["unknown split `holdout`"]);
    let (t, p) = body_problems("[[run]]\nname = \"r\"\nkind = \"zero-shot\"\nfrom = \"random\"\ndataset = \"nih\"\n");
    assert_one(&t, &p, "\"nih\"", &["unknown dataset `nih`", "[data] has: chexpert, mimic, rsna"]);
}

#[test]
fn ranges_are_checked() {
    for (line, words) in [
        ("lr = 0.0", &["`lr` = 0 must be a finite number > 0"][..]),
        ("lr = inf", &["`lr` = inf"]),
        ("epochs = 0", &["`epochs` = 0 must be at least 1"]),
        ("global_batch = 0", &["`global_batch` = 0 must be at least 1"]),
        ("betas = [0.9, 1.0]", &["each must be in [0, 1)"]),
        ("weight_decay = -0.1", &["must be a finite number >= 0"]),
        ("augment = { rotate = 200.0 }", &["`augment.rotate` = 200"]),
        ("augment = { scale = [1.1, 0.9] }", &["need 0 < low <= high"]),
    ] {
        let (t, p) =
            body_problems(&format!("[[run]]\nname = \"cls\"\nkind = \"pretrain-cls\"\nfrom = \"random\"\n{line}\n"));
        assert_one(&t, &p, line, words);
    }
    let (t, p) =
        body_problems("[[run]]\nname = \"ft\"\nkind = \"finetune\"\nfrom = \"random\"\nepochs = 1\nhead_lr = -1.0\n");
    assert_one(&t, &p, "head_lr", &["`head_lr` = -1 must be a finite number > 0"]);
    for line in ["probe_grid = [1e3, 1e-3, 13]", "probe_grid = [1e-3, 1e3, 1]", "probe_grid = [0.0, 1.0, 3]"] {
        let (t, p) =
            body_problems(&format!("[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"random\"\n{line}\n"));
        assert_one(&t, &p, line, &["`probe_grid`"]);
    }
    let (t, p) = body_problems(
        "[[run]]\nname = \"z\"\nkind = \"zero-shot\"\nfrom = \"random\"\ntemplates = { positive = [\"{label}\", \"a {label}\"], negative = [\"no finding\"] }\n",
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    let l = line_of(&t, "templates =");
    assert!(p[0].starts_with(&format!("t.toml:{l}:")) && p[0].contains("\"no finding\" has no {label}"), "{p:?}");
    assert!(p[1].contains("2 positive and 1 negative"), "{p:?}");
}

#[test]
fn problems_in_several_runs_are_all_reported_in_line_order() {
    let (t, p) = body_problems(
        r#"
[[run]]
name = "a"
kind = "linear-probe"
from = "random"
label_fraction = 2.0
[[run]]
name = "b"
kind = "finetune"
from = "nowhere"
[[run]]
name = "c"
kind = "zero-shot"
from = "random"
epochs = 3
"#,
    );
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(p[0].starts_with(&format!("t.toml:{}:", line_of(&t, "= 2.0"))));
    assert!(p[1].starts_with(&format!("t.toml:{}:", line_of(&t, "nowhere"))));
    assert!(p[2].starts_with(&format!("t.toml:{}:", line_of(&t, "epochs = 3"))));
}

#[test]
fn defaults_take_settings_only() {
    let t = format!("{HEAD}name = \"x\"\n[[run]]\nname = \"a\"\nkind = \"zero-shot\"\nfrom = \"random\"\n");
    assert_one(&t, &problems(&t), "name = \"x\"", &["`name` belongs to each [[run]]"]);
    // An out-of-range default is reported once, not once per run.
    let t = format!("{HEAD}label_fraction = 0\n[[run]]\nname = \"a\"\nkind = \"linear-probe\"\nfrom = \"random\"\n[[run]]\nname = \"b\"\nkind = \"linear-probe\"\nfrom = \"random\"\n");
    assert_one(&t, &problems(&t), "label_fraction = 0", &["outside (0, 1]"]);
}

#[test]
fn text_to_image_runs_take_their_findings_size_and_steps() {
    let p = plan("[[run]]\nname = \"t2i\"\nkind = \"text-to-image\"\nfrom = \"random\"\n");
    let Job::TextToImage { findings, steps, size } = &p.runs[0].job else { panic!("{:?}", p.runs[0].job) };
    assert_eq!(findings, &TEXT_TO_IMAGE_FINDINGS.map(String::from));
    assert_eq!((*steps, *size), (TEXT_TO_IMAGE_STEPS, TEXT_TO_IMAGE_SIZE));
    assert!(p.runs[0].test.is_empty());
    let p = plan(
        "[[run]]\nname = \"t2i\"\nkind = \"text-to-image\"\nfrom = \"random\"\nfindings = [\"Edema\"]\n\
         image_steps = 7\nimage_size = 64\n",
    );
    assert_eq!(p.runs[0].job, Job::TextToImage { findings: vec!["Edema".into()], steps: 7, size: 64 });

    let run = "[[run]]\nname = \"t2i\"\nkind = \"text-to-image\"\nfrom = \"random\"\n";
    let (t, pr) = body_problems(&format!("{run}findings = [\"Edema\", \"Fracturez\"]\n"));
    assert_one(&t, &pr, "findings", &["`Fracturez` is not a label"]);
    let (t, pr) = body_problems(&format!("{run}findings = [\"Edema\", \"Edema\"]\n"));
    assert_one(&t, &pr, "findings", &["twice"]);
    let (t, pr) = body_problems(&format!("{run}image_size = 4\n"));
    assert_one(&t, &pr, "image_size", &["outside"]);
    let (t, pr) = body_problems(&format!("{run}image_steps = 0\n"));
    assert_one(&t, &pr, "image_steps", &["at least 1"]);
    // The real image's sentence comes from a report: only mimic has them.
    let (t, pr) = body_problems(&format!("{run}dataset = \"rsna\"\n"));
    assert_one(&t, &pr, "dataset = \"rsna\"", &["needs reports"]);
    // A training key is not a text-to-image setting.
    let (t, pr) = body_problems(&format!("{run}lr = 0.1\n"));
    assert_one(&t, &pr, "lr = 0.1", &["lr"]);
}
