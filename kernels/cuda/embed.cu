// Patch extraction (im2col) and its backward, vision / token embeddings, row pooling.

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// cols[b, py*g + px, (ch, r, c)] = pixels[b, ch, py*p + r, px*p + c], g = img / p.
// One thread per output element (coalesced writes).
extern "C" __global__ void im2col(void* cols, int cb, const void* pixels, int pb, i64 b, int img, int p) {
    int g = img / p;
    i64 per_patch = 3LL * p * p;
    i64 per_img = 3LL * img * img;
    i64 n = b * per_img;
    GRID_STRIDE(i, n) {
        i64 bi = i / per_img;
        i64 rem = i % per_img;
        i64 patch = rem / per_patch;
        int e = (int)(rem % per_patch);
        int ch = e / (p * p), r = (e / p) % p, c = e % p;
        int py = (int)(patch / g), px = (int)(patch % g);
        i64 src = bi * per_img + ((i64)ch * img + py * p + r) * img + px * p + c;
        stf(cols, cb, i, ldf(pixels, pb, src));
    }
}

// dpixels += the scatter of dcols (each pixel belongs to exactly one patch: no conflicts).
extern "C" __global__ void col2im(void* dpixels, int pb, const void* dcols, int cb, i64 b, int img, int p) {
    int g = img / p;
    i64 per_patch = 3LL * p * p;
    i64 per_img = 3LL * img * img;
    i64 n = b * per_img;
    GRID_STRIDE(i, n) {
        i64 bi = i / per_img;
        i64 rem = i % per_img;
        i64 patch = rem / per_patch;
        int e = (int)(rem % per_patch);
        int ch = e / (p * p), r = (e / p) % p, c = e % p;
        int py = (int)(patch / g), px = (int)(patch % g);
        i64 dst = bi * per_img + ((i64)ch * img + py * p + r) * img + px * p + c;
        addf(dpixels, pb, dst, ldf(dcols, cb, i));
    }
}

// out[b, 0] = cls + pos[0]; out[b, 1 + i] = patches[b, i] + pos[1 + i].
extern "C" __global__ void vision_embed_fwd(void* out, int ob, const void* patches, int pb, const void* cls, int cb,
                                            const void* pos, int qb, i64 b, int np, int d) {
    i64 seq = (i64)(np + 1) * d;
    i64 n = b * seq;
    GRID_STRIDE(i, n) {
        i64 bi = i / seq;
        i64 rem = i % seq;
        float v = rem < d ? ldf(cls, cb, rem) : ldf(patches, pb, bi * np * d + rem - d);
        stf(out, ob, i, v + ldf(pos, qb, rem));
    }
}

// dpatches[b, i] += dout[b, 1 + i].
extern "C" __global__ void vision_embed_bwd_patches(void* dpatches, int pb, const void* dout, int gb, i64 b, int np, int d) {
    i64 per = (i64)np * d;
    i64 n = b * per;
    GRID_STRIDE(i, n) {
        i64 bi = i / per;
        addf(dpatches, pb, i, ldf(dout, gb, bi * (per + d) + d + i % per));
    }
}

// out[bi, ti] = wte[ids[bi, ti]] + wpe[ti]; an id outside 0..vocab sets *bad (checked by the host)
// and writes NaN instead of reading a neighbouring row.
extern "C" __global__ void token_embed_fwd(void* out, int ob, const int* ids, const void* wte, int eb, const void* wpe,
                                           int pb, i64 b, int t, int d, int vocab, int* bad) {
    i64 n = b * t * d;
    GRID_STRIDE(i, n) {
        i64 tok = i / d;
        int j = (int)(i % d);
        int ti = (int)(tok % t);
        int id = ids[tok];
        float v;
        if (id < 0 || id >= vocab) {
            *bad = 1;
            v = __int_as_float(0x7fc00000);
        } else {
            v = ldf(wte, eb, (i64)id * d + j) + ldf(wpe, pb, (i64)ti * d + j);
        }
        stf(out, ob, i, v);
    }
}

// dwte[ids[k]] += dout[k] for k in token order: one thread per column, a serial loop over the
// tokens, so repeated ids add up in the same order on every run (deterministic, no atomics).
extern "C" __global__ void token_embed_bwd_wte(void* dwte, int eb, const void* dout, int gb, const int* ids, i64 ntok,
                                               int d, int vocab) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    for (i64 k = 0; k < ntok; k++) {
        int id = ids[k];
        if (id < 0 || id >= vocab) continue;
        addf(dwte, eb, (i64)id * d + j, ldf(dout, gb, k * d + j));
    }
}

// out[i] = inp[i, index[i]] for b sequences of t rows of d; an index outside 0..t sets *bad.
extern "C" __global__ void gather_rows(void* out, int ob, const void* inp, int ib, const int* index, i64 b, int t, int d, int* bad) {
    i64 n = b * d;
    GRID_STRIDE(i, n) {
        i64 s = i / d;
        int j = (int)(i % d);
        int k = index[s];
        if (k < 0 || k >= t) {
            *bad = 1;
            stf(out, ob, i, __int_as_float(0x7fc00000));
        } else {
            stf(out, ob, i, ldf(inp, ib, (s * t + k) * d + j));
        }
    }
}

extern "C" __global__ void gather_rows_bwd(void* dinp, int db, const void* dout, int gb, const int* index, i64 b, int t, int d) {
    i64 n = b * d;
    GRID_STRIDE(i, n) {
        i64 s = i / d;
        int j = (int)(i % d);
        int k = index[s];
        if (k >= 0 && k < t) addf(dinp, db, (s * t + k) * d + j, ldf(dout, gb, i));
    }
}
