//! The `Backend` shim: buffers, transfers, and ops through `kernels::Cpu`.

use kernels::cpu::{attention, layernorm, linear};
use kernels::{Backend, Cpu, DType, InfoNceDims};

use crate::common::*;

#[test]
fn linear_through_the_backend() {
    let mut cx = ctx();
    let cpu = Cpu;
    let (n, c, oc) = (5, 7, 3);
    let (inp, w, bias) = (cx.vec(n * c), cx.vec(oc * c), cx.vec(oc));
    // Parameters as views of one flat buffer, as the model allocates them.
    let params = cpu.alloc(oc * c + oc, DType::F32).unwrap();
    let (tw, tb) = (params.slice(0, oc * c), params.slice(oc * c, oc));
    cpu.upload_f32(&tw, &w).unwrap();
    cpu.upload_f32(&tb, &bias).unwrap();
    let tin = cpu.alloc(n * c, DType::Bf16).unwrap();
    cpu.upload_f32(&tin, &inp).unwrap();
    let tout = cpu.alloc(n * oc, DType::F32).unwrap();
    cpu.linear_fwd(&tout, &tin, &tw, Some(&tb), n, c, oc);
    let mut got = vec![0.0; n * oc];
    cpu.download_f32(&tout, &mut got).unwrap();
    let mut want = vec![0.0; n * oc];
    linear::fwd(&mut want, &inp, &w, Some(&bias), n, c, oc);
    assert_eq!(got, want);

    // Backward into a flat gradient buffer: dw and dbias are views of it.
    let grads = cpu.alloc(oc * c + oc, DType::F32).unwrap();
    cpu.fill(&grads, 0.25);
    let r = cx.vec(n * oc);
    let tr = cpu.alloc(n * oc, DType::F32).unwrap();
    cpu.upload_f32(&tr, &r).unwrap();
    cpu.linear_bwd(None, Some(&grads.slice(0, oc * c)), Some(&grads.slice(oc * c, oc)), &tr, &tin, &tw, n, c, oc);
    let mut got = vec![0.0; oc * c + oc];
    cpu.download_f32(&grads, &mut got).unwrap();
    let mut want = vec![0.25; oc * c + oc];
    let (dw, db) = want.split_at_mut(oc * c);
    linear::bwd(None, Some(dw), Some(db), &r, &inp, &w, n, c, oc);
    assert_eq!(got, want);
}

