//! The coordinator's gRPC contract: `proto/cxrclip.proto`, compiled at build time by protox
//! (no `protoc` binary needed), with the prost messages and the tonic client and server.

pub mod v1 {
    tonic::include_proto!("cxrclip.v1");
}

/// The revision of the `cxrclip.v1` protocol this build speaks; a worker of another revision
/// is refused at registration with a message naming both. Revision 2 added `Job.options` (the
/// training mode, schedule, AdamW, augmentation and label policy), which an older worker would
/// ignore and train something else, and the job kinds (fine-tuning, feature extraction),
/// labelled shard entries and validation results.
pub const PROTOCOL_VERSION: u32 = 2;

/// The largest message either side accepts or sends (a shard chunk, the job, an NCCL id):
/// larger ones are refused, so a hostile peer cannot make the other allocate without bound.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Pair entries per shard chunk: an epoch's shard is streamed in chunks of this many.
pub const SHARD_CHUNK: usize = 1024;

pub use prost;
pub use tonic;
