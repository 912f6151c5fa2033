//! The `[[run]]` tables: `[defaults]` applied, every setting checked against its run's kind and
//! its range, datasets and splits resolved. Each run becomes a `BaseRun`: its settings as a
//! `RunSpec` template, its own sweep axes and what it starts from, for `graph` and `expand`.

use std::collections::BTreeMap;
use std::ops::Range;

use data::report::SectionPolicy;
use data::{DatasetKind, Split, Views};
use toml::Spanned;

use super::resources::Datasets;
use super::schema::{setting_kinds, RawRun, RawSweep};
use super::settings::{augment, probe_grid, templates, training, DEFAULT_PROBE_GRID};
use super::spec::{
    Augment, DatasetSpec, EvalSplit, Job, RunKind, RunSpec, Start, SweepKey, SweepValue, Templates,
    TEXT_TO_IMAGE_FINDINGS, TEXT_TO_IMAGE_SIZE, TEXT_TO_IMAGE_STEPS,
};
use super::values::Checker;

/// What a run names in `from`, before the runs are resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum FromRef {
    Random,
    Init,
    /// A run's name in the file, and the sweep values picked from its expansions
    /// (`cls[data_fraction=1.0]`: only that one; none: one per expansion).
    Run {
        base: String,
        select: Vec<(SweepKey, SweepValue)>,
    },
}

/// One of a run's own sweep keys with its values.
#[derive(Clone, Debug)]
pub struct Axis {
    pub key: SweepKey,
    pub values: Vec<SweepValue>,
}

/// A `[[run]]` table, checked.
#[derive(Clone, Debug)]
pub struct BaseRun {
    pub name: String,
    pub kind: RunKind,
    pub from: FromRef,
    pub from_span: Range<usize>,
    pub sweep: Vec<Axis>,
    /// Its settings (name and from filled in by `expand`); `None` when some had problems.
    pub template: Option<RunSpec>,
}

/// All runs: the checked ones, and every name the file declares (also of runs dropped for
/// problems, so that a reference to them is not reported a second time as unknown).
pub struct Runs {
    pub runs: Vec<BaseRun>,
    pub names: BTreeMap<String, usize>,
}

pub fn runs(c: &mut Checker<'_>, raw: &[Spanned<RawRun>], defaults: Option<&Spanned<RawRun>>, data: &Datasets) -> Runs {
    if let Some(d) = defaults {
        let d = d.get_ref();
        let misplaced = [
            ("name", d.name.as_ref().map(|v| v.span())),
            ("kind", d.kind.as_ref().map(|v| v.span())),
            ("from", d.from.as_ref().map(|v| v.span())),
            ("sweep", d.sweep.as_ref().map(|v| v.span())),
        ];
        for (key, span) in misplaced {
            if let Some(span) = span {
                c.at_span(&span, format!("`{key}` belongs to each [[run]], not to [defaults]"));
            }
        }
    }
    let defaults = defaults.map(|d| d.get_ref());
    let mut out = Runs { runs: Vec::new(), names: BTreeMap::new() };
    if raw.is_empty() {
        c.whole("the plan has no [[run]]");
    }
    for r in raw {
        if let Some(b) = run(c, r, defaults, data, &mut out.names) {
            out.runs.push(b);
        }
    }
    out
}

