//! Multi-head attention over packed `qkv[b, t, 3*h*hd]`, saving the probabilities
//! `probs[b, h, t, t]` for the backward.
//!
//! Each (batch row, head) pair is one rayon task; its products are `gemm` calls on strided
//! views of the packed projections (`Parallelism::None`: the parallelism is across pairs).
//! The outputs of different heads share rows but occupy disjoint column ranges, which the
//! tasks write through raw pointers (see [`SharedOut`]).
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::{matmul, matmul_raw, View};

/// A buffer that several tasks write at disjoint blocks, by pointer (no `&mut` to any part of
/// it is ever created, so the tasks' blocks may interleave within rows).
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: only handed to tasks that write disjoint element sets (each (batch row, head)
// pair owns the columns of its head in the rows of its batch row).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn new(x: &mut [f32]) -> Self {
        Self { ptr: x.as_mut_ptr(), len: x.len() }
    }

    /// `matmul` into the block starting at element `start` (row stride `rs`).
    ///
    /// # Safety
    /// No other task may touch that `m x n` block while this runs.
    unsafe fn matmul(
        &self,
        start: usize,
        rs: usize,
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
        a: View<'_>,
        b: View<'_>,
        scale: f32,
    ) {
        assert!(start <= self.len);
        matmul_raw(m, n, k, self.ptr.add(start), self.len - start, rs, accumulate, a, b, scale, Parallelism::None);
    }
}

/// Row-wise softmax of `s[t, t]` in place, with the row maximum subtracted; with `causal`
/// the keys after the query position get probability 0.
fn softmax_rows(s: &mut [f32], t: usize, causal: bool) {
    for (i, row) in s.chunks_exact_mut(t).enumerate() {
        let n = if causal { i + 1 } else { t };
        let (live, masked) = row.split_at_mut(n);
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0f32;
        for v in live.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in live.iter_mut() {
            *v *= inv;
        }
        masked.fill(0.0);
    }
}

pub fn fwd(out: &mut [f32], probs: &mut [f32], qkv: &[f32], b: usize, t: usize, h: usize, hd: usize, causal: bool) {
    if t == 0 {
        return; // empty sequences (rayon cannot chunk by 0)
    }
    let c = h * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let out = SharedOut::new(out);
    probs.par_chunks_exact_mut(t * t).take(b * h).enumerate().for_each(|(pair, p)| {
        let (bi, j) = (pair / h, pair % h);
        let base = bi * t * 3 * c + j * hd;
        let q = View::rows(&qkv[base..], 3 * c);
        let k_t = View::transposed(&qkv[base + c..], 3 * c);
        let v = View::rows(&qkv[base + 2 * c..], 3 * c);
        // S = scale * Q K^T, straight into the saved probabilities, then softmax in place.
        matmul(t, t, hd, p, t, false, q, k_t, scale, Parallelism::None);
        softmax_rows(p, t, causal);
        // SAFETY: rows bi*t..(bi+1)*t, columns j*hd..(j+1)*hd of `out`: this pair's block.
        unsafe { out.matmul(bi * t * c + j * hd, c, t, hd, t, false, View::rows(p, t), v, 1.0) };
    });
}

/// Accumulates into `dqkv`. Neither `out` nor `causal` is needed: the saved probabilities
/// carry the state, and masked ones are exactly 0, so dS vanishes there by itself.
pub fn bwd(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    _out: &[f32],
    probs: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    _causal: bool,
) {
    if t == 0 {
        return; // empty sequences (rayon cannot chunk by 0)
    }
    let c = h * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let dqkv = SharedOut::new(dqkv);
    probs.par_chunks_exact(t * t).take(b * h).enumerate().for_each_init(
        || vec![0.0f32; t * t],
        |ds, (pair, p)| {
            let (bi, j) = (pair / h, pair % h);
            let base = bi * t * 3 * c + j * hd;
            let q = View::rows(&qkv[base..], 3 * c);
            let k = View::rows(&qkv[base + c..], 3 * c);
            let v_t = View::transposed(&qkv[base + 2 * c..], 3 * c);
            let dout = View::rows(&dout[bi * t * c + j * hd..], c);
            // SAFETY (the three `dqkv` products): rows bi*t..(bi+1)*t, columns of head j
            // within the q, k or v part: blocks no other pair touches.
            // dV += P^T dO.
            unsafe { dqkv.matmul(base + 2 * c, 3 * c, t, hd, t, true, View::transposed(p, t), dout, 1.0) };
            // dP = dO V^T, then dS = P o (dP - rowsum(dP o P)) in place.
            matmul(t, t, hd, ds, t, false, dout, v_t, 1.0, Parallelism::None);
            for (dsr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
                let dot = dsr.iter().zip(pr).map(|(a, b)| a * b).sum::<f32>();
                for (d, &pv) in dsr.iter_mut().zip(pr) {
                    *d = pv * (*d - dot);
                }
            }
            // dQ += scale dS K, dK += scale dS^T Q.
            unsafe { dqkv.matmul(base, 3 * c, t, hd, t, true, View::rows(ds, t), k, scale) };
            unsafe { dqkv.matmul(base + c, 3 * c, t, hd, t, true, View::transposed(ds, t), q, scale) };
        },
    );
}
