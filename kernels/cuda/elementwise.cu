// Elementwise ops, casts and deterministic reductions (fixed block shapes and a fixed
// summation order: the same inputs give the same bits on every run).

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

extern "C" __global__ void fill(void* x, int xb, i64 n, float v) {
    GRID_STRIDE(i, n) stf(x, xb, i, v);
}

// dst = src, converting between storage types (the f32 <-> bf16 cast).
extern "C" __global__ void copy_cast(void* dst, int db, const void* src, int sb, i64 n) {
    GRID_STRIDE(i, n) stf(dst, db, i, ldf(src, sb, i));
}

// out = a + b; out may be a.
extern "C" __global__ void add(void* out, int ob, const void* a, int ab, const void* b, int bb, i64 n) {
    GRID_STRIDE(i, n) stf(out, ob, i, ldf(a, ab, i) + ldf(b, bb, i));
}

extern "C" __global__ void accumulate(void* acc, int accb, const void* x, int xb, i64 n) {
    GRID_STRIDE(i, n) addf(acc, accb, i, ldf(x, xb, i));
}

extern "C" __global__ void scale(void* x, int xb, i64 n, float s) {
    GRID_STRIDE(i, n) stf(x, xb, i, ldf(x, xb, i) * s);
}

extern "C" __global__ void clamp_max(void* x, int xb, i64 n, float m) {
    GRID_STRIDE(i, n) stf(x, xb, i, fminf(ldf(x, xb, i), m));
}

// Block sums of x^2 in f64 into partial[blockIdx.x]; blockDim.x must be 256.
extern "C" __global__ void sum_squares_partial(double* partial, const void* x, int xb, i64 n) {
    __shared__ double s[8];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        double v = (double)ldf(x, xb, i);
        acc += v * v;
    }
    acc = warp_sum_d(acc);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < 8; w++) t += s[w];
        partial[blockIdx.x] = t;
    }
}

// out[0] += sum(partial[0..k]) in order (one thread: k is at most a few thousand).
extern "C" __global__ void sum_partials_f64(float* out, const double* partial, int k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < k; i++) t += partial[i];
        out[0] += (float)t;
    }
}

// Column sums of x[n, cols] over a chunk of rows: partial[chunk, col].
// Grid: (ceil(cols / 256), chunks); each thread sums rows chunk*rpc .. (chunk+1)*rpc of one column.
extern "C" __global__ void col_sum_partial(float* partial, const void* x, int xb, i64 n, i64 cols, i64 rpc) {
    i64 col = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    i64 r0 = (i64)blockIdx.y * rpc;
    i64 r1 = min(n, r0 + rpc);
    float acc = 0.f;
    for (i64 r = r0; r < r1; r++) acc += ldf(x, xb, r * cols + col);
    partial[(i64)blockIdx.y * cols + col] = acc;
}

// out[col] += alpha * sum over chunks of partial[chunk * stride + col], in chunk order, for
// col < cols (stride >= cols lets a prefix of the columns be reduced on its own).
extern "C" __global__ void col_sum_final(void* out, int ob, const float* partial, i64 chunks, i64 cols, i64 stride,
                                         float alpha) {
    GRID_STRIDE(col, cols) {
        float acc = 0.f;
        for (i64 c = 0; c < chunks; c++) acc += partial[c * stride + col];
        addf(out, ob, col, alpha * acc);
    }
}

// out[i, j] = bias[j] for n rows of cols (the seed a bias-adding matrix product accumulates on).
extern "C" __global__ void broadcast_rows(void* out, int ob, const void* bias, int bb, i64 n, i64 cols) {
    GRID_STRIDE(i, n * cols) stf(out, ob, i, ldf(bias, bb, i % cols));
}
