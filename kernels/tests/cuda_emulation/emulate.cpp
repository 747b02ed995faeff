// Runs the CUDA low-rank merge kernel (src/cuda/lowrank_merge.cu) on the CPU
// and checks it element by element against an f64 reference, with the same
// tolerance as the Rust tests: |result - exact| <= ulp(exact) + 1e-5 * bound
// (ulp 0 for f32), bound = |W| + sum |s| (|B| |A|); rows outside the slice
// unchanged. Random shapes, row slices, 1 to 4 adapters, ranks 1 to 70
// (several rank chunks), every dtype for W and each factor. Exit status 0
// when every element passes.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
std::barrier<>* emu_barrier;

#include "lowrank_merge.cu"

typedef void (*Kernel)(const OffloadLowRankMergeParams);

// Grid and block as documented in the source: block (16, 16), grid
// (ceil(cols / 64), ceil(rows / 64)); blocks run one after another.
static void launch(Kernel kernel, const OffloadLowRankMergeParams& p) {
    const unsigned gx = (p.cols + 63) / 64, gy = (p.rows + 63) / 64;
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::barrier<> bar(256);
            emu_barrier = &bar;
            std::vector<std::thread> threads;
            for (unsigned ty = 0; ty < 16; ++ty) {
                for (unsigned tx = 0; tx < 16; ++tx) {
                    threads.emplace_back([=] {
                        threadIdx = {tx, ty, 0};
                        blockIdx = {bx, by, 0};
                        kernel(p);
                    });
                }
            }
            for (auto& t : threads) t.join();
        }
    }
}

static double decode(unsigned dt, const void* base, size_t i) {
    if (dt == OFFLOAD_DTYPE_F16) return __half2float(((const __half*)base)[i]);
    if (dt == OFFLOAD_DTYPE_BF16) return __bfloat162float(((const __nv_bfloat16*)base)[i]);
    return ((const float*)base)[i];
}

static void encode(unsigned dt, void* base, size_t i, float v) {
    if (dt == OFFLOAD_DTYPE_F16) ((__half*)base)[i] = __float2half_rn(v);
    else if (dt == OFFLOAD_DTYPE_BF16) ((__nv_bfloat16*)base)[i] = __float2bfloat16_rn(v);
    else ((float*)base)[i] = v;
}

static double ulp(unsigned dt, double x) {
    if (dt == OFFLOAD_DTYPE_F32) return 0;
    const int mant = dt == OFFLOAD_DTYPE_F16 ? 10 : 7;
    const int emin = dt == OFFLOAD_DTYPE_F16 ? -14 : -126;
    const int e = x == 0 ? emin : std::max((int)std::floor(std::log2(std::fabs(x))), emin);
    return std::ldexp(1.0, e - mant);
}

int main(int argc, char** argv) {
    const int cases = argc > 1 ? std::atoi(argv[1]) : 20;
    std::mt19937_64 rng(42);
    std::uniform_real_distribution<float> uniform(-1, 1);
    long failures = 0;
    for (int c = 0; c < cases; ++c) {
        const unsigned out = 1 + rng() % 150, cols = 1 + rng() % 150;
        unsigned r0 = rng() % out, n = 1 + rng() % (out - r0);
        if (c % 3 == 0) {
            r0 = 0;
            n = out;
        }
        const unsigned wdt = rng() % 3;
        const size_t wsz = wdt == OFFLOAD_DTYPE_F32 ? 4 : 2;
        std::vector<unsigned char> w((size_t)out * cols * wsz);
        for (size_t i = 0; i < (size_t)out * cols; ++i) encode(wdt, w.data(), i, 2 * uniform(rng));
        const std::vector<unsigned char> w0 = w;

        OffloadLowRankMergeParams p{};
        p.w = (unsigned long long)w.data();
        p.rows = n;
        p.cols = cols;
        p.row0 = r0;
        p.num_adapters = 1 + rng() % 4;
        std::vector<std::vector<unsigned char>> store;
        for (unsigned a = 0; a < p.num_adapters; ++a) {
            OffloadLowRankAdapter& ad = p.adapters[a];
            ad.rank = 1 + rng() % 70;
            ad.up_dtype = rng() % 3;
            ad.down_dtype = rng() % 3;
            ad.scale = 2 * uniform(rng);
            store.emplace_back((size_t)n * ad.rank * 4);
            for (size_t i = 0; i < (size_t)n * ad.rank; ++i)
                encode(ad.up_dtype, store.back().data(), i, uniform(rng));
            ad.up = (unsigned long long)store.back().data();
            store.emplace_back((size_t)ad.rank * cols * 4);
            for (size_t i = 0; i < (size_t)ad.rank * cols; ++i)
                encode(ad.down_dtype, store.back().data(), i, uniform(rng));
            ad.down = (unsigned long long)store.back().data();
        }
        const Kernel kernel = wdt == OFFLOAD_DTYPE_F32   ? offload_lowrank_merge_f32
                              : wdt == OFFLOAD_DTYPE_F16 ? offload_lowrank_merge_f16
                                                         : offload_lowrank_merge_bf16;
        launch(kernel, p);

        for (unsigned i = 0; i < out; ++i) {
            for (unsigned j = 0; j < cols; ++j) {
                const size_t at = (size_t)i * cols + j;
                if (i < r0 || i >= r0 + n) {
                    if (std::memcmp(&w[at * wsz], &w0[at * wsz], wsz) != 0) {
                        if (failures++ < 5) std::printf("case %d: [%u, %u] outside the slice changed\n", c, i, j);
                    }
                    continue;
                }
                const double x0 = decode(wdt, w0.data(), at);
                double exact = x0, bound = std::fabs(x0);
                for (unsigned a = 0; a < p.num_adapters; ++a) {
                    const OffloadLowRankAdapter& ad = p.adapters[a];
                    double d = 0, da = 0;
                    for (unsigned k = 0; k < ad.rank; ++k) {
                        const double b = decode(ad.up_dtype, (const void*)ad.up, (size_t)(i - r0) * ad.rank + k);
                        const double av = decode(ad.down_dtype, (const void*)ad.down, (size_t)k * cols + j);
                        d += b * av;
                        da += std::fabs(b) * std::fabs(av);
                    }
                    exact += (double)ad.scale * d;
                    bound += std::fabs((double)ad.scale) * da;
                }
                const double got = decode(wdt, w.data(), at);
                const double allowed = ulp(wdt, exact) + 1e-5 * bound;
                if (!(std::fabs(got - exact) <= allowed)) {
                    if (failures++ < 5)
                        std::printf("case %d: [%u, %u] dtype %u: got %g, exact %g, allowed %g\n", c, i, j, wdt, got,
                                    exact, allowed);
                }
            }
        }
    }
    std::printf("%d cases, %ld failures\n", cases, failures);
    return failures == 0 ? 0 : 1;
}
