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
// Five kernels, each with one entry point per W type (f32, f16, bf16;
// kernel 1b two, one per rank limit), three of the low-rank ones also
// batched, each taking its parameter block by value and no dynamic shared
// memory.
//
// The low-rank kernels 1, 2, 2b and 2c (Delta = B A, up factor B [rows, rank], down factor
// A [rank, cols]) are written to stream W: the slice is cut into 32 x 128
// tiles (64 x 128 for 2b, 128 x 128 for 2c), a block of (256, 1, 1)
// threads ((512, 1, 1) for 2c) walks the tiles of one column strip
// (a grid of whole blocks per strip, sized by the runtime to fill the GPU),
// and lane l of warp w owns rows 4 w .. 4 w + 3 and columns 4 l .. 4 l + 3
// of a tile, so each warp instruction reads or writes 128 contiguous
// elements of one row (one 8- or 16-byte vector per thread where W's rows are
// aligned to it, element by element otherwise). Before a block merges a tile
// it loads its elements of the next one into registers, so W's reads stay in
// flight while the factors are staged and multiplied.
//
// 1. offload_lowrank_merge_*: in fp32 FMA, any factor dtypes. The ranks of all
//    adapters form one rank dimension, staged 32 at a time in shared memory
//    as fp32 (A's chunk [32][128], s * B's chunk transposed [32][32], the
//    scale folded into B in fp32), so four rank-8 adapters cost one chunk;
//    when the ranks add up to at most 32, A's chunk is staged once per block.
//    Per rank a thread reads 4 values of A and 4 of s B (two 16-byte shared
//    loads) for 16 FMAs. Three blocks per SM.
//
// 1b. offload_lowrank_merge_stream8_* and offload_lowrank_merge_stream32_*:
//    the same merge in fp32 FMA for stacks whose ranks add up to at most 8
//    or 32, with the scaled down factors in registers for the block's life
//    and no block-wide barrier, so that W streams as in a copy (see "Kernel
//    1b" below). One tensor per launch; the runtime takes them only when
//    asked for (`LowRankKernel::Streaming`, `offload bench merge --kernel
//    streaming`) until a GPU has timed them against kernel 1.
//
// 2. offload_lowrank_merge_mma_*: the same merge on the tensor cores, for
//    adapters whose two factors are both f16 or both bf16 (sm_80 and newer;
//    with OFFLOAD_MERGE_KERNEL=tensor-cores the runtime takes it when some
//    rank is 32 or more or the ranks add up to more than 32). Eight warps, each owning a 16 x 32 part of the tile as
//    4 mma.sync.m16n8k16 products with fp32 accumulation (the products of f16
//    or bf16 values are exact in fp32). Chunks of 32 ranks of B and A are
//    staged in shared memory as they are stored (pairs of 16-bit values along
//    the rank), zero-padded. Each adapter's product is accumulated on its own
//    and then scaled in fp32 (s is never folded into a 16-bit factor, which
//    would round it); the scaled sums go through shared memory (reusing the
//    staging space) to the threads that own W's elements. Two blocks per SM.
//
// 2b. offload_lowrank_merge_pipe_*: the same operands and the same merge on
//    the tensor cores, made for long rank dimensions and for W's reads to
//    overlap the staging of the factors: 64 x 128 tiles, the factors' rank
//    dimension streamed in stages of 32 ranks through a three-slot cp.async
//    pipeline (the stage two ahead in flight while one is multiplied, across
//    tiles too), fragments read with ldmatrix from XOR-swizzled slots, and
//    W read straight into the accumulators' layout (see "Kernel 2b" below).
//    The runtime's `auto` takes it for 16-bit factors from rank 16 up (timed
//    on an H200 against the other two; docs/benchmarks.md).
// 2c. offload_lowrank_merge_pipe_tall_*: kernel 2b on 128 x 128 tiles
//    (sixteen warps, one block per SM), so that each chunk of the down
//    factors is copied once per 128 rows of W instead of 64; the same bits
//    (see "Kernel 2c" below). Taken in 2b's place where the runtime is
//    configured for it (OFFLOAD_PIPE_ROWS=128).
//
//    The low-rank kernels also come batched (offload_lowrank_merge_batch_*,
//    offload_lowrank_merge_mma_batch_*, offload_lowrank_merge_pipe_batch_*,
//    offload_lowrank_merge_pipe_tall_batch_*): one launch merges up to
//    OFFLOAD_BATCH_MAX_JOBS = 16 tensors of one W type ("jobs", each with up
//    to OFFLOAD_BATCH_MAX_ADAPTERS = 4 adapters; 2504 bytes of parameters),
//    so a layer's merges cost one launch instead of one per tensor. Job j
//    owns a contiguous range of the grid's blocks (a prefix sum in the
//    parameters; the runtime gives each job the blocks a launch of that
//    tensor alone would have); a block finds its job by a linear scan of
//    the prefix sum and runs the same body as the one-tensor kernel, with
//    its index and count within the job in place of blockIdx.x and
//    gridDim.x. Each element's arithmetic is the one-tensor kernel's, so a
//    batched merge is bit-identical to the same merges launched one by one.
//
// 3. offload_merge_*: every delta the CPU merges, mixed in one launch, on a
//    grid of (ceil(cols / 64), ceil(rows / 64), 1) blocks of (16, 16, 1)
//    threads, one 64 x 64 tile per block. Each
//    adapter's delta is one matrix ("term") or the element-wise product of two,
//    each term read at mapped indices: T[(i / row_div) % row_mod,
//    (j / col_div) % col_mod], and each term stored whole or as a product
//    L R of two factors:
//      low-rank: up down                        (one term, identity maps)
//      LoHa:     (w1a w1b) .* (w2a w2b)         (two terms, identity maps)
//      LoKr:     kron(w1, w2), w1 [a, b], w2 [c, d]:
//                w1[i / c, j / d] .* w2[i % c, j % d]   (each side whole or a b)
//    Each thread owns 4 x 4 elements (rows ty + 16 i, columns tx + 16 j);
//    for every chunk of 32 ranks of a product the block stages the chunk's
//    32 x 64 tile of R and 64 x 32 tile of L in shared memory as fp32 (rows
//    of L and columns of R gathered through the maps); each term is
//    formed in fp32 registers, the two terms multiplied, scaled and added in
//    fp32, and W rounded once at the end. Up to 32 adapters per launch
//    (3352 bytes of parameters). Launch bounds of two blocks per SM: with
//    ptxas's default register target the terms' registers would spill.
//
// Only cuda_fp16.h and cuda_bf16.h are included, and only their types and
// scalar conversions are used, so NVRTC needs nothing else; the tensor-core
// instructions (mma, ldmatrix, cp.async) are inline PTX. When the source is
// not compiled by a CUDA compiler (the CPU emulation of tests/cuda_emulation),
// the includer provides offload_mma_f16, offload_mma_bf16, the five
// functions of kernel 2b's pipeline (offload_cp_async16 and the others),
// and kernel 1b's offload_vector_access and __syncwarp.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define OFFLOAD_MAX_ADAPTERS 8
// The batched low-rank kernels: at most this many tensors ("jobs") per
// launch, each with at most this many adapters.
#define OFFLOAD_BATCH_MAX_JOBS 16
#define OFFLOAD_BATCH_MAX_ADAPTERS 4
#define OFFLOAD_MERGE_MAX_ADAPTERS 32
#define OFFLOAD_TILE_ROWS 64
#define OFFLOAD_TILE_COLS 64
#define OFFLOAD_TILE_K 32
#define OFFLOAD_BLOCK_X 16
#define OFFLOAD_BLOCK_Y 16
#define OFFLOAD_THREADS (OFFLOAD_BLOCK_X * OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_ROWS (OFFLOAD_TILE_ROWS / OFFLOAD_BLOCK_Y)
#define OFFLOAD_PER_THREAD_COLS (OFFLOAD_TILE_COLS / OFFLOAD_BLOCK_X)
// The two low-rank kernels: 32 x 128 tiles, 256 threads, each thread 4 rows
// of 4 elements, ranks staged 32 at a time.
#define OFFLOAD_LR_TILE_ROWS 32
#define OFFLOAD_LR_TILE_COLS 128
#define OFFLOAD_LR_THREADS 256
#define OFFLOAD_LR_ROWS_PER_THREAD 4
#define OFFLOAD_LR_COLS_PER_THREAD 4
#define OFFLOAD_LR_K 32
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
static_assert(OFFLOAD_LR_TILE_ROWS == OFFLOAD_LR_ROWS_PER_THREAD * (OFFLOAD_LR_THREADS / 32) &&
                  OFFLOAD_LR_TILE_COLS == OFFLOAD_LR_COLS_PER_THREAD * 32 &&
                  OFFLOAD_LR_COLS_PER_THREAD == 4 && OFFLOAD_LR_ROWS_PER_THREAD == 4,
              "one warp per 4 rows of the tile, each lane 4 columns of them");
static_assert(OFFLOAD_LR_TILE_ROWS == 32 && OFFLOAD_LR_TILE_COLS == 128 && OFFLOAD_LR_K == 32 &&
                  OFFLOAD_LR_THREADS == 256,
              "the tensor-core kernel's warp layout (2 x 4 warps of 16 x 32) assumes these");

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

// One tensor of a batched launch: OffloadLowRankMergeParams with fewer
// adapters, so that OFFLOAD_BATCH_MAX_JOBS of them fit the parameter block.
// Must match offload_kernels::cuda::LowRankJobParams field for field.
struct OffloadLowRankJob {
    unsigned long long w;     // W's first element (row 0 of the whole weight)
    unsigned int rows;        // rows of the delta: the row slice's length
    unsigned int cols;        // columns of W viewed as a matrix
    unsigned int row0;        // first row of W the delta applies to
    unsigned int num_adapters;
    OffloadLowRankAdapter adapters[OFFLOAD_BATCH_MAX_ADAPTERS];
};

