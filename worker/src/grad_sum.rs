//! Summing the parameter gradient over the ranks in buckets, overlapped with the backward.
//!
//! The model reports each range of its flat gradient buffer as soon as no op of the step writes
//! it any more ([`model::params::GradOrder`]: the head first, then the blocks from the last).
//! [`Buckets`] keeps only the ranges of parameters that train (frozen weights have no gradient
//! to sum: with the published adapter setup that is a few percent of the buffer) and groups
//! them into buckets of at least `cap` values, so that the sum of a bucket runs while the
//! backward computes the next ones, and the last bucket is small (DDP's scheme).
//!
//! Two ways to run the sums:
//! - [`backward_host_overlap`], for any backend and any [`Collectives`]: each bucket is copied
//!   to the host and summed on a thread of its own while the backward goes on; the sums are
//!   copied back at the end. On a CPU rank this overlaps the ring's network time with compute.
//! - a [`DeviceSum`] (NCCL on the GPU's communication stream, [`crate::comm::nccl`]): each
//!   bucket is enqueued on the device after the compute that finished it, without a copy or a
//!   host wait; the optimiser's work waits for the last one.
//!
//! Sums stay reproducible: the buckets follow from the layout, the trainable set and `cap`,
//! and the ring sums each element in a fixed order.

use std::ops::Range;
use std::sync::mpsc;

use anyhow::{anyhow, Result};
use kernels::{Backend, Tensor};
use model::Clip;

use crate::comm::Collectives;

/// Values per bucket (4 Mi floats, 16 MiB): a ViT-B block (7.1 M parameters) fills one, so
/// each block's sum starts as soon as its backward ends; small enough that the last bucket
/// leaves little to wait for.
pub const DEFAULT_BUCKET_VALUES: usize = 1 << 22;

/// Groups the finished ranges of trainable parameters into buckets.
#[derive(Clone, Debug)]
pub struct Buckets {
    /// The trainable parameters' ranges, sorted, adjacent ones merged.
    spans: Vec<Range<usize>>,
    cap: usize,
    pending: Vec<Range<usize>>,
    pending_len: usize,
}

impl Buckets {
    /// Buckets of at least `cap` values (`cap` 0 means one bucket per reported range) over the
    /// parameters of `model` that train.
    pub fn new<B: Backend>(model: &Clip<B>, cap: usize) -> Self {
        // Specs are in layout order (increasing offsets), so the spans come out sorted.
        let mut spans: Vec<Range<usize>> = Vec::new();
        for (spec, &train) in model.layout.specs.iter().zip(model.trainable()) {
            if !train || spec.len == 0 {
                continue;
            }
            let r = spec.offset..spec.offset + spec.len;
            match spans.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => spans.push(r),
            }
        }
        Self { spans, cap, pending: Vec::new(), pending_len: 0 }
    }

    /// Values summed per step.
    pub fn trainable_values(&self) -> usize {
        self.spans.iter().map(|r| r.len()).sum()
    }

    /// Takes the finished range `r`; returns a bucket once at least `cap` values are pending.
    pub fn push(&mut self, r: Range<usize>) -> Option<Vec<Range<usize>>> {
        let first = self.spans.partition_point(|s| s.end <= r.start);
        for s in self.spans[first..].iter().take_while(|s| s.start < r.end) {
            let piece = s.start.max(r.start)..s.end.min(r.end);
            self.pending_len += piece.len();
            match self.pending.last_mut() {
                Some(last) if last.end == piece.start => last.end = piece.end,
                _ => self.pending.push(piece),
            }
        }
        (self.pending_len > 0 && self.pending_len >= self.cap).then(|| self.take())
    }

    /// What is still pending, as a last bucket.
    pub fn flush(&mut self) -> Option<Vec<Range<usize>>> {
        (self.pending_len > 0).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Range<usize>> {
        self.pending_len = 0;
        std::mem::take(&mut self.pending)
    }
}

