//! "Sites": the hospitals the generator imitates. They differ in exposure, noise, contrast,
//! sharpness, image shape, AP/PA mix and prevalence, so that transfer between them is a real test.

use crate::labels::NUM_LABELS;
use crate::DatasetKind;

/// One imaging site's acquisition and population parameters.
#[derive(Clone, Debug)]
pub struct Site {
    pub name: &'static str,
    /// Attenuation-to-brightness gain of the detector (higher = brighter, more contrast).
    pub exposure: f32,
    /// Gamma applied after exposure (below 1 lifts the lungs, above 1 darkens them).
    pub gamma: f32,
    /// Standard deviation of the grain noise, in [0,1] intensity units.
    pub noise: f32,
    /// Passes of a [1,2,1] blur: 0 is sharp, 2 is a soft detector.
    pub blur_passes: u32,
    /// Height over width choices (the images are portrait or square).
    pub aspects: &'static [f32],
    /// Fraction of frontal images taken AP (portable) rather than PA, before acuity shifts it.
    pub ap_fraction: f32,
    /// Probability that a study also has a lateral view.
    pub lateral_fraction: f32,
    /// Prevalence multipliers per label (CheXpert order) on the generator's base rates.
    pub prevalence: [f32; NUM_LABELS],
    /// Fraction of patients by acuity: outpatient, inpatient, intensive care.
    pub acuity: [f32; 3],
    /// Whether the site prints a side marker in the corner.
    pub marker: bool,
    /// Brightness offset of the whole film.
    pub offset: f32,
    /// Range of the film-to-film technique factor (a multiplier on attenuation: kVp and mAs set
    /// by hand); a site with automatic exposure control varies less.
    pub technique: [f32; 2],
}

/// MIMIC-like: an intensive-care heavy urban hospital, many portable AP films and devices.
pub const MIMIC: Site = Site {
    name: "mimic",
    exposure: 1.15,
    gamma: 1.0,
    noise: 0.022,
    blur_passes: 1,
    aspects: &[1.0, 1.2, 1.22],
    ap_fraction: 0.45,
    lateral_fraction: 0.45,
    prevalence: [1.0; NUM_LABELS],
    acuity: [0.35, 0.4, 0.25],
    marker: true,
    offset: 0.0,
    technique: [0.85, 1.18],
};

/// CheXpert-like: another hospital, softer and noisier films, more effusion and devices.
pub const CHEXPERT: Site = Site {
    name: "chexpert",
    exposure: 1.0,
    gamma: 1.15,
    noise: 0.035,
    blur_passes: 2,
    aspects: &[1.0, 1.15],
    ap_fraction: 0.7,
    lateral_fraction: 0.2,
    prevalence: [0.8, 1.3, 1.2, 1.4, 1.2, 1.1, 0.8, 0.6, 1.1, 1.5, 1.3, 1.0, 1.0, 1.4],
    acuity: [0.2, 0.45, 0.35],
    marker: false,
    offset: 0.03,
    technique: [0.8, 1.2],
};

/// RSNA-like: square 8-bit images from a public screening archive; pneumonia-rich, sharp, low noise.
pub const RSNA: Site = Site {
    name: "rsna",
    exposure: 1.3,
    gamma: 0.9,
    noise: 0.012,
    blur_passes: 0,
    aspects: &[1.0],
    ap_fraction: 0.5,
    lateral_fraction: 0.0,
    prevalence: [1.0, 0.8, 0.9, 1.5, 1.0, 0.8, 1.5, 3.5, 1.0, 0.6, 0.9, 1.0, 0.8, 0.7],
    acuity: [0.4, 0.4, 0.2],
    marker: true,
    offset: -0.02,
    technique: [0.9, 1.12],
};

/// The site whose layout a dataset has.
pub fn for_dataset(dataset: DatasetKind) -> &'static Site {
    match dataset {
        DatasetKind::Mimic => &MIMIC,
        DatasetKind::Chexpert => &CHEXPERT,
        DatasetKind::Rsna => &RSNA,
    }
}
