//! The one-block InfoNCE op, run as a world of ranks would run it (each rank its block of
//! local images against all texts, the column statistics combined across the ranks), against
//! the materialised symmetric loss in f64: the two-direction definition the earlier two-block
//! op computed (each rank's images against all texts and its texts against all images).

use kernels::cpu::infonce;
use kernels::InfoNceDims;

use crate::common::*;

/// Everything the materialised f64 loss of the whole batch gives: the global mean loss, both
/// directions' log-sum-exps (image rows, text rows = the block's columns) and the gradients of
/// `dloss * loss`.
struct Reference {
    loss: f64,
    lse_img: Vec<f64>,
    lse_txt: Vec<f64>,
    d_img: Vec<f64>,
    d_txt: Vec<f64>,
    d_scale: f64,
}

/// One direction over the full `n x n` matrix: returns the sum of `lse_i - logit_ii` and
/// accumulates the gradients.
#[allow(clippy::too_many_arguments)]
fn direction(
    x: &[f64],
    y: &[f64],
    n: usize,
    d: usize,
    ls: f64,
    dloss: f64,
    lse: &mut [f64],
    dx: &mut [f64],
    dy: &mut [f64],
    dscale: &mut f64,
) -> f64 {
    let s = ls.exp();
    let mut total = 0.0;
    for i in 0..n {
        let logits: Vec<f64> = (0..n).map(|j| s * (0..d).map(|k| x[i * d + k] * y[j * d + k]).sum::<f64>()).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[i] = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        total += lse[i] - logits[i];
        for j in 0..n {
            let g = ((logits[j] - lse[i]).exp() - if j == i { 1.0 } else { 0.0 }) * dloss / (2 * n) as f64;
            *dscale += g * logits[j];
            for k in 0..d {
                dx[i * d + k] += g * s * y[j * d + k];
                dy[j * d + k] += g * s * x[i * d + k];
            }
        }
    }
    total
}

fn reference(all_img: &[f32], all_txt: &[f32], n: usize, d: usize, ls: f32, dloss: f64) -> Reference {
    let mut r = Reference {
        loss: 0.0,
        lse_img: vec![0.0; n],
        lse_txt: vec![0.0; n],
        d_img: vec![0.0; n * d],
        d_txt: vec![0.0; n * d],
        d_scale: 0.0,
    };
    let (i64_, t64, ls) = (to64(all_img), to64(all_txt), ls as f64);
    let a = direction(&i64_, &t64, n, d, ls, dloss, &mut r.lse_img, &mut r.d_img, &mut r.d_txt, &mut r.d_scale);
    let b = direction(&t64, &i64_, n, d, ls, dloss, &mut r.lse_txt, &mut r.d_txt, &mut r.d_img, &mut r.d_scale);
    r.loss = (a + b) / (2 * n) as f64;
    r
}

/// The loss alone in f64 from f64 inputs, for finite differences.
fn loss64(all_img: &[f64], all_txt: &[f64], n: usize, d: usize, ls: f64) -> f64 {
    let s = ls.exp();
    let dir = |x: &[f64], y: &[f64]| -> f64 {
        (0..n)
            .map(|i| {
                let logits: Vec<f64> =
                    (0..n).map(|j| s * (0..d).map(|k| x[i * d + k] * y[j * d + k]).sum::<f64>()).collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() - logits[i]
            })
            .sum()
    };
    (dir(all_img, all_txt) + dir(all_txt, all_img)) / (2 * n) as f64
}

/// Unit rows, as the model feeds the loss.
fn features(cx: &mut Ctx, n: usize, d: usize) -> Vec<f32> {
    let mut x = cx.vec(n * d);
    for row in x.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    x
}

/// What a world of ranks computes, assembled: the summed loss, the row log-sum-exps of every
/// rank in order, the column log-sum-exps (the same on every rank), every image's gradient
/// (its rank's rows) and every text's (the sum of the ranks' column gradients: the
/// reduce-scatter), and the summed log-scale gradient.
struct World {
    loss: f32,
    row_lse: Vec<f32>,
    col_lse: Vec<f32>,
    d_img: Vec<f32>,
    d_txt: Vec<f32>,
    d_scale: f32,
}

