//! The CLIP model of cxrclip: configuration (Hugging Face `CLIPConfig` shape), parameters,
//! forward and backward written once over `kernels::Backend`, checkpoints, tokenizer,
//! optimiser and schedules.

pub mod config;
pub mod tokenizer;
