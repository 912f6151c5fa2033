//! Evaluation statistics and the linear probe, independent of workers and the coordinator:
//! ROC AUC and average precision ([`auc`]), a split's predictions and `predictions.csv`
//! ([`predictions`]), patient-bootstrap intervals and paired differences ([`bootstrap`]),
//! retrieval recall@K ([`retrieval`]), the linear probe ([`probe`]) and zero-shot scores
//! ([`zeroshot`]).

pub mod auc;
pub mod bootstrap;
pub mod predictions;
pub mod probe;
pub mod retrieval;
pub mod zeroshot;

pub use auc::{average_precision, roc_auc, roc_curve};
pub use bootstrap::{macro_auc_ci, paired_difference, BootstrapConfig, Difference, MacroAucCi};
pub use predictions::{MacroAp, MacroAuc, Predictions};
pub use probe::{fit_logistic, log_grid, FeatureSet, LabelModel, LinearProbe, LogisticFit, ProbeConfig, ProbeReport};
pub use retrieval::{retrieval, retrieval_ranks, Recall, Retrieval, RetrievalRanks};
