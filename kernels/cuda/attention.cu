// Multi-head attention in the FlashAttention-2 way, head dimension 64, on the tensor cores
// (mma.sync m16n8k16, bf16 operands, f32 accumulation).
//
// Layout (the Backend's): qkv[b, t, 3*h*64] holds q, k, v of head j at columns j*64,
// h*64 + j*64 and 2*h*64 + j*64; out[b, t, h*64]. The forward saves only the natural-log
// log-sum-exp of each scaled score row, lse[b, h, t]. Tiles are 64 queries x 64 keys; a block
// of 4 warps owns 64 rows (16 per warp). Sequence lengths that are not multiples of 64 are
// masked: rows past t are zero-filled and never stored, columns past t get probability 0.
//
// The backward is deterministic and free of atomics: a pre-pass computes D = rowsum(dO * O);
// one kernel owns a tile of queries and writes dQ, another owns a tile of keys and writes dK
// and dV, each recomputing P from the saved log-sum-exps (S and dP are computed twice; the
// price of determinism without a float reduction in global memory).

#define HD 64
#define TILE 64
#define PITCH 72  // shared-memory row pitch in bf16: 144 bytes, so the 8 rows a fragment load touches hit 8 different bank groups
#define LOG2E 1.4426950408889634f

// Loads rows r0 .. r0+63 of one head's q, k or v (column offset col) into s[row][d] as bf16,
// zero-filling rows at or past t; with trans, into s[d][row] instead.
__device__ __forceinline__ void load_tile(bf16 (*s)[PITCH], const void* src, int sb, i64 base, i64 rs, int r0, int t,
                                          bool trans) {
    for (int idx = threadIdx.x; idx < TILE * HD; idx += blockDim.x) {
        int r = idx / HD, d = idx % HD;
        float v = (r0 + r < t) ? ldf(src, sb, base + (i64)(r0 + r) * rs + d) : 0.f;
        if (trans) {
            s[d][r] = __float2bfloat16(v);
        } else {
            s[r][d] = __float2bfloat16(v);
        }
    }
}

// The A fragments (16 rows x 64) of rows row0 .. row0+15 of a [row][d] tile.
__device__ __forceinline__ void load_a_frags(unsigned a[4][4], bf16 (*s)[PITCH], int row0, int g, int q) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        a[kk][0] = lds32(&s[row0 + g][kk * 16 + 2 * q]);
        a[kk][1] = lds32(&s[row0 + g + 8][kk * 16 + 2 * q]);
        a[kk][2] = lds32(&s[row0 + g][kk * 16 + 2 * q + 8]);
        a[kk][3] = lds32(&s[row0 + g + 8][kk * 16 + 2 * q + 8]);
    }
}

// acc[16 x 64] += A[16 x 64] . B where B[k][n] = s[n][k] (s holds 64 rows of 64).
__device__ __forceinline__ void mma_16x64x64(float acc[8][4], const unsigned a[4][4], bf16 (*s)[PITCH], int g, int q) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            unsigned b0 = lds32(&s[nt * 8 + g][kk * 16 + 2 * q]);
            unsigned b1 = lds32(&s[nt * 8 + g][kk * 16 + 2 * q + 8]);
            mma_bf16(acc[nt], a[kk], b0, b1);
        }
    }
}

// acc[16 x 64] += P[16 x 64] . B, P given as accumulator fragments (converted to bf16 A
// fragments), B[k][n] = s[n][k].
__device__ __forceinline__ void mma_p_16x64x64(float acc[8][4], const float p[8][4], bf16 (*s)[PITCH], int g, int q) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        unsigned a[4];
        a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
        a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
        a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            unsigned b0 = lds32(&s[nt * 8 + g][kk * 16 + 2 * q]);
            unsigned b1 = lds32(&s[nt * 8 + g][kk * 16 + 2 * q + 8]);
            mma_bf16(acc[nt], a, b0, b1);
        }
    }
}

__device__ __forceinline__ void zero_acc(float a[8][4]) {
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) a[i][e] = 0.f;
}

// Grid (ceil(t / 64), b * h), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_fwd(void* out, int ob, float* lse, const void* qkv, int qb, int b,
                                                           int t, int h, int causal, float scale) {
    __shared__ __align__(16) bf16 sQ[TILE][PITCH];
    __shared__ __align__(16) bf16 sK[TILE][PITCH];
    __shared__ __align__(16) bf16 sVt[HD][PITCH];
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int q0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    load_tile(sQ, qkv, qb, base, rs, q0, t, false);
    __syncthreads();
    unsigned qa[4][4];
    load_a_frags(qa, sQ, warp * 16, g, q);

    float o[8][4];
    zero_acc(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    const int kend = causal ? min(t, q0 + TILE) : t;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();
        load_tile(sK, qkv, qb, base + c, rs, k0, t, false);
        load_tile(sVt, qkv, qb, base + 2 * c, rs, k0, t, true);
        __syncthreads();
        float s[8][4];
        zero_acc(s);
        mma_16x64x64(s, qa, sK, g, q);
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
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
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int r = e >> 1;
                float p = exp2f(s[nt][e] - msafe[r]);
                s[nt][e] = p;
                l[r] += p;
                o[nt][e] *= alpha[r];
            }
        mma_p_16x64x64(o, s, sVt, g, q);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
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

// dsum[b, h, t] = sum_d dout * out over the head's 64 columns; one warp per row.
extern "C" __global__ void attn_bwd_dot(float* dsum, const void* dout, int gb, const void* out, int ob, int b, int t, int h) {
    i64 r = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= (i64)b * h * t) return;
    i64 bh = r / t;
    int ti = (int)(r % t);
    int bi = (int)(bh / h), hh = (int)(bh % h);
    i64 at = ((i64)bi * t + ti) * h * HD + (i64)hh * HD;
    float s = ldf(dout, gb, at + lane) * ldf(out, ob, at + lane) + ldf(dout, gb, at + lane + 32) * ldf(out, ob, at + lane + 32);
    s = warp_sum(s);
    if (lane == 0) dsum[r] = s;
}

