//! Row-wise L2 normalisation (no epsilon, as `CLIPModel` divides by the norm directly).

use rayon::prelude::*;

/// Below this many elements the rows are done on the calling thread.
const PAR_MIN: usize = 1 << 15;

pub fn fwd(out: &mut [f32], norm: &mut [f32], inp: &[f32], n: usize, d: usize) {
    if n == 0 || d == 0 {
        return; // no rows (and no chunks of 0)
    }
    let row = |o: &mut [f32], nm: &mut f32, x: &[f32]| {
        let r = x.iter().map(|&v| v * v).sum::<f32>().sqrt();
        // A zero row gives NaN, as in `CLIPModel`; the model never feeds one.
        let inv = 1.0 / r;
        for (o, &v) in o.iter_mut().zip(x) {
            *o = v * inv;
        }
        *nm = r;
    };
    if n * d < PAR_MIN {
        for ((o, nm), x) in out.chunks_exact_mut(d).zip(norm.iter_mut()).zip(inp.chunks_exact(d)) {
            row(o, nm, x);
        }
    } else {
        out.par_chunks_exact_mut(d)
            .zip(norm.par_iter_mut())
            .zip(inp.par_chunks_exact(d))
            .for_each(|((o, nm), x)| row(o, nm, x));
    }
}

/// Accumulates into `dinp`, from the forward's `out` and `norm`:
/// `dinp += (dout - out * (dout . out)) / norm` (the Jacobian of `x / |x|` is
/// `(I - y y^T) / |x|` with `y = x / |x|`).
pub fn bwd(dinp: &mut [f32], dout: &[f32], out: &[f32], norm: &[f32], n: usize, d: usize) {
    if n == 0 || d == 0 {
        return;
    }
    let row = |di: &mut [f32], dy: &[f32], y: &[f32], nm: f32| {
        let dot = dy.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
        let inv = 1.0 / nm;
        for ((o, &g), &v) in di.iter_mut().zip(dy).zip(y) {
            *o += (g - v * dot) * inv;
        }
    };
    if n * d < PAR_MIN {
        for (i, di) in dinp.chunks_exact_mut(d).enumerate() {
            row(di, &dout[i * d..(i + 1) * d], &out[i * d..(i + 1) * d], norm[i]);
        }
    } else {
        dinp.par_chunks_exact_mut(d)
            .enumerate()
            .for_each(|(i, di)| row(di, &dout[i * d..(i + 1) * d], &out[i * d..(i + 1) * d], norm[i]));
    }
}
