//! `[data]` and `[model]`: what the runs read. Paths are checked to exist here, after the
//! command line's `--dataset NAME=PATH` and `--init DIR` have replaced the file's.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use data::{DatasetKind, UncertainPolicy};
use toml::Spanned;

use super::schema::{RawDataset, RawDatasetTable, RawModel, RawRsnaSplit};
use super::spec::{DataSource, DatasetSpec, ModelSizes, ModelSpec, RandomModel};
use super::values::Checker;
use super::Overrides;

/// The sizes of `from = "random"` when the plan gives neither an init folder nor sizes (those
/// of `coordinator`'s training run).
pub const DEFAULT_SIZES: ModelSizes = crate::sizes::DEFAULT;

/// The smallest synthetic image the generator writes.
const MIN_SYNTH_SIZE: u64 = 32;

/// Every dataset the plan names: its layout (known as soon as the name is valid, so that runs
/// can be checked against it even when its settings have problems) and its spec (when they
/// have none).
#[derive(Default)]
pub struct Datasets {
    pub kinds: BTreeMap<String, DatasetKind>,
    pub specs: BTreeMap<String, DatasetSpec>,
}

/// Reads `[data]`. `base` is the folder relative paths in the file are taken from.
pub fn datasets(
    c: &mut Checker<'_>,
    raw: &BTreeMap<Spanned<String>, Spanned<RawDataset>>,
    base: Option<&Path>,
    over: &Overrides,
) -> Datasets {
    let mut out = Datasets::default();
    for (name, value) in raw {
        let Ok(kind) = name.get_ref().parse::<DatasetKind>() else {
            c.at(
                name,
                format!(
                    "unknown dataset `{}`: a dataset's name in [data] is its layout (mimic, chexpert or rsna)",
                    name.get_ref()
                ),
            );
            continue;
        };
        out.kinds.insert(name.get_ref().clone(), kind);
        let table = match value.get_ref() {
            RawDataset::Path(p) => {
                RawDatasetTable { path: Some(Spanned::new(value.span(), p.clone())), ..Default::default() }
            }
            RawDataset::Table(t) => (**t).clone(),
        };
        let errors = c.errors.len();
        let spec = dataset(c, name.get_ref(), kind, &table, &value.span(), base, over.datasets.get(name.get_ref()));
        if c.errors.len() == errors {
            out.specs.insert(name.get_ref().clone(), spec);
        }
    }
    for name in over.datasets.keys() {
        if !out.kinds.contains_key(name) {
            let have: Vec<&str> = out.kinds.keys().map(|s| s.as_str()).collect();
            c.whole(format!("--dataset {name}=...: the plan has no dataset `{name}` (it has: {})", have.join(", ")));
        }
    }
    out
}

fn dataset(
    c: &mut Checker<'_>,
    name: &str,
    kind: DatasetKind,
    t: &RawDatasetTable,
    span: &Range<usize>,
    base: Option<&Path>,
    over: Option<&PathBuf>,
) -> DatasetSpec {
    let source = source(c, name, t, span, base, over);
    let labels = match &t.labels {
        None => data::default_eval_labels(kind).iter().map(|s| s.to_string()).collect(),
        Some(l) => labels(c, name, kind, l),
    };
    let uncertain = t.uncertain.as_ref().map_or(UncertainPolicy::Zeros, |u| u.get_ref().0);
    let split = match (&t.split, kind) {
        (Some(s), DatasetKind::Rsna) => Some(match s.get_ref() {
            RawRsnaSplit::Grouped => data::RsnaSplit::Grouped,
            RawRsnaSplit::Rows => data::RsnaSplit::Rows,
        }),
        (None, DatasetKind::Rsna) => Some(data::RsnaSplit::Grouped),
        (Some(s), _) => {
            c.at(s, format!("`split` applies to rsna only ({name} has its own split)"));
            None
        }
        (None, _) => None,
    };
    let valid_fraction = t.valid_fraction.as_ref().and_then(|v| {
        if kind == DatasetKind::Mimic {
            c.at(v, "`valid_fraction` applies to chexpert and rsna (mimic has an official validation split)");
            return None;
        }
        c.open_fraction(v, "valid_fraction")
    });
    let test_fraction = t.test_fraction.as_ref().and_then(|v| {
        if kind != DatasetKind::Rsna {
            c.at(v, format!("`test_fraction` applies to rsna only ({name} has its own test split)"));
            return None;
        }
        c.open_fraction(v, "test_fraction")
    });
    if let (Some(v), Some(t_), Some(span)) = (valid_fraction, test_fraction, &t.test_fraction) {
        if v + t_ >= 1.0 {
            c.at(span, format!("`valid_fraction` + `test_fraction` = {} leaves no training data", v + t_));
        }
    }
    DatasetSpec { kind, source, labels, uncertain, split, valid_fraction, test_fraction }
}

