// Offload: the LoRA merge on the GPU, compiled at run time by NVRTC.
//
//   W[row0 + i, j] <- W[row0 + i, j] + sum_a s_a * Delta_a[i, j]
//
// Same semantics as the CPU merge of offload-kernels (src/cpu): one pass over
// the rows row0 .. row0 + rows of W, every element read once and written once,
// all adapters of a launch accumulated in fp32, the sum rounded once to W's
// type (round to nearest, ties to even). Rows outside the slice are not
// touched.
//
// Layout: W is row-major [out, cols] (a conv weight [out, in, kh, kw] with
// cols = in * kh * kw). Every factor is a row-major matrix of f32, f16 or
// bf16 elements, each factor's type independent of the others. Device
// pointers must be aligned to their element size.
//
// Three kernels, each with one entry point per W type (f32, f16, bf16), each
// taking its parameter block by value, no dynamic shared memory, and a grid of
// (ceil(cols / 64), ceil(rows / 64), 1) blocks, one 64 x 64 tile of the slice
// per block:
//
// 1. offload_lowrank_merge_*: low-rank deltas only (Delta = B A, up factor B
//    [rows, rank], down factor A [rank, cols]), in fp32 FMA. Block (16, 16, 1);
//    each thread owns 4 x 4 elements of the tile (rows ty + 16 i, columns
//    tx + 16 j, so a warp's accesses to W are contiguous). For every adapter
//    and every chunk of 32 ranks, the block stages the chunk's 32 x 64 tile of
//    A and 64 x 32 tile of s * B in shared memory as fp32, then each thread
//    accumulates its 16 sums from registers. Any rank works; meant to be
//    bound by memory bandwidth for ranks up to 32.
//
// 2. offload_lowrank_merge_mma_*: the same merge on the tensor cores, for
//    adapters whose two factors are both f16 or both bf16 (sm_80 and newer;
//    the runtime takes it when some rank is above 32). Block (128, 1, 1):
//    four warps, each owning a 32 x 32 quarter of the tile as 2 x 4
//    mma.sync.m16n8k16 products with fp32 accumulation (the products of f16
//    or bf16 values are exact in fp32). Chunks of 32 ranks of B and A are
//    staged in shared memory as they are stored (pairs of 16-bit values along
//    the rank), zero-padded. Each adapter's product is accumulated on its own
//    and then scaled in fp32 (s is never folded into a 16-bit factor, which
//    would round it); the scaled sums go through shared memory so that W is
//    read and written row by row.
//
// 3. offload_merge_*: every delta the CPU merges, mixed in one launch. Each
//    adapter's delta is one matrix ("term") or the element-wise product of two,
//    each term read at mapped indices: T[(i / row_div) % row_mod,
//    (j / col_div) % col_mod], and each term stored whole or as a product
//    L R of two factors:
//      low-rank: up down                        (one term, identity maps)
//      LoHa:     (w1a w1b) .* (w2a w2b)         (two terms, identity maps)
//      LoKr:     kron(w1, w2), w1 [a, b], w2 [c, d]:
//                w1[i / c, j / d] .* w2[i % c, j % d]   (each side whole or a b)
//    Block (16, 16, 1), the same tiling and shared-memory product as kernel 1
//    (rows of L and columns of R gathered through the maps); each term is
//    formed in fp32 registers, the two terms multiplied, scaled and added in
//    fp32, and W rounded once at the end. Up to 32 adapters per launch
//    (3352 bytes of parameters). Launch bounds of two blocks per SM: with
//    ptxas's default register target the terms' registers would spill.
//
// Only cuda_fp16.h and cuda_bf16.h are included, and only their types and
// scalar conversions are used, so NVRTC needs nothing else; the tensor-core
// instruction is inline PTX. When the source is not compiled by a CUDA
// compiler (the CPU emulation of tests/cuda_emulation), the includer provides
// offload_mma_f16 and offload_mma_bf16.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define OFFLOAD_MAX_ADAPTERS 8
#define OFFLOAD_MERGE_MAX_ADAPTERS 32
#define OFFLOAD_TILE_ROWS 64
#define OFFLOAD_TILE_COLS 64
#define OFFLOAD_TILE_K 32
#define OFFLOAD_BLOCK_X 16
#define OFFLOAD_BLOCK_Y 16
#define OFFLOAD_THREADS (OFFLOAD_BLOCK_X * OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_ROWS (OFFLOAD_TILE_ROWS / OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_COLS (OFFLOAD_TILE_COLS / OFFLOAD_BLOCK_X)
#define OFFLOAD_MMA_THREADS 128
// 32-bit words per row of the tensor-core kernel's staged factors: 16 words
// hold 32 ranks (two 16-bit values each), 4 more keep the fragment loads free
// of bank conflicts.
#define OFFLOAD_MMA_LD 20

