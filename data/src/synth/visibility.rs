//! How strongly each finding shows in the pixels: one multiplier per label on the severity the
//! renderer draws with (1 = as designed, lower = subtler, 0 = present in the truth and the report
//! but not in the image). The labels and the report do not change; only the film does.
//!
//! "As designed" includes [`DESIGN`]: the findings that change a large region's brightness or the
//! silhouette's width (edema, an enlarged heart or mediastinum, effusion) are drawn at a fraction
//! of their full strength, so that an untrained model's features plus a linear probe do not
//! already read them off the film (the calibration is in BENCHMARKS.md, "Does the generator
//! teach?"). `--visibility full` draws every finding at full strength.

use std::fmt;
use std::str::FromStr;

use crate::labels::{LABELS, NUM_LABELS};

/// How conspicuous each finding is at visibility 1, as a fraction of the severity the study's
/// truth gives it (CheXpert order). At 1 these four reached 90-99 macro AUC from an untrained
/// 64 px ViT with a linear probe.
pub const DESIGN: [f32; NUM_LABELS] = [
    1.0,  // No Finding (unused)
    0.4,  // Enlarged Cardiomediastinum
    0.5,  // Cardiomegaly
    1.0,  // Lung Opacity
    1.0,  // Lung Lesion
    0.25, // Edema
    1.0,  // Consolidation
    1.0,  // Pneumonia
    1.0,  // Atelectasis
    1.0,  // Pneumothorax
    0.7,  // Pleural Effusion
    1.0,  // Pleural Other
    1.0,  // Fracture
    1.0,  // Support Devices
];

/// Per-label visibility multipliers, in CheXpert's label order (`No Finding` is unused: it is
/// the absence of the others).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Visibility(pub [f32; NUM_LABELS]);

impl Visibility {
    /// Every finding at the same multiplier.
    pub fn uniform(v: f32) -> Visibility {
        let mut m = [v; NUM_LABELS];
        m[0] = 1.0; // unused; fixed so that equal specs compare equal
        Visibility(m)
    }

    /// Every finding at the full strength of its drawing (undoes [`DESIGN`]).
    pub fn full() -> Visibility {
        Visibility(DESIGN.map(|d| 1.0 / d))
    }

    /// The multiplier of label `i`.
    pub fn of(&self, i: usize) -> f32 {
        self.0[i]
    }

    /// The severity label `i` is drawn with: the truth's severity times [`DESIGN`] times this
    /// multiplier, capped at 1.2 (beyond it some findings would leave the lung).
    pub fn drawn(&self, i: usize, severity: f32) -> f32 {
        (severity * DESIGN[i] * self.0[i]).min(1.2)
    }
}

impl Default for Visibility {
    fn default() -> Self {
        Visibility::uniform(1.0)
    }
}

/// `Pleural Effusion`, `pleural_effusion`, `pleural-effusion` and `PLEURAL EFFUSION` all name the
/// same label; so does any unique start of it or of one of its later words (`effusion`,
/// `enlarged`, `devices`); `pleural` and `lung` name two labels each and are refused.
fn canonical(name: &str) -> String {
    name.trim().chars().map(|c| if c == '_' || c == '-' || c == ' ' { ' ' } else { c.to_ascii_lowercase() }).collect()
}

