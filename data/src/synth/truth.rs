//! The ground truth of one synthetic study: which findings are present, how severe, on which side.
//! The image is drawn from it and the report is written from it, so both tell the same story.

use rand::Rng;

use super::site::Site;
use crate::labels::NUM_LABELS;

/// Label indices in CheXpert order, named for readability.
pub mod idx {
    pub const NO_FINDING: usize = 0;
    pub const ECM: usize = 1;
    pub const CARDIOMEGALY: usize = 2;
    pub const OPACITY: usize = 3;
    pub const LESION: usize = 4;
    pub const EDEMA: usize = 5;
    pub const CONSOLIDATION: usize = 6;
    pub const PNEUMONIA: usize = 7;
    pub const ATELECTASIS: usize = 8;
    pub const PNEUMOTHORAX: usize = 9;
    pub const EFFUSION: usize = 10;
    pub const PLEURAL_OTHER: usize = 11;
    pub const FRACTURE: usize = 12;
    pub const DEVICES: usize = 13;
}
use idx::*;

/// Base prevalence per label at an inpatient-level acuity (roughly MIMIC-CXR's rates).
const BASE_RATE: [f32; NUM_LABELS] = [0.0, 0.05, 0.2, 0.18, 0.04, 0.12, 0.06, 0.08, 0.2, 0.05, 0.24, 0.02, 0.03, 0.0];

/// Which side of the patient. Right is the image's left on a frontal film.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Right,
    Left,
    Both,
}

impl Side {
    pub fn word(self) -> &'static str {
        match self {
            Side::Right => "right",
            Side::Left => "left",
            Side::Both => "bilateral",
        }
    }
    /// Whether a finding on this side shows on lung `s` (Right or Left).
    pub fn covers(self, s: Side) -> bool {
        self == Side::Both || self == s
    }
}

/// The projection of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Pa,
    Ap,
    Lateral,
}

impl View {
    /// The DICOM ViewPosition string.
    pub fn position(self) -> &'static str {
        match self {
            View::Pa => "PA",
            View::Ap => "AP",
            View::Lateral => "LATERAL",
        }
    }
}

/// Support devices present.
#[derive(Clone, Copy, Debug, Default)]
pub struct Devices {
    pub ett: bool,
    pub ng_tube: bool,
    pub central_line: bool,
    pub pacemaker: bool,
    pub sternal_wires: bool,
}

impl Devices {
    pub fn any(&self) -> bool {
        self.ett || self.ng_tube || self.central_line || self.pacemaker || self.sternal_wires
    }
}

/// Lung zone of a focal finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    Upper,
    Middle,
    Lower,
}

impl Zone {
    pub fn word(self) -> &'static str {
        match self {
            Zone::Upper => "upper",
            Zone::Middle => "mid",
            Zone::Lower => "lower",
        }
    }
}

/// Ground truth of one study.
#[derive(Clone, Debug)]
pub struct Truth {
    /// Severity per label in (0, 1]; 0 means absent. `No Finding` is left 0 (it is derived).
    pub severity: [f32; NUM_LABELS],
    pub side: [Side; NUM_LABELS],
    pub zone: [Zone; NUM_LABELS],
    pub devices: Devices,
    /// 0 outpatient, 1 inpatient, 2 intensive care.
    pub acuity: u8,
    pub female: bool,
    pub age: u32,
    /// Frontal projection of this study (its lateral, when taken, is an extra image).
    pub frontal: View,
    pub has_lateral: bool,
    /// Soft-tissue thickness over the chest, relative to an average build (thin 0.92 to heavy 1.22).
    pub habitus: f32,
}

impl Truth {
    pub fn present(&self, i: usize) -> bool {
        self.severity[i] > 0.0
    }
}

fn pick_side(rng: &mut impl Rng, p_both: f32) -> Side {
    if rng.random::<f32>() < p_both {
        Side::Both
    } else if rng.random::<bool>() {
        Side::Right
    } else {
        Side::Left
    }
}

fn pick_zone(rng: &mut impl Rng, weights: [f32; 3]) -> Zone {
    let r = rng.random::<f32>() * (weights[0] + weights[1] + weights[2]);
    if r < weights[0] {
        Zone::Upper
    } else if r < weights[0] + weights[1] {
        Zone::Middle
    } else {
        Zone::Lower
    }
}