// The batched low-rank kernels' parameters: job j owns the blocks
// first_block[j] .. first_block[j + 1] - 1 of the grid (first_block[0] = 0,
// non-decreasing); blocks from first_block[num_jobs] on merge nothing. The
// jobs' row slices must not overlap (their blocks run concurrently). Must
// match offload_kernels::cuda::LowRankBatchParams field for field.
struct OffloadLowRankBatchParams {
    unsigned int num_jobs;
    unsigned int first_block[OFFLOAD_BATCH_MAX_JOBS + 1];
    OffloadLowRankJob jobs[OFFLOAD_BATCH_MAX_JOBS];
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
static_assert(sizeof(OffloadLowRankJob) == 24 + 32 * OFFLOAD_BATCH_MAX_ADAPTERS,
              "layout must match offload_kernels::cuda::LowRankJobParams");
static_assert(sizeof(OffloadLowRankBatchParams) ==
                  4 * (OFFLOAD_BATCH_MAX_JOBS + 2) + sizeof(OffloadLowRankJob) * OFFLOAD_BATCH_MAX_JOBS,
              "layout must match offload_kernels::cuda::LowRankBatchParams");
static_assert(sizeof(OffloadLowRankBatchParams) <= 4096,
              "a kernel's parameters must fit the 4 KiB every driver takes");
static_assert(OFFLOAD_BATCH_MAX_ADAPTERS <= OFFLOAD_MAX_ADAPTERS, "a job is a smaller launch");
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
// The two low-rank kernels share one layout, made for streaming W at memory
// bandwidth: a block of 256 threads merges 32 x 128 tiles of the slice, and
// thread (tx = tid % 32, ty = tid / 32) owns rows 4 ty .. 4 ty + 3 and
// columns 4 tx .. 4 tx + 3 of a tile, so a warp reads and writes 4 x 32
// contiguous elements of one row at a time (8 or 16 bytes per thread). A
// block walks down one column strip (offload_lr_walk): it loads the next
// tile's elements of W into registers before it merges the current one, so
// W's reads stay in flight while the factors are staged and multiplied.

// Raw storage of a thread's elements of W: 4 rows of 4 elements, as 32-bit
// words (two 16-bit elements per word, the lower index in the lower half).
template <typename T> struct OffloadWFrag {
    static constexpr int kWords = (int)sizeof(T);  // 4 elements of sizeof(T) bytes
    unsigned int w[OFFLOAD_LR_ROWS_PER_THREAD][kWords];
};

struct alignas(8) OffloadU32x2 {
    unsigned int x, y;
};
struct alignas(16) OffloadU32x4 {
    unsigned int x, y, z, w;
};
struct alignas(16) OffloadF32x4 {
    float x, y, z, w;
};

// Raw bits of W's element type <-> fp32 (to T rounded to nearest, ties to even).
template <typename T> struct OffloadBits;
template <> struct OffloadBits<float> {
    static __device__ __forceinline__ float get(unsigned int b) {
        union {
            unsigned int u;
            float f;
        } x;
        x.u = b;
        return x.f;
    }
    static __device__ __forceinline__ unsigned int put(float v) {
        union {
            unsigned int u;
            float f;
        } x;
        x.f = v;
        return x.u;
    }
};
template <> struct OffloadBits<__half> {
    static __device__ __forceinline__ float get(unsigned int b) {
        union {
            unsigned short u;
            __half h;
        } x;
        x.u = (unsigned short)b;
        return __half2float(x.h);
    }
    static __device__ __forceinline__ unsigned int put(float v) {
        union {
            unsigned short u;
            __half h;
        } x;
        x.h = __float2half_rn(v);
        return x.u;
    }
};
template <> struct OffloadBits<__nv_bfloat16> {
    static __device__ __forceinline__ float get(unsigned int b) {
        union {
            unsigned short u;
            __nv_bfloat16 h;
        } x;
        x.u = (unsigned short)b;
        return __bfloat162float(x.h);
    }
    static __device__ __forceinline__ unsigned int put(float v) {
        union {
            unsigned short u;
            __nv_bfloat16 h;
        } x;
        x.h = __float2bfloat16_rn(v);
        return x.u;
    }
};

// Element j of W's elements held as raw 32-bit words (two 16-bit elements
// per word, the lower index in the lower half), as fp32.
template <typename T, int N>
__device__ __forceinline__ float offload_words_get(const unsigned int (&w)[N], int j) {
    if constexpr (sizeof(T) == 2) {
        return OffloadBits<T>::get((w[j / 2] >> (16 * (j % 2))) & 0xffffu);
    } else {
        return OffloadBits<T>::get(w[j]);
    }
}

// Sets element j of such words to v, rounded to T (to nearest, ties to even).
template <typename T, int N>
__device__ __forceinline__ void offload_words_set(unsigned int (&w)[N], int j, float v) {
    if constexpr (sizeof(T) == 2) {
        const unsigned int shift = 16 * (j % 2);
        w[j / 2] = (w[j / 2] & ~(0xffffu << shift)) | (OffloadBits<T>::put(v) << shift);
    } else {
        w[j] = OffloadBits<T>::put(v);
    }
}

// Where a thread's elements of W are, and whether whole rows of 4 can move as
// one vector (W's row slice and every row start aligned to the vector).
struct OffloadWPlace {
    unsigned long long base;  // byte address of W[row0 + tile_row + 4 ty, tile_col + 4 tx]
    unsigned long long row_bytes;
    unsigned int rows_here;   // rows of the 4 inside the slice
    unsigned int cols_here;   // columns of the 4 inside the slice
    bool vec;                 // all 4 columns inside and aligned: one vector per row
};

template <typename T>
__device__ __forceinline__ OffloadWPlace offload_w_place(unsigned long long w, unsigned int rows,
                                                         unsigned int cols, unsigned int row0,
                                                         unsigned int tile_row,
                                                         unsigned int tile_col, unsigned int tx,
                                                         unsigned int ty) {
    OffloadWPlace pl;
    const unsigned int r = tile_row + OFFLOAD_LR_ROWS_PER_THREAD * ty;
    const unsigned int c = tile_col + OFFLOAD_LR_COLS_PER_THREAD * tx;
    pl.row_bytes = (unsigned long long)cols * sizeof(T);
    pl.base = w + ((unsigned long long)(row0 + r) * cols + c) * sizeof(T);
    pl.rows_here = r >= rows ? 0u
                             : (rows - r < OFFLOAD_LR_ROWS_PER_THREAD ? rows - r
                                                                      : OFFLOAD_LR_ROWS_PER_THREAD);
    pl.cols_here = c >= cols ? 0u
                             : (cols - c < OFFLOAD_LR_COLS_PER_THREAD ? cols - c
                                                                      : OFFLOAD_LR_COLS_PER_THREAD);
    const unsigned long long vec_bytes = 4 * sizeof(T);
    pl.vec = pl.cols_here == OFFLOAD_LR_COLS_PER_THREAD && pl.base % vec_bytes == 0 &&
             pl.row_bytes % vec_bytes == 0;
    return pl;
}

// A place with no element of W: the thread loads and stores nothing.
__device__ __forceinline__ OffloadWPlace offload_w_nowhere() {
    OffloadWPlace pl;
    pl.base = 0;
    pl.row_bytes = 0;
    pl.rows_here = 0;
    pl.cols_here = 0;
    pl.vec = false;
    return pl;
}

// The tiles of the slice one block of a low-rank kernel merges, for the
// block `block` of the `blocks` that merge this slice (blockIdx.x and
// gridDim.x for a launch of one tensor; the block's index and count within
// its job in a batched launch): the column strip block % tiles_x, and in it
// the row tiles y, y + step, ... from y = block / tiles_x, with
// step = blocks / tiles_x. The launcher makes `blocks` a multiple of tiles_x,
// at most tiles_x * tiles_y; blocks past the last whole multiple get no tile
// (so no tile is merged twice). cols must be positive (no launch or job has
// an empty row: a guard for it here costs the fp32 FMA kernel registers).
struct OffloadLrWalk {
    unsigned int tile_col;
    unsigned int y;
    unsigned int step;
    unsigned int tiles_y;
};

__device__ __forceinline__ OffloadLrWalk offload_lr_walk(unsigned int rows, unsigned int cols,
                                                         unsigned int block, unsigned int blocks,
                                                         unsigned int tile_rows = OFFLOAD_LR_TILE_ROWS) {
    const unsigned int tiles_x = (cols + OFFLOAD_LR_TILE_COLS - 1) / OFFLOAD_LR_TILE_COLS;
    OffloadLrWalk w;
    w.tiles_y = (rows + tile_rows - 1) / tile_rows;
    w.tile_col = (block % tiles_x) * OFFLOAD_LR_TILE_COLS;
    w.y = block / tiles_x;
    w.step = blocks / tiles_x;
    if (w.step == 0 || block >= tiles_x * w.step) {
        w.step = 1;
        w.y = w.tiles_y;
    }
    return w;
}

// Loads the thread's elements of W (zeros outside the slice).
template <typename T>
__device__ __forceinline__ void offload_load_w(OffloadWFrag<T>& f, const OffloadWPlace& pl) {
#pragma unroll
    for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
#pragma unroll
        for (int q = 0; q < OffloadWFrag<T>::kWords; ++q) {
            f.w[i][q] = 0u;
        }
        if ((unsigned int)i >= pl.rows_here) {
            continue;
        }
        const unsigned long long at = pl.base + i * pl.row_bytes;
        if (pl.vec) {
            if constexpr (sizeof(T) == 2) {
                const OffloadU32x2 v = *reinterpret_cast<const OffloadU32x2*>(at);
                f.w[i][0] = v.x;
                f.w[i][1] = v.y;
            } else {
                const OffloadU32x4 v = *reinterpret_cast<const OffloadU32x4*>(at);
                f.w[i][0] = v.x;
                f.w[i][1] = v.y;
                f.w[i][2] = v.z;
                f.w[i][3] = v.w;
            }
        } else {
            for (unsigned int j = 0; j < pl.cols_here; ++j) {
                if constexpr (sizeof(T) == 2) {
                    const unsigned int bits = reinterpret_cast<const unsigned short*>(at)[j];
                    f.w[i][j / 2] |= bits << (16 * (j % 2));
                } else {
                    f.w[i][j] = reinterpret_cast<const unsigned int*>(at)[j];
                }
            }
        }
    }
}

// Stores the thread's elements of W back (only those inside the slice).
template <typename T>
__device__ __forceinline__ void offload_store_w(const OffloadWFrag<T>& f, const OffloadWPlace& pl) {
#pragma unroll
    for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
        if ((unsigned int)i >= pl.rows_here) {
            continue;
        }
        const unsigned long long at = pl.base + i * pl.row_bytes;
        if (pl.vec) {
            if constexpr (sizeof(T) == 2) {
                OffloadU32x2 v;
                v.x = f.w[i][0];
                v.y = f.w[i][1];
                *reinterpret_cast<OffloadU32x2*>(at) = v;
            } else {
                OffloadU32x4 v;
                v.x = f.w[i][0];
                v.y = f.w[i][1];
                v.z = f.w[i][2];
                v.w = f.w[i][3];
                *reinterpret_cast<OffloadU32x4*>(at) = v;
            }
        } else {
            for (unsigned int j = 0; j < pl.cols_here; ++j) {
                if constexpr (sizeof(T) == 2) {
                    reinterpret_cast<unsigned short*>(at)[j] =
                        (unsigned short)(f.w[i][j / 2] >> (16 * (j % 2)));
                } else {
                    reinterpret_cast<unsigned int*>(at)[j] = f.w[i][j];
                }
            }
        }
    }
}

// W += acc for the thread's elements: one fp32 add, one rounding to T.
template <typename T>
__device__ __forceinline__ void offload_add_w(
    OffloadWFrag<T>& f,
    const float (&acc)[OFFLOAD_LR_ROWS_PER_THREAD][OFFLOAD_LR_COLS_PER_THREAD]) {
#pragma unroll
    for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
#pragma unroll
        for (int j = 0; j < OFFLOAD_LR_COLS_PER_THREAD; ++j) {
            offload_words_set<T>(f.w[i], j, offload_words_get<T>(f.w[i], j) + acc[i][j]);
        }
    }
}

// acc[i][j] += sum over k < kn of b_s[k][4 ty + i] * a_s[k][4 tx + j]: one
// staged chunk, in fp32 FMA, in rank order.
__device__ __forceinline__ void offload_lr_chunk_fma(
    float (&acc)[OFFLOAD_LR_ROWS_PER_THREAD][OFFLOAD_LR_COLS_PER_THREAD],
    const float (*a_s)[OFFLOAD_LR_TILE_COLS], const float (*b_s)[OFFLOAD_LR_TILE_ROWS],
    unsigned int kn, unsigned int tx, unsigned int ty) {
#pragma unroll 4
    for (unsigned int k = 0; k < kn; ++k) {
        const OffloadF32x4 av =
            *reinterpret_cast<const OffloadF32x4*>(&a_s[k][OFFLOAD_LR_COLS_PER_THREAD * tx]);
        const OffloadF32x4 bv =
            *reinterpret_cast<const OffloadF32x4*>(&b_s[k][OFFLOAD_LR_ROWS_PER_THREAD * ty]);
        const float a[4] = {av.x, av.y, av.z, av.w};
        const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
#pragma unroll
            for (int j = 0; j < OFFLOAD_LR_COLS_PER_THREAD; ++j) {
                acc[i][j] = __fmaf_rn(b[i], a[j], acc[i][j]);
            }
        }
    }
}

