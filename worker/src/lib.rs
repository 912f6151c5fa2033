//! One rank of a cxrclip run: collectives ([`comm`]), the exact data-parallel CLS step
//! ([`dist`]), the training job the coordinator hands out ([`job`]), its data feed ([`feed`]) and
//! the job's training choices made concrete ([`train_opts`]).

pub mod comm;
pub mod dist;
pub mod feed;
pub mod grad_sum;
pub mod job;
pub mod train_opts;
