// Stand-in for cuda_fp16.h, and for the CUDA built-ins the merge kernels
// use, so that g++ can compile the kernel sources and run them on the CPU
// (see ../../cuda_emulation.rs). Not CUDA: one OS thread per CUDA thread,
// one block at a time, __syncthreads() a std::barrier, __shared__ a static.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

struct __half {
    uint16_t x;
};
static inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.x, 2);
    return (float)f;
}
static inline __half __float2half_rn(float v) {
    _Float16 f = (_Float16)v;  // round to nearest even
    __half h;
    std::memcpy(&h.x, &f, 2);
    return h;
}

struct dim3 {
    unsigned x, y, z;
};
extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern thread_local dim3 gridDim;
extern std::barrier<>* emu_barrier;
static inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
