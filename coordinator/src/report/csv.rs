//! `results.csv`: long format, a `(macro)` line then one line per label for each row (the
//! columns are listed in the module doc of `report`).

use std::fmt::Write;

use super::Report;

const HEADER: [&str; 15] = [
    "run",
    "setting",
    "kind",
    "dataset",
    "split",
    "fraction",
    "ablation",
    "ablation_value",
    "label",
    "auc",
    "ci95_low",
    "ci95_high",
    "images",
    "patients",
    "run_dir",
];

/// The label field of a row's macro line (no dataset label has parentheses).
pub const MACRO_LABEL: &str = "(macro)";

pub fn render(report: &Report) -> Vec<u8> {
    let mut out = String::new();
    out.push_str(&HEADER.join(","));
    out.push('\n');
    for r in &report.rows {
        let (abl_name, abl_value) = match &r.ablation {
            Some(a) => (a.name.clone(), number(a.value)),
            None => (String::new(), String::new()),
        };
        let fraction = r.fraction.map(number).unwrap_or_default();
        let mut line = |label: &str, auc: f64, ci: [String; 2]| {
            let fields = [
                field(&r.run),
                field(&r.setting),
                field(&r.kind),
                field(&r.dataset),
                field(&r.split),
                fraction.clone(),
                field(&abl_name),
                abl_value.clone(),
                field(label),
                number(auc),
                ci[0].clone(),
                ci[1].clone(),
                r.images.to_string(),
                r.patients.to_string(),
                field(&r.run_dir),
            ];
            let _ = writeln!(out, "{}", fields.join(","));
        };
        line(MACRO_LABEL, r.macro_auc, [number(r.ci95[0]), number(r.ci95[1])]);
        for (label, auc) in &r.per_label {
            line(label, *auc, [String::new(), String::new()]);
        }
    }
    out.into_bytes()
}

/// A number as Rust writes it (shortest form that reads back equal); empty when not finite.
fn number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

/// RFC 4180 quoting where a field needs it.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
