//! Row-wise L2 normalisation (no epsilon, as `CLIPModel` divides by the norm directly).

pub fn fwd(out: &mut [f32], norm: &mut [f32], inp: &[f32], n: usize, d: usize) {
    todo!()
}

/// Accumulates into `dinp`, from the forward's `out` and `norm`.
pub fn bwd(dinp: &mut [f32], dout: &[f32], out: &[f32], norm: &[f32], n: usize, d: usize) {
    todo!()
}
