use kernels::cpu::{embed, linear};

use crate::common::*;

#[test]
fn im2col_matches_a_strided_convolution() {
    let mut cx = ctx();
    for (b, img, p, hidden) in [(2, 8, 4, 5), (1, 6, 3, 7), (3, 4, 1, 2), (1, 5, 5, 3)] {
        let g = img / p;
        let np = g * g;
        let pixels = cx.vec(b * 3 * img * img);
        let w = cx.vec(hidden * 3 * p * p);
        let mut cols = cx.vec(b * np * 3 * p * p);
        embed::im2col(&mut cols, &pixels, b, img, p);
        // Every element moved, none changed: check the copy by its index formula.
        for bi in 0..b {
            for py in 0..g {
                for px in 0..g {
                    for ch in 0..3 {
                        for r in 0..p {
                            for cc in 0..p {
                                let got = cols[((bi * np + py * g + px) * 3 + ch) * p * p + r * p + cc];
                                let want = pixels[((bi * 3 + ch) * img + py * p + r) * img + px * p + cc];
                                assert_eq!(got, want, "im2col b={bi} patch=({py},{px}) ch={ch} r={r} c={cc}");
                            }
                        }
                    }
                }
            }
        }
        // And the point of it: cols . w^T is the convolution with a [hidden, 3, p, p] kernel.
        let mut out = vec![0.0; b * np * hidden];
        linear::fwd(&mut out, &cols, &w, None, b * np, 3 * p * p, hidden);
        let mut want = vec![0.0f64; b * np * hidden];
        for bi in 0..b {
            for py in 0..g {
                for px in 0..g {
                    for o in 0..hidden {
                        let mut acc = 0.0;
                        for ch in 0..3 {
                            for r in 0..p {
                                for cc in 0..p {
                                    acc += w[((o * 3 + ch) * p + r) * p + cc] as f64
                                        * pixels[((bi * 3 + ch) * img + py * p + r) * img + px * p + cc] as f64;
                                }
                            }
                        }
                        want[(bi * np + py * g + px) * hidden + o] = acc;
                    }
                }
            }
        }
        assert_close(&cx, "patch embedding", &out, &want, 1e-5, 1e-5);
    }
}

#[test]
fn im2col_parallel_size() {
    let mut cx = ctx();
    let (b, img, p) = (3, 64, 16);
    let pixels = cx.vec(b * 3 * img * img);
    let mut cols = vec![0.0; pixels.len()];
    embed::im2col(&mut cols, &pixels, b, img, p);
    let g = img / p;
    for _ in 0..1000 {
        let (bi, py, px, ch, r, cc) = (cx.below(b), cx.below(g), cx.below(g), cx.below(3), cx.below(p), cx.below(p));
        assert_eq!(
            cols[((bi * g * g + py * g + px) * 3 + ch) * p * p + r * p + cc],
            pixels[((bi * 3 + ch) * img + py * p + r) * img + px * p + cc]
        );
    }
}

/// `im2col` in f64 by its index formula, the function whose gradient `im2col_bwd` is.
fn im2col_ref(pixels: &[f64], b: usize, img: usize, p: usize) -> Vec<f64> {
    let g = img / p;
    let mut cols = vec![0.0; pixels.len()];
    for bi in 0..b {
        for py in 0..g {
            for px in 0..g {
                for ch in 0..3 {
                    for r in 0..p {
                        for cc in 0..p {
                            cols[((bi * g * g + py * g + px) * 3 + ch) * p * p + r * p + cc] =
                                pixels[((bi * 3 + ch) * img + py * p + r) * img + px * p + cc];
                        }
                    }
                }
            }
        }
    }
    cols
}

