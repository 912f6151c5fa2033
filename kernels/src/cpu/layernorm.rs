//! Layer norm over the last dimension; saves the mean and 1/std of each row.
//!
//! As `torch.nn.LayerNorm`: biased variance, `rstd = 1 / sqrt(var + eps)`.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

/// Rows per parallel task. Fixed (not derived from the thread count) so that the partial
/// sums of `dgamma` / `dbeta`, and hence the results, do not depend on the machine.
const ROWS_PER_TASK: usize = 32;
/// Below this many elements everything runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

pub fn fwd(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    gamma: &[f32],
    beta: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    if n == 0 || c == 0 {
        return; // nothing to normalise (and no chunks of 0)
    }
    let row = |o: &mut [f32], m: &mut f32, r: &mut f32, x: &[f32]| norm_row(o, m, r, x, gamma, beta, eps);
    if n * c < PAR_MIN {
        for (((o, m), r), x) in
            out.chunks_exact_mut(c).zip(mean.iter_mut()).zip(rstd.iter_mut()).zip(inp.chunks_exact(c))
        {
            row(o, m, r, x);
        }
    } else {
        out.par_chunks_exact_mut(c)
            .zip(mean.par_iter_mut())
            .zip(rstd.par_iter_mut())
            .zip(inp.par_chunks_exact(c))
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(((o, m), r), x)| row(o, m, r, x));
    }
}

/// Layer norm fused with the residual add before it: `x = a + b` (or `x += b` in place when
/// `a` is `None`), then `out = LN(x)`, row by row, so each row of `x` is normalised while it
/// is still in cache. Statistics as [`fwd`].
pub fn add_fwd(
    out: &mut [f32],
    x: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    a: Option<&[f32]>,
    b: &[f32],
    gamma: &[f32],
    beta: &[f32],
    n: usize,
    c: usize,
    eps: f32,
) {
    if n == 0 || c == 0 {
        return;
    }
    let row = |i: usize, o: &mut [f32], xr: &mut [f32], m: &mut f32, r: &mut f32| {
        let br = &b[i * c..(i + 1) * c];
        match a {
            Some(a) => {
                for ((xv, &av), &bv) in xr.iter_mut().zip(&a[i * c..(i + 1) * c]).zip(br) {
                    *xv = av + bv;
                }
            }
            None => {
                for (xv, &bv) in xr.iter_mut().zip(br) {
                    *xv += bv;
                }
            }
        }
        norm_row(o, m, r, xr, gamma, beta, eps);
    };
    if n * c < PAR_MIN {
        for (i, (((o, xr), m), r)) in
            out.chunks_exact_mut(c).zip(x.chunks_exact_mut(c)).zip(mean.iter_mut()).zip(rstd.iter_mut()).enumerate()
        {
            row(i, o, xr, m, r);
        }
    } else {
        out.par_chunks_exact_mut(c)
            .zip(x.par_chunks_exact_mut(c))
            .zip(mean.par_iter_mut())
            .zip(rstd.par_iter_mut())
            .enumerate()
            .with_min_len(ROWS_PER_TASK)
            .for_each(|(i, (((o, xr), m), r))| row(i, o, xr, m, r));
    }
}

/// One row: `o = (x - mean) * rstd * gamma + beta`, saving the mean and rstd.
fn norm_row(o: &mut [f32], m: &mut f32, r: &mut f32, x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let c = x.len();
    // A first estimate of the mean, then one pass over the deviations from it: their sum
    // corrects the estimate and their squares give the variance, free of the
    // cancellation of E[x^2] - E[x]^2 even for rows far from zero mean.
    let mu0 = lane_sum(x, |v| v) / c as f32;
    let dev = lane_sum(x, |v| v - mu0) / c as f32;
    let sq = lane_sum(x, |v| (v - mu0) * (v - mu0)) / c as f32;
    let mu = mu0 + dev;
    let var = (sq - dev * dev).max(0.0);
    let rs = 1.0 / (var + eps).sqrt();
    for (((o, &v), &g), &b) in o.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = (v - mu) * rs * g + b;
    }
    *m = mu;
    *r = rs;
}