fn source(
    c: &mut Checker<'_>,
    name: &str,
    t: &RawDatasetTable,
    span: &Range<usize>,
    base: Option<&Path>,
    over: Option<&PathBuf>,
) -> DataSource {
    if t.synthetic.is_none() {
        for (key, v) in [("size", &t.size), ("seed", &t.seed)] {
            if let Some(v) = v {
                c.at(v, format!("`{key}` applies to generated data only (with `synthetic = N`)"));
            }
        }
    }
    if let Some(p) = over {
        // The command line replaces whatever the file says (a path or a synthetic spec).
        if !p.is_dir() {
            let why = if p.exists() { "is not a folder" } else { "does not exist" };
            c.whole(format!("--dataset {name}={}: the folder {why}", p.display()));
        }
        return DataSource::Path(p.clone());
    }
    match (&t.path, &t.synthetic) {
        (Some(p), Some(s)) => {
            c.at(s, format!("dataset `{name}`: set `path` or `synthetic`, not both"));
            DataSource::Path(PathBuf::from(p.get_ref()))
        }
        (None, None) => {
            c.at_span(span, format!("dataset `{name}` needs a `path` or `synthetic = N` (generated data)"));
            DataSource::Path(PathBuf::new())
        }
        (Some(p), None) => {
            let path = resolve(base, p.get_ref());
            if p.get_ref().is_empty() {
                c.at(p, format!("dataset `{name}`: the path is empty"));
            } else if !path.is_dir() {
                let why = if path.exists() { "is not a folder" } else { "does not exist" };
                c.at(
                    p,
                    format!("dataset `{name}`: {} {why} (fix the path or pass --dataset {name}=PATH)", path.display()),
                );
            }
            DataSource::Path(path)
        }
        (None, Some(s)) => {
            let studies = c.count(s, "synthetic", 1).unwrap_or(1);
            let size = t.size.as_ref().map_or(Some(128), |v| c.count(v, "size", MIN_SYNTH_SIZE)).unwrap_or(128);
            let seed = t.seed.as_ref().map_or(0, |v| *v.get_ref());
            DataSource::Synthetic { studies, size, seed }
        }
    }
}

fn labels(c: &mut Checker<'_>, name: &str, kind: DatasetKind, l: &Spanned<Vec<String>>) -> Vec<String> {
    let have = data::dataset_labels(kind);
    if l.get_ref().is_empty() {
        c.at(l, format!("dataset `{name}`: `labels` is empty (leave it out for the default)"));
    }
    let mut seen: Vec<&str> = Vec::new();
    for label in l.get_ref() {
        if !have.contains(&label.as_str()) {
            let list = if have.len() > 5 { "the 14 CheXpert labels".to_string() } else { have.join(", ") };
            c.at(l, format!("dataset `{name}` has no label `{label}` ({} has: {list})", kind.name()));
        } else if seen.contains(&label.as_str()) {
            c.at(l, format!("dataset `{name}`: label `{label}` is listed twice"));
        }
        seen.push(label);
    }
    l.get_ref().clone()
}

