//! The settings of one kind of run, typed and range-checked: a training run's optimisation, the
//! augmentation, the probe's grid, the zero-shot prompts. A value out of range is recorded at its
//! line and gives `None`.

use toml::Spanned;

use super::schema::{RawAugment, RawMode, RawRun, RawSchedule, RawTemplates};
use super::spec::{Augment, Length, Mode, ProbeGrid, Schedule, Templates, Training};
use super::values::Checker;

/// Defaults of the settings a plan leaves out: the paper's optimisation (batch 192, lr 3e-4,
/// AdamW (0.9, 0.98), eps 1e-6, weight decay 0.2, one-cycle with 5% warm-up).
pub const DEFAULT_GLOBAL_BATCH: u64 = 192;
pub const DEFAULT_LR: f64 = 3e-4;
pub const DEFAULT_WARMUP_FRACTION: f64 = 0.05;
pub const DEFAULT_BETAS: [f64; 2] = [0.9, 0.98];
pub const DEFAULT_EPS: f64 = 1e-6;
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.2;
pub const DEFAULT_ADAPTER_WIDTH: u64 = 256;
pub const DEFAULT_PROBE_GRID: ProbeGrid = ProbeGrid { low: 1e-3, high: 1e3, count: 13 };

/// A training run's optimisation; `own(key)`: the run sets the key itself (not [defaults]).
pub fn training(
    c: &mut Checker<'_>,
    name: &str,
    name_v: &Spanned<String>,
    m: &RawRun,
    own: &dyn Fn(&str) -> bool,
) -> Option<Training> {
    let length = match (&m.epochs, &m.steps) {
        (Some(e), Some(s)) => {
            // One of them may come from [defaults]: the run's own wins.
            match (own("epochs"), own("steps")) {
                (true, false) => c.count(e, "epochs", 1).map(|n| Length::Epochs(n as u64)),
                (false, true) => c.count(s, "steps", 1).map(|n| Length::Steps(n as u64)),
                _ => {
                    c.at(s, "set `epochs` or `steps`, not both");
                    None
                }
            }
        }
        (Some(e), None) => c.count(e, "epochs", 1).map(|n| Length::Epochs(n as u64)),
        (None, Some(s)) => c.count(s, "steps", 1).map(|n| Length::Steps(n as u64)),
        (None, None) => {
            c.at(name_v, format!("run `{name}` needs `epochs` or `steps`"));
            None
        }
    };
    let global_batch =
        m.global_batch.as_ref().map_or(Some(DEFAULT_GLOBAL_BATCH as usize), |v| c.count(v, "global_batch", 1));
    let micro_batch = match &m.micro_batch {
        None => Some(None),
        Some(v) => c.count(v, "micro_batch", 1).map(Some),
    };
    let lr = m.lr.as_ref().map_or(Some(DEFAULT_LR), |v| c.positive(v, "lr"));
    let schedule = match m.schedule.as_ref().map_or(RawSchedule::OneCycle, |s| *s.get_ref()) {
        RawSchedule::OneCycle => {
            if let (Some(w), true) = (&m.warmup, own("warmup")) {
                c.at(w, "`warmup` (steps) goes with schedule = \"cosine\"; one-cycle takes `warmup_fraction`");
            }
            let f = m
                .warmup_fraction
                .as_ref()
                .map_or(Some(DEFAULT_WARMUP_FRACTION), |v| c.in_range(v, "warmup_fraction", 0.0, 1.0));
            f.map(|warmup_fraction| Schedule::OneCycle { warmup_fraction })
        }
        RawSchedule::Cosine => {
            if let (Some(w), true) = (&m.warmup_fraction, own("warmup_fraction")) {
                c.at(w, "`warmup_fraction` goes with schedule = \"one-cycle\"; cosine takes `warmup` (steps)");
            }
            Some(Schedule::Cosine { warmup: m.warmup.as_ref().map_or(0, |v| *v.get_ref()) })
        }
    };
    let betas = match &m.betas {
        None => Some(DEFAULT_BETAS),
        Some(b) => {
            let [b1, b2] = *b.get_ref();
            if (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2) {
                Some([b1, b2])
            } else {
                c.at(b, format!("`betas` = [{b1}, {b2}]: each must be in [0, 1)"));
                None
            }
        }
    };
    let eps = m.eps.as_ref().map_or(Some(DEFAULT_EPS), |v| c.positive(v, "eps"));
    let weight_decay =
        m.weight_decay.as_ref().map_or(Some(DEFAULT_WEIGHT_DECAY), |v| c.non_negative(v, "weight_decay"));
    let mode = match m.mode.as_ref().map_or(RawMode::Full, |v| *v.get_ref()) {
        RawMode::Full => {
            if let (Some(w), true) = (&m.adapter_width, own("adapter_width")) {
                c.at(w, "`adapter_width` goes with mode = \"adapters\"");
            }
            Some(Mode::Full)
        }
        RawMode::Adapters => m
            .adapter_width
            .as_ref()
            .map_or(Some(DEFAULT_ADAPTER_WIDTH as usize), |v| c.count(v, "adapter_width", 1))
            .map(|width| Mode::Adapters { width }),
    };
    Some(Training {
        length: length?,
        global_batch: global_batch?,
        micro_batch: micro_batch?,
        lr: lr?,
        schedule: schedule?,
        betas: betas?,
        eps: eps?,
        weight_decay: weight_decay?,
        mode: mode?,
    })
}

