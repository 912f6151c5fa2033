//! Collectives for GPU ranks through NCCL (cudarc, loaded at run time).
//!
//! Everything here is compiled on every machine; nothing touches a CUDA or NCCL entry point
//! before [`nccl_library`] has opened both (NCCL through `kernels::cuda::nccl_lib`, which finds
//! `libnccl.so.2` as the system package or NVIDIA's wheel installs it).
//!
//! One communicator serves two paths:
//! - [`Collectives`] on host slices (the loss's feature gathers, a few hundred KiB a step),
//!   staged through device buffers on a stream of their own;
//! - [`NcclDeviceSum`]: the gradient buckets summed in place in the model's device buffer, on
//!   the backend's communication stream, each after the compute that finished it
//!   ([`crate::grad_sum`]).
//!
//! Both are issued from the rank's one host thread in program order, the same on every rank,
//! which is what NCCL requires of calls on one communicator.
//!
//! **Written without a GPU**: compiled everywhere, never yet run on a device.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Weak};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use kernels::cuda::nccl_lib::{self, Nccl};
use kernels::{Cuda, Tensor};

use super::Collectives;
use crate::grad_sum::DeviceSum;

/// The CUDA driver and NCCL, opened; one line naming what is missing otherwise.
pub fn nccl_library() -> Result<&'static Nccl> {
    kernels::cuda::libs::ensure_driver()?;
    nccl_lib::nccl()
}

/// A new NCCL unique id (rank 0 makes it; the coordinator hands it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    let id = nccl_library()?.unique_id()?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator, aborted on drop (a rank that stops early must not leave the others'
/// collectives hanging on it) or earlier by [`super::abort_all`], from the heartbeat thread,
/// when the coordinator aborts the job while this rank's thread may be blocked in a collective.
struct RawComm {
    comm: AtomicPtr<c_void>,
    lib: &'static Nccl,
}

impl RawComm {
    /// The live communicator (null once aborted: NCCL then refuses the call).
    fn get(&self) -> nccl_lib::Comm {
        self.comm.load(Ordering::Acquire)
    }

