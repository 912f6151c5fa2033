use kernels::cpu::infonce;
use kernels::InfoNceDims;

use crate::common::*;

/// Everything the materialised f64 loss gives: the loss share, the row log-sum-exps and the
/// gradients of `dloss * loss`.
struct Reference {
    loss: f64,
    lse_img: Vec<f64>,
    lse_txt: Vec<f64>,
    d_img: Vec<f64>,
    d_txt: Vec<f64>,
    d_all_img: Vec<f64>,
    d_all_txt: Vec<f64>,
    d_scale: f64,
}

/// One direction over the full `local x global` matrix: returns the sum of
/// `lse_i - logit_{i, off+i}`, and accumulates the gradients.
#[allow(clippy::too_many_arguments)]
fn direction(
    x: &[f64],
    y: &[f64],
    ls: f64,
    dims: InfoNceDims,
    dloss: f64,
    lse: &mut [f64],
    dx: &mut [f64],
    dy: &mut [f64],
    dscale: &mut f64,
) -> f64 {
    let InfoNceDims { local, global, dim: d, offset } = dims;
    let s = ls.exp();
    let mut total = 0.0;
    for i in 0..local {
        let logits: Vec<f64> =
            (0..global).map(|j| s * (0..d).map(|k| x[i * d + k] * y[j * d + k]).sum::<f64>()).collect();
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        lse[i] = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        total += lse[i] - logits[offset + i];
        for j in 0..global {
            let g =
                ((logits[j] - lse[i]).exp() - if j == offset + i { 1.0 } else { 0.0 }) * dloss / (2 * global) as f64;
            *dscale += g * logits[j];
            for k in 0..d {
                dx[i * d + k] += g * s * y[j * d + k];
                dy[j * d + k] += g * s * x[i * d + k];
            }
        }
    }
    total
}

fn reference(
    img: &[f32],
    txt: &[f32],
    all_img: &[f32],
    all_txt: &[f32],
    ls: f32,
    dims: InfoNceDims,
    dloss: f64,
) -> Reference {
    let (l, g, d) = (dims.local, dims.global, dims.dim);
    let mut r = Reference {
        loss: 0.0,
        lse_img: vec![0.0; l],
        lse_txt: vec![0.0; l],
        d_img: vec![0.0; l * d],
        d_txt: vec![0.0; l * d],
        d_all_img: vec![0.0; g * d],
        d_all_txt: vec![0.0; g * d],
        d_scale: 0.0,
    };
    let ls = ls as f64;
    let a = direction(
        &to64(img),
        &to64(all_txt),
        ls,
        dims,
        dloss,
        &mut r.lse_img,
        &mut r.d_img,
        &mut r.d_all_txt,
        &mut r.d_scale,
    );
    let b = direction(
        &to64(txt),
        &to64(all_img),
        ls,
        dims,
        dloss,
        &mut r.lse_txt,
        &mut r.d_txt,
        &mut r.d_all_img,
        &mut r.d_scale,
    );
    r.loss = (a + b) / (2 * g) as f64;
    r
}