/// Draws one study's truth for a site. `prevalence` scales every base rate (1.0 = as designed).
pub fn sample(rng: &mut impl Rng, site: &Site, prevalence: f32) -> Truth {
    let a = rng.random::<f32>();
    let acuity = if a < site.acuity[0] {
        0
    } else if a < site.acuity[0] + site.acuity[1] {
        1
    } else {
        2
    };
    let acuity_mult = [0.45, 1.0, 1.7][acuity as usize];
    let mut sev = [0.0f32; NUM_LABELS];
    let draw = |sev: &mut [f32; NUM_LABELS], rng: &mut dyn rand::RngCore, i: usize, mult: f32| {
        let p = (BASE_RATE[i] * site.prevalence[i] * acuity_mult * prevalence * mult).min(0.9);
        if rng.random::<f32>() < p {
            // Severity is skewed towards the obvious: a third of findings are subtle.
            sev[i] = rng.random_range(0.25f32..1.0).max(rng.random_range(0.25f32..1.0));
        }
    };
    // Order matters: edema raises the odds of cardiomegaly and effusion (heart failure).
    draw(&mut sev, rng, EDEMA, 1.0);
    let hf = if sev[EDEMA] > 0.0 { 2.5 } else { 1.0 };
    draw(&mut sev, rng, CARDIOMEGALY, hf);
    draw(&mut sev, rng, EFFUSION, hf);
    draw(&mut sev, rng, ECM, 1.0);
    draw(&mut sev, rng, PNEUMONIA, 1.0);
    let m = if sev[PNEUMONIA] > 0.0 { 3.0 } else { 1.0 };
    draw(&mut sev, rng, CONSOLIDATION, m);
    draw(&mut sev, rng, OPACITY, 1.0);
    draw(&mut sev, rng, LESION, 1.0);
    let m = if sev[EFFUSION] > 0.0 { 1.8 } else { 1.0 };
    draw(&mut sev, rng, ATELECTASIS, m);
    draw(&mut sev, rng, PNEUMOTHORAX, 1.0);
    draw(&mut sev, rng, PLEURAL_OTHER, 1.0);
    draw(&mut sev, rng, FRACTURE, 1.0);

    let dev_p = [0.04, 0.3, 0.85][acuity as usize] * site.prevalence[DEVICES];
    let mut devices = Devices::default();
    if rng.random::<f32>() < dev_p {
        devices.ett = acuity == 2 && rng.random::<f32>() < 0.6;
        devices.ng_tube = devices.ett && rng.random::<f32>() < 0.7 || rng.random::<f32>() < 0.1;
        devices.central_line = rng.random::<f32>() < 0.55;
        devices.pacemaker = rng.random::<f32>() < 0.2;
        devices.sternal_wires = rng.random::<f32>() < 0.2;
        if !devices.any() {
            devices.central_line = true;
        }
        sev[DEVICES] = 1.0;
    }

    let mut side = [Side::Both; NUM_LABELS];
    let mut zone = [Zone::Lower; NUM_LABELS];
    side[EFFUSION] = pick_side(rng, if sev[EDEMA] > 0.0 { 0.7 } else { 0.3 });
    side[EDEMA] = Side::Both;
    for i in [OPACITY, CONSOLIDATION, PNEUMONIA, ATELECTASIS] {
        side[i] = pick_side(rng, if i == OPACITY { 0.35 } else { 0.12 });
        zone[i] = pick_zone(rng, [0.2, 0.3, 0.5]);
    }
    if sev[PNEUMONIA] > 0.0 && sev[CONSOLIDATION] > 0.0 {
        // One process: the consolidation is the pneumonia.
        side[CONSOLIDATION] = side[PNEUMONIA];
        zone[CONSOLIDATION] = zone[PNEUMONIA];
    }
    zone[ATELECTASIS] = Zone::Lower;
    for i in [LESION, PNEUMOTHORAX, PLEURAL_OTHER, FRACTURE] {
        side[i] = pick_side(rng, 0.0);
        zone[i] = pick_zone(rng, [0.4, 0.35, 0.25]);
    }
    zone[PNEUMOTHORAX] = Zone::Upper;

    let ap_p = (site.ap_fraction + [-0.3, 0.1, 0.5][acuity as usize]).clamp(0.02, 0.98);
    let frontal = if rng.random::<f32>() < ap_p { View::Ap } else { View::Pa };
    // Portable AP films are rarely paired with a lateral.
    let lat_p = if frontal == View::Pa { site.lateral_fraction * 1.6 } else { site.lateral_fraction * 0.3 };
    Truth {
        severity: sev,
        side,
        zone,
        devices,
        acuity,
        female: rng.random::<bool>(),
        age: rng.random_range(20..95),
        frontal,
        has_lateral: rng.random::<f32>() < lat_p.min(0.95),
        habitus: rng.random_range(0.92..1.22),
    }
}
