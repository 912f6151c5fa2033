//! Which number goes where: the order of settings and datasets, the main table's cells, the
//! ablation groups, the published figures, and how numbers are written.

use std::collections::BTreeMap;

use super::{Report, ResultRow};

/// The paper's settings in the paper's order (normalised by [`setting_key`]).
const PAPER_SETTINGS: [&str; 5] = ["rand+lp", "clip+lp", "ft", "cls+ft", "cls+lp"];

/// The published ViT-B/32 macro AUCs (%), by setting key and dataset family.
const PUBLISHED: [(&str, &str, f64); 7] = [
    ("rand+lp", "mimic", 66.5),
    ("clip+lp", "mimic", 66.7),
    ("ft", "mimic", 77.2),
    ("cls+ft", "mimic", 77.3),
    ("cls+lp", "mimic", 77.8),
    ("cls+lp", "chexpert", 87.2),
    ("cls+lp", "rsna", 90.7),
];

/// What a "paper" column holds, said wherever one is shown.
pub const PUBLISHED_NOTE: &str = "paper: the published ViT-B/32 figures (trained and tested on the real \
     MIMIC-CXR, CheXpert and RSNA Pneumonia data), for reference; not measured here";

/// "CLS + LP", "cls+lp" and "CLS+LP" are one setting; "random" is "rand".
pub fn setting_key(setting: &str) -> String {
    let key: String = setting.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_lowercase();
    key.replace("random", "rand")
}

/// The dataset family a published figure is for, from the dataset's name.
fn dataset_family(dataset: &str) -> Option<&'static str> {
    let d = dataset.to_lowercase();
    ["mimic", "chexpert", "rsna"].into_iter().find(|f| d.starts_with(f))
}

/// A dataset's split: a column of the paper's table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Col {
    pub dataset: String,
    pub split: String,
}

impl Col {
    pub fn of(row: &ResultRow) -> Col {
        Col { dataset: row.dataset.clone(), split: row.split.clone() }
    }
    pub fn header(&self) -> String {
        format!("{} {}", self.dataset, self.split)
    }
    /// For a file name: `mimic_test`.
    pub fn slug(&self) -> String {
        format!("{}_{}", slug(&self.dataset), slug(&self.split))
    }
}

/// The published figure for a setting on a column, where the paper has one. Only test
/// splits match (CheXpert's test set is its `valid.csv`, so `valid` matches there too).
pub fn published(setting: &str, col: &Col) -> Option<f64> {
    let family = dataset_family(&col.dataset)?;
    let split = col.split.to_lowercase();
    if !(split == "test" || (family == "chexpert" && split == "valid")) {
        return None;
    }
    let key = setting_key(setting);
    PUBLISHED.iter().find(|(s, d, _)| *s == key && *d == family).map(|&(_, _, auc)| auc)
}

/// Settings in the paper's order first, then the others in the order they come.
pub fn ordered_settings<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for n in names {
        if !seen.iter().any(|s| s == n) {
            seen.push(n.to_string());
        }
    }
    let rank = |s: &String| PAPER_SETTINGS.iter().position(|p| *p == setting_key(s)).unwrap_or(PAPER_SETTINGS.len());
    // A stable sort keeps first-come order among the unknown ones.
    seen.sort_by_key(rank);
    seen
}

/// Columns: MIMIC, CheXpert, RSNA, then other datasets as they come; test splits first.
pub fn ordered_cols(cols: impl IntoIterator<Item = Col>) -> Vec<Col> {
    let mut seen: Vec<Col> = Vec::new();
    for c in cols {
        if !seen.contains(&c) {
            seen.push(c);
        }
    }
    let first_of: Vec<String> = {
        let mut names: Vec<String> = Vec::new();
        for c in &seen {
            if !names.contains(&c.dataset) {
                names.push(c.dataset.clone());
            }
        }
        names
    };
    let family_rank = |d: &str| match dataset_family(d) {
        Some("mimic") => 0,
        Some("chexpert") => 1,
        Some("rsna") => 2,
        _ => 3,
    };
    let split_rank = |s: &str| match s.to_lowercase().as_str() {
        "test" => 0,
        "valid" | "validate" | "validation" => 1,
        "train" => 3,
        _ => 2,
    };
    seen.sort_by_key(|c| {
        (family_rank(&c.dataset), first_of.iter().position(|d| *d == c.dataset), split_rank(&c.split))
    });
    seen
}

/// The paper's table: main-setting rows (no ablation) by setting and column.
pub struct MainTable<'a> {
    pub settings: Vec<String>,
    pub cols: Vec<Col>,
    /// (setting index, column index) -> the rows there, the first one shown.
    pub cells: BTreeMap<(usize, usize), Vec<&'a ResultRow>>,
}

