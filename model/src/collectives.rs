//! How ranks exchange what a training step needs, over the backend's own tensors.
//!
//! One interface for every world: [`Single`] (a world of one: a gather is a copy, a sum is the
//! value itself), the worker's TCP ring for CPU ranks (it stages through the host itself) and
//! NCCL for GPU ranks (device buffers on the communication stream, ordered by events: the
//! features never leave the device). The step ([`crate::step`]) is written once against it.
//!
//! The parameter gradient is summed in buckets while the backward runs: the model reports
//! each range of its flat gradient buffer as soon as no op of the step writes it any more
//! ([`crate::params::GradOrder`]: the head first, then the blocks from the last). [`Buckets`]
//! keeps only the ranges of parameters that train (frozen weights have no gradient to sum:
//! with the published adapter setup that is a few percent of the buffer) and groups them into
//! buckets of at least `cap` values, so that the sum of a bucket runs while the backward
//! computes the next ones, and the last bucket is small (DDP's scheme). Sums stay
//! reproducible: the buckets follow from the layout, the trainable set and `cap`.

use std::ops::Range;

use anyhow::Result;
use kernels::{Backend, Tensor};

use crate::clip::Clip;

/// Reports each finished range of the model's gradient buffer (see [`Collectives::backward_and_sum`]).
pub type Ready<'a> = &'a mut dyn FnMut(Range<usize>);
/// A backward pass that reports the ranges it finishes to the closure it is given.
pub type Backward<'a> = &'a mut dyn FnMut(Ready<'_>);

/// How an all-reduce combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The maximum (a NaN on any rank gives NaN).
    Max,
}

/// The collectives a training step uses, over tensors of backend `B`. Calls are made in the
/// same order on every rank (what NCCL and the ring both require).
pub trait Collectives<B: Backend> {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// `all[k*n .. (k+1)*n]` = rank k's `local` (`n = local.len()`, `all.len() = world * n`).
    fn all_gather(&mut self, be: &B, local: &Tensor<B>, all: &Tensor<B>) -> Result<()>;
    /// `local` = chunk `rank` of the sum over the ranks of `all` (`all.len() = world * n`).
    fn reduce_scatter(&mut self, be: &B, all: &Tensor<B>, local: &Tensor<B>) -> Result<()>;
    /// Combines `buf` (f32) over the ranks with `op`, in place: the InfoNCE column statistics
    /// (a maximum and a sum per gathered text, `2 x global` values a step).
    fn all_reduce(&mut self, be: &B, buf: &Tensor<B>, op: ReduceOp) -> Result<()>;
    /// Sums a few host values over the ranks, in place (the loss, a label count, a small head).
    fn all_reduce_host(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Runs `backward` and sums the trainable gradient (`model.grads`) over the ranks, bucket by
    /// bucket as `backward` reports them finished; work enqueued after the return sees the sums.
    fn backward_and_sum(&mut self, model: &Clip<B>, buckets: &mut Buckets, backward: Backward<'_>) -> Result<()>;
}

/// A world of one: gathers and scatters are copies, sums are the values themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl<B: Backend> Collectives<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_gather(&mut self, be: &B, local: &Tensor<B>, all: &Tensor<B>) -> Result<()> {
        anyhow::ensure!(local.len() == all.len(), "all_gather in a world of one: {} into {}", local.len(), all.len());
        be.copy(all, local);
        Ok(())
    }
    fn reduce_scatter(&mut self, be: &B, all: &Tensor<B>, local: &Tensor<B>) -> Result<()> {
        anyhow::ensure!(
            local.len() == all.len(),
            "reduce_scatter in a world of one: {} into {}",
            all.len(),
            local.len()
        );
        be.copy(local, all);
        Ok(())
    }
    fn all_reduce(&mut self, _be: &B, _buf: &Tensor<B>, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn all_reduce_host(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn backward_and_sum(&mut self, _model: &Clip<B>, _buckets: &mut Buckets, backward: Backward<'_>) -> Result<()> {
        backward(&mut |_| {});
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::freeze::ADAPTERS_AND_NORMS;
    use crate::ClipConfig;
    use kernels::Cpu;

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
