// Multi-head attention in the FlashAttention-2 way on the tensor cores (mma.sync m16n8k16,
// bf16 operands, f32 accumulation), for head dimension HD = 32, 64 or 128: a compile-time
// constant (NVRTC `-DHD=..`), one module per head dimension (see `nvrtc.rs`, `ATTENTION_HEAD_DIMS`).
//
// Layout (the Backend's): qkv[b, t, 3*h*HD] holds q, k, v of head j at columns j*HD,
// h*HD + j*HD and 2*h*HD + j*HD; out[b, t, h*HD]. The forward saves only the natural-log
// log-sum-exp of each scaled score row, lse[b, h, t]. Tiles are 64 queries x 64 keys; a block
// of 4 warps owns 64 rows (16 per warp). Sequence lengths that are not multiples of 64 are
// masked: rows past t are zero-filled and never stored, columns past t get probability 0.
//
// Shared memory holds only row-major [64][HD] tiles (pitch HD + 8): products that need a tile
// transposed (P V, dS K, P^T dO, dS^T Q) read their B fragments as pairs of bf16 from two rows
// (`lds_pair`) instead of keeping a transposed copy. A tile whose fragments already sit in
// registers (Q in the forward, Q and dO in dQ, K and V in dK dV) is loaded through the buffer
// of a later tile. So every kernel uses two tiles: 2 x 64 x (HD + 8) x 2 bytes, 34 KB at
// HD 128, under the 48 KB static limit.
//
// The backward is deterministic and free of atomics: a pre-pass computes D = rowsum(dO * O);
// one kernel owns a tile of queries and writes dQ, another owns a tile of keys and writes dK
// and dV, each recomputing P from the saved log-sum-exps (S and dP are computed twice; the
// price of determinism without a float reduction in global memory). Both walk the 64 columns
// of a score tile 16 at a time (one mma k-step), so that only 16 scores and 16 dP values per
// lane are live next to the HD-wide accumulators (at HD 128 the dK dV kernel holds K and V
// fragments and two 16 x 128 accumulators: 208 registers of data).

#ifndef HD
#define HD 64
#endif
#if HD != 32 && HD != 64 && HD != 128
#error "attention.cu: HD must be 32, 64 or 128"
#endif
#define TILE 64
#define KS (HD / 16)    // mma k-steps over the head dimension
#define NH (HD / 8)     // mma n-tiles over the head dimension
#define KT (TILE / 16)  // mma k-steps over a tile's 64 rows
#define NT (TILE / 8)   // mma n-tiles over a tile's 64 rows
// Row pitch in bf16: (HD + 8) * 2 bytes is 16 mod 128, so the 8 rows a fragment load touches
// hit 8 different groups of 4 banks.
#define PITCH (HD + 8)
#define LOG2E 1.4426950408889634f

// Loads rows r0 .. r0+63 of one head's q, k, v or dout (column offset in base, row stride rs)
// into s[row][d] as bf16, zero-filling rows at or past t.
__device__ __forceinline__ void load_tile(bf16 (*s)[PITCH], const void* src, int sb, i64 base, i64 rs, int r0, int t) {
    for (int idx = threadIdx.x; idx < TILE * HD; idx += blockDim.x) {
        int r = idx / HD, d = idx % HD;
        float v = (r0 + r < t) ? ldf(src, sb, base + (i64)(r0 + r) * rs + d) : 0.f;
        s[r][d] = __float2bfloat16(v);
    }
}

// The A fragments (16 rows x HD) of rows row0 .. row0+15 of a [row][d] tile.
__device__ __forceinline__ void load_a_frags(unsigned a[KS][4], bf16 (*s)[PITCH], int row0, int g, int q) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        a[kk][0] = lds32(&s[row0 + g][kk * 16 + 2 * q]);
        a[kk][1] = lds32(&s[row0 + g + 8][kk * 16 + 2 * q]);
        a[kk][2] = lds32(&s[row0 + g][kk * 16 + 2 * q + 8]);
        a[kk][3] = lds32(&s[row0 + g + 8][kk * 16 + 2 * q + 8]);
    }
}

// acc[16 x 8n] += A[16 x HD] . B for the n-tiles nt0 .. nt0+n-1 of B[d][j] = s[j][d]
// (scores of 16 rows against rows of the tile s).
template <int N>
__device__ __forceinline__ void mma_rows(float acc[N][4], const unsigned a[KS][4], bf16 (*s)[PITCH], int nt0, int g,
                                         int q) {
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
        for (int j = 0; j < N; j++) {
            unsigned b0 = lds32(&s[(nt0 + j) * 8 + g][kk * 16 + 2 * q]);
            unsigned b1 = lds32(&s[(nt0 + j) * 8 + g][kk * 16 + 2 * q + 8]);
            mma_bf16(acc[j], a[kk], b0, b1);
        }
    }
}

