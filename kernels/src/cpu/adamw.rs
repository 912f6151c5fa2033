//! AdamW with decoupled weight decay, as `torch.optim.AdamW`.

use rayon::prelude::*;

use crate::backend::{AdamWConsts, AdamWStep};
use crate::bf16::round_bf16;

/// Below this many parameters the update runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// Per step, exactly as torch (the non-fused, non-amsgrad path):
/// `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep) {
    step_with_copy(param, grad, m, v, None, hp);
}

/// [`step`], also writing each updated weight rounded to nearest even bf16 into `copy`.
pub fn step_with_copy(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    copy: Option<&mut [f32]>,
    hp: AdamWStep,
) {
    let AdamWConsts { decay, step_size, inv_sqrt_bc2 } = AdamWConsts::new(hp);
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], copy: Option<&mut [f32]>| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() * inv_sqrt_bc2 + eps;
            *p = *p * decay - step_size * *m / denom;
        }
        if let Some(c) = copy {
            for (c, &p) in c.iter_mut().zip(p.iter()) {
                *c = round_bf16(p);
            }
        }
    };
    if param.len() < PAR_MIN {
        run(param, grad, m, v, copy);
        return;
    }
    let chunks = param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK));
    match copy {
        Some(c) => chunks.zip(c.par_chunks_mut(CHUNK)).for_each(|((((p, g), m), v), c)| run(p, g, m, v, Some(c))),
        None => chunks.for_each(|(((p, g), m), v)| run(p, g, m, v, None)),
    }
}
