//! The paper's text-to-image figure: one column per finding; a row of generated images per
//! text-to-image run (model), then the real test images, each with the report sentence that
//! names its finding (the prompt of the images above it).

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{bold, font, pe, png};
use crate::report::{Report, TextToImageRow};

const LEFT: u32 = 120;
const TOP: u32 = 28;
const GAP: u32 = 8;
/// Lines of wrapped sentence under each real image.
const TEXT_LINES: u32 = 5;
const LINE: u32 = 14;

/// A gray PNG as rows of 8-bit values, resampled (nearest) to `side x side`.
fn load(path: &str, side: u32) -> Result<Vec<u8>> {
    let img = image::open(path).with_context(|| format!("reading {path}"))?.to_luma8();
    let (w, h) = img.dimensions();
    let mut out = vec![0u8; (side * side) as usize];
    for y in 0..side {
        for x in 0..side {
            out[(y * side + x) as usize] = img.get_pixel(x * w / side, y * h / side)[0];
        }
    }
    Ok(out)
}

/// Words of `text` in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.len() + 1 + word.len() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

fn blit(area: &super::Area, px: &[u8], side: u32, x0: u32, y0: u32) -> Result<()> {
    for y in 0..side {
        for x in 0..side {
            let v = px[(y * side + x) as usize];
            area.draw_pixel(((x0 + x) as i32, (y0 + y) as i32), &RGBColor(v, v, v)).map_err(pe)?;
        }
    }
    Ok(())
}

/// The figure, or `None` without text-to-image runs.
pub fn draw(report: &Report) -> Result<Option<Vec<u8>>> {
    let rows: &[TextToImageRow] = &report.text_to_image;
    let Some(first) = rows.first() else { return Ok(None) };
    let findings: Vec<&str> = first.cells.iter().map(|c| c.finding.as_str()).collect();
    let side = rows.iter().map(|r| r.size as u32).max().unwrap_or(128).clamp(64, 256);
    let col_w = side.max(170);
    let real_row = first.cells.iter().any(|c| c.real.is_some());
    let n_rows = rows.len() as u32 + real_row as u32;
    let w = LEFT + findings.len() as u32 * (col_w + GAP);
    let h = TOP + n_rows * (side + GAP) + if real_row { TEXT_LINES * LINE + GAP } else { 0 };
    let bytes = png(w, h, |area| {
        let centre = Pos::new(HPos::Center, VPos::Top);
        for (k, f) in findings.iter().enumerate() {
            let x = LEFT + k as u32 * (col_w + GAP) + col_w / 2;
            area.draw_text(f, &bold(15.0).pos(centre), (x as i32, 6)).map_err(pe)?;
        }
        let label = |row: u32, text: &str| -> Result<()> {
            let y = TOP + row * (side + GAP) + side / 2;
            area.draw_text(text, &font(13.0).pos(Pos::new(HPos::Left, VPos::Center)), (6, y as i32)).map_err(pe)
        };
        for (r, run) in rows.iter().enumerate() {
            label(r as u32, &format!("{} (generated)", run.setting))?;
            for (k, f) in findings.iter().enumerate() {
                let Some(cell) = run.cells.iter().find(|c| c.finding == *f) else { continue };
                let x0 = LEFT + k as u32 * (col_w + GAP) + (col_w - side) / 2;
                blit(area, &load(&cell.generated, side)?, side, x0, TOP + r as u32 * (side + GAP))?;
            }
        }
        if real_row {
            let r = rows.len() as u32;
            label(r, "real test image")?;
            for (k, cell) in first.cells.iter().enumerate() {
                let x0 = LEFT + k as u32 * (col_w + GAP);
                let y0 = TOP + r * (side + GAP);
                if let Some(real) = &cell.real {
                    blit(area, &load(real, side)?, side, x0 + (col_w - side) / 2, y0)?;
                }
                // About 6.5 px per character at 11 px.
                for (i, line) in wrap(&cell.prompt, (col_w / 6) as usize).iter().take(TEXT_LINES as usize).enumerate() {
                    let y = y0 + side + 4 + i as u32 * LINE;
                    area.draw_text(line, &font(11.0).pos(centre), ((x0 + col_w / 2) as i32, y as i32)).map_err(pe)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_words_whole() {
        assert_eq!(
            wrap("Left basilar atelectasis, unchanged.", 14),
            vec!["Left basilar", "atelectasis,", "unchanged."]
        );
        assert!(wrap("", 10).is_empty());
    }
}
