//! The synthetic radiograph generator: complete trees in the MIMIC-CXR-JPG, CheXpert and RSNA
//! layouts, deterministic from a seed, rendered in parallel.

pub mod draw;
pub mod render;
pub mod report;
pub mod site;
pub mod truth;
pub mod visibility;

use std::fs;

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::csvio::write_csv_gz;
use crate::labels::{LabelValue, LABELS, NUM_LABELS};
use crate::DatasetKind;
use render::Scratch;
use site::Site;
use truth::{Truth, View};
pub use visibility::{Visibility, DESIGN};

/// The generator's output version: bumped whenever a seed's tree changes (drawing, reports,
/// labels), so that trees cached by an older build are not mistaken for this one's.
/// 2: subtler default findings (`DESIGN`), film technique and patient build vary.
/// 3: CheXpert's `valid.csv` holds at least a few patients in small trees ([`chexpert_valid_patients`]).
pub const VERSION: u32 = 3;

/// Generator settings.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub studies: usize,
    /// Which dataset's layout to write.
    pub dataset: DatasetKind,
    pub seed: u64,
    /// The smaller image side in pixels (the width; some sites make taller images).
    pub size: usize,
    /// How strongly each finding changes the pixels (1 = as designed; lower is subtler).
    pub visibility: Visibility,
    /// Scales every finding's prevalence.
    pub prevalence: f32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            studies: 100,
            dataset: DatasetKind::Mimic,
            seed: 0,
            size: 256,
            visibility: Visibility::default(),
            prevalence: 1.0,
        }
    }
}

/// What a run wrote and how fast.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub studies: usize,
    pub images: usize,
    pub patients: usize,
    pub seconds: f64,
    pub threads: usize,
}

impl SynthSummary {
    pub fn images_per_s_per_core(&self) -> f64 {
        self.images as f64 / self.seconds.max(1e-9) / self.threads as f64
    }
}

/// SplitMix64 finaliser: derives independent seeds for studies and images from one seed.
pub fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED69);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One study in the plan: its patient and index.
#[derive(Clone, Copy, Debug)]
struct Planned {
    patient: usize,
    /// Ordinal of the study within its patient (1-based, as CheXpert names them).
    ordinal: usize,
    index: usize,
}

/// Patients get one to four studies each, as in the real archives.
fn plan(seed: u64, studies: usize) -> (Vec<Planned>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0xA11, 0));
    let mut out = Vec::with_capacity(studies);
    let mut patient = 0;
    while out.len() < studies {
        let k = match rng.random::<f32>() {
            x if x < 0.55 => 1,
            x if x < 0.8 => 2,
            x if x < 0.92 => 3,
            _ => 4,
        };
        for o in 0..k {
            if out.len() == studies {
                break;
            }
            out.push(Planned { patient, ordinal: o + 1, index: out.len() });
        }
        patient += 1;
    }
    (out, patient)
}

/// Seeded split of a patient: 80% train, 5% validate, 15% test (test is large enough to measure).
fn patient_split(seed: u64, patient: usize) -> &'static str {
    let r = (mix(seed, 0x5117, patient as u64) >> 11) as f64 / (1u64 << 53) as f64;
    if r < 0.80 {
        "train"
    } else if r < 0.85 {
        "validate"
    } else {
        "test"
    }
}

/// One image of a study, rendered.
struct Image {
    view: View,
    w: usize,
    h: usize,
    pixels: Vec<u8>,
    boxes: Vec<[f32; 4]>,
    /// Seeded id bits for file names.
    id: u64,
}

/// A rendered study: truth, report, labels and images.
struct Study {
    plan: Planned,
    truth: Truth,
    report: report::Written,
    images: Vec<Image>,
}

/// Which of a study's images [`make_study`] renders.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    All,
    /// The first (frontal) image only.
    Frontal,
    /// The lateral only (drawn even for a study that has none).
    Lateral,
}