/// Sums with eight independent accumulators: the compiler can keep them in one vector
/// register (a single f32 chain cannot be reordered), and each chain is 8x shorter, so the
/// rounding error of a long row is smaller too.
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for ch in chunks {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `(sum g, sum g * xhat)` over a row, with `g = gamma * dy` and `xhat = (x - mu) rstd`,
/// eight lanes at a time as in [`lane_sum`].
fn lane_sums2(x: &[f32], dy: &[f32], gamma: &[f32], mu: f32, rs: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
    let (xs, ds, gs) = (x.chunks_exact(8), dy.chunks_exact(8), gamma.chunks_exact(8));
    let (xr, dr, gr) = (xs.remainder(), ds.remainder(), gs.remainder());
    for ((xc, dc), gc) in xs.zip(ds).zip(gs) {
        for l in 0..8 {
            let g = gc[l] * dc[l];
            a[l] += g;
            b[l] += g * (xc[l] - mu) * rs;
        }
    }
    for l in 0..xr.len() {
        let g = gr[l] * dr[l];
        a[l] += g;
        b[l] += g * (xr[l] - mu) * rs;
    }
    let fold = |v: [f32; 8]| ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    (fold(a), fold(b))
}

/// Accumulates into `dinp`, `dgamma`, `dbeta`.
pub fn bwd(
    dinp: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    n: usize,
    c: usize,
) {
    if n == 0 || c == 0 {
        return;
    }
    let want_dgamma = dgamma.is_some();
    let want_dbeta = dbeta.is_some();
    // One block of rows: updates its rows of `dinp` and returns its partial dgamma / dbeta
    // (empty when not wanted).
    let block = |row0: usize, dinp: &mut [f32]| -> (Vec<f32>, Vec<f32>) {
        let mut dg = if want_dgamma { vec![0.0f32; c] } else { Vec::new() };
        let mut db = if want_dbeta { vec![0.0f32; c] } else { Vec::new() };
        for (k, di) in dinp.chunks_exact_mut(c).enumerate() {
            let i = row0 + k;
            let x = &inp[i * c..(i + 1) * c];
            let dy = &dout[i * c..(i + 1) * c];
            let (mu, rs) = (mean[i], rstd[i]);
            // With xhat = (x - mu) rstd and g = gamma * dy:
            // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
            let (g_sum, gx_sum) = lane_sums2(x, dy, gamma, mu, rs);
            let (g_mean, gx_mean) = (g_sum / c as f32, gx_sum / c as f32);
            // Separate loops without branches, so that each vectorises.
            for (((o, &v), &d), &gm) in di.iter_mut().zip(x).zip(dy).zip(gamma) {
                *o += rs * (gm * d - g_mean - (v - mu) * rs * gx_mean);
            }
            if want_dgamma {
                for ((a, &v), &d) in dg.iter_mut().zip(x).zip(dy) {
                    *a += (v - mu) * rs * d;
                }
            }
            if want_dbeta {
                for (a, &d) in db.iter_mut().zip(dy) {
                    *a += d;
                }
            }
        }
        (dg, db)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if n * c < PAR_MIN {
        vec![block(0, dinp)]
    } else {
        dinp.par_chunks_mut(ROWS_PER_TASK * c).enumerate().map(|(k, d)| block(k * ROWS_PER_TASK, d)).collect()
    };
    // Reduce the per-block sums in block order: deterministic for any thread count.
    if let Some(dgamma) = dgamma {
        for (dg, _) in &partials {
            for (a, v) in dgamma.iter_mut().zip(dg) {
                *a += v;
            }
        }
    }
    if let Some(dbeta) = dbeta {
        for (_, db) in &partials {
            for (a, v) in dbeta.iter_mut().zip(db) {
                *a += v;
            }
        }
    }
}
