//! The report's PNG plots (`plotters` drawing into memory, the `image` crate encoding, then an
//! atomic write): training curves, ROC curves per label, AUC against the swept value.
//!
//! Fonts come from the `dejavu` crate, registered as "sans-serif": no system font is needed.

mod ablation;
mod roc;
mod text_to_image;
mod training;

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use model::checkpoint::write_file_atomically;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::layout::{self, AblationTable, Col};
use super::metrics::Series;
use super::Report;

/// What a PNG shows (the markdown links each where it belongs).
#[derive(Clone, Debug, PartialEq)]
pub enum Plot {
    Training,
    Roc(Col),
    Ablation { name: String, col: Col },
    TextToImage,
}

/// A plot written by this call.
pub struct Drawn {
    pub path: PathBuf,
    /// Relative to the report folder, for links: `plots/training.png`.
    pub file: String,
    pub what: Plot,
}

/// Draws every plot there is data for into `dir`; a plot that fails is a note.
pub fn draw_all(report: &Report, curves: &[Series], dir: &Path, notes: &mut Vec<String>) -> Vec<Drawn> {
    let colours = Colours::of(report);
    let mut jobs: Vec<(Plot, String)> = vec![(Plot::Training, "training".to_string())];
    let roc_cols =
        layout::ordered_cols(report.rocs.iter().map(|r| Col { dataset: r.dataset.clone(), split: r.split.clone() }));
    jobs.extend(roc_cols.into_iter().map(|c| {
        let stem = format!("roc_{}", c.slug());
        (Plot::Roc(c), stem)
    }));
    let ablations = AblationTable::all(report);
    jobs.extend(
        ablations
            .iter()
            .map(|t| (Plot::Ablation { name: t.name.clone(), col: t.col.clone() }, format!("ablation_{}", t.slug()))),
    );

    jobs.push((Plot::TextToImage, "text_to_image".to_string()));

    let mut drawn: Vec<Drawn> = Vec::new();
    for (what, stem) in jobs {
        // Two names that make the same file name ("MIMIC" and "mimic") get distinct files.
        let mut file = format!("{stem}.png");
        let mut n = 2;
        while drawn.iter().any(|d| d.file == format!("plots/{file}")) {
            file = format!("{stem}-{n}.png");
            n += 1;
        }
        let render = || -> Result<Option<Vec<u8>>> {
            match &what {
                Plot::Training => training::draw(curves),
                Plot::Roc(col) => roc::draw(report, col, &colours),
                Plot::Ablation { name, col } => {
                    let t = ablations.iter().find(|t| t.name == *name && t.col == *col).expect("listed above");
                    ablation::draw(t, &colours)
                }
                Plot::TextToImage => text_to_image::draw(report),
            }
        };
        // A drawing library that panics on odd data must not take the plan down with it.
        let png = match catch_unwind(AssertUnwindSafe(render)) {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the plotting library panicked")),
        };
        let path = dir.join(&file);
        match png.and_then(|png| png.map(|bytes| write_file_atomically(&path, &bytes)).transpose()) {
            Ok(Some(())) => drawn.push(Drawn { path, file: format!("plots/{file}"), what }),
            Ok(None) => {}
            Err(e) => notes.push(format!("plot {file} not drawn: {e:#}")),
        }
    }
    drawn
}

/// Colours: the paper's settings keep theirs in every plot and report; other settings and
/// training runs take the remaining colours in turn.
pub struct Colours {
    settings: HashMap<String, RGBColor>,
}

/// Tableau 10.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// rand + LP grey, CLIP + LP orange, FT blue, CLS + FT purple, CLS + LP red.
const PAPER_COLOURS: [(&str, usize); 5] = [("rand+lp", 7), ("clip+lp", 1), ("ft", 0), ("cls+ft", 4), ("cls+lp", 3)];

impl Colours {
    fn of(report: &Report) -> Colours {
        let names = report
            .rows
            .iter()
            .map(|r| r.setting.as_str())
            .chain(report.rocs.iter().map(|r| r.setting.as_str()))
            .chain(report.zero_shot.iter().map(|r| r.setting.as_str()));
        let mut settings = HashMap::new();
        let mut spare = (0..PALETTE.len()).filter(|i| !PAPER_COLOURS.iter().any(|(_, j)| j == i)).cycle();
        for s in layout::ordered_settings(names) {
            let key = layout::setting_key(&s);
            let colour = match PAPER_COLOURS.iter().find(|(k, _)| *k == key) {
                Some(&(_, i)) => PALETTE[i],
                None => PALETTE[spare.next().expect("cycle")],
            };
            settings.insert(s, colour);
        }
        Colours { settings }
    }

    pub fn setting(&self, setting: &str) -> RGBColor {
        self.settings.get(setting).copied().unwrap_or(PALETTE[0])
    }

    /// The i-th of a list of runs.
    pub fn nth(i: usize) -> RGBColor {
        PALETTE[i % PALETTE.len()]
    }
}

pub type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Plotters' errors carry the backend's type; the report only needs their message.
pub fn pe(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

fn register_fonts() -> Result<()> {
    static FONTS: OnceLock<Result<(), String>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .and_then(|_| plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()))
                .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A `w` x `h` white canvas given to `draw`, then encoded as PNG.
pub fn png(w: u32, h: u32, draw: impl FnOnce(&Area) -> Result<()>) -> Result<Vec<u8>> {
    register_fonts()?;
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(pe)?;
        draw(&root)?;
        root.present().map_err(pe)?;
    }
    let mut out = Vec::new();
    PngEncoder::new(&mut out).write_image(&pixels, w, h, ExtendedColorType::Rgb8).context("encoding a PNG")?;
    Ok(out)
}

/// The smallest range holding every finite value, widened by `pad` of its span on both sides
/// (a single value gets a span of its own), or `None` when there is no finite value.
pub fn span(values: impl IntoIterator<Item = f64>, pad: f64) -> Option<Range<f64>> {
    let (lo, hi) = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return None;
    }
    let width = if hi > lo { hi - lo } else { lo.abs().max(1.0) * 0.1 };
    Some(lo - pad * width..hi + pad * width)
}

/// Fonts used across the plots.
pub fn font(size: f64) -> TextStyle<'static> {
    ("sans-serif", size).into_font().into()
}

pub fn bold(size: f64) -> TextStyle<'static> {
    ("sans-serif", size).into_font().style(FontStyle::Bold).into()
}
