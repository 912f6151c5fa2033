//! Collectives for GPU ranks through NCCL (cudarc, loaded at run time), on a stream of their
//! own.
//!
//! Everything here is compiled on every machine; nothing touches a CUDA or NCCL entry point
//! before [`nccl_available`] has said that both libraries load (cudarc panics on a missing
//! library). NVIDIA's wheels ship `libnccl.so.2` while cudarc opens `libnccl.so`: a link named
//! `libnccl.so` in a folder on `LD_LIBRARY_PATH` fixes that.
//!
//! The buffers of [`Collectives`] are host slices, so each call stages through device buffers
//! kept between calls; a device-resident variant belongs with the CUDA training path.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Collectives;

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

/// The communicator and its staging buffers.
struct Inner {
    comm: Comm,
    stream: Arc<CudaStream>,
    send: Option<CudaSlice<f32>>,
    recv: Option<CudaSlice<f32>>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `NcclComm` owns it exclusively and every use goes through `&mut self`.
unsafe impl Send for Inner {}

pub struct NcclComm {
    inner: Inner,
    rank: usize,
    world: usize,
}

fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> anyhow::Error {
    anyhow!("NCCL {what} failed: {e:?}")
}

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
        let comm =
            Comm::from_rank(stream.clone(), rank, world, Id::uninit(raw)).map_err(|e| nccl_err("comm init", e))?;
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
        let s = &mut self.inner;
        s.comm
            .all_gather(s.send.as_ref().expect("staged"), s.recv.as_mut().expect("staged"))
            .map_err(|e| nccl_err("all_gather", e))?;
        self.fetch(recv)
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        ensure!(send.len() == recv.len() * self.world, "reduce_scatter: send buffer of the wrong length");
        self.stage(send, recv.len())?;
        let s = &mut self.inner;
        s.comm
            .reduce_scatter(s.send.as_ref().expect("staged"), s.recv.as_mut().expect("staged"), &ReduceOp::Sum)
            .map_err(|e| nccl_err("reduce_scatter", e))?;
        self.fetch(recv)
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        self.stage(buf, buf.len())?;
        let s = &mut self.inner;
        s.comm
            .all_reduce(s.send.as_ref().expect("staged"), s.recv.as_mut().expect("staged"), &ReduceOp::Sum)
            .map_err(|e| nccl_err("all_reduce", e))?;
        self.fetch(buf)
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        ensure!(root < self.world, "broadcast: root {root} outside a world of {}", self.world);
        self.stage(buf, buf.len())?;
        let s = &mut self.inner;
        s.comm
            .broadcast(s.send.as_ref(), s.recv.as_mut().expect("staged"), root as i32)
            .map_err(|e| nccl_err("broadcast", e))?;
        self.fetch(buf)
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce(&mut one)
    }
}
