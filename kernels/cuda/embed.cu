// Patch extraction (im2col) and its backward, vision / token embeddings, row pooling.

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// cols[b, py*g + px, (ch, r, c)] = pixels[b, ch, py*p + r, px*p + c], g = img / p.
// One thread per output element (coalesced writes).
extern "C" __global__ void im2col(void* cols, int cb, const void* pixels, int pb, i64 b, int img, int p) {
    int g = img / p;
    i64 per_patch = 3LL * p * p;
    i64 per_img = 3LL * img * img;
    i64 n = b * per_img;
    GRID_STRIDE(i, n) {
        i64 bi = i / per_img;
        i64 rem = i % per_img;
        i64 patch = rem / per_patch;
        int e = (int)(rem % per_patch);
        int ch = e / (p * p), r = (e / p) % p, c = e % p;
        int py = (int)(patch / g), px = (int)(patch % g);
        i64 src = bi * per_img + ((i64)ch * img + py * p + r) * img + px * p + c;
        stf(cols, cb, i, ldf(pixels, pb, src));
    }
}

// dpixels += the scatter of dcols (each pixel belongs to exactly one patch: no conflicts).
extern "C" __global__ void col2im(void* dpixels, int pb, const void* dcols, int cb, i64 b, int img, int p) {
    int g = img / p;
    i64 per_patch = 3LL * p * p;
    i64 per_img = 3LL * img * img;
    i64 n = b * per_img;
    GRID_STRIDE(i, n) {
        i64 bi = i / per_img;
        i64 rem = i % per_img;
        i64 patch = rem / per_patch;
        int e = (int)(rem % per_patch);
        int ch = e / (p * p), r = (e / p) % p, c = e % p;
        int py = (int)(patch / g), px = (int)(patch % g);
        i64 dst = bi * per_img + ((i64)ch * img + py * p + r) * img + px * p + c;
        addf(dpixels, pb, dst, ldf(dcols, cb, i));
    }
}

// out[b, 0] = cls + pos[0]; out[b, 1 + i] = patches[b, i] + pos[1 + i].
extern "C" __global__ void vision_embed_fwd(void* out, int ob, const void* patches, int pb, const void* cls, int cb,
                                            const void* pos, int qb, i64 b, int np, int d) {
    i64 seq = (i64)(np + 1) * d;
    i64 n = b * seq;
    GRID_STRIDE(i, n) {
        i64 bi = i / seq;
        i64 rem = i % seq;
        float v = rem < d ? ldf(cls, cb, rem) : ldf(patches, pb, bi * np * d + rem - d);
        stf(out, ob, i, v + ldf(pos, qb, rem));
    }
}

// dpatches[b, i] += dout[b, 1 + i].
extern "C" __global__ void vision_embed_bwd_patches(void* dpatches, int pb, const void* dout, int gb, i64 b, int np, int d) {
    i64 per = (i64)np * d;
    i64 n = b * per;
    GRID_STRIDE(i, n) {
        i64 bi = i / per;
        addf(dpatches, pb, i, ldf(dout, gb, bi * (per + d) + d + i % per));
    }
}

// out[bi, ti] = wte[ids[bi, ti]] + wpe[ti]; an id outside 0..vocab sets *bad (checked by the host)
// and writes NaN instead of reading a neighbouring row.
extern "C" __global__ void token_embed_fwd(void* out, int ob, const int* ids, const void* wte, int eb, const void* wpe,
                                           int pb, i64 b, int t, int d, int vocab, int* bad) {
    i64 n = b * t * d;
    GRID_STRIDE(i, n) {
        i64 tok = i / d;
        int j = (int)(i % d);
        int ti = (int)(tok % t);
        int id = ids[tok];
        float v;
        if (id < 0 || id >= vocab) {
            *bad = 1;
            v = __int_as_float(0x7fc00000);
        } else {
            v = ldf(wte, eb, (i64)id * d + j) + ldf(wpe, pb, (i64)ti * d + j);
        }
        stf(out, ob, i, v);
    }
}

