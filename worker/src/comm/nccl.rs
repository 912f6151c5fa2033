//! Collectives for GPU ranks through NCCL (cudarc, loaded at run time).
//!
//! Everything here is compiled on every machine; nothing touches a CUDA or NCCL entry point
//! before [`nccl_available`] has said that both libraries load (cudarc panics on a missing
//! library). NVIDIA's wheels ship `libnccl.so.2` while cudarc opens `libnccl.so`: a link named
//! `libnccl.so` in a folder on `LD_LIBRARY_PATH` fixes that.
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

use std::ops::Range;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys as nsys, Id};
use kernels::{Cuda, Tensor};

use super::Collectives;
use crate::grad_sum::DeviceSum;

/// Whether both the CUDA driver and NCCL can be loaded here.
pub fn nccl_available() -> bool {
    // SAFETY: these only try to open the shared libraries; they call nothing in them.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

/// A new NCCL unique id (rank 0 makes it; the coordinator hands it to the others).
pub fn unique_id() -> Result<Vec<u8>> {
    ensure!(nccl_available(), "NCCL is not available here (libcuda and libnccl.so must both load)");
    let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId failed: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator, aborted on drop (a rank that stops early must not leave the others'
/// collectives hanging on it).
struct RawComm(nsys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every call goes through the rank's one thread (see the module docs).
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        // SAFETY: created by `comm_init_rank`, dropped once.
        let _ = unsafe { nccl::comm_abort(self.0) };
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

fn nccl_err(what: &str, e: nccl::NcclError) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {e:?}")
}

const F32: nsys::ncclDataType_t = nsys::ncclDataType_t::ncclFloat32;
const SUM: nsys::ncclRedOp_t = nsys::ncclRedOp_t::ncclSum;

impl NcclComm {
    /// Joins the communicator of `world` ranks identified by `id` (128 bytes) on GPU `ordinal`.
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        if !nccl_available() {
            bail!("NCCL is not available here (libcuda and libnccl.so must both load)");
        }
        ensure!(id.len() == 128, "an NCCL unique id has 128 bytes, got {}", id.len());
        let mut raw = [0 as std::ffi::c_char; 128];
        for (d, &b) in raw.iter_mut().zip(id) {
            *d = b as std::ffi::c_char;
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("opening GPU {ordinal}: {e:?}"))?;
        let stream = ctx.new_stream().map_err(|e| anyhow!("creating a stream on GPU {ordinal}: {e:?}"))?;
        let id = nsys::ncclUniqueId { internal: raw };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful init; the context is current on this thread.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, id, rank as i32)
                .map_err(|e| nccl_err("comm init", e))?;
            comm.assume_init()
        };
        Ok(Self { inner: Inner { comm: Arc::new(RawComm(comm)), stream, send: None, recv: None }, rank, world })
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

    /// Runs `op(send, recv, comm, stream)` on the staged buffers.
    fn run(
        &mut self,
        what: &str,
        op: impl FnOnce(
            *const std::ffi::c_void,
            *mut std::ffi::c_void,
            nsys::ncclComm_t,
            nsys::cudaStream_t,
        ) -> Result<(), nccl::NcclError>,
    ) -> Result<()> {
        let s = &mut self.inner;
        let stream = s.stream.clone();
        let (send, _g1) = s.send.as_ref().expect("staged").device_ptr(&stream);
        let (recv, _g2) = s.recv.as_mut().expect("staged").device_ptr_mut(&stream);
        op(send as *const _, recv as *mut _, s.comm.0, stream.cu_stream() as nsys::cudaStream_t)
            .map_err(|e| nccl_err(what, e))
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
        self.run("all_gather", |s, r, c, st| unsafe { nccl::all_gather(s, r, n, F32, c, st).map(drop) })?;
        self.fetch(recv)
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(send.len() == recv.len() * self.world, "reduce_scatter: send buffer of the wrong length");
        self.stage(send, recv.len())?;
        let n = recv.len();
        // SAFETY: as above, `world * n` values in, `n` out.
        self.run("reduce_scatter", |s, r, c, st| unsafe { nccl::reduce_scatter(s, r, n, F32, SUM, c, st).map(drop) })?;
        self.fetch(recv)
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        self.stage(buf, buf.len())?;
        let n = buf.len();
        // SAFETY: as above, `n` values each way.
        self.run("all_reduce", |s, r, c, st| unsafe { nccl::all_reduce(s, r, n, F32, SUM, c, st).map(drop) })?;
        self.fetch(buf)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast: root {root} outside a world of {}", self.world);
        self.stage(buf, buf.len())?;
        let n = buf.len();
        // SAFETY: as above; only the root's send buffer is read.
        self.run("broadcast", |s, r, c, st| unsafe { nccl::broadcast(s, r, n, F32, root as i32, c, st).map(drop) })?;
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
        let stream = be.comm_stream() as nsys::cudaStream_t;
        if let Some(r) = ranges.iter().find(|r| r.end > grads.len()) {
            bail!("bucket {r:?} outside a gradient of {}", grads.len());
        }
        nccl::group_start().map_err(|e| nccl_err("group start", e))?;
        for r in ranges {
            let p = (base + (r.start * std::mem::size_of::<f32>()) as u64) as *mut std::ffi::c_void;
            // SAFETY: an in-place sum of `r.len()` values inside the model's gradient buffer on
            // the device of this communicator; the comm stream waits for the compute above.
            unsafe { nccl::all_reduce(p as *const _, p, r.len(), F32, SUM, self.comm.0, stream) }
                .map_err(|e| nccl_err("gradient all_reduce", e))?;
        }
        nccl::group_end().map_err(|e| nccl_err("group end", e))?;
        Ok(())
    }

    fn finish(&mut self, be: &Cuda) -> Result<()> {
        be.compute_waits_for_comm()
    }
}