// acc[16 x HD] += P[16 x 16] . s[kk*16 .. kk*16+15][0 .. HD): one k-step over the tile's rows,
// P given as the accumulator fragments p[0], p[1] of columns kk*16 .. kk*16+15 (converted to
// a bf16 A fragment), B[j][d] = s[kk*16 + j][d] read as pairs from two rows.
__device__ __forceinline__ void mma_p_step(float acc[NH][4], const float p0[4], const float p1[4], bf16 (*s)[PITCH], int kk,
                                           int g, int q) {
    unsigned a[4];
    a[0] = pack_bf16(p0[0], p0[1]);
    a[1] = pack_bf16(p0[2], p0[3]);
    a[2] = pack_bf16(p1[0], p1[1]);
    a[3] = pack_bf16(p1[2], p1[3]);
#pragma unroll
    for (int nt = 0; nt < NH; nt++) {
        unsigned b0 = lds_pair(&s[kk * 16 + 2 * q][nt * 8 + g], PITCH);
        unsigned b1 = lds_pair(&s[kk * 16 + 2 * q + 8][nt * 8 + g], PITCH);
        mma_bf16(acc[nt], a, b0, b1);
    }
}

template <int N>
__device__ __forceinline__ void zero_acc(float a[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) a[i][e] = 0.f;
}

// Grid (ceil(t / 64), b * h), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_fwd(void* out, int ob, float* lse, const void* qkv, int qb, int b,
                                                           int t, int h, int causal, float scale) {
    __shared__ __align__(16) bf16 sK[TILE][PITCH];  // Q, then each K tile
    __shared__ __align__(16) bf16 sV[TILE][PITCH];
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int q0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    load_tile(sK, qkv, qb, base, rs, q0, t);
    __syncthreads();
    unsigned qa[KS][4];
    load_a_frags(qa, sK, warp * 16, g, q);

    float o[NH][4];
    zero_acc<NH>(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const int kend = causal ? min(t, q0 + TILE) : t;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();
        load_tile(sK, qkv, qb, base + c, rs, k0, t);
        load_tile(sV, qkv, qb, base + 2 * c, rs, k0, t);
        __syncthreads();
        float s[NT][4];
        zero_acc<NT>(s);
        mma_rows<NT>(s, qa, sK, 0, g, q);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + nt * 8 + 2 * q + (e & 1);
                int r = e >> 1;
                float v = s[nt][e] * sl2;
                if (key >= t || (causal && key > row[r])) v = -INFINITY;
                s[nt][e] = v;
                mx[r] = fmaxf(mx[r], v);
            }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        }
        float alpha[2], msafe[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mn = fmaxf(m[r], mx[r]);
            msafe[r] = (mn == -INFINITY) ? 0.f : mn;
            alpha[r] = exp2f(m[r] - msafe[r]);
            m[r] = mn;
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e >> 1;
                float p = exp2f(s[nt][e] - msafe[r]);
                s[nt][e] = p;
                l[r] += p;
            }
#pragma unroll
        for (int nt = 0; nt < NH; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) o[nt][e] *= alpha[e >> 1];
#pragma unroll
        for (int kk = 0; kk < KT; kk++) mma_p_step(o, s[2 * kk], s[2 * kk + 1], sV, kk, g, q);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int nt = 0; nt < NH; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = e >> 1;
            if (row[r] < t) {
                int d = nt * 8 + 2 * q + (e & 1);
                stf(out, ob, ((i64)bi * t + row[r]) * c + (i64)hh * HD + d, o[nt][e] / l[r]);
            }
        }
    if (q == 0) {
#pragma unroll
        for (int r = 0; r < 2; r++)
            if (row[r] < t) lse[(i64)bh * t + row[r]] = (m[r] + log2f(l[r])) / LOG2E;
    }
}

// dsum[b, h, t] = sum_d dout * out over the head's HD columns; one warp per row.
extern "C" __global__ void attn_bwd_dot(float* dsum, const void* dout, int gb, const void* out, int ob, int b, int t, int h) {
    i64 r = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= (i64)b * h * t) return;
    i64 bh = r / t;
    int ti = (int)(r % t);
    int bi = (int)(bh / h), hh = (int)(bh % h);
    i64 at = ((i64)bi * t + ti) * h * HD + (i64)hh * HD;
    float s = 0.f;
#pragma unroll
    for (int d = lane; d < HD; d += WARP) s += ldf(dout, gb, at + d) * ldf(out, ob, at + d);
    s = warp_sum(s);
    if (lane == 0) dsum[r] = s;
}

