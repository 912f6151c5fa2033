//! The plan file as written: serde structs that refuse unknown keys, with the span of every value
//! kept so that later checks can name its line. Nothing here judges values; `validate` does.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::error::{PlanError, Source};
use super::spec::RunKind;

/// The whole file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPlan {
    #[serde(default)]
    pub data: BTreeMap<Spanned<String>, Spanned<RawDataset>>,
    pub model: Option<Spanned<RawModel>>,
    pub defaults: Option<Spanned<RawRun>>,
    #[serde(default)]
    pub run: Vec<Spanned<RawRun>>,
}

/// Parses the text; the toml crate stops at the first problem, so this gives one error at most.
pub fn parse(src: &Source<'_>) -> Result<RawPlan, PlanError> {
    toml::from_str(src.text).map_err(|e| {
        let line = e.span().map(|s| src.line(s.start));
        PlanError { file: src.name.to_string(), line, message: e.message().trim().to_string() }
    })
}

/// A dataset: a path, or a table.
#[derive(Debug, Clone)]
pub enum RawDataset {
    Path(String),
    Table(Box<RawDatasetTable>),
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDatasetTable {
    pub path: Option<Spanned<String>>,
    pub synthetic: Option<Spanned<u64>>,
    pub size: Option<Spanned<u64>>,
    pub seed: Option<Spanned<u64>>,
    pub labels: Option<Spanned<Vec<String>>>,
    pub uncertain: Option<Spanned<Parsed<data::UncertainPolicy>>>,
    pub split: Option<Spanned<RawRsnaSplit>>,
    pub valid_fraction: Option<Spanned<f64>>,
    pub test_fraction: Option<Spanned<f64>>,
}

impl<'de> Deserialize<'de> for RawDataset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawDataset;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a path, or a table such as { path = \"...\" } or { synthetic = 600 }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDataset, E> {
                Ok(RawDataset::Path(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawDataset, A::Error> {
                RawDatasetTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| RawDataset::Table(Box::new(t)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum RawRsnaSplit {
    Grouped,
    Rows,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub init: Option<Spanned<String>>,
    pub image: Option<Spanned<u64>>,
    pub patch: Option<Spanned<u64>>,
    pub width: Option<Spanned<u64>>,
    pub layers: Option<Spanned<u64>>,
    pub heads: Option<Spanned<u64>>,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RawKind {
    PretrainCls,
    Finetune,
    LinearProbe,
    ZeroShot,
    Retrieval,
    TextToImage,
}

impl RawKind {
    pub fn kind(self) -> RunKind {
        match self {
            RawKind::PretrainCls => RunKind::PretrainCls,
            RawKind::Finetune => RunKind::Finetune,
            RawKind::LinearProbe => RunKind::LinearProbe,
            RawKind::ZeroShot => RunKind::ZeroShot,
            RawKind::Retrieval => RunKind::Retrieval,
            RawKind::TextToImage => RunKind::TextToImage,
        }
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RawSchedule {
    OneCycle,
    Cosine,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RawMode {
    Full,
    Adapters,
}

/// `[run.sweep]`: lists of values, expanded as a cartesian product.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSweep {
    pub data_fraction: Option<Spanned<Vec<f64>>>,
    pub label_fraction: Option<Spanned<Vec<f64>>>,
    pub global_batch: Option<Spanned<Vec<u64>>>,
    pub seed: Option<Spanned<Vec<u64>>>,
}

/// `augment = false`, `true` (the paper's), or a table of strengths.
#[derive(Debug, Clone)]
pub enum RawAugment {
    Switch(bool),
    Table(RawAugmentTable),
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAugmentTable {
    pub rotate: Option<Spanned<f64>>,
    pub scale: Option<Spanned<[f64; 2]>>,
    pub translate: Option<Spanned<f64>>,
    pub shuffle_sentences: Option<Spanned<bool>>,
}

impl<'de> Deserialize<'de> for RawAugment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAugment;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a table such as { rotate = 45.0, scale = [0.9, 1.1] }")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawAugment, E> {
                Ok(RawAugment::Switch(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawAugment, A::Error> {
                RawAugmentTable::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawAugment::Table)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTemplates {
    pub positive: Option<Spanned<Vec<String>>>,
    pub negative: Option<Spanned<Vec<String>>>,
    pub neutral: Option<Spanned<String>>,
}

/// Generates `RawRun` (one `[[run]]` table, or `[defaults]`) and the table of which kinds each
/// setting applies to, from one list, so that the two cannot drift apart.
macro_rules! run_keys {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty => $kinds:expr ;)*) => {
        #[derive(Deserialize, Debug, Clone, Default)]
        #[serde(deny_unknown_fields)]
        pub struct RawRun {
            pub name: Option<Spanned<String>>,
            pub kind: Option<Spanned<RawKind>>,
            pub from: Option<Spanned<String>>,
            pub sweep: Option<Spanned<RawSweep>>,
            $( $(#[doc = $doc])* pub $field: Option<Spanned<$ty>>, )*
        }

        /// Every setting key (all but name, kind, from and sweep) with the kinds it applies to.
        pub const SETTINGS: &[(&str, &[RunKind])] = &[ $( (stringify!($field), $kinds), )* ];

        impl RawRun {
            /// The settings this table sets, with their spans, in declaration order.
            pub fn settings_set(&self) -> Vec<(&'static str, Range<usize>)> {
                let mut v = Vec::new();
                $( if let Some(x) = &self.$field { v.push((stringify!($field), x.span())); } )*
                v
            }

            /// Takes each setting this table lacks from `defaults`, where `take(key)` says so.
            pub fn fill_from(&mut self, defaults: &RawRun, take: impl Fn(&str) -> bool) {
                $(
                    if self.$field.is_none() && defaults.$field.is_some() && take(stringify!($field)) {
                        self.$field = defaults.$field.clone();
                    }
                )*
            }
        }
    };
}

use RunKind::{Finetune as F, LinearProbe as L, PretrainCls as P, Retrieval as R, TextToImage as T, ZeroShot as Z};

run_keys! {
    dataset: String => &[P, F, L, Z, R, T];
    test: Vec<String> => &[F, L, Z, R];
    seed: u64 => &[P, F, L, Z, R, T];
    views: Parsed<ViewsKey> => &[P, F, L, Z, R, T];
    epochs: u64 => &[P, F];
    steps: u64 => &[P, F];
    global_batch: u64 => &[P, F];
    micro_batch: u64 => &[P, F];
    lr: f64 => &[P, F];
    schedule: RawSchedule => &[P, F];
    warmup_fraction: f64 => &[P, F];
    warmup: u64 => &[P, F];
    betas: [f64; 2] => &[P, F];
    eps: f64 => &[P, F];
    weight_decay: f64 => &[P, F];
    mode: RawMode => &[P, F];
    adapter_width: u64 => &[P, F];
    augment: RawAugment => &[P, F];
    sections: Parsed<data::report::SectionPolicy> => &[P, R];
    data_fraction: f64 => &[P];
    label_fraction: f64 => &[F, L];
    pos_weight: bool => &[F];
    head_lr: f64 => &[F];
    probe_grid: (f64, f64, u64) => &[L];
    templates: RawTemplates => &[Z];
    findings: Vec<String> => &[T];
    image_size: u64 => &[T];
    image_steps: u64 => &[T];
}

/// The kinds a setting applies to (`None`: not a setting).
pub fn setting_kinds(key: &str) -> Option<&'static [RunKind]> {
    SETTINGS.iter().find(|(k, _)| *k == key).map(|(_, kinds)| *kinds)
}

/// A value read from a string through its `FromStr` (the data crate's policies).
#[derive(Debug, Clone)]
pub struct Parsed<T>(pub T);

impl<'de, T: FromStr<Err = String>> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// `views`: "all" or a comma-separated list, with a message that speaks of the plan key.
#[derive(Debug, Clone)]
pub struct ViewsKey(pub data::Views);

impl FromStr for ViewsKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.split(',').all(|v| v.trim().is_empty()) {
            return Err("views needs \"all\" or a list such as \"PA,AP\"".into());
        }
        s.parse().map(ViewsKey)
    }
}
