//! QuickGELU and exact (erf) GELU.

use rayon::prelude::*;

use crate::backend::Activation;

/// Below this many elements a single thread is faster than waking the pool.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

const QUICK: f32 = 1.702;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `sigmoid(z)`; a large |z| gives 0 or 1 rather than NaN.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[inline(always)]
fn forward(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::QuickGelu => x * sigmoid(QUICK * x),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2)),
    }
}

/// d forward / dx.
#[inline(always)]
fn derivative(kind: Activation, x: f32) -> f32 {
    match kind {
        Activation::QuickGelu => {
            let s = sigmoid(QUICK * x);
            s + x * QUICK * s * (1.0 - s)
        }
        Activation::Gelu => 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2)) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI,
    }
}

pub fn fwd(kind: Activation, out: &mut [f32], inp: &[f32]) {
    // One loop per kind: with the match hoisted out, the QuickGELU loop vectorises.
    let run = |o: &mut [f32], x: &[f32]| match kind {
        Activation::QuickGelu => {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = forward(Activation::QuickGelu, x);
            }
        }
        Activation::Gelu => {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = forward(Activation::Gelu, x);
            }
        }
    };
    if out.len() < PAR_MIN {
        run(out, inp);
    } else {
        out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, x)| run(o, x));
    }
}

/// Accumulates into `dinp`.
pub fn bwd(kind: Activation, dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
    let run = |di: &mut [f32], dy: &[f32], x: &[f32]| match kind {
        Activation::QuickGelu => {
            for ((o, &g), &x) in di.iter_mut().zip(dy).zip(x) {
                *o += g * derivative(Activation::QuickGelu, x);
            }
        }
        Activation::Gelu => {
            for ((o, &g), &x) in di.iter_mut().zip(dy).zip(x) {
                *o += g * derivative(Activation::Gelu, x);
            }
        }
    };
    if dinp.len() < PAR_MIN {
        run(dinp, dout, inp);
    } else {
        dinp.par_chunks_mut(CHUNK)
            .zip(dout.par_chunks(CHUNK))
            .zip(inp.par_chunks(CHUNK))
            .for_each(|((di, dy), x)| run(di, dy, x));
    }
}
