// The distributed symmetric InfoNCE loss as one similarity block per rank, fused: rank r's
// block S = s * img_r . TXT^T (local images x gathered texts, s = exp(logit_scale)) carries
// both directions (row i: image i against every text; column j: text j against this rank's
// images). Tiles on the tensor cores (mma.sync m16n8k16, bf16 operands, f32 accumulation),
// online log-sum-exps, only per-row and per-column statistics saved. Memory is
// O((local + global) x dim) plus small per-split partials; the block never exists whole.
//
// A block of 8 warps holds a tile of 64 "fixed" rows in shared memory and streams 64-row
// tiles of the "streaming" features past it. With logit(i, j) = s * x_i . y_j:
//   fwd       (infonce_fwd_block) fixed = images, streaming = a split of the texts; both
//             directions' statistics from each logit computed once (2 L G D): per image row
//             the online (max, sum) of exp over the split, per text column the (max, sum)
//             over the block's row group, in the log2 domain, and the positive logits;
//   bwd rows  fixed = local images, streaming = a split of the texts:
//             dX_i += s * sum_j G_ij Y_j (per-split partials, reduced in order afterwards)
//             and the partial sums of G_ij * logit_ij for d logit_scale;
//   bwd cols  fixed = texts, streaming = all local images: dY_j += s * sum_i G_ij X_i;
// with G_ij = coef * (exp(logit_ij - lse_row_i) + exp(logit_ij - lse_col_j) - 2 [j == off + i]),
// coef = dloss / (2 * global): both directions' gradients from one recomputed logit. The
// backward recomputes the block in each of its two passes (8 L G D; 10 in all): one pass for
// both gradients would reduce one of them across blocks, with float atomics (a different sum
// order each run) or per-split partials of the whole gradient (split x rows x width, beyond the
// L2 cache at scale).
//
// Any feature width: the width is padded to a multiple of 64 (dp) with zero columns, which
// change no dot product, and outputs are written only for the real columns. Shared memory
// holds feature chunks of kw = min(dp, 512) columns. Up to 512 the fixed tile stays resident
// and each streaming tile is loaded once; beyond, every streaming tile walks the chunks
// (fixed and streaming chunk loaded together) and sums the dot products over them. The
// backward's output (64 fixed rows x a chunk of 512 columns, 64 per warp, in registers) is
// one chunk per block: grid z picks the chunk, and the block walks its own chunk last so that
// the streaming tile's columns it multiplies G by are still in shared memory.
// Everything is deterministic: fixed tiles, fixed splits, fixed chunk order, reductions in a
// fixed order.

#define FT 64     // fixed rows per block
#define ST 64     // streaming rows per tile
#define KC 512    // widest feature chunk in shared memory: 8 warps x 64 output columns
#define GPITCH 72
#define LOG2E 1.4426950408889634f

// The feature width padded to a multiple of 64, and the chunk width held in shared memory.
__device__ __forceinline__ int padded_dim(int dim) { return (dim + 63) / 64 * 64; }
__device__ __forceinline__ int chunk_width(int dim) { return min(padded_dim(dim), KC); }

// The dynamic shared memory of the tile kernels, carved by `carve`.
extern __shared__ __align__(16) unsigned char smem_raw[];

struct Smem {
    bf16* f;    // [FT][pitch]
    bf16* s;    // [ST][pitch]
    bf16* g;    // [FT][GPITCH]
    float* lse; // [ST]
    float* red; // [4][FT]
    float* cred; // [2][4][ST]: the forward's column (max, sum) per warp row group
};

__device__ __forceinline__ Smem carve(unsigned char* base, int pitch) {
    Smem m;
    m.f = (bf16*)base;
    m.s = m.f + FT * pitch;
    m.g = m.s + ST * pitch;
    m.lse = (float*)(m.g + FT * GPITCH);
    m.red = m.lse + ST;
    m.cred = m.red + 4 * FT;
    return m;
}