#[test]
fn im2col_bwd_is_the_gradient_of_im2col() {
    let mut cx = ctx();
    // Small shapes, a patch of one pixel, a whole-image patch, and one above the parallel cut.
    for (b, img, p) in [(2, 8, 4), (1, 6, 3), (3, 4, 1), (1, 5, 5), (3, 64, 16)] {
        let pixels = cx.vec(b * 3 * img * img);
        let r = cx.vec(pixels.len());
        let start = cx.vec(pixels.len());
        let mut dpixels = start.clone();
        embed::im2col_bwd(&mut dpixels, &r, b, img, p);
        let f = |x: &[f64]| dot(&im2col_ref(x, b, img, p), &r);
        let idx = cx.coords(pixels.len(), 300);
        check_grad(&cx, &format!("im2col_bwd b={b} img={img} p={p}"), &f, &pixels, &start, &dpixels, &idx, 1e-6, 1e-6);
        // Every pixel, not just the sampled ones: col2im of im2col(x) is x (one patch per pixel).
        let mut cols = vec![0.0; pixels.len()];
        embed::im2col(&mut cols, &pixels, b, img, p);
        let mut back = vec![0.0; pixels.len()];
        embed::im2col_bwd(&mut back, &cols, b, img, p);
        assert_eq!(back, pixels, "col2im(im2col(x)) != x at b={b} img={img} p={p} (seed {})", cx.seed);
    }
}

fn vision_ref(patches: &[f64], cls: &[f64], pos: &[f64], b: usize, np: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * (np + 1) * d];
    for bi in 0..b {
        for k in 0..d {
            out[bi * (np + 1) * d + k] = cls[k] + pos[k];
        }
        for i in 0..np {
            for k in 0..d {
                out[(bi * (np + 1) + 1 + i) * d + k] = patches[(bi * np + i) * d + k] + pos[(1 + i) * d + k];
            }
        }
    }
    out
}

#[test]
fn vision_embedding() {
    let mut cx = ctx();
    for (b, np, d) in [(1, 1, 1), (2, 4, 6), (3, 49, 16)] {
        let (patches, cls, pos) = (cx.vec(b * np * d), cx.vec(d), cx.vec((np + 1) * d));
        let mut out = cx.vec(b * (np + 1) * d);
        embed::vision_fwd(&mut out, &patches, &cls, &pos, b, np, d);
        let (p64, c64, pos64) = (to64(&patches), to64(&cls), to64(&pos));
        assert_close(&cx, "vision embed", &out, &vision_ref(&p64, &c64, &pos64, b, np, d), 0.0, 1e-7);

        let r = cx.vec(out.len());
        let (dp0, dc0, dpos0) = (cx.vec(patches.len()), cx.vec(d), cx.vec(pos.len()));
        let (mut dp, mut dc, mut dpos) = (dp0.clone(), dc0.clone(), dpos0.clone());
        embed::vision_bwd(Some(&mut dp), Some(&mut dc), Some(&mut dpos), &r, b, np, d);
        let f_p = |x: &[f64]| dot(&vision_ref(x, &c64, &pos64, b, np, d), &r);
        let f_c = |x: &[f64]| dot(&vision_ref(&p64, x, &pos64, b, np, d), &r);
        let f_pos = |x: &[f64]| dot(&vision_ref(&p64, &c64, x, b, np, d), &r);
        let idx = cx.coords(dp.len(), 200);
        check_grad(&cx, "vision dpatches", &f_p, &patches, &dp0, &dp, &idx, 1e-5, 1e-5);
        let idx = cx.coords(d, 200);
        check_grad(&cx, "vision dcls", &f_c, &cls, &dc0, &dc, &idx, 1e-5, 1e-5);
        let idx = cx.coords(dpos.len(), 200);
        check_grad(&cx, "vision dpos", &f_pos, &pos, &dpos0, &dpos, &idx, 1e-5, 1e-5);

        // A frozen class token and position table: only dpatches moves.
        let mut dp2 = dp0.clone();
        embed::vision_bwd(Some(&mut dp2), None, None, &r, b, np, d);
        assert_eq!(dp2, dp);
    }
}

fn token_ref(ids: &[i32], wte: &[f64], wpe: &[f64], b: usize, t: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * t * d];
    for bi in 0..b {
        for ti in 0..t {
            let id = ids[bi * t + ti] as usize;
            for k in 0..d {
                out[(bi * t + ti) * d + k] = wte[id * d + k] + wpe[ti * d + k];
            }
        }
    }
    out
}