fn label_for(name: &str) -> Result<usize, String> {
    let want = canonical(name);
    let exact: Vec<usize> = (0..NUM_LABELS).filter(|&i| canonical(LABELS[i]) == want).collect();
    let hits = if exact.is_empty() {
        (0..NUM_LABELS)
            .filter(|&i| {
                let label = canonical(LABELS[i]);
                label.starts_with(&want) || label.contains(&format!(" {want}"))
            })
            .collect()
    } else {
        exact
    };
    match hits.as_slice() {
        [i] if *i != 0 => Ok(*i),
        [0] => Err("'No Finding' has no visibility of its own (it is the absence of the others)".into()),
        [] => Err(format!(
            "unknown finding '{name}' in --visibility (one of: {})",
            LABELS[1..].iter().map(|l| canonical(l).replace(' ', "_")).collect::<Vec<_>>().join(", ")
        )),
        many => Err(format!(
            "'{name}' in --visibility names several findings: {}",
            many.iter().map(|&i| LABELS[i]).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn multiplier(s: &str, what: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|_| format!("{what}: '{s}' is not a number"))?;
    if !(0.0..=4.0).contains(&v) {
        return Err(format!("{what}: {v} is outside 0..4"));
    }
    Ok(v)
}

/// `0.7` (every finding), `edema=0.5,cardiomegaly=0.6` (those, the rest at 1), or both:
/// `0.8,edema=0.5` (a leading number first sets every finding, then the named ones override it);
/// `full` in place of the leading number starts from [`Visibility::full`].
impl FromStr for Visibility {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut v = Visibility::default();
        for (k, item) in s.split(',').enumerate() {
            match item.split_once('=') {
                None if k == 0 && item.trim() == "full" => v = Visibility::full(),
                None if k == 0 => v = Visibility::uniform(multiplier(item, "--visibility")?),
                None => {
                    return Err(format!(
                        "--visibility: '{item}' must be finding=number (only the first item may be a bare number)"
                    ))
                }
                Some((name, val)) => {
                    let i = label_for(name)?;
                    v.0[i] = multiplier(val, &format!("--visibility {}", LABELS[i]))?;
                }
            }
        }
        Ok(v)
    }
}

/// The shortest spec that parses back to the same multipliers.
impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let base = self.0[1];
        write!(f, "{base}")?;
        for (label, &v) in LABELS.iter().zip(&self.0).skip(2) {
            if v != base {
                write!(f, ",{}={v}", canonical(label).replace(' ', "_"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::label_index;

    #[test]
    fn parses_uniform_named_and_mixed_specs() {
        assert_eq!("0.7".parse::<Visibility>().unwrap(), Visibility::uniform(0.7));
        let full: Visibility = "full,fracture=0.5".parse().unwrap();
        assert_eq!(full.drawn(label_index("Edema").unwrap(), 0.8), 0.8);
        assert_eq!(full.of(label_index("Fracture").unwrap()), 0.5);
        let v: Visibility = "edema=0.5, Pleural Effusion=0.25".parse().unwrap();
        assert_eq!(v.of(label_index("Edema").unwrap()), 0.5);
        assert_eq!(v.of(label_index("Pleural Effusion").unwrap()), 0.25);
        assert_eq!(v.of(label_index("Cardiomegaly").unwrap()), 1.0);
        let v: Visibility = "0.8,enlarged-cardiomediastinum=0.3,support_devices=1".parse().unwrap();
        assert_eq!(v.of(label_index("Enlarged Cardiomediastinum").unwrap()), 0.3);
        assert_eq!(v.of(label_index("Support Devices").unwrap()), 1.0);
        assert_eq!(v.of(label_index("Fracture").unwrap()), 0.8);
        // A unique prefix is enough; an ambiguous one is an error naming the candidates.
        let v: Visibility = "pneumot=0.4".parse().unwrap();
        assert_eq!(v.of(label_index("Pneumothorax").unwrap()), 0.4);
        let v: Visibility = "effusion=0.6,devices=0.2".parse().unwrap();
        assert_eq!(v.of(label_index("Pleural Effusion").unwrap()), 0.6);
        assert_eq!(v.of(label_index("Support Devices").unwrap()), 0.2);
        let e = "pleural=0.5".parse::<Visibility>().unwrap_err();
        assert!(e.contains("Pleural Effusion") && e.contains("Pleural Other"), "{e}");
    }

    #[test]
    fn bad_specs_are_one_clear_error() {
        for (spec, says) in [
            ("oedema=0.5", "unknown finding 'oedema'"),
            ("edema=lots", "'lots' is not a number"),
            ("edema=-1", "outside"),
            ("0.5,0.7", "must be finding=number"),
            ("no_finding=0.5", "No Finding"),
            ("", "is not a number"),
        ] {
            let e = spec.parse::<Visibility>().unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for spec in ["1", "0.6", "0.8,edema=0.5,fracture=2", "cardiomegaly=0"] {
            let v: Visibility = spec.parse().unwrap();
            assert_eq!(v.to_string().parse::<Visibility>().unwrap(), v, "{spec} -> {v}");
        }
    }
}