// Rows r0 .. r0+63, columns c0 .. c0+cw-1 of src[n][dim] into dst[row][pitch] as bf16, zero
// past n and past dim.
__device__ __forceinline__ void load_rows(bf16* dst, int pitch, const void* src, int sb, i64 r0, i64 n, int dim, int c0,
                                          int cw) {
    for (int idx = threadIdx.x; idx < 64 * cw; idx += blockDim.x) {
        int r = idx / cw, d = idx % cw;
        float v = (r0 + r < n && c0 + d < dim) ? ldf(src, sb, (r0 + r) * dim + c0 + d) : 0.f;
        dst[r * pitch + d] = __float2bfloat16(v);
    }
}

// One tile of fixed rows against 64 streaming rows: this warp's 16 fixed rows x 32 streaming
// rows of s * X . Y^T, summed over the chunks. `chunk_at(i)` is the i-th chunk's first column.
template <typename ChunkAt>
__device__ __forceinline__ void logit_tile(float st[4][4], const Smem& sm, int pitch, int nch, int dp, const void* fx,
                                           int fb, i64 f0, i64 nf, const void* sx, int sb, i64 s0, i64 s_end, int dim,
                                           ChunkAt chunk_at, const float* lse_s) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
#pragma unroll
    for (int nt = 0; nt < 4; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) st[nt][e] = 0.f;
    for (int i = 0; i < nch; i++) {
        const int c0 = chunk_at(i);
        const int cw = min(KC, dp - c0);
        __syncthreads();
        if (nch > 1) load_rows(sm.f, pitch, fx, fb, f0, nf, dim, c0, cw);
        load_rows(sm.s, pitch, sx, sb, s0, s_end, dim, c0, cw);
        if (lse_s != nullptr && i == 0) {
            for (int j = threadIdx.x; j < ST; j += blockDim.x) sm.lse[j] = s0 + j < s_end ? lse_s[s0 + j] * LOG2E : INFINITY;
        }
        __syncthreads();
        for (int k = 0; k < cw; k += 16) {
            unsigned a[4];
            a[0] = lds32(&sm.f[(mt * 16 + g) * pitch + k + 2 * q]);
            a[1] = lds32(&sm.f[(mt * 16 + g + 8) * pitch + k + 2 * q]);
            a[2] = lds32(&sm.f[(mt * 16 + g) * pitch + k + 2 * q + 8]);
            a[3] = lds32(&sm.f[(mt * 16 + g + 8) * pitch + k + 2 * q + 8]);
#pragma unroll
            for (int nt = 0; nt < 4; nt++) {
                const bf16* bp = &sm.s[(nh * 32 + nt * 8 + g) * pitch + k + 2 * q];
                mma_bf16(st[nt], a, lds32(bp), lds32(bp + 8));
            }
        }
    }
}

// The (max, sum) pairs of a fixed row (log2 domain) merged over the 4 lanes that hold it,
// then over the two warps of column halves through sm.red, into part_[m|l][blockIdx.y][row].
__device__ __forceinline__ void store_row_stats(float m[2], float l[2], const Smem& sm, i64 f0, i64 nf, float* part_m,
                                                float* part_l) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
#pragma unroll
    for (int r = 0; r < 2; r++) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m[r], o);
            float l2 = __shfl_xor_sync(0xffffffffu, l[r], o);
            float mn = fmaxf(m[r], m2);
            if (mn != -INFINITY) {
                l[r] = l[r] * exp2f(m[r] - mn) + l2 * exp2f(m2 - mn);
                m[r] = mn;
            }
        }
    }
    __syncthreads();
    if (q == 0) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int fr = mt * 16 + g + 8 * r;
            sm.red[nh * FT + fr] = m[r];
            sm.red[2 * FT + nh * FT + fr] = l[r];
        }
    }
    __syncthreads();
    for (int fr = threadIdx.x; fr < FT; fr += blockDim.x) {
        if (f0 + fr >= nf) continue;
        float ma = sm.red[fr], mb = sm.red[FT + fr];
        float la = sm.red[2 * FT + fr], lb = sm.red[3 * FT + fr];
        float mn = fmaxf(ma, mb);
        float ln = 0.f;
        if (mn != -INFINITY) ln = la * exp2f(ma - mn) + lb * exp2f(mb - mn);
        part_m[(i64)blockIdx.y * nf + f0 + fr] = mn;
        part_l[(i64)blockIdx.y * nf + f0 + fr] = ln;
    }
}

