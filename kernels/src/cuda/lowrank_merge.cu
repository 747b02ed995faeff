// Offload: the low-rank LoRA merge on the GPU, compiled at run time by NVRTC.
//
//   W[row0 + i, j] <- W[row0 + i, j] + sum_a s_a * sum_k B_a[i, k] * A_a[k, j]
//
// Same semantics as the CPU merge of offload-kernels (src/cpu): one pass over
// the rows row0 .. row0 + rows of W, every element read once and written once,
// all adapters accumulated in fp32, the sum rounded once to W's type (round to
// nearest, ties to even). Rows outside the slice are not touched.
//
// Layout: W is row-major [out, cols] (a conv weight [out, in, kh, kw] with
// cols = in * kh * kw); each up factor B is row-major [rows, rank] and each
// down factor A row-major [rank, cols], each f32, f16 or bf16 independently.
// Device pointers must be aligned to their element size.
//
// Launch: block (16, 16, 1), grid (ceil(cols / 64), ceil(rows / 64), 1), no
// dynamic shared memory, the parameter block passed by value. Each block owns
// a 64 x 64 tile of the slice; each thread owns 4 x 4 elements of it (rows
// ty + 16 i, columns tx + 16 j, so a warp's accesses to W are contiguous).
// For every adapter and every chunk of 32 ranks, the block stages the chunk's
// 32 x 64 tile of A and 64 x 32 tile of s * B in shared memory as fp32, then
// each thread accumulates its 16 sums from registers. Any rank works; ranks
// above 32 take several chunks (a tensor-core path for large ranks is future
// work).
//
// Only cuda_fp16.h and cuda_bf16.h are included, so NVRTC needs nothing else.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define OFFLOAD_MAX_ADAPTERS 8
#define OFFLOAD_TILE_ROWS 64
#define OFFLOAD_TILE_COLS 64
#define OFFLOAD_TILE_K 32
#define OFFLOAD_BLOCK_X 16
#define OFFLOAD_BLOCK_Y 16
#define OFFLOAD_THREADS (OFFLOAD_BLOCK_X * OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_ROWS (OFFLOAD_TILE_ROWS / OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_COLS (OFFLOAD_TILE_COLS / OFFLOAD_BLOCK_X)

#define OFFLOAD_DTYPE_F32 0u
#define OFFLOAD_DTYPE_F16 1u
#define OFFLOAD_DTYPE_BF16 2u

// Must match offload_kernels::cuda::LowRankAdapterParams field for field.
struct OffloadLowRankAdapter {
    unsigned long long up;    // B: [rows, rank], row-major, up_dtype
    unsigned long long down;  // A: [rank, cols], row-major, down_dtype
    unsigned int rank;
    unsigned int up_dtype;    // OFFLOAD_DTYPE_*
    unsigned int down_dtype;  // OFFLOAD_DTYPE_*
    float scale;
};

// Must match offload_kernels::cuda::LowRankMergeParams field for field.
struct OffloadLowRankMergeParams {
    unsigned long long w;     // W's first element (row 0 of the whole weight)
    unsigned int rows;        // rows of the delta: the row slice's length
    unsigned int cols;        // columns of W viewed as a matrix
    unsigned int row0;        // first row of W the delta applies to
    unsigned int num_adapters;
    OffloadLowRankAdapter adapters[OFFLOAD_MAX_ADAPTERS];
};

static_assert(sizeof(OffloadLowRankAdapter) == 32,
              "layout must match offload_kernels::cuda::LowRankAdapterParams");
static_assert(sizeof(OffloadLowRankMergeParams) == 24 + 32 * OFFLOAD_MAX_ADAPTERS,
              "layout must match offload_kernels::cuda::LowRankMergeParams");

// Element i of a factor of the given dtype, as fp32 (exact).
__device__ __forceinline__ float offload_load_factor(unsigned long long base, unsigned int dtype,
                                                     unsigned long long i) {
    if (dtype == OFFLOAD_DTYPE_F16) {
        return __half2float(reinterpret_cast<const __half*>(base)[i]);
    }
    if (dtype == OFFLOAD_DTYPE_BF16) {
        return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(base)[i]);
    }
    return reinterpret_cast<const float*>(base)[i];
}

// Reading and writing W's element type; stores round to nearest, ties to even.
template <typename T> struct OffloadElem;

template <> struct OffloadElem<float> {
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <> struct OffloadElem<__half> {
    static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
    static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

template <> struct OffloadElem<__nv_bfloat16> {
    static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
        return __bfloat162float(*p);
    }
    static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
        *p = __float2bfloat16_rn(v);
    }
};

