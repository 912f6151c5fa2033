//! The step's collectives over a host transport (the TCP ring of CPU ranks): each exchange is
//! staged through host memory, which is where a CPU backend's tensors live anyway.
//!
//! The parameter gradient is summed bucket by bucket on a thread of its own while the backward
//! goes on ([`backward_host_overlap`]): each finished bucket is copied to the host, summed over
//! the ring, and copied back at the end, so the ring's network time overlaps compute. The ring
//! sums each element in a fixed order, so a world of a given size reproduces its results bit
//! for bit.

use std::ops::Range;
use std::sync::mpsc;

use anyhow::{anyhow, ensure, Result};
use kernels::{Backend, Tensor};
use model::collectives::{Backward, Buckets, Collectives, ReduceOp};
use model::Clip;

use super::HostCollectives;

/// [`Collectives`] over a host transport, for any backend.
pub struct OverHost<C: HostCollectives> {
    pub transport: C,
    local: Vec<f32>,
    all: Vec<f32>,
    /// Host buffers of the gradient buckets, kept from step to step.
    spare: Vec<Vec<f32>>,
}

impl<C: HostCollectives> OverHost<C> {
    pub fn new(transport: C) -> Self {
        Self { transport, local: Vec::new(), all: Vec::new(), spare: Vec::new() }
    }
}

impl<B: Backend, C: HostCollectives> Collectives<B> for OverHost<C> {
    fn rank(&self) -> usize {
        self.transport.rank()
    }
    fn world(&self) -> usize {
        self.transport.world()
    }
    fn all_gather(&mut self, be: &B, local: &Tensor<B>, all: &Tensor<B>) -> Result<()> {
        let n = local.len();
        ensure!(all.len() == n * self.transport.world(), "all_gather: {} values into {}", n, all.len());
        self.local.resize(n, 0.0);
        self.all.resize(all.len(), 0.0);
        be.download_f32(local, &mut self.local)?;
        self.transport.all_gather(&self.local, &mut self.all)?;
        be.upload_f32(all, &self.all)
    }
    fn reduce_scatter(&mut self, be: &B, all: &Tensor<B>, local: &Tensor<B>) -> Result<()> {
        let n = local.len();
        ensure!(all.len() == n * self.transport.world(), "reduce_scatter: {} values into {}", all.len(), n);
        self.all.resize(all.len(), 0.0);
        self.local.resize(n, 0.0);
        be.download_f32(all, &mut self.all)?;
        self.transport.reduce_scatter(&self.all, &mut self.local)?;
        be.upload_f32(local, &self.local)
    }
    fn all_reduce(&mut self, be: &B, buf: &Tensor<B>, op: ReduceOp) -> Result<()> {
        self.local.resize(buf.len(), 0.0);
        be.download_f32(buf, &mut self.local)?;
        match op {
            ReduceOp::Sum => self.transport.all_reduce(&mut self.local)?,
            ReduceOp::Max => self.transport.all_reduce_max(&mut self.local)?,
        }
        be.upload_f32(buf, &self.local)
    }
    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<()> {
        self.transport.all_reduce(buf)
    }
    fn backward_and_sum(&mut self, model: &Clip<B>, buckets: &mut Buckets, backward: Backward<'_>) -> Result<()> {
        if self.transport.world() == 1 {
            backward(&mut |_| {});
            return Ok(());
        }
        backward_host_overlap(model, &mut self.transport, buckets, &mut self.spare, backward)
    }
}

/// A bucket's ranges and their values, copied out of the gradient (summed once back).
type Summed = (Vec<Range<usize>>, Vec<f32>);

/// Runs `backward` (which reports finished ranges to the closure it is given) and sums the
/// trainable gradient over the ranks of `comm`, bucket by bucket, on a thread of its own while
/// the backward goes on. `spare` keeps host buffers from step to step.
pub fn backward_host_overlap<B: Backend>(
    model: &Clip<B>,
    comm: &mut dyn HostCollectives,
    buckets: &mut Buckets,
    spare: &mut Vec<Vec<f32>>,
    backward: Backward<'_>,
) -> Result<()> {
    let be = &model.backend;
    let grads = &model.grads;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Summed>();
        let summer = scope.spawn(move || -> Result<Vec<Summed>> {
            let mut done = Vec::new();
            for (ranges, mut buf) in rx {
                comm.all_reduce(&mut buf)?;
                done.push((ranges, buf));
            }
            Ok(done)
        });
        let mut copy_err: Option<anyhow::Error> = None;
        let mut send = |ranges: Vec<Range<usize>>| {
            if copy_err.is_some() {
                return;
            }
            let mut buf = spare.pop().unwrap_or_default();
            buf.clear();
            for r in &ranges {
                let at = buf.len();
                buf.resize(at + r.len(), 0.0);
                if let Err(e) = be.download_f32(&grads.slice(r.start, r.len()), &mut buf[at..]) {
                    copy_err = Some(e);
                    return;
                }
            }
            // A closed channel means the summing thread failed: its error comes from `join`.
            let _ = tx.send((ranges, buf));
        };
        backward(&mut |r| {
            if let Some(b) = buckets.push(r) {
                send(b);
            }
        });
        if let Some(b) = buckets.flush() {
            send(b);
        }
        drop(tx);
        let done = summer.join().map_err(|_| anyhow!("the gradient-sum thread panicked"))??;
        if let Some(e) = copy_err {
            return Err(e);
        }
        for (ranges, buf) in done {
            let mut at = 0;
            for r in &ranges {
                be.upload_f32(&grads.slice(r.start, r.len()), &buf[at..at + r.len()])?;
                at += r.len();
            }
            spare.push(buf);
        }
        Ok(())
    })
}