// Stages `take` (at most 32) ranks of one factor into a shared chunk
// dst[k][x] (x < N: the tile's columns of A, or its rows of B), as fp32 times
// `scale`, zero outside the slice. Element (k, x) is read at
// base + first + k * k_stride + x * x_stride (x counted from the tile's
// start, `origin`, and inside the slice while origin + x < limit). Thread
// `tid` takes elements tid + 256 q (q < Q), x fastest, in batches of four
// whose loads are all issued before the batch's shared stores (so a batch
// costs one round trip, and few registers).
template <int Q, int N>
__device__ __forceinline__ void offload_stage_chunk(float* dst, unsigned long long base,
                                                    unsigned int dtype, float scale,
                                                    unsigned int take, unsigned int tid,
                                                    unsigned int origin, unsigned int limit,
                                                    unsigned long long first,
                                                    unsigned long long k_stride,
                                                    unsigned long long x_stride) {
    constexpr int B = Q < 4 ? Q : 4;
    static_assert(Q % B == 0, "whole batches");
    const bool f32 = dtype == OFFLOAD_DTYPE_F32;
    const bool bf16 = dtype == OFFLOAD_DTYPE_BF16;
#pragma unroll 1
    for (int q0 = 0; q0 < Q; q0 += B) {
        if ((tid + q0 * OFFLOAD_LR_THREADS) / N >= take) {
            break;  // this thread's later elements are past the chunk too
        }
        float v[B];
        if (f32) {
            const float* f = reinterpret_cast<const float*>(base);
#pragma unroll
            for (int q = 0; q < B; ++q) {
                const unsigned int idx = tid + (q0 + q) * OFFLOAD_LR_THREADS;
                const unsigned int k = idx / N;
                const unsigned int x = idx % N;
                v[q] = (k < take && origin + x < limit) ? f[first + k * k_stride + x * x_stride]
                                                        : 0.0f;
            }
        } else {
            const unsigned short* h = reinterpret_cast<const unsigned short*>(base);
            unsigned int bits[B];
#pragma unroll
            for (int q = 0; q < B; ++q) {
                const unsigned int idx = tid + (q0 + q) * OFFLOAD_LR_THREADS;
                const unsigned int k = idx / N;
                const unsigned int x = idx % N;
                bits[q] = (k < take && origin + x < limit) ? h[first + k * k_stride + x * x_stride]
                                                           : 0u;
            }
#pragma unroll
            for (int q = 0; q < B; ++q) {
                v[q] = bf16 ? OffloadBits<__nv_bfloat16>::get(bits[q])
                            : OffloadBits<__half>::get(bits[q]);
            }
        }
#pragma unroll
        for (int q = 0; q < B; ++q) {
            const unsigned int idx = tid + (q0 + q) * OFFLOAD_LR_THREADS;
            const unsigned int k = idx / N;
            if (k < take) {
                dst[k * N + idx % N] = scale * v[q];
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Kernel 1: low-rank deltas in fp32 FMA.
//
// The ranks of all adapters are taken as one concatenated rank dimension and
// staged in chunks of 32: a_s[k][c] = A[k, tile_col + c] and b_s[k][r] =
// s * B[tile_row + r, k] (s folded in fp32), so four rank-8 adapters cost
// one chunk, not four padded ones. Each thread then accumulates its 4 x 4
// sums with one 16-byte shared load of A (its 4 columns) and one of s B (its
// 4 rows) per rank. When the ranks add up to at most 32, A's chunk depends
// only on the column strip, so it is staged once per block and kept.

// The fp32 kernel's shared memory: a chunk of A and of s B (transposed).
struct alignas(16) OffloadLrTiles {
    float a[OFFLOAD_LR_K][OFFLOAD_LR_TILE_COLS];
    float b[OFFLOAD_LR_K][OFFLOAD_LR_TILE_ROWS];
};

// The merge of one slice (P: OffloadLowRankMergeParams, or one
// OffloadLowRankJob of a batch) by block `block` of the `blocks` that merge
// it (offload_lr_walk).
template <typename T, typename P>
__device__ __forceinline__ void offload_lowrank_merge(const P& p, unsigned int block,
                                                      unsigned int blocks) {
    constexpr unsigned int kMaxAdapters = sizeof(P::adapters) / sizeof(OffloadLowRankAdapter);
    __shared__ OffloadLrTiles sh;
    float (*a_s)[OFFLOAD_LR_TILE_COLS] = sh.a;
    float (*b_s)[OFFLOAD_LR_TILE_ROWS] = sh.b;

    const unsigned int tid = threadIdx.x;
    const unsigned int tx = tid % 32;
    const unsigned int ty = tid / 32;
    const OffloadLrWalk walk = offload_lr_walk(p.rows, p.cols, block, blocks);
    if (walk.y >= walk.tiles_y) {
        return;  // the whole block: no tile for it (the launcher avoids this)
    }
    const unsigned int num_adapters = p.num_adapters < kMaxAdapters ? p.num_adapters : kMaxAdapters;
    unsigned long long total_rank = 0;
    for (unsigned int a = 0; a < num_adapters; ++a) {
        total_rank += p.adapters[a].rank;
    }
    const bool keep_a = total_rank <= OFFLOAD_LR_K;
    bool a_staged = false;

    OffloadWPlace pl = offload_w_place<T>(p.w, p.rows, p.cols, p.row0,
                                          walk.y * OFFLOAD_LR_TILE_ROWS, walk.tile_col, tx, ty);
    OffloadWFrag<T> wf;
    offload_load_w<T>(wf, pl);

    // Every bound below is the same for all threads of the block, so every
    // thread reaches every barrier.
    for (unsigned int y = walk.y; y < walk.tiles_y; y += walk.step) {
        const unsigned int tile_row = y * OFFLOAD_LR_TILE_ROWS;
        // The next tile's W is read while this one is merged.
        const unsigned int ny = y + walk.step;
        const OffloadWPlace pn = ny < walk.tiles_y
            ? offload_w_place<T>(p.w, p.rows, p.cols, p.row0, ny * OFFLOAD_LR_TILE_ROWS,
                                 walk.tile_col, tx, ty)
            : offload_w_nowhere();
        OffloadWFrag<T> wn;
        offload_load_w<T>(wn, pn);

        float acc[OFFLOAD_LR_ROWS_PER_THREAD][OFFLOAD_LR_COLS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
#pragma unroll
            for (int j = 0; j < OFFLOAD_LR_COLS_PER_THREAD; ++j) {
                acc[i][j] = 0.0f;
            }
        }
        // Ranks staged in the current chunk.
        unsigned int fill = 0;
        for (unsigned int a = 0; a < num_adapters; ++a) {
            const OffloadLowRankAdapter ad = p.adapters[a];
            unsigned int k0 = 0;
            while (k0 < ad.rank) {
                const unsigned int room = OFFLOAD_LR_K - fill;
                const unsigned int take = ad.rank - k0 < room ? ad.rank - k0 : room;
                if (fill == 0) {
                    // The previous chunk (or tile) is no longer read by anyone.
                    __syncthreads();
                }
                if (!(keep_a && a_staged)) {
                    offload_stage_chunk<OFFLOAD_LR_K * OFFLOAD_LR_TILE_COLS / OFFLOAD_LR_THREADS,
                                        OFFLOAD_LR_TILE_COLS>(
                        a_s[fill], ad.down, ad.down_dtype, 1.0f, take, tid, walk.tile_col,
                        p.cols, (unsigned long long)k0 * p.cols + walk.tile_col, p.cols, 1);
                }
                // Rows fastest: the transposing stores hit 32 different banks.
                offload_stage_chunk<OFFLOAD_LR_K * OFFLOAD_LR_TILE_ROWS / OFFLOAD_LR_THREADS,
                                    OFFLOAD_LR_TILE_ROWS>(
                    b_s[fill], ad.up, ad.up_dtype, ad.scale, take, tid, tile_row, p.rows,
                    (unsigned long long)tile_row * ad.rank + k0, 1, ad.rank);
                fill += take;
                k0 += take;
                if (fill == OFFLOAD_LR_K) {
                    __syncthreads();
                    offload_lr_chunk_fma(acc, a_s, b_s, fill, tx, ty);
                    fill = 0;
                }
            }
        }
        if (fill > 0) {
            __syncthreads();
            offload_lr_chunk_fma(acc, a_s, b_s, fill, tx, ty);
        }
        a_staged = true;

        offload_add_w<T>(wf, acc);
        offload_store_w<T>(wf, pl);
        wf = wn;
        pl = pn;
    }
}

// The job of a batched launch that block `b` belongs to (the last j with
// first_block[j] <= b), in `job`; false when b is past every job's blocks.
// A linear scan of at most OFFLOAD_BATCH_MAX_JOBS - 1 values of the
// parameter block, the same for every thread of a block.
__device__ __forceinline__ bool offload_batch_job(const OffloadLowRankBatchParams& p,
                                                  unsigned int b, unsigned int& job) {
    const unsigned int n = p.num_jobs < OFFLOAD_BATCH_MAX_JOBS ? p.num_jobs : OFFLOAD_BATCH_MAX_JOBS;
    if (n == 0 || b >= p.first_block[n]) {
        return false;
    }
    unsigned int j = 0;
#pragma unroll
    for (unsigned int k = 1; k < OFFLOAD_BATCH_MAX_JOBS; ++k) {
        if (k < n && b >= p.first_block[k]) {
            j = k;
        }
    }
    job = j;
    return true;
}

// Three blocks per SM (at most 80 registers; ptxas spills 12 bytes for
// 16-bit W on sm_90, none on sm_80, and 44 for f32): more of W's reads in
// flight.
extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<float>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<__half>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge<__nv_bfloat16>(p, blockIdx.x, gridDim.x);
}

// Batched: each block merges its part of its job, as the one-tensor kernel
// would with the job's blocks as its grid.
template <typename T>
__device__ __forceinline__ void offload_lowrank_merge_batch(const OffloadLowRankBatchParams& p) {
    unsigned int j;
    if (!offload_batch_job(p, blockIdx.x, j)) {
        return;  // past the last job's blocks
    }
    offload_lowrank_merge<T>(p.jobs[j], blockIdx.x - p.first_block[j],
                             p.first_block[j + 1] - p.first_block[j]);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_batch_f32(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_batch<float>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_batch_f16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_batch<__half>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 3)
offload_lowrank_merge_batch_bf16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_batch<__nv_bfloat16>(p);
}

// ---------------------------------------------------------------------------
// Kernel 1b: low-rank deltas in fp32 FMA for small stacks, written to move W
// at memory speed with no block-wide barrier: offload_lowrank_merge_stream8_*
// (the ranks of all adapters adding up to at most 8) and
// offload_lowrank_merge_stream32_* (at most 32).
//
// A block of 256 threads owns one column strip of 32 * CPT columns: lane l
// of every warp owns the CPT consecutive columns l * CPT .. l * CPT + CPT - 1
// of the strip, and the block's warps walk the strip's groups of RPT rows,
// each warp on its own (warp w of block y of the strip takes the groups
// 8 y + w, then every 8 * (blocks per strip)). The strip's down factors
// stay in registers for the block's life, scaled: a[k][c] = s * A[k, col c]
// over the concatenated rank k < KMAX (zero past the ranks' sum), so an
// element costs KMAX FMAs from registers and no load of A. The up factors'
// values of a group's rows are the same for every lane of the warp: lane l
// loads rank k = l % KMAX of rows l / KMAX, l / KMAX + 32 / KMAX, ... (so a
// warp reads 32 consecutive ranks of a row at a time), as fp32, into a slot
// of the warp's own shared buffer, and every lane then reads them back as
// broadcasts (two slots: one __syncwarp per group). Before a warp merges a
// group it loads the next group's W and up-factor values, so W's reads stay
// in flight while it computes.
//   stream8:  CPT 8, RPT 2 (16-byte rows for 16-bit W, 32-byte for f32)
//   stream32: CPT 2, RPT 8 (4-byte rows for 16-bit W, 8-byte for f32)
// f32 W takes half the rows per group (the same bytes in flight). Two
// blocks per SM (at most 128 registers, 64 of them A's values; with NVRTC
// 13.5 for sm_90 every entry point fits them with no spill and no stack
// frame, where 4 rows a group for stream8 spilled).

#define OFFLOAD_ST_THREADS 256
#define OFFLOAD_ST_WARPS (OFFLOAD_ST_THREADS / 32)

// One row of a lane's CPT elements of W, as raw 32-bit words (two 16-bit
// elements per word, the lower index in the lower half).
template <typename T, int CPT> struct OffloadStRow {
    static constexpr int kWords = CPT * (int)sizeof(T) / 4;
    static_assert(kWords >= 1, "whole 32-bit words");
    unsigned int w[kWords];
};

// Bytes one vector access of a row moves: the whole row, at most 16.
template <typename T, int CPT> __device__ constexpr unsigned int offload_st_vec_bytes() {
    return CPT * sizeof(T) < 16 ? (unsigned int)(CPT * sizeof(T)) : 16u;
}

// A vector access of `bytes` at `at` (the CPU emulation checks its alignment,
// which a GPU would fault on).
#if defined(__CUDACC__)
__device__ __forceinline__ void offload_vector_access(unsigned long long, unsigned int) {}
#endif

template <int N>
__device__ __forceinline__ void offload_st_ld_words(unsigned int (&w)[N], unsigned long long at) {
    offload_vector_access(at, N % 4 == 0 ? 16u : 4u * N);
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const OffloadU32x4 v = reinterpret_cast<const OffloadU32x4*>(at)[q];
            w[4 * q] = v.x;
            w[4 * q + 1] = v.y;
            w[4 * q + 2] = v.z;
            w[4 * q + 3] = v.w;
        }
    } else if constexpr (N == 2) {
        const OffloadU32x2 v = *reinterpret_cast<const OffloadU32x2*>(at);
        w[0] = v.x;
        w[1] = v.y;
    } else {
        static_assert(N == 1, "rows of 1, 2 or a multiple of 4 words");
        w[0] = *reinterpret_cast<const unsigned int*>(at);
    }
}

template <int N>
__device__ __forceinline__ void offload_st_st_words(const unsigned int (&w)[N], unsigned long long at) {
    offload_vector_access(at, N % 4 == 0 ? 16u : 4u * N);
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            OffloadU32x4 v;
            v.x = w[4 * q];
            v.y = w[4 * q + 1];
            v.z = w[4 * q + 2];
            v.w = w[4 * q + 3];
            reinterpret_cast<OffloadU32x4*>(at)[q] = v;
        }
    } else if constexpr (N == 2) {
        OffloadU32x2 v;
        v.x = w[0];
        v.y = w[1];
        *reinterpret_cast<OffloadU32x2*>(at) = v;
    } else {
        static_assert(N == 1, "rows of 1, 2 or a multiple of 4 words");
        *reinterpret_cast<unsigned int*>(at) = w[0];
    }
}

// Where a lane's columns are in every row of the slice.
struct OffloadStLane {
    unsigned long long w;          // W's first element
    unsigned long long row_bytes;  // bytes per row of W
    unsigned long long col_bytes;  // bytes from a row's start to the lane's first column
    unsigned int row0;             // the slice's first row in W
    unsigned int rows;             // the slice's rows
    unsigned int cols_here;        // the lane's columns inside W (0 .. CPT)
    bool vec;                      // whole rows of CPT, vector-aligned: vector accesses
};

