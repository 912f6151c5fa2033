// Shared by every kernel family: prepended to each .cu file before NVRTC compiles it.
//
// Storage types are chosen at run time per tensor (the Backend's DType): a pointer travels
// with an int flag, 1 for bf16 and 0 for f32, and every access goes through ldf / stf,
// which compute in f32. The flag is uniform across a launch, so the branch costs nothing.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

#define WARP 32
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float ldf(const void* p, int bf, i64 i) {
    return bf ? __bfloat162float(((const bf16*)p)[i]) : ((const float*)p)[i];
}

__device__ __forceinline__ void stf(void* p, int bf, i64 i, float v) {
    if (bf) {
        ((bf16*)p)[i] = __float2bfloat16(v);
    } else {
        ((float*)p)[i] = v;
    }
}

// p[i] += v
__device__ __forceinline__ void addf(void* p, int bf, i64 i, float v) {
    stf(p, bf, i, ldf(p, bf, i) + v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Two f32 values as one register of two bf16 (the low half is the first).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(unsigned*)&v;
}

// D = A * B + D on the tensor cores: m16n8k16, bf16 operands, f32 accumulators.
// Fragment layout (g = lane / 4, q = lane % 4):
//   a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..], a[2] = A[g][2q+8..], a[3] = A[g+8][2q+8..]
//   b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g]
//   d[0..1] = D[g][2q..2q+1], d[2..3] = D[g+8][2q..2q+1]
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two consecutive bf16 in shared memory as one register.
__device__ __forceinline__ unsigned lds32(const bf16* p) {
    return *(const unsigned*)p;
}

// Two bf16 from different rows (p[0] low half, p[stride] high half).
__device__ __forceinline__ unsigned lds_pair(const bf16* p, int stride) {
    unsigned lo = (unsigned)(*(const unsigned short*)p);
    unsigned hi = (unsigned)(*(const unsigned short*)(p + stride));
    return lo | (hi << 16);
}
