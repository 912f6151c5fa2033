//! Elementwise ops on slices (parallel above a size where threads pay for themselves).

use rayon::prelude::*;

/// Below this many elements a single thread is faster than waking the pool.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 14;

pub fn fill(x: &mut [f32], v: f32) {
    x.fill(v);
}

pub fn copy(dst: &mut [f32], src: &[f32]) {
    dst.copy_from_slice(src);
}

pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    if out.len() < PAR_MIN {
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
        return;
    }
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    });
}

pub fn accumulate(acc: &mut [f32], x: &[f32]) {
    if acc.len() < PAR_MIN {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
        return;
    }
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(a, x)| {
        for (a, x) in a.iter_mut().zip(x) {
            *a += x;
        }
    });
}

pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}

/// Sum of squares with an f64 accumulator per chunk (the gradient norm over millions of
/// parameters must not lose the small ones).
pub fn sum_squares(x: &[f32]) -> f64 {
    x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum()
}