/// Where `[model] init` came from, for the message when it is needed and missing.
pub enum InitOrigin {
    File(Range<usize>),
    CommandLine,
}

/// Reads `[model]`. The init folder is checked later, only if some run needs it.
pub fn model(
    c: &mut Checker<'_>,
    raw: Option<&Spanned<RawModel>>,
    base: Option<&Path>,
    over: &Overrides,
) -> (ModelSpec, Option<InitOrigin>) {
    let m = raw.map(|m| m.get_ref().clone()).unwrap_or_default();
    let (init, origin) = match (&over.init, &m.init) {
        (Some(p), _) => (Some(p.clone()), Some(InitOrigin::CommandLine)),
        (None, Some(p)) => (Some(resolve(base, p.get_ref())), Some(InitOrigin::File(p.span()))),
        (None, None) => (None, None),
    };
    let given = [&m.image, &m.patch, &m.width, &m.layers, &m.heads];
    let random = if given.iter().all(|v| v.is_none()) {
        if init.is_some() {
            RandomModel::LikeInit
        } else {
            RandomModel::Sizes(DEFAULT_SIZES)
        }
    } else {
        let d = DEFAULT_SIZES;
        let mut get = |v: &Option<Spanned<u64>>, key: &str, default: usize| {
            v.as_ref().map_or(Some(default), |v| c.count(v, key, 1)).unwrap_or(default)
        };
        let s = ModelSizes {
            image: get(&m.image, "image", d.image),
            patch: get(&m.patch, "patch", d.patch),
            width: get(&m.width, "width", d.width),
            layers: get(&m.layers, "layers", d.layers),
            heads: get(&m.heads, "heads", d.heads),
        };
        let span = m.image.as_ref().or(m.patch.as_ref()).map(|v| v.span());
        if !s.image.is_multiple_of(s.patch) {
            let span = m.patch.as_ref().or(m.image.as_ref()).map(|v| v.span()).unwrap_or_default();
            c.at_span(&span, format!("[model] image {} is not a multiple of patch {}", s.image, s.patch));
        }
        if !s.width.is_multiple_of(s.heads) {
            let span = m.heads.as_ref().or(m.width.as_ref()).map(|v| v.span()).or(span).unwrap_or_default();
            c.at_span(&span, format!("[model] width {} is not a multiple of heads {}", s.width, s.heads));
        }
        RandomModel::Sizes(s)
    };
    (ModelSpec { init, random }, origin)
}

/// Checks the init folder, when some run needs it; `need_line` is the line of the first run
/// that does.
pub fn check_init(c: &mut Checker<'_>, model: &ModelSpec, origin: Option<&InitOrigin>, need_line: usize, why: &str) {
    let (Some(dir), Some(origin)) = (&model.init, origin) else {
        c.at_line(need_line, format!("{why}, but [model] has no `init` folder (set one or pass --init DIR)"));
        return;
    };
    let problem = if !dir.is_dir() {
        Some(if dir.exists() { "is not a folder" } else { "does not exist" })
    } else if !dir.join("config.json").is_file() {
        Some("holds no config.json (a Hugging Face CLIP folder is expected)")
    } else {
        None
    };
    if let Some(p) = problem {
        match origin {
            InitOrigin::CommandLine => c.whole(format!("--init {}: the folder {p}", dir.display())),
            InitOrigin::File(span) => {
                c.at_span(span, format!("[model] init: {} {p} (fix the path or pass --init DIR; {why})", dir.display()))
            }
        }
    }
}

/// A path from the file: relative ones are taken from the plan file's folder.
fn resolve(base: Option<&Path>, p: &str) -> PathBuf {
    let p = PathBuf::from(p);
    match base {
        Some(b) if p.is_relative() => b.join(p),
        _ => p,
    }
}