// Loads rows r_first .. r_first + R - 1 of the lane's columns (zeros
// outside the slice).
template <typename T, int CPT, int R>
__device__ __forceinline__ void offload_st_load(OffloadStRow<T, CPT> (&f)[R], const OffloadStLane& ln,
                                                unsigned int r_first) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
#pragma unroll
        for (int q = 0; q < OffloadStRow<T, CPT>::kWords; ++q) {
            f[i].w[q] = 0u;
        }
        const unsigned int r = r_first + i;
        if (r >= ln.rows || ln.cols_here == 0) {
            continue;
        }
        const unsigned long long at = ln.w + (unsigned long long)(ln.row0 + r) * ln.row_bytes + ln.col_bytes;
        if (ln.vec) {
            offload_st_ld_words(f[i].w, at);
        } else {
            // Constant indices (unrolled, each column guarded): a register
            // array indexed at run time would live in local memory.
#pragma unroll
            for (unsigned int j = 0; j < (unsigned int)CPT; ++j) {
                if (j >= ln.cols_here) {
                    break;
                }
                if constexpr (sizeof(T) == 2) {
                    const unsigned int bits = reinterpret_cast<const unsigned short*>(at)[j];
                    f[i].w[j / 2] |= bits << (16 * (j % 2));
                } else {
                    f[i].w[j] = reinterpret_cast<const unsigned int*>(at)[j];
                }
            }
        }
    }
}

// Stores rows r_first .. back (only the elements inside the slice).
template <typename T, int CPT, int R>
__device__ __forceinline__ void offload_st_store(const OffloadStRow<T, CPT> (&f)[R], const OffloadStLane& ln,
                                                 unsigned int r_first) {
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const unsigned int r = r_first + i;
        if (r >= ln.rows || ln.cols_here == 0) {
            continue;
        }
        const unsigned long long at = ln.w + (unsigned long long)(ln.row0 + r) * ln.row_bytes + ln.col_bytes;
        if (ln.vec) {
            offload_st_st_words(f[i].w, at);
        } else {
#pragma unroll
            for (unsigned int j = 0; j < (unsigned int)CPT; ++j) {
                if (j >= ln.cols_here) {
                    break;
                }
                if constexpr (sizeof(T) == 2) {
                    reinterpret_cast<unsigned short*>(at)[j] = (unsigned short)(f[i].w[j / 2] >> (16 * (j % 2)));
                } else {
                    reinterpret_cast<unsigned int*>(at)[j] = f[i].w[j];
                }
            }
        }
    }
}

// The warps' up-factor values of their groups' rows, two slots each.
template <int R, int KMAX> struct alignas(16) OffloadStUp {
    float v[OFFLOAD_ST_WARPS][2][R][KMAX];
};

// The adapter that rank k of the concatenated rank dimension belongs to, and
// k's index within it; false when k is past the ranks' sum.
template <typename P>
__device__ __forceinline__ bool offload_st_rank(const P& p, unsigned int num_adapters, unsigned int k,
                                                unsigned int& adapter, unsigned int& index) {
    unsigned int first = 0;
    for (unsigned int a = 0; a < num_adapters; ++a) {
        const unsigned int rank = p.adapters[a].rank;
        if (k < first + rank) {
            adapter = a;
            index = k - first;
            return true;
        }
        first += rank;
    }
    return false;
}

// Where the lane whose first column of W is c0 finds its columns.
template <typename T, int CPT, typename P>
__device__ __forceinline__ OffloadStLane offload_st_lane(const P& p, unsigned int c0) {
    OffloadStLane ln;
    ln.w = p.w;
    ln.row_bytes = (unsigned long long)p.cols * sizeof(T);
    ln.col_bytes = (unsigned long long)c0 * sizeof(T);
    ln.row0 = p.row0;
    ln.rows = p.rows;
    ln.cols_here = c0 >= p.cols ? 0u : (p.cols - c0 < (unsigned int)CPT ? p.cols - c0 : (unsigned int)CPT);
    constexpr unsigned int vb = offload_st_vec_bytes<T, CPT>();
    ln.vec = ln.cols_here == (unsigned int)CPT &&
             (ln.w + (unsigned long long)p.row0 * ln.row_bytes + ln.col_bytes) % vb == 0 &&
             ln.row_bytes % vb == 0;
    return ln;
}

// A lane's share of the up factors' values of a group of R rows: rank
// my_k = lane % KMAX of rows lane / KMAX, lane / KMAX + 32 / KMAX, ... (Q
// values; lanes past R rows load none), loaded as fp32 and staged into
// the warp's shared slot [row of the group][rank].
template <int R, int KMAX> struct OffloadStUpLane {
    static constexpr int Q = R * KMAX < 32 ? 1 : R * KMAX / 32;
    unsigned int lane, my_k, up_index, up_dtype, up_rank;
    unsigned long long up_base;
    bool up_here;

    template <typename P>
    __device__ __forceinline__ OffloadStUpLane(const P& p, unsigned int num_adapters, unsigned int lane_)
        : lane(lane_), my_k(lane_ % KMAX), up_index(0) {
        unsigned int up_adapter = 0;
        up_here = offload_st_rank(p, num_adapters, my_k, up_adapter, up_index);
        up_base = p.adapters[up_adapter].up;
        up_dtype = p.adapters[up_adapter].up_dtype;
        up_rank = p.adapters[up_adapter].rank;
    }

    // Group h's values (zeros past the slice's `rows`).
    __device__ __forceinline__ void load(float (&v)[Q], unsigned int h, unsigned int rows) const {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const unsigned int i = lane / KMAX + q * (32 / KMAX);
            const unsigned int r = h * R + i;
            v[q] = up_here && i < (unsigned int)R && r < rows
                       ? offload_load_factor(up_base, up_dtype, (unsigned long long)r * up_rank + up_index)
                       : 0.0f;
        }
    }

    __device__ __forceinline__ void stage(float (*slot)[KMAX], const float (&v)[Q]) const {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const unsigned int i = lane / KMAX + q * (32 / KMAX);
            if (i < (unsigned int)R) {
                slot[i][my_k] = v[q];
            }
        }
    }
};

