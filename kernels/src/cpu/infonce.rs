//! The distributed InfoNCE loss as one similarity block per rank, in tiles.
//!
//! Rank r holds its `local` image rows and the gathered text columns. Its block
//! `S = s * img_r . TXT^T` (`local x global`, `s = exp(logit_scale)`) carries both directions:
//! row i is image i's logits against every text (complete on this rank), and column j is
//! text j's logits against this rank's images (a slice of the text's row: the other ranks
//! hold the rest). So the forward takes the row log-sum-exps whole and, per column, the
//! maximum and the sum of `exp(S_ij - max_j)` over the local rows, which the caller combines
//! across ranks (an all-reduce of the maxima, [`col_rescale`], an all-reduce of the sums)
//! into the column log-sum-exps ([`block_loss`]). The backward recomputes each tile of `S`
//! once and uses it for both directions' gradients.
//!
//! The block is never held whole: it is walked in `TILE_ROWS x TILE_COLS` tiles (gemm). Work
//! is split over a fixed number of column ranges ([`col_splits`]), so sums come out the same
//! for any thread count.
#![allow(clippy::too_many_arguments)]

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::fastexp::exp;
use super::lanes::{self, lanes, LANES};
use super::linear::{matmul, View};
use crate::backend::InfoNceDims;

/// Rows (local images) per tile. Larger tiles spread gemm's packing over more work: 256 x 256
/// ran the block ~10% faster than 64 x 256 here (BENCHMARKS.md, issue 11).
const TILE_ROWS: usize = 256;
/// Columns (gathered texts) per tile: a 256 x 256 f32 tile is 256 KiB, L2-resident.
const TILE_COLS: usize = 256;
/// The most column ranges the work is split into (the unit of parallel work): a fixed
/// number, not the thread count, so that every sum has one order.
const MAX_SPLITS: usize = 16;
/// Rows per backward round: each split accumulates its image-gradient partial for this many
/// rows (`MAX_SPLITS x ROW_BLOCK x dim` f32 at most, 16 MiB at width 512).
const ROW_BLOCK: usize = 512;

/// The column ranges of the splits: whole column tiles, as evenly as they go.
fn col_splits(global: usize) -> Vec<Range<usize>> {
    let tiles = global.div_ceil(TILE_COLS);
    let n = tiles.clamp(1, MAX_SPLITS);
    (0..n)
        .map(|k| {
            let (a, b) = (k * tiles / n, (k + 1) * tiles / n);
            (a * TILE_COLS).min(global)..(b * TILE_COLS).min(global)
        })
        .collect()
}

/// Cuts `v` (rows of `width`) into the disjoint pieces of `ranges` (sorted, adjacent, from 0).
fn split_rows_mut<'a>(mut v: &'a mut [f32], ranges: &[Range<usize>], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = std::mem::take(&mut v).split_at_mut(r.len() * width);
        out.push(head);
        v = tail;
    }
    out
}

/// This rank's block.
#[derive(Clone, Copy)]
struct Block<'a> {
    img: &'a [f32],
    txt: &'a [f32],
    dims: InfoNceDims,
    /// `exp(logit_scale)`.
    s: f32,
}

impl Block<'_> {
    /// `tile[r, cc] = s * img[r0..r0+r] . txt[c0..c0+cc]^T`.
    fn logits(&self, tile: &mut [f32], r0: usize, r: usize, c0: usize, cc: usize) {
        let d = self.dims.dim;
        let x = View::rows(&self.img[r0 * d..(r0 + r) * d], d);
        let y_t = View::transposed(&self.txt[c0 * d..(c0 + cc) * d], d);
        matmul(r, cc, d, &mut tile[..r * cc], cc, false, x, y_t, self.s, Parallelism::None);
    }

    /// The column of local row `i`'s positive text inside the tile starting at column `c0`.
    fn target(&self, i: usize, c0: usize, cc: usize) -> Option<usize> {
        (self.dims.offset + i).checked_sub(c0).filter(|&k| k < cc)
    }
}

