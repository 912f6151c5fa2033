//! Collectives behind one trait: a ring over TCP for CPU ranks ([`ring::TcpRing`]) and NCCL for
//! GPU ranks ([`nccl::NcclComm`]).
//!
//! Buffers are host `f32` slices. Sums follow a fixed order (the ring order), so a world of a
//! given size reproduces its results bit for bit from run to run.

pub mod nccl;
pub mod ring;

use anyhow::Result;

pub use nccl::{nccl_library, NcclComm, NcclDeviceSum};
pub use ring::{RingHello, TcpRing};

pub trait Collectives: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `recv[k*n .. (k+1)*n]` = rank k's `send` (`n = send.len()`, `recv.len() = world * n`).
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums `send` (`world * n` values) over the ranks and keeps chunk `rank` (`n` values) in
    /// `recv`.
    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums `buf` over the ranks, in place.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Copies `buf` of rank `root` to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has entered it.
    fn barrier(&mut self) -> Result<()>;
}

/// Element ranges of `world` near-equal chunks of `len` (the first `len % world` one longer).
pub fn chunks(len: usize, world: usize) -> Vec<std::ops::Range<usize>> {
    let (q, r) = (len / world, len % world);
    let mut out = Vec::with_capacity(world);
    let mut start = 0;
    for k in 0..world {
        let n = q + usize::from(k < r);
        out.push(start..start + n);
        start += n;
    }
    out
}
