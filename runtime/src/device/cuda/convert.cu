// Offload: f32 -> f16 / bf16 conversion of an activation batch, compiled at
// run time by NVRTC. The CUDA backend's matrix product multiplies an f16 or
// bf16 weight with cuBLAS, whose GemmEx takes A and B of one type: the f32
// activations are rounded (to nearest, ties to even) into a scratch buffer
// of the weight's type first.
//
// Launch: any grid of 1-D blocks (grid-stride loop), no shared memory.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void offload_f32_to_f16(const float* __restrict__ x, __half* __restrict__ y,
                                              unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        y[i] = __float2half_rn(x[i]);
    }
}

extern "C" __global__ void offload_f32_to_bf16(const float* __restrict__ x,
                                               __nv_bfloat16* __restrict__ y,
                                               unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        y[i] = __float2bfloat16_rn(x[i]);
    }
}