/// One split's forward: the column statistics of its columns (complete: every local row is
/// walked), and the running row statistics over its columns.
struct SplitFwd {
    row_max: Vec<f32>,
    row_sum: Vec<f32>,
    /// `(local row, positive logit)` for the targets inside this split.
    pos: Vec<(usize, f32)>,
}

lanes! {
    /// One tile's share of the forward: the column statistics `(cm, cs)` of the tile's columns
    /// and the running row statistics `(row_max, row_sum)` of its rows, updated online (a
    /// new maximum rescales the sum before the tile's exponentials are added).
    fn fwd_tile(
        t: &[f32],
        cc: usize,
        cm: &mut [f32],
        cs: &mut [f32],
        tile_max: &mut [f32],
        row_max: &mut [f32],
        row_sum: &mut [f32],
    ) {
        // Columns: the tile's maximum first, then one pass of exponentials.
        tile_max.copy_from_slice(cm);
        for row in t.chunks_exact(cc) {
            tile_max.iter_mut().zip(row).for_each(|(m, &v)| *m = lanes::max(*m, v));
        }
        for ((s, m), &new) in cs.iter_mut().zip(cm.iter_mut()).zip(tile_max.iter()) {
            // The first tile's maximum replaces -inf, whose sum is an empty 0 (and
            // exp(-inf - -inf) would be NaN).
            *s *= if *m == new { 1.0 } else { exp(*m - new) };
            *m = new;
        }
        for row in t.chunks_exact(cc) {
            cs.iter_mut().zip(row).zip(cm.iter()).for_each(|((s, &v), &m)| *s += exp(v - m));
        }
        // Rows.
        for ((row, max), sum) in t.chunks_exact(cc).zip(row_max.iter_mut()).zip(row_sum.iter_mut()) {
            let m = lanes::max_of(row, *max);
            if m == f32::NEG_INFINITY {
                continue;
            }
            // exp(-inf) = 0 clears the empty sum of the first update.
            *sum = *sum * exp(*max - m) + lanes::sum_map(row, |x| exp(x - m));
            *max = m;
        }
    }
}

/// The block's forward. Writes the row log-sum-exps `row_lse[local]`, the positive logits
/// `pos[local]` (`S[i, offset + i]`), and per column the maximum over the local rows
/// `col_max[global]` and the sum `col_sum[global]` of `exp(S_ij - col_max_j)` over them.
pub fn block_fwd(
    row_lse: &mut [f32],
    pos: &mut [f32],
    col_max: &mut [f32],
    col_sum: &mut [f32],
    img: &[f32],
    all_txt: &[f32],
    logit_scale: f32,
    dims: InfoNceDims,
) {
    let InfoNceDims { local, global, .. } = dims;
    assert!(global > 0 && dims.dim > 0 && local > 0, "infonce over an empty batch or zero-width features: {dims:?}");
    let blk = Block { img, txt: all_txt, dims, s: logit_scale.exp() };
    let splits = col_splits(global);
    let maxes = split_rows_mut(col_max, &splits, 1);
    let sums = split_rows_mut(col_sum, &splits, 1);
    let parts: Vec<SplitFwd> = splits
        .par_iter()
        .zip(maxes)
        .zip(sums)
        .map(|((cols, cmax), csum)| {
            let mut out =
                SplitFwd { row_max: vec![f32::NEG_INFINITY; local], row_sum: vec![0.0; local], pos: Vec::new() };
            let mut tile = vec![0.0f32; TILE_ROWS * TILE_COLS];
            let mut tile_max = vec![0.0f32; TILE_COLS];
            for c0 in cols.clone().step_by(TILE_COLS) {
                let cc = TILE_COLS.min(cols.end - c0);
                let at = c0 - cols.start;
                let (cm, cs) = (&mut cmax[at..at + cc], &mut csum[at..at + cc]);
                cm.fill(f32::NEG_INFINITY);
                cs.fill(0.0);
                for r0 in (0..local).step_by(TILE_ROWS) {
                    let r = TILE_ROWS.min(local - r0);
                    blk.logits(&mut tile, r0, r, c0, cc);
                    let t = &tile[..r * cc];
                    let rows = r0..r0 + r;
                    fwd_tile(
                        t,
                        cc,
                        cm,
                        cs,
                        &mut tile_max[..cc],
                        &mut out.row_max[rows.clone()],
                        &mut out.row_sum[rows],
                    );
                    for (i, row) in t.chunks_exact(cc).enumerate() {
                        // The positive logit comes from the same product as the others, so
                        // that lse - positive is consistent (non-negative up to rounding).
                        if let Some(k) = blk.target(r0 + i, c0, cc) {
                            out.pos.push((r0 + i, row[k]));
                        }
                    }
                }
            }
            out
        })
        .collect();
    // The splits' row statistics merged in split order: the same result for any thread count.
    for (i, lse) in row_lse.iter_mut().enumerate() {
        let m = parts.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.row_max[i]));
        let sum: f32 = parts.iter().map(|p| p.row_sum[i] * exp(p.row_max[i] - m)).sum();
        *lse = m + sum.ln();
    }
    for (i, v) in parts.iter().flat_map(|p| &p.pos) {
        pos[*i] = *v;
    }
}