/// One study: truth, report and the images `want` asks for.
fn make_study(cfg: &SynthConfig, site: &Site, p: Planned, scratch: &mut Scratch, want: Want) -> Study {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(cfg.seed, 1, p.index as u64));
    let truth = truth::sample(&mut rng, site, cfg.prevalence);
    let report = report::write(&mut rng, &truth);
    let mut views = vec![truth.frontal];
    if cfg.dataset != DatasetKind::Rsna {
        // Some studies repeat the frontal film (rotation, inspiration); some add a lateral.
        if rng.random::<f32>() < 0.08 {
            views.push(truth.frontal);
        }
        if truth.has_lateral {
            views.push(View::Lateral);
        }
    }
    match want {
        Want::All => {}
        Want::Frontal => views.truncate(1),
        Want::Lateral => {
            if views.last() != Some(&View::Lateral) {
                views.push(View::Lateral);
            }
        }
    }
    let skip = if want == Want::Lateral { views.len() - 1 } else { 0 };
    let images = views
        .into_iter()
        .enumerate()
        .skip(skip)
        .map(|(k, view)| {
            let id = mix(cfg.seed, 2 + k as u64, p.index as u64);
            let mut irng = ChaCha8Rng::seed_from_u64(id);
            let aspect = site.aspects[irng.random_range(0..site.aspects.len())];
            let w = cfg.size;
            let h = ((cfg.size as f32) * aspect).round() as usize;
            let mut pixels = Vec::new();
            let boxes = render::render(&mut irng, &truth, view, site, w, h, &cfg.visibility, scratch, &mut pixels);
            Image { view, w, h, pixels, boxes, id }
        })
        .collect();
    Study { plan: p, truth, report, images }
}