pub fn augment(c: &mut Checker<'_>, a: &Spanned<RawAugment>) -> Option<Augment> {
    let t = match a.get_ref() {
        RawAugment::Switch(true) => return Some(Augment::PAPER),
        RawAugment::Switch(false) => return Some(Augment::NONE),
        RawAugment::Table(t) => t,
    };
    let p = Augment::PAPER;
    let rotate = t.rotate.as_ref().map_or(Some(p.rotate), |v| c.in_range(v, "augment.rotate", 0.0, 180.0));
    let translate = t.translate.as_ref().map_or(Some(p.translate), |v| c.in_range(v, "augment.translate", 0.0, 0.5));
    let scale = match &t.scale {
        None => Some(p.scale),
        Some(s) => {
            let [lo, hi] = *s.get_ref();
            if lo > 0.0 && lo <= hi && hi.is_finite() {
                Some([lo, hi])
            } else {
                c.at(s, format!("`augment.scale` = [{lo}, {hi}]: need 0 < low <= high"));
                None
            }
        }
    };
    let shuffle_sentences = t.shuffle_sentences.as_ref().map_or(p.shuffle_sentences, |v| *v.get_ref());
    Some(Augment { rotate: rotate?, scale: scale?, translate: translate?, shuffle_sentences })
}

pub fn probe_grid(c: &mut Checker<'_>, g: &Spanned<(f64, f64, u64)>) -> Option<ProbeGrid> {
    let (low, high, count) = *g.get_ref();
    let ok = low > 0.0 && high >= low && high.is_finite() && count >= 1 && (count == 1) == (low == high);
    if !ok {
        c.at(
            g,
            format!("`probe_grid` = [{low}, {high}, {count}]: need 0 < low < high and count >= 2 (or low = high and count = 1)"),
        );
        return None;
    }
    Some(ProbeGrid { low, high, count: count as usize })
}

pub fn templates(c: &mut Checker<'_>, t: &Spanned<RawTemplates>) -> Option<Templates> {
    let d = Templates::default();
    let raw = t.get_ref();
    let mut ok = true;
    let mut list = |c: &mut Checker<'_>, v: &Option<Spanned<Vec<String>>>, key: &str, default: Vec<String>| {
        let Some(v) = v else { return default };
        if v.get_ref().is_empty() {
            c.at(v, format!("`templates.{key}` lists no prompt"));
            ok = false;
        }
        for p in v.get_ref() {
            if !p.contains("{label}") {
                c.at(v, format!("`templates.{key}` prompt \"{p}\" has no {{label}}"));
                ok = false;
            }
        }
        v.get_ref().clone()
    };
    let positive = list(c, &raw.positive, "positive", d.positive);
    let negative = list(c, &raw.negative, "negative", d.negative);
    if positive.len() != negative.len() {
        let span = raw.negative.as_ref().or(raw.positive.as_ref()).map(|v| v.span()).unwrap_or(t.span());
        c.at_span(
            &span,
            format!(
                "`templates`: {} positive and {} negative prompts; they pair up by position, so give as many of each",
                positive.len(),
                negative.len()
            ),
        );
        ok = false;
    }
    let neutral = match &raw.neutral {
        None => d.neutral,
        Some(n) => {
            if n.get_ref().trim().is_empty() || n.get_ref().contains("{label}") {
                c.at(n, "`templates.neutral` must be a prompt without {label}");
                ok = false;
            }
            n.get_ref().clone()
        }
    };
    ok.then_some(Templates { positive, negative, neutral })
}