// The merge of one slice by block `block` of the `blocks` that merge it.
// The caller guarantees that the ranks add up to at most KMAX.
template <typename T, int CPT, int RPT16, int KMAX, typename P>
__device__ __forceinline__ void offload_lowrank_merge_stream(const P& p, unsigned int block,
                                                             unsigned int blocks) {
    constexpr int R = sizeof(T) == 4 ? RPT16 / 2 : RPT16;  // rows per group
    constexpr int SW = 32 * CPT;                           // columns per strip
    // Up-factor values a lane loads per group (lanes past R rows load none).
    constexpr int Q = R * KMAX < 32 ? 1 : R * KMAX / 32;
    static_assert(32 % KMAX == 0 && (R * KMAX < 32 || (R * KMAX) % 32 == 0),
                  "whole up-factor loads per lane");
    static_assert(KMAX % 4 == 0, "up-factor values read back four at a time");
    constexpr unsigned int kMaxAdapters = sizeof(P::adapters) / sizeof(OffloadLowRankAdapter);
    // The warps' up-factor slots: [warp][slot][row of the group][rank].
    __shared__ OffloadStUp<R, KMAX> up_sh;
    float (*b_sh)[2][R][KMAX] = up_sh.v;

    const unsigned int lane = threadIdx.x % 32;
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int tiles_x = (p.cols + SW - 1) / SW;
    const unsigned int per_strip = blocks / tiles_x;
    if (per_strip == 0 || block >= tiles_x * per_strip) {
        return;  // no strip for this block (the launcher avoids this)
    }
    const unsigned int groups = (p.rows + R - 1) / R;
    const unsigned int gstep = per_strip * OFFLOAD_ST_WARPS;
    unsigned int g = (block / tiles_x) * OFFLOAD_ST_WARPS + warp;
    if (g >= groups) {
        return;  // the whole warp: no group for it
    }
    const unsigned int num_adapters = p.num_adapters < kMaxAdapters ? p.num_adapters : kMaxAdapters;

    const unsigned int c0 = (block % tiles_x) * SW + lane * CPT;
    const OffloadStLane ln = offload_st_lane<T, CPT>(p, c0);

    // The first group's W, in flight while A is read.
    OffloadStRow<T, CPT> cur[R];
    offload_st_load<T, CPT, R>(cur, ln, g * R);

    // This lane's rank of the up factors, the same for every group.
    const OffloadStUpLane<R, KMAX> up(p, num_adapters, lane);

    // A's values for the lane's columns, scaled (zeros past the ranks' sum
    // and outside W).
    float a[KMAX][CPT];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
        unsigned int ad = 0, idx = 0;
        const bool here = offload_st_rank(p, num_adapters, (unsigned int)k, ad, idx);
        const OffloadLowRankAdapter& A = p.adapters[ad];
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            a[k][c] = here && (unsigned int)c < ln.cols_here
                          ? A.scale * offload_load_factor(A.down, A.down_dtype,
                                                          (unsigned long long)idx * p.cols + c0 + c)
                          : 0.0f;
        }
    }

    // Up-factor values of group h's rows, this lane's share of them.
    auto load_up = [&](float (&v)[Q], unsigned int h) { up.load(v, h, p.rows); };
    auto stage_up = [&](const float (&v)[Q], unsigned int slot) { up.stage(b_sh[warp][slot], v); };

    unsigned int slot = 0;
    {
        float v[Q];
        load_up(v, g);
        stage_up(v, slot);
        __syncwarp();
    }
    // Every bound below is the same for all lanes of the warp, so every
    // lane reaches every __syncwarp.
    for (; g < groups; g += gstep) {
        const unsigned int ng = g + gstep;
        const bool more = ng < groups;
        OffloadStRow<T, CPT> nxt[R];
        float v[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            v[q] = 0.0f;
        }
        if (more) {
            offload_st_load<T, CPT, R>(nxt, ln, ng * R);
            load_up(v, ng);
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
            float acc[CPT];
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                acc[c] = 0.0f;
            }
#pragma unroll
            for (int k4 = 0; k4 < KMAX / 4; ++k4) {
                const float* bp = &b_sh[warp][slot][i][4 * k4];
                offload_vector_access((unsigned long long)bp, 16);
                const OffloadF32x4 bv = *reinterpret_cast<const OffloadF32x4*>(bp);
                const float b[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
                for (int t = 0; t < 4; ++t) {
#pragma unroll
                    for (int c = 0; c < CPT; ++c) {
                        acc[c] = __fmaf_rn(b[t], a[4 * k4 + t][c], acc[c]);
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                offload_words_set<T>(cur[i].w, c, offload_words_get<T>(cur[i].w, c) + acc[c]);
            }
        }
        offload_st_store<T, CPT, R>(cur, ln, g * R);
        if (more) {
            // The other slot was last read before the previous __syncwarp.
            stage_up(v, slot ^ 1u);
            __syncwarp();
            slot ^= 1u;
#pragma unroll
            for (int i = 0; i < R; ++i) {
                cur[i] = nxt[i];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<float, 8, 2, 8>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<__half, 8, 2, 8>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<__nv_bfloat16, 8, 2, 8>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream32_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<float, 2, 8, 32>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream32_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<__half, 2, 8, 32>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream32_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream<__nv_bfloat16, 2, 8, 32>(p, blockIdx.x, gridDim.x);
}

// ---------------------------------------------------------------------------
// Kernel 1c: the ranks-8 streaming kernel with the down factors in shared
// memory: offload_lowrank_merge_stream8s_* (ranks adding up to at most 8).
//
// Kernel 1b's ranks-8 entry points keep a lane's 64 scaled down-factor
// values in registers, which holds them at 128 registers a thread, 2 blocks
// (16 warps) an SM: on an H200, Nsight Compute put them at 25% occupancy
// with DRAM 32% busy, each warp with one group of 2 rows (1 KiB of W for
// 16-bit W) in flight. Here the block's down factors live in shared memory
// instead (8 KiB: [rank k][column quad q][lane][4], so that a warp's 16-byte
// reads of one k and q are 32 consecutive quads, free of bank conflicts),
// read once per group per k, and a group is 4 rows (2 for f32 W): a warp
// keeps 2 KiB of W in flight while it computes the group before. The sums
// are those of kernel 1b in the same order (acc = Σ_k b[k] · (s · A[k, c])
// from 0 in k order, then W + acc rounded once), so both give the same bits.
// The block fills the shared factors together, then meets at one
// __syncthreads before any warp can run out of rows.

#define OFFLOAD_ST8S_CPT 8
#define OFFLOAD_ST8S_KMAX 8

// The block's scaled down factors, 16-byte aligned for the quads' reads.
template <int KMAX, int CPT> struct alignas(16) OffloadSt8sDown {
    float v[KMAX][CPT / 4][32][4];
};

template <typename T, int RPT16, typename P>
__device__ __forceinline__ void offload_lowrank_merge_stream8s(const P& p, unsigned int block,
                                                               unsigned int blocks) {
    constexpr int CPT = OFFLOAD_ST8S_CPT;
    constexpr int KMAX = OFFLOAD_ST8S_KMAX;
    constexpr int R = sizeof(T) == 4 ? RPT16 / 2 : RPT16;  // rows per group
    constexpr int SW = 32 * CPT;                           // columns per strip
    constexpr int Q = R * KMAX < 32 ? 1 : R * KMAX / 32;   // up values a lane loads
    static_assert(32 % KMAX == 0 && (R * KMAX < 32 || (R * KMAX) % 32 == 0),
                  "whole up-factor loads per lane");
    constexpr unsigned int kMaxAdapters = sizeof(P::adapters) / sizeof(OffloadLowRankAdapter);
    __shared__ OffloadStUp<R, KMAX> up_sh;
    float (*b_sh)[2][R][KMAX] = up_sh.v;
    // The strip's scaled down factors: [k][quad of columns][lane][4].
    __shared__ OffloadSt8sDown<KMAX, CPT> down_sh;
    float (*a_sh)[CPT / 4][32][4] = down_sh.v;

    const unsigned int lane = threadIdx.x % 32;
    const unsigned int warp = threadIdx.x / 32;
    const unsigned int tiles_x = (p.cols + SW - 1) / SW;
    const unsigned int per_strip = blocks / tiles_x;
    if (per_strip == 0 || block >= tiles_x * per_strip) {
        return;  // the whole block: no strip for it (the launcher avoids this)
    }
    const unsigned int num_adapters = p.num_adapters < kMaxAdapters ? p.num_adapters : kMaxAdapters;
    const unsigned int strip0 = (block % tiles_x) * SW;

    // The block fills a_sh: entry e is rank k = e / SW, column j = e % SW of
    // the strip (lane j / CPT, column j % CPT of it), zero past the ranks'
    // sum and outside W.
    for (unsigned int e = threadIdx.x; e < (unsigned int)(KMAX * SW); e += OFFLOAD_ST_THREADS) {
        const unsigned int k = e / SW, j = e % SW;
        const unsigned int col = strip0 + j;
        unsigned int ad = 0, idx = 0;
        const bool here = offload_st_rank(p, num_adapters, k, ad, idx) && col < p.cols;
        const OffloadLowRankAdapter& A = p.adapters[ad];
        const unsigned int c = j % CPT;
        a_sh[k][c / 4][j / CPT][c % 4] =
            here ? A.scale * offload_load_factor(A.down, A.down_dtype, (unsigned long long)idx * p.cols + col)
                 : 0.0f;
    }
    __syncthreads();

    const unsigned int groups = (p.rows + R - 1) / R;
    const unsigned int gstep = per_strip * OFFLOAD_ST_WARPS;
    unsigned int g = (block / tiles_x) * OFFLOAD_ST_WARPS + warp;
    if (g >= groups) {
        return;  // the whole warp: no group for it
    }

    const unsigned int c0 = strip0 + lane * CPT;
    const OffloadStLane ln = offload_st_lane<T, CPT>(p, c0);

    OffloadStRow<T, CPT> cur[R];
    offload_st_load<T, CPT, R>(cur, ln, g * R);

    const OffloadStUpLane<R, KMAX> up(p, num_adapters, lane);

    auto load_up = [&](float (&v)[Q], unsigned int h) { up.load(v, h, p.rows); };
    auto stage_up = [&](const float (&v)[Q], unsigned int slot) { up.stage(b_sh[warp][slot], v); };

    unsigned int slot = 0;
    {
        float v[Q];
        load_up(v, g);
        stage_up(v, slot);
        __syncwarp();
    }
    // Every bound below is the same for all lanes of the warp, so every
    // lane reaches every __syncwarp.
    for (; g < groups; g += gstep) {
        const unsigned int ng = g + gstep;
        const bool more = ng < groups;
        OffloadStRow<T, CPT> nxt[R];
        float v[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            v[q] = 0.0f;
        }
        if (more) {
            offload_st_load<T, CPT, R>(nxt, ln, ng * R);
            load_up(v, ng);
        }
        float acc[R][CPT];
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                acc[i][c] = 0.0f;
            }
        }
#pragma unroll
        for (int k4 = 0; k4 < KMAX / 4; ++k4) {
            float b[R][4];
#pragma unroll
            for (int i = 0; i < R; ++i) {
                const float* bp = &b_sh[warp][slot][i][4 * k4];
                offload_vector_access((unsigned long long)bp, 16);
                const OffloadF32x4 bv = *reinterpret_cast<const OffloadF32x4*>(bp);
                b[i][0] = bv.x;
                b[i][1] = bv.y;
                b[i][2] = bv.z;
                b[i][3] = bv.w;
            }
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                float a[CPT];
#pragma unroll
                for (int q = 0; q < CPT / 4; ++q) {
                    const float* ap = &a_sh[4 * k4 + t][q][lane][0];
                    offload_vector_access((unsigned long long)ap, 16);
                    const OffloadF32x4 av = *reinterpret_cast<const OffloadF32x4*>(ap);
                    a[4 * q] = av.x;
                    a[4 * q + 1] = av.y;
                    a[4 * q + 2] = av.z;
                    a[4 * q + 3] = av.w;
                }
#pragma unroll
                for (int i = 0; i < R; ++i) {
#pragma unroll
                    for (int c = 0; c < CPT; ++c) {
                        acc[i][c] = __fmaf_rn(b[i][t], a[c], acc[i][c]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                offload_words_set<T>(cur[i].w, c, offload_words_get<T>(cur[i].w, c) + acc[i][c]);
            }
        }
        offload_st_store<T, CPT, R>(cur, ln, g * R);
        if (more) {
            // The other slot was last read before the previous __syncwarp.
            stage_up(v, slot ^ 1u);
            __syncwarp();
            slot ^= 1u;
#pragma unroll
            for (int i = 0; i < R; ++i) {
                cur[i] = nxt[i];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8s_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream8s<float, 4>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8s_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream8s<__half, 4>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, 2)
offload_lowrank_merge_stream8s_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_stream8s<__nv_bfloat16, 4>(p, blockIdx.x, gridDim.x);
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

// The tensor-core kernel's shared memory: the staged factors while the warps
// multiply, then (reused) the tile's scaled sums on their way to the owners
// of W's elements.
union alignas(16) OffloadMmaShared {
    struct {
        // B[tile_row + r, k0 + 2 w .. k0 + 2 w + 1] in word w of row r.
        unsigned int b[OFFLOAD_LR_TILE_ROWS][OFFLOAD_MMA_LD];
        // A[k0 + 2 w .. k0 + 2 w + 1, tile_col + c] in word w of row c (A transposed).
        unsigned int a[OFFLOAD_LR_TILE_COLS][OFFLOAD_MMA_LD];
    } f;
    float out[OFFLOAD_LR_TILE_ROWS][OFFLOAD_LR_TILE_COLS + 4];
};

// The merge of one slice by block `block` of the `blocks` that merge it, as
// offload_lowrank_merge.
template <typename T, typename P>
__device__ __forceinline__ void offload_lowrank_merge_mma(const P& p, unsigned int block,
                                                          unsigned int blocks) {
    constexpr unsigned int kMaxAdapters = sizeof(P::adapters) / sizeof(OffloadLowRankAdapter);
    __shared__ OffloadMmaShared sh;

    const unsigned int tid = threadIdx.x;
    const unsigned int lane = tid % 32;
    const unsigned int warp = tid / 32;
    const unsigned int g = lane / 4;
    const unsigned int t = lane % 4;
    // The warp's 16 x 32 part of the tile: 2 warps down, 4 across.
    const unsigned int wr = (warp / 4) * 16;
    const unsigned int wc = (warp % 4) * 32;
    const OffloadLrWalk walk = offload_lr_walk(p.rows, p.cols, block, blocks);
    if (walk.y >= walk.tiles_y) {
        return;  // the whole block: no tile for it (the launcher avoids this)
    }
    const unsigned int tile_col = walk.tile_col;
    const unsigned int num_adapters = p.num_adapters < kMaxAdapters ? p.num_adapters : kMaxAdapters;

    // The thread's elements of W (the layout above), read first.
    OffloadWPlace pl = offload_w_place<T>(p.w, p.rows, p.cols, p.row0,
                                          walk.y * OFFLOAD_LR_TILE_ROWS, tile_col, lane, warp);
    OffloadWFrag<T> wf;
    offload_load_w<T>(wf, pl);

    // Every bound below is the same for all threads of the block, so every
    // thread reaches every __syncthreads() and every warp-wide mma.
    for (unsigned int y = walk.y; y < walk.tiles_y; y += walk.step) {
        const unsigned int tile_row = y * OFFLOAD_LR_TILE_ROWS;
        // The next tile's W is read while this one is merged.
        const unsigned int ny = y + walk.step;
        const OffloadWPlace pn = ny < walk.tiles_y
            ? offload_w_place<T>(p.w, p.rows, p.cols, p.row0, ny * OFFLOAD_LR_TILE_ROWS,
                                 tile_col, lane, warp)
            : offload_w_nowhere();
        OffloadWFrag<T> wn;
        offload_load_w<T>(wn, pn);

        // [n8 block][fragment element]
        float total[4][4];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                total[ni][e] = 0.0f;
            }
        }
        for (unsigned int a = 0; a < num_adapters; ++a) {
            const OffloadLowRankAdapter ad = p.adapters[a];
            const bool bf16 = ad.up_dtype == OFFLOAD_DTYPE_BF16;
            // B's rows as 32-bit pairs along the rank, when they are aligned.
            const bool b_words = ad.rank % 2 == 0 && ad.up % 4 == 0;
            float prod[4][4];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    prod[ni][e] = 0.0f;
                }
            }
            for (unsigned int k0 = 0; k0 < ad.rank; k0 += OFFLOAD_LR_K) {
                // The previous chunk's tiles (or the previous tile's sums)
                // are no longer read by anyone.
                __syncthreads();
                // Fixed trip counts, unrolled: every load is issued before
                // the first shared store (global and shared memory do not
                // alias).
#pragma unroll
                for (unsigned int q = 0;
                     q < OFFLOAD_LR_TILE_ROWS * (OFFLOAD_LR_K / 2) / OFFLOAD_LR_THREADS; ++q) {
                    const unsigned int idx = tid + q * OFFLOAD_LR_THREADS;
                    const unsigned int r = idx / (OFFLOAD_LR_K / 2);
                    const unsigned int wd = idx % (OFFLOAD_LR_K / 2);
                    const unsigned int gr = tile_row + r;
                    const unsigned int gk = k0 + 2 * wd;
                    const unsigned long long at = (unsigned long long)gr * ad.rank + gk;
                    unsigned int v = 0u;
                    if (gr < p.rows && gk < ad.rank) {
                        if (b_words) {
                            v = reinterpret_cast<const unsigned int*>(ad.up)[at / 2];
                        } else {
                            v = offload_load_bits(ad.up, at);
                            if (gk + 1 < ad.rank) {
                                v |= offload_load_bits(ad.up, at + 1) << 16;
                            }
                        }
                    }
                    sh.f.b[r][wd] = v;
                }
#pragma unroll
                for (unsigned int q = 0;
                     q < (OFFLOAD_LR_K / 2) * OFFLOAD_LR_TILE_COLS / OFFLOAD_LR_THREADS; ++q) {
                    const unsigned int idx = tid + q * OFFLOAD_LR_THREADS;
                    const unsigned int wd = idx / OFFLOAD_LR_TILE_COLS;
                    const unsigned int c = idx % OFFLOAD_LR_TILE_COLS;
                    const unsigned int gc = tile_col + c;
                    const unsigned int gk = k0 + 2 * wd;
                    const unsigned long long at = (unsigned long long)gk * p.cols + gc;
                    const bool col_ok = gc < p.cols;
                    const unsigned int lo =
                        (col_ok && gk < ad.rank) ? offload_load_bits(ad.down, at) : 0u;
                    const unsigned int hi = (col_ok && gk + 1 < ad.rank)
                        ? offload_load_bits(ad.down, at + p.cols)
                        : 0u;
                    sh.f.a[c][wd] = lo | (hi << 16);
                }
                __syncthreads();
#pragma unroll
                for (unsigned int ks = 0; ks < OFFLOAD_LR_K / 16; ++ks) {
                    if (k0 + 16 * ks >= ad.rank) {
                        break;  // only zero padding left in this chunk
                    }
                    const unsigned int kw = 8 * ks + t;
                    unsigned int af[4];
                    unsigned int bfr[4][2];
                    af[0] = sh.f.b[wr + g][kw];
                    af[1] = sh.f.b[wr + g + 8][kw];
                    af[2] = sh.f.b[wr + g][kw + 4];
                    af[3] = sh.f.b[wr + g + 8][kw + 4];
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        const unsigned int c = wc + 8 * ni + g;
                        bfr[ni][0] = sh.f.a[c][kw];
                        bfr[ni][1] = sh.f.a[c][kw + 4];
                    }
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        if (bf16) {
                            offload_mma_bf16(prod[ni], af, bfr[ni]);
                        } else {
                            offload_mma_f16(prod[ni], af, bfr[ni]);
                        }
                    }
                }
            }
            // The scale, in fp32, after the exact-product accumulation.
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    total[ni][e] = __fmaf_rn(ad.scale, prod[ni][e], total[ni][e]);
                }
            }
        }

        // The staged factors are no longer read by anyone: reuse their memory.
        __syncthreads();
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned int r = wr + g + 8 * (e / 2);
                const unsigned int c = wc + 8 * ni + 2 * t + (e % 2);
                sh.out[r][c] = total[ni][e];
            }
        }
        __syncthreads();
        float acc[OFFLOAD_LR_ROWS_PER_THREAD][OFFLOAD_LR_COLS_PER_THREAD];
