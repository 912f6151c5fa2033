//! Patch extraction, vision / token embeddings and row pooling.
#![allow(clippy::too_many_arguments)]

pub fn im2col(cols: &mut [f32], pixels: &[f32], b: usize, img: usize, p: usize) {
    todo!()
}

pub fn vision_fwd(out: &mut [f32], patches: &[f32], cls: &[f32], pos: &[f32], b: usize, np: usize, d: usize) {
    todo!()
}

pub fn vision_bwd(
    dpatches: Option<&mut [f32]>,
    dcls: Option<&mut [f32]>,
    dpos: Option<&mut [f32]>,
    dout: &[f32],
    b: usize,
    np: usize,
    d: usize,
) {
    todo!()
}

/// Panics with the offending id if one is outside the vocabulary.
pub fn token_fwd(out: &mut [f32], ids: &[i32], wte: &[f32], wpe: &[f32], b: usize, t: usize, d: usize) {
    todo!()
}

pub fn token_bwd(
    dwte: Option<&mut [f32]>,
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    ids: &[i32],
    b: usize,
    t: usize,
    d: usize,
) {
    todo!()
}

pub fn gather_rows(out: &mut [f32], inp: &[f32], index: &[i32], b: usize, t: usize, d: usize) {
    todo!()
}

pub fn gather_rows_bwd(dinp: &mut [f32], dout: &[f32], index: &[i32], b: usize, t: usize, d: usize) {
    todo!()
}
