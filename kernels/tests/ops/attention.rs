use kernels::cpu::attention;

use crate::common::*;

/// Returns (out[b, t, h*hd], probs[b, h, t, t]) in f64, straight from the definition.
#[allow(clippy::needless_range_loop)]
fn reference(qkv: &[f64], b: usize, t: usize, h: usize, hd: usize, causal: bool) -> (Vec<f64>, Vec<f64>) {
    let c = h * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    let (mut out, mut probs) = (vec![0.0; b * t * c], vec![0.0; b * h * t * t]);
    let at = |bi: usize, ti: usize, part: usize, j: usize, k: usize| qkv[(bi * t + ti) * 3 * c + part * c + j * hd + k];
    for bi in 0..b {
        for j in 0..h {
            for tq in 0..t {
                let live = if causal { tq + 1 } else { t };
                let mut s = vec![0.0; live];
                for ts in 0..live {
                    s[ts] = (0..hd).map(|k| at(bi, tq, 0, j, k) * at(bi, ts, 1, j, k)).sum::<f64>() * scale;
                }
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - max).exp()).sum();
                for ts in 0..live {
                    let p = (s[ts] - max).exp() / z;
                    probs[((bi * h + j) * t + tq) * t + ts] = p;
                    for k in 0..hd {
                        out[(bi * t + tq) * c + j * hd + k] += p * at(bi, ts, 2, j, k);
                    }
                }
            }
        }
    }
    (out, probs)
}

fn case(b: usize, t: usize, h: usize, hd: usize, causal: bool, fd_coords: usize) {
    let mut cx = ctx();
    println!("attention b={b} t={t} h={h} hd={hd} causal={causal}");
    let c = h * hd;
    // Spread wide enough that the softmax is far from uniform.
    let qkv = cx.uniform(b * t * 3 * c, -2.0, 2.0);
    let (mut out, mut probs) = (cx.vec(b * t * c), cx.vec(b * h * t * t));
    attention::fwd(&mut out, &mut probs, &qkv, b, t, h, hd, causal);
    let q64 = to64(&qkv);
    let (want, want_probs) = reference(&q64, b, t, h, hd, causal);
    assert_close(&cx, "attention out", &out, &want, 1e-5, 1e-4);
    assert_close(&cx, "attention probs", &probs, &want_probs, 1e-6, 1e-4);
    if causal {
        for (k, &p) in probs.iter().enumerate() {
            let (tq, ts) = ((k / t) % t, k % t);
            assert!(ts <= tq || p == 0.0, "masked probability {p} at query {tq}, key {ts}");
        }
    }

    let r = cx.vec(b * t * c);
    let d0 = cx.vec(b * t * 3 * c);
    let mut d = d0.clone();
    attention::bwd(&mut d, &r, &qkv, &out, &probs, b, t, h, hd, causal);
    let f = |x: &[f64]| dot(&reference(x, b, t, h, hd, causal).0, &r);
    // Sample q, k and v coordinates alike: a third of the budget each.
    let n = b * t * 3 * c;
    let idx: Vec<usize> = if n <= fd_coords {
        (0..n).collect()
    } else {
        (0..fd_coords)
            .map(|k| {
                let (row, part, col) = (cx.below(b * t), k % 3, cx.below(c));
                row * 3 * c + part * c + col
            })
            .collect()
    };
    check_grad(&cx, "attention dqkv", &f, &qkv, &d0, &d, &idx, 1e-4, 1e-4);
}

#[test]
fn attention_small_all_coordinates() {
    for causal in [false, true] {
        case(2, 7, 2, 4, causal, usize::MAX);
        case(1, 1, 1, 3, causal, usize::MAX);
        case(3, 5, 1, 8, causal, usize::MAX);
    }
}

#[test]
fn attention_odd_lengths() {
    for causal in [false, true] {
        case(1, 50, 3, 8, causal, 30);
    }
}

#[test]
fn attention_clip_shapes() {
    // The text tower (t = 77, causal) and a vision-like length, at the real head size.
    case(2, 77, 2, 64, true, 12);
    case(1, 50, 2, 64, false, 12);
}
