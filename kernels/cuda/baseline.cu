// Unfused baselines for the kernel bench (the materialised path the fused kernels replace):
// row softmax over a stored score matrix and its backward, and the InfoNCE logit gradient.

// In place, one warp per row of `cols`: x = softmax(scale * x) in f32, masked to the first
// (row % t) + 1 columns when causal (rows are t-row blocks of one head); saves the natural
// log-sum-exp of each row in lse when lse is not null.
extern "C" __global__ void softmax_rows(void* x, int xb, float* lse, i64 rows, int cols, float scale, int causal, int t) {
    i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    int live = causal ? (int)(row % t) + 1 : cols;
    i64 base = row * cols;
    float mx = -INFINITY;
    for (int j = lane; j < live; j += WARP) mx = fmaxf(mx, ldf(x, xb, base + j) * scale);
    mx = warp_max(mx);
    float sum = 0.f;
    for (int j = lane; j < live; j += WARP) sum += expf(ldf(x, xb, base + j) * scale - mx);
    sum = warp_sum(sum);
    float inv = 1.f / sum;
    for (int j = lane; j < cols; j += WARP) {
        float p = j < live ? expf(ldf(x, xb, base + j) * scale - mx) * inv : 0.f;
        stf(x, xb, base + j, p);
    }
    if (lse && lane == 0) lse[row] = mx + logf(sum);
}

// In place on dp: ds = p * (dp - rowsum(dp * p)) * scale, one warp per row.
extern "C" __global__ void softmax_rows_bwd(void* dp, int db, const void* p, int pb, i64 rows, int cols, float scale) {
    i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= rows) return;
    i64 base = row * cols;
    float dot = 0.f;
    for (int j = lane; j < cols; j += WARP) dot += ldf(dp, db, base + j) * ldf(p, pb, base + j);
    dot = warp_sum(dot);
    for (int j = lane; j < cols; j += WARP) {
        float pv = ldf(p, pb, base + j);
        stf(dp, db, base + j, pv * (ldf(dp, db, base + j) - dot) * scale);
    }
}

// In place on the probabilities of a rows x cols InfoNCE direction: g = coef * (p - [j == off + i]).
extern "C" __global__ void infonce_baseline_grad(void* p, int pb, i64 rows, i64 cols, i64 off, float coef) {
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < rows * cols; e += (i64)gridDim.x * blockDim.x) {
        i64 i = e / cols, j = e % cols;
        stf(p, pb, e, coef * (ldf(p, pb, e) - (j == off + i ? 1.f : 0.f)));
    }
}