/// Runs `ranks` ranks of `n / ranks` pairs on `all_img`, `all_txt` (`n x d`), the column
/// statistics combined as the step combines them (maxima, rescale, sums in rank order). The
/// gradient outputs of rank 0 start at `start` (`(d_img rows, d_all_txt)`), as a caller's
/// accumulating buffers would; the assembled gradients include that start.
#[allow(clippy::too_many_arguments)]
fn world(
    all_img: &[f32],
    all_txt: &[f32],
    n: usize,
    d: usize,
    ranks: usize,
    ls: f32,
    dloss: f32,
    start: Option<(&[f32], &[f32])>,
) -> World {
    assert_eq!(n % ranks, 0);
    let b = n / ranks;
    let dims = |r: usize| InfoNceDims { local: b, global: n, dim: d, offset: r * b };
    let img = |r: usize| &all_img[r * b * d..(r + 1) * b * d];
    let mut row_lse = vec![0.0f32; n];
    let mut pos = vec![0.0f32; n];
    let (mut col_max, mut col_sum) = (vec![vec![0.0f32; n]; ranks], vec![vec![0.0f32; n]; ranks]);
    for r in 0..ranks {
        let rows = r * b..(r + 1) * b;
        infonce::block_fwd(
            &mut row_lse[rows.clone()],
            &mut pos[rows],
            &mut col_max[r],
            &mut col_sum[r],
            img(r),
            all_txt,
            ls,
            dims(r),
        );
    }
    // The all-reduce of the maxima, each rank's rescale, the all-reduce of the sums.
    let gmax: Vec<f32> = (0..n).map(|j| (0..ranks).map(|r| col_max[r][j]).fold(f32::NEG_INFINITY, f32::max)).collect();
    for r in 0..ranks {
        infonce::col_rescale(&mut col_sum[r], &col_max[r], &gmax);
    }
    let gsum: Vec<f32> = (0..n).map(|j| (0..ranks).map(|r| col_sum[r][j]).sum()).collect();
    let mut out = World {
        loss: 0.0,
        row_lse: row_lse.clone(),
        col_lse: vec![0.0; n],
        d_img: vec![0.0; n * d],
        d_txt: vec![0.0; n * d],
        d_scale: 0.0,
    };
    let mut loss = 0.0f64;
    let mut d_scale = 0.0f64;
    for r in 0..ranks {
        let rows = r * b..(r + 1) * b;
        let mut col_lse = vec![0.0f32; n];
        loss +=
            infonce::block_loss(&mut col_lse, &row_lse[rows.clone()], &pos[rows.clone()], &gmax, &gsum, dims(r)) as f64;
        if r == 0 {
            out.col_lse = col_lse.clone();
        } else {
            assert_eq!(out.col_lse, col_lse, "every rank computes the same column log-sum-exps");
        }
        let (mut di, mut dt) = match (r, start) {
            (0, Some((si, st))) => (si.to_vec(), st.to_vec()),
            _ => (vec![0.0f32; b * d], vec![0.0f32; n * d]),
        };
        let ds = infonce::block_bwd(&mut di, &mut dt, dloss, img(r), all_txt, ls, &row_lse[rows], &col_lse, dims(r));
        d_scale += ds as f64;
        out.d_img[r * b * d..(r + 1) * b * d].copy_from_slice(&di);
        out.d_txt.iter_mut().zip(&dt).for_each(|(o, v)| *o += v);
    }
    out.loss = loss as f32;
    out.d_scale = d_scale as f32;
    out
}

/// Worlds of 1, 2 and 4 ranks against the materialised f64 loss of the whole batch: the loss,
/// both directions' log-sum-exps and every gradient. 600 texts are three column tiles (the
/// last partial, 88 columns); 600 images on one rank are two backward row blocks and three row
/// tiles (the last partial), 150 per rank on four ranks one partial tile.
#[test]
fn infonce_block_worlds_match_materialised() {
    let mut cx = ctx();
    for (n, d, ls) in [(600, 32, (1.0f32 / 0.07).ln()), (600, 16, 100f32.ln()), (4, 4, 0.3), (64, 8, 1.0)] {
        let (all_img, all_txt) = (features(&mut cx, n, d), features(&mut cx, n, d));
        let dloss = 0.75;
        let want = reference(&all_img, &all_txt, n, d, ls, dloss as f64);
        for ranks in [1, 2, 4] {
            println!("global {n} dim {d} logit_scale {ls} ranks {ranks}");
            let got = world(&all_img, &all_txt, n, d, ranks, ls, dloss, None);
            let at = format!("({ranks} ranks, global {n}, dim {d})");
            assert_close(&cx, &format!("loss {at}"), &[got.loss], &[want.loss], 1e-6, 1e-5);
            assert_close(&cx, &format!("row lse {at}"), &got.row_lse, &want.lse_img, 1e-5, 1e-5);
            assert_close(&cx, &format!("col lse {at}"), &got.col_lse, &want.lse_txt, 1e-5, 1e-5);
            let (atol, rtol) = (1e-6, 1e-4);
            assert_close(&cx, &format!("d_img {at}"), &got.d_img, &want.d_img, atol, rtol);
            assert_close(&cx, &format!("d_txt {at}"), &got.d_txt, &want.d_txt, atol, rtol);
            assert_close(&cx, &format!("d_logit_scale {at}"), &[got.d_scale], &[want.d_scale], 1e-6, 1e-4);
        }
    }
}

