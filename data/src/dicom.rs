//! DICOM writing (for the synthetic RSNA tree) and reading (for the RSNA reader), through the
//! dicom-object and dicom-pixeldata crates.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
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

/// Reads a DICOM file's first frame as 8-bit grey: the modality and VOI (window) transforms
/// applied as the file asks, MONOCHROME1 inverted so that bone is always white.
pub fn read_dicom(path: &Path) -> Result<GreyImage> {
    let obj = dicom_object::open_file(path).map_err(|e| anyhow!("{e}")).context("not a readable DICOM file")?;
    let dec = obj.decode_pixel_data().map_err(|e| anyhow!("{e}")).context("undecodable pixel data")?;
    let (w, h) = (dec.columns() as usize, dec.rows() as usize);
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