// The token table's gradient, dwte[ids[k]] += dout[k], in parallel and deterministic (no float
// atomics, a fixed summation order). The tokens are sorted by the key (id << 32 | k): keys are
// unique, so the order is fixed, and within an id the tokens stay in token order. Then the
// sorted list is cut into pieces of TOK_PIECE tokens: one block per (piece, column tile) sums
// each run of equal ids inside its piece; a run wholly inside a piece goes to dwte at once, a
// run that crosses pieces leaves its piece sums in `partial` (the first run of a piece in
// slot 2p, the last in slot 2p + 1), which one join block per such run adds up in piece order.
// An id outside 0..vocab is keyed as INVALID_ID, sorts last and is skipped (the forward flags it).
//
// The sort: blocks of TOK_SORT_CHUNK keys sorted in shared memory (bitonic), then each key's
// place in the whole list is its place in its chunk plus the number of smaller keys in every
// other chunk (a binary search in each): a merge of the chunks without a second pass.

#define TOK_SORT_CHUNK 1024
#define TOK_PIECE 32
#define TOK_COLS 128
#define INVALID_ID 0x7fffffffu
#define NO_KEY 0xffffffffffffffffull

typedef unsigned long long u64;

__device__ __forceinline__ unsigned key_id(u64 key) { return (unsigned)(key >> 32); }

// keys[c * TOK_SORT_CHUNK + i]: chunk c's keys in ascending order, NO_KEY past the last token.
// Grid: one block of TOK_SORT_CHUNK threads per chunk.
extern "C" __global__ void __launch_bounds__(TOK_SORT_CHUNK)
token_embed_bwd_sort(u64* keys, const int* ids, i64 ntok, int vocab) {
    __shared__ u64 s[TOK_SORT_CHUNK];
    int tid = threadIdx.x;
    i64 k = (i64)blockIdx.x * TOK_SORT_CHUNK + tid;
    u64 key = NO_KEY;
    if (k < ntok) {
        int id = ids[k];
        unsigned kid = (id < 0 || id >= vocab) ? INVALID_ID : (unsigned)id;
        key = ((u64)kid << 32) | (u64)k;
    }
    s[tid] = key;
    for (int size = 2; size <= TOK_SORT_CHUNK; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            int partner = tid ^ stride;
            if (partner > tid) {
                u64 a = s[tid], b = s[partner];
                bool ascending = (tid & size) == 0;
                if ((a > b) == ascending) {
                    s[tid] = b;
                    s[partner] = a;
                }
            }
        }
    }
    __syncthreads();
    keys[(i64)blockIdx.x * TOK_SORT_CHUNK + tid] = s[tid];
}

// The number of keys below `key` in one sorted chunk (a power-of-two lower bound).
__device__ __forceinline__ int below_in_chunk(const u64* chunk, u64 key) {
    int pos = 0;
    for (int step = TOK_SORT_CHUNK / 2; step > 0; step >>= 1) {
        if (chunk[pos + step - 1] < key) pos += step;
    }
    return pos + (chunk[pos] < key);
}

// sorted[r] = the key of rank r over all chunks. One thread per chunk slot.
extern "C" __global__ void token_embed_bwd_rank(u64* sorted, const u64* keys, i64 ntok, int nchunks) {
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (i64)nchunks * TOK_SORT_CHUNK) return;
    u64 key = keys[e];
    if (key == NO_KEY) return;
    int c = (int)(e / TOK_SORT_CHUNK);
    i64 rank = e % TOK_SORT_CHUNK;
    for (int o = 0; o < nchunks; o++) {
        if (o != c) rank += below_in_chunk(keys + (i64)o * TOK_SORT_CHUNK, key);
    }
    sorted[rank] = key;
}