#define OFFLOAD_DTYPE_F32 0u
#define OFFLOAD_DTYPE_F16 1u
#define OFFLOAD_DTYPE_BF16 2u

static_assert(OFFLOAD_THREADS % OFFLOAD_TILE_COLS == 0 && OFFLOAD_THREADS % OFFLOAD_TILE_K == 0,
              "the staging loops give each thread one column of A and one rank of B");
static_assert((OFFLOAD_TILE_K * OFFLOAD_TILE_COLS) % OFFLOAD_THREADS == 0 &&
                  (OFFLOAD_TILE_ROWS * OFFLOAD_TILE_K) % OFFLOAD_THREADS == 0,
              "whole staging steps");
static_assert(OFFLOAD_TILE_ROWS == 64 && OFFLOAD_TILE_COLS == 64 && OFFLOAD_TILE_K == 32 &&
                  OFFLOAD_MMA_THREADS == 128,
              "the tensor-core kernel's warp layout assumes these");

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

// One matrix T of a delta, read at T[(i / row_div) % row_mod,
// (j / col_div) % col_mod] for the delta's element [i, j]. Must match
// offload_kernels::cuda::MergeTermParams field for field.
struct OffloadMergeTerm {
    unsigned long long left;   // rank 0: T itself; else L: [T's rows, rank]
    unsigned long long right;  // rank 0: unused; else R: [rank, cols]
    unsigned int rank;         // 0: T stored whole; else T = L R
    unsigned int left_dtype;   // OFFLOAD_DTYPE_*
    unsigned int right_dtype;  // OFFLOAD_DTYPE_*
    unsigned int cols;         // T's columns (the row stride of T, or of R)
    unsigned int row_div;
    unsigned int row_mod;
    unsigned int col_div;
    unsigned int col_mod;
};

// Must match offload_kernels::cuda::MergeAdapterParams field for field.
struct OffloadMergeAdapter {
    OffloadMergeTerm terms[2];
    unsigned int num_terms;    // 1: Delta = terms[0]; 2: terms[0] .* terms[1]
    float scale;
};

// Must match offload_kernels::cuda::MergeParams field for field.
struct OffloadMergeParams {
    unsigned long long w;      // W's first element (row 0 of the whole weight)
    unsigned int rows;         // rows of the delta: the row slice's length
    unsigned int cols;         // columns of W viewed as a matrix
    unsigned int row0;         // first row of W the delta applies to
    unsigned int num_adapters;
    OffloadMergeAdapter adapters[OFFLOAD_MERGE_MAX_ADAPTERS];
};

static_assert(sizeof(OffloadLowRankAdapter) == 32,
              "layout must match offload_kernels::cuda::LowRankAdapterParams");
static_assert(sizeof(OffloadLowRankMergeParams) == 24 + 32 * OFFLOAD_MAX_ADAPTERS,
              "layout must match offload_kernels::cuda::LowRankMergeParams");
static_assert(sizeof(OffloadMergeTerm) == 48,
              "layout must match offload_kernels::cuda::MergeTermParams");
static_assert(sizeof(OffloadMergeAdapter) == 104,
              "layout must match offload_kernels::cuda::MergeAdapterParams");
static_assert(sizeof(OffloadMergeParams) == 24 + 104 * OFFLOAD_MERGE_MAX_ADAPTERS,
              "layout must match offload_kernels::cuda::MergeParams");

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

// acc[i][j] += sum over k < kn of l_tile[k][ty + 16 i] * r_tile[k][tx + 16 j]:
// one staged chunk of a product, in fp32 FMA, from registers.
__device__ __forceinline__ void offload_chunk_fma(
    float (&acc)[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS],
    const float (*r_tile)[OFFLOAD_TILE_COLS], const float (*l_tile)[OFFLOAD_TILE_ROWS + 1],
    unsigned int kn, unsigned int tx, unsigned int ty) {
    for (unsigned int k = 0; k < kn; ++k) {
        float lv[OFFLOAD_PER_THREAD_ROWS];
        float rv[OFFLOAD_PER_THREAD_COLS];
#pragma unroll
        for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
            lv[i] = l_tile[k][ty + i * OFFLOAD_BLOCK_Y];
        }
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            rv[j] = r_tile[k][tx + j * OFFLOAD_BLOCK_X];
        }