#[test]
fn layernorm_and_attention_through_the_backend() {
    let mut cx = ctx();
    let cpu = Cpu;
    let (b, t, h, hd) = (2, 5, 2, 3);
    let c = h * hd;
    let x = cx.vec(b * t * c);
    let (gamma, beta) = (cx.vec(c), cx.vec(c));
    let n = b * t;
    let tx = cpu.alloc(n * c, DType::F32).unwrap();
    let (tg, tb) = (cpu.alloc(c, DType::F32).unwrap(), cpu.alloc(c, DType::F32).unwrap());
    cpu.upload_f32(&tx, &x).unwrap();
    cpu.upload_f32(&tg, &gamma).unwrap();
    cpu.upload_f32(&tb, &beta).unwrap();
    // Mean and rstd share one buffer, as saved activations do.
    let stats = cpu.alloc(2 * n, DType::F32).unwrap();
    let tout = cpu.alloc(n * c, DType::F32).unwrap();
    cpu.layernorm_fwd(&tout, &stats.slice(0, n), &stats.slice(n, n), &tx, &tg, &tb, n, c, 1e-5);
    let mut got = vec![0.0; n * c];
    cpu.download_f32(&tout, &mut got).unwrap();
    let (mut want, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    layernorm::fwd(&mut want, &mut mean, &mut rstd, &x, &gamma, &beta, n, c, 1e-5);
    assert_eq!(got, want);

    let qkv = cx.vec(b * t * 3 * c);
    let tq = cpu.alloc(qkv.len(), DType::Bf16).unwrap();
    cpu.upload_f32(&tq, &qkv).unwrap();
    let saved = cpu.alloc(cpu.attention_saved_len(b, t, h), DType::F32).unwrap();
    let tatt = cpu.alloc(b * t * c, DType::F32).unwrap();
    cpu.attention_fwd(&tatt, &saved, &tq, b, t, h, hd, true);
    let mut got = vec![0.0; b * t * c];
    cpu.download_f32(&tatt, &mut got).unwrap();
    let (mut want, mut probs) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
    attention::fwd(&mut want, &mut probs, &qkv, b, t, h, hd, true);
    assert_eq!(got, want);
}

#[test]
fn token_embedding_through_the_backend() {
    let mut cx = ctx();
    let cpu = Cpu;
    let (b, t, d, vocab) = (2, 3, 4, 6);
    let ids = [5, 0, 2, 2, 1, 5];
    let (wte, wpe) = (cx.vec(vocab * d), cx.vec(t * d));
    let tids = cpu.alloc(b * t, DType::I32).unwrap();
    cpu.upload_i32(&tids, &ids).unwrap();
    let (te, tp) = (cpu.alloc(vocab * d, DType::F32).unwrap(), cpu.alloc(t * d, DType::F32).unwrap());
    cpu.upload_f32(&te, &wte).unwrap();
    cpu.upload_f32(&tp, &wpe).unwrap();
    let tout = cpu.alloc(b * t * d, DType::F32).unwrap();
    cpu.token_embed_fwd(&tout, &tids, &te, &tp, b, t, d);
    let mut got = vec![0.0; b * t * d];
    cpu.download_f32(&tout, &mut got).unwrap();
    for (k, &id) in ids.iter().enumerate() {
        for j in 0..d {
            assert_eq!(got[k * d + j], wte[id as usize * d + j] + wpe[(k % t) * d + j]);
        }
    }
}

/// The four block ops through the backend equal the CPU functions they wrap, bit for bit,
/// with the gradient outputs (views of one buffer, as the step's are) holding values before.
#[test]
fn infonce_through_the_backend() {
    let mut cx = ctx();
    let cpu = Cpu;
    let (l, g, d, off) = (3, 9, 4, 3);
    let dims = InfoNceDims { local: l, global: g, dim: d, offset: off };
    let (img, txt) = (cx.vec(l * d), cx.vec(g * d));
    let up = |x: &[f32]| {
        let t = cpu.alloc(x.len(), DType::F32).unwrap();
        cpu.upload_f32(&t, x).unwrap();
        t
    };
    let down = |t: &kernels::Tensor<Cpu>| {
        let mut v = vec![0.0; t.len()];
        cpu.download_f32(t, &mut v).unwrap();
        v
    };
    let (ti, tt, ts) = (up(&img), up(&txt), up(&[0.5]));
    let (row_lse, pos) = (up(&vec![0.0; l]), up(&vec![0.0; l]));
    let (col_max, col_sum, col_lse) = (up(&vec![0.0; g]), up(&vec![0.0; g]), up(&vec![0.0; g]));
    cpu.infonce_block_fwd(&row_lse, &pos, &col_max, &col_sum, &ti, &tt, &ts, dims);
    let (mut rl, mut p, mut cm, mut cs) = (vec![0.0; l], vec![0.0; l], vec![0.0; g], vec![0.0; g]);
    kernels::cpu::infonce::block_fwd(&mut rl, &mut p, &mut cm, &mut cs, &img, &txt, 0.5, dims);
    assert_eq!(
        (down(&row_lse), down(&pos), down(&col_max), down(&col_sum)),
        (rl.clone(), p.clone(), cm.clone(), cs.clone())
    );
    // Another rank's maxima, above this one's.
    let gm: Vec<f32> = cm.iter().map(|m| m + 0.25).collect();
    let tgm = up(&gm);
    cpu.infonce_col_rescale(&col_sum, &col_max, &tgm);
    kernels::cpu::infonce::col_rescale(&mut cs, &cm, &gm);
    assert_eq!(down(&col_sum), cs);
    let loss = up(&[0.0]);
    cpu.infonce_block_loss(&loss, &col_lse, &row_lse, &pos, &tgm, &col_sum, dims);
    let mut cl = vec![0.0; g];
    let want = kernels::cpu::infonce::block_loss(&mut cl, &rl, &p, &gm, &cs, dims);
    assert_eq!(down(&loss), vec![want]);
    assert!(want > 0.0 && want.is_finite());
    assert_eq!(down(&col_lse), cl);
    let grads = cpu.alloc(l * d + g * d + 1, DType::F32).unwrap();
    cpu.fill(&grads, 1.0);
    let (di, dt, dscale) = (grads.slice(0, l * d), grads.slice(l * d, g * d), grads.slice(l * d + g * d, 1));
    cpu.infonce_block_bwd(&di, &dt, Some(&dscale), 1.0, &ti, &tt, &ts, &row_lse, &col_lse, dims);
    let (mut wi, mut wt) = (vec![1.0; l * d], vec![1.0; g * d]);
    let ds = kernels::cpu::infonce::block_bwd(&mut wi, &mut wt, 1.0, &img, &txt, 0.5, &rl, &cl, dims);
    let mut want = wi;
    want.extend(wt);
    want.push(1.0 + ds);
    assert_eq!(down(&grads), want);
}

#[test]
#[should_panic(expected = "overlaps")]
fn overlapping_output_panics() {
    let cpu = Cpu;
    let (n, c, oc) = (4, 3, 3);
    let buf = cpu.alloc(64, DType::F32).unwrap();
    let w = cpu.alloc(oc * c, DType::F32).unwrap();
    // The output starts inside the input.
    cpu.linear_fwd(&buf.slice(8, n * oc), &buf.slice(0, n * c), &w, None, n, c, oc);
}

#[test]
#[should_panic(expected = "overlap")]
fn overlapping_gradient_outputs_panic() {
    let cpu = Cpu;
    let (n, c, oc) = (4, 3, 3);
    let (inp, w, dout) = (
        cpu.alloc(n * c, DType::F32).unwrap(),
        cpu.alloc(oc * c, DType::F32).unwrap(),
        cpu.alloc(n * oc, DType::F32).unwrap(),
    );
    let grads = cpu.alloc(oc * c + oc, DType::F32).unwrap();
    // dbias overlaps the end of dw.
    cpu.linear_bwd(None, Some(&grads.slice(0, oc * c)), Some(&grads.slice(oc * c - 1, oc)), &dout, &inp, &w, n, c, oc);
}

#[test]
#[should_panic(expected = "tensor of")]
fn wrong_length_panics() {
    let cpu = Cpu;
    let x = cpu.alloc(10, DType::F32).unwrap();
    let y = cpu.alloc(12, DType::F32).unwrap();
    let norm = cpu.alloc(2, DType::F32).unwrap();
    cpu.l2norm_fwd(&y, &norm, &x, 2, 5);
}

#[test]
fn im2col_bwd_through_the_backend() {
    let mut cx = ctx();
    let cpu = Cpu;
    let (b, img, p) = (2, 12, 4);
    let n = b * 3 * img * img;
    let (dcols, start) = (cx.vec(n), cx.vec(n));
    let (tc, tp) = (cpu.alloc(n, DType::F32).unwrap(), cpu.alloc(n, DType::F32).unwrap());
    cpu.upload_f32(&tc, &dcols).unwrap();
    cpu.upload_f32(&tp, &start).unwrap();
    cpu.im2col_bwd(&tp, &tc, b, img, p);
    let mut got = vec![0.0; n];
    cpu.download_f32(&tp, &mut got).unwrap();
    let mut want = start;
    kernels::cpu::embed::im2col_bwd(&mut want, &dcols, b, img, p);
    assert_eq!(got, want);
}