#pragma unroll
        for (int i = 0; i < OFFLOAD_LR_ROWS_PER_THREAD; ++i) {
            const OffloadF32x4 v = *reinterpret_cast<const OffloadF32x4*>(
                &sh.out[OFFLOAD_LR_ROWS_PER_THREAD * warp + i][OFFLOAD_LR_COLS_PER_THREAD * lane]);
            acc[i][0] = v.x;
            acc[i][1] = v.y;
            acc[i][2] = v.z;
            acc[i][3] = v.w;
        }
        offload_add_w<T>(wf, acc);
        offload_store_w<T>(wf, pl);
        wf = wn;
        pl = pn;
    }
}

// Two blocks per SM (at most 128 registers, no spills; with three, ptxas
// spills 64 to 400 bytes).
extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<float>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<__half>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_mma<__nv_bfloat16>(p, blockIdx.x, gridDim.x);
}

// Batched, as offload_lowrank_merge_batch.
template <typename T>
__device__ __forceinline__ void offload_lowrank_merge_mma_batch(
    const OffloadLowRankBatchParams& p) {
    unsigned int j;
    if (!offload_batch_job(p, blockIdx.x, j)) {
        return;  // past the last job's blocks
    }
    offload_lowrank_merge_mma<T>(p.jobs[j], blockIdx.x - p.first_block[j],
                                 p.first_block[j + 1] - p.first_block[j]);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_batch_f32(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_mma_batch<float>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_batch_f16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_mma_batch<__half>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, 2)
offload_lowrank_merge_mma_batch_bf16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_mma_batch<__nv_bfloat16>(p);
}

// ---------------------------------------------------------------------------
// Kernel 2b: low-rank deltas with 16-bit factors on the tensor cores, with the
// factors streamed through a multistage cp.async pipeline
// (offload_lowrank_merge_pipe_*, and batched offload_lowrank_merge_pipe_batch_*).
//
// Same operands and semantics as kernel 2, made for long rank dimensions
// (several stacked adapters, ranks up to 128 and more) and for W's reads to
// overlap the factors' staging:
//   - 64 x 128 tiles, a block walking down a column strip as in kernel 2
//     (offload_lr_walk with 64-row tiles); eight warps as 2 x 4, each owning
//     a 32 x 32 part (2 x 4 mma.m16n8k16 products per 16 ranks).
//   - The rank dimension is cut into stages of 32 ranks of one adapter (the
//     last one of an adapter zero-padded): a stage is that chunk of A
//     [32, 128] and of B [64, 32], copied as they are stored (16-bit values,
//     16 bytes per cp.async, zero-filled past the slice, the rank and the
//     columns; ranks past the chunk's last 16-rank mma step are not copied)
//     into one of OFFLOAD_PIPE_STAGES shared slots. A block's stages, over
//     every tile it walks, form one sequence, and the copies of the stage
//     two ahead are in flight while a stage is multiplied, one barrier per
//     stage. Factors whose rows are not whole 16-byte units (a rank, or W's
//     column count, not a multiple of 8) or whose address is not 16-byte
//     aligned are staged with plain loads instead (one 16-byte shared store
//     per unit), still two stages ahead in the sequence.
//   - Fragments are read with ldmatrix (A's chunk transposed on the way,
//     .trans), from slots whose 16-byte units are XOR-swizzled by row so
//     that neither the copies nor ldmatrix meet bank conflicts.
//   - What a stage issues is kept short (its instructions compete with the
//     mma for the schedulers): the copies' cursor carries its adapter's
//     rank, factors and copy paths, read when it moves to the adapter, and
//     the factors' type picks one of two product loops per stage rather
//     than an mma of each type, one predicated off.
//   - A lane's elements of W are those of the accumulators' layout (two
//     adjacent elements of a row per 8 x 8 block). 16-bit W whose rows are
//     whole 16-byte units is read and written 8 elements of a row per lane
//     (a warp covers 64 contiguous bytes of each of 8 rows) and moved
//     between that order and the accumulators' by a 4 x 4 transpose of
//     words across each quad of lanes (shfl.sync.bfly); otherwise one 32-
//     or 64-bit access per pair where aligned. W is read at the start of a
//     tile and kept as raw bits while the
//     first adapter is multiplied (so the loads stay in flight meanwhile);
//     each adapter's exact product of f16 or bf16 values is accumulated in
//     fp32 on its own (prod) and then added scaled: the running sum starts
//     as fma(s, prod, W) and goes on as sum = fma(s, prod, sum); it is
//     rounded once to W's type and stored. The next tile's W is prefetched
//     into L2 meanwhile.
// Two blocks per SM (36 KiB of static shared memory each).

#define OFFLOAD_PIPE_TILE_ROWS 64
#define OFFLOAD_PIPE_TILE_COLS OFFLOAD_LR_TILE_COLS
#define OFFLOAD_PIPE_K 32
#define OFFLOAD_PIPE_STAGES 3
#define OFFLOAD_PIPE_THREADS 256
// Kernel 2c, the same on 128 x 128 tiles (offload_lowrank_merge_pipe_tall_*):
// sixteen warps as 4 x 4, one block per SM.
#define OFFLOAD_PIPE_TALL_TILE_ROWS 128
#define OFFLOAD_PIPE_TALL_THREADS 512

static_assert(OFFLOAD_PIPE_TILE_ROWS == 64 && OFFLOAD_PIPE_TILE_COLS == 128 && OFFLOAD_PIPE_K == 32 &&
                  OFFLOAD_PIPE_THREADS == 256 && OFFLOAD_PIPE_TALL_TILE_ROWS == 128 &&
                  OFFLOAD_PIPE_TALL_THREADS == 512,
              "the pipelined kernel's warp layout (ROWS / 32 x 4 warps of 32 x 32) and copy plan assume these");
static_assert(OFFLOAD_PIPE_STAGES >= 2, "a stage in flight while one is multiplied");

// The pipelined kernel's block for tiles of ROWS rows (64 or 128) and 128
// columns: a warp per 32 x 32 part, so ROWS / 32 x 4 warps.
template <unsigned int ROWS> struct OffloadPipeTile {
    static_assert(ROWS == OFFLOAD_PIPE_TILE_ROWS || ROWS == OFFLOAD_PIPE_TALL_TILE_ROWS, "64 or 128 rows");
    static constexpr unsigned int kThreads = 4 * ROWS;
};
static_assert(OffloadPipeTile<OFFLOAD_PIPE_TILE_ROWS>::kThreads == OFFLOAD_PIPE_THREADS &&
                  OffloadPipeTile<OFFLOAD_PIPE_TALL_TILE_ROWS>::kThreads == OFFLOAD_PIPE_TALL_THREADS,
              "threads per block");

// The pipelined kernel's shared memory: OFFLOAD_PIPE_STAGES slots, each a
// stage's chunk of A (a[k][c]: 32 rows of 128 values, 16 units of 16 bytes a
// row, unit u of row k at u ^ (k % 8)) and of B (b[r][k]: ROWS rows of 32
// values, 4 units a row, unit q of row r at q ^ ((r / 2) % 4)). 36 KiB for
// 64-row tiles, 48 KiB (the most a kernel may hold statically) for 128.
template <unsigned int ROWS> struct alignas(128) OffloadPipeShared {
    unsigned short a[OFFLOAD_PIPE_STAGES][OFFLOAD_PIPE_K][OFFLOAD_PIPE_TILE_COLS];
    unsigned short b[OFFLOAD_PIPE_STAGES][ROWS][OFFLOAD_PIPE_K];
};
static_assert(sizeof(OffloadPipeShared<OFFLOAD_PIPE_TALL_TILE_ROWS>) <= 48 * 1024,
              "static shared memory of one block");

// Offset of element (k, c) in a slot's a, and of (r, k) in its b.
__device__ __forceinline__ unsigned int offload_pipe_a_at(unsigned int k, unsigned int c) {
    return k * OFFLOAD_PIPE_TILE_COLS + ((((c >> 3) ^ (k & 7u)) << 3) | (c & 7u));
}
__device__ __forceinline__ unsigned int offload_pipe_b_at(unsigned int r, unsigned int k) {
    return r * OFFLOAD_PIPE_K + ((((k >> 3) ^ ((r >> 1) & 3u)) << 3) | (k & 7u));
}

// The asynchronous copies, ldmatrix, the L2 prefetch and the shuffle, as
// inline PTX (sm_80 and newer, like mma.sync), and W's 16-byte accesses. offload_cp_async16 copies `bytes` (0 to
// 16) bytes from global `src` to shared `dst` and zero-fills the rest of the
// 16; the copies a thread issued land when its offload_cp_async_wait<N>
// returns for their group (every group but the N newest), and are seen by
// other threads after a barrier that follows. When the source is not
// compiled by a CUDA compiler, the includer provides the functions of this
// block (offload_smem_addr excepted).
#if defined(__CUDACC__)
// The shared-window address of a pointer into shared memory. The builtin,
// unlike a cvta in inline PTX, lets the compiler fold the conversion of
// addresses it knows are shared into plain offsets.
__device__ __forceinline__ unsigned int offload_smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void offload_cp_async16(void* dst, const void* src, unsigned int bytes) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(offload_smem_addr(dst)), "l"(src),
                 "r"(bytes)
                 : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void offload_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N> __device__ __forceinline__ void offload_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Four 8 x 8 matrices of 16-bit values: lane l gives the address of row