/// The loss alone in f64 from f64 inputs, for finite differences.
fn loss64(img: &[f64], txt: &[f64], all_img: &[f64], all_txt: &[f64], ls: f64, dims: InfoNceDims) -> f64 {
    let InfoNceDims { local, global, dim: d, offset } = dims;
    let s = ls.exp();
    let dir = |x: &[f64], y: &[f64]| -> f64 {
        (0..local)
            .map(|i| {
                let logits: Vec<f64> =
                    (0..global).map(|j| s * (0..d).map(|k| x[i * d + k] * y[j * d + k]).sum::<f64>()).collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln() - logits[offset + i]
            })
            .sum()
    };
    (dir(img, all_txt) + dir(txt, all_img)) / (2 * global) as f64
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

/// The op's outputs from buffers that start at `start` values.
struct Ours {
    loss: f32,
    lse_img: Vec<f32>,
    lse_txt: Vec<f32>,
    d_img: Vec<f32>,
    d_txt: Vec<f32>,
    d_all_img: Vec<f32>,
    d_all_txt: Vec<f32>,
    d_scale: f32,
}

#[allow(clippy::too_many_arguments)]
fn run(
    img: &[f32],
    txt: &[f32],
    all_img: &[f32],
    all_txt: &[f32],
    ls: f32,
    dims: InfoNceDims,
    dloss: f32,
    start: Option<&Ours>,
) -> Ours {
    let (l, g, d) = (dims.local, dims.global, dims.dim);
    let mut o = match start {
        Some(s) => Ours {
            loss: 0.0,
            lse_img: vec![0.0; l],
            lse_txt: vec![0.0; l],
            d_img: s.d_img.clone(),
            d_txt: s.d_txt.clone(),
            d_all_img: s.d_all_img.clone(),
            d_all_txt: s.d_all_txt.clone(),
            d_scale: 0.0,
        },
        None => Ours {
            loss: 0.0,
            lse_img: vec![0.0; l],
            lse_txt: vec![0.0; l],
            d_img: vec![0.0; l * d],
            d_txt: vec![0.0; l * d],
            d_all_img: vec![0.0; g * d],
            d_all_txt: vec![0.0; g * d],
            d_scale: 0.0,
        },
    };
    o.loss = infonce::fwd(&mut o.lse_img, &mut o.lse_txt, img, txt, all_img, all_txt, ls, dims);
    o.d_scale = infonce::bwd(
        &mut o.d_img,
        &mut o.d_txt,
        &mut o.d_all_img,
        &mut o.d_all_txt,
        dloss,
        img,
        txt,
        all_img,
        all_txt,
        ls,
        &o.lse_img,
        &o.lse_txt,
        dims,
    );
    o
}

/// Gradient buffers holding values of the gradients' own magnitude (about 1 / global), so
/// that the relative tolerance still bites on the gradient itself.
fn random_start(cx: &mut Ctx, dims: InfoNceDims) -> Ours {
    let (l, g, d) = (dims.local, dims.global, dims.dim);
    let a = 1.0 / g as f32;
    Ours {
        loss: 0.0,
        lse_img: vec![],
        lse_txt: vec![],
        d_img: cx.uniform(l * d, -a, a),
        d_txt: cx.uniform(l * d, -a, a),
        d_all_img: cx.uniform(g * d, -a, a),
        d_all_txt: cx.uniform(g * d, -a, a),
        d_scale: 0.0,
    }
}

fn plus(start: &[f32], delta: &[f64]) -> Vec<f64> {
    start.iter().zip(delta).map(|(&a, &b)| a as f64 + b).collect()
}

/// Single process (local == global, offset 0), against the materialised f64 loss, with the
/// gradient buffers holding values beforehand.
#[test]
fn infonce_single_process_matches_materialised() {
    let mut cx = ctx();
    // 300 rows: 5 row tiles (the last partial) and 2 column tiles (the last partial).
    for (g, d, ls) in [(300, 32, (1.0f32 / 0.07).ln()), (300, 16, 100f32.ln()), (1, 4, 0.3), (64, 8, 1.0)] {
        println!("global {g} dim {d} logit_scale {ls}");
        let dims = InfoNceDims { local: g, global: g, dim: d, offset: 0 };
        let (img, txt) = (features(&mut cx, g, d), features(&mut cx, g, d));
        let dloss = 0.75;
        let start = random_start(&mut cx, dims);
        let ours = run(&img, &txt, &img, &txt, ls, dims, dloss, Some(&start));
        let want = reference(&img, &txt, &img, &txt, ls, dims, dloss as f64);
        assert_close(&cx, "infonce loss", &[ours.loss], &[want.loss], 1e-6, 1e-5);
        assert_close(&cx, "infonce lse_img", &ours.lse_img, &want.lse_img, 1e-5, 1e-5);
        assert_close(&cx, "infonce lse_txt", &ours.lse_txt, &want.lse_txt, 1e-5, 1e-5);
        let (atol, rtol) = (1e-6, 1e-4);
        assert_close(&cx, "infonce d_img", &ours.d_img, &plus(&start.d_img, &want.d_img), atol, rtol);
        assert_close(&cx, "infonce d_txt", &ours.d_txt, &plus(&start.d_txt, &want.d_txt), atol, rtol);
        assert_close(&cx, "infonce d_all_img", &ours.d_all_img, &plus(&start.d_all_img, &want.d_all_img), atol, rtol);
        assert_close(&cx, "infonce d_all_txt", &ours.d_all_txt, &plus(&start.d_all_txt, &want.d_all_txt), atol, rtol);
        assert_close(&cx, "infonce d_logit_scale", &[ours.d_scale], &[want.d_scale], 1e-6, 1e-4);
    }
}

/// Three ranks of 70 rows: their losses sum to the single-process loss, and the gradient of
/// each feature row (its local row term plus the reduce-scattered column terms of every
/// rank) equals the single-process one.
#[test]
fn infonce_three_ranks_sum_to_single_process() {
    let mut cx = ctx();
    let (ranks, b, d) = (3, 70, 24);
    let g = ranks * b;
    let ls = (1.0f32 / 0.07).ln();
    let (all_img, all_txt) = (features(&mut cx, g, d), features(&mut cx, g, d));
    let dloss = 1.0;
    let single = run(
        &all_img,
        &all_txt,
        &all_img,
        &all_txt,
        ls,
        InfoNceDims { local: g, global: g, dim: d, offset: 0 },
        dloss,
        None,
    );
    let mut loss = 0.0f64;
    let mut d_scale = 0.0f64;
    let (mut tot_img, mut tot_txt) = (vec![0.0f64; g * d], vec![0.0f64; g * d]);
    let mut lse_img = vec![];
    for r in 0..ranks {
        let dims = InfoNceDims { local: b, global: g, dim: d, offset: r * b };
        let rows = r * b * d..(r + 1) * b * d;
        let o = run(&all_img[rows.clone()], &all_txt[rows.clone()], &all_img, &all_txt, ls, dims, dloss, None);
        loss += o.loss as f64;
        d_scale += o.d_scale as f64;
        lse_img.extend(o.lse_img);
        for (k, v) in rows.zip(o.d_img.iter().zip(&o.d_txt)) {
            tot_img[k] += *v.0 as f64;
            tot_txt[k] += *v.1 as f64;
        }
        for k in 0..g * d {
            tot_img[k] += o.d_all_img[k] as f64;
            tot_txt[k] += o.d_all_txt[k] as f64;
        }
    }
    assert_close(&cx, "sum of rank losses", &[single.loss], &[loss], 1e-6, 1e-5);
    assert_close(&cx, "lse_img of the ranks", &single.lse_img, &to64(&lse_img), 1e-6, 1e-5);
    assert_close(&cx, "sum of rank d_logit_scale", &[single.d_scale], &[d_scale], 1e-6, 1e-4);
    let single_img: Vec<f64> = (0..g * d).map(|k| single.d_img[k] as f64 + single.d_all_img[k] as f64).collect();
    let single_txt: Vec<f64> = (0..g * d).map(|k| single.d_txt[k] as f64 + single.d_all_txt[k] as f64).collect();
    let (ti, tt): (Vec<f32>, Vec<f32>) =
        (tot_img.iter().map(|&v| v as f32).collect(), tot_txt.iter().map(|&v| v as f32).collect());
    assert_close(&cx, "assembled image gradient", &ti, &single_img, 1e-6, 1e-4);
    assert_close(&cx, "assembled text gradient", &tt, &single_txt, 1e-6, 1e-4);
    // And against the f64 reference, for good measure.
    let want = reference(
        &all_img,
        &all_txt,
        &all_img,
        &all_txt,
        ls,
        InfoNceDims { local: g, global: g, dim: d, offset: 0 },
        1.0,
    );
    assert_close(&cx, "sum of rank losses vs f64", &[loss as f32], &[want.loss], 1e-6, 1e-5);
}

/// Finite differences of the f64 loss for every input and the log scale, with a rank that
/// is neither first nor last.
fn fd_case(local: usize, global: usize, offset: usize, d: usize, coords: usize) {
    let mut cx = ctx();
    println!("infonce local {local} global {global} offset {offset} dim {d}");
    let dims = InfoNceDims { local, global, dim: d, offset };
    // Unnormalised features of varied norms: the op must not assume unit rows.
    let (img, txt) = (cx.vec(local * d), cx.vec(local * d));
    let (all_img, all_txt) = (cx.vec(global * d), cx.vec(global * d));
    let ls = 1.2f32;
    let dloss = 0.6f32;
    let start = random_start(&mut cx, dims);
    let ours = run(&img, &txt, &all_img, &all_txt, ls, dims, dloss, Some(&start));
    let (i64_, t64, ai64, at64) = (to64(&img), to64(&txt), to64(&all_img), to64(&all_txt));
    let ls64 = ls as f64;
    let k = dloss as f64;
    assert_close(&cx, "infonce loss", &[ours.loss], &[loss64(&i64_, &t64, &ai64, &at64, ls64, dims)], 1e-6, 1e-5);
    let f_img = |x: &[f64]| k * loss64(x, &t64, &ai64, &at64, ls64, dims);
    let f_txt = |x: &[f64]| k * loss64(&i64_, x, &ai64, &at64, ls64, dims);
    let f_all_img = |x: &[f64]| k * loss64(&i64_, &t64, x, &at64, ls64, dims);
    let f_all_txt = |x: &[f64]| k * loss64(&i64_, &t64, &ai64, x, ls64, dims);
    let f_ls = |x: &[f64]| k * loss64(&i64_, &t64, &ai64, &at64, x[0], dims);
    let (atol, rtol) = (1e-6, 1e-4);
    let idx = cx.coords(local * d, coords);
    check_grad(&cx, "infonce d_img", &f_img, &img, &start.d_img, &ours.d_img, &idx, atol, rtol);
    check_grad(&cx, "infonce d_txt", &f_txt, &txt, &start.d_txt, &ours.d_txt, &idx, atol, rtol);
    let idx = cx.coords(global * d, coords);
    check_grad(&cx, "infonce d_all_img", &f_all_img, &all_img, &start.d_all_img, &ours.d_all_img, &idx, atol, rtol);
    check_grad(&cx, "infonce d_all_txt", &f_all_txt, &all_txt, &start.d_all_txt, &ours.d_all_txt, &idx, atol, rtol);
    check_grad(&cx, "infonce d_logit_scale", &f_ls, &[ls], &[0.0], &[ours.d_scale], &[0], 1e-6, 1e-4);
}

#[test]
fn infonce_finite_differences_small() {
    fd_case(5, 13, 4, 6, usize::MAX);
    fd_case(1, 1, 0, 3, usize::MAX);
    fd_case(3, 3, 0, 2, usize::MAX);
}

#[test]
fn infonce_finite_differences_tiled() {
    // The last of three ranks of 100: a partial row tile and a partial column tile.
    fd_case(100, 300, 200, 8, 12);
}

/// Column gradients are accumulated per column tile in a fixed order: the same bits on
/// every run, whatever the threads do.
#[test]
fn infonce_bwd_is_deterministic() {
    let mut cx = ctx();
    let (l, g, d) = (200, 600, 16);
    let dims = InfoNceDims { local: l, global: g, dim: d, offset: 300 };
    let (img, txt) = (features(&mut cx, l, d), features(&mut cx, l, d));
    let (all_img, all_txt) = (features(&mut cx, g, d), features(&mut cx, g, d));
    let first = run(&img, &txt, &all_img, &all_txt, 2.0, dims, 1.0, None);
    for _ in 0..3 {
        let again = run(&img, &txt, &all_img, &all_txt, 2.0, dims, 1.0, None);
        assert!(
            again.loss == first.loss
                && again.d_img == first.d_img
                && again.d_txt == first.d_txt
                && again.d_all_img == first.d_all_img
                && again.d_all_txt == first.d_all_txt
                && again.d_scale == first.d_scale,
            "infonce differs between runs"
        );
    }
}