/// Encodes 8-bit grey pixels as a baseline JPEG.
pub fn encode_jpeg(pixels: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(w * h / 4);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(pixels, w as u32, h as u32, image::ExtendedColorType::L8)
        .context("encoding JPEG")?;
    Ok(out)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn dicom_id(id: u64, seed: u64) -> String {
    let b = mix(seed, id, 7);
    format!(
        "{:08x}-{:08x}-{:08x}-{:08x}-{:08x}",
        (id >> 32) as u32,
        id as u32,
        (b >> 32) as u32,
        b as u32,
        (mix(b, 1, 1) >> 32) as u32
    )
}

fn subject_id(patient: usize) -> u64 {
    10_000_032 + 113 * patient as u64
}

fn study_id(index: usize) -> u64 {
    50_000_014 + 71 * index as u64
}

/// The image widths the generator accepts: below 32 the anatomy does not fit, above 4096 a film
/// only asks for huge buffers (real chest films are stored at 2000-3000 pixels a side).
pub const SIZE_RANGE: std::ops::RangeInclusive<usize> = 32..=4096;

/// Writes a tree of `cfg.studies` studies under `out` in `cfg.dataset`. Rendering, encoding and
/// writing run on rayon's pool; the csv files are written at the end in study order, so the
/// output is byte-identical for a seed whatever the thread count.
pub fn generate(out: &Path, cfg: &SynthConfig) -> Result<SynthSummary> {
    if !SIZE_RANGE.contains(&cfg.size) {
        bail!("--size {} is out of range: {}..={} pixels", cfg.size, SIZE_RANGE.start(), SIZE_RANGE.end());
    }
    if cfg.studies == 0 {
        bail!("--studies must be at least 1");
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let site = site::for_dataset(cfg.dataset);
    let (plan, patients) = plan(cfg.seed, cfg.studies);
    let chexpert_valid = chexpert_valid_patients(cfg.seed, patients);
    let start = Instant::now();
    let rows: Vec<Result<Vec<Row>>> = plan
        .par_iter()
        .map_init(Scratch::default, |scratch, p| {
            let study = make_study(cfg, site, *p, scratch, Want::All);
            write_study(out, cfg, &study, &chexpert_valid)
        })
        .collect();
    let mut all = Vec::new();
    for r in rows {
        all.extend(r?);
    }
    let images = all.iter().filter(|r| r.is_image).count();
    match cfg.dataset {
        DatasetKind::Mimic => write_mimic_tables(out, &all)?,
        DatasetKind::Chexpert => write_chexpert_tables(out, &all)?,
        DatasetKind::Rsna => write_rsna_tables(out, &all)?,
    }
    Ok(SynthSummary {
        studies: cfg.studies,
        images,
        patients,
        seconds: start.elapsed().as_secs_f64(),
        threads: rayon::current_num_threads(),
    })
}

/// One csv row's worth of facts, produced by the parallel part and written at the end.
struct Row {
    is_image: bool,
    cells: Vec<Vec<String>>,
    /// Which table: 0 metadata, 1 split, 2 chexpert, 3 negbio (MIMIC); 0 train, 1 valid (CheXpert);
    /// 0 labels, 1 class info (RSNA).
    table: usize,
}

fn labels_cells(l: &[LabelValue; NUM_LABELS], order: &[usize]) -> Vec<String> {
    order.iter().map(|&i| l[i].as_csv().to_string()).collect()
}

/// MIMIC's label files list the labels alphabetically.
fn alphabetical() -> Vec<usize> {
    let mut o: Vec<usize> = (0..NUM_LABELS).collect();
    o.sort_by_key(|&i| LABELS[i]);
    o
}

fn write_study(out: &Path, cfg: &SynthConfig, s: &Study, chexpert_valid: &[bool]) -> Result<Vec<Row>> {
    match cfg.dataset {
        DatasetKind::Mimic => write_mimic_study(out, cfg, s),
        DatasetKind::Chexpert => write_chexpert_study(out, cfg, s, chexpert_valid),
        DatasetKind::Rsna => write_rsna_study(out, cfg, s),
    }
}

fn write_mimic_study(out: &Path, cfg: &SynthConfig, s: &Study) -> Result<Vec<Row>> {
    let subj = subject_id(s.plan.patient);
    let stud = study_id(s.plan.index);
    let dir = out.join("files").join(format!("p{}", &subj.to_string()[..2])).join(format!("p{subj}"));
    write_file(&dir.join(format!("s{stud}.txt")), s.report.text.as_bytes())?;
    let split = patient_split(cfg.seed, s.plan.patient);
    let mut rows = Vec::new();
    let day = 1 + s.plan.index % 28;
    let month = 1 + (s.plan.ordinal * 3 + s.plan.patient) % 12;
    let year = 2110 + (s.plan.patient % 90) + s.plan.ordinal;
    for img in &s.images {
        let did = dicom_id(img.id, cfg.seed);
        let jpg = encode_jpeg(&img.pixels, img.w, img.h, 92)?;
        write_file(&dir.join(format!("s{stud}")).join(format!("{did}.jpg")), &jpg)?;
        let (proc_desc, view_code) = match img.view {
            View::Lateral => ("CHEST (PA AND LAT)", "lateral"),
            View::Ap => ("CHEST (PORTABLE AP)", "antero-posterior"),
            View::Pa => ("CHEST (PA AND LAT)", "postero-anterior"),
        };
        let orient = if img.view == View::Ap && s.truth.acuity == 2 { "Recumbent" } else { "Erect" };
        rows.push(Row {
            is_image: true,
            table: 0,
            cells: vec![vec![
                did.clone(),
                subj.to_string(),
                stud.to_string(),
                proc_desc.to_string(),
                img.view.position().to_string(),
                img.h.to_string(),
                img.w.to_string(),
                format!("{year}{month:02}{day:02}"),
                format!(
                    "{:02}{:02}{:02}.{:03}",
                    (s.plan.index * 7) % 24,
                    (s.plan.index * 13) % 60,
                    (img.id % 60),
                    img.id % 1000
                ),
                "Chest X-Ray".to_string(),
                view_code.to_string(),
                orient.to_string(),
            ]],
        });
        rows.push(Row {
            is_image: false,
            table: 1,
            cells: vec![vec![did, stud.to_string(), subj.to_string(), split.to_string()]],
        });
    }
    let order = alphabetical();
    for (table, l) in [(2, &s.report.chexpert), (3, &s.report.negbio)] {
        let mut c = vec![subj.to_string(), stud.to_string()];
        c.extend(labels_cells(l, &order));
        rows.push(Row { is_image: false, table, cells: vec![c] });
    }
    Ok(rows)
}

fn write_mimic_tables(out: &Path, rows: &[Row]) -> Result<()> {
    let meta_h = [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
        "Rows",
        "Columns",
        "StudyDate",
        "StudyTime",
        "ProcedureCodeSequence_CodeMeaning",
        "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ];
    let split_h = ["dicom_id", "study_id", "subject_id", "split"];
    let mut lab_h = vec!["subject_id", "study_id"];
    lab_h.extend(alphabetical().iter().map(|&i| LABELS[i]));
    let pick = |t: usize| rows.iter().filter(move |r| r.table == t).flat_map(|r| r.cells.iter().cloned());
    write_csv_gz(&out.join("mimic-cxr-2.0.0-metadata.csv.gz"), &meta_h, pick(0))?;
    write_csv_gz(&out.join("mimic-cxr-2.0.0-split.csv.gz"), &split_h, pick(1))?;
    write_csv_gz(&out.join("mimic-cxr-2.0.0-chexpert.csv.gz"), &lab_h, pick(2))?;
    write_csv_gz(&out.join("mimic-cxr-2.0.0-negbio.csv.gz"), &lab_h, pick(3))?;
    Ok(())
}

/// Share of the patients in a generated CheXpert `valid.csv` (the readers' test split).
pub const CHEXPERT_VALID_SHARE: f64 = 0.03;
/// Patients in a generated `valid.csv` when the share gives fewer, up to a quarter of the patients:
/// small trees (the demo's few hundred studies, CI's 30-60) still have a test split to measure on.
pub const CHEXPERT_VALID_MIN: usize = 20;

/// Which patients go to CheXpert's `valid.csv` (labelled by radiologists, no uncertainty): the
/// `max(3% of P, min(20, P / 4))` patients with the smallest seeded hash, P the tree's patients.
/// A function of the seed and P only; always leaves a training patient.
pub fn chexpert_valid_patients(seed: u64, patients: usize) -> Vec<bool> {
    let share = (patients as f64 * CHEXPERT_VALID_SHARE).round() as usize;
    let n = share.max(CHEXPERT_VALID_MIN.min(patients / 4)).min(patients.saturating_sub(1));
    let mut order: Vec<usize> = (0..patients).collect();
    order.sort_by_key(|&p| (mix(seed, 0xC4E, p as u64), p));
    let mut valid = vec![false; patients];
    for &p in &order[..n] {
        valid[p] = true;
    }
    valid
}

/// Radiologist-consensus labels: what is visibly there, 1 or 0. Radiologists see subtler findings
/// than a model at 64 px does: the threshold is relative to the finding's design strength, so at
/// the default visibility a finding is called when its severity passes 0.3.
fn consensus(t: &Truth, visibility: &Visibility) -> [LabelValue; NUM_LABELS] {
    let mut l = [LabelValue::Negative; NUM_LABELS];
    let mut sick = false;
    for (i, v) in l.iter_mut().enumerate().skip(1) {
        if visibility.drawn(i, t.severity[i]) > 0.3 * DESIGN[i] {
            *v = LabelValue::Positive;
            sick |= i != truth::idx::DEVICES;
        }
    }
    l[0] = if sick { LabelValue::Negative } else { LabelValue::Positive };
    l
}

const CHEXPERT_DIR: &str = "CheXpert-v1.0-small";

fn write_chexpert_study(out: &Path, cfg: &SynthConfig, s: &Study, valid_patients: &[bool]) -> Result<Vec<Row>> {
    let valid = valid_patients[s.plan.patient];
    let part = if valid { "valid" } else { "train" };
    let pdir = format!("patient{:05}", s.plan.patient + 1);
    let labels = if valid { consensus(&s.truth, &cfg.visibility) } else { s.report.chexpert };
    let mut rows = Vec::new();
    let mut frontal_n = 0;
    for (k, img) in s.images.iter().enumerate() {
        let kind = if img.view == View::Lateral { "lateral" } else { "frontal" };
        frontal_n += (img.view != View::Lateral) as usize;
        let rel = format!("{CHEXPERT_DIR}/{part}/{pdir}/study{}/view{}_{kind}.jpg", s.plan.ordinal, k + 1);
        let jpg = encode_jpeg(&img.pixels, img.w, img.h, 90)?;
        write_file(&out.join(&rel), &jpg)?;
        let mut c = vec![
            rel,
            if s.truth.female { "Female" } else { "Male" }.to_string(),
            s.truth.age.to_string(),
            if img.view == View::Lateral { "Lateral" } else { "Frontal" }.to_string(),
            if img.view == View::Lateral { String::new() } else { img.view.position().to_string() },
        ];
        c.extend(labels_cells(&labels, &(0..NUM_LABELS).collect::<Vec<_>>()));
        rows.push(Row { is_image: true, table: valid as usize, cells: vec![c] });
    }
    debug_assert!(frontal_n >= 1);
    Ok(rows)
}

fn write_chexpert_tables(out: &Path, rows: &[Row]) -> Result<()> {
    let mut h = vec!["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"];
    h.extend(LABELS.iter());
    for (t, name) in [(0, "train.csv"), (1, "valid.csv")] {
        let path = out.join(CHEXPERT_DIR).join(name);
        let cells = rows.iter().filter(|r| r.table == t).flat_map(|r| r.cells.iter().cloned());
        crate::csvio::write_csv(&path, &h, cells)?;
    }
    Ok(())
}

fn rsna_patient_id(seed: u64, index: usize) -> String {
    let a = mix(seed, 0x25A, index as u64);
    let b = mix(a, 3, 3);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a as u16,
        (b >> 48) as u16,
        b & 0xFFFF_FFFF_FFFF
    )
}

fn write_rsna_study(out: &Path, cfg: &SynthConfig, s: &Study) -> Result<Vec<Row>> {
    use truth::idx::{CONSOLIDATION, PNEUMONIA};
    let pid = rsna_patient_id(cfg.seed, s.plan.index);
    let img = &s.images[0];
    // Every tenth file is MONOCHROME1 (inverted) so that readers must honour the interpretation.
    let mono1 = mix(cfg.seed, 0x1, s.plan.index as u64).is_multiple_of(10);
    let dcm = crate::dicom::encode_dicom(
        &img.pixels,
        img.w,
        img.h,
        &crate::dicom::DicomMeta {
            patient_id: pid.clone(),
            sex: if s.truth.female { "F" } else { "M" }.into(),
            age: s.truth.age,
            view: img.view.position().into(),
            monochrome1: mono1,
            uid_seed: mix(cfg.seed, 0xD1C, s.plan.index as u64),
        },
    )?;
    write_file(&out.join("stage_2_train_images").join(format!("{pid}.dcm")), &dcm)?;
    let target = (s.truth.present(PNEUMONIA) || s.truth.present(CONSOLIDATION)) && !img.boxes.is_empty();
    let mut cells = Vec::new();
    if target {
        for b in &img.boxes {
            cells.push(vec![
                pid.clone(),
                format!("{:.1}", b[0]),
                format!("{:.1}", b[1]),
                format!("{:.1}", b[2]),
                format!("{:.1}", b[3]),
                "1".to_string(),
            ]);
        }
    } else {
        cells.push(vec![pid.clone(), String::new(), String::new(), String::new(), String::new(), "0".to_string()]);
    }
    let abnormal = (1..truth::idx::DEVICES).any(|i| s.truth.present(i));
    let class = if target {
        "Lung Opacity"
    } else if abnormal {
        "No Lung Opacity / Not Normal"
    } else {
        "Normal"
    };
    let info = (0..cells.len()).map(|_| vec![pid.clone(), class.to_string()]).collect();
    Ok(vec![Row { is_image: true, table: 0, cells }, Row { is_image: false, table: 1, cells: info }])
}

fn write_rsna_tables(out: &Path, rows: &[Row]) -> Result<()> {
    let cells = |t: usize| rows.iter().filter(move |r| r.table == t).flat_map(|r| r.cells.iter().cloned());
    crate::csvio::write_csv(
        &out.join("stage_2_train_labels.csv"),
        &["patientId", "x", "y", "width", "height", "Target"],
        cells(0),
    )?;
    crate::csvio::write_csv(&out.join("stage_2_detailed_class_info.csv"), &["patientId", "class"], cells(1))?;
    Ok(())
}

/// Renders one image in memory (no files): for benchmarks and the contact sheet.
pub fn render_one(cfg: &SynthConfig, index: usize) -> (Vec<u8>, usize, usize, [LabelValue; NUM_LABELS], String) {
    render_view(cfg, index, false)
}

/// Like [`render_one`], but with `lateral` the study's lateral view (drawn even for a study that
/// has none), for the contact sheet.
pub fn render_view(
    cfg: &SynthConfig,
    index: usize,
    lateral: bool,
) -> (Vec<u8>, usize, usize, [LabelValue; NUM_LABELS], String) {
    let site = site::for_dataset(cfg.dataset);
    let mut scratch = Scratch::default();
    // Only the frontal: rendering the study's other views here would cost time for images that
    // are thrown away (benchmarks count one image per call).
    let want = if lateral { Want::Lateral } else { Want::Frontal };
    let s = make_study(cfg, site, Planned { patient: index, ordinal: 1, index }, &mut scratch, want);
    let img = s.images.into_iter().next().expect("every study has a frontal image");
    (img.pixels, img.w, img.h, s.report.chexpert, s.report.text)
}

/// Writes a text file, creating its folder (used by tests that corrupt trees).
pub fn put_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chexpert_valid_patients_small_and_large() {
        // (patients, expected valid.csv patients): a quarter of small trees, 20 up to ~667
        // patients, then 3%.
        for (p, want) in [(1, 0), (2, 0), (4, 1), (17, 4), (35, 8), (80, 20), (175, 20), (1000, 30), (20_000, 600)] {
            for seed in [0, 5] {
                let v = chexpert_valid_patients(seed, p);
                assert_eq!(v.len(), p);
                assert_eq!(v.iter().filter(|&&x| x).count(), want, "{p} patients, seed {seed}");
            }
        }
        // A function of the seed: the same twice, different for another seed.
        assert_eq!(chexpert_valid_patients(3, 500), chexpert_valid_patients(3, 500));
        assert_ne!(chexpert_valid_patients(3, 500), chexpert_valid_patients(4, 500));
        // The draw is spread over the patients, not the first ones.
        let v = chexpert_valid_patients(3, 1000);
        let first_half = v[..500].iter().filter(|&&x| x).count();
        assert!((5..=25).contains(&first_half), "{first_half} of 30 in the first half");
    }
}
