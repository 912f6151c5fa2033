//! One rank of a cxrclip run: collectives ([`comm`]), the exact data-parallel CLS step
//! ([`dist`]), the training job the coordinator hands out ([`job`]) and its data feed ([`feed`]).

pub mod comm;
pub mod dist;
pub mod feed;
pub mod grad_sum;
pub mod job;