/// Sums gradient buckets on the device, in place, beside the compute (NCCL on a GPU's
/// communication stream).
pub trait DeviceSum<B: Backend>: Send {
    /// Starts summing `ranges` of `grads` over the ranks once the compute enqueued so far is
    /// done; returns without waiting.
    fn bucket(&mut self, be: &B, grads: &Tensor<B>, ranges: &[Range<usize>]) -> Result<()>;
    /// Makes the compute enqueued from now on wait for every bucket's sum.
    fn finish(&mut self, be: &B) -> Result<()>;
}

/// A bucket's ranges and their values, copied out of the gradient (summed once back).
type Summed = (Vec<Range<usize>>, Vec<f32>);

/// Runs `backward` (which reports finished ranges to the closure it is given) and sums the
/// trainable gradient over the ranks of `comm`, bucket by bucket, on a thread of its own while
/// the backward goes on. `spare` keeps host buffers from step to step.
pub fn backward_host_overlap<B: Backend>(
    model: &Clip<B>,
    comm: &mut dyn Collectives,
    buckets: &mut Buckets,
    spare: &mut Vec<Vec<f32>>,
    backward: impl FnOnce(&mut dyn FnMut(Range<usize>)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::Cpu;
    use model::freeze::ADAPTERS_AND_NORMS;
    use model::ClipConfig;

    fn model(adapter: Option<usize>) -> Clip<Cpu> {
        let mut c = ClipConfig::small(32, 8, 16, 2, 2);
        c.adapter_dim = adapter;
        Clip::new(Cpu, c, 1).unwrap()
    }

    /// Feeds the model's whole report order; returns the buckets.
    fn all_buckets(m: &Clip<Cpu>, cap: usize) -> Vec<Vec<Range<usize>>> {
        let o = m.grad_order();
        let mut order = vec![o.logit_scale.clone()];
        order.extend(o.vision_head.iter().cloned());
        order.extend(o.vision_blocks.iter().rev().cloned());
        order.push(o.vision_embed.clone());
        order.extend(o.text_head.iter().cloned());
        order.extend(o.text_blocks.iter().rev().cloned());
        order.push(o.text_embed.clone());
        let mut b = Buckets::new(m, cap);
        let mut out: Vec<_> = order.into_iter().filter_map(|r| b.push(r)).collect();
        out.extend(b.flush());
        out
    }

    fn covered(buckets: &[Vec<Range<usize>>], total: usize) -> Vec<u8> {
        let mut c = vec![0u8; total];
        for r in buckets.iter().flatten() {
            for i in r.clone() {
                c[i] += 1;
            }
        }
        c
    }

    #[test]
    fn every_trainable_value_lands_in_exactly_one_bucket() {
        let m = model(None);
        for cap in [0, 1, 1000, 50_000, usize::MAX] {
            let b = all_buckets(&m, cap);
            assert!(covered(&b, m.layout.total).iter().all(|&c| c == 1), "cap {cap}");
            // Every bucket but the last holds at least `cap` values.
            for x in &b[..b.len() - 1] {
                assert!(x.iter().map(|r| r.len()).sum::<usize>() >= cap.min(m.layout.total));
            }
        }
        assert_eq!(all_buckets(&m, usize::MAX).len(), 1);
        assert!(all_buckets(&m, 0).len() > 2 * m.config.vision_config.num_hidden_layers);
    }

    #[test]
    fn frozen_parameters_are_left_out() {
        let mut m = model(Some(4));
        m.train_only(ADAPTERS_AND_NORMS).unwrap();
        let b = all_buckets(&m, 1000);
        let c = covered(&b, m.layout.total);
        for (spec, &train) in m.layout.specs.iter().zip(m.trainable()) {
            let want = u8::from(train);
            assert!(c[spec.offset..spec.offset + spec.len].iter().all(|&x| x == want), "{}", spec.name);
        }
        let summed = Buckets::new(&m, 0).trainable_values();
        assert!(summed > 0 && summed * 10 < m.layout.total, "{summed} of {}", m.layout.total);
    }
}
