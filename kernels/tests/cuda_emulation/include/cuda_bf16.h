// Stand-in for cuda_bf16.h; see cuda_fp16.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    uint16_t x;
};
static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    uint32_t x;
    std::memcpy(&x, &v, 4);
    __nv_bfloat16 h;
    if (std::isnan(v)) {
        h.x = (uint16_t)((x >> 16) | 0x40);
    } else {
        h.x = (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);  // nearest even
    }
    return h;
}
