//! Patch extraction, vision / token embeddings and row pooling.
#![allow(clippy::too_many_arguments)]

use rayon::prelude::*;

/// Below this many elements the copy runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// `cols[b, py * g + px, (ch, r, c)] = pixels[b, ch, py * p + r, px * p + c]` with
/// `g = img / p`: one row of `cols` per patch in row-major grid order, its columns in the
/// order of a `[hidden, 3, p, p]` convolution weight flattened to `[hidden, 3 * p * p]`.
pub fn im2col(cols: &mut [f32], pixels: &[f32], b: usize, img: usize, p: usize) {
    let g = img / p;
    let per_image = 3 * img * img;
    let image = |cols: &mut [f32], px_img: &[f32]| {
        for (patch, row) in cols.chunks_exact_mut(3 * p * p).enumerate() {
            let (py, px) = (patch / g, patch % g);
            for ch in 0..3 {
                for r in 0..p {
                    // One contiguous run of `p` pixels per patch row.
                    let src = (ch * img + py * p + r) * img + px * p;
                    let dst = (ch * p + r) * p;
                    row[dst..dst + p].copy_from_slice(&px_img[src..src + p]);
                }
            }
        }
    };
    if b * per_image < PAR_MIN {
        for (c, x) in cols.chunks_exact_mut(per_image).zip(pixels.chunks_exact(per_image)) {
            image(c, x);
        }
    } else {
        cols.par_chunks_exact_mut(per_image).zip(pixels.par_chunks_exact(per_image)).for_each(|(c, x)| image(c, x));
    }
}

/// The backward of [`im2col`]: `dpixels += col2im(dcols)`, each column element added back to
/// the pixel it was copied from. Patches do not overlap (stride = kernel), so every pixel
/// receives exactly one column element and the images are independent (parallel by image).
pub fn im2col_bwd(dpixels: &mut [f32], dcols: &[f32], b: usize, img: usize, p: usize) {
    let g = img / p;
    let per_image = 3 * img * img;
    let image = |dpx: &mut [f32], cols: &[f32]| {
        for (patch, row) in cols.chunks_exact(3 * p * p).enumerate() {
            let (py, px) = (patch / g, patch % g);
            for ch in 0..3 {
                for r in 0..p {
                    let dst = (ch * img + py * p + r) * img + px * p;
                    let src = (ch * p + r) * p;
                    for (a, &v) in dpx[dst..dst + p].iter_mut().zip(&row[src..src + p]) {
                        *a += v;
                    }
                }
            }
        }
    };
    let (dpixels, dcols) = (&mut dpixels[..b * per_image], &dcols[..b * per_image]);
    if b * per_image < PAR_MIN {
        for (x, c) in dpixels.chunks_exact_mut(per_image).zip(dcols.chunks_exact(per_image)) {
            image(x, c);
        }
    } else {
        dpixels.par_chunks_exact_mut(per_image).zip(dcols.par_chunks_exact(per_image)).for_each(|(x, c)| image(x, c));
    }
}

/// `out[b, 0] = cls + pos[0]`, `out[b, 1 + i] = patches[b, i] + pos[1 + i]`.
pub fn vision_fwd(out: &mut [f32], patches: &[f32], cls: &[f32], pos: &[f32], b: usize, np: usize, d: usize) {
    let seq = (np + 1) * d;
    for (bi, o) in out.chunks_exact_mut(seq).take(b).enumerate() {
        for ((o, &c), &p) in o[..d].iter_mut().zip(cls).zip(&pos[..d]) {
            *o = c + p;
        }
        let x = &patches[bi * np * d..(bi + 1) * np * d];
        for ((o, &v), &p) in o[d..].iter_mut().zip(x).zip(&pos[d..]) {
            *o = v + p;
        }
    }
}

