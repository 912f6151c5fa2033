//! Multi-head attention over packed `qkv[b, t, 3*h*hd]`, saving the probabilities
//! `probs[b, h, t, t]` for the backward.
#![allow(clippy::too_many_arguments)]

pub fn fwd(out: &mut [f32], probs: &mut [f32], qkv: &[f32], b: usize, t: usize, h: usize, hd: usize, causal: bool) {
    todo!()
}

/// Accumulates into `dqkv`.
pub fn bwd(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    probs: &[f32],
    b: usize,
    t: usize,
    h: usize,
    hd: usize,
    causal: bool,
) {
    todo!()
}