#pragma unroll
        for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
            for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                acc[i][j] = __fmaf_rn(lv[i], rv[j], acc[i][j]);
            }
        }
    }
}

// W[row0 + tile_row + ty + 16 i, tile_col + tx + 16 j] += acc[i][j] inside the
// slice, rounded once to T.
template <typename T>
__device__ __forceinline__ void offload_store_tile(
    unsigned long long w_addr, unsigned int rows, unsigned int cols, unsigned int row0,
    unsigned int tile_row, unsigned int tile_col, unsigned int tx, unsigned int ty,
    const float (&acc)[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS]) {
    T* w = reinterpret_cast<T*>(w_addr);
#pragma unroll
    for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
        const unsigned int r = tile_row + ty + i * OFFLOAD_BLOCK_Y;
        if (r >= rows) {
            continue;
        }
        const unsigned long long row = (unsigned long long)(row0 + r) * cols;
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            const unsigned int c = tile_col + tx + j * OFFLOAD_BLOCK_X;
            if (c < cols) {
                T* e = w + row + c;
                OffloadElem<T>::store(e, OffloadElem<T>::load(e) + acc[i][j]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel 1: low-rank deltas in fp32 FMA.

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
            offload_chunk_fma(acc, a_tile, b_tile, kn, tx, ty);
        }
    }

    offload_store_tile<T>(p.w, p.rows, p.cols, p.row0, tile_row, tile_col, tx, ty, acc);
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

// ---------------------------------------------------------------------------
// Kernel 2: low-rank deltas with 16-bit factors on the tensor cores.
//
// offload_mma_f16 / offload_mma_bf16: d += a b for one warp, a 16 x 16 (row
// major) and b 16 x 8 (column major) in the fragments of PTX's
// mma.m16n8k16 (with g = lane / 4 and t = lane % 4, each 32-bit register
// holding two 16-bit values, the lower index in the lower half):
//   a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// Every lane of the warp must call it together.
#if defined(__CUDACC__)
__device__ __forceinline__ void offload_mma_f16(float (&d)[4], const unsigned int (&a)[4],
                                                const unsigned int (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // Never launched below sm_80 (the runtime checks the compute capability).
    __trap();
#endif
}

__device__ __forceinline__ void offload_mma_bf16(float (&d)[4], const unsigned int (&a)[4],
                                                 const unsigned int (&b)[2]) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}
#endif

// Element i of a 16-bit factor, as raw bits.
__device__ __forceinline__ unsigned int offload_load_bits(unsigned long long base,
                                                          unsigned long long i) {
    return reinterpret_cast<const unsigned short*>(base)[i];
}

template <typename T>
__device__ __forceinline__ void offload_lowrank_merge_mma(const OffloadLowRankMergeParams& p) {
    // B[tile_row + r, k0 + 2 w .. k0 + 2 w + 1] in word w of row r.
    __shared__ unsigned int b_tile[OFFLOAD_TILE_ROWS][OFFLOAD_MMA_LD];
    // A[k0 + 2 w .. k0 + 2 w + 1, tile_col + c] in word w of row c (A transposed).
    __shared__ unsigned int a_tile[OFFLOAD_TILE_COLS][OFFLOAD_MMA_LD];
    // The tile's scaled sums, for the row-by-row update of W.
    __shared__ float out_tile[OFFLOAD_TILE_ROWS][OFFLOAD_TILE_COLS + 1];

    const unsigned int tid = threadIdx.x;
    const unsigned int lane = tid % 32;
    const unsigned int warp = tid / 32;
    const unsigned int g = lane / 4;
    const unsigned int t = lane % 4;
    // The warp's 32 x 32 quarter of the tile.
    const unsigned int wr = (warp / 2) * 32;
    const unsigned int wc = (warp % 2) * 32;
    const unsigned int tile_row = blockIdx.y * OFFLOAD_TILE_ROWS;
    const unsigned int tile_col = blockIdx.x * OFFLOAD_TILE_COLS;

    // [m16 block][n8 block][fragment element]
    float total[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                total[mi][ni][e] = 0.0f;
            }
        }
    }

    const unsigned int num_adapters =
        p.num_adapters < OFFLOAD_MAX_ADAPTERS ? p.num_adapters : OFFLOAD_MAX_ADAPTERS;
    // Every bound below is the same for all threads of the block, so every
    // thread reaches every __syncthreads() and every warp-wide mma.
    for (unsigned int a = 0; a < num_adapters; ++a) {
        const OffloadLowRankAdapter ad = p.adapters[a];
        const bool bf16 = ad.up_dtype == OFFLOAD_DTYPE_BF16;
        float prod[2][4][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    prod[mi][ni][e] = 0.0f;
                }
            }
        }
        for (unsigned int k0 = 0; k0 < ad.rank; k0 += OFFLOAD_TILE_K) {
            // The previous chunk's tiles are no longer read by anyone.
            __syncthreads();
            for (unsigned int idx = tid; idx < OFFLOAD_TILE_ROWS * (OFFLOAD_TILE_K / 2);
                 idx += OFFLOAD_MMA_THREADS) {
                const unsigned int r = idx / (OFFLOAD_TILE_K / 2);
                const unsigned int wd = idx % (OFFLOAD_TILE_K / 2);
                const unsigned int gr = tile_row + r;
                const unsigned int gk = k0 + 2 * wd;
                const unsigned long long at = (unsigned long long)gr * ad.rank + gk;
                const bool row_ok = gr < p.rows;
                const unsigned int lo = (row_ok && gk < ad.rank) ? offload_load_bits(ad.up, at) : 0u;
                const unsigned int hi =
                    (row_ok && gk + 1 < ad.rank) ? offload_load_bits(ad.up, at + 1) : 0u;
                b_tile[r][wd] = lo | (hi << 16);
            }
            for (unsigned int idx = tid; idx < (OFFLOAD_TILE_K / 2) * OFFLOAD_TILE_COLS;
                 idx += OFFLOAD_MMA_THREADS) {
                const unsigned int wd = idx / OFFLOAD_TILE_COLS;
                const unsigned int c = idx % OFFLOAD_TILE_COLS;
                const unsigned int gc = tile_col + c;
                const unsigned int gk = k0 + 2 * wd;
                const unsigned long long at = (unsigned long long)gk * p.cols + gc;
                const bool col_ok = gc < p.cols;
                const unsigned int lo =
                    (col_ok && gk < ad.rank) ? offload_load_bits(ad.down, at) : 0u;
                const unsigned int hi = (col_ok && gk + 1 < ad.rank)
                    ? offload_load_bits(ad.down, at + p.cols)
                    : 0u;
                a_tile[c][wd] = lo | (hi << 16);
            }
            __syncthreads();
#pragma unroll
            for (unsigned int ks = 0; ks < OFFLOAD_TILE_K / 16; ++ks) {
                if (k0 + 16 * ks >= ad.rank) {
                    break;  // only zero padding left in this chunk
                }
                const unsigned int kw = 8 * ks + t;
                unsigned int af[2][4];
                unsigned int bfr[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    const unsigned int r = wr + 16 * mi + g;
                    af[mi][0] = b_tile[r][kw];
                    af[mi][1] = b_tile[r + 8][kw];
                    af[mi][2] = b_tile[r][kw + 4];
                    af[mi][3] = b_tile[r + 8][kw + 4];
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const unsigned int c = wc + 8 * ni + g;
                    bfr[ni][0] = a_tile[c][kw];
                    bfr[ni][1] = a_tile[c][kw + 4];
                }
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        if (bf16) {
                            offload_mma_bf16(prod[mi][ni], af[mi], bfr[ni]);
                        } else {
                            offload_mma_f16(prod[mi][ni], af[mi], bfr[ni]);
                        }
                    }
                }
            }
        }
        // The scale, in fp32, after the exact-product accumulation.
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    total[mi][ni][e] = __fmaf_rn(ad.scale, prod[mi][ni][e], total[mi][ni][e]);
                }
            }
        }
    }

    // out_tile is only used here, so no barrier is needed before writing it.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned int r = wr + 16 * mi + g + 8 * (e / 2);
                const unsigned int c = wc + 8 * ni + 2 * t + (e % 2);
                out_tile[r][c] = total[mi][ni][e];
            }
        }
    }
    __syncthreads();
    T* w = reinterpret_cast<T*>(p.w);
    for (unsigned int idx = tid; idx < OFFLOAD_TILE_ROWS * OFFLOAD_TILE_COLS;
         idx += OFFLOAD_MMA_THREADS) {
        const unsigned int r = idx / OFFLOAD_TILE_COLS;
        const unsigned int c = idx % OFFLOAD_TILE_COLS;
        const unsigned int gr = tile_row + r;
        const unsigned int gc = tile_col + c;
        if (gr < p.rows && gc < p.cols) {
            T* e = w + (unsigned long long)(p.row0 + gr) * p.cols + gc;
            OffloadElem<T>::store(e, OffloadElem<T>::load(e) + out_tile[r][c]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_MMA_THREADS)
offload_lowrank_merge_mma_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<float>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_MMA_THREADS)
offload_lowrank_merge_mma_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<__half>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_MMA_THREADS)
offload_lowrank_merge_mma_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<__nv_bfloat16>(p);
}

