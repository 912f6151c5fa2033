//! `roc_<dataset>_<split>.png`: a small panel per label, a line per setting, its AUC in the
//! legend, the chance diagonal dashed.

use anyhow::Result;
use plotters::prelude::*;

use super::{bold, font, pe, png, Area, Colours};
use crate::report::layout::{pct, Col};
use crate::report::{Report, RocSet};

const PANEL: u32 = 360;

pub fn draw(report: &Report, col: &Col, colours: &Colours) -> Result<Option<Vec<u8>>> {
    let mut sets: Vec<&RocSet> =
        report.rocs.iter().filter(|r| r.dataset == col.dataset && r.split == col.split).collect();
    let order = crate::report::layout::ordered_settings(sets.iter().map(|s| s.setting.as_str()));
    sets.sort_by_key(|s| order.iter().position(|o| *o == s.setting));
    let mut labels: Vec<&str> = sets.iter().flat_map(|s| s.curves.iter().map(|c| c.label.as_str())).collect();
    labels.sort();
    labels.dedup();
    if labels.is_empty() {
        return Ok(None);
    }
    let cols = (labels.len() as f64).sqrt().ceil() as usize;
    let rows = labels.len().div_ceil(cols);
    // Two evaluations of one setting here are told apart by their run names.
    let name = |s: &RocSet| {
        let twins = sets.iter().filter(|o| o.setting == s.setting).count();
        if twins > 1 {
            format!("{} ({})", s.setting, s.run)
        } else {
            s.setting.clone()
        }
    };
    let (w, h) = (PANEL * cols as u32, PANEL * rows as u32 + 50);
    png(w, h, |root| {
        let body =
            root.titled(&format!("ROC curves, {} (AUC % in the legends)", col.header()), bold(22.0)).map_err(pe)?;
        let areas = body.split_evenly((rows, cols));
        for (label, area) in labels.iter().zip(&areas) {
            panel(area, label, &sets, &name, colours)?;
        }
        Ok(())
    })
    .map(Some)
}

fn panel(
    area: &Area,
    label: &str,
    sets: &[&RocSet],
    name: &dyn Fn(&RocSet) -> String,
    colours: &Colours,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(label, bold(16.0))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(40)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("false positive rate")
        .y_desc("true positive rate")
        .label_style(font(12.0))
        .axis_desc_style(font(13.0))
        .x_labels(6)
        .y_labels(6)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(232, 232, 232))
        .draw()
        .map_err(pe)?;
    let grey = RGBColor(160, 160, 160);
    chart.draw_series(DashedLineSeries::new([(0.0, 0.0), (1.0, 1.0)], 6, 4, grey.stroke_width(1))).map_err(pe)?;
    let mut any = false;
    for set in sets {
        let Some(curve) = set.curves.iter().find(|c| c.label == label) else { continue };
        let pts: Vec<(f64, f64)> = curve
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| (x.clamp(0.0, 1.0), y.clamp(0.0, 1.0)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let colour = colours.setting(&set.setting);
        chart
            .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
            .map_err(pe)?
            .label(format!("{} {}", name(set), pct(curve.auc)))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(3)));
        any = true;
    }
    if any {
        chart
            .configure_series_labels()
            .label_font(font(13.0))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::LowerRight)
            .margin(6)
            .draw()
            .map_err(pe)?;
    }
    Ok(())
}
