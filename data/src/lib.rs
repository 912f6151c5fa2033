//! cxrclip's data: readers for MIMIC-CXR-JPG, CheXpert and RSNA Pneumonia as distributed, report
//! sections, label policies, a synthetic radiograph generator that writes all three layouts,
//! packed image shards and the training loader.

pub mod csvio;
pub mod dicom;
pub mod labels;
pub mod synth;

pub use labels::{LabelValue, UncertainPolicy, LABELS, NUM_LABELS};
pub mod chexpert;
pub mod dataset;
pub mod mimic;
pub mod report;
pub mod rsna;
pub mod splits;
pub mod stats;

pub use dataset::{
    dataset_labels, default_eval_labels, read, Dataset, DatasetKind, Pair, ReadOptions, RsnaSplit, Split, Views,
};
pub mod imageio;
pub mod loader;
pub mod shards;
