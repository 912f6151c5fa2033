//! AdamW with decoupled weight decay, as `torch.optim.AdamW`.

use rayon::prelude::*;

use crate::backend::AdamWStep;

/// Below this many parameters the update runs on the calling thread.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

/// Per step, exactly as torch (the non-fused, non-amsgrad path):
/// `p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep) {
    assert!(hp.step >= 1, "AdamW step numbers start at 1 (got 0)");
    // Bias corrections in f64: beta2^t for t in the tens of thousands is where f32 drifts.
    let t = hp.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    let step_size = (hp.lr as f64 / bc1) as f32;
    let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
    let decay = 1.0 - hp.lr * hp.weight_decay;
    let (b1, b2, eps) = (hp.beta1, hp.beta2, hp.eps);
    let run = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let denom = v.sqrt() * inv_sqrt_bc2 + eps;
            *p = *p * decay - step_size * *m / denom;
        }
    };
    if param.len() < PAR_MIN {
        run(param, grad, m, v);
    } else {
        param
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| run(p, g, m, v));
    }
}