// ---------------------------------------------------------------------------
// Kernel 3: every delta kind (low-rank, LoHa, LoKr), mixed.

#define OFFLOAD_NO_ROW 0xffffffffu

__device__ __forceinline__ unsigned int offload_map(unsigned int i, unsigned int div,
                                                    unsigned int mod) {
    return (i / div) % mod;
}

// t[i][j] = T[map(tile_row + ty + 16 i), map(tile_col + tx + 16 j)] for the
// thread's elements inside the slice, 0 outside it. Every thread of the block
// calls it with the same term (the barriers inside depend on it).
__device__ __forceinline__ void offload_term_tile(
    const OffloadMergeTerm& m, unsigned int rows, unsigned int cols, unsigned int tile_row,
    unsigned int tile_col, unsigned int tx, unsigned int ty,
    float (&t)[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS],
    float (*r_tile)[OFFLOAD_TILE_COLS], float (*l_tile)[OFFLOAD_TILE_ROWS + 1]) {
#pragma unroll
    for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            t[i][j] = 0.0f;
        }
    }
    if (m.rank == 0) {
        // Stored whole: gather the thread's elements.
        unsigned int mr[OFFLOAD_PER_THREAD_ROWS];
        unsigned int mc[OFFLOAD_PER_THREAD_COLS];
#pragma unroll
        for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
            const unsigned int r = tile_row + ty + i * OFFLOAD_BLOCK_Y;
            mr[i] = r < rows ? offload_map(r, m.row_div, m.row_mod) : OFFLOAD_NO_ROW;
        }
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            const unsigned int c = tile_col + tx + j * OFFLOAD_BLOCK_X;
            mc[j] = c < cols ? offload_map(c, m.col_div, m.col_mod) : OFFLOAD_NO_ROW;
        }