    /// Aborts the communicator once, whoever calls first.
    fn abort(&self) {
        let c = self.comm.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !c.is_null() {
            // SAFETY: created by `comm_init_rank`; the swap makes this the only abort.
            let _ = unsafe { self.lib.comm_abort(c) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The communicator and its staging buffers.
struct Inner {
    comm: Arc<RawComm>,
    stream: Arc<CudaStream>,
    send: Option<CudaSlice<f32>>,
    recv: Option<CudaSlice<f32>>,
}

pub struct NcclComm {
    inner: Inner,
    rank: usize,
    world: usize,
}

impl NcclComm {
    /// Joins the communicator of `world` ranks identified by `id` (128 bytes) on GPU `ordinal`.
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let lib = nccl_library()?;
        ensure!(id.len() == 128, "an NCCL unique id has 128 bytes, got {}", id.len());
        let mut raw = nccl_lib::UniqueId { internal: [0; 128] };
        for (d, &b) in raw.internal.iter_mut().zip(id) {
            *d = b as std::ffi::c_char;
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("opening GPU {ordinal}: {e:?}"))?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating a stream on GPU {ordinal}: {e:?}"))?;
        let comm = Arc::new(RawComm { comm: AtomicPtr::new(lib.comm_init_rank(world, raw, rank)?), lib });
        let weak: Weak<RawComm> = Arc::downgrade(&comm);
        super::on_abort(Box::new(move || {
            if let Some(c) = weak.upgrade() {
                c.abort();
            }
        }));
        Ok(Self { inner: Inner { comm, stream, send: None, recv: None }, rank, world })
    }

    /// Sums gradient buckets in place on `be`'s device (the one this communicator was made on).
    pub fn device_sum(&self) -> NcclDeviceSum {
        NcclDeviceSum { comm: self.inner.comm.clone() }
    }

    /// Device buffers of at least `send` and `recv` elements, holding `host` at the front of
    /// the send buffer.
    fn stage(&mut self, host: &[f32], recv: usize) -> Result<()> {
        let s = &mut self.inner;
        let grow = |buf: &mut Option<CudaSlice<f32>>, n: usize| -> Result<()> {
            if buf.as_ref().is_none_or(|b| b.len() != n) {
                *buf = Some(s.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| anyhow!("GPU alloc: {e:?}"))?);
            }
            Ok(())
        };
        grow(&mut s.send, host.len())?;
        grow(&mut s.recv, recv)?;
        let dst = s.send.as_mut().expect("allocated");
        if !host.is_empty() {
            s.stream.memcpy_htod(host, dst).map_err(|e| anyhow!("copy to GPU: {e:?}"))?;
        }
        Ok(())
    }

    /// Runs `op(lib, send, recv, comm, stream)` on the staged buffers.
    fn run(
        &mut self,
        op: impl FnOnce(&Nccl, *const c_void, *mut c_void, nccl_lib::Comm, nccl_lib::Stream) -> Result<()>,
    ) -> Result<()> {
        let s = &mut self.inner;
        let stream = s.stream.clone();
        let (send, _g1) = s.send.as_ref().expect("staged").device_ptr(&stream);
        let (recv, _g2) = s.recv.as_mut().expect("staged").device_ptr_mut(&stream);
        op(s.comm.lib, send as *const _, recv as *mut _, s.comm.get(), stream.cu_stream() as nccl_lib::Stream)
    }

    fn fetch(&mut self, out: &mut [f32]) -> Result<()> {
        let s = &mut self.inner;
        if !out.is_empty() {
            s.stream
                .memcpy_dtoh(s.recv.as_ref().expect("allocated"), out)
                .map_err(|e| anyhow!("copy from GPU: {e:?}"))?;
        }
        s.stream.synchronize().map_err(|e| anyhow!("NCCL stream: {e:?}"))
    }
}

impl Collectives for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(recv.len() == send.len() * self.world, "all_gather: receive buffer of the wrong length");
        self.stage(send, recv.len())?;
        let n = send.len();
        // SAFETY: staged device buffers of `n` and `world * n` values on this communicator's GPU.
        self.run(|l, s, r, c, st| unsafe { l.all_gather(s, r, n, c, st) })?;
        self.fetch(recv)
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(send.len() == recv.len() * self.world, "reduce_scatter: send buffer of the wrong length");
        self.stage(send, recv.len())?;
        let n = recv.len();
        // SAFETY: as above, `world * n` values in, `n` out.
        self.run(|l, s, r, c, st| unsafe { l.reduce_scatter(s, r, n, c, st) })?;
        self.fetch(recv)
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        self.stage(buf, buf.len())?;
        let n = buf.len();
        // SAFETY: as above, `n` values each way.
        self.run(|l, s, r, c, st| unsafe { l.all_reduce(s, r, n, nccl_lib::SUM, c, st) })?;
        self.fetch(buf)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast: root {root} outside a world of {}", self.world);
        self.stage(buf, buf.len())?;
        let n = buf.len();
        // SAFETY: as above; only the root's send buffer is read.
        self.run(|l, s, r, c, st| unsafe { l.broadcast(s, r, n, root, c, st) })?;
        self.fetch(buf)
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce(&mut one)
    }
}

/// Sums gradient buckets in place in the model's device buffer on the backend's communication
/// stream (see [`DeviceSum`]).
pub struct NcclDeviceSum {
    comm: Arc<RawComm>,
}

impl DeviceSum<Cuda> for NcclDeviceSum {
    fn bucket(&mut self, be: &Cuda, grads: &Tensor<Cuda>, ranges: &[Range<usize>]) -> Result<()> {
        be.comm_waits_for_compute()?;
        let base = be.device_ptr(grads);
        let stream = be.comm_stream() as nccl_lib::Stream;
        if let Some(r) = ranges.iter().find(|r| r.end > grads.len()) {
            bail!("bucket {r:?} outside a gradient of {}", grads.len());
        }
        let (comm, lib) = (self.comm.get(), self.comm.lib);
        // The group is closed even when a call inside fails (see `Nccl::group`).
        lib.group(|| {
            for r in ranges {
                let p = (base + (r.start * std::mem::size_of::<f32>()) as u64) as *mut c_void;
                // SAFETY: an in-place sum of `r.len()` values inside the model's gradient buffer
                // on the device of this communicator; the comm stream waits for the compute above.
                unsafe { lib.all_reduce(p as *const _, p, r.len(), nccl_lib::SUM, comm, stream) }?;
            }
            Ok(())
        })
    }

    fn finish(&mut self, be: &Cuda) -> Result<()> {
        be.compute_waits_for_comm()
    }
}
