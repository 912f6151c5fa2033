//! AdamW with decoupled weight decay, as `torch.optim.AdamW`.

use crate::backend::AdamWStep;

pub fn step(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamWStep) {
    todo!()
}
