//! The elementwise family on the CPU, serial and parallel sizes (below and above the length
//! where the ops split the work into chunks), against f64 references; and through the Backend,
//! the in-place add and clamp_max.

use kernels::cpu::elementwise;
use kernels::{Backend, Cpu, DType};

use crate::common::*;

#[test]
fn elementwise_ops_match_f64() {
    let mut cx = ctx();
    for n in [1, 1000, (1 << 15) + 7, 200_003] {
        let (a, b) = (cx.uniform(n, -3.0, 3.0), cx.uniform(n, -3.0, 3.0));
        let (a64, b64) = (to64(&a), to64(&b));
        let mut out = cx.vec(n);
        elementwise::add(&mut out, &a, &b);
        let want: Vec<f64> = a64.iter().zip(&b64).map(|(x, y)| x + y).collect();
        assert_close(&cx, &format!("add n={n}"), &out, &want, 1e-6, 1e-6);

        let mut acc = a.clone();
        elementwise::accumulate(&mut acc, &b);
        elementwise::scale(&mut acc, -0.75);
        let want: Vec<f64> = want.iter().map(|v| v * -0.75).collect();
        assert_close(&cx, &format!("accumulate+scale n={n}"), &acc, &want, 1e-6, 1e-6);

        let s = elementwise::sum_squares(&a);
        let want: f64 = a64.iter().map(|v| v * v).sum();
        assert!((s - want).abs() <= 1e-9 * want, "sum_squares n={n}: {s} vs {want} (seed {})", cx.seed);

        let mut f = cx.vec(n);
        elementwise::fill(&mut f, 0.3);
        assert!(f.iter().all(|&v| v == 0.3f32), "fill n={n}");
        let mut c = cx.vec(n);
        elementwise::copy(&mut c, &a);
        assert_eq!(c, a, "copy n={n}");
    }
}

#[test]
fn in_place_add_and_clamp_through_the_backend() {
    let mut cx = ctx();
    let n = 5000;
    let (x, y) = (cx.uniform(n, -10.0, 10.0), cx.uniform(n, -10.0, 10.0));
    let be = Cpu;
    let (t, u) = (be.alloc(n, DType::F32).unwrap(), be.alloc(n, DType::F32).unwrap());
    be.upload_f32(&t, &x).unwrap();
    be.upload_f32(&u, &y).unwrap();
    // out = a + b with out being a: the accumulate path.
    be.add(&t, &t, &u);
    be.clamp_max(&t, 7.5);
    let mut back = vec![0.0; n];
    be.download_f32(&t, &mut back).unwrap();
    let want: Vec<f64> = x.iter().zip(&y).map(|(&a, &b)| (a as f64 + b as f64).min(7.5)).collect();
    assert_close(&cx, "in-place add, clamp_max", &back, &want, 1e-6, 1e-6);
    assert!(back.contains(&7.5) && back.iter().any(|&v| v < 0.0), "the clamp was not exercised");
}