// Grid (pieces, column tiles of TOK_COLS), TOK_COLS threads: the run sums of one piece.
extern "C" __global__ void __launch_bounds__(TOK_COLS)
token_embed_bwd_pieces(void* dwte, int eb, float* partial, const void* dout, int gb, const u64* sorted, i64 ntok,
                       int d, int vocab) {
    __shared__ unsigned sid[TOK_PIECE];
    __shared__ i64 stok[TOK_PIECE];
    i64 p = blockIdx.x;
    i64 first = p * TOK_PIECE;
    int len = (int)min((i64)TOK_PIECE, ntok - first);
    if (threadIdx.x < len) {
        u64 key = sorted[first + threadIdx.x];
        sid[threadIdx.x] = key_id(key);
        stok[threadIdx.x] = (i64)(key & 0xffffffffull);
    }
    __syncthreads();
    int j = blockIdx.y * TOK_COLS + threadIdx.x;
    if (j >= d) return;
    // The ids just outside the piece: a run continues across the edge when they match.
    unsigned before = p > 0 ? key_id(sorted[first - 1]) : INVALID_ID;
    unsigned after = first + len < ntok ? key_id(sorted[first + len]) : INVALID_ID;
    float acc = 0.f;
    int start = 0;
    for (int i = 0; i < len; i++) {
        acc += ldf(dout, gb, stok[i] * d + j);
        unsigned id = sid[i];
        if (i + 1 < len && sid[i + 1] == id) continue;
        // The run segment start..i of id ends here.
        if (id < (unsigned)vocab) {
            bool from_before = start == 0 && id == before;
            bool goes_on = i + 1 == len && id == after;
            if (!from_before && !goes_on) {
                addf(dwte, eb, (i64)id * d + j, acc);
            } else {
                if (start == 0) partial[(2 * p) * d + j] = acc;
                if (i + 1 == len) partial[(2 * p + 1) * d + j] = acc;
            }
        }
        acc = 0.f;
        start = i + 1;
    }
}

#define JOIN_ROWS 8

// Grid (pieces - 1, column tiles of 32), 32 x JOIN_ROWS threads: block q joins the run that
// crosses the edge between pieces q and q + 1 if that edge is the run's first. The run's piece
// sums (its tail slot in piece q, the head slots of the pieces after) are split among the
// JOIN_ROWS rows of threads by index modulo JOIN_ROWS, each row summing in piece order, and the
// row totals are added in row order: the same order on every run.
extern "C" __global__ void __launch_bounds__(32 * JOIN_ROWS)
token_embed_bwd_join(void* dwte, int eb, const float* partial, const u64* sorted, i64 ntok, int npieces, int d,
                     int vocab) {
    __shared__ float rows[JOIN_ROWS][32];
    i64 q = blockIdx.x;
    i64 edge = (q + 1) * TOK_PIECE;  // the first token of piece q + 1
    unsigned id = key_id(sorted[edge - 1]);
    if (id >= (unsigned)vocab || key_id(sorted[edge]) != id) return;
    if (q > 0 && key_id(sorted[q * TOK_PIECE - 1]) == id) return;  // not the run's first edge
    // The run's end: the first position past edge whose id is larger (binary search).
    i64 lo = edge, hi = ntok;
    while (hi - lo > 1) {
        i64 mid = lo + (hi - lo) / 2;
        if (key_id(sorted[mid]) == id) lo = mid; else hi = mid;
    }
    i64 last_piece = lo / TOK_PIECE;
    int m = (int)(last_piece - q + 1);  // piece sums to add: the tail of q, the heads after
    int x = threadIdx.x % 32, y = threadIdx.x / 32;
    int j = blockIdx.y * 32 + x;
    float acc = 0.f;
    if (j < d) {
        for (int i = y; i < m; i += JOIN_ROWS) {
            i64 slot = i == 0 ? 2 * q + 1 : 2 * (q + i);
            acc += partial[slot * d + j];
        }
    }
    rows[y][x] = acc;
    __syncthreads();
    if (y == 0 && j < d) {
        float total = 0.f;
        for (int r = 0; r < JOIN_ROWS; r++) total += rows[r][x];
        addf(dwte, eb, (i64)id * d + j, total);
    }
}

// out[i] = inp[i, index[i]] for b sequences of t rows of d; an index outside 0..t sets *bad.
extern "C" __global__ void gather_rows(void* out, int ob, const void* inp, int ib, const int* index, i64 b, int t, int d, int* bad) {
    i64 n = b * d;
    GRID_STRIDE(i, n) {
        i64 s = i / d;
        int j = (int)(i % d);
        int k = index[s];
        if (k < 0 || k >= t) {
            *bad = 1;
            stf(out, ob, i, __int_as_float(0x7fc00000));
        } else {
            stf(out, ob, i, ldf(inp, ib, (s * t + k) * d + j));
        }
    }
}

extern "C" __global__ void gather_rows_bwd(void* dinp, int db, const void* dout, int gb, const int* index, i64 b, int t, int d) {
    i64 n = b * d;
    GRID_STRIDE(i, n) {
        i64 s = i / d;
        int j = (int)(i % d);
        int k = index[s];
        if (k >= 0 && k < t) addf(dinp, db, (s * t + k) * d + j, ldf(dout, gb, i));
    }
}
