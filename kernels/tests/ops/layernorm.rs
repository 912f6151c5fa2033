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

/// The fused residual add + layer norm through the backend: `x = a + b`, `out = LN(x)`, in
/// place (`x` is `a`) and not, against the f64 reference; then the gradient of
/// `r_out . out + r_x . x` with respect to `a` and `b` (one buffer, since a sum passes its
/// gradient to both addends), gamma and beta against finite differences.
fn add_case(n: usize, c: usize, in_place: bool, fd_coords: usize) {
    use kernels::{Backend, Cpu, DType};
    let mut cx = ctx();
    println!("add_layernorm n={n} c={c} in_place={in_place}");
    let cpu = Cpu;
    let mut a = cx.vec(n * c);
    for i in 0..n {
        let shift = cx.uniform(1, -2.0, 2.0)[0];
        for v in &mut a[i * c..(i + 1) * c] {
            *v += shift;
        }
    }
    let b = cx.uniform(n * c, -1.5, 1.5);
    let gamma = cx.uniform(c, 0.5, 1.5);
    let beta = cx.vec(c);
    let up = |v: &[f32]| {
        let t = cpu.alloc(v.len(), DType::F32).unwrap();
        cpu.upload_f32(&t, v).unwrap();
        t
    };
    let down = |t: &kernels::Tensor<Cpu>| {
        let mut v = vec![0.0; t.len()];
        cpu.download_f32(t, &mut v).unwrap();
        v
    };
    let (ta, tb, tg, tbe) = (up(&a), up(&b), up(&gamma), up(&beta));
    // Outputs start as garbage: the forward must overwrite them.
    let (tout, tmean, trstd) = (up(&cx.vec(n * c)), up(&cx.vec(n)), up(&cx.vec(n)));
    let tx = if in_place { ta.clone() } else { up(&cx.vec(n * c)) };
    cpu.add_layernorm_fwd(&tout, &tx, &tmean, &trstd, &ta, &tb, &tg, &tbe, n, c, EPS);

    let (a64, b64, g64, be64) = (to64(&a), to64(&b), to64(&gamma), to64(&beta));
    let sum = |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
    let x64 = sum(&a64, &b64);
    let (want, want_mean, want_rstd) = reference(&x64, &g64, &be64, n, c);
    assert_close(&cx, "add_layernorm x", &down(&tx), &x64, 1e-6, 1e-6);
    assert_close(&cx, "add_layernorm out", &down(&tout), &want, 1e-5, 1e-4);
    assert_close(&cx, "add_layernorm mean", &down(&tmean), &want_mean, 1e-6, 1e-5);
    assert_close(&cx, "add_layernorm rstd", &down(&trstd), &want_rstd, 1e-6, 1e-4);
    // The unfused pair gives the same bits.
    let (o2, m2, r2) = (up(&vec![0.0; n * c]), up(&vec![0.0; n]), up(&vec![0.0; n]));
    let x2 = up(&vec![0.0; n * c]);
    cpu.add(&x2, &up(&a), &tb);
    cpu.layernorm_fwd(&o2, &m2, &r2, &x2, &tg, &tbe, n, c, EPS);
    assert_eq!(down(&o2), down(&tout), "fused and unfused layer norms differ");

    let (r_out, r_x) = (cx.vec(n * c), cx.vec(n * c));
    let (dx0, dg0, db0) = (cx.vec(n * c), cx.vec(c), cx.vec(c));
    // On entry the residual gradient holds what the readers of x added (here r_x).
    let entry: Vec<f32> = dx0.iter().zip(&r_x).map(|(d, r)| d + r).collect();
    let (tdx, tdg, tdb) = (up(&entry), up(&dg0), up(&db0));
    cpu.add_layernorm_bwd(&tdx, Some(&tdg), Some(&tdb), &up(&r_out), &tx, &tg, &tmean, &trstd, n, c);
    let loss = |a: &[f64], b: &[f64], g: &[f64], be: &[f64]| {
        let x = sum(a, b);
        dot(&reference(&x, g, be, n, c).0, &r_out) + dot(&x, &r_x)
    };
    let f_a = |v: &[f64]| loss(v, &b64, &g64, &be64);
    let f_b = |v: &[f64]| loss(&a64, v, &g64, &be64);
    let f_g = |v: &[f64]| loss(&a64, &b64, v, &be64);
    let f_be = |v: &[f64]| loss(&a64, &b64, &g64, v);
    let dx = down(&tdx);
    let idx = cx.coords(n * c, fd_coords);
    check_grad(&cx, "add_layernorm d(a)", &f_a, &a, &dx0, &dx, &idx, 1e-4, 1e-4);
    check_grad(&cx, "add_layernorm d(b)", &f_b, &b, &dx0, &dx, &idx, 1e-4, 1e-4);
    let tol = 2e-5 * (n as f64).sqrt();
    let idx = cx.coords(c, fd_coords);
    check_grad(&cx, "add_layernorm dgamma", &f_g, &gamma, &dg0, &down(&tdg), &idx, tol, 1e-4);
    check_grad(&cx, "add_layernorm dbeta", &f_be, &beta, &db0, &down(&tdb), &idx, tol, 1e-4);
}

#[test]
fn add_layernorm_small() {
    add_case(1, 5, false, 100);
    add_case(3, 7, true, 100);
    add_case(7, 50, false, 200);
}

#[test]
fn add_layernorm_parallel_sizes() {
    add_case(77, 768, true, 16);
    add_case(133, 512, false, 16);
}

#[test]
#[should_panic(expected = "partially overlaps")]
fn add_layernorm_partial_alias_panics() {
    use kernels::{Backend, Cpu, DType};
    let cpu = Cpu;
    let (n, c) = (2, 4);
    let buf = cpu.alloc(3 * n * c, DType::F32).unwrap();
    let t = |len| cpu.alloc(len, DType::F32).unwrap();
    let (out, mean, rstd, g, be) = (t(n * c), t(n), t(n), t(c), t(c));
    // x starts one element into a.
    let (a, x) = (buf.slice(0, n * c), buf.slice(1, n * c));
    cpu.add_layernorm_fwd(&out, &x, &mean, &rstd, &a, &buf.slice(2 * n * c, n * c), &g, &be, n, c, EPS);
}
