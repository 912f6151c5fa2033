//! What a collectives library needs from the backend to work on its tensors in place, on the
//! device's communication stream, overlapped with the compute stream (the gradient buckets of
//! a data-parallel step): device addresses, the stream, and event waits in both directions.
//!
//! **Written without a GPU**: compiled everywhere, exercised only where NCCL runs on a device.

use anyhow::{anyhow, Result};
use cudarc::driver::{result as drv, sys};

use super::{dptr, Cuda, T};

impl Cuda {
    /// The device address of `t`'s first element (valid while `t`'s storage lives).
    pub fn device_ptr(&self, t: &T) -> u64 {
        dptr(t)
    }

    /// The communication stream: work there runs beside the compute stream.
    pub fn comm_stream(&self) -> sys::CUstream {
        self.dev.comm.0
    }

    /// Work enqueued on the communication stream from now on waits for everything enqueued on
    /// the compute stream so far.
    pub fn comm_waits_for_compute(&self) -> Result<()> {
        wait(self.dev.comm.0, self.dev.stream.0)
    }

    /// Work enqueued on the compute stream from now on waits for everything enqueued on the
    /// communication stream so far.
    pub fn compute_waits_for_comm(&self) -> Result<()> {
        wait(self.dev.stream.0, self.dev.comm.0)
    }
}

/// `waiter` waits for the work enqueued on `on` so far, through an event recorded on `on`.
fn wait(waiter: sys::CUstream, on: sys::CUstream) -> Result<()> {
    let e = |what: &str, err: drv::DriverError| anyhow!("CUDA {what}: {err:?}");
    let event = drv::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|x| e("event create", x))?;
    // SAFETY: streams of this device's context; the event is destroyed after the wait is
    // enqueued, which CUDA allows (its resources go once the recorded work completes).
    unsafe {
        let r = drv::event::record(event, on).map_err(|x| e("event record", x)).and_then(|()| {
            drv::stream::wait_event(waiter, event, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .map_err(|x| e("stream wait", x))
        });
        let _ = drv::event::destroy(event);
        r
    }
}
