use kernels::cpu::layernorm;

use crate::common::*;

const EPS: f32 = 1e-5;

/// Returns (out, mean, rstd) in f64, as `torch.nn.LayerNorm` (biased variance).
fn reference(x: &[f64], g: &[f64], b: &[f64], n: usize, c: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let mu = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + EPS as f64).sqrt();
        for k in 0..c {
            out[i * c + k] = (row[k] - mu) * rs * g[k] + b[k];
        }
        mean[i] = mu;
        rstd[i] = rs;
    }
    (out, mean, rstd)
}

fn case(n: usize, c: usize, fd_coords: usize) {
    let mut cx = ctx();
    println!("layernorm n={n} c={c}");
    // Rows with a nonzero mean and varied spread (the variance must be centred).
    let mut inp = cx.vec(n * c);
    for i in 0..n {
        let (shift, spread) = (cx.uniform(1, -3.0, 3.0)[0], cx.uniform(1, 0.3, 2.0)[0]);
        for v in &mut inp[i * c..(i + 1) * c] {
            *v = shift + spread * *v;
        }
    }
    let gamma = cx.uniform(c, 0.5, 1.5);
    let beta = cx.vec(c);
    let (mut out, mut mean, mut rstd) = (cx.vec(n * c), cx.vec(n), cx.vec(n));
    layernorm::fwd(&mut out, &mut mean, &mut rstd, &inp, &gamma, &beta, n, c, EPS);
    let (x64, g64, b64) = (to64(&inp), to64(&gamma), to64(&beta));
    let (want, want_mean, want_rstd) = reference(&x64, &g64, &b64, n, c);
    assert_close(&cx, "layernorm out", &out, &want, 1e-5, 1e-4);
    assert_close(&cx, "layernorm mean", &mean, &want_mean, 1e-6, 1e-5);
    assert_close(&cx, "layernorm rstd", &rstd, &want_rstd, 1e-6, 1e-4);

    let r = cx.vec(n * c);
    let (dx0, dg0, db0) = (cx.vec(n * c), cx.vec(c), cx.vec(c));
    let (mut dx, mut dg, mut db) = (dx0.clone(), dg0.clone(), db0.clone());
    layernorm::bwd(&mut dx, Some(&mut dg), Some(&mut db), &r, &inp, &gamma, &mean, &rstd, n, c);
    let f_x = |x: &[f64]| dot(&reference(x, &g64, &b64, n, c).0, &r);
    let f_g = |g: &[f64]| dot(&reference(&x64, g, &b64, n, c).0, &r);
    let f_b = |b: &[f64]| dot(&reference(&x64, &g64, b, n, c).0, &r);
    let tol = 2e-5 * (n as f64).sqrt();
    let idx = cx.coords(n * c, fd_coords);
    check_grad(&cx, "layernorm dinp", &f_x, &inp, &dx0, &dx, &idx, 1e-4, 1e-4);
    let idx = cx.coords(c, fd_coords);
    check_grad(&cx, "layernorm dgamma", &f_g, &gamma, &dg0, &dg, &idx, tol, 1e-4);
    check_grad(&cx, "layernorm dbeta", &f_b, &beta, &db0, &db, &idx, tol, 1e-4);

    // Without the parameter gradients: dinp alone, the same values.
    let mut dx2 = dx0.clone();
    layernorm::bwd(&mut dx2, None, None, &r, &inp, &gamma, &mean, &rstd, n, c);
    assert_eq!(dx, dx2, "dinp depends on whether dgamma / dbeta were asked for");
}

#[test]
fn layernorm_small() {
    case(1, 5, 100);
    case(3, 7, 100);
    case(7, 50, 400);
}

#[test]
fn layernorm_parallel_sizes() {
    // n * c above the parallel threshold, and a row count that is not a multiple of the
    // per-task block.
    case(77, 768, 16);
    case(133, 512, 16);
}

/// The parameter gradients reduce per-task partial sums in a fixed order: repeated runs
/// give the same bits.
#[test]
fn layernorm_bwd_is_deterministic() {
    let mut cx = ctx();
    let (n, c) = (301, 256);
    let (inp, gamma, beta, r) = (cx.vec(n * c), cx.vec(c), cx.vec(c), cx.vec(n * c));
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    layernorm::fwd(&mut out, &mut mean, &mut rstd, &inp, &gamma, &beta, n, c, EPS);
    let run = || {
        let (mut dx, mut dg, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm::bwd(&mut dx, Some(&mut dg), Some(&mut db), &r, &inp, &gamma, &mean, &rstd, n, c);
        (dx, dg, db)
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "layernorm backward differs between runs");
    }
}