fn run(
    c: &mut Checker<'_>,
    r: &Spanned<RawRun>,
    defaults: Option<&RawRun>,
    data: &Datasets,
    names: &mut BTreeMap<String, usize>,
) -> Option<BaseRun> {
    let table_line = c.src.line(r.span().start);
    let raw = r.get_ref();
    let Some(name_v) = &raw.name else {
        c.at_line(table_line, "this [[run]] has no `name`");
        return None;
    };
    let name = name_v.get_ref().clone();
    if let Err(why) = check_name(&name) {
        c.at(name_v, why);
        return None;
    }
    if let Some(first) = names.get(&name) {
        c.at(name_v, format!("duplicate run name `{name}` (first at line {first})"));
        return None;
    }
    names.insert(name.clone(), c.line_of(name_v));
    let kind = match &raw.kind {
        None => {
            c.at(name_v, format!("run `{name}` has no `kind` ({})", list_kinds(&RunKind::ALL)));
            return None;
        }
        Some(k) => k.get_ref().kind(),
    };
    let Some(from_v) = &raw.from else {
        c.at(name_v, format!("run `{name}` has no `from` (random, init or another run's name)"));
        return None;
    };
    let from = match parse_from(from_v.get_ref()) {
        Ok(f) => f,
        Err(why) => {
            c.at(from_v, why);
            return None;
        }
    };
    let errors = c.errors.len();

    for (key, span) in raw.settings_set() {
        let kinds = setting_kinds(key).unwrap_or(&[]);
        if !kinds.contains(&kind) {
            c.at_span(&span, format!("`{key}` does not apply to a {kind} run (only to {})", list_kinds(kinds)));
        }
    }
    let sweep = raw.sweep.as_ref().map(|s| axes(c, &name, kind, raw, s)).unwrap_or_default();
    let swept = |k: &str| sweep.iter().any(|a| a.key.name() == k);

    // [defaults] fill what the run leaves out, where the key applies to the run's kind and is
    // not swept (the sweep gives those values).
    let mut m = raw.clone();
    if let Some(d) = defaults {
        m.fill_from(d, |k| setting_kinds(k).is_some_and(|ks| ks.contains(&kind)) && !swept(k));
    }
    let own = |k: &str| raw.settings_set().iter().any(|(x, _)| *x == k);
    let template = settings(c, &name, name_v, kind, &m, &own, data);
    let template = if c.errors.len() == errors { template } else { None };
    Some(BaseRun { name, kind, from, from_span: from_v.span(), sweep, template })
}

/// Run names become folder names: letters, digits and `-_.+`, starting with a letter or digit;
/// brackets are kept for the names sweeps make.
fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |ch: char| ch.is_ascii_alphanumeric() || "-_.+".contains(ch);
    if name.is_empty() {
        return Err("a run's `name` is empty".into());
    }
    if !name.chars().next().is_some_and(|ch| ch.is_ascii_alphanumeric()) || !name.chars().all(ok_char) {
        return Err(format!(
            "run name `{name}`: use letters, digits and - _ . + only, starting with a letter or digit"
        ));
    }
    if name == "random" || name == "init" {
        return Err(format!("run name `{name}` is reserved (`from = \"{name}\"` means the {name} model)"));
    }
    Ok(())
}

/// `random`, `init`, `NAME` or `NAME[key=value,...]`.
pub fn parse_from(s: &str) -> Result<FromRef, String> {
    match s {
        "random" => return Ok(FromRef::Random),
        "init" => return Ok(FromRef::Init),
        _ => {}
    }
    let Some(open) = s.find('[') else {
        check_name(s).map_err(|e| format!("`from` = \"{s}\": {e}"))?;
        return Ok(FromRef::Run { base: s.to_string(), select: Vec::new() });
    };
    let bad = || {
        format!("`from` = \"{s}\": expected random, init, a run's name, or a run's name with sweep values such as cls[data_fraction=1.0]")
    };
    let base = &s[..open];
    let inner = s[open + 1..].strip_suffix(']').ok_or_else(bad)?;
    check_name(base).map_err(|e| format!("`from` = \"{s}\": {e}"))?;
    let mut select = Vec::new();
    for part in inner.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(bad)?;
        let key = SweepKey::parse(k.trim()).ok_or_else(|| {
            format!(
                "`from` = \"{s}\": `{}` is not a sweep key (data_fraction, label_fraction, global_batch, seed)",
                k.trim()
            )
        })?;
        let value = parse_value(key, v.trim())
            .ok_or_else(|| format!("`from` = \"{s}\": `{}` is not a value of {}", v.trim(), key.name()))?;
        if select.iter().any(|(k2, _)| *k2 == key) {
            return Err(format!("`from` = \"{s}\": {} is given twice", key.name()));
        }
        select.push((key, value));
    }
    Ok(FromRef::Run { base: base.to_string(), select })
}

