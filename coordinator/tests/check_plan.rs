//! `coordinator check-plan` as a user runs it: the committed plans against generated trees in
//! the three layouts and a tiny init folder, and bad plans refused with their line and reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn coordinator(args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .current_dir(repo())
        .args(args)
        .output()
        .expect("start coordinator");
    assert!(o.status.code().is_some(), "coordinator died by a signal: {o:?}");
    o
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(args: &[&str]) -> String {
    let o = coordinator(args);
    assert!(o.status.success(), "{args:?} failed:\n{}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// The run lines of check-plan's output: (position, name, kind, from).
fn runs(out: &str) -> Vec<(usize, String, String, String)> {
    let mut lines = out.lines().skip_while(|l| !l.ends_with("runs, in order:")).skip(2);
    let mut v = Vec::new();
    for l in lines.by_ref() {
        let w: Vec<&str> = l.split_whitespace().collect();
        v.push((w[0].parse().expect("position"), w[1].to_string(), w[2].to_string(), w[3].to_string()));
    }
    v
}

/// Every run after the run it starts from, positions 1..n, names unique.
fn assert_ordered(runs: &[(usize, String, String, String)]) {
    for (i, (pos, name, _, from)) in runs.iter().enumerate() {
        assert_eq!(*pos, i + 1);
        assert!(!runs[..i].iter().any(|r| &r.1 == name), "{name} twice");
        if from != "random" && from != "init" {
            assert!(runs[..i].iter().any(|r| &r.1 == from), "{name} starts from {from}, which is not before it");
        }
    }
}

struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let d = std::env::temp_dir().join(format!("cxrclip-check-plan-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_paper_plan_checks_against_generated_trees_in_the_three_layouts() {
    let t = Tmp::new("paper");
    let dir = |n: &str| t.0.join(n).display().to_string();
    for layout in ["mimic", "chexpert", "rsna"] {
        ok(&["synth", "--out", &dir(layout), "--studies", "30", "--dataset", layout, "--size", "64", "--seed", "1"]);
    }
    ok(&[
        "init",
        "--out",
        &dir("init"),
        "--image",
        "32",
        "--patch",
        "8",
        "--width",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
    ]);

    let out = ok(&[
        "check-plan",
        "plans/paper.toml",
        "--dataset",
        &format!("mimic={}", dir("mimic")),
        "--dataset",
        &format!("chexpert={}", dir("chexpert")),
        "--dataset",
        &format!("rsna={}", dir("rsna")),
        "--init",
        &dir("init"),
    ]);
    let r = runs(&out);
    assert_ordered(&r);
    let names: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
    // The study's settings, each once (the ablations' full-data points are the table's rows).
    for want in [
        "rand-lp",
        "clip-lp",
        "ft[label_fraction=1.0]",
        "cls-ft",
        "cls-lp[data_fraction=1.0]",
        "zero-shot",
        "retrieval",
        "cls-lp-chexpert",
        "cls-lp-rsna",
    ] {
        assert!(names.contains(&want), "no {want} in {names:?}");
    }
    // The ablations: 4 label fractions (FT, CLS + LP), 4 pretraining fractions, 4 batches, LP after each.
    for (base, n) in
        [("ft[", 4), ("cls-lp-labels[", 4), ("cls[", 4), ("cls-lp[", 4), ("cls-batch[", 4), ("cls-batch-lp[", 4)]
    {
        assert_eq!(names.iter().filter(|x| x.starts_with(base)).count(), n, "{base} in {names:?}");
    }
    assert_eq!(r.len(), 31, "{out}");
    assert_eq!(r[0].1, "rand-lp");
    let line = |name: &str| out.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap().to_string();
    // The paper's settings reach the runs.
    let cls = line("cls[data_fraction=1.0]");
    for s in ["pretrain-cls", "init", "epochs=10", "batch=192", "lr=3e-4", "one-cycle(warmup 0.05)", "adapters(256)"] {
        assert!(cls.contains(s), "{cls}");
    }
    let ft = line("ft[label_fraction=1.0]");
    assert!(ft.contains("lr=1e-5") && ft.contains(" full "), "{ft}");
    let cls_ft = line("cls-ft");
    assert!(
        cls_ft.contains("lr=1e-4") && cls_ft.contains("adapters(256)") && cls_ft.contains("cls[data_fraction=1.0]")
    );
    assert!(line("cls-lp-chexpert").contains("chexpert:test"));
    assert!(line("cls-batch-lp[global_batch=576]").contains("cls-batch[global_batch=576]"));
    assert!(out.contains("; 5 labels, uncertain zeros, valid 0.1\n"), "{out}");
    assert!(out.contains("; label Pneumonia, uncertain zeros, grouped split, valid 0.1, test 0.1\n"), "{out}");
}

#[test]
fn the_paper_plan_without_the_datasets_names_each_missing_folder() {
    if Path::new("/data/mimic-cxr-jpg").exists() {
        return; // a machine with the real data: nothing is missing
    }
    let o = coordinator(&["check-plan", "plans/paper.toml"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    let plan = std::fs::read_to_string(repo().join("plans/paper.toml")).unwrap();
    for needle in
        ["\"/data/mimic-cxr-jpg\"", "\"/data/CheXpert-v1.0-small\"", "\"/data/rsna-pneumonia\"", "\"/models/clip"]
    {
        let line = plan.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let want = format!("plans/paper.toml:{line}: ");
        assert!(err.lines().any(|l| l.starts_with(&want) && l.contains("does not exist")), "no {want} in\n{err}");
    }
    assert!(err.lines().last().unwrap().contains("4 problems; nothing would run"), "{err}");
}

#[test]
fn the_demo_plans_check_as_they_are() {
    for (plan, n) in [("plans/demo.toml", 17), ("plans/demo-quick.toml", 11)] {
        let out = ok(&["check-plan", plan]);
        let r = runs(&out);
        assert_ordered(&r);
        assert_eq!(r.len(), n, "{out}");
        assert!(out.contains("data mimic: generated, "), "{out}");
    }
    // The batch ablation: rand + LP, CLS at six batches (micro-batches of 64 where the local
    // batch is larger), an LP of each.
    let out = ok(&["check-plan", "plans/batch-sweep.toml"]);
    assert_eq!(runs(&out).len(), 13, "{out}");
    assert!(out.contains("batch=1344 micro_batch=64"), "{out}");
}

/// A plan with one mistake, and what check-plan must say: the line holding `marker` and words
/// of the reason.
struct Bad {
    what: &'static str,
    plan: &'static str,
    marker: &'static str,
    reason: &'static [&'static str],
}

const GOOD_HEAD: &str =
    "[data]\nmimic = { synthetic = 30 }\nrsna = { synthetic = 30 }\n[defaults]\ndataset = \"mimic\"\nepochs = 1\n";

const BAD: &[Bad] = &[
    Bad {
        what: "a cycle",
        plan: "[[run]]\nname = \"a\"\nkind = \"finetune\"\nfrom = \"b\" # HERE\n[[run]]\nname = \"b\"\nkind = \"finetune\"\nfrom = \"a\"\n",
        marker: "# HERE",
        reason: &["cycle of `from`: a -> b -> a"],
    },
    Bad {
        what: "an unknown from",
        plan: "[[run]]\nname = \"lp\"\nkind = \"linear-probe\"\nfrom = \"cls\" # HERE\n",
        marker: "# HERE",
        reason: &["unknown `from` = \"cls\""],
    },
    Bad {
        what: "a duplicate name",
        plan: "[[run]]\nname = \"a\"\nkind = \"zero-shot\"\nfrom = \"random\"\n[[run]]\nname = \"a\" # HERE\nkind = \"zero-shot\"\nfrom = \"random\"\n",
        marker: "# HERE",
        reason: &["duplicate run name `a`"],
    },
    Bad {
        what: "an unknown key",
        plan: "[[run]]\nname = \"a\"\nkind = \"zero-shot\"\nfrom = \"random\"\nprompts = [\"x\"] # HERE\n",
        marker: "# HERE",
        reason: &["unknown field `prompts`"],
    },
    Bad {
        what: "a missing dataset path",
        plan: "[data.chexpert]\npath = \"/no/such/chexpert\" # HERE\n[[run]]\nname = \"a\"\nkind = \"zero-shot\"\nfrom = \"random\"\n",
        marker: "# HERE",
        reason: &["dataset `chexpert`", "/no/such/chexpert does not exist"],
    },
    Bad {
        what: "a fraction outside (0, 1]",
        plan: "[[run]]\nname = \"a\"\nkind = \"linear-probe\"\nfrom = \"random\"\n[run.sweep]\nlabel_fraction = [0.5, 0.0] # HERE\n",
        marker: "# HERE",
        reason: &["`label_fraction` = 0 is outside (0, 1]"],
    },
    Bad {
        what: "a label the dataset does not have",
        plan: "[data.chexpert]\nsynthetic = 30\nlabels = [\"Edema\", \"Nodule\"] # HERE\n[[run]]\nname = \"a\"\nkind = \"zero-shot\"\nfrom = \"random\"\n",
        marker: "# HERE",
        reason: &["dataset `chexpert` has no label `Nodule`"],
    },
    Bad {
        what: "a wrong value type",
        plan: "[[run]]\nname = \"a\"\nkind = \"finetune\"\nfrom = \"random\"\nglobal_batch = \"big\" # HERE\n",
        marker: "# HERE",
        reason: &["invalid type: string \"big\"", "expected u64"],
    },
    Bad {
        what: "an unknown kind",
        plan: "[[run]]\nname = \"a\"\nkind = \"probe\" # HERE\nfrom = \"random\"\n",
        marker: "# HERE",
        reason: &["unknown variant `probe`", "`linear-probe`"],
    },
];

#[test]
fn bad_plans_are_refused_with_the_file_the_line_and_the_reason() {
    let t = Tmp::new("bad");
    for (i, b) in BAD.iter().enumerate() {
        // A plan's own [data.x] table after [defaults] is still part of [data].
        let plan = format!("{GOOD_HEAD}{}", b.plan);
        let path = t.0.join(format!("bad{i}.toml"));
        std::fs::write(&path, &plan).unwrap();
        let o = coordinator(&["check-plan", path.to_str().unwrap()]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{}: accepted:\n{}", b.what, text(&o.stdout));
        assert!(o.stdout.is_empty(), "{}: printed runs for a bad plan", b.what);
        let line = plan.lines().position(|l| l.contains(b.marker)).unwrap() + 1;
        let want = format!("{}:{line}: ", path.display());
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with(&want), "{}: {first:?} should start with {want:?}\n{err}", b.what);
        for r in b.reason {
            assert!(first.contains(r), "{}: {first:?} should say {r:?}", b.what);
        }
        // One line for the problem, one summary line.
        assert_eq!(err.lines().count(), 2, "{}:\n{err}", b.what);
    }
}

#[test]
fn bad_command_lines_are_refused_in_one_line() {
    let o = coordinator(&["check-plan", "plans/demo.toml", "--dataset", "nih=/x"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.starts_with("plans/demo.toml: --dataset nih=...: the plan has no dataset `nih`"), "{err}");
    let o = coordinator(&["check-plan", "plans/no-such-plan.toml"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).starts_with("plans/no-such-plan.toml: cannot read the plan"), "{}", text(&o.stderr));
    let o = coordinator(&["check-plan", "plans/demo.toml", "--dataset", "mimic"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("expected NAME=PATH"), "{}", text(&o.stderr));
}
