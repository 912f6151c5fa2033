//! DICOM writing (for the synthetic RSNA tree) and reading (for the RSNA reader), through the
//! dicom-object and dicom-pixeldata crates.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_pixeldata::{ConvertOptions, PhotometricInterpretation, PixelDecoder};

/// The header facts the generator writes.
#[derive(Clone, Debug)]
pub struct DicomMeta {
    pub patient_id: String,
    pub sex: String,
    pub age: u32,
    pub view: String,
    /// Store the image inverted and labelled MONOCHROME1 (white = low value).
    pub monochrome1: bool,
    /// Seed for the instance UIDs.
    pub uid_seed: u64,
}

/// Encodes 8-bit grey pixels as an uncompressed (explicit VR little endian) CR DICOM file.
pub fn encode_dicom(pixels: &[u8], w: usize, h: usize, m: &DicomMeta) -> Result<Vec<u8>> {
    let uid = |k: u64| format!("2.25.{}", (m.uid_seed ^ k.wrapping_mul(0x9E37_79B9)) as u128 * 1000 + k as u128);
    let sop = uid(1);
    let data: Vec<u8> = if m.monochrome1 { pixels.iter().map(|&p| 255 - p).collect() } else { pixels.to_vec() };
    let photometric = if m.monochrome1 { "MONOCHROME1" } else { "MONOCHROME2" };
    let mut obj = InMemDicomObject::from_element_iter([
        DataElement::new(tags::SOP_CLASS_UID, VR::UI, uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE),
        DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, sop.as_str()),
        DataElement::new(tags::STUDY_INSTANCE_UID, VR::UI, uid(2).as_str()),
        DataElement::new(tags::SERIES_INSTANCE_UID, VR::UI, uid(3).as_str()),
        DataElement::new(tags::MODALITY, VR::CS, "CR"),
        DataElement::new(tags::PATIENT_ID, VR::LO, m.patient_id.as_str()),
        DataElement::new(tags::PATIENT_NAME, VR::PN, m.patient_id.as_str()),
        DataElement::new(tags::PATIENT_SEX, VR::CS, m.sex.as_str()),
        DataElement::new(tags::PATIENT_AGE, VR::AS, format!("{:03}Y", m.age.min(999)).as_str()),
        DataElement::new(tags::BODY_PART_EXAMINED, VR::CS, "CHEST"),
        DataElement::new(tags::VIEW_POSITION, VR::CS, m.view.as_str()),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, photometric),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(h as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(w as u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(tags::WINDOW_CENTER, VR::DS, "127.5"),
        DataElement::new(tags::WINDOW_WIDTH, VR::DS, "256"),
    ]);
    obj.put(DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(data)));
    let file = obj
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN))
        .map_err(|e| anyhow!("building DICOM meta: {e}"))?;
    let mut out = Vec::with_capacity(w * h + 2048);
    file.write_all(&mut out).map_err(|e| anyhow!("writing DICOM: {e}"))?;
    Ok(out)
}

/// A decoded grey image: 8-bit, white = dense, after windowing.
#[derive(Clone, Debug)]
pub struct GreyImage {
    pub w: usize,
    pub h: usize,
    pub pixels: Vec<u8>,
}

/// The largest width or height read from a file: past it (or at 0) a DICOM's header is refused
/// before any pixel buffer is allocated. Chest films are under 5000 pixels a side.
pub const MAX_SIDE: u32 = 16384;

/// A DICOM's Rows and Columns, read from its header and checked against 1..=[`MAX_SIDE`]: one
/// line naming the bad value otherwise (a file with Rows = 0 made the decoder ask for gigabytes).
pub fn checked_dims(obj: &dicom_object::DefaultDicomObject) -> Result<(usize, usize)> {
    let get = |tag, name: &str| -> Result<u32> {
        let e = obj.element(tag).map_err(|e| anyhow!("{e}")).with_context(|| format!("no {name}"))?;
        let v = e.to_int::<u32>().map_err(|e| anyhow!("{e}")).with_context(|| format!("{name} is not a number"))?;
        if v == 0 || v > MAX_SIDE {
            bail!("{name} = {v} is out of range (1..={MAX_SIDE})");
        }
        Ok(v)
    };
    let rows = get(tags::ROWS, "Rows")?;
    let cols = get(tags::COLUMNS, "Columns")?;
    Ok((cols as usize, rows as usize))
}

