use kernels::cpu::linear;

use crate::common::*;

/// `out[n, oc] = inp . w^T + bias` in f64.
fn reference(inp: &[f64], w: &[f64], bias: Option<&[f64]>, n: usize, c: usize, oc: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * oc];
    for i in 0..n {
        for o in 0..oc {
            let mut acc = bias.map_or(0.0, |b| b[o]);
            for k in 0..c {
                acc += inp[i * c + k] * w[o * c + k];
            }
            out[i * oc + o] = acc;
        }
    }
    out
}

fn case(n: usize, c: usize, oc: usize, with_bias: bool, fd_coords: usize) {
    let mut cx = ctx();
    println!("linear n={n} c={c} oc={oc} bias={with_bias}");
    let inp = cx.vec(n * c);
    let w = cx.vec(oc * c);
    let bias = cx.vec(oc);
    let bias = with_bias.then_some(&bias[..]);
    // Forward, over a buffer of garbage (the forward overwrites).
    let mut out = cx.vec(n * oc);
    linear::fwd(&mut out, &inp, &w, bias, n, c, oc);
    let bias64 = bias.map(to64);
    let want = reference(&to64(&inp), &to64(&w), bias64.as_deref(), n, c, oc);
    let tol = 1e-5 * (c as f64).sqrt();
    assert_close(&cx, "linear out", &out, &want, tol, 1e-5);

    // Backward of loss = sum(out . r), into buffers that already hold values.
    let r = cx.vec(n * oc);
    let (dinp0, dw0, db0) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(oc));
    let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
    linear::bwd(Some(&mut dinp), Some(&mut dw), with_bias.then_some(&mut db[..]), &r, &inp, &w, n, c, oc);
    if !with_bias {
        assert_eq!(db, db0, "dbias was written although not asked for");
    }
    let (inp64, w64, b64) = (to64(&inp), to64(&w), to64(bias.unwrap_or(&[])));
    let b = |b: &[f64]| if with_bias { Some(b.to_vec()) } else { None };
    let f_inp = |x: &[f64]| dot(&reference(x, &w64, b(&b64).as_deref(), n, c, oc), &r);
    let f_w = |x: &[f64]| dot(&reference(&inp64, x, b(&b64).as_deref(), n, c, oc), &r);
    let f_b = |x: &[f64]| dot(&reference(&inp64, &w64, Some(x), n, c, oc), &r);
    let gtol = 1e-5 * (n.max(oc) as f64).sqrt();
    let idx = cx.coords(n * c, fd_coords);
    check_grad(&cx, "linear dinp", &f_inp, &inp, &dinp0, &dinp, &idx, gtol, 1e-5);
    let idx = cx.coords(oc * c, fd_coords);
    check_grad(&cx, "linear dw", &f_w, &w, &dw0, &dw, &idx, gtol, 1e-5);
    if with_bias {
        let idx = cx.coords(oc, fd_coords);
        check_grad(&cx, "linear dbias", &f_b, bias.unwrap(), &db0, &db, &idx, gtol, 1e-5);
    }
}

/// The full gradients at a size where gemm and the bias sums go parallel, against the f64
/// closed forms (finite differences of a forward this size would be slow).
#[test]
fn linear_large_against_closed_forms() {
    let mut cx = ctx();
    let (n, c, oc) = (77, 256, 768);
    let (inp, w, bias, r) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(oc), cx.vec(n * oc));
    let mut out = vec![0.0; n * oc];
    linear::fwd(&mut out, &inp, &w, Some(&bias), n, c, oc);
    let (inp64, w64, r64) = (to64(&inp), to64(&w), to64(&r));
    assert_close(&cx, "linear out", &out, &reference(&inp64, &w64, Some(&to64(&bias)), n, c, oc), 1e-4, 1e-5);
    let (dinp0, dw0, db0) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(oc));
    let (mut dinp, mut dw, mut db) = (dinp0.clone(), dw0.clone(), db0.clone());
    linear::bwd(Some(&mut dinp), Some(&mut dw), Some(&mut db), &r, &inp, &w, n, c, oc);
    let mut want_dinp = to64(&dinp0);
    let mut want_dw = to64(&dw0);
    let mut want_db = to64(&db0);
    for i in 0..n {
        for o in 0..oc {
            let g = r64[i * oc + o];
            want_db[o] += g;
            for k in 0..c {
                want_dinp[i * c + k] += g * w64[o * c + k];
                want_dw[o * c + k] += g * inp64[i * c + k];
            }
        }
    }
    assert_close(&cx, "linear dinp", &dinp, &want_dinp, 2e-4, 1e-5);
    assert_close(&cx, "linear dw", &dw, &want_dw, 2e-4, 1e-5);
    assert_close(&cx, "linear dbias", &db, &want_db, 2e-4, 1e-5);
}

#[test]
fn linear_small_shapes() {
    case(1, 1, 1, true, 100);
    case(7, 13, 5, true, 1000);
    case(7, 13, 5, false, 1000);
    case(3, 1, 9, true, 100);
}

#[test]
fn linear_odd_shapes() {
    case(50, 64, 33, true, 12);
    case(77, 31, 65, false, 12);
}

/// Only some of the gradients asked for: the others stay untouched.
#[test]
fn linear_partial_gradients() {
    let mut cx = ctx();
    let (n, c, oc) = (9, 6, 4);
    let (inp, w, r) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(n * oc));
    let dw0 = cx.vec(oc * c);
    let mut dw = dw0.clone();
    linear::bwd(None, Some(&mut dw), None, &r, &inp, &w, n, c, oc);
    let inp64 = to64(&inp);
    let f_w = |x: &[f64]| dot(&reference(&inp64, x, None, n, c, oc), &r);
    let idx: Vec<usize> = (0..oc * c).collect();
    check_grad(&cx, "linear dw alone", &f_w, &w, &dw0, &dw, &idx, 1e-5, 1e-5);
}