// l % 8 of matrix l / 8 (16 contiguous bytes); r[m] of lane (g = lane / 4,
// t = lane % 4) is M_m[g][2t, 2t+1], or with `trans` M_m[2t][g], M_m[2t+1][g]
// (the lower index in the lower half).
__device__ __forceinline__ void offload_ldmatrix_x4(unsigned int (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(offload_smem_addr(row))
                 : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void offload_ldmatrix_x4_trans(unsigned int (&r)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(offload_smem_addr(row))
                 : "memory");
#else
    __trap();
#endif
}

__device__ __forceinline__ void offload_prefetch_l2(const void* p) {
    asm volatile("prefetch.L2 [%0];" ::"l"(p));
}

// 16 bytes of global memory at p (16-byte aligned) into v, or from v.
__device__ __forceinline__ void offload_ld16(unsigned int (&v)[4], const void* p) {
    const OffloadU32x4 x = *reinterpret_cast<const OffloadU32x4*>(p);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
}

__device__ __forceinline__ void offload_st16(void* p, const unsigned int (&v)[4]) {
    OffloadU32x4 x;
    x.x = v[0];
    x.y = v[1];
    x.z = v[2];
    x.w = v[3];
    *reinterpret_cast<OffloadU32x4*>(p) = x;
}

// v of lane (this lane ^ m), for the whole warp (shfl.sync.bfly).
__device__ __forceinline__ unsigned int offload_shfl_xor(unsigned int v, int m) {
    unsigned int r;
    asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=r"(r) : "r"(v), "r"(m));
    return r;
}
#endif

// Transposes a 4 x 4 matrix of words held by the four lanes of a quad
// (lanes 4 g .. 4 g + 3; t = lane % 4): on return x[j] of lane t is what
// x[t] of lane j was. Every lane of the warp must call it together.
__device__ __forceinline__ void offload_quad_transpose(unsigned int (&x)[4], unsigned int t) {
    unsigned int y[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (unsigned int r = 0; r < 4; ++r) {
        // Lane t sends its word t ^ r to lane t ^ r, and gets lane (t ^ r)'s
        // word t, which goes to y[t ^ r].
        const unsigned int i = t ^ r;
        unsigned int v = i == 0 ? x[0] : i == 1 ? x[1] : i == 2 ? x[2] : x[3];
        if (r != 0) {
            v = offload_shfl_xor(v, (int)r);
        }
#pragma unroll
        for (unsigned int j = 0; j < 4; ++j) {
            y[j] = i == j ? v : y[j];
        }
    }
#pragma unroll
    for (unsigned int j = 0; j < 4; ++j) {
        x[j] = y[j];
    }
}

// Where the pipeline is: tile row y of the walk, adapter a, and the chunk
// of its ranks from k0; with adapter a's rank and factors, and whether each
// factor's rows are whole 16-byte units (copied 16 bytes at a time), read
// from the parameters when the cursor moves to the adapter rather than for
// every stage (the parameters, indexed by a run-time adapter, are loads).
struct OffloadPipeCursor {
    unsigned int y, a, k0;
    unsigned int rank;
    bool a_vec, b_vec;
    const unsigned short* up;
    const unsigned short* down;
};

// Points `c` at adapter `a` from its first rank.
template <typename P>
__device__ __forceinline__ void offload_pipe_enter(OffloadPipeCursor& c, const P& p, unsigned int a) {
    const OffloadLowRankAdapter ad = p.adapters[a];
    c.a = a;
    c.k0 = 0;
    c.rank = ad.rank;
    c.a_vec = p.cols % 8 == 0 && ad.down % 16 == 0;
    c.b_vec = ad.rank % 8 == 0 && ad.up % 16 == 0;
    c.up = reinterpret_cast<const unsigned short*>(ad.up);
    c.down = reinterpret_cast<const unsigned short*>(ad.down);
}

// Moves `c` to the first chunk at or after it that exists (skipping
// adapters of rank 0). Some adapter has a positive rank.
template <typename P>
__device__ __forceinline__ void offload_pipe_settle(OffloadPipeCursor& c, const P& p, unsigned int n,
                                                    unsigned int step) {
    while (c.k0 >= c.rank) {
        unsigned int a = c.a + 1;
        if (a == n) {
            a = 0;
            c.y += step;
        }
        offload_pipe_enter(c, p, a);
    }
}

// Ranks k0 .. k0 + kn - 1 of a chunk are ever read: kn = min(32, the chunk's
// ranks rounded up to the 16 of one mma step).
__device__ __forceinline__ unsigned int offload_pipe_read_ranks(unsigned int rank, unsigned int k0) {
    const unsigned int left = ((rank - k0 + 15) / 16) * 16;
    return left < OFFLOAD_PIPE_K ? left : OFFLOAD_PIPE_K;
}

// Issues the copies of the stage at `c` into slot `slot` (every thread its
// share): A's rows k0 .. k0 + 31, columns tile_col .. tile_col + 127, and
// B's rows tile_row .. tile_row + ROWS - 1, ranks k0 .. k0 + 31, zero
// outside the slice, the rank and W's columns; ranks past the last mma step
// that reads them (offload_pipe_read_ranks) are not copied at all.
template <unsigned int ROWS, typename P>
__device__ __forceinline__ void offload_pipe_issue(OffloadPipeShared<ROWS>& sh, unsigned int slot,
                                                   const P& p, const OffloadPipeCursor& c,
                                                   unsigned int tile_col, unsigned int tid) {
    constexpr unsigned int kThreads = OffloadPipeTile<ROWS>::kThreads;
    const unsigned int tile_row = c.y * ROWS;
    const unsigned int kn = offload_pipe_read_ranks(c.rank, c.k0);
    // A: 32 rows x 16 units; thread tid takes units tid, tid + kThreads, ...
    // (two with 256 threads, one with 512).
    const bool a_vec = c.a_vec;
#pragma unroll
    for (unsigned int q = 0; q < OFFLOAD_PIPE_K * 16 / kThreads; ++q) {
        const unsigned int idx = tid + q * kThreads;
        const unsigned int k = idx / 16;
        const unsigned int u = idx % 16;
        if (k >= kn) {
            continue;  // never read
        }
        const unsigned int gk = c.k0 + k;
        const unsigned int gc = tile_col + 8 * u;
        unsigned short* dst = &sh.a[slot][0][0] + offload_pipe_a_at(k, 8 * u);
        const unsigned long long at = (unsigned long long)gk * p.cols + gc;
        const unsigned short* src = c.down;
        if (a_vec) {
            const bool in = gk < c.rank && gc < p.cols;
            offload_cp_async16(dst, src + (in ? at : 0), in ? 16u : 0u);
        } else {
            // One 16-byte store of the unit, built from plain loads.
            unsigned int v[4];
#pragma unroll
            for (unsigned int e = 0; e < 8; e += 2) {
                const unsigned int lo = (gk < c.rank && gc + e < p.cols) ? src[at + e] : 0u;
                const unsigned int hi = (gk < c.rank && gc + e + 1 < p.cols) ? src[at + e + 1] : 0u;
                v[e / 2] = lo | (hi << 16);
            }
            OffloadU32x4 x;
            x.x = v[0];
            x.y = v[1];
            x.z = v[2];
            x.w = v[3];
            *reinterpret_cast<OffloadU32x4*>(dst) = x;
        }
    }
    // B: ROWS rows x 4 units; thread tid takes unit tid % 4 of row tid / 4.
    {
        const bool b_vec = c.b_vec;
        const unsigned int r = tid / 4;
        const unsigned int q = tid % 4;
        if (8 * q < kn) {
            const unsigned int gr = tile_row + r;
            const unsigned int gk = c.k0 + 8 * q;
            unsigned short* dst = &sh.b[slot][0][0] + offload_pipe_b_at(r, 8 * q);
            const unsigned long long at = (unsigned long long)gr * c.rank + gk;
            const unsigned short* src = c.up;
            if (b_vec) {
                const bool in = gr < p.rows && gk < c.rank;
                offload_cp_async16(dst, src + (in ? at : 0), in ? 16u : 0u);
            } else {
                unsigned int v[4];
#pragma unroll
                for (unsigned int e = 0; e < 8; e += 2) {
                    const unsigned int lo = (gr < p.rows && gk + e < c.rank) ? src[at + e] : 0u;
                    const unsigned int hi =
                        (gr < p.rows && gk + e + 1 < c.rank) ? src[at + e + 1] : 0u;
                    v[e / 2] = lo | (hi << 16);
                }
                OffloadU32x4 x;
                x.x = v[0];
                x.y = v[1];
                x.z = v[2];
                x.w = v[3];
                *reinterpret_cast<OffloadU32x4*>(dst) = x;
            }
        }
    }
}

// A lane's elements of W in a tile (64 or 128 x 128), as raw bits: for its warp's
// 32 x 32 part (rows wr.., columns wc..), block (mi, ni) and half h, the
// pair [wr + 16 mi + g + 8 h, wc + 8 ni + 2 t + e] (e = 0, 1) of the tile.
// A 16-bit pair is one word (element e in half e), an f32 pair two. Kept as
// bits until the first adapter's product is added, so that the loads stay
// in flight while it is multiplied.
template <typename T> struct OffloadPipeW {
    static constexpr int kWords = (int)sizeof(T) / 2;
    unsigned int w[2][4][2][kWords];

    // Element e of the pair of (mi, ni, h), as fp32.
    __device__ __forceinline__ float get(int mi, int ni, int h, int e) const {
        if constexpr (sizeof(T) == 2) {
            return OffloadBits<T>::get((w[mi][ni][h][0] >> (16 * e)) & 0xffffu);
        } else {
            return OffloadBits<T>::get(w[mi][ni][h][e]);
        }
    }
};

// 16-bit W moves 8 elements of a row per lane (16 bytes, so that a warp's
// access covers 64 contiguous bytes of each of 8 rows) when every row of
// the tile is whole 16-byte units: a column count that is a multiple of 8
// and W 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool offload_pipe_rows16(unsigned long long w, unsigned int cols) {
    return sizeof(T) == 2 && cols % 8 == 0 && w % 16 == 0;
}

// Otherwise pairs move as one 32-bit (16-bit T) or 64-bit (f32) access when
// every pair is aligned to it: an even column count and W aligned to the pair.
template <typename T>
__device__ __forceinline__ bool offload_pipe_pairs(unsigned long long w, unsigned int cols) {
    return cols % 2 == 0 && w % (2 * sizeof(T)) == 0;
}

// Reads the lane's elements of W (zero bits outside the slice).
template <typename T>
__device__ __forceinline__ void offload_pipe_load_w(OffloadPipeW<T>& f, unsigned long long w,
                                                    unsigned int rows, unsigned int cols,
                                                    unsigned int row0, unsigned int tile_row,
                                                    unsigned int tile_col, unsigned int wr,
                                                    unsigned int wc, unsigned int g,
                                                    unsigned int t) {
    if constexpr (sizeof(T) == 2) {
        if (offload_pipe_rows16<T>(w, cols)) {
            // Lane t reads the 8 elements from column 8 t of its row (16
            // bytes; the quad's 4 lanes cover the warp's 32 columns), and
            // the quad transposes them into the accumulators' layout.
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const unsigned int r = tile_row + wr + 16 * mi + g + 8 * h;
                    const unsigned int c = tile_col + wc + 8 * t;
                    unsigned int x[4] = {0u, 0u, 0u, 0u};
                    if (r < rows && c < cols) {
                        offload_ld16(x, reinterpret_cast<const T*>(w) +
                                            (unsigned long long)(row0 + r) * cols + c);
                    }
                    offload_quad_transpose(x, t);
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        f.w[mi][ni][h][0] = x[ni];
                    }
                }
            }
            return;
        }
    }
    const bool pairs = offload_pipe_pairs<T>(w, cols);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned int r = tile_row + wr + 16 * mi + g + 8 * h;
            const unsigned long long row = (unsigned long long)(row0 + r) * cols;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const unsigned int c = tile_col + wc + 8 * ni + 2 * t;
                unsigned int(&x)[OffloadPipeW<T>::kWords] = f.w[mi][ni][h];
#pragma unroll
                for (int q = 0; q < OffloadPipeW<T>::kWords; ++q) {
                    x[q] = 0u;
                }
                if (r >= rows || c >= cols) {
                    continue;
                }
                const T* e = reinterpret_cast<const T*>(w) + row + c;
                if constexpr (sizeof(T) == 2) {
                    const unsigned short* b = reinterpret_cast<const unsigned short*>(e);
                    if (pairs) {
                        x[0] = *reinterpret_cast<const unsigned int*>(e);
                    } else {
                        x[0] = (unsigned int)b[0] | (c + 1 < cols ? (unsigned int)b[1] << 16 : 0u);
                    }
                } else {
                    const unsigned int* b = reinterpret_cast<const unsigned int*>(e);
                    if (pairs) {
                        const OffloadU32x2 v = *reinterpret_cast<const OffloadU32x2*>(e);
                        x[0] = v.x;
                        x[1] = v.y;
                    } else {
                        x[0] = b[0];
                        x[1] = c + 1 < cols ? b[1] : 0u;
                    }
                }
            }
        }
    }
}

// Stores sum[mi][ni][2 h + e] (the elements of offload_pipe_load_w) rounded
// to T, inside the slice only.
template <typename T>
__device__ __forceinline__ void offload_pipe_store_w(const float (&sum)[2][4][4], unsigned long long w,
                                                     unsigned int rows, unsigned int cols,
                                                     unsigned int row0, unsigned int tile_row,
                                                     unsigned int tile_col, unsigned int wr,
                                                     unsigned int wc, unsigned int g,
                                                     unsigned int t) {
    if constexpr (sizeof(T) == 2) {
        if (offload_pipe_rows16<T>(w, cols)) {
            // The load's transpose backwards: lane t writes 16 bytes from
            // column 8 t of its row.
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    unsigned int x[4];
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) {
                        x[ni] = OffloadBits<T>::put(sum[mi][ni][2 * h]) |
                                (OffloadBits<T>::put(sum[mi][ni][2 * h + 1]) << 16);
                    }
                    offload_quad_transpose(x, t);
                    const unsigned int r = tile_row + wr + 16 * mi + g + 8 * h;
                    const unsigned int c = tile_col + wc + 8 * t;
                    if (r < rows && c < cols) {
                        offload_st16(reinterpret_cast<T*>(w) + (unsigned long long)(row0 + r) * cols + c,
                                     x);
                    }
                }
            }
            return;
        }
    }
    const bool pairs = offload_pipe_pairs<T>(w, cols);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned int r = tile_row + wr + 16 * mi + g + 8 * h;
            const unsigned long long row = (unsigned long long)(row0 + r) * cols;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const unsigned int c = tile_col + wc + 8 * ni + 2 * t;
                if (r >= rows || c >= cols) {
                    continue;
                }
                const float v0 = sum[mi][ni][2 * h];
                const float v1 = sum[mi][ni][2 * h + 1];
                T* e = reinterpret_cast<T*>(w) + row + c;
                if (pairs) {
                    if constexpr (sizeof(T) == 2) {
                        *reinterpret_cast<unsigned int*>(e) =
                            OffloadBits<T>::put(v0) | (OffloadBits<T>::put(v1) << 16);
                    } else {
                        OffloadU32x2 bits;
                        bits.x = OffloadBits<T>::put(v0);
                        bits.y = OffloadBits<T>::put(v1);
                        *reinterpret_cast<OffloadU32x2*>(e) = bits;
                    }
                } else {
                    OffloadElem<T>::store(e, v0);
                    if (c + 1 < cols) {
                        OffloadElem<T>::store(e + 1, v1);
                    }
                }
            }
        }
    }
}

