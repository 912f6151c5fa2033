//! One rank of a cxrclip run: collectives ([`comm`]), the exact data-parallel CLS step
//! ([`dist`]), the training job the coordinator hands out ([`job`]) and its data feed ([`feed`]),
//! and the command line that runs them ([`cli`]).

pub mod cli;
pub mod comm;
pub mod dist;
pub mod embed;
pub mod feed;
pub mod finetune;
pub mod grad_sum;
pub mod job;
