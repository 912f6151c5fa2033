//! The 14 CheXpert labels, their raw values and the policies that turn them into targets.

use std::fmt;
use std::str::FromStr;

/// The 14 labels in CheXpert's order; every label vector in this crate uses this order.
pub const LABELS: [&str; 14] = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
];

/// Number of labels.
pub const NUM_LABELS: usize = LABELS.len();

/// The CheXpert competition subset.
pub const COMPETITION_FIVE: [&str; 5] = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"];

/// Index of a label name in [`LABELS`].
pub fn label_index(name: &str) -> Option<usize> {
    LABELS.iter().position(|l| *l == name)
}

/// A raw label as distributed: 1.0, 0.0, -1.0 or an empty cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LabelValue {
    Positive,
    Negative,
    Uncertain,
    #[default]
    Blank,
}

impl LabelValue {
    /// Parses a csv cell. Accepts the forms seen in the wild ("1.0", "1", "-1.0", "", "0").
    pub fn parse(cell: &str) -> Option<LabelValue> {
        let c = cell.trim();
        if c.is_empty() {
            return Some(LabelValue::Blank);
        }
        let v = c.parse::<f64>().ok()?;
        if v == 1.0 {
            Some(LabelValue::Positive)
        } else if v == 0.0 {
            Some(LabelValue::Negative)
        } else if v == -1.0 {
            Some(LabelValue::Uncertain)
        } else {
            None
        }
    }

    /// The csv form written by the generator (the same strings the real files use).
    pub fn as_csv(self) -> &'static str {
        match self {
            LabelValue::Positive => "1.0",
            LabelValue::Negative => "0.0",
            LabelValue::Uncertain => "-1.0",
            LabelValue::Blank => "",
        }
    }
}

/// What to do with uncertain (-1) and blank labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UncertainPolicy {
    /// The paper's: uncertain and blank both become 0.
    #[default]
    Zeros,
    /// Uncertain becomes 1 (U-Ones); blank becomes 0.
    Ones,
    /// Uncertain and blank are masked out of loss and AUC.
    Ignore,
}

impl UncertainPolicy {
    /// The target for one raw value; `None` means masked.
    pub fn apply(self, v: LabelValue) -> Option<f32> {
        match (v, self) {
            (LabelValue::Positive, _) => Some(1.0),
            (LabelValue::Negative, _) => Some(0.0),
            (LabelValue::Uncertain, UncertainPolicy::Zeros) => Some(0.0),
            (LabelValue::Uncertain, UncertainPolicy::Ones) => Some(1.0),
            (LabelValue::Blank, UncertainPolicy::Zeros | UncertainPolicy::Ones) => Some(0.0),
            (LabelValue::Uncertain | LabelValue::Blank, UncertainPolicy::Ignore) => None,
        }
    }

    /// Targets and a mask (1 = counts) for a label vector.
    pub fn targets(self, labels: &[LabelValue; NUM_LABELS]) -> ([f32; NUM_LABELS], [f32; NUM_LABELS]) {
        let mut t = [0.0; NUM_LABELS];
        let mut m = [0.0; NUM_LABELS];
        for (i, v) in labels.iter().enumerate() {
            if let Some(x) = self.apply(*v) {
                t[i] = x;
                m[i] = 1.0;
            }
        }
        (t, m)
    }
}

impl FromStr for UncertainPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zeros" => Ok(UncertainPolicy::Zeros),
            "ones" => Ok(UncertainPolicy::Ones),
            "ignore" => Ok(UncertainPolicy::Ignore),
            other => Err(format!("unknown uncertain-label policy '{other}' (zeros, ones, ignore)")),
        }
    }
}

impl fmt::Display for UncertainPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UncertainPolicy::Zeros => "zeros",
            UncertainPolicy::Ones => "ones",
            UncertainPolicy::Ignore => "ignore",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cells() {
        assert_eq!(LabelValue::parse("1.0"), Some(LabelValue::Positive));
        assert_eq!(LabelValue::parse("1"), Some(LabelValue::Positive));
        assert_eq!(LabelValue::parse(" 0.0 "), Some(LabelValue::Negative));
        assert_eq!(LabelValue::parse("-1.0"), Some(LabelValue::Uncertain));
        assert_eq!(LabelValue::parse(""), Some(LabelValue::Blank));
        assert_eq!(LabelValue::parse("2.0"), None);
        assert_eq!(LabelValue::parse("yes"), None);
    }

    #[test]
    fn policies() {
        use LabelValue::*;
        let z = UncertainPolicy::Zeros;
        let o = UncertainPolicy::Ones;
        let i = UncertainPolicy::Ignore;
        assert_eq!([z.apply(Uncertain), z.apply(Blank)], [Some(0.0), Some(0.0)]);
        assert_eq!([o.apply(Uncertain), o.apply(Blank)], [Some(1.0), Some(0.0)]);
        assert_eq!([i.apply(Uncertain), i.apply(Blank)], [None, None]);
        for p in [z, o, i] {
            assert_eq!(p.apply(Positive), Some(1.0));
            assert_eq!(p.apply(Negative), Some(0.0));
        }
        let mut l = [Blank; NUM_LABELS];
        l[2] = Positive;
        l[5] = Uncertain;
        let (t, m) = i.targets(&l);
        assert_eq!((t[2], m[2], m[5], m[0]), (1.0, 1.0, 0.0, 0.0));
        assert_eq!("ones".parse::<UncertainPolicy>().unwrap(), o);
        assert!("maybe".parse::<UncertainPolicy>().is_err());
    }

    #[test]
    fn order_is_chexpert() {
        assert_eq!(label_index("No Finding"), Some(0));
        assert_eq!(label_index("Support Devices"), Some(13));
        assert_eq!(label_index("Pleural Effusion"), Some(10));
    }
}
