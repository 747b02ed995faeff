// cuda_bf16.h as Offload's runtime gives it to NVRTC: the subset of the
// toolkit header that Offload's kernels use (see cuda_fp16.h). Widening is
// exact; narrowing rounds to nearest, ties to even, in integer arithmetic
// (what the toolkit header does before sm_80, and what cvt.rn.bf16.f32
// does after it); NaN stays a quiet NaN.
#pragma once

struct __nv_bfloat16 {
    unsigned short __x;
};

static __device__ __forceinline__ float __bfloat162float(const __nv_bfloat16 h) {
    return __uint_as_float(((unsigned int)h.__x) << 16);
}

static __device__ __forceinline__ __nv_bfloat16 __float2bfloat16_rn(const float f) {
    const unsigned int u = __float_as_uint(f);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        h.__x = (unsigned short)((u >> 16) | 0x40u);
    } else {
        h.__x = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return h;
}