// dQ of a tile of 64 queries. Grid (ceil(t / 64), b * h), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq(void* dqkv, int dqb, const void* dout, int gb, const void* qkv,
                                                              int qb, const float* lse, const float* dsum, int b, int t,
                                                              int h, int causal, float scale) {
    __shared__ __align__(16) bf16 sA[TILE][PITCH];  // Q, then dO, then K^T
    __shared__ __align__(16) bf16 sK[TILE][PITCH];
    __shared__ __align__(16) bf16 sV[TILE][PITCH];
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int q0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const i64 obase = (i64)bi * t * c + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    unsigned qa[4][4], da[4][4];
    load_tile(sA, qkv, qb, base, rs, q0, t, false);
    __syncthreads();
    load_a_frags(qa, sA, warp * 16, g, q);
    __syncthreads();
    load_tile(sA, dout, gb, obase, c, q0, t, false);
    __syncthreads();
    load_a_frags(da, sA, warp * 16, g, q);

    const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
    float lrow[2], drow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        bool live = row[r] < t;
        lrow[r] = live ? lse[(i64)bh * t + row[r]] * LOG2E : INFINITY;
        drow[r] = live ? dsum[(i64)bh * t + row[r]] : 0.f;
    }
    float dq[8][4];
    zero_acc(dq);
    const int kend = causal ? min(t, q0 + TILE) : t;
    for (int k0 = 0; k0 < kend; k0 += TILE) {
        __syncthreads();
        load_tile(sK, qkv, qb, base + c, rs, k0, t, false);
        load_tile(sA, qkv, qb, base + c, rs, k0, t, true);
        load_tile(sV, qkv, qb, base + 2 * c, rs, k0, t, false);
        __syncthreads();
        float s[8][4], dp[8][4];
        zero_acc(s);
        zero_acc(dp);
        mma_16x64x64(s, qa, sK, g, q);
        mma_16x64x64(dp, da, sV, g, q);
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + nt * 8 + 2 * q + (e & 1);
                int r = e >> 1;
                float p = exp2f(s[nt][e] * sl2 - lrow[r]);
                if (key >= t || (causal && key > row[r])) p = 0.f;
                s[nt][e] = p * (dp[nt][e] - drow[r]);
            }
        mma_p_16x64x64(dq, s, sA, g, q);
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
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
    __shared__ __align__(16) bf16 sQ[TILE][PITCH];
    __shared__ __align__(16) bf16 sQt[HD][PITCH];
    __shared__ __align__(16) bf16 sO[TILE][PITCH];
    __shared__ __align__(16) bf16 sOt[HD][PITCH];
    __shared__ float sL[TILE], sD[TILE];
    const int bh = blockIdx.y, bi = bh / h, hh = bh % h;
    const int k0 = blockIdx.x * TILE;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane >> 2, q = lane & 3;
    const i64 c = (i64)h * HD, rs = 3 * c;
    const i64 base = (i64)bi * t * rs + (i64)hh * HD;
    const i64 obase = (i64)bi * t * c + (i64)hh * HD;
    const float sl2 = scale * LOG2E;

    unsigned ka[4][4], va[4][4];
    load_tile(sQ, qkv, qb, base + c, rs, k0, t, false);
    load_tile(sO, qkv, qb, base + 2 * c, rs, k0, t, false);
    __syncthreads();
    load_a_frags(ka, sQ, warp * 16, g, q);
    load_a_frags(va, sO, warp * 16, g, q);

    const int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    float dk[8][4], dv[8][4];
    zero_acc(dk);
    zero_acc(dv);
    // Causal: queries before this key tile see none of its keys.
    for (int j0 = causal ? k0 : 0; j0 < t; j0 += TILE) {
        __syncthreads();
        load_tile(sQ, qkv, qb, base, rs, j0, t, false);
        load_tile(sQt, qkv, qb, base, rs, j0, t, true);
        load_tile(sO, dout, gb, obase, c, j0, t, false);
        load_tile(sOt, dout, gb, obase, c, j0, t, true);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            bool live = j0 + i < t;
            sL[i] = live ? lse[(i64)bh * t + j0 + i] * LOG2E : INFINITY;
            sD[i] = live ? dsum[(i64)bh * t + j0 + i] : 0.f;
        }
        __syncthreads();
        float s[8][4], dp[8][4];
        zero_acc(s);
        zero_acc(dp);
        mma_16x64x64(s, ka, sQ, g, q);   // S^T = K Q^T
        mma_16x64x64(dp, va, sO, g, q);  // dP^T = V dO^T
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = nt * 8 + 2 * q + (e & 1);
                int r = e >> 1;
                float p = exp2f(s[nt][e] * sl2 - sL[qi]);
                if (causal && j0 + qi < key[r]) p = 0.f;
                s[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - sD[qi]);
            }
        mma_p_16x64x64(dv, s, sOt, g, q);   // dV += P^T dO
        mma_p_16x64x64(dk, dp, sQt, g, q);  // dK += dS^T Q
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
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
