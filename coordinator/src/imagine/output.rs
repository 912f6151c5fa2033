//! The files `imagine` writes: one grayscale PNG per prompt, a grid of them, the similarity
//! per step as JSON lines, and a summary.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{ExtendedColorType, ImageEncoder};
use model::checkpoint::write_file_atomically;

/// Gap between the grid's cells, in pixels (white).
const GAP: usize = 4;

/// 8-bit gray levels of an image in [0, 1].
pub fn to_u8(image: &[f32]) -> Vec<u8> {
    image.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// PNG bytes of a `w x h` 8-bit grayscale image.
pub fn png_bytes(gray: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(gray, w as u32, h as u32, ExtendedColorType::L8)
        .context("encoding a PNG")?;
    Ok(out)
}

/// The images (`size x size` in [0, 1]) in a grid of up to 4 columns, white gaps.
pub fn grid(images: &[Vec<f32>], size: usize) -> (Vec<u8>, usize, usize) {
    let cols = images.len().clamp(1, 4);
    let rows = images.len().div_ceil(cols).max(1);
    let (w, h) = (cols * size + (cols - 1) * GAP, rows * size + (rows - 1) * GAP);
    let mut out = vec![255u8; w * h];
    for (k, img) in images.iter().enumerate() {
        let (r, c) = (k / cols, k % cols);
        let (y0, x0) = (r * (size + GAP), c * (size + GAP));
        let px = to_u8(img);
        for y in 0..size {
            out[(y0 + y) * w + x0..(y0 + y) * w + x0 + size].copy_from_slice(&px[y * size..(y + 1) * size]);
        }
    }
    (out, w, h)
}

/// A file name from a prompt: its index, then lowercase words joined by dashes (at most 48
/// characters), so that the files sort in prompt order and say what they show.
pub fn file_name(index: usize, prompt: &str) -> String {
    let mut slug = String::new();
    for word in prompt.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()) {
        if slug.len() + word.len() + 1 > 48 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word.to_ascii_lowercase());
    }
    if slug.is_empty() {
        slug.push_str("prompt");
    }
    format!("{:02}-{slug}.png", index + 1)
}

/// Writes each image and the grid into `out`; returns the files written, grid last.
pub fn write_images(out: &Path, prompts: &[String], images: &[Vec<f32>], size: usize) -> Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(images.len() + 1);
    for (k, (prompt, img)) in prompts.iter().zip(images).enumerate() {
        let path = out.join(file_name(k, prompt));
        write_file_atomically(&path, &png_bytes(&to_u8(img), size, size)?)?;
        files.push(path);
    }
    let (g, w, h) = grid(images, size);
    let path = out.join("grid.png");
    write_file_atomically(&path, &png_bytes(&g, w, h)?)?;
    files.push(path);
    Ok(files)
}

/// How much a change image amplifies the difference from the starting image: mid-gray is no
/// change and +-0.2 (of the [0, 1] range) reaches white or black.
pub const CHANGE_GAIN: f32 = 2.5;
/// The grid of the change images.
pub const CHANGES_GRID: &str = "changes.png";

/// A change image: `0.5 + CHANGE_GAIN * (image - start)`, in [0, 1] once clamped.
pub fn change_image(image: &[f32], start: &[f32]) -> Vec<f32> {
    image.iter().zip(start).map(|(&a, &b)| 0.5 + CHANGE_GAIN * (a - b)).collect()
}

/// What `write_changes` wrote, and each image's mean absolute change from the start.
pub struct Changes {
    /// `init.png`, then one change image per prompt, then the grid of those.
    pub files: Vec<PathBuf>,
    pub mean_abs: Vec<f64>,
}

/// With a starting image (`--init`): the start as `init.png`, and for each generated image
/// what the optimisation changed (`NN-<prompt words>-change.png`, see [`change_image`]), and
/// their grid.
pub fn write_changes(
    out: &Path,
    prompts: &[String],
    images: &[Vec<f32>],
    start: &[f32],
    size: usize,
) -> Result<Changes> {
    let mut files = Vec::with_capacity(images.len() + 2);
    let path = out.join("init.png");
    write_file_atomically(&path, &png_bytes(&to_u8(start), size, size)?)?;
    files.push(path);
    let mut maps = Vec::with_capacity(images.len());
    let mut mean_abs = Vec::with_capacity(images.len());
    for (k, (prompt, img)) in prompts.iter().zip(images).enumerate() {
        let map = change_image(img, start);
        let name = file_name(k, prompt).replace(".png", "-change.png");
        let path = out.join(name);
        write_file_atomically(&path, &png_bytes(&to_u8(&map), size, size)?)?;
        files.push(path);
        mean_abs.push(img.iter().zip(start).map(|(&a, &b)| (a - b).abs() as f64).sum::<f64>() / img.len() as f64);
        maps.push(map);
    }
    let (g, w, h) = grid(&maps, size);
    let path = out.join(CHANGES_GRID);
    write_file_atomically(&path, &png_bytes(&g, w, h)?)?;
    files.push(path);
    Ok(Changes { files, mean_abs })
}

/// The similarity log, one JSON object per step, written as the steps go.
pub struct StepLog {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl StepLog {
    pub fn create(path: PathBuf) -> Result<Self> {
        let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { file: std::io::BufWriter::new(f), path })
    }

    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn finish(mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_sort_and_say_what_they_show() {
        assert_eq!(
            file_name(0, "A frontal chest x-ray of cardiomegaly"),
            "01-a-frontal-chest-x-ray-of-cardiomegaly.png"
        );
        assert_eq!(file_name(11, "!!!"), "12-prompt.png");
        assert!(file_name(2, &"word ".repeat(40)).len() <= 3 + 48 + 4);
    }

    #[test]
    fn a_change_image_is_mid_gray_where_nothing_changed() {
        let start = [0.2, 0.5, 0.9];
        let map = change_image(&[0.2, 0.6, 0.5], &start);
        assert_eq!(map[0], 0.5);
        assert!((map[1] - (0.5 + CHANGE_GAIN * 0.1)).abs() < 1e-6, "{map:?}");
        assert_eq!(to_u8(&map)[2], 0, "a change of -0.4 is clamped to black");
    }

    #[test]
    fn grid_places_each_image() {
        let a = vec![0.0; 4];
        let b = vec![0.5; 4];
        let (g, w, h) = grid(&[a, b], 2);
        assert_eq!((w, h), (2 + GAP + 2, 2));
        assert_eq!(g[0], 0);
        assert_eq!(g[2], 255); // the gap
        assert_eq!(g[w - 1], 128); // the second image
        assert_eq!(g[w + 1], 0);
    }
}
