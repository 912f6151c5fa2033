use kernels::cpu::activation;
use kernels::Activation;

use crate::common::*;

fn reference(kind: Activation, x: f64) -> f64 {
    match kind {
        Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Activation::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
    }
}

fn case(kind: Activation, n: usize) {
    let mut cx = ctx();
    println!("{kind:?} n={n}");
    // Mostly the working range, plus a few large magnitudes where exp overflows.
    let mut inp = cx.uniform(n, -6.0, 6.0);
    for i in cx.coords(n, 8) {
        inp[i] = cx.uniform(1, -100.0, 100.0)[0];
    }
    let mut out = cx.vec(n);
    activation::fwd(kind, &mut out, &inp);
    let want: Vec<f64> = inp.iter().map(|&x| reference(kind, x as f64)).collect();
    assert_close(&cx, &format!("{kind:?} out"), &out, &want, 1e-6, 1e-5);

    // Elementwise, so the finite difference of each coordinate is one of the scalar function.
    let r = cx.vec(n);
    let d0 = cx.vec(n);
    let mut d = d0.clone();
    activation::bwd(kind, &mut d, &r, &inp);
    let want: Vec<f64> = (0..n)
        .map(|i| {
            let f = |x: &[f64]| reference(kind, x[0]) * r[i] as f64;
            d0[i] as f64 + fd(&f, &[inp[i] as f64], 0)
        })
        .collect();
    assert_close(&cx, &format!("{kind:?} dinp"), &d, &want, 1e-5, 1e-4);
}

#[test]
fn quick_gelu() {
    case(Activation::QuickGelu, 1);
    case(Activation::QuickGelu, 1000);
    case(Activation::QuickGelu, 50_001);
}

#[test]
fn gelu() {
    case(Activation::Gelu, 1);
    case(Activation::Gelu, 1000);
    case(Activation::Gelu, 50_001);
}
