//! The distributed InfoNCE loss in tiles with an online log-sum-exp.
//!
//! The loss has two directions that share nothing but the scale: image rows against the
//! gathered text columns, and text rows against the gathered image columns. Each direction
//! is a cross-entropy over `local x global` logits `s * x_i . y_j` with target column
//! `offset + i`; it is computed in `TILE_ROWS x TILE_COLS` tiles (gemm) and never held whole.
//! The two directions run concurrently (`rayon::join`), and each is parallel over tiles.
#![allow(clippy::too_many_arguments)]

use gemm::Parallelism;
use rayon::prelude::*;

use super::linear::{matmul, View};
use crate::backend::InfoNceDims;

/// Rows (local features) per tile.
const TILE_ROWS: usize = 64;
/// Columns (gathered features) per tile: a 64 x 256 f32 tile is 64 KiB, L2-resident.
const TILE_COLS: usize = 256;

/// One direction of the loss: `x` the local rows `[local, dim]`, `y` the gathered columns
/// `[global, dim]`.
#[derive(Clone, Copy)]
struct Direction<'a> {
    x: &'a [f32],
    y: &'a [f32],
    dims: InfoNceDims,
    /// `exp(logit_scale)`.
    s: f32,
}

impl Direction<'_> {
    /// `tile[r, cc] = s * x[r0..r0+r] . y[c0..c0+cc]^T`.
    fn logits(&self, tile: &mut [f32], r0: usize, r: usize, c0: usize, cc: usize) {
        let d = self.dims.dim;
        let x = View::rows(&self.x[r0 * d..(r0 + r) * d], d);
        let y_t = View::transposed(&self.y[c0 * d..(c0 + cc) * d], d);
        matmul(r, cc, d, &mut tile[..r * cc], cc, false, x, y_t, self.s, Parallelism::None);
    }

    /// Writes the row log-sum-exps; returns `sum_i lse_i - logit_{i, offset + i}`.
    fn fwd(&self, lse: &mut [f32]) -> f64 {
        let g = self.dims.global;
        let parts: Vec<f64> = lse
            .par_chunks_mut(TILE_ROWS)
            .enumerate()
            .map(|(rt, lse)| {
                let (r0, r) = (rt * TILE_ROWS, lse.len());
                let mut tile = vec![0.0f32; r * TILE_COLS];
                // Online log-sum-exp: running maximum and sum of exp(logit - maximum).
                let mut max = vec![f32::NEG_INFINITY; r];
                let mut sum = vec![0.0f32; r];
                let mut positive = vec![0.0f32; r];
                for c0 in (0..g).step_by(TILE_COLS) {
                    let cc = TILE_COLS.min(g - c0);
                    self.logits(&mut tile, r0, r, c0, cc);
                    for (i, row) in tile[..r * cc].chunks_exact(cc).enumerate() {
                        let m = row.iter().fold(max[i], |m, &v| m.max(v));
                        // exp(-inf) = 0 clears the empty sum of the first tile.
                        sum[i] = sum[i] * (max[i] - m).exp() + row.iter().map(|&v| (v - m).exp()).sum::<f32>();
                        max[i] = m;
                        // The positive logit comes from the same product as the others, so
                        // that lse - positive is consistent (non-negative up to rounding).
                        let target = self.dims.offset + r0 + i;
                        if (c0..c0 + cc).contains(&target) {
                            positive[i] = row[target - c0];
                        }
                    }
                }
                let mut part = 0.0f64;
                for i in 0..r {
                    lse[i] = max[i] + sum[i].ln();
                    part += (lse[i] - positive[i]) as f64;
                }
                part
            })
            .collect();
        // Summed in tile order: the same result for any thread count.
        parts.iter().sum()
    }

    /// Turns a logit tile into `p_ij - [j == offset + i]` in place (`p` from the saved
    /// log-sum-exps); returns `sum (p_ij - delta_ij) * logit_ij` (the log-scale gradient).
    fn probs_minus_targets(&self, tile: &mut [f32], lse: &[f32], r0: usize, c0: usize, cc: usize) -> f64 {
        let mut dscale = 0.0f64;
        for (i, row) in tile.chunks_exact_mut(cc).enumerate() {
            let l = lse[r0 + i];
            let target = (self.dims.offset + r0 + i).checked_sub(c0).filter(|&k| k < cc);
            // Read the positive logit before the row is overwritten with probabilities.
            let mut acc = target.map_or(0.0, |k| -row[k]);
            for v in row.iter_mut() {
                let p = (*v - l).exp();
                acc += p * *v;
                *v = p;
            }
            if let Some(k) = target {
                row[k] -= 1.0;
            }
            dscale += acc as f64;
        }
        dscale
    }

    /// Accumulates `coef * G . y` into `d_rows` and `coef * G^T . x` into `d_cols` with
    /// `G = P - I_offset`; returns `sum G_ij * logit_ij`.
    fn bwd(&self, d_rows: &mut [f32], d_cols: &mut [f32], lse: &[f32], coef: f32) -> f64 {
        let InfoNceDims { local, global: g, dim: d, .. } = self.dims;
        // Pass 1, parallel over row tiles: the local rows' gradients and the scale's.
        let parts: Vec<f64> = d_rows
            .par_chunks_mut(TILE_ROWS * d)
            .enumerate()
            .map(|(rt, dr)| {
                let (r0, r) = (rt * TILE_ROWS, dr.len() / d);
                let mut tile = vec![0.0f32; r * TILE_COLS];
                let mut dscale = 0.0f64;
                for c0 in (0..g).step_by(TILE_COLS) {
                    let cc = TILE_COLS.min(g - c0);
                    self.logits(&mut tile, r0, r, c0, cc);
                    let tile = &mut tile[..r * cc];
                    dscale += self.probs_minus_targets(tile, lse, r0, c0, cc);
                    let y = View::rows(&self.y[c0 * d..(c0 + cc) * d], d);
                    matmul(r, d, cc, dr, d, true, View::rows(tile, cc), y, coef, Parallelism::None);
                }
                dscale
            })
            .collect();
        // Pass 2, parallel over column tiles: each tile of `d_cols` is owned by one task, so
        // the accumulation is race-free and its order fixed. The logits are recomputed (a
        // third more arithmetic than one pass) rather than kept: that would be local x global.
        d_cols.par_chunks_mut(TILE_COLS * d).enumerate().for_each(|(ct, dc)| {
            let (c0, cc) = (ct * TILE_COLS, dc.len() / d);
            let mut tile = vec![0.0f32; TILE_ROWS * cc];
            for r0 in (0..local).step_by(TILE_ROWS) {
                let r = TILE_ROWS.min(local - r0);
                self.logits(&mut tile, r0, r, c0, cc);
                let tile = &mut tile[..r * cc];
                self.probs_minus_targets(tile, lse, r0, c0, cc);
                let x = View::rows(&self.x[r0 * d..(r0 + r) * d], d);
                matmul(cc, d, r, dc, d, true, View::transposed(tile, cc), x, coef, Parallelism::None);
            }
        });
        parts.iter().sum()
    }
}

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
    assert!(dims.global > 0 && dims.dim > 0, "infonce over an empty batch or zero-width features: {dims:?}");
    let s = logit_scale.exp();
    let i2t = Direction { x: img, y: all_txt, dims, s };
    let t2i = Direction { x: txt, y: all_img, dims, s };
    let (a, b) = rayon::join(|| i2t.fwd(lse_img), || t2i.fwd(lse_txt));
    ((a + b) / (2 * dims.global) as f64) as f32
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
    assert!(dims.global > 0 && dims.dim > 0, "infonce over an empty batch or zero-width features: {dims:?}");
    let s = logit_scale.exp();
    let i2t = Direction { x: img, y: all_txt, dims, s };
    let t2i = Direction { x: txt, y: all_img, dims, s };
    // d loss / d logit_ij = dloss * (p_ij - delta_ij) / (2 global), and d logit / d x = s y.
    let norm = dloss as f64 / (2 * dims.global) as f64;
    let coef = (norm * s as f64) as f32;
    let (a, b) = rayon::join(|| i2t.bwd(d_img, d_all_txt, lse_img, coef), || t2i.bwd(d_txt, d_all_img, lse_txt, coef));
    // d logit_ij / d logit_scale = logit_ij.
    ((a + b) * norm) as f32
}
