//! The step's collectives for GPU ranks: NCCL on the backend's device tensors.
//!
//! Everything here is compiled on every machine; nothing touches a CUDA or NCCL entry point
//! before [`nccl_library`] has opened both (NCCL through `kernels::cuda::nccl_lib`, which finds
//! `libnccl.so.2` as the system package or NVIDIA's wheel installs it).
//!
//! The feature all-gather, the reduce-scatter of the gathered feature gradients, the InfoNCE
//! column statistics' all-reduces and the gradient buckets all run on the backend's communication stream, on the tensors' own device
//! buffers: the communication stream waits (through an event) for the compute that wrote the
//! input, and the compute stream waits for the collective before it reads the output. Nothing
//! goes through the host but the few values of [`Collectives::all_reduce_host`] (the loss, a
//! fine-tuning head's gradient), staged through a small device buffer of the communicator's own.
//!
//! Every call is issued from the rank's one host thread in program order, the same on every
//! rank, which is what NCCL requires of calls on one communicator.
//!
//! **Written without a GPU**: compiled everywhere, never yet run on a device.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Weak};

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use kernels::cuda::nccl_lib::{self, Nccl};
use kernels::{Cuda, DType, Tensor};
use model::collectives::{Backward, Buckets, Collectives, ReduceOp};
use model::Clip;

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

impl NcclComm {
    /// Sums host values over the ranks through the staging buffers (a few values a step).
    fn sum_host(&mut self, buf: &mut [f32]) -> Result<()> {
        self.stage(buf, buf.len())?;
        let n = buf.len();
        // SAFETY: staged device buffers of `n` values each way on this communicator's GPU.
        self.run(|l, s, r, c, st| unsafe { l.all_reduce(s, r, n, nccl_lib::SUM, c, st) })?;
        self.fetch(buf)
    }

    /// Returns once every rank has entered it.
    pub fn barrier(&mut self) -> Result<()> {
        self.sum_host(&mut [0.0f32])
    }

    /// The communicator and NCCL, checked for an error a peer raised asynchronously.
    fn live(&self) -> Result<(nccl_lib::Comm, &'static Nccl)> {
        let (comm, lib) = (self.inner.comm.get(), self.inner.comm.lib);
        ensure!(!comm.is_null(), "the NCCL communicator was aborted");
        // SAFETY: a live communicator (checked above).
        unsafe { lib.async_error(comm) }?;
        Ok((comm, lib))
    }
}

impl NcclComm {
    /// Runs the collective `op(lib, send, recv, comm, stream)` from `send` into `recv` (device
    /// tensors of this communicator's GPU, alive until the compute stream is done with them) on
    /// the communication stream, after the compute that wrote `send` and before the compute that
    /// reads `recv`.
    fn on_comm_stream(
        &self,
        be: &Cuda,
        what: &str,
        send: &Tensor<Cuda>,
        recv: &Tensor<Cuda>,
        op: impl FnOnce(&Nccl, *const c_void, *mut c_void, nccl_lib::Comm, nccl_lib::Stream) -> Result<()>,
    ) -> Result<()> {
        let (comm, lib) = self.live()?;
        let (s, r) = (f32_ptr(be, send, what)?, f32_ptr(be, recv, what)?);
        be.comm_waits_for_compute()?;
        op(lib, s as *const c_void, r, comm, be.comm_stream() as nccl_lib::Stream)?;
        be.compute_waits_for_comm()
    }
}

/// The device address of an f32 tensor, as NCCL takes it.
fn f32_ptr(be: &Cuda, t: &Tensor<Cuda>, what: &str) -> Result<*mut c_void> {
    ensure!(t.dtype() == DType::F32, "NCCL {what}: an f32 tensor is needed, got {:?}", t.dtype());
    Ok(be.device_ptr(t) as *mut c_void)
}

impl Collectives<Cuda> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&mut self, be: &Cuda, local: &Tensor<Cuda>, all: &Tensor<Cuda>) -> Result<()> {
        let n = local.len();
        ensure!(all.len() == n * self.world, "all_gather: {n} values into {}", all.len());
        // SAFETY: `n` values in, `world * n` out (see `on_comm_stream`).
        self.on_comm_stream(be, "all_gather", local, all, |l, s, r, c, st| unsafe { l.all_gather(s, r, n, c, st) })
    }

    fn reduce_scatter(&mut self, be: &Cuda, all: &Tensor<Cuda>, local: &Tensor<Cuda>) -> Result<()> {
        let n = local.len();
        ensure!(all.len() == n * self.world, "reduce_scatter: {} values into {n}", all.len());
        // SAFETY: `world * n` values in, `n` out (see `on_comm_stream`).
        self.on_comm_stream(be, "reduce_scatter", all, local, |l, s, r, c, st| unsafe {
            l.reduce_scatter(s, r, n, c, st)
        })
    }

    /// In place on the tensor's device buffer, on the communication stream (ordered by events
    /// as the gather and the scatter are).
    fn all_reduce(&mut self, be: &Cuda, buf: &Tensor<Cuda>, op: ReduceOp) -> Result<()> {
        let n = buf.len();
        let red = match op {
            ReduceOp::Sum => nccl_lib::SUM,
            ReduceOp::Max => nccl_lib::MAX,
        };
        // SAFETY: an in-place reduction of `n` values (see `on_comm_stream`).
        self.on_comm_stream(be, "all_reduce", buf, buf, |l, s, r, c, st| unsafe { l.all_reduce(s, r, n, red, c, st) })
    }

    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<()> {
        self.sum_host(buf)
    }

    /// Each bucket is summed in place in the model's gradient buffer on the communication
    /// stream, after the compute that finished it, without a copy or a host wait; the compute
    /// after the return (the optimiser) waits for the last one.
    fn backward_and_sum(&mut self, model: &Clip<Cuda>, buckets: &mut Buckets, backward: Backward<'_>) -> Result<()> {
        let be = &model.backend;
        let grads = &model.grads;
        let (comm, lib) = self.live()?;
        let base = f32_ptr(be, grads, "gradient sum")? as u64;
        let stream = be.comm_stream() as nccl_lib::Stream;
        let mut failed: Option<anyhow::Error> = None;
        let mut enqueue = |ranges: Vec<Range<usize>>| {
            if failed.is_some() {
                return;
            }
            let r = (|| -> Result<()> {
                if let Some(r) = ranges.iter().find(|r| r.end > grads.len()) {
                    bail!("bucket {r:?} outside a gradient of {}", grads.len());
                }
                be.comm_waits_for_compute()?;
                // The group is closed even when a call inside fails (see `Nccl::group`).
                lib.group(|| {
                    for r in &ranges {
                        let p = (base + (r.start * std::mem::size_of::<f32>()) as u64) as *mut c_void;
                        // SAFETY: an in-place sum of `r.len()` values inside the model's gradient
                        // buffer on this communicator's device; the comm stream waits for the
                        // compute that wrote them.
                        unsafe { lib.all_reduce(p as *const _, p, r.len(), nccl_lib::SUM, comm, stream) }?;
                    }
                    Ok(())
                })
            })();
            failed = r.err();
        };
        backward(&mut |r| {
            if let Some(bucket) = buckets.push(r) {
                enqueue(bucket);
            }
        });
        if let Some(bucket) = buckets.flush() {
            enqueue(bucket);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        be.compute_waits_for_comm()
    }
}
