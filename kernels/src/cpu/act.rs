//! QuickGELU and exact (erf) GELU.

use crate::backend::Activation;

pub fn fwd(kind: Activation, out: &mut [f32], inp: &[f32]) {
    todo!()
}

/// Accumulates into `dinp`.
pub fn bwd(kind: Activation, dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
    todo!()
}