/// The backward adds into its gradient outputs: buffers that hold values (of the gradients'
/// own magnitude, about 1 / global, so that the relative tolerance still bites) keep them.
#[test]
fn infonce_block_bwd_accumulates() {
    let mut cx = ctx();
    let (n, d, ranks) = (300, 24, 2);
    let (all_img, all_txt) = (features(&mut cx, n, d), features(&mut cx, n, d));
    let a = 1.0 / n as f32;
    let (si, st) = (cx.uniform(n / ranks * d, -a, a), cx.uniform(n * d, -a, a));
    let got = world(&all_img, &all_txt, n, d, ranks, 2.0, 1.0, Some((&si, &st)));
    let want = reference(&all_img, &all_txt, n, d, 2.0, 1.0);
    let mut want_img = want.d_img.clone();
    want_img.iter_mut().zip(&si).for_each(|(w, &s)| *w += s as f64);
    let want_txt: Vec<f64> = want.d_txt.iter().zip(&st).map(|(w, &s)| w + s as f64).collect();
    assert_close(&cx, "d_img with a start", &got.d_img, &want_img, 1e-6, 1e-4);
    assert_close(&cx, "d_txt with a start", &got.d_txt, &want_txt, 1e-6, 1e-4);
}

/// Finite differences of the f64 loss for every feature and the log scale, through a world of
/// `ranks` ranks (unnormalised features of varied norms: the op must not assume unit rows).
fn fd_case(n: usize, ranks: usize, d: usize, coords: usize) {
    let mut cx = ctx();
    println!("infonce global {n} ranks {ranks} dim {d}");
    let (all_img, all_txt) = (cx.vec(n * d), cx.vec(n * d));
    let (ls, dloss) = (1.2f32, 0.6f32);
    let got = world(&all_img, &all_txt, n, d, ranks, ls, dloss, None);
    let (i64_, t64, ls64, k) = (to64(&all_img), to64(&all_txt), ls as f64, dloss as f64);
    assert_close(&cx, "infonce loss", &[got.loss], &[loss64(&i64_, &t64, n, d, ls64)], 1e-6, 1e-5);
    let f_img = |x: &[f64]| k * loss64(x, &t64, n, d, ls64);
    let f_txt = |x: &[f64]| k * loss64(&i64_, x, n, d, ls64);
    let f_ls = |x: &[f64]| k * loss64(&i64_, &t64, n, d, x[0]);
    let (atol, rtol) = (1e-6, 1e-4);
    let zeros = vec![0.0f32; n * d];
    let idx = cx.coords(n * d, coords);
    check_grad(&cx, "infonce d_img", &f_img, &all_img, &zeros, &got.d_img, &idx, atol, rtol);
    check_grad(&cx, "infonce d_txt", &f_txt, &all_txt, &zeros, &got.d_txt, &idx, atol, rtol);
    check_grad(&cx, "infonce d_logit_scale", &f_ls, &[ls], &[0.0], &[got.d_scale], &[0], 1e-6, 1e-4);
}

#[test]
fn infonce_block_finite_differences_small() {
    fd_case(15, 3, 6, usize::MAX);
    fd_case(1, 1, 3, usize::MAX);
    fd_case(6, 2, 2, usize::MAX);
}

#[test]
fn infonce_block_finite_differences_tiled() {
    // Three ranks of 100: a partial row tile, two column tiles (the last partial).
    fd_case(300, 3, 8, 12);
}

/// Sums run in a fixed order (column splits, row blocks, split order): the same bits on every
/// run, whatever the threads do.
#[test]
fn infonce_block_is_deterministic() {
    let mut cx = ctx();
    let (n, d) = (1200, 16);
    let (all_img, all_txt) = (features(&mut cx, n, d), features(&mut cx, n, d));
    let first = world(&all_img, &all_txt, n, d, 2, 2.0, 1.0, None);
    for _ in 0..3 {
        let again = world(&all_img, &all_txt, n, d, 2, 2.0, 1.0, None);
        assert!(
            again.loss == first.loss
                && again.row_lse == first.row_lse
                && again.col_lse == first.col_lse
                && again.d_img == first.d_img
                && again.d_txt == first.d_txt
                && again.d_scale == first.d_scale,
            "infonce differs between runs"
        );
    }
}
