//! `results.md`: every table of the report, the run folder behind every number, the plots.

use std::fmt::Write;

use super::layout::{self, auc_ci, count, diff_ci, pct, published, AblationTable, Col, MainTable};
use super::metrics::Series;
use super::plots::{Drawn, Plot};
use super::{Report, ResultRow, TextToImageCell, TextToImageRow};

pub fn render(report: &Report, curves: &[Series], drawn: &[Drawn], notes: &[String]) -> String {
    let mut md = String::new();
    let title = if report.title.trim().is_empty() { "cxrclip results" } else { report.title.trim() };
    let _ = writeln!(md, "# {title}\n");
    md.push_str(
        "Macro AUC in % (mean ROC AUC over the labels with both classes in the split) with its 95% \
         confidence interval, as evaluated by each run. This file is rewritten after each finished run; \
         an empty cell is a run that has not finished (or is not in the plan).\n\n",
    );
    main_table(&mut md, report);
    comparisons(&mut md, report);
    per_label(&mut md, report, drawn);
    ablations(&mut md, report, drawn);
    zero_shot(&mut md, report);
    retrieval(&mut md, report);
    text_to_image(&mut md, report, drawn);
    training(&mut md, curves, drawn);
    if !notes.is_empty() {
        md.push_str("## Notes\n\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
        md.push('\n');
    }
    md
}

/// A markdown table, cells padded so the raw file reads as a table too.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let escape = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let header: Vec<String> = header.iter().map(|h| escape(h)).collect();
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| escape(c)).collect()).collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count().max(3)).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(width.len()) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, w) in width.iter().enumerate() {
            let c = cells.get(i).map(String::as_str).unwrap_or("");
            let pad = w - c.chars().count().min(*w);
            let _ = write!(s, " {c}{} |", " ".repeat(pad));
        }
        s.push('\n');
        s
    };
    let mut out = line(&header);
    out.push('|');
    for w in &width {
        let _ = write!(out, " {} |", "-".repeat(*w));
    }
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
    }
    out.push('\n');
    out
}

fn code(s: &str) -> String {
    format!("`{}`", s.replace('`', "'"))
}

/// "`runs/demo/cls-lp` (1,234 images, 567 patients)".
fn source(r: &ResultRow) -> String {
    format!("{} ({} images, {} patients)", code(&r.run_dir), count(r.images), count(r.patients))
}

fn main_table(md: &mut String, report: &Report) {
    md.push_str("## The paper's table\n\n");
    let t = MainTable::of(report);
    if t.cells.is_empty() {
        md.push_str("No linear-probe or fine-tuning evaluation has finished yet.\n\n");
        return;
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
            row.push(t.cell(s, c).map(|r| auc_ci(r.macro_auc, r.ci95)).unwrap_or_default());
            if t.has_published(c) {
                row.push(published(setting, col).map(|p| format!("{p:.1}")).unwrap_or_default());
            }
        }
        rows.push(row);
    }
    md.push_str(&table(&header, &rows));
    if (0..t.cols.len()).any(|c| t.has_published(c)) {
        let _ = writeln!(md, "{}.\n", layout::PUBLISHED_NOTE);
    }
    md.push_str("Where each number comes from:\n\n");
    for (s, setting) in t.settings.iter().enumerate() {
        for (c, col) in t.cols.iter().enumerate() {
            let Some(rs) = t.cells.get(&(s, c)) else { continue };
            let _ = writeln!(md, "- {setting}, {}: {}", col.header(), source(rs[0]));
            for other in &rs[1..] {
                let _ = writeln!(md, "  - also evaluated (not shown): {}", source(other));
            }
        }
    }
    md.push('\n');
}