// The forward in one pass: grid (row groups, splits), 256 threads. Block (x, y) walks the row
// tiles x * rtiles .. x * rtiles + rtiles - 1 (64 images each, in shared memory one at a time)
// against split y's texts [y * chunk, min(global, (y + 1) * chunk)), streamed 64 at a time,
// and from each logit computed once keeps, in the log2 domain:
//   per image row: the online (max, sum) of exp2 over split y's columns -> rpart_[m|l][y][row],
//     and pos[row] = logit(row, off + row) where that column is in split y;
//   per text column of split y: the (max, sum) over the group's rows -> cpart_[m|l][x][col],
//     written by this block alone and merged across its row tiles in tile order.
extern "C" __global__ void __launch_bounds__(256) infonce_fwd_block(const void* img, int ib, i64 local, const void* txt,
                                                                    int tb, i64 global, int dim, i64 chunk, int rtiles,
                                                                    i64 off, const float* logit_scale, float* rpart_m,
                                                                    float* rpart_l, float* cpart_m, float* cpart_l,
                                                                    float* pos) {
    const int dp = padded_dim(dim), kw = chunk_width(dim);
    const int nch = (dp + KC - 1) / KC;
    const int pitch = kw + 8;
    Smem sm = carve(smem_raw, pitch);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
    const i64 s_begin = (i64)blockIdx.y * chunk;
    const i64 s_end = min(global, s_begin + chunk);
    const float s = expf(logit_scale[0]);

    for (int t = 0; t < rtiles; t++) {
        const i64 f0 = ((i64)blockIdx.x * rtiles + t) * FT;
        if (f0 >= local) break;  // the same for every thread of the block
        __syncthreads();         // the last tile's readers of sm.f are done
        if (nch == 1) load_rows(sm.f, pitch, img, ib, f0, local, dim, 0, kw);  // resident for the tile's run
        const i64 frow[2] = {f0 + mt * 16 + g, f0 + mt * 16 + g + 8};
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
        for (i64 s0 = s_begin; s0 < s_end; s0 += ST) {
            float st[4][4];
            logit_tile(st, sm, pitch, nch, dp, img, ib, f0, local, txt, tb, s0, s_end, dim, [](int i) { return i * KC; },
                       nullptr);
#pragma unroll
            for (int nt = 0; nt < 4; nt++)
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    const int sc = nh * 32 + nt * 8 + 2 * q + c;  // column within the tile
                    const i64 sj = s0 + sc;
                    float v[2];
#pragma unroll
                    for (int r = 0; r < 2; r++) {
                        const float logit = s * st[nt][2 * r + c];
                        const bool live = sj < s_end && frow[r] < local;
                        v[r] = live ? logit * LOG2E : -INFINITY;
                        if (live) {
                            // The row's running statistics.
                            if (v[r] > m[r]) {
                                l[r] = l[r] * exp2f(m[r] - v[r]) + 1.f;
                                m[r] = v[r];
                            } else {
                                l[r] += exp2f(v[r] - m[r]);
                            }
                            if (sj == off + frow[r]) pos[frow[r]] = logit;
                        }
                    }
                    // The column over this warp's 16 rows (lanes of one q hold it): the
                    // maximum first, then one exponential per logit.
                    float cm = fmaxf(v[0], v[1]);
#pragma unroll
                    for (int o = 4; o < 32; o <<= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
                    float cs = cm == -INFINITY ? 0.f : exp2f(v[0] - cm) + exp2f(v[1] - cm);
#pragma unroll
                    for (int o = 4; o < 32; o <<= 1) cs += __shfl_xor_sync(0xffffffffu, cs, o);
                    if (g == 0) {
                        sm.cred[mt * ST + sc] = cm;
                        sm.cred[4 * ST + mt * ST + sc] = cs;
                    }
                }
            __syncthreads();
            // The four row groups of the tile in order, then into this block's partials.
            for (int c = threadIdx.x; c < ST; c += blockDim.x) {
                const i64 j = s0 + c;
                if (j >= s_end) continue;
                float mx = -INFINITY;
                for (int w = 0; w < 4; w++) mx = fmaxf(mx, sm.cred[w * ST + c]);
                float sum = 0.f;
                if (mx != -INFINITY) {
                    for (int w = 0; w < 4; w++) sum += sm.cred[4 * ST + w * ST + c] * exp2f(sm.cred[w * ST + c] - mx);
                }
                float* pm = cpart_m + (i64)blockIdx.x * global + j;
                float* pl = cpart_l + (i64)blockIdx.x * global + j;
                if (t > 0) {
                    const float om = *pm, ol = *pl, mn = fmaxf(om, mx);
                    if (mn != -INFINITY) {
                        sum = ol * exp2f(om - mn) + sum * exp2f(mx - mn);
                        mx = mn;
                    }
                }
                *pm = mx;
                *pl = sum;
            }
        }
        store_row_stats(m, l, sm, f0, local, rpart_m, rpart_l);
    }
}

