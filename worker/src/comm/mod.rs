//! The ranks' collectives: the step's interface is `model::collectives::Collectives`, over the
//! backend's tensors. GPU ranks implement it with NCCL on device buffers ([`nccl::NcclComm`]);
//! CPU ranks with a ring over TCP ([`ring::TcpRing`]), a [`HostCollectives`] transport on host
//! slices that [`host::OverHost`] stages tensors through.
//!
//! The ring's sums follow a fixed order (the ring order), so a world of a given size reproduces
//! its results bit for bit from run to run.

pub mod host;
pub mod nccl;
pub mod ring;

use anyhow::Result;

pub use host::OverHost;
pub use nccl::{nccl_library, NcclComm};
pub use ring::{RingHello, TcpRing};

/// A transport of host `f32` slices between the ranks.
pub trait HostCollectives: Send {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `recv[k*n .. (k+1)*n]` = rank k's `send` (`n = send.len()`, `recv.len() = world * n`).
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums `send` (`world * n` values) over the ranks and keeps chunk `rank` (`n` values) in
    /// `recv`.
    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Sums `buf` over the ranks, in place.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()>;
    /// The elementwise maximum of `buf` over the ranks, in place (NaN if any rank has one).
    fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Copies `buf` of rank `root` to every rank.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has entered it.
    fn barrier(&mut self) -> Result<()>;
}

type AbortHook = Box<dyn FnOnce() + Send>;
static ABORT_HOOKS: std::sync::Mutex<Vec<AbortHook>> = std::sync::Mutex::new(Vec::new());

/// Registers `hook` to run on [`abort_all`] (a communicator's abort).
pub fn on_abort(hook: AbortHook) {
    ABORT_HOOKS.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
}

/// Aborts every communicator of this process, before it exits on the coordinator's order:
/// a thread blocked in an NCCL collective whose peer is gone would otherwise never return
/// (NCCL has no timeout), and the process's exit could wait on it. Callable from any thread.
pub fn abort_all() {
    let hooks = std::mem::take(&mut *ABORT_HOOKS.lock().unwrap_or_else(|e| e.into_inner()));
    for h in hooks {
        h();
    }
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
