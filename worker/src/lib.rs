//! One rank of a cxrclip run: collectives ([`comm`]), the exact data-parallel CLS step
//! ([`dist`]), and the training job the coordinator hands out ([`job`]).

pub mod comm;
pub mod dist;
pub mod job;
