// Bias + QuickGELU / exact GELU, forward and backward (kind 0: QuickGELU, 1: GELU).

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

__device__ __forceinline__ float act_f(int kind, float x) {
    if (kind == 0) return x / (1.f + expf(-1.702f * x));
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

__device__ __forceinline__ float act_df(int kind, float x) {
    if (kind == 0) {
        float s = 1.f / (1.f + expf(-1.702f * x));
        return s + x * 1.702f * s * (1.f - s);
    }
    return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * expf(-0.5f * x * x) * 0.3989422804014327f;
}

// out = act(inp [+ bias[i % cols]]); bias may be null (cols is then ignored).
extern "C" __global__ void act_fwd(int kind, void* out, int ob, const void* inp, int ib, const void* bias, int bb, i64 n, i64 cols) {
    GRID_STRIDE(i, n) {
        float x = ldf(inp, ib, i);
        if (bias) x += ldf(bias, bb, i % cols);
        stf(out, ob, i, act_f(kind, x));
    }
}

// dinp += dout * act'(inp [+ bias]).
extern "C" __global__ void act_bwd(int kind, void* dinp, int db, const void* dout, int gb, const void* inp, int ib, const void* bias, int bb, i64 n, i64 cols) {
    GRID_STRIDE(i, n) {
        float x = ldf(inp, ib, i);
        if (bias) x += ldf(bias, bb, i % cols);
        addf(dinp, db, i, ldf(dout, gb, i) * act_df(kind, x));
    }
}
