//! Linear layer: `out = inp . w^T + bias` with `w` in the `[out, in]` layout.
//!
//! The matrix products go through the `gemm` crate; transposes are expressed as strides, and
//! the backward's accumulation (`+=`) is gemm's `read_dst` with `alpha = 1`, so no temporary
//! is ever allocated. [`matmul`] is shared with the attention and InfoNCE kernels.
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread: waking the pool costs
/// more than it saves (and callers already inside a parallel loop ask for `None` anyway).
const PAR_MIN_FLOPS: usize = 1 << 18;

/// A strided view of a matrix inside a slice: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix whose rows are `rs` elements apart.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// The transpose of a row-major matrix whose rows are `rs` elements apart.
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs: 1, cs: rs }
    }
    fn check(&self, what: &str, rows: usize, cols: usize) {
        check_block(what, self.data.len(), rows, cols, self.rs, self.cs);
    }
}

/// Panics unless a `rows x cols` block with strides `rs`, `cs` fits in `len` elements (what
/// makes the unsafe gemm call sound).
fn check_block(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    if rows > 0 && cols > 0 {
        let last = (rows - 1) * rs + (cols - 1) * cs;
        assert!(last < len, "matmul {what}: a {rows}x{cols} block reaches element {last} of {len}");
    }
}

/// Whether a product of this size should use the thread pool.
pub(crate) fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m.saturating_mul(n).saturating_mul(k) >= PAR_MIN_FLOPS {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `dst[m, n] (row-major, rows dst_rs apart) = [dst +] scale * a[m, k] . b[k, n]`.
///
/// With `accumulate` the old contents of `dst` are kept (gemm's `read_dst`, alpha = 1);
/// otherwise they are overwritten. Every view is bounds-checked before the unsafe call.
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    a: View<'_>,
    b: View<'_>,
    scale: f32,
    par: Parallelism,
) {
    // SAFETY: `dst` is a unique borrow of `dst.len()` elements, so it aliases neither input.
    unsafe { matmul_raw(m, n, k, dst.as_mut_ptr(), dst.len(), dst_rs, accumulate, a, b, scale, par) }
}

/// [`matmul`] into a buffer given by pointer, for tasks that write disjoint blocks of one
/// buffer (the heads of the attention output share rows): only the `m x n` block at `dst`
/// with row stride `dst_rs` is read or written, and no reference to it is created.
///
/// # Safety
/// `dst .. dst + dst_len` must be valid for writes, no other thread may access the block
/// while this runs, and the block must not overlap `a` or `b`.
pub(crate) unsafe fn matmul_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_len: usize,
    dst_rs: usize,
    accumulate: bool,
    a: View<'_>,
    b: View<'_>,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_block("dst", dst_len, m, n, dst_rs, 1);
    if k == 0 {
        // gemm's behaviour for an empty inner dimension is not documented: do it here.
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    *dst.add(r * dst_rs + c) = 0.0;
                }
            }
        }
        return;
    }
    a.check("lhs", m, k);
    b.check("rhs", k, n);
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

pub fn fwd(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    // Seed each output row with the bias and let gemm accumulate on top: one pass over `out`.
    let accumulate = match bias {
        Some(bias) => {
            for row in out.chunks_exact_mut(oc) {
                row.copy_from_slice(bias);
            }
            true
        }
        None => false,
    };
    // w^T[c, oc] is w read with swapped strides.
    matmul(n, oc, c, out, oc, accumulate, View::rows(inp, c), View::transposed(w, c), 1.0, parallelism(n, oc, c));
}

/// Accumulates: `dinp += dout . w`, `dw += dout^T . inp`, `dbias += sum_rows(dout)`.
pub fn bwd(
    dinp: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n: usize,
    c: usize,
    oc: usize,
) {
    if let Some(dinp) = dinp {
        matmul(n, c, oc, dinp, c, true, View::rows(dout, oc), View::rows(w, c), 1.0, parallelism(n, c, oc));
    }
    if let Some(dw) = dw {
        matmul(oc, c, n, dw, c, true, View::transposed(dout, oc), View::rows(inp, c), 1.0, parallelism(oc, c, n));
    }
    if let Some(dbias) = dbias {
        column_sums(dbias, dout, n, oc);
    }
}

/// Columns per task of the bias gradient: a 64-float strip of each row is one cache line
/// pair, and the strips of different tasks never share a line.
const COLS_PER_TASK: usize = 64;

/// `acc[j] += sum_i x[i, j]`, parallel over strips of columns (no shared accumulator, and
/// the summation order of each column does not depend on the thread count).
fn column_sums(acc: &mut [f32], x: &[f32], n: usize, cols: usize) {
    let strip = |j0: usize, acc: &mut [f32]| {
        let mut sum = vec![0.0f32; acc.len()];
        for row in x.chunks_exact(cols).take(n) {
            for (s, v) in sum.iter_mut().zip(&row[j0..j0 + acc.len()]) {
                *s += v;
            }
        }
        for (a, s) in acc.iter_mut().zip(sum) {
            *a += s;
        }
    };
    if n * cols < 1 << 15 {
        strip(0, acc);
    } else {
        acc.par_chunks_mut(COLS_PER_TASK).enumerate().for_each(|(k, a)| strip(k * COLS_PER_TASK, a));
    }
}