/// `col_sum[j] *= exp(col_max[j] - global_max[j])`: this rank's column sums rescaled to the
/// maxima over all ranks, ready to be summed over them.
pub fn col_rescale(col_sum: &mut [f32], col_max: &[f32], global_max: &[f32]) {
    for ((s, &m), &g) in col_sum.iter_mut().zip(col_max).zip(global_max) {
        if m != g {
            *s *= exp(m - g);
        }
    }
}

/// From the column statistics summed over the ranks: writes the column log-sum-exps
/// `col_lse[j] = global_max[j] + ln(col_sum[j])` and returns this rank's loss share,
/// `sum_i (row_lse_i - pos_i + col_lse_{offset+i} - pos_i) / (2 global)`.
pub fn block_loss(
    col_lse: &mut [f32],
    row_lse: &[f32],
    pos: &[f32],
    global_max: &[f32],
    col_sum: &[f32],
    dims: InfoNceDims,
) -> f32 {
    for ((l, &m), &s) in col_lse.iter_mut().zip(global_max).zip(col_sum) {
        *l = m + s.ln();
    }
    let own = &col_lse[dims.offset..dims.offset + dims.local];
    let total: f64 = (0..dims.local).map(|i| (row_lse[i] - pos[i]) as f64 + (own[i] - pos[i]) as f64).sum();
    (total / (2 * dims.global) as f64) as f32
}