/// Accumulates; `dcls` and `dpos` sum over the batch.
pub fn vision_bwd(
    dpatches: Option<&mut [f32]>,
    dcls: Option<&mut [f32]>,
    dpos: Option<&mut [f32]>,
    dout: &[f32],
    b: usize,
    np: usize,
    d: usize,
) {
    let seq = (np + 1) * d;
    if let Some(dp) = dpatches {
        for (bi, dp) in dp.chunks_exact_mut(np * d).take(b).enumerate() {
            for (a, &g) in dp.iter_mut().zip(&dout[bi * seq + d..(bi + 1) * seq]) {
                *a += g;
            }
        }
    }
    if let Some(dc) = dcls {
        for g in dout.chunks_exact(seq).take(b) {
            for (a, &v) in dc.iter_mut().zip(&g[..d]) {
                *a += v;
            }
        }
    }
    if let Some(dpos) = dpos {
        for g in dout.chunks_exact(seq).take(b) {
            for (a, &v) in dpos.iter_mut().zip(g) {
                *a += v;
            }
        }
    }
}

/// The vocabulary row of token `(bi, ti)`; panics with the offending id if it is outside
/// `0..vocab` (a tokenizer / vocabulary mismatch must not read a neighbouring row).
fn token_row(ids: &[i32], bi: usize, ti: usize, t: usize, vocab: usize) -> usize {
    let id = ids[bi * t + ti];
    assert!(
        id >= 0 && (id as usize) < vocab,
        "token id {id} at batch row {bi}, position {ti} is outside the vocabulary 0..{vocab}"
    );
    id as usize
}

/// `out[b, t] = wte[ids[b, t]] + wpe[t]`.
/// Panics with the offending id if one is outside the vocabulary.
pub fn token_fwd(out: &mut [f32], ids: &[i32], wte: &[f32], wpe: &[f32], b: usize, t: usize, d: usize) {
    let vocab = wte.len() / d;
    for bi in 0..b {
        for ti in 0..t {
            let id = token_row(ids, bi, ti, t, vocab);
            let o = &mut out[(bi * t + ti) * d..(bi * t + ti + 1) * d];
            for ((o, &e), &p) in o.iter_mut().zip(&wte[id * d..(id + 1) * d]).zip(&wpe[ti * d..(ti + 1) * d]) {
                *o = e + p;
            }
        }
    }
}

/// Accumulates: a scatter-add into `dwte` in token order (deterministic; repeated ids add
/// up), and the batch sum into `dwpe`.
pub fn token_bwd(
    dwte: Option<&mut [f32]>,
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    ids: &[i32],
    b: usize,
    t: usize,
    d: usize,
) {
    if let Some(dwte) = dwte {
        let vocab = dwte.len() / d;
        for bi in 0..b {
            for ti in 0..t {
                let id = token_row(ids, bi, ti, t, vocab);
                let g = &dout[(bi * t + ti) * d..(bi * t + ti + 1) * d];
                for (a, &v) in dwte[id * d..(id + 1) * d].iter_mut().zip(g) {
                    *a += v;
                }
            }
        }
    }
    if let Some(dwpe) = dwpe {
        for g in dout.chunks_exact(t * d).take(b) {
            for (a, &v) in dwpe[..t * d].iter_mut().zip(g) {
                *a += v;
            }
        }
    }
}

/// The row picked in sequence `i`, checked against the sequence length.
fn picked(index: &[i32], i: usize, t: usize) -> usize {
    let k = index[i];
    assert!(k >= 0 && (k as usize) < t, "gather index {k} of sequence {i} is outside 0..{t}");
    k as usize
}

/// `out[i] = inp[i, index[i]]`.
pub fn gather_rows(out: &mut [f32], inp: &[f32], index: &[i32], b: usize, t: usize, d: usize) {
    for (i, o) in out.chunks_exact_mut(d).take(b).enumerate() {
        let k = picked(index, i, t);
        o.copy_from_slice(&inp[(i * t + k) * d..(i * t + k + 1) * d]);
    }
}

/// Accumulates `dout[i]` into row `index[i]` of sequence `i`.
pub fn gather_rows_bwd(dinp: &mut [f32], dout: &[f32], index: &[i32], b: usize, t: usize, d: usize) {
    for (i, g) in dout.chunks_exact(d).take(b).enumerate() {
        let k = picked(index, i, t);
        for (a, &v) in dinp[(i * t + k) * d..(i * t + k + 1) * d].iter_mut().zip(g) {
            *a += v;
        }
    }
}
