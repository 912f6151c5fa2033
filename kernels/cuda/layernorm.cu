// Layer norm over the last dimension (biased variance, as torch), one warp per row, with an
// optional fused residual add: x = inp + res (written to xout when given; xout may be inp
// itself, since each element is read before the same thread overwrites it), out = LN(x).
// The row is normalised as stored in xout (rounded to bf16 when xout is bf16), which is what
// the backward reads. Statistics in f32, two passes over the row (no E[x^2] - E[x]^2
// cancellation).

#define LN_ROWS_PER_BLOCK 32

extern "C" __global__ void layernorm_fwd(void* out, int ob, float* mean, float* rstd, const void* inp, int ib,
                                         const void* res, int rb, void* xout, int xb, const void* gamma, int gb,
                                         const void* beta, int bb, i64 n, int c, float eps) {
    i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n) return;
    i64 base = row * c;
    float s = 0.f;
    for (int j = lane; j < c; j += WARP) {
        float x = ldf(inp, ib, base + j);
        if (res) {
            x += ldf(res, rb, base + j);
            stf(xout, xb, base + j, x);
            if (xb) x = __bfloat162float(__float2bfloat16(x));
        }
        s += x;
    }
    float mu = warp_sum(s) / c;
    float v = 0.f;
    for (int j = lane; j < c; j += WARP) {
        float x = res ? ldf(xout, xb, base + j) : ldf(inp, ib, base + j);
        v += (x - mu) * (x - mu);
    }
    float rs = rsqrtf(warp_sum(v) / c + eps);
    for (int j = lane; j < c; j += WARP) {
        float x = res ? ldf(xout, xb, base + j) : ldf(inp, ib, base + j);
        stf(out, ob, base + j, (x - mu) * rs * ldf(gamma, gb, j) + ldf(beta, bb, j));
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = gamma * dout, one warp per row;
// then the block's partial dgamma / dbeta over its LN_ROWS_PER_BLOCK rows (column order fixed)
// into pg[blockIdx.x, c] and pb[blockIdx.x, c] (either may be null). Block: 256 threads.
extern "C" __global__ void layernorm_bwd(void* dinp, int dib, float* pg, float* pb, const void* dout, int gb,
                                         const void* inp, int ib, const void* gamma, int gmb, const float* mean,
                                         const float* rstd, i64 n, int c) {
    i64 row0 = (i64)blockIdx.x * LN_ROWS_PER_BLOCK;
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, nw = blockDim.x / WARP;
    for (int k = warp; k < LN_ROWS_PER_BLOCK; k += nw) {
        i64 row = row0 + k;
        if (row >= n) break;
        i64 base = row * c;
        float mu = mean[row], rs = rstd[row];
        float gm = 0.f, gxm = 0.f;
        for (int j = lane; j < c; j += WARP) {
            float g = ldf(gamma, gmb, j) * ldf(dout, gb, base + j);
            gm += g;
            gxm += g * (ldf(inp, ib, base + j) - mu) * rs;
        }
        gm = warp_sum(gm) / c;
        gxm = warp_sum(gxm) / c;
        for (int j = lane; j < c; j += WARP) {
            float xhat = (ldf(inp, ib, base + j) - mu) * rs;
            float g = ldf(gamma, gmb, j) * ldf(dout, gb, base + j);
            addf(dinp, dib, base + j, rs * (g - gm - xhat * gxm));
        }
    }
    if (!pg && !pb) return;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float ag = 0.f, ab = 0.f;
        for (int k = 0; k < LN_ROWS_PER_BLOCK; k++) {
            i64 row = row0 + k;
            if (row >= n) break;
            float d = ldf(dout, gb, row * c + j);
            ag += (ldf(inp, ib, row * c + j) - mean[row]) * rstd[row] * d;
            ab += d;
        }
        if (pg) pg[(i64)blockIdx.x * c + j] = ag;
        if (pb) pb[(i64)blockIdx.x * c + j] = ab;
    }
}