impl<'a> MainTable<'a> {
    pub fn of(report: &'a Report) -> Self {
        let main: Vec<&ResultRow> = report.rows.iter().filter(|r| r.ablation.is_none()).collect();
        let settings = ordered_settings(main.iter().map(|r| r.setting.as_str()));
        let cols = ordered_cols(main.iter().map(|r| Col::of(r)));
        let mut cells: BTreeMap<(usize, usize), Vec<&ResultRow>> = BTreeMap::new();
        for r in main {
            let s = settings.iter().position(|s| *s == r.setting).expect("every setting is listed");
            let c = cols.iter().position(|c| *c == Col::of(r)).expect("every column is listed");
            cells.entry((s, c)).or_default().push(r);
        }
        MainTable { settings, cols, cells }
    }

    pub fn cell(&self, s: usize, c: usize) -> Option<&'a ResultRow> {
        self.cells.get(&(s, c)).and_then(|v| v.first().copied())
    }

    /// Whether column `c` gets a "paper" column beside it.
    pub fn has_published(&self, c: usize) -> bool {
        self.settings.iter().any(|s| published(s, &self.cols[c]).is_some())
    }
}

/// One ablation on one column: rows by swept value and setting.
pub struct AblationTable<'a> {
    pub name: String,
    pub col: Col,
    pub settings: Vec<String>,
    /// Ascending swept values.
    pub values: Vec<f64>,
    pub rows: Vec<&'a ResultRow>,
}

impl<'a> AblationTable<'a> {
    pub fn all(report: &'a Report) -> Vec<AblationTable<'a>> {
        let swept: Vec<&ResultRow> = report.rows.iter().filter(|r| r.ablation.is_some()).collect();
        let mut names: Vec<String> = Vec::new();
        for r in &swept {
            let name = &r.ablation.as_ref().expect("filtered").name;
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let mut tables = Vec::new();
        for name in names {
            let of_name: Vec<&ResultRow> =
                swept.iter().copied().filter(|r| r.ablation.as_ref().is_some_and(|a| a.name == name)).collect();
            for col in ordered_cols(of_name.iter().map(|r| Col::of(r))) {
                let rows: Vec<&ResultRow> = of_name.iter().copied().filter(|r| Col::of(r) == col).collect();
                let settings = ordered_settings(rows.iter().map(|r| r.setting.as_str()));
                let mut values: Vec<f64> = rows.iter().map(|r| r.ablation.as_ref().expect("filtered").value).collect();
                values.sort_by(f64::total_cmp);
                values.dedup();
                tables.push(AblationTable { name: name.clone(), col, settings, values, rows });
            }
        }
        tables
    }

    pub fn at(&self, setting: &str, value: f64) -> Option<&'a ResultRow> {
        self.rows
            .iter()
            .copied()
            .find(|r| r.setting == setting && r.ablation.as_ref().is_some_and(|a| a.value == value))
    }

    /// For a file name: `label-fraction_mimic_test`.
    pub fn slug(&self) -> String {
        format!("{}_{}", slug(&self.name), self.col.slug())
    }
}

/// A file-name-safe form: lowercase ASCII letters, digits, '-' (anything else becomes '-').
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.to_lowercase().chars() {
        let keep = ch.is_ascii_alphanumeric();
        if keep {
            out.push(ch);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-').to_string();
    if out.is_empty() {
        "unnamed".to_string()
    } else {
        out
    }
}

/// An AUC (0-1) in %, "77.8"; "n/a" when not finite.
pub fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", x * 100.0)
    } else {
        "n/a".to_string()
    }
}

/// "77.8 [76.9, 78.6]" from 0-1 values; the interval is left out when not finite.
pub fn auc_ci(auc: f64, ci: [f64; 2]) -> String {
    if !auc.is_finite() {
        return "n/a".to_string();
    }
    if ci.iter().all(|c| c.is_finite()) {
        format!("{} [{}, {}]", pct(auc), pct(ci[0]), pct(ci[1]))
    } else {
        pct(auc)
    }
}

/// A difference in AUC points with its sign, "+6.2 [+2.9, +9.8]".
pub fn diff_ci(diff: f64, ci: [f64; 2]) -> String {
    let signed = |x: f64| if x.is_finite() { format!("{:+.1}", x * 100.0) } else { "n/a".to_string() };
    if ci.iter().all(|c| c.is_finite()) {
        format!("{} [{}, {}]", signed(diff), signed(ci[0]), signed(ci[1]))
    } else {
        signed(diff)
    }
}

/// Whether a 95% CI excludes 0, and on which side: `Some(true)` above, `Some(false)` below.
pub fn excludes_zero(ci: [f64; 2]) -> Option<bool> {
    if !ci.iter().all(|c| c.is_finite()) {
        None
    } else if ci[0] > 0.0 {
        Some(true)
    } else if ci[1] < 0.0 {
        Some(false)
    } else {
        None
    }
}

/// A swept value as written: "0.01", "192".
pub fn value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// Thousands separated by commas: 12,345.
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
