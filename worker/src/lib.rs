//! One rank of a cxrclip run: collectives ([`comm`]: the TCP ring and NCCL behind the step's
//! `model::collectives::Collectives`; the step itself is `model::step`), the jobs the
//! coordinator hands out ([`job`]: contrastive training, [`finetune`], [`embed`]), their data
//! feed ([`feed`]), the job's training choices made concrete
//! ([`train_opts`]), the command line that runs them ([`cli`]), its connection to the
//! coordinator ([`rpc`]) and its [`Device`].

pub mod cli;
pub mod comm;
pub mod device;
pub mod embed;
pub mod failure;
pub mod fault;
pub mod feed;
pub mod finetune;
pub mod job;
pub mod memory;
pub mod rpc;
pub mod train_opts;

pub use device::Device;