fn parse_value(key: SweepKey, v: &str) -> Option<SweepValue> {
    match key {
        SweepKey::DataFraction | SweepKey::LabelFraction => v.parse::<f64>().ok().map(SweepValue::Fraction),
        SweepKey::GlobalBatch | SweepKey::Seed => v.parse::<u64>().ok().map(SweepValue::Count),
    }
}

fn list_kinds(kinds: &[RunKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    names.join(", ")
}

/// The run's own sweep axes, in `SweepKey::ALL` order.
fn axes(c: &mut Checker<'_>, name: &str, kind: RunKind, raw: &RawRun, s: &Spanned<RawSweep>) -> Vec<Axis> {
    let s = s.get_ref();
    let mut out = Vec::new();
    let fractions = [(SweepKey::DataFraction, &s.data_fraction), (SweepKey::LabelFraction, &s.label_fraction)];
    let counts = [(SweepKey::GlobalBatch, &s.global_batch), (SweepKey::Seed, &s.seed)];
    let set_in_run = |key: SweepKey| raw.settings_set().iter().any(|(k, _)| *k == key.name());
    let check_key = |c: &mut Checker<'_>, key: SweepKey, span: &Range<usize>, len: usize| -> bool {
        let kinds = setting_kinds(key.name()).unwrap_or(&[]);
        if !kinds.contains(&kind) {
            c.at_span(
                span,
                format!("sweep over `{}` does not apply to a {kind} run (only to {})", key.name(), list_kinds(kinds)),
            );
            return false;
        }
        if set_in_run(key) {
            c.at_span(span, format!("`{}` is both set and swept in run `{name}`: keep one", key.name()));
            return false;
        }
        if len == 0 {
            c.at_span(span, format!("sweep over `{}` lists no values", key.name()));
            return false;
        }
        true
    };
    for (key, v) in fractions {
        let Some(v) = v else { continue };
        if !check_key(c, key, &v.span(), v.get_ref().len()) {
            continue;
        }
        let mut values = Vec::new();
        for &x in v.get_ref() {
            let x = Spanned::new(v.span(), x);
            if let Some(x) = c.fraction(&x, key.name()) {
                values.push(SweepValue::Fraction(x));
            }
        }
        push_axis(c, &mut out, key, values, &v.span());
    }
    for (key, v) in counts {
        let Some(v) = v else { continue };
        if !check_key(c, key, &v.span(), v.get_ref().len()) {
            continue;
        }
        let mut values = Vec::new();
        for &x in v.get_ref() {
            if key == SweepKey::GlobalBatch && x == 0 {
                c.at(v, "`global_batch` = 0 must be at least 1");
                continue;
            }
            values.push(SweepValue::Count(x));
        }
        push_axis(c, &mut out, key, values, &v.span());
    }
    out
}

fn push_axis(c: &mut Checker<'_>, out: &mut Vec<Axis>, key: SweepKey, values: Vec<SweepValue>, span: &Range<usize>) {
    for (i, v) in values.iter().enumerate() {
        if values[..i].contains(v) {
            c.at_span(span, format!("sweep over `{}` lists {v} twice", key.name()));
            return;
        }
    }
    out.push(Axis { key, values });
}