// The backward's two passes. Block = 256 threads. Grid (ceil(nf / 64), splits, chunks); split
// y streams rows [y * chunk, min(ns, (y + 1) * chunk)), chunk a multiple of 64; block z owns
// output columns [z * 512, min(dp, (z + 1) * 512)).
template <int MODE>
__device__ __forceinline__ void infonce_tile(const void* fx, int fb, i64 nf, const void* sx, int sb, i64 ns, int dim,
                                             i64 chunk, i64 off, const float* lse_f, const float* lse_s,
                                             const float* logit_scale, float coef, float* part_d, float* part_ds,
                                             void* dout, int ob) {
    const int dp = padded_dim(dim), kw = chunk_width(dim);
    const int nch = (dp + KC - 1) / KC;
    const int pitch = kw + 8;
    Smem sm = carve(smem_raw, pitch);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const int mt = warp & 3, nh = warp >> 2;
    const i64 f0 = (i64)blockIdx.x * FT;
    const i64 s_begin = (i64)blockIdx.y * chunk;
    const i64 s_end = min(ns, s_begin + chunk);
    const float s = expf(logit_scale[0]);

    if (nch == 1) load_rows(sm.f, pitch, fx, fb, f0, nf, dim, 0, kw);  // resident for the whole run
    const i64 frow[2] = {f0 + mt * 16 + g, f0 + mt * 16 + g + 8};

    float lrow[2];  // lse of the fixed rows (log2 domain)
#pragma unroll
    for (int r = 0; r < 2; r++) lrow[r] = frow[r] < nf ? lse_f[frow[r]] * LOG2E : INFINITY;
    float ds = 0.f;
    float acc[4][8][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 8; b++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[a][b][e] = 0.f;

    for (i64 s0 = s_begin; s0 < s_end; s0 += ST) {
        // The block walks its output chunk blockIdx.z last (it stays in sm.s for G . S).
        float st[4][4];
        logit_tile(st, sm, pitch, nch, dp, fx, fb, f0, nf, sx, sb, s0, s_end, dim,
                   [nch](int i) { return (int)((blockIdx.z + 1 + i) % nch) * KC; }, lse_s);
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = e >> 1;
                const int sc = nh * 32 + nt * 8 + 2 * q + (e & 1);  // column within the tile
                const i64 sj = s0 + sc;
                const float logit = s * st[nt][e];
                const bool live = sj < s_end && frow[r] < nf;
                float gv = 0.f;
                if (live) {
                    // The fixed row's and the streaming row's softmax: one per direction.
                    const float v = logit * LOG2E;
                    const float p = exp2f(v - lrow[r]) + exp2f(v - sm.lse[sc]);
                    const bool diag = MODE == 1 ? sj == off + frow[r] : frow[r] == off + sj;
                    gv = coef * (p - (diag ? 2.f : 0.f));
                    if (MODE == 1) ds += gv * logit;
                }
                st[nt][e] = gv;
            }
        // G tile into shared memory as bf16: sm.g[fixed][streaming].
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            const int col = nh * 32 + nt * 8 + 2 * q;
            *(unsigned*)&sm.g[(mt * 16 + g) * GPITCH + col] = pack_bf16(st[nt][0], st[nt][1]);
            *(unsigned*)&sm.g[(mt * 16 + g + 8) * GPITCH + col] = pack_bf16(st[nt][2], st[nt][3]);
        }
        __syncthreads();
        // acc[64 fixed x this warp's 64 columns of the block's chunk] += G[64 x 64] . S_tile[64 x those].
        const int d0 = warp * 64;
        if (blockIdx.z * KC + d0 < dp) {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                unsigned b[8][2];
#pragma unroll
                for (int nt = 0; nt < 8; nt++) {
                    const bf16* bp = &sm.s[(kk * 16 + 2 * q) * pitch + d0 + nt * 8 + g];
                    b[nt][0] = lds_pair(bp, pitch);
                    b[nt][1] = lds_pair(bp + 8 * pitch, pitch);
                }
#pragma unroll
                for (int a_mt = 0; a_mt < 4; a_mt++) {
                    unsigned a[4];
                    a[0] = lds32(&sm.g[(a_mt * 16 + g) * GPITCH + kk * 16 + 2 * q]);
                    a[1] = lds32(&sm.g[(a_mt * 16 + g + 8) * GPITCH + kk * 16 + 2 * q]);
                    a[2] = lds32(&sm.g[(a_mt * 16 + g) * GPITCH + kk * 16 + 2 * q + 8]);
                    a[3] = lds32(&sm.g[(a_mt * 16 + g + 8) * GPITCH + kk * 16 + 2 * q + 8]);
#pragma unroll
                    for (int nt = 0; nt < 8; nt++) mma_bf16(acc[a_mt][nt], a, b[nt][0], b[nt][1]);
                }
            }
        }
    }

    if constexpr (MODE == 1) {
        // Block sum of G * logit, in a fixed order.
        ds = warp_sum(ds);
        __syncthreads();
        if (lane == 0) sm.red[warp] = ds;
        __syncthreads();
        if (threadIdx.x == 0 && blockIdx.z == 0) {  // every chunk's block computes it; one writes it
            float t = 0.f;
            for (int w = 0; w < 8; w++) t += sm.red[w];
            part_ds[(i64)blockIdx.y * gridDim.x + blockIdx.x] = t;
        }
    }
    const int d0 = blockIdx.z * KC + warp * 64;
    if (d0 >= dp) return;
