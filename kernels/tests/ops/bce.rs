use kernels::cpu::bce;

use crate::common::*;

/// `torch.nn.BCEWithLogitsLoss` written out in f64 from its definition
/// `-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))`, a mean over the entries whose mask is
/// 1 (all without a mask); 0 when none counts.
fn reference(x: &[f64], y: &[f32], mask: Option<&[f32]>) -> f64 {
    let (mut s, mut count) = (0.0, 0.0);
    for i in 0..x.len() {
        let w = mask.map_or(1.0, |m| m[i] as f64);
        if w == 0.0 {
            continue;
        }
        let sig = 1.0 / (1.0 + (-x[i]).exp());
        let y = y[i] as f64;
        s += w * -(y * sig.ln() + (1.0 - y) * (1.0 - sig).ln());
        count += w;
    }
    if count == 0.0 {
        0.0
    } else {
        s / count
    }
}

fn case(n: usize, masked: bool) {
    let mut cx = ctx();
    println!("bce n={n} masked={masked}");
    // Logits up to |x| = 8 (the reference's log(1 - sigmoid) stays accurate in f64 there),
    // hard and soft targets.
    let x = cx.uniform(n, -8.0, 8.0);
    let y: Vec<f32> =
        (0..n).map(|_| if cx.below(4) == 0 { cx.uniform(1, 0.0, 1.0)[0] } else { cx.below(2) as f32 }).collect();
    let mut mask: Vec<f32> = (0..n).map(|_| (cx.below(3) != 0) as i32 as f32).collect();
    mask[n / 2] = 1.0;
    let m = masked.then_some(&mask[..]);
    let loss = bce::fwd(&x, &y, m);
    let want = reference(&to64(&x), &y, m);
    assert_close(&cx, "bce loss", &[loss], &[want], 1e-7, 1e-6);

    let dloss = cx.uniform(1, 0.5, 2.0)[0];
    let d0 = cx.vec(n);
    let mut d = d0.clone();
    bce::bwd(&mut d, &x, &y, m, dloss);
    let f = |v: &[f64]| dloss as f64 * reference(v, &y, m);
    let idx = cx.coords(n, 200);
    check_grad(&cx, "bce dlogits", &f, &x, &d0, &d, &idx, 1e-6, 1e-5);
    if masked {
        for (i, &w) in mask.iter().enumerate() {
            if w == 0.0 {
                assert_eq!(d[i], d0[i], "bce: a masked-out logit got a gradient (seed {})", cx.seed);
            }
        }
    }
}

#[test]
fn bce_plain_and_masked() {
    for n in [1, 14, 14 * 37] {
        case(n, false);
        case(n.max(2), true);
    }
}

/// Large logits: the loss stays finite and linear in |x| (no sigmoid is formed), the
/// gradient saturates at -y or 1 - y.
#[test]
fn bce_extreme_logits() {
    let x = [80.0f32, -80.0, 80.0, -80.0];
    let y = [0.0f32, 1.0, 1.0, 0.0];
    let loss = bce::fwd(&x, &y, None);
    assert!((loss - 40.0).abs() < 1e-4, "loss {loss}");
    let mut d = [0.0f32; 4];
    bce::bwd(&mut d, &x, &y, None, 4.0);
    for (g, want) in d.iter().zip([1.0, -1.0, 0.0, 0.0]) {
        assert!((g - want).abs() < 1e-6 && g.is_finite(), "gradient {d:?}");
    }
}

/// Every entry ignored: the loss is 0 and the backward adds nothing (no 0 / 0).
#[test]
fn bce_all_masked() {
    let mut cx = ctx();
    let (x, y) = (cx.vec(9), cx.uniform(9, 0.0, 1.0));
    let mask = [0.0f32; 9];
    assert_eq!(bce::fwd(&x, &y, Some(&mask)), 0.0);
    let d0 = cx.vec(9);
    let mut d = d0.clone();
    bce::bwd(&mut d, &x, &y, Some(&mask), 1.0);
    assert_eq!(d, d0);
}

/// The backend op writes the same loss as the slice function and checks its lengths.
#[test]
fn bce_through_the_backend() {
    use kernels::{Backend, Cpu, DType};
    let mut cx = ctx();
    let cpu = Cpu;
    let n = 30;
    let (x, y, mask) = (cx.uniform(n, -4.0, 4.0), cx.uniform(n, 0.0, 1.0), vec![1.0f32; n]);
    let up = |v: &[f32]| {
        let t = cpu.alloc(v.len(), DType::F32).unwrap();
        cpu.upload_f32(&t, v).unwrap();
        t
    };
    let (tx, ty, tm, loss) = (up(&x), up(&y), up(&mask), up(&[f32::NAN]));
    cpu.bce_with_logits_fwd(&loss, &tx, &ty, Some(&tm));
    let mut l = [0.0];
    cpu.download_f32(&loss, &mut l).unwrap();
    assert_eq!(l[0], bce::fwd(&x, &y, None), "an all-ones mask is no mask");
}
