//! Timings, ignored by default: `cargo test -p kernels --release --test ops perf -- --ignored --nocapture`
//! (or the test profile, which is optimised too). They print, they do not assert.

use std::time::Instant;

use kernels::cpu::{attention, infonce, layernorm, linear};
use kernels::InfoNceDims;

use crate::common::*;

/// Best wall time of `reps` runs after one warm-up, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
#[ignore = "timing"]
fn perf_linear() {
    let mut cx = ctx();
    println!("rayon threads: {}", rayon::current_num_threads());
    for (n, c, oc) in [(64 * 77, 256, 768), (64 * 77, 512, 2048), (64 * 50, 768, 3072)] {
        let (inp, w, bias, dout) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(oc), cx.vec(n * oc));
        let mut out = vec![0.0; n * oc];
        let flops = 2.0 * (n * c * oc) as f64;
        let t = best(5, || linear::fwd(&mut out, &inp, &w, Some(&bias), n, c, oc));
        println!("linear_fwd n={n} c={c} oc={oc}: {:.2} ms, {:.1} GFLOP/s", t * 1e3, flops / t / 1e9);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; oc * c], vec![0.0; oc]);
        let t = best(3, || linear::bwd(Some(&mut dinp), Some(&mut dw), Some(&mut db), &dout, &inp, &w, n, c, oc));
        println!("linear_bwd n={n} c={c} oc={oc}: {:.2} ms, {:.1} GFLOP/s", t * 1e3, 2.0 * flops / t / 1e9);
    }
}

#[test]
#[ignore = "timing"]
fn perf_attention_and_layernorm() {
    let mut cx = ctx();
    for (b, t, h, hd, causal) in [(64, 77, 8, 64, true), (64, 50, 12, 64, false), (16, 197, 12, 64, false)] {
        let c = h * hd;
        let qkv = cx.vec(b * t * 3 * c);
        let dout = cx.vec(b * t * c);
        let (mut out, mut probs, mut dqkv) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t], vec![0.0; b * t * 3 * c]);
        // Two t x t x hd products each way (the causal half is computed and discarded).
        let flops = 4.0 * (b * h * t * t * hd) as f64;
        let tf = best(3, || attention::fwd(&mut out, &mut probs, &qkv, b, t, h, hd, causal));
        let tb = best(3, || attention::bwd(&mut dqkv, &dout, &qkv, &out, &probs, b, t, h, hd, causal));
        println!(
            "attention b={b} t={t} h={h} hd={hd} causal={causal}: fwd {:.2} ms ({:.1} GFLOP/s), bwd {:.2} ms ({:.1} GFLOP/s)",
            tf * 1e3,
            flops / tf / 1e9,
            tb * 1e3,
            2.0 * flops / tb / 1e9
        );
    }
    let (n, c) = (64 * 77, 512);
    let (x, g, be, dy) = (cx.vec(n * c), cx.vec(c), cx.vec(c), cx.vec(n * c));
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    let tf = best(5, || layernorm::fwd(&mut out, &mut mean, &mut rstd, &x, &g, &be, n, c, 1e-5));
    let (mut dx, mut dg, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
    let tb = best(5, || layernorm::bwd(&mut dx, Some(&mut dg), Some(&mut db), &dy, &x, &g, &mean, &rstd, n, c));
    let gb = (n * c * 4) as f64 / 1e9;
    println!(
        "layernorm n={n} c={c}: fwd {:.2} ms ({:.1} GB/s of 2 tensors), bwd {:.2} ms ({:.1} GB/s of 4)",
        tf * 1e3,
        2.0 * gb / tf,
        tb * 1e3,
        4.0 * gb / tb
    );
}

/// The residual add fused with the layer norm after it, against the two ops it replaces in
/// the model's forward (`add` in place, then `layernorm::fwd`), in the same run.
#[test]
#[ignore = "timing"]
fn perf_add_layernorm() {
    use kernels::cpu::elementwise;
    let mut cx = ctx();
    for (n, c) in [(64 * 77, 512), (64 * 50, 768), (16 * 197, 768)] {
        let (a, y, g, be) = (cx.vec(n * c), cx.vec(n * c), cx.vec(c), cx.vec(c));
        let (mut x, mut out, mut mean, mut rstd) = (a.clone(), vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        let unfused = best(7, || {
            x.copy_from_slice(&a);
            elementwise::accumulate(&mut x, &y);
            layernorm::fwd(&mut out, &mut mean, &mut rstd, &x, &g, &be, n, c, 1e-5);
        });
        let fused = best(7, || {
            x.copy_from_slice(&a);
            layernorm::add_fwd(&mut out, &mut x, &mut mean, &mut rstd, None, &y, &g, &be, n, c, 1e-5);
        });
        let copy = best(7, || x.copy_from_slice(&a));
        println!(
            "add+layernorm n={n} c={c}: unfused {:.2} ms, fused {:.2} ms (each includes a {:.2} ms reset copy): \
             fused/unfused {:.2} without the copy",
            unfused * 1e3,
            fused * 1e3,
            copy * 1e3,
            (fused - copy) / (unfused - copy)
        );
    }
}

#[test]
#[ignore = "timing"]
fn perf_infonce() {
    let mut cx = ctx();
    for (l, g, d) in [(1024, 1024, 512), (256, 2048, 512)] {
        let dims = InfoNceDims { local: l, global: g, dim: d, offset: 0 };
        let (img, at) = (cx.vec(l * d), cx.vec(g * d));
        let (mut rl, mut pos, mut cm, mut cs) = (vec![0.0; l], vec![0.0; l], vec![0.0; g], vec![0.0; g]);
        let tf = best(3, || {
            infonce::block_fwd(&mut rl, &mut pos, &mut cm, &mut cs, &img, &at, 2.0, dims);
        });
        let mut cl = vec![0.0; g];
        infonce::block_loss(&mut cl, &rl, &pos, &cm, &cs, dims);
        let (mut a, mut c) = (vec![0.0; l * d], vec![0.0; g * d]);
        let tb = best(3, || {
            infonce::block_bwd(&mut a, &mut c, 1.0, &img, &at, 2.0, &rl, &cl, dims);
        });
        // The block: fwd one local x global x dim product, bwd three.
        let flops = 2.0 * (l * g * d) as f64;
        println!(
            "infonce block local={l} global={g} dim={d}: fwd {:.2} ms ({:.1} GFLOP/s), bwd {:.2} ms ({:.1} GFLOP/s)",
            tf * 1e3,
            flops / tf / 1e9,
            tb * 1e3,
            3.0 * flops / tb / 1e9
        );
    }
}

#[test]
#[ignore = "timing"]
fn perf_activations() {
    use kernels::cpu::activation;
    use kernels::Activation;
    let mut cx = ctx();
    let n = 64 * 77 * 1024;
    let (x, dy) = (cx.vec(n), cx.vec(n));
    let mut out = vec![0.0; n];
    for kind in [Activation::QuickGelu, Activation::Gelu] {
        let t = best(5, || activation::fwd(kind, &mut out, &x));
        let tb = best(5, || activation::bwd(kind, &mut out, &dy, &x));
        println!("{kind:?} n={n}: fwd {:.2} ms ({:.2} ns/elem), bwd {:.2} ms", t * 1e3, t * 1e9 / n as f64, tb * 1e3);
    }
}
