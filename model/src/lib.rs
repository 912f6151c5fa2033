//! The CLIP model of cxrclip: configuration (Hugging Face `CLIPConfig` shape), parameters,
//! forward and backward written once over `kernels::Backend`, checkpoints, tokenizer,
//! optimiser and schedules.

pub mod checkpoint;
pub mod clip;
pub mod collectives;
pub mod config;
pub mod freeze;
pub mod gradcache;
pub mod head;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod params;
pub mod schedule;
pub mod step;
#[doc(hidden)]
pub mod testkit;
pub mod tokenizer;

pub use clip::Clip;
pub use config::ClipConfig;
pub mod train_state;