/// Refuses a DICOM whose elements declare more bytes than the file holds. The dicom parser
/// (dicom-parser 0.10) reserves and zero-fills an element's declared length before reading it,
/// so a file of a few hundred bytes with one damaged length field asks for up to 4 GiB (found
/// by `tests/fuzz.rs`: 3.3 GB resident for 300 mutated 400-byte files). This walks the
/// top-level elements of the file meta group and of the data set in the little-endian
/// transfer syntaxes (explicit or implicit VR; every compressed syntax is explicit VR little
/// endian) and checks each defined length against what is left, going into sequences' items
/// (explicit VR) and over encapsulated pixel fragments. It stops (and leaves the rest to the
/// parser) at a big-endian or deflated data set; in implicit VR a sequence of defined length is
/// skipped whole (its VR is not in the file).
pub fn check_element_lengths(bytes: &[u8]) -> Result<()> {
    const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
    const BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    if bytes.get(128..132) != Some(b"DICM") {
        // No preamble: the parser refuses the file itself.
        return Ok(());
    }
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let mut pos = 132;
    let mut syntax = String::new();
    // Inside encapsulated pixel data, whose items hold raw fragments rather than elements.
    let mut fragments = false;
    while pos + 8 <= bytes.len() {
        let (group, element) = (u16_at(pos), u16_at(pos + 2));
        if group == 0xFFFE {
            // Items and delimiters (always a 4-byte length): the walk goes into sequences'
            // items, whose elements the parser reads alike, and over pixel fragments.
            let len = u32_at(pos + 4);
            let left = bytes.len() - pos - 8;
            match element {
                0xE000 if len != u32::MAX && len as usize > left => {
                    bail!("an item declares {len} bytes, the file has {left} left: damaged or truncated")
                }
                0xE000 if fragments && len != u32::MAX => pos += 8 + len as usize,
                0xE000 | 0xE00D => pos += 8,
                0xE0DD => {
                    fragments = false;
                    pos += 8;
                }
                _ => bail!("unknown item tag (FFFE,{element:04X}): damaged"),
            }
            continue;
        }
        let explicit = group == 0x0002 || syntax != IMPLICIT_LE;
        if group != 0x0002 && (syntax == BIG_ENDIAN || syntax == DEFLATED) {
            return Ok(());
        }
        let mut unit = 1u32;
        let (header, len) = if explicit {
            let vr = &bytes[pos + 4..pos + 6];
            // A valid file has only the standard's VRs; the parser reads an unknown one with a
            // 4-byte length it then allocates.
            if !KNOWN_VRS.iter().any(|k| k.as_bytes() == vr) {
                bail!(
                    "element ({group:04X},{element:04X}) has an unknown VR {:?}: damaged",
                    String::from_utf8_lossy(vr)
                );
            }
            let long = matches!(
                vr,
                b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV"
            );
            // A binary VR's length must hold whole values: the parser reads as many as fit
            // and then takes the leftover bytes for the next element's header (found by the
            // fuzz target: a UL of 18 bytes led to a garbage length and a 1.3 GB allocation).
            unit = match vr {
                b"US" | b"SS" | b"OW" => 2,
                b"UL" | b"SL" | b"FL" | b"AT" | b"OL" | b"OF" => 4,
                b"FD" | b"SV" | b"UV" | b"OD" | b"OV" => 8,
                _ => 1,
            };
            if long {
                if pos + 12 > bytes.len() {
                    return Ok(());
                }
                (12, u32_at(pos + 8))
            } else {
                (8, u32::from(u16_at(pos + 6)))
            }
        } else {
            (8, u32_at(pos + 4))
        };
        if len == u32::MAX {
            // A sequence or encapsulated pixel data: its items follow.
            fragments = (group, element) == (0x7FE0, 0x0010);
            pos += header;
            continue;
        }
        let left = bytes.len() - pos - header;
        if len as usize > left {
            bail!("element ({group:04X},{element:04X}) declares {len} bytes, the file has {left} left: damaged or truncated");
        }
        if explicit && len % unit != 0 {
            bail!("element ({group:04X},{element:04X}) holds {len} bytes, not whole {unit}-byte values: damaged");
        }
        if (group, element) == (0x0002, 0x0010) {
            let v = &bytes[pos + header..pos + header + len as usize];
            syntax = String::from_utf8_lossy(v).trim_end_matches(['\0', ' ']).to_string();
        }
        // A sequence of defined length: walk into its items.
        let sequence = explicit && &bytes[pos + 4..pos + 6] == b"SQ";
        pos += header + if sequence { 0 } else { len as usize };
    }
    Ok(())
}