template <typename T>
__device__ __forceinline__ void offload_lowrank_merge(const OffloadLowRankMergeParams& p) {
    // A[k0 + k, tile_col + c].
    __shared__ float a_tile[OFFLOAD_TILE_K][OFFLOAD_TILE_COLS];
    // s * B[tile_row + r, k0 + k], stored transposed; the padding column keeps
    // the transposing stores free of bank conflicts.
    __shared__ float b_tile[OFFLOAD_TILE_K][OFFLOAD_TILE_ROWS + 1];

    const unsigned int tx = threadIdx.x;
    const unsigned int ty = threadIdx.y;
    const unsigned int tid = ty * OFFLOAD_BLOCK_X + tx;
    const unsigned int tile_row = blockIdx.y * OFFLOAD_TILE_ROWS;
    const unsigned int tile_col = blockIdx.x * OFFLOAD_TILE_COLS;

    float acc[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS];
#pragma unroll
    for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    const unsigned int num_adapters =
        p.num_adapters < OFFLOAD_MAX_ADAPTERS ? p.num_adapters : OFFLOAD_MAX_ADAPTERS;
    // Every bound below is the same for all threads of the block, so every
    // thread reaches every __syncthreads().
    for (unsigned int a = 0; a < num_adapters; ++a) {
        const OffloadLowRankAdapter ad = p.adapters[a];
        for (unsigned int k0 = 0; k0 < ad.rank; k0 += OFFLOAD_TILE_K) {
            // The previous chunk's tiles are no longer read by anyone.
            __syncthreads();
            for (unsigned int idx = tid; idx < OFFLOAD_TILE_K * OFFLOAD_TILE_COLS;
                 idx += OFFLOAD_THREADS) {
                const unsigned int k = idx / OFFLOAD_TILE_COLS;
                const unsigned int c = idx % OFFLOAD_TILE_COLS;
                const unsigned int gk = k0 + k;
                const unsigned int gc = tile_col + c;
                a_tile[k][c] = (gk < ad.rank && gc < p.cols)
                    ? offload_load_factor(ad.down, ad.down_dtype,
                                          (unsigned long long)gk * p.cols + gc)
                    : 0.0f;
            }
            for (unsigned int idx = tid; idx < OFFLOAD_TILE_ROWS * OFFLOAD_TILE_K;
                 idx += OFFLOAD_THREADS) {
                const unsigned int r = idx / OFFLOAD_TILE_K;
                const unsigned int k = idx % OFFLOAD_TILE_K;
                const unsigned int gr = tile_row + r;
                const unsigned int gk = k0 + k;
                b_tile[k][r] = (gr < p.rows && gk < ad.rank)
                    ? ad.scale * offload_load_factor(ad.up, ad.up_dtype,
                                                     (unsigned long long)gr * ad.rank + gk)
                    : 0.0f;
            }
            __syncthreads();
            const unsigned int left = ad.rank - k0;
            const unsigned int kn = left < OFFLOAD_TILE_K ? left : OFFLOAD_TILE_K;
            for (unsigned int k = 0; k < kn; ++k) {
                float bv[OFFLOAD_PER_THREAD_ROWS];
                float av[OFFLOAD_PER_THREAD_COLS];
#pragma unroll
                for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
                    bv[i] = b_tile[k][ty + i * OFFLOAD_BLOCK_Y];
                }
#pragma unroll
                for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                    av[j] = a_tile[k][tx + j * OFFLOAD_BLOCK_X];
                }
#pragma unroll
                for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
                    for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                        acc[i][j] = __fmaf_rn(bv[i], av[j], acc[i][j]);
                    }
                }
            }
        }
    }

    T* w = reinterpret_cast<T*>(p.w);
#pragma unroll
    for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
        const unsigned int r = tile_row + ty + i * OFFLOAD_BLOCK_Y;
        if (r >= p.rows) {
            continue;
        }
        const unsigned long long row = (unsigned long long)(p.row0 + r) * p.cols;
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            const unsigned int c = tile_col + tx + j * OFFLOAD_BLOCK_X;
            if (c < p.cols) {
                T* e = w + row + c;
                OffloadElem<T>::store(e, OffloadElem<T>::load(e) + acc[i][j]);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS)
offload_lowrank_merge_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<float>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS)
offload_lowrank_merge_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<__half>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS)
offload_lowrank_merge_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<__nv_bfloat16>(p);
}