#pragma unroll
        for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
            for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                if (mr[i] != OFFLOAD_NO_ROW && mc[j] != OFFLOAD_NO_ROW) {
                    t[i][j] = offload_load_factor(
                        m.left, m.left_dtype, (unsigned long long)mr[i] * m.cols + mc[j]);
                }
            }
        }
        return;
    }

    // T = L R, in chunks of OFFLOAD_TILE_K ranks staged in shared memory. The
    // staging loops give each thread one column of R (sc) and one rank of L
    // (sk) for every chunk, so the maps are applied once, here.
    const unsigned int tid = ty * OFFLOAD_BLOCK_X + tx;
    const unsigned int sc = tid % OFFLOAD_TILE_COLS;
    const unsigned int sk = tid % OFFLOAD_TILE_K;
    const unsigned int gc = tile_col + sc;
    const bool col_ok = gc < cols;
    const unsigned int mc = col_ok ? offload_map(gc, m.col_div, m.col_mod) : 0u;
    const int r_steps = OFFLOAD_TILE_K * OFFLOAD_TILE_COLS / OFFLOAD_THREADS;
    const int l_steps = OFFLOAD_TILE_ROWS * OFFLOAD_TILE_K / OFFLOAD_THREADS;
    unsigned int mr[l_steps];