/// The value representations of the standard (PS3.5 6.2).
const KNOWN_VRS: [&str; 34] = [
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN",
    "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
];

/// Opens a DICOM file after [`check_element_lengths`].
pub fn open_checked(path: &Path) -> Result<dicom_object::DefaultDicomObject> {
    let bytes = std::fs::read(path).context("unreadable")?;
    check_element_lengths(&bytes)?;
    dicom_object::open_file(path).map_err(|e| anyhow!("{e}")).context("not a readable DICOM file")
}

/// Checks the header values that size the decoder's buffers against what the file holds:
/// SamplesPerPixel 1 or 3, BitsAllocated 1 to 32, and native (uncompressed) pixel data at least
/// one frame long. Without this a 400-byte file that states 16384 x 16384 pixels of 32 bits had
/// the decoder allocate gigabytes before finding the data short.
fn check_frame_size(obj: &dicom_object::DefaultDicomObject, w: usize, h: usize) -> Result<()> {
    let num = |tag, name: &str, default: u32| -> Result<u32> {
        match obj.element_opt(tag).map_err(|e| anyhow!("{e}"))? {
            None => Ok(default),
            Some(e) => e.to_int::<u32>().map_err(|e| anyhow!("{e}")).with_context(|| format!("{name} is not a number")),
        }
    };
    let spp = num(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel", 1)?;
    if spp != 1 && spp != 3 {
        bail!("SamplesPerPixel = {spp} (1 or 3 expected)");
    }
    let bits = num(tags::BITS_ALLOCATED, "BitsAllocated", 8)?;
    if !(1..=32).contains(&bits) {
        bail!("BitsAllocated = {bits} is out of range (1..=32)");
    }
    let px = obj.element(tags::PIXEL_DATA).map_err(|e| anyhow!("{e}")).context("no pixel data")?;
    if px.value().fragments().is_none() {
        let have = px.value().to_bytes().map(|b| b.len()).unwrap_or(0);
        let need = (w * h * spp as usize * bits as usize).div_ceil(8);
        if have < need {
            bail!("pixel data has {have} bytes, one {w} x {h} frame needs {need} (truncated or a wrong header)");
        }
    }
    Ok(())
}

/// Reads a DICOM file's first frame as 8-bit grey: the modality and VOI (window) transforms
/// applied as the file asks, MONOCHROME1 inverted so that bone is always white.
pub fn read_dicom(path: &Path) -> Result<GreyImage> {
    let obj = open_checked(path)?;
    read_dicom_object(&obj)
}

/// Decodes an opened DICOM object's first frame (see [`read_dicom`]); its dimensions are
/// checked ([`checked_dims`]) before anything is decoded.
pub fn read_dicom_object(obj: &dicom_object::DefaultDicomObject) -> Result<GreyImage> {
    let (cw, ch) = checked_dims(obj)?;
    check_frame_size(obj, cw, ch)?;
    let dec = obj.decode_pixel_data().map_err(|e| anyhow!("{e}")).context("undecodable pixel data")?;
    let (w, h) = (dec.columns() as usize, dec.rows() as usize);
    if (w, h) != (cw, ch) {
        bail!("pixel data is {w} x {h}, the header says {cw} x {ch}");
    }
    let mono1 = matches!(dec.photometric_interpretation(), PhotometricInterpretation::Monochrome1);
    let opts = ConvertOptions::new().force_8bit();
    let mut pixels: Vec<u8> =
        dec.to_vec_frame_with_options(0, &opts).map_err(|e| anyhow!("{e}")).context("converting pixel data")?;
    if pixels.len() != w * h {
        return Err(anyhow!("pixel data has {} values for {w}x{h}", pixels.len()));
    }
    if mono1 {
        for p in &mut pixels {
            *p = 255 - *p;
        }
    }
    Ok(GreyImage { w, h, pixels })
}
