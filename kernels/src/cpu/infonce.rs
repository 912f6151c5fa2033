//! The distributed InfoNCE loss in tiles with an online log-sum-exp.
#![allow(clippy::too_many_arguments)]

use crate::backend::InfoNceDims;

/// Returns this rank's loss share; writes the row log-sum-exps.
pub fn fwd(
    lse_img: &mut [f32],
    lse_txt: &mut [f32],
    img: &[f32],
    txt: &[f32],
    all_img: &[f32],
    all_txt: &[f32],
    logit_scale: f32,
    dims: InfoNceDims,
) -> f32 {
    todo!()
}

/// Accumulates the feature gradients of `dloss * loss`; returns d loss / d logit_scale
/// (the log of the scale, so it includes the factor `exp(logit_scale)`).
pub fn bwd(
    d_img: &mut [f32],
    d_txt: &mut [f32],
    d_all_img: &mut [f32],
    d_all_txt: &mut [f32],
    dloss: f32,
    img: &[f32],
    txt: &[f32],
    all_img: &[f32],
    all_txt: &[f32],
    logit_scale: f32,
    lse_img: &[f32],
    lse_txt: &[f32],
    dims: InfoNceDims,
) -> f32 {
    todo!()
}