#pragma unroll
    for (int a_mt = 0; a_mt < 4; a_mt++)
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const i64 row = f0 + a_mt * 16 + g + 8 * (e >> 1);
                const int d = d0 + nt * 8 + 2 * q + (e & 1);
                if (row >= nf || d >= dim) continue;
                if (MODE == 1) {
                    part_d[((i64)blockIdx.y * nf + row) * dim + d] = acc[a_mt][nt][e];
                } else {
                    addf(dout, ob, row * dim + d, s * acc[a_mt][nt][e]);
                }
            }
}

// fixed = local images (lse_f: row lse), streaming = texts (lse_s: column lse).
extern "C" __global__ void __launch_bounds__(256) infonce_bwd_rows(const void* fx, int fb, i64 nf, const void* sx, int sb,
                                                                   i64 ns, int dim, i64 chunk, i64 off,
                                                                   const float* lse_f, const float* lse_s,
                                                                   const float* logit_scale, float coef, float* part_d,
                                                                   float* part_ds) {
    infonce_tile<1>(fx, fb, nf, sx, sb, ns, dim, chunk, off, lse_f, lse_s, logit_scale, coef, part_d, part_ds, nullptr,
                    0);
}

// fixed = texts (lse_f: column lse), streaming = all local images (lse_s: row lse).
extern "C" __global__ void __launch_bounds__(256) infonce_bwd_cols(const void* fx, int fb, i64 nf, const void* sx, int sb,
                                                                   i64 ns, int dim, i64 off, const float* lse_f,
                                                                   const float* lse_s, const float* logit_scale,
                                                                   float coef, void* dout, int ob) {
    infonce_tile<2>(fx, fb, nf, sx, sb, ns, dim, ns, off, lse_f, lse_s, logit_scale, coef, nullptr, nullptr, dout, ob);
}