/// The run's settings, `[defaults]` already applied. `own(key)`: the run sets it itself (a
/// default that does not fit the run's other settings is not used, not an error).
fn settings(
    c: &mut Checker<'_>,
    name: &str,
    name_v: &Spanned<String>,
    kind: RunKind,
    m: &RawRun,
    own: &dyn Fn(&str) -> bool,
    data: &Datasets,
) -> Option<RunSpec> {
    let dataset = match &m.dataset {
        None => {
            c.at(name_v, format!("run `{name}` has no `dataset` (set it in the run or in [defaults])"));
            return None;
        }
        Some(d) => {
            if !data.kinds.contains_key(d.get_ref()) {
                c.at(d, format!("unknown dataset `{}` ({})", d.get_ref(), have_datasets(data)));
                return None;
            }
            d
        }
    };
    let ds_kind = data.kinds[dataset.get_ref()];
    if matches!(kind, RunKind::PretrainCls | RunKind::Retrieval | RunKind::TextToImage) && ds_kind != DatasetKind::Mimic
    {
        c.at(dataset, format!("a {kind} run needs reports: only mimic has them, not `{}`", dataset.get_ref()));
    }
    let test = if matches!(kind, RunKind::PretrainCls | RunKind::TextToImage) {
        Vec::new()
    } else {
        match &m.test {
            None => vec![EvalSplit { dataset: dataset.get_ref().clone(), split: Split::Test }],
            Some(t) => test_splits(c, kind, dataset.get_ref(), t, data),
        }
    };
    let views = m.views.as_ref().map_or(Views::All, |v| v.get_ref().0 .0.clone());
    let seed = m.seed.as_ref().map_or(0, |v| *v.get_ref());
    // Every part is checked before any is given up on, so that one pass reports all problems.
    let job = match kind {
        RunKind::PretrainCls => {
            let train = training(c, name, name_v, m, own);
            let data_fraction = m.data_fraction.as_ref().map_or(Some(1.0), |v| c.fraction(v, "data_fraction"));
            let augment = m.augment.as_ref().map_or(Some(Augment::PAPER), |a| augment(c, a));
            let sections = m.sections.as_ref().map_or(SectionPolicy::Paper, |v| v.get_ref().0);
            Job::PretrainCls { train: train?, data_fraction: data_fraction?, sections, augment: augment? }
        }
        RunKind::Finetune => {
            let train = training(c, name, name_v, m, own);
            let label_fraction = m.label_fraction.as_ref().map_or(Some(1.0), |v| c.fraction(v, "label_fraction"));
            let augment = m.augment.as_ref().map_or(Some(Augment::PAPER), |a| augment(c, a));
            let pos_weight = m.pos_weight.as_ref().is_none_or(|v| *v.get_ref());
            // `Some(None)`: not set (the run's lr); `None`: set and refused.
            let head_lr = match &m.head_lr {
                None => Some(None),
                Some(v) => c.positive(v, "head_lr").map(Some),
            };
            Job::Finetune {
                train: train?,
                label_fraction: label_fraction?,
                pos_weight,
                head_lr: head_lr?,
                augment: augment?,
            }
        }
        RunKind::LinearProbe => {
            let label_fraction = m.label_fraction.as_ref().map_or(Some(1.0), |v| c.fraction(v, "label_fraction"));
            let grid = m.probe_grid.as_ref().map_or(Some(DEFAULT_PROBE_GRID), |g| probe_grid(c, g));
            Job::LinearProbe { label_fraction: label_fraction?, grid: grid? }
        }
        RunKind::ZeroShot => {
            Job::ZeroShot { templates: m.templates.as_ref().map_or(Some(Templates::default()), |t| templates(c, t))? }
        }
        RunKind::Retrieval => {
            Job::Retrieval { sections: m.sections.as_ref().map_or(SectionPolicy::Paper, |v| v.get_ref().0) }
        }
        RunKind::TextToImage => {
            let steps = m.image_steps.as_ref().map_or(Some(TEXT_TO_IMAGE_STEPS), |v| c.count(v, "image_steps", 1));
            let size = m.image_size.as_ref().map_or(Some(TEXT_TO_IMAGE_SIZE), |v| image_size(c, v));
            let findings = match &m.findings {
                None => Some(TEXT_TO_IMAGE_FINDINGS.iter().map(|s| s.to_string()).collect()),
                Some(f) => findings(c, f, data.specs.get(dataset.get_ref())),
            };
            Job::TextToImage { findings: findings?, steps: steps?, size: size? }
        }
    };
    Some(RunSpec {
        name: name.to_string(),
        base: name.to_string(),
        line: c.line_of(name_v),
        from: Start::Random, // set by `expand`
        dataset: dataset.get_ref().clone(),
        test,
        views,
        seed,
        sweep: Vec::new(),
        job,
    })
}

