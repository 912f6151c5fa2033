//! The paper's table for the terminal: aligned plain-text columns, then the paired differences.

use std::fmt::Write;

use super::layout::{self, auc_ci, diff_ci, published, MainTable};
use super::Report;

/// The paper's table (settings x datasets, macro AUC % [95% CI], the published figure beside
/// ours where there is one) and the paired differences, as aligned text lines.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let title = if report.title.trim().is_empty() { "cxrclip results" } else { report.title.trim() };
    let _ = writeln!(out, "{title}: macro AUC % [95% CI]");
    let t = MainTable::of(report);
    if t.cells.is_empty() {
        out.push_str("(no linear-probe or fine-tuning evaluation has finished yet)\n");
        return out;
    }
    let mut header = vec!["setting".to_string()];
    for (c, col) in t.cols.iter().enumerate() {
        header.push(col.header());
        if t.has_published(c) {
            header.push("paper".to_string());
        }
    }
    let mut rows = Vec::new();
    for (s, setting) in t.settings.iter().enumerate() {
        let mut row = vec![setting.clone()];
        for (c, col) in t.cols.iter().enumerate() {
            row.push(t.cell(s, c).map(|r| auc_ci(r.macro_auc, r.ci95)).unwrap_or_else(|| "-".to_string()));
            if t.has_published(c) {
                row.push(published(setting, col).map(|p| format!("{p:.1}")).unwrap_or_default());
            }
        }
        rows.push(row);
    }
    out.push_str(&aligned(&header, &rows));
    if (0..t.cols.len()).any(|c| t.has_published(c)) {
        let _ = writeln!(out, "{}", layout::PUBLISHED_NOTE);
    }
    if !report.comparisons.is_empty() {
        out.push_str("\npaired differences (AUC points [95% CI]):\n");
        let rows: Vec<Vec<String>> = report
            .comparisons
            .iter()
            .map(|c| {
                let verdict = match layout::excludes_zero(c.ci95) {
                    Some(_) => "CI excludes 0",
                    None => "CI includes 0",
                };
                vec![
                    format!("{} - {}", c.setting_a, c.setting_b),
                    format!("{} {}", c.dataset, c.split),
                    diff_ci(c.diff, c.ci95),
                    verdict.to_string(),
                ]
            })
            .collect();
        let header: Vec<String> = ["A - B", "dataset", "difference", ""].map(String::from).to_vec();
        out.push_str(&aligned(&header, &rows));
    }
    out
}

/// Columns padded to their widest cell, two spaces apart, a rule under the header; the first
/// column left-aligned (names), the others right-aligned (numbers).
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(width.len()) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, w) in width.iter().enumerate() {
            let c = cells.get(i).map(String::as_str).unwrap_or("");
            let pad = " ".repeat(w - c.chars().count().min(*w));
            if i > 0 {
                s.push_str("  ");
            }
            if i == 0 {
                let _ = write!(s, "{c}{pad}");
            } else {
                let _ = write!(s, "{pad}{c}");
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    let total: usize = width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
    }
    out
}
