// Fused AdamW over a flat parameter buffer: fp32 master weights and moments, the gradient in
// its storage type, and optionally a bf16 copy of the updated weights for the matrix units.
// As torch's AdamW: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps), the bias corrections computed by the host.

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

extern "C" __global__ void adamw(float* param, const void* grad, int gb, float* m, float* v, bf16* copy, i64 n,
                                 float b1, float b2, float eps, float decay, float step_size, float inv_sqrt_bc2) {
    GRID_STRIDE(i, n) {
        float g = ldf(grad, gb, i);
        float mi = b1 * m[i] + (1.f - b1) * g;
        float vi = b2 * v[i] + (1.f - b2) * g * g;
        float p = param[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
        m[i] = mi;
        v[i] = vi;
        param[i] = p;
        if (copy) copy[i] = __float2bfloat16(p);
    }
}