lanes! {
    /// Turns a logit tile into `coef * (p_row + p_col - 2 [j == offset + i])` in place, with
    /// `p_row = exp(S - row_lse_i)` and `p_col = exp(S - col_lse_j)`; returns the sum of that
    /// times the logit (the log-scale gradient's share). Row i's positive is column `diag + i`
    /// of the tile when that lies inside it (`diag` = offset + first row - first column).
    fn grad_tile(tile: &mut [f32], cc: usize, row_lse: &[f32], col_lse: &[f32], diag: isize, coef: f32) -> f64 {
        let mut dscale = 0.0f64;
        for (i, (row, &rl)) in tile.chunks_exact_mut(cc).zip(row_lse).enumerate() {
            let target = usize::try_from(diag + i as isize).ok().filter(|&k| k < cc);
            // The positive's term, read before the row is overwritten with gradients.
            let pos_term = target.map_or(0.0, |k| -2.0 * coef * row[k]);
            let grad = |v: f32, c: f32| coef * (exp(v - rl) + exp(v - c));
            let mut acc = [0.0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            let mut cols = col_lse.chunks_exact(LANES);
            for (vs, cs) in chunks.by_ref().zip(cols.by_ref()) {
                for k in 0..LANES {
                    let g = grad(vs[k], cs[k]);
                    acc[k] += g * vs[k];
                    vs[k] = g;
                }
            }
            for ((v, &c), a) in chunks.into_remainder().iter_mut().zip(cols.remainder()).zip(&mut acc) {
                let g = grad(*v, c);
                *a += g * *v;
                *v = g;
            }
            if let Some(k) = target {
                row[k] -= 2.0 * coef;
            }
            dscale += (pos_term + lanes::hsum(acc)) as f64;
        }
        dscale
    }
}

/// Accumulates the gradients of `dloss * loss` (the loss of [`block_loss`]): into the local
/// image rows `d_img[local, dim]` and the gathered text columns `d_all_txt[global, dim]`
/// (which the caller reduce-scatters to the texts' owners); returns d loss / d logit_scale
/// (the log of the scale, so it includes the factor `exp(logit_scale)`).
pub fn block_bwd(
    d_img: &mut [f32],
    d_all_txt: &mut [f32],
    dloss: f32,
    img: &[f32],
    all_txt: &[f32],
    logit_scale: f32,
    row_lse: &[f32],
    col_lse: &[f32],
    dims: InfoNceDims,
) -> f32 {
    let InfoNceDims { local, global, dim: d, .. } = dims;
    assert!(global > 0 && d > 0 && local > 0, "infonce over an empty batch or zero-width features: {dims:?}");
    let blk = Block { img, txt: all_txt, dims, s: logit_scale.exp() };
    // d loss / d S_ij = dloss * (p_row + p_col - 2 delta_ij) / (2 global); d S / d img = s txt.
    let coef = (dloss as f64 / (2 * global) as f64) as f32;
    let splits = col_splits(global);
    let mut d_txt_parts = split_rows_mut(d_all_txt, &splits, d);
    let mut partials = vec![vec![0.0f32; ROW_BLOCK.min(local) * d]; splits.len()];
    let mut dscale = 0.0f64;
    for b0 in (0..local).step_by(ROW_BLOCK) {
        let rb = ROW_BLOCK.min(local - b0);
        let parts: Vec<f64> = splits
            .par_iter()
            .zip(d_txt_parts.par_iter_mut())
            .zip(partials.par_iter_mut())
            .map(|((cols, dy), dx)| {
                let dx = &mut dx[..rb * d];
                dx.fill(0.0);
                let mut tile = vec![0.0f32; TILE_ROWS * TILE_COLS];
                let mut ds = 0.0f64;
                for c0 in cols.clone().step_by(TILE_COLS) {
                    let cc = TILE_COLS.min(cols.end - c0);
                    let at = (c0 - cols.start) * d;
                    let dy = &mut dy[at..at + cc * d];
                    let y = View::rows(&all_txt[c0 * d..(c0 + cc) * d], d);
                    for r0 in (b0..b0 + rb).step_by(TILE_ROWS) {
                        let r = TILE_ROWS.min(b0 + rb - r0);
                        blk.logits(&mut tile, r0, r, c0, cc);
                        let g = &mut tile[..r * cc];
                        let diag = (dims.offset + r0) as isize - c0 as isize;
                        ds += grad_tile(g, cc, &row_lse[r0..r0 + r], &col_lse[c0..c0 + cc], diag, coef);
                        let x = View::rows(&img[r0 * d..(r0 + r) * d], d);
                        let dxr = &mut dx[(r0 - b0) * d..(r0 - b0 + r) * d];
                        matmul(r, d, cc, dxr, d, true, View::rows(g, cc), y, blk.s, Parallelism::None);
                        matmul(cc, d, r, dy, d, true, View::transposed(g, cc), x, blk.s, Parallelism::None);
                    }
                }
                ds
            })
            .collect();
        dscale += parts.iter().sum::<f64>();
        // The splits' image gradients added in split order.
        d_img[b0 * d..(b0 + rb) * d].par_chunks_mut(d).enumerate().for_each(|(i, out)| {
            for p in &partials {
                out.iter_mut().zip(&p[i * d..(i + 1) * d]).for_each(|(o, &v)| *o += v);
            }
        });
    }
    dscale as f32
}