// dQ of a tile of 64 queries. Grid (ceil(t / 64), b * h), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq(void* dqkv, int dqb, const void* dout, int gb, const void* qkv,
                                                              int qb, const float* lse, const float* dsum, int b, int t,
                                                              int h, int causal, float scale) {
    __shared__ __align__(16) bf16 sK[TILE][PITCH];  // Q, then each K tile
    __shared__ __align__(16) bf16 sV[TILE][PITCH];  // dO, then each V tile
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int q0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const i64 obase = (i64)bi * t * c + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    unsigned qa[KS][4], da[KS][4];
    load_tile(sK, qkv, qb, base, rs, q0, t);
    load_tile(sV, dout, gb, obase, c, q0, t);
    __syncthreads();
    load_a_frags(qa, sK, warp * 16, g, q);
    load_a_frags(da, sV, warp * 16, g, q);

    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float lrow[2], drow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        bool live = row[r] < t;
        lrow[r] = live ? lse[(i64)bh * t + row[r]] * LOG2E : INFINITY;
        drow[r] = live ? dsum[(i64)bh * t + row[r]] : 0.f;
    }
    float dq[NH][4];
    zero_acc<NH>(dq);
    const int kend = causal ? min(t, q0 + TILE) : t;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();
        load_tile(sK, qkv, qb, base + c, rs, k0, t);
        load_tile(sV, qkv, qb, base + 2 * c, rs, k0, t);
        __syncthreads();
        // 16 keys at a time: S and dP of this warp's 16 queries x keys kc*16 .. kc*16+15.
#pragma unroll
        for (int kc = 0; kc < KT; kc++) {
            float s[2][4], dp[2][4];
            zero_acc<2>(s);
            zero_acc<2>(dp);
            mma_rows<2>(s, qa, sK, 2 * kc, g, q);   // S = Q K^T
            mma_rows<2>(dp, da, sV, 2 * kc, g, q);  // dP = dO V^T
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = k0 + kc * 16 + j * 8 + 2 * q + (e & 1);
                    int r = e >> 1;
                    float p = exp2f(s[j][e] * sl2 - lrow[r]);
                    if (key >= t || (causal && key > row[r])) p = 0.f;
                    s[j][e] = p * (dp[j][e] - drow[r]);
                }
            mma_p_step(dq, s[0], s[1], sK, kc, g, q);  // dQ += dS K
        }
    }
#pragma unroll
    for (int nt = 0; nt < NH; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = e >> 1;
            if (row[r] < t) addf(dqkv, dqb, base + (i64)row[r] * rs + nt * 8 + 2 * q + (e & 1), dq[nt][e] * scale);
        }
}

// dK and dV of a tile of 64 keys. Grid (ceil(t / 64), b * h), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkv(void* dqkv, int dqb, const void* dout, int gb, const void* qkv,
                                                               int qb, const float* lse, const float* dsum, int b, int t,
                                                               int h, int causal, float scale) {
    __shared__ __align__(16) bf16 sQ[TILE][PITCH];  // K, then each Q tile
    __shared__ __align__(16) bf16 sO[TILE][PITCH];  // V, then each dO tile
    __shared__ float sL[TILE], sD[TILE];
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int k0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const i64 obase = (i64)bi * t * c + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    unsigned ka[KS][4], va[KS][4];
    load_tile(sQ, qkv, qb, base + c, rs, k0, t);
    load_tile(sO, qkv, qb, base + 2 * c, rs, k0, t);
    __syncthreads();
    load_a_frags(ka, sQ, warp * 16, g, q);
    load_a_frags(va, sO, warp * 16, g, q);

    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    float dk[NH][4], dv[NH][4];
    zero_acc<NH>(dk);
    zero_acc<NH>(dv);
    // Causal: queries before this key tile see none of its keys.
    for (int j0 = causal ? k0 : 0; j0 < t; j0 += TILE) {
        __syncthreads();
        load_tile(sQ, qkv, qb, base, rs, j0, t);
        load_tile(sO, dout, gb, obase, c, j0, t);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            bool live = j0 + i < t;
            sL[i] = live ? lse[(i64)bh * t + j0 + i] * LOG2E : INFINITY;
            sD[i] = live ? dsum[(i64)bh * t + j0 + i] : 0.f;
        }
        __syncthreads();
        // 16 queries at a time: S^T and dP^T of this warp's 16 keys x queries qc*16 .. qc*16+15.
#pragma unroll
        for (int qc = 0; qc < KT; qc++) {
            float s[2][4], dp[2][4];
            zero_acc<2>(s);
            zero_acc<2>(dp);
            mma_rows<2>(s, ka, sQ, 2 * qc, g, q);   // S^T = K Q^T
            mma_rows<2>(dp, va, sO, 2 * qc, g, q);  // dP^T = V dO^T
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = qc * 16 + j * 8 + 2 * q + (e & 1);
                    int r = e >> 1;
                    float p = exp2f(s[j][e] * sl2 - sL[qi]);
                    if (causal && j0 + qi < key[r]) p = 0.f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - sD[qi]);
                }
            mma_p_step(dv, s[0], s[1], sO, qc, g, q);    // dV += P^T dO
            mma_p_step(dk, dp[0], dp[1], sQ, qc, g, q);  // dK += dS^T Q
        }
    }
#pragma unroll
    for (int nt = 0; nt < NH; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int r = e >> 1;
            if (key[r] < t) {
                i64 at = base + (i64)key[r] * rs + nt * 8 + 2 * q + (e & 1);
                addf(dqkv, dqb, at + c, dk[nt][e] * scale);
                addf(dqkv, dqb, at + 2 * c, dv[nt][e]);
            }
        }
}