/// `image_size`: the generated images' side (checked against the patch size when the run
/// loads its model).
fn image_size(c: &mut Checker<'_>, v: &Spanned<u64>) -> Option<usize> {
    let x = *v.get_ref();
    if (8..=crate::imagine::MAX_SIZE as u64).contains(&x) {
        Some(x as usize)
    } else {
        c.at(v, format!("`image_size` = {x} is outside 8..={}", crate::imagine::MAX_SIZE));
        None
    }
}

/// `findings`: labels the dataset has, each once.
fn findings(c: &mut Checker<'_>, f: &Spanned<Vec<String>>, spec: Option<&DatasetSpec>) -> Option<Vec<String>> {
    if f.get_ref().is_empty() {
        c.at(f, "`findings` lists no label (leave it out for the paper's four)");
        return None;
    }
    let mut ok = true;
    for (k, l) in f.get_ref().iter().enumerate() {
        if data::labels::label_index(l).is_none() || spec.is_some_and(|s| !s.labels.contains(l)) {
            c.at(f, format!("`findings`: `{l}` is not a label of the run's dataset"));
            ok = false;
        } else if f.get_ref()[..k].contains(l) {
            c.at(f, format!("`findings` lists `{l}` twice"));
            ok = false;
        }
    }
    ok.then(|| f.get_ref().clone())
}

fn have_datasets(data: &Datasets) -> String {
    if data.kinds.is_empty() {
        "[data] names none".into()
    } else {
        let v: Vec<&str> = data.kinds.keys().map(|s| s.as_str()).collect();
        format!("[data] has: {}", v.join(", "))
    }
}

/// `test = ["mimic:test", ...]`.
fn test_splits(
    c: &mut Checker<'_>,
    kind: RunKind,
    train: &str,
    t: &Spanned<Vec<String>>,
    data: &Datasets,
) -> Vec<EvalSplit> {
    if t.get_ref().is_empty() {
        c.at(t, "`test` lists no splits (leave it out for the dataset's test split)");
    }
    let mut out: Vec<EvalSplit> = Vec::new();
    for s in t.get_ref() {
        let Some((ds, split)) = s.split_once(':') else {
            c.at(t, format!("`test` entry \"{s}\": write dataset:split, such as \"mimic:test\""));
            continue;
        };
        let Some(&ds_kind) = data.kinds.get(ds) else {
            c.at(t, format!("`test` entry \"{s}\": unknown dataset `{ds}` ({})", have_datasets(data)));
            continue;
        };
        let Some(split) = Split::parse(split) else {
            c.at(t, format!("`test` entry \"{s}\": unknown split `{split}` (train, valid or test)"));
            continue;
        };
        let e = EvalSplit { dataset: ds.to_string(), split };
        if out.contains(&e) {
            c.at(t, format!("`test` lists {e} twice"));
            continue;
        }
        if kind == RunKind::Retrieval && ds_kind != DatasetKind::Mimic {
            c.at(t, format!("`test` entry \"{s}\": retrieval needs reports: only mimic has them"));
        }
        // A head (finetune) or probe (linear-probe) trained on one dataset scores only its labels.
        if matches!(kind, RunKind::Finetune | RunKind::LinearProbe) && ds != train {
            if let (Some(a), Some(b)) = (data.specs.get(ds), data.specs.get(train)) {
                let missing: Vec<&str> =
                    a.labels.iter().filter(|l| !b.labels.contains(l)).map(|s| s.as_str()).collect();
                if !missing.is_empty() {
                    c.at(
                        t,
                        format!(
                            "`test` entry \"{s}\": a {kind} trained on `{train}` has no {} to score on `{ds}`",
                            missing.join(", ")
                        ),
                    );
                }
            }
        }
        out.push(e);
    }
    out
}
