//! Linear layer: `out = inp . w^T + bias` with `w` in the `[out, in]` layout.
#![allow(clippy::too_many_arguments)]

pub fn fwd(out: &mut [f32], inp: &[f32], w: &[f32], bias: Option<&[f32]>, n: usize, c: usize, oc: usize) {
    todo!()
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
    todo!()
}
