// cuda_fp16.h as Offload's runtime gives it to NVRTC: the subset of the
// toolkit header that Offload's kernels use, so that they compile with no
// CUDA include folder (NVRTC 13.0 bundles no fp16/bf16 header: its
// nvidia-cuda-nvrtc 13.0.88 wheel fails with "could not open source file").
// Conversions are the PTX instructions the toolkit header uses: exact
// widening, and narrowing rounded to nearest, ties to even.
#pragma once

struct __half {
    unsigned short __x;
};

static __device__ __forceinline__ float __half2float(const __half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.__x));
    return f;
}

static __device__ __forceinline__ __half __float2half_rn(const float f) {
    __half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.__x) : "f"(f));
    return h;
}
