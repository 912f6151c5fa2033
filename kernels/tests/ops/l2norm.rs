use kernels::cpu::l2norm;

use crate::common::*;

fn reference(x: &[f64], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut norm) = (vec![0.0; n * d], vec![0.0; n]);
    for i in 0..n {
        let row = &x[i * d..(i + 1) * d];
        let r = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        for k in 0..d {
            out[i * d + k] = row[k] / r;
        }
        norm[i] = r;
    }
    (out, norm)
}

fn case(n: usize, d: usize, fd_coords: usize) {
    let mut cx = ctx();
    println!("l2norm n={n} d={d}");
    let inp = cx.uniform(n * d, -2.0, 2.0);
    let (mut out, mut norm) = (cx.vec(n * d), cx.vec(n));
    l2norm::fwd(&mut out, &mut norm, &inp, n, d);
    let x64 = to64(&inp);
    let (want, want_norm) = reference(&x64, n, d);
    assert_close(&cx, "l2norm out", &out, &want, 1e-6, 1e-5);
    assert_close(&cx, "l2norm norm", &norm, &want_norm, 1e-6, 1e-5);

    let r = cx.vec(n * d);
    let dx0 = cx.vec(n * d);
    let mut dx = dx0.clone();
    l2norm::bwd(&mut dx, &r, &out, &norm, n, d);
    let f = |x: &[f64]| dot(&reference(x, n, d).0, &r);
    let idx = cx.coords(n * d, fd_coords);
    check_grad(&cx, "l2norm dinp", &f, &inp, &dx0, &dx, &idx, 1e-5, 1e-4);
}

#[test]
fn l2norm_shapes() {
    case(1, 1, 10);
    case(1, 3, 10);
    case(7, 5, 100);
    case(50, 77, 50);
    // n * d above the parallel threshold.
    case(64, 512, 24);
}
