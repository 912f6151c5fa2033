// Row-wise L2 normalisation of the projected features (CLIP's embeddings before the loss),
// forward and backward, one warp per row.

// Row-wise L2 normalisation (no epsilon), one warp per row; saves the norm.
extern "C" __global__ void l2norm_fwd(void* out, int ob, float* norm, const void* inp, int ib, i64 n, int d) {
    i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n) return;
    float s = 0.f;
    for (int j = lane; j < d; j += WARP) {
        float x = ldf(inp, ib, row * d + j);
        s += x * x;
    }
    float r = sqrtf(warp_sum(s));
    float inv = 1.f / r;
    for (int j = lane; j < d; j += WARP) stf(out, ob, row * d + j, ldf(inp, ib, row * d + j) * inv);
    if (lane == 0) norm[row] = r;
}

// dinp += (dout - out * (dout . out)) / norm.
extern "C" __global__ void l2norm_bwd(void* dinp, int dib, const void* dout, int gb, const void* out, int ob,
                                      const float* norm, i64 n, int d) {
    i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= n) return;
    float dot = 0.f;
    for (int j = lane; j < d; j += WARP) dot += ldf(dout, gb, row * d + j) * ldf(out, ob, row * d + j);
    dot = warp_sum(dot);
    float inv = 1.f / norm[row];
    for (int j = lane; j < d; j += WARP) {
        float g = ldf(dout, gb, row * d + j), y = ldf(out, ob, row * d + j);
        addf(dinp, dib, row * d + j, (g - y * dot) * inv);
    }
}