#pragma unroll
    for (int q = 0; q < l_steps; ++q) {
        const unsigned int gr =
            tile_row + tid / OFFLOAD_TILE_K + q * (OFFLOAD_THREADS / OFFLOAD_TILE_K);
        mr[q] = gr < rows ? offload_map(gr, m.row_div, m.row_mod) : OFFLOAD_NO_ROW;
    }
    for (unsigned int k0 = 0; k0 < m.rank; k0 += OFFLOAD_TILE_K) {
        // The previous chunk's (or term's) tiles are no longer read by anyone.
        __syncthreads();
#pragma unroll
        for (int q = 0; q < r_steps; ++q) {
            const unsigned int k =
                tid / OFFLOAD_TILE_COLS + q * (OFFLOAD_THREADS / OFFLOAD_TILE_COLS);
            const unsigned int gk = k0 + k;
            r_tile[k][sc] = (col_ok && gk < m.rank)
                ? offload_load_factor(m.right, m.right_dtype, (unsigned long long)gk * m.cols + mc)
                : 0.0f;
        }
        const unsigned int gk = k0 + sk;
#pragma unroll
        for (int q = 0; q < l_steps; ++q) {
            const unsigned int r = tid / OFFLOAD_TILE_K + q * (OFFLOAD_THREADS / OFFLOAD_TILE_K);
            l_tile[sk][r] = (mr[q] != OFFLOAD_NO_ROW && gk < m.rank)
                ? offload_load_factor(m.left, m.left_dtype, (unsigned long long)mr[q] * m.rank + gk)
                : 0.0f;
        }
        __syncthreads();
        const unsigned int left = m.rank - k0;
        const unsigned int kn = left < OFFLOAD_TILE_K ? left : OFFLOAD_TILE_K;
        offload_chunk_fma(t, r_tile, l_tile, kn, tx, ty);
    }
}

template <typename T>
__device__ __forceinline__ void offload_merge(const OffloadMergeParams& p) {
    __shared__ float r_tile[OFFLOAD_TILE_K][OFFLOAD_TILE_COLS];
    __shared__ float l_tile[OFFLOAD_TILE_K][OFFLOAD_TILE_ROWS + 1];

    const unsigned int tx = threadIdx.x;
    const unsigned int ty = threadIdx.y;
    const unsigned int tile_row = blockIdx.y * OFFLOAD_TILE_ROWS;
    const unsigned int tile_col = blockIdx.x * OFFLOAD_TILE_COLS;

    float acc[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS];
    float term[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS];
    float delta[OFFLOAD_PER_THREAD_ROWS][OFFLOAD_PER_THREAD_COLS];
#pragma unroll
    for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
        for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
            acc[i][j] = 0.0f;
        }
    }

    const unsigned int num_adapters = p.num_adapters < OFFLOAD_MERGE_MAX_ADAPTERS
        ? p.num_adapters
        : OFFLOAD_MERGE_MAX_ADAPTERS;
    // Every bound and branch below is the same for all threads of the block,
    // so every thread reaches every __syncthreads().
    for (unsigned int a = 0; a < num_adapters; ++a) {
        const OffloadMergeAdapter& ad = p.adapters[a];
        const unsigned int num_terms = ad.num_terms < 2 ? 1u : 2u;
        // delta = terms[0], or terms[0] .* terms[1] (one fp32 rounding).
        for (unsigned int k = 0; k < num_terms; ++k) {
            offload_term_tile(ad.terms[k], p.rows, p.cols, tile_row, tile_col, tx, ty, term,
                              r_tile, l_tile);
#pragma unroll
            for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
                for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                    delta[i][j] = k == 0 ? term[i][j] : delta[i][j] * term[i][j];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < OFFLOAD_PER_THREAD_ROWS; ++i) {
#pragma unroll
            for (int j = 0; j < OFFLOAD_PER_THREAD_COLS; ++j) {
                acc[i][j] = __fmaf_rn(ad.scale, delta[i][j], acc[i][j]);
            }
        }
    }

    offload_store_tile<T>(p.w, p.rows, p.cols, p.row0, tile_row, tile_col, tx, ty, acc);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS, 2)
offload_merge_f32(const OffloadMergeParams p) {
    offload_merge<float>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS, 2)
offload_merge_f16(const OffloadMergeParams p) {
    offload_merge<__half>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_THREADS, 2)
offload_merge_bf16(const OffloadMergeParams p) {
    offload_merge<__nv_bfloat16>(p);
}