// Prefetches the lines of tile row y of the walk's strip into L2 (rows of
// the slice only).
template <typename T, unsigned int ROWS>
__device__ __forceinline__ void offload_pipe_prefetch_w(unsigned long long w, unsigned int rows,
                                                        unsigned int cols, unsigned int row0,
                                                        unsigned int y, unsigned int tile_col,
                                                        unsigned int tid) {
    // ROWS rows of up to 128 * sizeof(T) bytes: thread tid takes 128-byte
    // line tid % 4 of row tid / 4.
    const unsigned int r = y * ROWS + tid / 4;
    const unsigned int c = tile_col + (tid % 4) * (128 / sizeof(T));
    if (r < rows && c < cols && (tid % 4) * 128 < OFFLOAD_PIPE_TILE_COLS * sizeof(T)) {
        offload_prefetch_l2(reinterpret_cast<const T*>(w) + (unsigned long long)(row0 + r) * cols + c);
    }
}

// The pipeline's state in a block: the stages multiplied so far, the
// stages issued so far (of `stages` in all), and where the next to issue is.
struct OffloadPipeState {
    unsigned int stage, issued, stages;
    OffloadPipeCursor next;
};

// Adds the products of one stage's ranks k0 .. (at most 32 of `rank`) from
// slot (sa, sb) to prod, as a warp owning rows wr.. and columns wc.. of the
// tile. The factors' type is a template parameter so that a stage issues
// only its own mma instructions (a run-time choice would issue both, one
// of them predicated off).
template <bool BF16>
__device__ __forceinline__ void offload_pipe_products(float (&prod)[2][4][4], const unsigned short* sa,
                                                      const unsigned short* sb, unsigned int k0,
                                                      unsigned int rank, unsigned int wr,
                                                      unsigned int wc, unsigned int lane) {
#pragma unroll
    for (unsigned int ks = 0; ks < OFFLOAD_PIPE_K / 16; ++ks) {
        if (k0 + 16 * ks >= rank) {
            break;  // only zero padding left in this chunk
        }
        // B's rows (the instruction's A operand): matrices
        // (rows 0-7, ranks 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
        unsigned int af[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const unsigned int r = wr + 16 * mi + (lane % 8) + 8 * ((lane / 8) % 2);
            const unsigned int k = 16 * ks + 8 * (lane / 16);
            offload_ldmatrix_x4(af[mi], sb + offload_pipe_b_at(r, k));
        }
        // A's columns (the B operand), two 8-column blocks per ldmatrix:
        // (ranks 0-7, block 2j), (8-15, 2j), (0-7, 2j+1), (8-15, 2j+1),
        // transposed.
        unsigned int bfr[4][2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const unsigned int k = 16 * ks + (lane % 8) + 8 * ((lane / 8) % 2);
            const unsigned int c = wc + 8 * (2 * j + lane / 16);
            unsigned int m[4];
            offload_ldmatrix_x4_trans(m, sa + offload_pipe_a_at(k, c));
            bfr[2 * j][0] = m[0];
            bfr[2 * j][1] = m[1];
            bfr[2 * j + 1][0] = m[2];
            bfr[2 * j + 1][1] = m[3];
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                if constexpr (BF16) {
                    offload_mma_bf16(prod[mi][ni], af[mi], bfr[ni]);
                } else {
                    offload_mma_f16(prod[mi][ni], af[mi], bfr[ni]);
                }
            }
        }
    }
}

// Multiplies the current tile's stages of adapter `ad` (its chunks of 32
// ranks, in order, each stage's slot read once its copies have landed),
// issuing the stages two ahead as it goes; prod gets the adapter's
// product, accumulated in fp32 from 0. Every thread of the block calls it
// with the same arguments but its own tid.
template <unsigned int ROWS, typename P>
__device__ __forceinline__ void offload_pipe_adapter(float (&prod)[2][4][4], OffloadPipeShared<ROWS>& sh,
                                                     const P& p, const OffloadLowRankAdapter& ad,
                                                     OffloadPipeState& st, unsigned int n,
                                                     unsigned int step, unsigned int tile_col,
                                                     unsigned int tid, unsigned int wr,
                                                     unsigned int wc) {
    const unsigned int lane = tid % 32;
    const bool bf16 = ad.up_dtype == OFFLOAD_DTYPE_BF16;
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
    for (unsigned int k0 = 0; k0 < ad.rank; k0 += OFFLOAD_PIPE_K, ++st.stage) {
        // This thread's copies of this stage have landed; after the barrier
        // everyone's have, and nobody reads the slot of the previous stage
        // any more, which the next copies reuse.
        offload_cp_async_wait<OFFLOAD_PIPE_STAGES - 2>();
        __syncthreads();
        if (st.issued < st.stages) {
            // The stage two ahead, into the slot read last.
            offload_pipe_issue<ROWS>(sh, st.issued % OFFLOAD_PIPE_STAGES, p, st.next, tile_col, tid);
            ++st.issued;
            st.next.k0 += OFFLOAD_PIPE_K;
            offload_pipe_settle(st.next, p, n, step);
        }
        offload_cp_async_commit();
        const unsigned int slot = st.stage % OFFLOAD_PIPE_STAGES;
        const unsigned short* sa = &sh.a[slot][0][0];
        const unsigned short* sb = &sh.b[slot][0][0];
        if (bf16) {
            offload_pipe_products<true>(prod, sa, sb, k0, ad.rank, wr, wc, lane);
        } else {
            offload_pipe_products<false>(prod, sa, sb, k0, ad.rank, wr, wc, lane);
        }
    }
}

// The merge of one slice by block `block` of the `blocks` that merge it, as
// offload_lowrank_merge, on tiles of ROWS rows (each element's sums are
// taken in the same order whatever ROWS is, so both give the same bits).
template <typename T, unsigned int ROWS, typename P>
__device__ __forceinline__ void offload_lowrank_merge_pipe(const P& p, unsigned int block,
                                                           unsigned int blocks) {
    constexpr unsigned int kMaxAdapters = sizeof(P::adapters) / sizeof(OffloadLowRankAdapter);
    __shared__ OffloadPipeShared<ROWS> sh;

    const unsigned int tid = threadIdx.x;
    const unsigned int lane = tid % 32;
    const unsigned int warp = tid / 32;
    const unsigned int g = lane / 4;
    const unsigned int t = lane % 4;
    // The warp's 32 x 32 part of the tile: ROWS / 32 warps down, 4 across.
    const unsigned int wr = (warp / 4) * 32;
    const unsigned int wc = (warp % 4) * 32;
    const OffloadLrWalk walk = offload_lr_walk(p.rows, p.cols, block, blocks, ROWS);
    if (walk.y >= walk.tiles_y) {
        return;  // the whole block: no tile for it (the launcher avoids this)
    }
    const unsigned int tile_col = walk.tile_col;
    const unsigned int n = p.num_adapters < kMaxAdapters ? p.num_adapters : kMaxAdapters;
    unsigned int chunks = 0;  // stages per tile
    unsigned int first = n;   // the first adapter with a positive rank
    for (unsigned int a = 0; a < n; ++a) {
        chunks += (p.adapters[a].rank + OFFLOAD_PIPE_K - 1) / OFFLOAD_PIPE_K;
        if (first == n && p.adapters[a].rank > 0) {
            first = a;
        }
    }
    if (chunks == 0) {
        return;  // nothing to add: W is left as it is
    }
    const unsigned int tiles = (walk.tiles_y - walk.y + walk.step - 1) / walk.step;

    // The copies run OFFLOAD_PIPE_STAGES - 1 stages ahead of the products;
    // every thread commits one group per stage (empty past the last), so
    // group i holds stage i.
    OffloadPipeState st;
    st.stage = 0;
    st.issued = 0;
    st.stages = tiles * chunks;
    st.next.y = walk.y;
    offload_pipe_enter(st.next, p, 0);
    offload_pipe_settle(st.next, p, n, walk.step);
#pragma unroll
    for (int s = 0; s < OFFLOAD_PIPE_STAGES - 1; ++s) {
        if (st.issued < st.stages) {
            offload_pipe_issue<ROWS>(sh, st.issued % OFFLOAD_PIPE_STAGES, p, st.next, tile_col, tid);
            ++st.issued;
            st.next.k0 += OFFLOAD_PIPE_K;
            offload_pipe_settle(st.next, p, n, walk.step);
        }
        offload_cp_async_commit();
    }

    // Every bound below is the same for all threads of the block, so every
    // thread reaches every barrier and every warp-wide instruction.
    for (unsigned int y = walk.y; y < walk.tiles_y; y += walk.step) {
        const unsigned int tile_row = y * ROWS;
        OffloadPipeW<T> wbits;
        offload_pipe_load_w<T>(wbits, p.w, p.rows, p.cols, p.row0, tile_row, tile_col, wr, wc, g, t);
        if (y + walk.step < walk.tiles_y) {
            offload_pipe_prefetch_w<T, ROWS>(p.w, p.rows, p.cols, p.row0, y + walk.step, tile_col, tid);
        }
        // The running sum starts at W with the first adapter's scaled
        // product (W's bits are needed only then), then adds the others'.
        float sum[2][4][4];
        float prod[2][4][4];
        offload_pipe_adapter(prod, sh, p, p.adapters[first], st, n, walk.step, tile_col, tid, wr, wc);
        {
            const float scale = p.adapters[first].scale;
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        sum[mi][ni][e] =
                            __fmaf_rn(scale, prod[mi][ni][e], wbits.get(mi, ni, e / 2, e % 2));
                    }
                }
            }
        }
        for (unsigned int a = first + 1; a < n; ++a) {
            const OffloadLowRankAdapter ad = p.adapters[a];
            if (ad.rank == 0) {
                continue;
            }
            offload_pipe_adapter(prod, sh, p, ad, st, n, walk.step, tile_col, tid, wr, wc);
            // The scale, in fp32, after the exact-product accumulation.
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        sum[mi][ni][e] = __fmaf_rn(ad.scale, prod[mi][ni][e], sum[mi][ni][e]);
                    }
                }
            }
        }
        offload_pipe_store_w<T>(sum, p.w, p.rows, p.cols, p.row0, tile_row, tile_col, wr, wc, g, t);
    }
    // Only empty groups can be left; leave none.
    offload_cp_async_wait<0>();
}

// Two blocks per SM (at most 128 registers).
extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<float, OFFLOAD_PIPE_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<__half, OFFLOAD_PIPE_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<__nv_bfloat16, OFFLOAD_PIPE_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

// Batched, as offload_lowrank_merge_batch.
template <typename T, unsigned int ROWS>
__device__ __forceinline__ void offload_lowrank_merge_pipe_batch(
    const OffloadLowRankBatchParams& p) {
    unsigned int j;
    if (!offload_batch_job(p, blockIdx.x, j)) {
        return;  // past the last job's blocks
    }
    offload_lowrank_merge_pipe<T, ROWS>(p.jobs[j], blockIdx.x - p.first_block[j],
                                        p.first_block[j + 1] - p.first_block[j]);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_batch_f32(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<float, OFFLOAD_PIPE_TILE_ROWS>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_batch_f16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<__half, OFFLOAD_PIPE_TILE_ROWS>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_THREADS, 2)
offload_lowrank_merge_pipe_batch_bf16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<__nv_bfloat16, OFFLOAD_PIPE_TILE_ROWS>(p);
}

// ---------------------------------------------------------------------------
// Kernel 2c: kernel 2b on 128 x 128 tiles (offload_lowrank_merge_pipe_tall_*,
// and batched offload_lowrank_merge_pipe_tall_batch_*), sixteen warps as
// 4 x 4, one block per SM (at most 128 registers, 48 KiB of shared memory).
//
// Kernel 2b copies a stage's chunk of A (the down factors of its tile's 128
// columns) once per 64-row tile, so a column strip's A is read from L2 once
// for every 64 rows of W: on the default W [1280, 5120] with four rank-128
// adapters that is 105 of the 157 MB a merge moves from L2 into the SMs
// (B: 52), against 26 MB of W from memory. Tiles of 128 rows read each
// chunk of A once for twice the rows (A 52 MB, B 52 MB), the same warps an
// SM (one block of 16 instead of two of 8), each warp's part and code
// unchanged, so the same bits as kernel 2b. The costs: a barrier a stage
// holds 16 warps rather than 8, and grids are coarser (a block per 128
// rows of a strip).

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_f32(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<float, OFFLOAD_PIPE_TALL_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_f16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<__half, OFFLOAD_PIPE_TALL_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_bf16(const OffloadLowRankMergeParams p) {
    offload_lowrank_merge_pipe<__nv_bfloat16, OFFLOAD_PIPE_TALL_TILE_ROWS>(p, blockIdx.x, gridDim.x);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_batch_f32(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<float, OFFLOAD_PIPE_TALL_TILE_ROWS>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_batch_f16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<__half, OFFLOAD_PIPE_TALL_TILE_ROWS>(p);
}

extern "C" __global__ void __launch_bounds__(OFFLOAD_PIPE_TALL_THREADS, 1)
offload_lowrank_merge_pipe_tall_batch_bf16(const OffloadLowRankBatchParams p) {
    offload_lowrank_merge_pipe_batch<__nv_bfloat16, OFFLOAD_PIPE_TALL_TILE_ROWS>(p);
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
