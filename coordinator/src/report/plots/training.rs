//! `training.png`: a panel per loss kind (InfoNCE and BCE do not share a scale), one for the
//! logit scale of the contrastive runs, one for the fine-tuning runs' validation macro AUC;
//! a line per run, in the same colour in every panel.

use anyhow::Result;
use plotters::prelude::*;

use super::{bold, font, pe, png, span, Area, Colours};
use crate::report::metrics::Series;

/// How a panel's lines are drawn.
#[derive(Clone, Copy, PartialEq)]
enum Look {
    /// A loss, noisy step to step: faint per-step lines under a centred moving average.
    Noisy,
    /// A smooth quantity (the logit scale): the line as it is.
    Plain,
    /// Few points (one per epoch): a line with markers.
    Markers,
}

/// One run's points on a panel.
struct Line<'a> {
    series: &'a Series,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
}

/// Points on a panel; a line per run.
struct Panel<'a> {
    title: String,
    y_desc: &'static str,
    lines: Vec<Line<'a>>,
    look: Look,
    /// Where the lines are not: losses fall (legend top right), the others rise.
    legend: SeriesLabelPosition,
}

const PANEL_W: u32 = 720;
const PANEL_H: u32 = 440;

pub fn draw(curves: &[Series]) -> Result<Option<Vec<u8>>> {
    let runs: Vec<(&Series, RGBColor)> =
        curves.iter().filter(|c| !c.is_empty()).enumerate().map(|(i, c)| (c, Colours::nth(i))).collect();
    let mut panels: Vec<Panel> = Vec::new();
    let mut kinds: Vec<&str> = Vec::new();
    for (c, _) in &runs {
        if !c.loss.is_empty() && !kinds.contains(&c.kind.as_str()) {
            kinds.push(&c.kind);
        }
    }
    for kind in kinds {
        let lines = runs
            .iter()
            .filter(|(c, _)| c.kind == kind && !c.loss.is_empty())
            .map(|&(c, colour)| Line { series: c, points: c.loss.clone(), colour })
            .collect();
        panels.push(Panel {
            title: loss_title(kind),
            y_desc: "loss",
            lines,
            look: Look::Noisy,
            legend: SeriesLabelPosition::UpperRight,
        });
    }
    // A fine-tuning run carries the text tower's logit scale unchanged: not worth a line.
    let scale: Vec<_> = runs
        .iter()
        .filter(|(c, _)| c.kind != "finetune" && !c.logit_scale.is_empty())
        .map(|&(c, colour)| Line { series: c, points: c.logit_scale.clone(), colour })
        .collect();
    if !scale.is_empty() {
        panels.push(Panel {
            title: "logit scale, ln(1/temperature)".to_string(),
            y_desc: "logit scale",
            lines: scale,
            look: Look::Plain,
            legend: SeriesLabelPosition::LowerRight,
        });
    }
    let valid: Vec<_> = runs
        .iter()
        .filter(|(c, _)| !c.valid_macro_auc.is_empty())
        .map(|&(c, colour)| Line {
            series: c,
            points: c.valid_macro_auc.iter().map(|&(s, a)| (s, a * 100.0)).collect(),
            colour,
        })
        .collect();
    if !valid.is_empty() {
        panels.push(Panel {
            title: "validation macro AUC (end of each epoch)".to_string(),
            y_desc: "macro AUC %",
            lines: valid,
            look: Look::Markers,
            legend: SeriesLabelPosition::LowerRight,
        });
    }
    if panels.is_empty() {
        return Ok(None);
    }
    let cols = if panels.len() == 1 { 1 } else { 2 };
    let rows = panels.len().div_ceil(cols);
    let (w, h) = (PANEL_W * cols as u32, PANEL_H * rows as u32 + 50);
    png(w, h, |root| {
        let body = root.titled("Training", bold(26.0)).map_err(pe)?;
        let areas = body.split_evenly((rows, cols));
        for (panel, area) in panels.iter().zip(&areas) {
            draw_panel(area, panel)?;
        }
        Ok(())
    })
    .map(Some)
}

fn loss_title(kind: &str) -> String {
    match kind {
        "pretrain-cls" => "contrastive loss (InfoNCE), pretraining".to_string(),
        "finetune" => "label loss (BCE), fine-tuning".to_string(),
        other => format!("loss, {other}"),
    }
}

fn draw_panel(area: &Area, panel: &Panel) -> Result<()> {
    let all = || panel.lines.iter().flat_map(|l| l.points.iter());
    let (Some(x), Some(y)) = (span(all().map(|p| p.0), 0.02), span(all().map(|p| p.1), 0.05)) else {
        return Ok(());
    };
    // Steps count from 0 or 1: start the axis at 0 (unless a step is negative).
    let x = if x.start < 0.0 && x.end > 0.0 { 0.0..x.end } else { x };
    let many = panel.look == Look::Noisy && panel.lines.iter().any(|l| l.points.len() > 40);
    let caption =
        if many { format!("{} (faint: every step; line: moving average)", panel.title) } else { panel.title.clone() };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, font(17.0))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(62)
        .build_cartesian_2d(x, y)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(panel.y_desc)
        .label_style(font(13.0))
        .axis_desc_style(font(15.0))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_label_formatter(&|v| crate::report::layout::value(v.round()))
        .draw()
        .map_err(pe)?;
    for Line { series, points: pts, colour } in &panel.lines {
        let colour = *colour;
        let label =
            if series.setting.is_empty() { series.run.clone() } else { format!("{} ({})", series.run, series.setting) };
        let shown = if many && pts.len() > 40 {
            chart.draw_series(LineSeries::new(pts.iter().copied(), colour.mix(0.25).stroke_width(1))).map_err(pe)?;
            smooth(pts)
        } else {
            pts.clone()
        };
        let line = chart.draw_series(LineSeries::new(shown.iter().copied(), colour.stroke_width(2))).map_err(pe)?;
        line.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3)));
        if panel.look == Look::Markers {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(pe)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(font(13.0))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(panel.legend.clone())
        .draw()
        .map_err(pe)?;
    Ok(())
}

/// The mean over a window of about a twentieth of the points centred on each point (narrower
/// at the ends), so the average does not lag behind the steps as an exponential one does.
fn smooth(pts: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let half = (pts.len() / 40).max(1);
    let mut prefix = vec![0.0; pts.len() + 1];
    for (i, p) in pts.iter().enumerate() {
        prefix[i + 1] = prefix[i] + p.1;
    }
    (0..pts.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(pts.len()));
            (pts[i].0, (prefix[hi] - prefix[lo]) / (hi - lo) as f64)
        })
        .collect()
}
