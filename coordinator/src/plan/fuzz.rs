//! Property tests ("fuzzing" on stable Rust) of the plan reader: the project's own plans with
//! lines deleted, doubled, swapped, inserted, or their values replaced by extreme and
//! ill-typed ones, and raw text. Whatever the input, reading gives a plan or a list of
//! problems (each one line), never a panic; an accepted plan can be described (`check-plan`).
//!
//! CI runs a modest number of cases; a long run sets `PROPTEST_CASES`, e.g.
//! `PROPTEST_CASES=20000 cargo test --release -p coordinator plan::fuzz`.

use proptest::prelude::*;

use super::check_cmd::describe;
use super::*;

const PLANS: [&str; 4] = [
    include_str!("../../../plans/demo.toml"),
    include_str!("../../../plans/demo-quick.toml"),
    include_str!("../../../plans/paper.toml"),
    include_str!("../../../plans/batch-sweep.toml"),
];

fn config(default_cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default_cases);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// TOML values a careless or hostile plan puts after `key =`.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("0"),
            Just("-1"),
            Just("1"),
            Just("3"),
            Just("9223372036854775807"),
            Just("-9223372036854775808"),
            Just("1e308"),
            Just("-0.0"),
            Just("nan"),
            Just("inf"),
            Just("-inf"),
            Just("0.5"),
            Just("true"),
            Just("\"\""),
            Just("\"random\""),
            Just("\"cls\""),
            Just("\"mimic\""),
            Just("\"../../etc\""),
            Just("\"\\u001b[31m\""),
            Just("[]"),
            Just("[0, 1e12]"),
            Just("[1e-3, 1e3, 0]"),
            Just("[1e-3, 1e3, 100000000]"),
            Just("{}"),
            Just("{ synthetic = 0 }"),
            Just("{ synthetic = 1000000000000, size = 1 }"),
            Just("{ rotate = nan }"),
            Just("{ path = \"/nonexistent\" }"),
            Just("1979-05-27"),
        ]
        .prop_map(str::to_string),
        any::<i64>().prop_map(|v| v.to_string()),
        "\"[a-z0-9_,.-]{0,16}\"",
    ]
}

/// Whole lines to insert.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just("[[run]]"),
            Just("[run.sweep]"),
            Just("[defaults]"),
            Just("[data]"),
            Just("[model]"),
            Just("name = \"x\""),
            Just("kind = \"finetune\""),
            Just("kind = \"zero-shot\""),
            Just("from = \"x\""),
            Just("from = \"init\""),
            Just("dataset = \"rsna\""),
            Just("seed = [1, 2, 3]"),
            Just("global_batch = [1, 2]"),
            Just("["),
            Just("]]"),
            Just("="),
        ]
        .prop_map(str::to_string),
        "[a-z_]{1,14} = [a-z0-9\"]{0,8}",
        any::<String>(),
    ]
}

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize),
    Double(usize),
    Swap(usize, usize),
    Insert(usize, String),
    /// The value of the line's `key = value`, if it has one, replaced.
    Value(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<usize>().prop_map(Edit::Delete),
        1 => any::<usize>().prop_map(Edit::Double),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        2 => (any::<usize>(), piece()).prop_map(|(i, p)| Edit::Insert(i, p)),
        6 => (any::<usize>(), value()).prop_map(|(i, v)| Edit::Value(i, v)),
    ]
}

fn edited(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Edit::Double(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Edit::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Edit::Insert(i, p) => lines.insert(i % (lines.len() + 1), p.clone()),
            Edit::Value(i, v) => {
                // Lines with a value, so that most edits hit a setting rather than a comment.
                let with: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].contains('=')).collect();
                if let Some(&k) = with.get(i % with.len().max(1)) {
                    let key = lines[k].split('=').next().unwrap_or("").to_string();
                    lines[k] = format!("{key}= {v}");
                }
            }
            _ => {}
        }
    }
    lines.join("\n")
}

fn read(text: &str) {
    match parse_str(text, "fuzz.toml", &Overrides::default()) {
        Ok(plan) => {
            let _ = describe(&plan);
        }
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a reason");
            for p in problems {
                let line = p.to_string();
                assert!(!line.trim().is_empty(), "an empty problem");
                assert!(
                    !line.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
                    "a raw control character: {line:?}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn edited_plans_are_read_or_refused(which in 0..PLANS.len(), edits in prop::collection::vec(edit(), 1..6)) {
        read(&edited(PLANS[which], &edits));
    }

    #[test]
    fn any_text_is_read_or_refused(text in prop_oneof![any::<String>(), "[\\[\\]a-z_=\" 0-9\n.{},-]{0,200}"]) {
        read(&text);
    }
}
