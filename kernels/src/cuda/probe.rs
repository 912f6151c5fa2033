//! Whether this machine can run `n` CUDA ranks, asked before any worker starts.
//!
//! The coordinator calls [`probe`] when it plans a `--gpus N` run, so that a machine without a
//! driver, with too few GPUs or without the libraries a rank loads gets one line and a
//! non-zero exit within seconds, instead of workers that fail at start and are restarted.
//! Nothing here panics on a missing library (each is opened through [`libs`] first).

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::result as drv;

use super::{libs, nvrtc};

/// What the probe found: the device count and the first device's name.
#[derive(Clone, Debug)]
pub struct Found {
    pub devices: usize,
    pub name: String,
}

/// Checks that `want` CUDA devices, the driver, NVRTC with the CUDA headers, and cuBLAS(Lt)
/// are all here; NCCL is the caller's to check (it is opened by the collectives).
pub fn probe(want: usize) -> Result<Found> {
    libs::ensure_driver()?;
    drv::init().map_err(|e| anyhow!("cuInit failed: {e:?} (the NVIDIA driver is installed but no GPU is usable)"))?;
    let count = drv::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount: {e:?}"))?.max(0) as usize;
    if count < want {
        bail!("{want} GPUs asked for, {count} CUDA devices visible here (CUDA_VISIBLE_DEVICES may hide some)");
    }
    let name = drv::device::get(0)
        .and_then(|d| {
            let mut buf = [0 as std::ffi::c_char; 128];
            // SAFETY: a 128-byte buffer for a device that exists (count > 0 when want > 0).
            unsafe { cudarc::driver::sys::cuDeviceGetName(buf.as_mut_ptr(), 128, d) }.result()?;
            // SAFETY: the driver writes a NUL-terminated string into the buffer.
            Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|_| "unknown".into());
    libs::ensure_nvrtc()?;
    nvrtc::find_include_dir().context("the kernels are compiled at start")?;
    libs::ensure_cublas()?;
    Ok(Found { devices: count, name })
}
