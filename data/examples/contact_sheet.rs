//! Renders 16 synthetic radiographs into a 4 x 4 contact sheet PNG with their positive labels:
//! three rows of frontal films and a last row of laterals (captions start with LAT).
//! `cargo run --release -p data --example contact_sheet -- docs/synthetic-contact-sheet.png [dataset] [seed]`
//! With a fourth argument K, writes only image K (12 and up are laterals) at three times the size,
//! to look at details.

use data::synth::{render_view, SynthConfig};
use data::DatasetKind;
use data::{LabelValue, LABELS};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).cloned().unwrap_or_else(|| "contact-sheet.png".into());
    let dataset: DatasetKind =
        args.get(2).map(|s| s.parse().map_err(anyhow::Error::msg)).transpose()?.unwrap_or(DatasetKind::Mimic);
    let seed: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(7);
    let cfg = SynthConfig { dataset, seed, size: 256, ..Default::default() };
    if let Some(k) = args.get(4) {
        let k: usize = k.parse()?;
        let (px, w, h, _, _) = render_view(&cfg, k, k >= 12);
        // A fifth argument "top" zooms into the upper half (shoulders, apices) at six times.
        let top = args.get(5).is_some_and(|s| s == "top");
        let (z, h) = if top { (6, h / 2) } else { (3, h) };
        let big: Vec<u8> =
            (0..h * z).flat_map(|y| (0..w * z).map(move |x| (y, x))).map(|(y, x)| px[(y / z) * w + x / z]).collect();
        image::save_buffer(&out, &big, (w * z) as u32, (h * z) as u32, image::ExtendedColorType::L8)?;
        println!("wrote {out}");
        return Ok(());
    }
    let cell = 256usize;
    let cap_h = 34usize;
    let (cols, rows) = (4usize, 4usize);
    let (sw, sh) = (cols * cell, rows * (cell + cap_h));
    let mut sheet = vec![0u8; sw * sh];
    for k in 0..16 {
        let lateral = k >= 12;
        let (px, w, h, labels, _text) = render_view(&cfg, k, lateral);
        let (cx, cy) = ((k % cols) * cell, (k / cols) * (cell + cap_h));
        // Centre-crop tall images to the square cell.
        let off = (h - w.min(h)) / 2;
        for y in 0..cell.min(h) {
            for x in 0..cell.min(w) {
                sheet[(cy + y) * sw + cx + x] = px[(y + off) * w + x];
            }
        }
        let pos: Vec<&str> =
            LABELS.iter().zip(labels.iter()).filter(|(_, v)| **v == LabelValue::Positive).map(|(l, _)| *l).collect();
        let unc: Vec<&str> =
            LABELS.iter().zip(labels.iter()).filter(|(_, v)| **v == LabelValue::Uncertain).map(|(l, _)| *l).collect();
        let mut line = if lateral { "LAT: ".to_string() } else { String::new() } + &pos.join(", ");
        if !unc.is_empty() {
            // "?" marks uncertain labels; the bar separates them from positives when there are any.
            let sep = if pos.is_empty() { "" } else { " | " };
            line += &format!("{sep}?{}", unc.join(", ?"));
        }
        text::draw(&mut sheet, sw, cx + 3, cy + cell + 3, &line, cell - 6);
    }
    image::save_buffer(&out, &sheet, sw as u32, sh as u32, image::ExtendedColorType::L8)?;
    println!("wrote {out}");
    Ok(())
}

mod text {
    //! A tiny 3x5 bitmap font (upper case, digits, a few marks), scaled x2: enough for captions
    //! without a font dependency.
    fn glyph(c: char) -> [u8; 5] {
        match c.to_ascii_uppercase() {
            'A' => [0b010, 0b101, 0b111, 0b101, 0b101],
            'B' => [0b110, 0b101, 0b110, 0b101, 0b110],
            'C' => [0b011, 0b100, 0b100, 0b100, 0b011],
            'D' => [0b110, 0b101, 0b101, 0b101, 0b110],
            'E' => [0b111, 0b100, 0b110, 0b100, 0b111],
            'F' => [0b111, 0b100, 0b110, 0b100, 0b100],
            'G' => [0b011, 0b100, 0b101, 0b101, 0b011],
            'H' => [0b101, 0b101, 0b111, 0b101, 0b101],
            'I' => [0b111, 0b010, 0b010, 0b010, 0b111],
            'J' => [0b001, 0b001, 0b001, 0b101, 0b010],
            'K' => [0b101, 0b101, 0b110, 0b101, 0b101],
            'L' => [0b100, 0b100, 0b100, 0b100, 0b111],
            'M' => [0b101, 0b111, 0b111, 0b101, 0b101],
            'N' => [0b110, 0b101, 0b101, 0b101, 0b101],
            'O' => [0b010, 0b101, 0b101, 0b101, 0b010],
            'P' => [0b110, 0b101, 0b110, 0b100, 0b100],
            'Q' => [0b010, 0b101, 0b101, 0b110, 0b011],
            'R' => [0b110, 0b101, 0b110, 0b101, 0b101],
            'S' => [0b011, 0b100, 0b010, 0b001, 0b110],
            'T' => [0b111, 0b010, 0b010, 0b010, 0b010],
            'U' => [0b101, 0b101, 0b101, 0b101, 0b111],
            'V' => [0b101, 0b101, 0b101, 0b101, 0b010],
            'W' => [0b101, 0b101, 0b111, 0b111, 0b101],
            'X' => [0b101, 0b101, 0b010, 0b101, 0b101],
            'Y' => [0b101, 0b101, 0b010, 0b010, 0b010],
            'Z' => [0b111, 0b001, 0b010, 0b100, 0b111],
            '?' => [0b110, 0b001, 0b010, 0b000, 0b010],
            ',' => [0b000, 0b000, 0b000, 0b010, 0b100],
            '|' => [0b010, 0b010, 0b010, 0b010, 0b010],
            ':' => [0b000, 0b010, 0b000, 0b010, 0b000],
            _ => [0; 5],
        }
    }

    /// Draws `s` in white at (x, y), wrapping within `max_w` pixels onto a second line.
    pub fn draw(buf: &mut [u8], stride: usize, x: usize, y: usize, s: &str, max_w: usize) {
        let scale = 2;
        let adv = 4 * scale;
        let per_line = max_w / adv;
        let mut words: Vec<String> = Vec::new();
        let mut cur = String::new();
        for w in s.split(' ') {
            if !cur.is_empty() && cur.len() + 1 + w.len() > per_line {
                words.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
        words.push(cur);
        for (li, line) in words.iter().take(2).enumerate() {
            for (ci, c) in line.chars().take(per_line).enumerate() {
                let g = glyph(c);
                for (r, bits) in g.iter().enumerate() {
                    for b in 0..3 {
                        if bits & (1 << (2 - b)) != 0 {
                            for dy in 0..scale {
                                for dx in 0..scale {
                                    let px = x + ci * adv + b * scale + dx;
                                    let py = y + li * 7 * scale + r * scale + dy;
                                    if let Some(p) = buf.get_mut(py * stride + px) {
                                        *p = 255;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
