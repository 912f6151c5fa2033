use kernels::cpu::adamw;
use kernels::AdamWStep;

use crate::common::*;

/// `torch.optim.AdamW` written out in f64.
fn reference(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], hp: AdamWStep) {
    let (lr, b1, b2, eps, wd) = (hp.lr as f64, hp.beta1 as f64, hp.beta2 as f64, hp.eps as f64, hp.weight_decay as f64);
    let t = hp.step as i32;
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    for i in 0..p.len() {
        p[i] *= 1.0 - lr * wd;
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        p[i] -= lr / bc1 * m[i] / ((v[i] / bc2).sqrt() + eps);
    }
}

fn case(n: usize, weight_decay: f32) {
    let mut cx = ctx();
    println!("adamw n={n} weight_decay={weight_decay}");
    let mut p = cx.vec(n);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let (mut p64, mut m64, mut v64) = (to64(&p), vec![0.0; n], vec![0.0; n]);
    for step in 1..=3 {
        let hp = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay, step };
        // Gradients of mixed scales, fresh each step.
        let g: Vec<f32> = cx.vec(n).iter().zip(cx.uniform(n, -3.0, 0.0)).map(|(a, e)| a * 10f32.powf(e)).collect();
        adamw::step(&mut p, &g, &mut m, &mut v, hp);
        reference(&mut p64, &to64(&g), &mut m64, &mut v64, hp);
        assert_close(&cx, &format!("adamw param, step {step}"), &p, &p64, 1e-6, 1e-5);
        // m mixes terms of either sign: its f32 rounding is relative to the gradients' scale
        // (up to 1), not to m. v adds positive terms: relative error only.
        assert_close(&cx, &format!("adamw m, step {step}"), &m, &m64, 2e-7, 1e-5);
        assert_close(&cx, &format!("adamw v, step {step}"), &v, &v64, 1e-12, 1e-5);
    }
}

#[test]
fn adamw_three_steps() {
    case(7, 0.1);
    case(1000, 0.0);
    // Above the parallel threshold.
    case(50_000, 0.2);
}

/// A late step: the bias corrections are ~1 and the update is lr * m / sqrt(v).
#[test]
fn adamw_late_step() {
    let mut cx = ctx();
    let n = 100;
    let mut p = cx.vec(n);
    let g = cx.vec(n);
    let mut m = cx.uniform(n, -0.1, 0.1);
    let mut v = cx.uniform(n, 0.01, 0.1);
    let (mut p64, mut m64, mut v64) = (to64(&p), to64(&m), to64(&v));
    let hp = AdamWStep { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05, step: 100_000 };
    adamw::step(&mut p, &g, &mut m, &mut v, hp);
    reference(&mut p64, &to64(&g), &mut m64, &mut v64, hp);
    assert_close(&cx, "adamw param", &p, &p64, 1e-7, 1e-6);
}

/// The update that also writes the bf16 copy: the master weights as without a copy, bit for
/// bit, and the copy each updated weight rounded to nearest even as `half` rounds it,
/// including values on rounding ties and above the parallel threshold.
#[test]
fn adamw_bf16_copy_rounds_to_nearest_even() {
    let mut cx = ctx();
    for n in [1000, 70_000] {
        let p0 = cx.vec(n);
        let g = cx.vec(n);
        let (m0, v0) = (cx.uniform(n, -0.1, 0.1), cx.uniform(n, 0.01, 0.1));
        let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.1, step: 3 };
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw::step(&mut p, &g, &mut m, &mut v, hp);
        let (mut pc, mut mc, mut vc) = (p0.clone(), m0.clone(), v0.clone());
        let mut copy = vec![f32::NAN; n];
        adamw::step_with_copy(&mut pc, &g, &mut mc, &mut vc, Some(&mut copy), hp);
        assert!(pc == p && mc == m && vc == v, "the copy changed the update (seed {})", cx.seed);
        for (i, (&c, &w)) in copy.iter().zip(&pc).enumerate() {
            let want = half::bf16::from_f32(w).to_f32();
            assert_eq!(c.to_bits(), want.to_bits(), "copy[{i}] of {w:e} is {c:e}, not {want:e} (seed {})", cx.seed);
        }
    }
    // Exact ties and the edges: 1 + 2^-8 is halfway between two bf16 neighbours.
    for w in [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -1.0 - 1.0 / 256.0, 3.0e38, 1.0e-40, 0.0, -0.0] {
        let got = kernels::bf16::round_bf16(w);
        assert_eq!(got.to_bits(), half::bf16::from_f32(w).to_f32().to_bits(), "round_bf16({w:e}) = {got:e}");
    }
}

/// Through the backend: the copy is a `Bf16` tensor (f32 storage on the CPU) and the checks
/// refuse a copy of the wrong length.
#[test]
#[should_panic(expected = "adamw bf16 copy")]
fn adamw_copy_of_the_wrong_length_panics() {
    use kernels::{Backend, Cpu, DType};
    let cpu = Cpu;
    let t = |n| cpu.alloc(n, DType::F32).unwrap();
    let copy = cpu.alloc(9, DType::Bf16).unwrap();
    let hp = AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.1, step: 1 };
    cpu.adamw_with_bf16_copy(&t(10), &t(10), &t(10), &t(10), Some(&copy), hp);
}