fn comparisons(md: &mut String, report: &Report) {
    if report.comparisons.is_empty() {
        return;
    }
    md.push_str("## Paired differences\n\n");
    md.push_str(
        "Macro AUC of A minus B in AUC points, on the same test images, with its 95% CI; the claim \
         holds where the CI excludes 0.\n\n",
    );
    let dir_of = |run: &str, dataset: &str| {
        report
            .rows
            .iter()
            .find(|r| r.run == run && r.dataset == dataset)
            .or_else(|| report.rows.iter().find(|r| r.run == run))
            .map(|r| code(&r.run_dir))
            .unwrap_or_else(|| format!("run {}", code(run)))
    };
    let header: Vec<String> =
        ["A - B", "dataset", "difference [95% CI]", "CI excludes 0", "run folders (A; B)"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = report
        .comparisons
        .iter()
        .map(|c| {
            let verdict = match layout::excludes_zero(c.ci95) {
                Some(true) => format!("yes: {} higher", c.setting_a),
                Some(false) => format!("yes: {} higher", c.setting_b),
                None => "no".to_string(),
            };
            vec![
                format!("{} - {}", c.setting_a, c.setting_b),
                format!("{} {}", c.dataset, c.split),
                diff_ci(c.diff, c.ci95),
                verdict,
                format!("{}; {}", dir_of(&c.a, &c.dataset), dir_of(&c.b, &c.dataset)),
            ]
        })
        .collect();
    md.push_str(&table(&header, &rows));
}

fn plot_link(md: &mut String, drawn: &[Drawn], want: &Plot, alt: &str) {
    if let Some(d) = drawn.iter().find(|d| d.what == *want) {
        let _ = writeln!(md, "![{alt}]({})\n", d.file);
    }
}

fn per_label(md: &mut String, report: &Report, drawn: &[Drawn]) {
    let t = MainTable::of(report);
    if t.cells.is_empty() {
        return;
    }
    md.push_str("## Per-label AUC\n\n");
    for (c, col) in t.cols.iter().enumerate() {
        let _ = writeln!(md, "### {}\n", col.header());
        let present: Vec<(usize, &ResultRow)> =
            (0..t.settings.len()).filter_map(|s| t.cell(s, c).map(|r| (s, r))).collect();
        let mut labels: Vec<&String> = present.iter().flat_map(|(_, r)| r.per_label.keys()).collect();
        labels.sort();
        labels.dedup();
        let mut header = vec!["label".to_string()];
        header.extend(present.iter().map(|(s, _)| t.settings[*s].clone()));
        let mut rows: Vec<Vec<String>> = labels
            .iter()
            .map(|l| {
                let mut row = vec![l.to_string()];
                row.extend(present.iter().map(|(_, r)| r.per_label.get(*l).map(|a| pct(*a)).unwrap_or_default()));
                row
            })
            .collect();
        let mut macro_row = vec!["macro".to_string()];
        macro_row.extend(present.iter().map(|(_, r)| pct(r.macro_auc)));
        rows.push(macro_row);
        let mut dir_row = vec!["run folder".to_string()];
        dir_row.extend(present.iter().map(|(_, r)| code(&r.run_dir)));
        rows.push(dir_row);
        md.push_str(&table(&header, &rows));
        if present.iter().any(|(_, r)| r.per_label.values().any(|a| !a.is_finite())) {
            md.push_str("n/a: the split has one class of that label only.\n\n");
        }
        plot_link(md, drawn, &Plot::Roc(col.clone()), &format!("ROC curves, {}", col.header()));
    }
}

fn ablations(md: &mut String, report: &Report, drawn: &[Drawn]) {
    let tables = AblationTable::all(report);
    if tables.is_empty() {
        return;
    }
    md.push_str("## Ablations\n\n");
    for t in &tables {
        let _ = writeln!(md, "### {}, {}\n", t.name, t.col.header());
        let mut header = vec![t.name.clone()];
        header.extend(t.settings.iter().cloned());
        let rows: Vec<Vec<String>> = t
            .values
            .iter()
            .map(|&v| {
                let mut row = vec![layout::value(v)];
                row.extend(
                    t.settings.iter().map(|s| t.at(s, v).map(|r| auc_ci(r.macro_auc, r.ci95)).unwrap_or_default()),
                );
                row
            })
            .collect();
        md.push_str(&table(&header, &rows));
        md.push_str("Where each number comes from:\n\n");
        for s in &t.settings {
            for &v in &t.values {
                if let Some(r) = t.at(s, v) {
                    let _ = writeln!(md, "- {s}, {} {}: {}", t.name, layout::value(v), source(r));
                }
            }
        }
        md.push('\n');
        plot_link(
            md,
            drawn,
            &Plot::Ablation { name: t.name.clone(), col: t.col.clone() },
            &format!("{}, {}", t.name, t.col.header()),
        );
    }
}

fn zero_shot(md: &mut String, report: &Report) {
    if report.zero_shot.is_empty() {
        return;
    }
    md.push_str("## Zero-shot\n\n");
    let header: Vec<String> =
        ["setting", "dataset", "method", "macro AUC [95% CI]", "run folder"].map(String::from).to_vec();
    let rows: Vec<Vec<String>> = report
        .zero_shot
        .iter()
        .map(|z| {
            vec![
                z.setting.clone(),
                format!("{} {}", z.dataset, z.split),
                z.method.clone(),
                auc_ci(z.macro_auc, z.ci95),
                code(&z.run_dir),
            ]
        })
        .collect();
    md.push_str(&table(&header, &rows));
    let cols = layout::ordered_cols(
        report.zero_shot.iter().map(|z| Col { dataset: z.dataset.clone(), split: z.split.clone() }),
    );
    for col in cols {
        let here: Vec<_> =
            report.zero_shot.iter().filter(|z| z.dataset == col.dataset && z.split == col.split).collect();
        let mut labels: Vec<&String> = here.iter().flat_map(|z| z.per_label.keys()).collect();
        labels.sort();
        labels.dedup();
        if labels.is_empty() {
            continue;
        }
        let _ = writeln!(md, "Per label, {}:\n", col.header());
        let mut header = vec!["label".to_string()];
        header.extend(here.iter().map(|z| format!("{}, {}", z.setting, z.method)));
        let rows: Vec<Vec<String>> = labels
            .iter()
            .map(|l| {
                let mut row = vec![l.to_string()];
                row.extend(here.iter().map(|z| z.per_label.get(*l).map(|a| pct(*a)).unwrap_or_default()));
                row
            })
            .collect();
        md.push_str(&table(&header, &rows));
    }
}

fn text_to_image(md: &mut String, report: &Report, drawn: &[Drawn]) {
    if report.text_to_image.is_empty() {
        return;
    }
    md.push_str(
        "## Text to image

",
    );
    md.push_str(
        "Images optimised by CLIP guidance (grayscale pixels in a cosine basis, AdamW, augmented views; \
         `coordinator imagine`) to match a test report's sentence naming each finding, above the real test \
         image of that report. The table gives the cosine similarity of each generated image, seen whole, \
         to its own sentence, and whether its own sentence is the most similar of the run's sentences.\n\n",
    );
    plot_link(md, drawn, &Plot::TextToImage, "generated (rows per model) and real test images per finding");
    let findings: Vec<String> =
        report.text_to_image.first().map(|r| r.cells.iter().map(|c| c.finding.clone()).collect()).unwrap_or_default();
    let mut header = vec!["setting".to_string()];
    header.extend(findings.iter().cloned());
    header.extend(["own sentence wins".to_string(), "steps, size".to_string(), "run folder".to_string()]);
    let rows = per_finding_rows(
        report,
        &findings,
        |c| format!("{:.3}", c.similarity),
        |r, row| {
            let wins = r.cells.iter().filter(|c| c.own_prompt_wins).count();
            row.push(format!("{wins}/{}", r.cells.len()));
            row.push(format!("{}, {} px", r.steps, r.size));
            row.push(code(&r.run_dir));
        },
    );
    md.push_str(&table(&header, &rows));
    md.push_str(
        "A linear probe fitted on each model's features of the real training images scores the generated \
         images: the probability of each image's own finding, beside the probe's mean over the real test \
         images positive / negative for it.\n\n",
    );
    let mut header = vec!["setting".to_string()];
    header.extend(findings.iter().cloned());
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let rows = per_finding_rows(
        report,
        &findings,
        |c| format!("{} ({} / {})", opt(c.probe), opt(c.probe_real_positive), opt(c.probe_real_negative)),
        |_, _| {},
    );
    md.push_str(&table(&header, &rows));
    if let Some(first) = report.text_to_image.first() {
        md.push_str("Sentences (from the test reports of the real images):\n\n");
        for c in &first.cells {
            let _ = writeln!(md, "- {}: \"{}\"", c.finding, c.prompt);
        }
        md.push('\n');
    }
}

/// A row per text-to-image setting: its name, one cell per finding (empty where it has none),
/// then what `extra` appends.
fn per_finding_rows(
    report: &Report,
    findings: &[String],
    cell: impl Fn(&TextToImageCell) -> String,
    extra: impl Fn(&TextToImageRow, &mut Vec<String>),
) -> Vec<Vec<String>> {
    report
        .text_to_image
        .iter()
        .map(|r| {
            let mut row = vec![r.setting.clone()];
            row.extend(
                findings.iter().map(|f| r.cells.iter().find(|c| &c.finding == f).map(&cell).unwrap_or_default()),
            );
            extra(r, &mut row);
            row
        })
        .collect()
}

fn retrieval(md: &mut String, report: &Report) {
    if report.retrieval.is_empty() {
        return;
    }
    md.push_str("## Retrieval\n\n");
    md.push_str(
        "Recall@K in % of the right report among the K nearest to an image (image to report) and of the \
         right image among the K nearest to a report (report to image); median rank, 1 = first.\n\n",
    );
    let header: Vec<String> = [
        "setting",
        "dataset",
        "images",
        "reports",
        "I->R R@1",
        "I->R R@5",
        "I->R R@10",
        "I->R median rank",
        "R->I R@1",
        "R->I R@5",
        "R->I R@10",
        "R->I median rank",
        "run folder",
    ]
    .map(String::from)
    .to_vec();
    let rank = |x: f64| if x.is_finite() { layout::value(x) } else { "n/a".to_string() };
    let rows: Vec<Vec<String>> = report
        .retrieval
        .iter()
        .map(|r| {
            let (i, t) = (&r.image_to_report, &r.report_to_image);
            vec![
                r.setting.clone(),
                format!("{} {}", r.dataset, r.split),
                count(r.images),
                count(r.reports),
                pct(i.at1),
                pct(i.at5),
                pct(i.at10),
                rank(i.median_rank),
                pct(t.at1),
                pct(t.at5),
                pct(t.at10),
                rank(t.median_rank),
                code(&r.run_dir),
            ]
        })
        .collect();
    md.push_str(&table(&header, &rows));
}

fn training(md: &mut String, curves: &[Series], drawn: &[Drawn]) {
    if curves.is_empty() {
        return;
    }
    md.push_str("## Training\n\n");
    let header: Vec<String> =
        ["run", "setting", "kind", "steps", "last loss", "last logit scale", "best valid macro AUC", "metrics file"]
            .map(String::from)
            .to_vec();
    let last = |s: &[(f64, f64)], digits: usize| s.last().map(|p| format!("{:.*}", digits, p.1)).unwrap_or_default();
    let rows: Vec<Vec<String>> = curves
        .iter()
        .map(|c| {
            let steps = c.loss.last().map(|p| layout::value(p.0)).unwrap_or_default();
            let best = c.valid_macro_auc.iter().map(|p| p.1).fold(f64::NAN, f64::max);
            vec![
                c.run.clone(),
                c.setting.clone(),
                c.kind.clone(),
                steps,
                last(&c.loss, 4),
                // A fine-tuning run carries the text tower's scale unchanged.
                if c.kind == "finetune" { String::new() } else { last(&c.logit_scale, 3) },
                if best.is_finite() { pct(best) } else { String::new() },
                code(&c.metrics),
            ]
        })
        .collect();
    md.push_str(&table(&header, &rows));
    md.push_str("The logit scale is the model's parameter, ln(1/temperature) (capped at ln 100 = 4.605).\n\n");
    plot_link(md, drawn, &Plot::Training, "training curves");
}
