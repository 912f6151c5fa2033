// Binary cross-entropy with logits (the fine-tuning head's loss over the 14 labels), masked
// or not: deterministic block partial sums in f64, their in-order total, and the backward.

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Binary cross-entropy with logits, a (masked) mean: block partial sums (f64) of
// w * (max(x, 0) - x y + log(1 + exp(-|x|))) into partial[2 * block] and of the weights w into
// partial[2 * block + 1], with w = mask[i] (1 without a mask); blockDim.x must be 256.
extern "C" __global__ void bce_logits_partial(double* partial, const void* x, int xb, const void* y, int yb,
                                              const void* mask, int mb, i64 n) {
    __shared__ double s[2][8];
    double acc = 0.0, wacc = 0.0;
    GRID_STRIDE(i, n) {
        float w = mask ? ldf(mask, mb, i) : 1.f;
        if (w != 0.f) {
            float xv = ldf(x, xb, i), yv = ldf(y, yb, i);
            acc += (double)w * (double)(fmaxf(xv, 0.f) - xv * yv + log1pf(expf(-fabsf(xv))));
            wacc += (double)w;
        }
    }
    acc = warp_sum_d(acc);
    wacc = warp_sum_d(wacc);
    if ((threadIdx.x & 31) == 0) {
        s[0][threadIdx.x >> 5] = acc;
        s[1][threadIdx.x >> 5] = wacc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0, tw = 0.0;
        for (int w = 0; w < 8; w++) {
            t += s[0][w];
            tw += s[1][w];
        }
        partial[2 * blockIdx.x] = t;
        partial[2 * blockIdx.x + 1] = tw;
    }
}

// Sums the k block partials in order: out[0] = sum(w l) / sum(w) (0 when the weights sum to 0;
// the loss is overwritten, as every forward does) when out is given, and wsum[0] = sum(w)
// when wsum is given (the backward's denominator).
extern "C" __global__ void bce_logits_final(float* out, float* wsum, const double* partial, int k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double t = 0.0, tw = 0.0;
        for (int i = 0; i < k; i++) {
            t += partial[2 * i];
            tw += partial[2 * i + 1];
        }
        if (out) out[0] = tw > 0.0 ? (float)(t / tw) : 0.f;
        if (wsum) wsum[0] = (float)tw;
    }
}

// dx += dloss * w (sigmoid(x) - y) / sum(w), with w = mask[i] and sum(w) = wsum[0] when a mask
// is given, else w = 1 and sum(w) = n. Nothing is added when the weights sum to 0.
extern "C" __global__ void bce_logits_bwd(void* dx, int dxb, const void* x, int xb, const void* y, int yb,
                                          const void* mask, int mb, const float* wsum, i64 n, float dloss) {
    float total = mask ? wsum[0] : (float)n;
    if (total == 0.f) return;
    float c = dloss / total;
    GRID_STRIDE(i, n) {
        float w = mask ? ldf(mask, mb, i) : 1.f;
        if (w != 0.f) {
            float xv = ldf(x, xb, i);
            float sg = 1.f / (1.f + expf(-xv));
            addf(dx, dxb, i, c * w * (sg - ldf(y, yb, i)));
        }
    }
}
