//! Decoding (JPEG through zune-jpeg, which is faster here than `image`'s decoder; DICOM through
//! the dicom crates) and the one resize that `prepare` does.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::dicom::GreyImage;

/// Decodes a JPEG to 8-bit grey with zune-jpeg. A file without its end-of-image marker is an
/// error: zune-jpeg fills the rows a truncated scan lacks instead of failing, and a half-grey
/// radiograph must not be trained on.
pub fn decode_jpeg(bytes: &[u8]) -> Result<GreyImage> {
    // Some encoders pad after the marker with zeros.
    let end = bytes.iter().rposition(|&b| b != 0).unwrap_or(0);
    if end == 0 || bytes[end] != 0xD9 || bytes[end - 1] != 0xFF {
        bail!("truncated JPEG: no end-of-image marker");
    }
    let opts = zune_jpeg::zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_jpeg::zune_core::colorspace::ColorSpace::Luma);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(bytes, opts);
    let pixels = d.decode().map_err(|e| anyhow!("JPEG decode: {e:?}"))?;
    let info = d.info().ok_or_else(|| anyhow!("JPEG without header"))?;
    let (w, h) = (info.width as usize, info.height as usize);
    if pixels.len() != w * h {
        bail!("JPEG decoded to {} bytes for {w}x{h}", pixels.len());
    }
    Ok(GreyImage { w, h, pixels })
}

/// Decodes a JPEG with the `image` crate (kept for the decoder comparison in the benchmark).
pub fn decode_jpeg_image_crate(bytes: &[u8]) -> Result<GreyImage> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)?.into_luma8();
    Ok(GreyImage { w: img.width() as usize, h: img.height() as usize, pixels: img.into_raw() })
}

/// Loads an image file: `.dcm` through the DICOM reader, anything else as JPEG.
pub fn load_grey(path: &Path) -> Result<GreyImage> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("dcm")) {
        return crate::dicom::read_dicom(path);
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    decode_jpeg(&bytes).with_context(|| path.display().to_string())
}

/// Resizes so that the smaller side is `short` pixels, keeping the aspect (a triangle filter,
/// whose support widens when shrinking). Images already that size are returned as they are.
pub fn resize_short_side(img: &GreyImage, short: usize) -> GreyImage {
    let s = img.w.min(img.h);
    if s == short {
        return img.clone();
    }
    let scale = short as f64 / s as f64;
    let nw = ((img.w as f64 * scale).round() as usize).max(1);
    let nh = ((img.h as f64 * scale).round() as usize).max(1);
    let buf = image::GrayImage::from_raw(img.w as u32, img.h as u32, img.pixels.clone())
        .expect("pixel count matches the dimensions");
    let filter = image::imageops::FilterType::Triangle;
    let out = image::imageops::resize(&buf, nw as u32, nh as u32, filter);
    GreyImage { w: nw, h: nh, pixels: out.into_raw() }
}