#[test]
fn token_embedding() {
    let mut cx = ctx();
    for (b, t, d, vocab, max_pos) in [(1, 1, 1, 1, 1), (2, 7, 5, 11, 9), (3, 77, 8, 50, 77)] {
        // A small vocabulary, so that ids repeat and the scatter-add must add them up.
        let ids: Vec<i32> = (0..b * t).map(|_| cx.below(vocab) as i32).collect();
        let (wte, wpe) = (cx.vec(vocab * d), cx.vec(max_pos * d));
        let mut out = cx.vec(b * t * d);
        embed::token_fwd(&mut out, &ids, &wte, &wpe, b, t, d);
        let (e64, p64) = (to64(&wte), to64(&wpe));
        assert_close(&cx, "token embed", &out, &token_ref(&ids, &e64, &p64, b, t, d), 0.0, 1e-7);

        let r = cx.vec(out.len());
        let (de0, dp0) = (cx.vec(wte.len()), cx.vec(wpe.len()));
        let (mut de, mut dp) = (de0.clone(), dp0.clone());
        embed::token_bwd(Some(&mut de), Some(&mut dp), &r, &ids, b, t, d);
        let f_e = |x: &[f64]| dot(&token_ref(&ids, x, &p64, b, t, d), &r);
        let f_p = |x: &[f64]| dot(&token_ref(&ids, &e64, x, b, t, d), &r);
        let idx: Vec<usize> = (0..wte.len()).collect();
        check_grad(&cx, "token dwte", &f_e, &wte, &de0, &de, &idx, 1e-5, 1e-5);
        let idx: Vec<usize> = (0..wpe.len()).collect();
        check_grad(&cx, "token dwpe", &f_p, &wpe, &dp0, &dp, &idx, 1e-5, 1e-5);
    }
}

#[test]
#[should_panic(expected = "token id 11 at batch row 1, position 2 is outside the vocabulary 0..11")]
fn token_id_out_of_vocabulary_panics() {
    let (b, t, d, vocab) = (2, 3, 4, 11);
    let mut ids = vec![0i32; b * t];
    ids[t + 2] = vocab as i32;
    let mut out = vec![0.0; b * t * d];
    embed::token_fwd(&mut out, &ids, &vec![0.5; vocab * d], &vec![0.5; t * d], b, t, d);
}

#[test]
#[should_panic(expected = "token id -1")]
fn negative_token_id_panics_in_backward() {
    let (b, t, d, vocab) = (1, 3, 2, 5);
    let ids = vec![0, -1, 2];
    let mut dwte = vec![0.0; vocab * d];
    embed::token_bwd(Some(&mut dwte), None, &vec![0.5; b * t * d], &ids, b, t, d);
}

fn gather_ref(inp: &[f64], index: &[i32], b: usize, t: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; b * d];
    for i in 0..b {
        let k = index[i] as usize;
        out[i * d..(i + 1) * d].copy_from_slice(&inp[(i * t + k) * d..(i * t + k + 1) * d]);
    }
    out
}

#[test]
fn gather_rows_and_backward() {
    let mut cx = ctx();
    for (b, t, d) in [(1, 1, 1), (4, 7, 3), (5, 77, 16)] {
        let index: Vec<i32> = (0..b).map(|_| cx.below(t) as i32).collect();
        let inp = cx.vec(b * t * d);
        let mut out = cx.vec(b * d);
        embed::gather_rows(&mut out, &inp, &index, b, t, d);
        let x64 = to64(&inp);
        assert_close(&cx, "gather", &out, &gather_ref(&x64, &index, b, t, d), 0.0, 1e-7);
        let r = cx.vec(b * d);
        let d0 = cx.vec(b * t * d);
        let mut dx = d0.clone();
        embed::gather_rows_bwd(&mut dx, &r, &index, b, t, d);
        let f = |x: &[f64]| dot(&gather_ref(x, &index, b, t, d), &r);
        let idx: Vec<usize> = (0..inp.len()).collect();
        check_grad(&cx, "gather dinp", &f, &inp, &d0, &dx, &idx, 1e-5, 1e-5);
    }
}

#[test]
#[should_panic(expected = "gather index 7 of sequence 1 is outside 0..7")]
fn gather_index_out_of_range_panics() {
    let (b, t, d) = (2, 7, 3);
    let mut out = vec![0.0; b * d];
    embed::gather_rows(&mut out, &vec![1.0; b * t * d], &[0, 7], b, t, d);
}
