//! `ablation_<name>_<dataset>_<split>.png`: macro AUC against the swept value, a line per
//! setting, the 95% CI as error bars. The x axis is logarithmic (fractions and batch sizes
//! span decades) unless a value is not positive or the sweep is over seeds (labels, not sizes).

use std::ops::Range;

use anyhow::Result;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::{bold, font, pe, png, span, Area, Colours};
use crate::report::layout::{self, AblationTable};

/// One setting's points: (value, AUC %, CI low %, CI high %).
type Points = Vec<(f64, f64, f64, f64)>;

pub fn draw(t: &AblationTable, colours: &Colours) -> Result<Option<Vec<u8>>> {
    let lines: Vec<(&String, Points)> = t
        .settings
        .iter()
        .map(|s| {
            let pts: Points = t
                .values
                .iter()
                .filter_map(|&v| t.at(s, v).map(|r| (v, r.macro_auc, r.ci95)))
                .filter(|(v, auc, _)| v.is_finite() && auc.is_finite())
                .map(|(v, auc, ci)| {
                    // A CI that is missing collapses onto the point (no bar).
                    let (lo, hi) = if ci.iter().all(|c| c.is_finite()) { (ci[0], ci[1]) } else { (auc, auc) };
                    (v, auc * 100.0, lo.min(auc) * 100.0, hi.max(auc) * 100.0)
                })
                .collect();
            (s, pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    let xs = || lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let Some(y) = span(lines.iter().flat_map(|(_, p)| p.iter().flat_map(|q| [q.2, q.3])), 0.08) else {
        return Ok(None);
    };
    let y = y.start.max(0.0)..y.end.min(100.0).max(y.start.max(0.0) + 1.0);
    let seeds = t.name.to_lowercase().contains("seed");
    let log = !seeds && xs().all(|v| v > 0.0);
    let title = format!("{}: macro AUC on {}", t.name, t.col.header());
    let mut ticks: Vec<f64> = xs().collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let x_desc = if log { format!("{} (log scale)", t.name) } else { t.name.clone() };
    // Seeds are names, not sizes: no line joins them.
    let axis = Axis { title: &title, x_desc: &x_desc, connect: !seeds, ticks: ticks.len() };
    png(820, 540, |root| {
        if log {
            let (lo, hi) = (ticks[0], ticks[ticks.len() - 1]);
            // A tick at each swept value (0.01, 0.03, 0.1, 1), not at round numbers between
            // them; a fifth of a decade's room on each side keeps the end bars off the frame.
            let x = (lo / 1.6..hi * 1.6).log_scale().with_key_points(ticks.clone());
            let label = |v: &f64| layout::value(round_sig(*v));
            chart(root, x, y.clone(), &axis, &label, &lines, colours, |v, k, n| v * 1.06f64.powf(dodge(k, n)))
        } else {
            // Evenly spaced categories, one per value (plotters' linear f64 axis takes no key
            // points: the ticks fall on the whole positions, labelled with the values).
            let at = |v: f64| ticks.iter().position(|t| *t == v).unwrap_or(0) as f64;
            let x = -0.5..ticks.len() as f64 - 0.5;
            let label = |v: &f64| {
                let i = v.round();
                let whole = (v - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < ticks.len();
                if whole {
                    layout::value(ticks[i as usize])
                } else {
                    String::new()
                }
            };
            chart(root, x, y.clone(), &axis, &label, &lines, colours, |v, k, n| at(v) + 0.04 * dodge(k, n))
        }
    })
    .map(Some)
}

/// Settings' points at one value are spread a little sideways so their bars do not overlap.
fn dodge(k: usize, n: usize) -> f64 {
    k as f64 - (n as f64 - 1.0) / 2.0
}

struct Axis<'a> {
    title: &'a str,
    x_desc: &'a str,
    /// Join a setting's points with a line.
    connect: bool,
    /// How many values there are (a tick each).
    ticks: usize,
}

#[allow(clippy::too_many_arguments)]
fn chart<X>(
    root: &Area,
    x: X,
    y: Range<f64>,
    axis: &Axis,
    label: &dyn Fn(&f64) -> String,
    lines: &[(&String, Points)],
    colours: &Colours,
    shift: impl Fn(f64, usize, usize) -> f64,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .caption(axis.title, bold(20.0))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc(axis.x_desc)
        .y_desc("macro AUC % (95% CI)")
        .label_style(font(14.0))
        .axis_desc_style(font(16.0))
        .x_labels(axis.ticks.max(2))
        .x_label_formatter(label)
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(pe)?;
    let n = lines.len();
    for (k, (setting, pts)) in lines.iter().enumerate() {
        let colour = colours.setting(setting);
        let at = |p: &(f64, f64, f64, f64)| (shift(p.0, k, n), p.1);
        if axis.connect {
            chart.draw_series(LineSeries::new(pts.iter().map(at), colour.stroke_width(2))).map_err(pe)?;
        }
        chart
            .draw_series(
                pts.iter().map(|p| ErrorBar::new_vertical(shift(p.0, k, n), p.2, p.1, p.3, colour.stroke_width(2), 10)),
            )
            .map_err(pe)?;
        chart
            .draw_series(pts.iter().map(|p| Circle::new(at(p), 5, colour.filled())))
            .map_err(pe)?
            .label(setting.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .label_font(font(14.0))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(pe)?;
    Ok(())
}

/// Tick values of a log axis come out as 0.010000000000000002: three significant digits.
fn round_sig(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let mag = 10f64.powf(v.abs().log10().floor() - 2.0);
    (v / mag).round() * mag
}