// The partials merged in order: row_lse[i] (natural log) from the [rsplits][local] row
// partials; col_max[j] (natural units) and col_sum[j] = sum of exp(S_ij - col_max_j) over the
// local rows from the [csplits][global] column partials (one per row group).
extern "C" __global__ void infonce_block_fwd_finish(float* row_lse, float* col_max, float* col_sum, const float* rpart_m,
                                                    const float* rpart_l, i64 local, int rsplits, const float* cpart_m,
                                                    const float* cpart_l, i64 global, int csplits) {
    for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < local + global; k += (i64)gridDim.x * blockDim.x) {
        const bool row = k < local;
        const i64 i = row ? k : k - local, n = row ? local : global;
        const int splits = row ? rsplits : csplits;
        const float* pm = row ? rpart_m : cpart_m;
        const float* pl = row ? rpart_l : cpart_l;
        float mx = -INFINITY;
        for (int y = 0; y < splits; y++) mx = fmaxf(mx, pm[(i64)y * n + i]);
        float sum = 0.f;
        for (int y = 0; y < splits; y++) sum += pl[(i64)y * n + i] * exp2f(pm[(i64)y * n + i] - mx);
        if (row) {
            row_lse[i] = (mx + log2f(sum)) / LOG2E;
        } else {
            col_max[i] = mx / LOG2E;
            col_sum[i] = sum;  // exp2(v - mx) = exp(S - col_max): the same sum in either domain
        }
    }
}

// col_sum[j] *= exp(col_max[j] - global_max[j]).
extern "C" __global__ void infonce_col_rescale(float* col_sum, const float* col_max, const float* global_max, i64 n) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        const float m = col_max[j], g = global_max[j];
        if (m != g) col_sum[j] *= expf(m - g);
    }
}

// col_lse[j] = global_max[j] + log(col_sum[j]) (grid-stride, any grid).
extern "C" __global__ void infonce_col_lse(float* col_lse, const float* global_max, const float* col_sum, i64 n) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < n; j += (i64)gridDim.x * blockDim.x) {
        col_lse[j] = global_max[j] + logf(col_sum[j]);
    }
}

// loss[0] = sum_i (row_lse_i + col_lse_{off+i} - 2 pos_i) * inv2g, the column lse of this
// rank's own texts computed here as infonce_col_lse does. One block of 256 threads.
extern "C" __global__ void infonce_block_loss(float* loss, const float* row_lse, const float* pos,
                                              const float* global_max, const float* col_sum, i64 local, i64 off,
                                              float inv2g) {
    __shared__ double red[256];
    double acc = 0.0;
    for (i64 i = threadIdx.x; i < local; i += blockDim.x) {
        const float col = global_max[off + i] + logf(col_sum[off + i]);
        acc += (double)(row_lse[i] - pos[i]) + (double)(col - pos[i]);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (float)(red[0] * (double)inv2g);
}

// dx[e] += s * sum over splits of part[split][e], in split order.
extern "C" __global__ void infonce_reduce_rows(void* dx, int xb, const float* part, int splits, i64 n,
                                               const float* logit_scale) {
    const float s = expf(logit_scale[0]);
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int y = 0; y < splits; y++) acc += part[(i64)y * n + e];
        addf(dx, xb, e, s * acc);
    }
}

// d_logit_scale[0] += sum(part_ds[0..n]) in order.
extern "C" __global__ void infonce_finish_scale(float* d_logit_scale, const float* part_ds, i64 n) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        float acc = 0.f;
        for (i64 i = 0; i < n; i++) acc += part_ds[i];
        d_logit_scale[0] += acc;
    }
}
