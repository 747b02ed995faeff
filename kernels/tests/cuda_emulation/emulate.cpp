// Runs the CUDA merge kernels (src/cuda/lowrank_merge.cu) on the CPU and
// checks them element by element against an f64 reference written from the
// definitions of the deltas (independently of the kernels' terms and maps),
// with the same tolerance as the Rust tests:
//   |result - exact| <= ulp(exact) + 1e-5 * bound   (ulp 0 for f32 W),
//   bound = |W| + sum |s| |Delta| (each product of factors taken in absolute
//   values), never NaN; rows outside the slice bit-identical.
//
// Twelve groups of random cases (usage: emulate [cases] [all|batch|pipe|stream],
// default 20 all; "batch" runs the four batched groups only, "pipe" the four
// of the pipelined kernel, "stream" the three streaming ones):
//   lowrank: the fp32 FMA low-rank kernel; 1 to 4 adapters, ranks 1 to 70,
//            every dtype for W and each factor.
//   mma:     the tensor-core low-rank kernel; both factors of an adapter f16
//            or both bf16, ranks 1 to 150, 1 to 8 adapters. The warp-wide
//            mma.m16n8k16 is emulated from PTX's fragment layout (below).
//   pipe, pipe-tall: the pipelined tensor-core kernel on 64-row tiles
//            (kernel 2b) and on 128-row tiles (kernel 2c); as mma, with
//            most cases on its cp.async path, W off a 16-byte boundary in
//            every fourth case, and adapters of rank 0. Each pipe-tall
//            result must also be bit for bit kernel 2b's on the same merge.
//   stream8, stream32: the streaming fp32 FMA kernels (kernel 1b); ranks
//            adding up to at most 8 or 32, any dtypes (see stream_cases).
//   stream8s: kernel 1c, the ranks-8 one with the down factors in shared
//            memory; the same cases as stream8, and each result bit for bit
//            that of stream8 on the same merge.
//   general: the kernel for every delta kind: low-rank, LoHa and LoKr (each
//            side stored whole or as a low-rank product), mixed in one
//            launch, 1 to 6 adapters (one case with the most a launch takes),
//            random factor dtypes, LoKr shapes from random divisors of the
//            slice's rows and columns. Twice as many cases as the others.
//   batch, batch-mma, batch-pipe, batch-pipe-tall: the batched low-rank
//            kernels (fp32 FMA, tensor cores, pipelined on both tile heights);
//            4 to 6 tensors ("jobs") per launch of different shapes and row
//            slices, 1 to 4 adapters each (one case with the most jobs a
//            launch takes, one job with the most adapters), each job its own
//            number of blocks (from one per column strip to one per tile,
//            sometimes not a whole number per strip), and sometimes blocks
//            past the last job. In every case some jobs (2 or 3 at a time)
//            merge disjoint row slices of one W buffer: back to back over all
//            of it, as in a fused qkv weight, or with rows between and around
//            them. Besides the f64 check, each job's slice must be
//            bit-identical (memcmp) to the same job launched alone through
//            the one-tensor kernel (offload_lowrank_merge_*, or
//            offload_lowrank_merge_mma_*) with the job's number of blocks, on
//            a copy of its buffer as it was; and each buffer's rows outside
//            every slice, and a guard row past its end, bit-identical to
//            before. Those rows hold negative zeros, so that a block writing
//            back a value it read there (W + 0) is seen too. Half as many
//            cases as lowrank (at least 2).
// Every group uses random row slices (and the whole weight every third case).
// Exit status 0 when every element of every case passes; the last line is
// "all: N cases, F failures".
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 gridDim;
std::barrier<>* emu_barrier;

// ---------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, one warp.
// Each lane publishes its fragments, the warp waits, each lane rebuilds A
// (16 x 16) and B (16 x 8) from all 32 lanes' fragments with the layout of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"),
// computes its four elements of D = A B + C (fp32 FMA, in k order), and the
// warp waits again before the exchange can be reused.

constexpr unsigned kMaxWarps = 16;
thread_local unsigned emu_warp, emu_lane;
struct WarpExchange {
    unsigned a[32][4];
    unsigned b[32][2];
};
static WarpExchange emu_exchange[kMaxWarps];
static std::barrier<>* emu_warp_barrier[kMaxWarps];
static long emu_mma_count[kMaxWarps];

static float decode16(unsigned bits, bool bf16) {
    if (bf16) {
        __nv_bfloat16 h;
        h.x = (uint16_t)bits;
        return __bfloat162float(h);
    }
    __half h;
    h.x = (uint16_t)bits;
    return __half2float(h);
}

static void emu_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool bf16) {
    WarpExchange& x = emu_exchange[emu_warp];
    std::memcpy(x.a[emu_lane], a, sizeof a);
    std::memcpy(x.b[emu_lane], b, sizeof b);
    emu_warp_barrier[emu_warp]->arrive_and_wait();
    float A[16][16], B[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane / 4, t = lane % 4;
        for (unsigned i = 0; i < 8; ++i) {
            const unsigned row = g + 8 * ((i / 2) % 2);
            const unsigned col = 2 * t + (i % 2) + 8 * (i / 4);
            A[row][col] = decode16((x.a[lane][i / 2] >> (16 * (i % 2))) & 0xffffu, bf16);
        }
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = 2 * t + (i % 2) + 8 * (i / 2);
            B[row][g] = decode16((x.b[lane][i / 2] >> (16 * (i % 2))) & 0xffffu, bf16);
        }
    }
    if (emu_lane == 0) emu_mma_count[emu_warp]++;
    emu_warp_barrier[emu_warp]->arrive_and_wait();
    const unsigned g = emu_lane / 4, t = emu_lane % 4;
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i / 2), col = 2 * t + (i % 2);
        float acc = d[i];
        for (unsigned k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
        d[i] = acc;
    }
}

static void offload_mma_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma(d, a, b, false);
}
static void offload_mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma(d, a, b, true);
}

// ---------------------------------------------------------------------------
// cp.async (one thread's copies, in commit groups): a copy poisons its 16
// destination bytes when it is issued (0xff bytes: a NaN in f16 and bf16)
// and writes them only when a wait_group retires its group, so that reading
// a slot before its copies have landed (and a barrier has followed) gives
// NaNs, as does a copy issued into a slot someone still reads.

struct EmuCopy {
    void* dst;
    unsigned char bytes[16];
};
thread_local std::vector<EmuCopy> emu_pending;                  // issued, not committed
thread_local std::vector<std::vector<EmuCopy>> emu_groups;      // committed, oldest first
static std::atomic<long> emu_cp_async_count{0};

// What a GPU would refuse or slow down and the emulation would not notice on
// its own: a cp.async or ldmatrix address that is not 16-byte aligned (a
// misaligned-address fault), a cp.async of other than 0 or 16 bytes, and an
// ldmatrix whose eight rows of one matrix share a 16-byte bank group (a bank
// conflict). Each counts as a failure of the group that ran it.
static std::atomic<long> emu_faults{0};
static long emu_faults_printed_from = 0;  // the running group's first fault
static void emu_fault(const char* what, const void* a) {
    if (emu_faults++ < emu_faults_printed_from + 5) std::printf("fault: %s (address %p)\n", what, a);
}

static void offload_cp_async16(void* dst, const void* src, unsigned bytes) {
    if ((uintptr_t)dst % 16 != 0) emu_fault("cp.async destination not 16-byte aligned", dst);
    if (bytes != 0 && bytes != 16) emu_fault("cp.async of neither 0 nor 16 bytes", src);
    if (bytes != 0 && (uintptr_t)src % 16 != 0) emu_fault("cp.async source not 16-byte aligned", src);
    EmuCopy c;
    c.dst = dst;
    std::memset(c.bytes, 0, 16);
    std::memcpy(c.bytes, src, bytes > 16 ? 16 : bytes);
    std::memset(dst, 0xff, 16);
    emu_pending.push_back(c);
    emu_cp_async_count++;
}

static void offload_cp_async_commit() {
    emu_groups.push_back(std::move(emu_pending));
    emu_pending.clear();
}

template <int N> static void offload_cp_async_wait() {
    while (emu_groups.size() > (size_t)N) {
        for (const EmuCopy& c : emu_groups.front()) std::memcpy(c.dst, c.bytes, 16);
        emu_groups.erase(emu_groups.begin());
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16, one warp: each lane
// publishes its row address, the warp waits, each lane builds its four
// registers from the rows of lanes 8 m .. 8 m + 7 (matrix m) as the PTX ISA
// lays them out, and the warp waits again before the exchange is reused.
static const uint16_t* emu_rows[kMaxWarps][32];

static void emu_ldmatrix(unsigned (&r)[4], const void* row, bool trans) {
    if ((uintptr_t)row % 16 != 0) emu_fault("ldmatrix row not 16-byte aligned", row);
    emu_rows[emu_warp][emu_lane] = static_cast<const uint16_t*>(row);
    emu_warp_barrier[emu_warp]->arrive_and_wait();
    if (emu_lane == 0) {
        for (unsigned m = 0; m < 4; ++m) {
            unsigned groups = 0;  // the 8 bank groups of 16 bytes (128 bytes of banks)
            for (unsigned i = 0; i < 8; ++i) groups |= 1u << (((uintptr_t)emu_rows[emu_warp][8 * m + i] / 16) % 8);
            if (groups != 0xffu) emu_fault("ldmatrix rows of one matrix share a bank group", emu_rows[emu_warp][8 * m]);
        }
    }
    const unsigned g = emu_lane / 4, t = emu_lane % 4;
    for (unsigned m = 0; m < 4; ++m) {
        const uint16_t* const* rows = &emu_rows[emu_warp][8 * m];
        const unsigned lo = trans ? rows[2 * t][g] : rows[g][2 * t];
        const unsigned hi = trans ? rows[2 * t + 1][g] : rows[g][2 * t + 1];
        r[m] = lo | (hi << 16);
    }
    emu_warp_barrier[emu_warp]->arrive_and_wait();
}

static void offload_ldmatrix_x4(unsigned (&r)[4], const void* row) { emu_ldmatrix(r, row, false); }
static void offload_ldmatrix_x4_trans(unsigned (&r)[4], const void* row) { emu_ldmatrix(r, row, true); }
static void offload_prefetch_l2(const void*) {}

// W's 16-byte accesses, which fault on a GPU when not 16-byte aligned.
static void offload_ld16(unsigned (&v)[4], const void* p) {
    if ((uintptr_t)p % 16 != 0) emu_fault("16-byte load of W not 16-byte aligned", p);
    std::memcpy(v, p, 16);
}
static void offload_st16(void* p, const unsigned (&v)[4]) {
    if ((uintptr_t)p % 16 != 0) emu_fault("16-byte store of W not 16-byte aligned", p);
    std::memcpy(p, v, 16);
}

// shfl.sync.bfly, one warp: each lane publishes v, the warp waits, each lane
// reads lane (lane ^ m)'s, and the warp waits again.
static unsigned emu_shfl[kMaxWarps][32];
static unsigned offload_shfl_xor(unsigned v, int m) {
    emu_shfl[emu_warp][emu_lane] = v;
    emu_warp_barrier[emu_warp]->arrive_and_wait();
    const unsigned r = emu_shfl[emu_warp][emu_lane ^ (unsigned)m];
    emu_warp_barrier[emu_warp]->arrive_and_wait();
    return r;
}

// A vector load or store of the streaming kernels: `bytes` at `at` must be
// aligned to them.
static void offload_vector_access(unsigned long long at, unsigned bytes) {
    if (at % bytes != 0) emu_fault("vector access not aligned to its size", (const void*)at);
}

// __syncwarp(): the warp's 32 threads meet (the streaming kernels' slots).
static void __syncwarp() { emu_warp_barrier[emu_warp]->arrive_and_wait(); }

#include "lowrank_merge.cu"

// Runs `kernel` on a grid of (gx, gy) blocks of (bdx, bdy) threads; blocks
// run one after another, each CUDA thread an OS thread.
template <typename P>
static void launch_grid(void (*kernel)(const P), const P& p, unsigned bdx, unsigned bdy, unsigned gx,
                        unsigned gy) {
    const unsigned threads = bdx * bdy;
    for (unsigned by = 0; by < gy; ++by) {
        for (unsigned bx = 0; bx < gx; ++bx) {
            std::barrier<> bar(threads);
            emu_barrier = &bar;
            std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
            for (unsigned w = 0; w < threads / 32; ++w) {
                warp_bars.push_back(std::make_unique<std::barrier<>>(32));
                emu_warp_barrier[w] = warp_bars.back().get();
            }
            std::vector<std::thread> pool;
            for (unsigned tid = 0; tid < threads; ++tid) {
                pool.emplace_back([=, &p] {
                    threadIdx = {tid % bdx, tid / bdx, 0};
                    blockIdx = {bx, by, 0};
                    gridDim = {gx, gy, 1};
                    emu_warp = tid / 32;
                    emu_lane = tid % 32;
                    kernel(p);
                });
            }
            for (auto& t : pool) t.join();
        }
    }
}

// The general kernel: one block per 64 x 64 tile, as documented in the source.
template <typename P>
static void launch(void (*kernel)(const P), const P& p, unsigned bdx, unsigned bdy) {
    launch_grid(kernel, p, bdx, bdy, (p.cols + OFFLOAD_TILE_COLS - 1) / OFFLOAD_TILE_COLS,
                (p.rows + OFFLOAD_TILE_ROWS - 1) / OFFLOAD_TILE_ROWS);
}

// The low-rank kernels (tiles of `tile_rows` x 128): a block per column strip
// and `per_strip` blocks down each (at most the strip's tiles), as
// offload_kernels::cuda computes it from the GPU's size; `extra` blocks past
// the whole multiple must merge nothing.
template <typename P>
static void launch_lowrank(void (*kernel)(const P), const P& p, unsigned per_strip, unsigned extra,
                           unsigned tile_rows, unsigned threads = OFFLOAD_LR_THREADS) {
    const unsigned tiles_x = (p.cols + OFFLOAD_LR_TILE_COLS - 1) / OFFLOAD_LR_TILE_COLS;
    const unsigned tiles_y = (p.rows + tile_rows - 1) / tile_rows;
    per_strip = std::max(1u, std::min(per_strip, tiles_y));
    launch_grid(kernel, p, threads, 1, tiles_x * per_strip + extra, 1);
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

static size_t dsize(unsigned dt) { return dt == OFFLOAD_DTYPE_F32 ? 4 : 2; }

static double ulp(unsigned dt, double x) {
    if (dt == OFFLOAD_DTYPE_F32) return 0;
    const int mant = dt == OFFLOAD_DTYPE_F16 ? 10 : 7;
    const int emin = dt == OFFLOAD_DTYPE_F16 ? -14 : -126;
    const int e = x == 0 ? emin : std::max((int)std::floor(std::log2(std::fabs(x))), emin);
    return std::ldexp(1.0, e - mant);
}

static std::mt19937_64 rng(42);
static std::uniform_real_distribution<float> uniform(-1, 1);

// A random row-major factor on the host: its bytes (the "device" memory of
// the emulation) and its values as f64.
struct Mat {
    unsigned dt = 0, rows = 0, cols = 0;
    size_t off = 0;  // bytes before the first element (2: not 16-byte aligned)
    std::vector<unsigned char> bytes;
    std::vector<double> v;
    unsigned long long addr() const { return (unsigned long long)(bytes.data() + off); }
    double at(unsigned i, unsigned j) const { return v[(size_t)i * cols + j]; }
};

static Mat rand_mat(unsigned rows, unsigned cols, unsigned dt, bool misaligned = false) {
    Mat m;
    m.dt = dt;
    m.rows = rows;
    m.cols = cols;
    m.off = misaligned ? 2 : 0;
    m.bytes.resize((size_t)rows * cols * dsize(dt) + m.off);
    m.v.resize((size_t)rows * cols);
    unsigned char* base = m.bytes.data() + m.off;
    for (size_t i = 0; i < m.v.size(); ++i) {
        encode(dt, base, i, uniform(rng));
        m.v[i] = decode(dt, base, i);
    }
    return m;
}

// The textbook product, and the product of the absolute values.
static void matmul(const Mat& a, const Mat& b, std::vector<double>& p, std::vector<double>& pa) {
    p.assign((size_t)a.rows * b.cols, 0);
    pa.assign((size_t)a.rows * b.cols, 0);
    for (unsigned i = 0; i < a.rows; ++i)
        for (unsigned j = 0; j < b.cols; ++j) {
            double s = 0, sa = 0;
            for (unsigned k = 0; k < a.cols; ++k) {
                s += a.at(i, k) * b.at(k, j);
                sa += std::fabs(a.at(i, k)) * std::fabs(b.at(k, j));
            }
            p[(size_t)i * b.cols + j] = s;
            pa[(size_t)i * b.cols + j] = sa;
        }
}

// One case's weight: the whole matrix, the slice, and the f64 expectation.
struct Weight {
    unsigned dt, out, cols, r0, n;
    std::vector<unsigned char> w, w0;
    std::vector<double> exact, bound;  // over the slice, n x cols
};

// A random weight, of dtype `dt` (a random one when dt is 3 or more).
static Weight rand_weight(unsigned out, unsigned cols, unsigned r0, unsigned n, unsigned dt = 3) {
    Weight W;
    W.dt = dt < 3 ? dt : rng() % 3;
    W.out = out;
    W.cols = cols;
    W.r0 = r0;
    W.n = n;
    W.w.resize((size_t)out * cols * dsize(W.dt));
    for (size_t i = 0; i < (size_t)out * cols; ++i) encode(W.dt, W.w.data(), i, 2 * uniform(rng));
    W.w0 = W.w;
    W.exact.resize((size_t)n * cols);
    W.bound.resize((size_t)n * cols);
    for (unsigned i = 0; i < n; ++i)
        for (unsigned j = 0; j < cols; ++j) {
            const double x = decode(W.dt, W.w0.data(), (size_t)(r0 + i) * cols + j);
            W.exact[(size_t)i * cols + j] = x;
            W.bound[(size_t)i * cols + j] = std::fabs(x);
        }
    return W;
}

// Adds s * delta (and |s| * its bound) to the expectation.
static void add_delta(Weight& W, float s, const std::vector<double>& d, const std::vector<double>& da) {
    for (size_t i = 0; i < W.exact.size(); ++i) {
        W.exact[i] += (double)s * d[i];
        W.bound[i] += std::fabs((double)s) * da[i];
    }
}

// A random slice of a random weight; the whole weight every third case.
static void rand_slice(int c, unsigned max_out, unsigned& out, unsigned& r0, unsigned& n) {
    out = 1 + rng() % max_out;
    r0 = rng() % out;
    n = 1 + rng() % (out - r0);
    if (c % 3 == 0) {
        r0 = 0;
        n = out;
    }
}

// Rows of a weight (out x cols elements of dtype dt, then `guard` more rows
// past its end) that no merge covers (covered[i] false) must be
// bit-identical to w0. `where` names the weight in messages, `outside` the
// rows checked.
static long check_untouched(const char* group, int c, const char* where, const char* outside, unsigned dt,
                            unsigned rows, unsigned cols, const std::vector<unsigned char>& w,
                            const std::vector<unsigned char>& w0, const std::vector<bool>& covered) {
    long failures = 0;
    const size_t sz = dsize(dt), row = (size_t)cols * sz;
    for (unsigned i = 0; i < rows; ++i) {
        if (covered[i] || std::memcmp(&w[i * row], &w0[i * row], row) == 0) continue;
        for (unsigned j = 0; j < cols; ++j) {
            const size_t at = ((size_t)i * cols + j) * sz;
            if (std::memcmp(&w[at], &w0[at], sz) != 0) {
                if (failures++ < 5)
                    std::printf("%s case %d%s: [%u, %u] %s changed\n", group, c, where, i, j, outside);
            }
        }
    }
    return failures;
}

// Rows r0 .. r0 + n - 1 of `w` (dtype dt, `cols` columns) against the f64
// expectation over the slice (exact, bound: n x cols).
static long check_values(const char* group, int c, const char* where, unsigned dt, unsigned cols, unsigned r0,
                         unsigned n, const std::vector<unsigned char>& w, const std::vector<double>& exact,
                         const std::vector<double>& bound) {
    long failures = 0;
    for (unsigned i = r0; i < r0 + n; ++i) {
        for (unsigned j = 0; j < cols; ++j) {
            const size_t e = (size_t)(i - r0) * cols + j;
            const double got = decode(dt, w.data(), (size_t)i * cols + j);
            const double allowed = ulp(dt, exact[e]) + 1e-5 * bound[e];
            if (std::isnan(got) || !(std::fabs(got - exact[e]) <= allowed)) {
                if (failures++ < 5)
                    std::printf("%s case %d%s: [%u, %u] W dtype %u: got %.9g, exact %.9g, allowed %g\n", group,
                                c, where, i, j, dt, got, exact[e], allowed);
            }
        }
    }
    return failures;
}

static long check(const char* group, int c, const Weight& W) {
    std::vector<bool> covered(W.out, false);
    for (unsigned i = W.r0; i < W.r0 + W.n; ++i) covered[i] = true;
    return check_untouched(group, c, "", "outside the slice", W.dt, W.out, W.cols, W.w, W.w0, covered) +
           check_values(group, c, "", W.dt, W.cols, W.r0, W.n, W.w, W.exact, W.bound);
}

template <typename T>
static T pick(unsigned dt, T f32, T f16, T bf16) {
    return dt == OFFLOAD_DTYPE_F32 ? f32 : dt == OFFLOAD_DTYPE_F16 ? f16 : bf16;
}

// The low-rank kernels: fp32 FMA (any factor dtypes), and the tensor-core
// ones (both factors of an adapter f16 or both bf16), kernel 2, the
// pipelined kernel 2b and its 128-row form, kernel 2c (PIPE_TALL).
enum Kind { FMA, MMA, PIPE, PIPE_TALL };
static const char* kind_name(Kind k, bool batch) {
    if (batch) return k == FMA ? "batch" : k == MMA ? "batch-mma" : k == PIPE ? "batch-pipe" : "batch-pipe-tall";
    return k == FMA ? "lowrank" : k == MMA ? "mma" : k == PIPE ? "pipe" : "pipe-tall";
}
static bool is_pipe(Kind k) { return k == PIPE || k == PIPE_TALL; }
static unsigned kind_tile_rows(Kind k) {
    return k == PIPE ? OFFLOAD_PIPE_TILE_ROWS : k == PIPE_TALL ? OFFLOAD_PIPE_TALL_TILE_ROWS : OFFLOAD_LR_TILE_ROWS;
}
static unsigned kind_threads(Kind k) {
    return k == PIPE ? OFFLOAD_PIPE_THREADS : k == PIPE_TALL ? OFFLOAD_PIPE_TALL_THREADS : OFFLOAD_LR_THREADS;
}

// For the pipelined kernel, most cases take its copy path (ranks and
// column counts multiples of 8, factors 16-byte aligned); the others, and
// a misaligned factor now and then, its plain-load path.
static unsigned pipe_rank(unsigned rank) { return rng() % 3 != 0 ? 8 * ((rank + 7) / 8) : rank; }

// A random low-rank adapter of `rank` over an n x cols slice for a kernel
// of kind `kind` (the tensor-core ones: both factors f16 or both bf16; the
// pipelined one: now and then a factor off a 16-byte boundary), its factors
// kept in `store`; its delta and the delta's bound (as matmul gives them)
// in d and da.
static OffloadLowRankAdapter rand_adapter(Kind kind, unsigned n, unsigned rank, unsigned cols,
                                          std::vector<Mat>& store, std::vector<double>& d,
                                          std::vector<double>& da) {
    const bool mma = kind != FMA;
    const unsigned udt = mma ? 1 + rng() % 2 : rng() % 3;
    const unsigned ddt = mma ? udt : rng() % 3;
    const bool misaligned = is_pipe(kind) && rng() % 8 == 0;
    store.push_back(rand_mat(n, rank, udt, misaligned));
    store.push_back(rand_mat(rank, cols, ddt, misaligned && rng() % 2 == 0));
    const Mat& up = store[store.size() - 2];
    const Mat& down = store.back();
    const float scale = 2 * uniform(rng);
    matmul(up, down, d, da);
    return {up.addr(), down.addr(), rank, udt, ddt, scale};
}

// W moved to an address aligned to its element but not to 16 bytes (2, 4
// or 8 bytes past), which must not take the 16-byte accesses: `shift`
// points the launch at a copy of W's bytes there, `restore` copies the
// merged bytes back into W.
struct ShiftedW {
    std::vector<unsigned char> bytes;
    size_t off = 0;
    void shift(const Weight& W, OffloadLowRankMergeParams& p) {
        off = dsize(W.dt) * (1 + rng() % (W.dt == OFFLOAD_DTYPE_F32 ? 2 : 4));
        bytes.assign(W.w.size() + 16, 0);
        std::memcpy(bytes.data() + off, W.w.data(), W.w.size());
        p.w = (unsigned long long)(bytes.data() + off);
    }
    void restore(Weight& W) const {
        if (off != 0) std::memcpy(W.w.data(), bytes.data() + off, W.w.size());
    }
};

// W, just merged by one kernel, against the same merge run again by
// `relaunch(p)` on another kernel that must give the same bits (the same
// sums in the same order), from W's bytes as they were and at the same
// alignment (`shifted`); W is left with the first kernel's result. Returns
// the failures (0 or 1) and says which case differs.
template <typename P, typename F>
static long same_bits_as(const char* group, int c, const char* other, Weight& W, ShiftedW& shifted, P& p,
                         F relaunch) {
    const std::vector<unsigned char> got = W.w;
    std::memcpy(W.w.data(), W.w0.data(), W.w.size());
    if (shifted.off != 0) {
        std::memcpy(shifted.bytes.data() + shifted.off, W.w0.data(), W.w.size());
    } else {
        p.w = (unsigned long long)W.w.data();
    }
    relaunch(p);
    shifted.restore(W);
    const bool same = std::memcmp(W.w.data(), got.data(), got.size()) == 0;
    std::memcpy(W.w.data(), got.data(), got.size());
    if (!same) std::printf("%s case %d: not bit-identical to %s on the same merge\n", group, c, other);
    return same ? 0 : 1;
}

// Low-rank cases for one kernel.
static long lowrank_cases(int cases, Kind kind) {
    const char* group = kind_name(kind, false);
    const bool mma = kind != FMA;
    const long copies0 = emu_cp_async_count, faults0 = emu_faults;
    emu_faults_printed_from = faults0;
    long failures = 0, elements = 0;
    // For 128-row tiles, twice the rows (so that most slices are more than
    // one tile down there too).
    const unsigned tall = kind == PIPE_TALL ? 2 : 1;
    for (int c = 0; c < cases; ++c) {
        unsigned out, r0, n, cols = 1 + rng() % 150;
        rand_slice(c, 150 * tall, out, r0, n);
        if (c == 1) {  // whole tiles, whole rank chunks
            out = n = 128 * tall;
            r0 = 0;
            cols = 64;
        }
        // Every fifth case: three to five column strips and five tiles down
        // (three of 128 rows; so a block walks several tiles, and a grid
        // that is not a whole number of blocks per strip leaves blocks with
        // no tile).
        const bool wide = c % 5 == 4;
        if (wide) {
            cols = 257 + rng() % 384;
            out = 150 * tall;
            r0 = 3 * tall;
            n = 140 * tall;
        }
        if (is_pipe(kind) && rng() % 3 != 0) cols = 8 * ((cols + 7) / 8);
        // Every sixth case: small ranks that add up to at most 32 (A staged
        // once per block and kept while the block walks its strip).
        const bool small_ranks = c % 6 == 5;
        Weight W = rand_weight(out, cols, r0, n);
        OffloadLowRankMergeParams p{};
        p.w = (unsigned long long)W.w.data();
        p.rows = n;
        p.cols = cols;
        p.row0 = r0;
        p.num_adapters = mma ? 1 + rng() % OFFLOAD_MAX_ADAPTERS : 1 + rng() % 4;
        if (mma && c % 4 == 2) p.num_adapters = 1;
        if (small_ranks) p.num_adapters = 1 + rng() % 4;
        std::vector<Mat> store;
        store.reserve(2 * p.num_adapters);
        for (unsigned a = 0; a < p.num_adapters; ++a) {
            unsigned rank = mma ? 1 + rng() % 150 : 1 + rng() % 70;
            if (is_pipe(kind)) rank = pipe_rank(rank);
            // Now and then an adapter of rank 0, the first one included: it
            // adds nothing (and a launch whose adapters all have rank 0
            // leaves W as it is).
            if (is_pipe(kind) && rng() % 6 == 0) rank = 0;
            if (c == 1) rank = 64;
            if (small_ranks) rank = 1 + rng() % 8;
            std::vector<double> d, da;
            p.adapters[a] = rand_adapter(kind, n, rank, cols, store, d, da);
            add_delta(W, p.adapters[a].scale, d, da);
        }
        // Blocks per column strip: one (each walks every tile of its strip),
        // a few, or one per tile; and sometimes blocks past the whole
        // multiple, which must merge nothing.
        const unsigned tiles_x = (cols + OFFLOAD_LR_TILE_COLS - 1) / OFFLOAD_LR_TILE_COLS;
        const unsigned per_strip =
            small_ranks || c % 3 == 0 ? 1 : (wide || c % 3 == 1 ? 1 + rng() % 3 : 1000);
        // Fewer extra blocks than strips: they get a row of tiles of their own
        // unless the walk refuses them.
        const unsigned extra = tiles_x > 1 && (wide || c % 2 == 0) ? 1 + rng() % (tiles_x - 1) : 0;
        const unsigned tile_rows = kind_tile_rows(kind);
        if (kind == MMA) {
            launch_lowrank(pick(W.dt, offload_lowrank_merge_mma_f32, offload_lowrank_merge_mma_f16,
                                offload_lowrank_merge_mma_bf16),
                           p, per_strip, extra, tile_rows);
        } else if (is_pipe(kind)) {
            // Every fourth case: W off a 16-byte boundary.
            ShiftedW shifted;
            if (c % 4 == 3) shifted.shift(W, p);
            auto pipe = pick(W.dt, offload_lowrank_merge_pipe_f32, offload_lowrank_merge_pipe_f16,
                             offload_lowrank_merge_pipe_bf16);
            auto tall = pick(W.dt, offload_lowrank_merge_pipe_tall_f32, offload_lowrank_merge_pipe_tall_f16,
                             offload_lowrank_merge_pipe_tall_bf16);
            launch_lowrank(kind == PIPE ? pipe : tall, p, per_strip, extra, tile_rows, kind_threads(kind));
            shifted.restore(W);
            if (kind == PIPE_TALL) {
                // Kernel 2b (64-row tiles, its own blocks) gives the same bits.
                failures += same_bits_as(group, c, "pipe", W, shifted, p, [&](const OffloadLowRankMergeParams& q) {
                    launch_lowrank(pipe, q, per_strip, extra, OFFLOAD_PIPE_TILE_ROWS, OFFLOAD_PIPE_THREADS);
                });
            }
        } else {
            launch_lowrank(
                pick(W.dt, offload_lowrank_merge_f32, offload_lowrank_merge_f16, offload_lowrank_merge_bf16), p,
                per_strip, extra, tile_rows);
        }
        failures += check(group, c, W);
        elements += (long)n * cols;
    }
    failures += emu_faults - faults0;
    std::printf("%s: %d cases, %ld elements, %ld cp.async copies, %ld failures\n", group, cases, elements,
                emu_cp_async_count - copies0, failures);
    return failures;
}

// The streaming fp32 FMA kernels (kernel 1b): ranks adding up to at most
// kmax (8 or 32) over 1 to 4 adapters (some of rank 0), every dtype for W and
// each factor; one to several column strips of 32 * CPT columns, and rows
// not a whole number of groups; blocks per strip from one (each warp walks
// many groups) to more than the strip has groups for (warps with none), and
// blocks past the whole multiple; every fourth W off a 16-byte boundary
// (element by element), and column counts that leave the last lane of a
// strip part of a row.
static long stream_cases(int cases, unsigned kmax, bool shared = false) {
    const char* group = shared ? "stream8s" : kmax == 8 ? "stream8" : "stream32";
    const long faults0 = emu_faults;
    emu_faults_printed_from = faults0;
    const unsigned cpt = kmax == 8 ? 8 : 2;
    const unsigned sw = 32 * cpt;
    long failures = 0, elements = 0;
    for (int c = 0; c < cases; ++c) {
        unsigned out, r0, n, cols = 1 + rng() % (3 * sw);
        rand_slice(c, 150, out, r0, n);
        if (c % 4 == 1) cols = sw * (1 + rng() % 3);  // whole strips, vector rows
        if (c % 5 == 4) {
            out = 300;
            r0 = 7;
            n = 290;
        }
        Weight W = rand_weight(out, cols, r0, n);
        OffloadLowRankMergeParams p{};
        p.w = (unsigned long long)W.w.data();
        p.rows = n;
        p.cols = cols;
        p.row0 = r0;
        p.num_adapters = 1 + rng() % 4;
        unsigned left = c % 3 == 0 ? kmax : 1 + rng() % kmax;  // ranks' sum
        std::vector<Mat> store;
        store.reserve(2 * p.num_adapters);
        for (unsigned a = 0; a < p.num_adapters; ++a) {
            unsigned rank = a + 1 == p.num_adapters ? left : rng() % (left + 1);
            if (rng() % 8 == 0) rank = 0;
            left -= rank;
            std::vector<double> d, da;
            p.adapters[a] = rand_adapter(FMA, n, rank, cols, store, d, da);
            add_delta(W, p.adapters[a].scale, d, da);
        }
        const unsigned rows_per_group = (W.dt == OFFLOAD_DTYPE_F32 ? 0.5 : 1) * (shared ? 4 : kmax == 8 ? 2 : 8);
        const unsigned groups = (n + rows_per_group - 1) / rows_per_group;
        const unsigned tiles_x = (cols + sw - 1) / sw;
        unsigned per_strip = c % 3 == 0 ? 1 : (c % 3 == 1 ? 1 + rng() % 3 : groups / OFFLOAD_ST_WARPS + 2);
        const unsigned extra = tiles_x > 1 && c % 2 == 0 ? 1 + rng() % (tiles_x - 1) : 0;
        ShiftedW shifted;
        if (c % 4 == 3) shifted.shift(W, p);
        auto stream8 = pick(W.dt, offload_lowrank_merge_stream8_f32, offload_lowrank_merge_stream8_f16,
                            offload_lowrank_merge_stream8_bf16);
        auto kernel = shared      ? pick(W.dt, offload_lowrank_merge_stream8s_f32, offload_lowrank_merge_stream8s_f16,
                                         offload_lowrank_merge_stream8s_bf16)
                      : kmax == 8 ? stream8
                                  : pick(W.dt, offload_lowrank_merge_stream32_f32, offload_lowrank_merge_stream32_f16,
                                         offload_lowrank_merge_stream32_bf16);
        const unsigned grid = tiles_x * per_strip + extra;
        launch_grid(kernel, p, OFFLOAD_ST_THREADS, 1, grid, 1);
        shifted.restore(W);
        failures += check(group, c, W);
        elements += (long)n * cols;
        if (shared) {
            // Kernel 1b gives the same bits.
            failures += same_bits_as(group, c, "stream8", W, shifted, p, [&](const OffloadLowRankMergeParams& q) {
                launch_grid(stream8, q, OFFLOAD_ST_THREADS, 1, grid, 1);
            });
        }
    }
    failures += emu_faults - faults0;
    std::printf("%s: %d cases, %ld elements, %ld failures\n", group, cases, elements, failures);
    return failures;
}

// A W buffer of a batched case: one tensor, or a fused weight (such as a
// qkv projection) of which several jobs merge disjoint row slices. Rows
// outside every slice are negative zeros, and so is one guard row past the
// weight's end (what an arena puts there): a block that writes back a value
// it read there (W + 0, which is W for any other value) turns one into +0.
struct BatchBuffer {
    unsigned out, cols;
    std::vector<unsigned char> w, w0;  // (out + 1) x cols: the weight, then the guard row
    std::vector<bool> covered;         // rows in some job's slice
    std::vector<unsigned> jobs;
};

// A job of a batched case: its slice of a buffer, its f64 expectation, and
// its blocks in the grid.
struct BatchJob {
    unsigned buf, r0, n, blocks;
    std::vector<double> exact, bound;
};

// The slice rows r0 .. r0 + n - 1 of `w` and `alone` (dtype dt, `cols`
// columns) byte for byte: the batched launch's result against the one of
// the job launched alone.
static long check_identical(const char* group, int c, unsigned job, unsigned dt, unsigned cols, unsigned r0,
                            unsigned n, const std::vector<unsigned char>& w,
                            const std::vector<unsigned char>& alone) {
    const size_t sz = dsize(dt), first = (size_t)r0 * cols * sz, len = (size_t)n * cols * sz;
    if (std::memcmp(&w[first], &alone[first], len) == 0) return 0;
    long differ = 0;
    size_t at0 = 0;
    for (size_t e = (size_t)r0 * cols; e < (size_t)(r0 + n) * cols; ++e) {
        if (std::memcmp(&w[e * sz], &alone[e * sz], sz) != 0 && differ++ == 0) at0 = e;
    }
    std::printf("%s case %d job %u: %ld of %zu elements not bit-identical to the job launched alone, first "
                "[%zu, %zu] W dtype %u: batched %.9g, alone %.9g\n",
                group, c, job, differ, (size_t)n * cols, at0 / cols, at0 % cols, dt, decode(dt, w.data(), at0),
                decode(dt, alone.data(), at0));
    return differ;
}

// Batched cases for the batched kernels (mma: the tensor-core one). Jobs 0
// and 1 (special shapes, below) and some others have a buffer of their own;
// the others come in groups of 2 or 3 that merge row slices of one buffer
// (at least one group per case). Each job's slice is checked against the
// f64 reference like a one-tensor case, and byte for byte against the same
// job launched alone through the one-tensor kernel, on a copy of its buffer
// as it was before the batched launch, with the job's number of blocks;
// each buffer's rows outside every slice (and its guard row) must be
// unchanged, bit for bit.
static long batch_cases(int cases, Kind kind) {
    const char* group = kind_name(kind, true);
    const bool mma = kind != FMA;
    const long copies0 = emu_cp_async_count, faults0 = emu_faults;
    emu_faults_printed_from = faults0;
    long failures = 0, elements = 0, jobs_total = 0, blocks_total = 0, idle_total = 0;
    long shared_buffers = 0, shared_jobs = 0, fused_buffers = 0, identical = 0;
    for (int c = 0; c < cases; ++c) {
        // The first case: the most jobs a launch takes, small ones.
        const bool full = c == 0;
        const unsigned num_jobs = full ? OFFLOAD_BATCH_MAX_JOBS : 4 + rng() % 3;
        // One W dtype per launch, f32, f16 and bf16 in turn (so that a run of
        // two cases has f32, where a sum's order shows in every bit, and a
        // 16-bit type).
        const unsigned wdt = c % 3;
        std::vector<BatchBuffer> bufs;
        std::vector<BatchJob> jobs;
        bufs.reserve(num_jobs);
        jobs.reserve(num_jobs);
        auto add_buffer = [&](unsigned out, unsigned cols) {
            BatchBuffer B;
            B.out = out;
            B.cols = cols;
            B.covered.assign(out + 1, false);
            bufs.push_back(std::move(B));
            return (unsigned)bufs.size() - 1;
        };
        auto add_job = [&](unsigned buf, unsigned r0, unsigned n) {
            BatchJob J;
            J.buf = buf;
            J.r0 = r0;
            J.n = n;
            J.blocks = 0;
            bufs[buf].jobs.push_back((unsigned)jobs.size());
            for (unsigned i = r0; i < r0 + n; ++i) bufs[buf].covered[i] = true;
            jobs.push_back(std::move(J));
        };
        // The first job of every case: three tiles down a row slice (two of
        // 64 or 128 rows), one block per column strip (each walks its
        // strip), the most adapters a job takes. The second: three column
        // strips and four tiles down (two of 64 or 128 rows), a block per
        // tile (more blocks than most jobs).
        auto pipe_cols = [&](unsigned cols) {
            return is_pipe(kind) && rng() % 3 != 0 ? 8 * ((cols + 7) / 8) : cols;
        };
        // For 128-row tiles, twice as many rows (so that they are more than
        // one tile down there too).
        const unsigned tall = kind == PIPE_TALL ? 2 : 1;
        add_job(add_buffer(75 * tall, pipe_cols(1 + rng() % (full ? 140 : 300))), 5 * tall,
                (65 + rng() % 5) * tall);
        add_job(add_buffer(130 * tall, pipe_cols(300 + rng() % 60)), 2 * tall, 120 * tall);
        while (jobs.size() < num_jobs) {
            const unsigned left = num_jobs - (unsigned)jobs.size();
            const unsigned k = std::min<unsigned>(left, bufs.size() == 2 ? 2 + rng() % 2 : 1 + rng() % 3);
            const unsigned cols = pipe_cols(1 + rng() % (full ? 140 : 300));
            if (k == 1) {
                unsigned out, r0, n;
                rand_slice(c + (int)jobs.size(), full ? 40 : 110, out, r0, n);
                add_job(add_buffer(out, cols), r0, n);
                continue;
            }
            // k slices of one buffer: back to back over all of it (a fused
            // weight such as qkv), or with rows between and around them
            // (sometimes none); the jobs take them in row order or reversed.
            const bool fused = rng() % 2 == 0;
            std::vector<unsigned> r0s, ns;
            unsigned row = fused ? 0 : rng() % 8;
            for (unsigned i = 0; i < k; ++i) {
                r0s.push_back(row);
                ns.push_back(1 + rng() % (full ? 30 : 75));
                row += ns.back() + (fused ? 0 : rng() % 8);
            }
            const unsigned buf = add_buffer(row, cols);
            const bool reversed = rng() % 2 == 0;
            for (unsigned i = 0; i < k; ++i) {
                const unsigned s = reversed ? k - 1 - i : i;
                add_job(buf, r0s[s], ns[s]);
            }
            shared_buffers++;
            shared_jobs += k;
            fused_buffers += fused;
        }
        for (BatchBuffer& B : bufs) {
            B.w.resize((size_t)(B.out + 1) * B.cols * dsize(wdt));
            for (unsigned i = 0; i <= B.out; ++i)
                for (unsigned j = 0; j < B.cols; ++j)
                    encode(wdt, B.w.data(), (size_t)i * B.cols + j, B.covered[i] ? 2 * uniform(rng) : -0.0f);
            B.w0 = B.w;
        }

        OffloadLowRankBatchParams p{};
        p.num_jobs = num_jobs;
        std::vector<Mat> store;
        store.reserve(2 * OFFLOAD_BATCH_MAX_ADAPTERS * num_jobs);
        unsigned next_block = 0;
        for (unsigned j = 0; j < num_jobs; ++j) {
            BatchJob& J = jobs[j];
            const BatchBuffer& B = bufs[J.buf];
            const unsigned n = J.n, cols = B.cols;
            J.exact.resize((size_t)n * cols);
            J.bound.resize((size_t)n * cols);
            for (size_t e = 0; e < (size_t)n * cols; ++e) {
                J.exact[e] = decode(wdt, B.w0.data(), (size_t)J.r0 * cols + e);
                J.bound[e] = std::fabs(J.exact[e]);
            }
            OffloadLowRankJob& job = p.jobs[j];
            job.w = (unsigned long long)B.w.data();
            job.rows = n;
            job.cols = cols;
            job.row0 = J.r0;
            job.num_adapters = j == 0 ? OFFLOAD_BATCH_MAX_ADAPTERS : 1 + rng() % OFFLOAD_BATCH_MAX_ADAPTERS;
            for (unsigned a = 0; a < job.num_adapters; ++a) {
                // Small ranks in every third job (A kept across tiles).
                unsigned rank = j % 3 == 2 ? 1 + rng() % 8 : 1 + rng() % (mma ? 100 : 70);
                if (is_pipe(kind)) rank = pipe_rank(rank);
                if (is_pipe(kind) && rng() % 6 == 0) rank = 0;
                std::vector<double> d, da;
                job.adapters[a] = rand_adapter(kind, n, rank, cols, store, d, da);
                const float scale = job.adapters[a].scale;
                for (size_t e = 0; e < d.size(); ++e) {
                    J.exact[e] += (double)scale * d[e];
                    J.bound[e] += std::fabs((double)scale) * da[e];
                }
            }
            // The job's blocks: a whole number per column strip (one, a few,
            // or one per tile), and in some jobs a few more than a whole
            // number, which must merge nothing.
            const unsigned tiles_x = (cols + OFFLOAD_LR_TILE_COLS - 1) / OFFLOAD_LR_TILE_COLS;
            const unsigned tiles_y = (n + kind_tile_rows(kind) - 1) / kind_tile_rows(kind);
            const unsigned pick_per = j == 0 ? 0 : j == 1 ? 1000 : rng() % 3;
            unsigned per_strip = pick_per == 0 ? 1 : (pick_per == 1 ? 1 + rng() % 3 : 1000);
            per_strip = std::max(1u, std::min(per_strip, tiles_y));
            const unsigned extra = tiles_x > 1 && (j == 0 || rng() % 3 == 0) ? 1 + rng() % (tiles_x - 1) : 0;
            J.blocks = tiles_x * per_strip + extra;
            p.first_block[j] = next_block;
            next_block += J.blocks;
            idle_total += extra;
            elements += (long)n * cols;
        }
        p.first_block[num_jobs] = next_block;
        // Blocks past the last job's, which must merge nothing.
        const unsigned after = c % 2 == 1 ? 1 + rng() % 3 : 0;
        idle_total += after;
        if (kind == MMA) {
            launch_grid(pick(wdt, offload_lowrank_merge_mma_batch_f32, offload_lowrank_merge_mma_batch_f16,
                             offload_lowrank_merge_mma_batch_bf16),
                        p, OFFLOAD_LR_THREADS, 1, next_block + after, 1);
        } else if (kind == PIPE) {
            launch_grid(pick(wdt, offload_lowrank_merge_pipe_batch_f32, offload_lowrank_merge_pipe_batch_f16,
                             offload_lowrank_merge_pipe_batch_bf16),
                        p, OFFLOAD_PIPE_THREADS, 1, next_block + after, 1);
        } else if (kind == PIPE_TALL) {
            launch_grid(pick(wdt, offload_lowrank_merge_pipe_tall_batch_f32, offload_lowrank_merge_pipe_tall_batch_f16,
                             offload_lowrank_merge_pipe_tall_batch_bf16),
                        p, OFFLOAD_PIPE_TALL_THREADS, 1, next_block + after, 1);
        } else {
            launch_grid(pick(wdt, offload_lowrank_merge_batch_f32, offload_lowrank_merge_batch_f16,
                             offload_lowrank_merge_batch_bf16),
                        p, OFFLOAD_LR_THREADS, 1, next_block + after, 1);
        }

        char where[64];
        for (unsigned j = 0; j < num_jobs; ++j) {
            const BatchJob& J = jobs[j];
            const BatchBuffer& B = bufs[J.buf];
            std::snprintf(where, sizeof where, " job %u", j);
            failures += check_values(group, c, where, wdt, B.cols, J.r0, J.n, B.w, J.exact, J.bound);
            // The job alone: the one-tensor kernel on a copy of the buffer as
            // it was, with the job's parameters and blocks.
            std::vector<unsigned char> alone = B.w0;
            OffloadLowRankMergeParams q{};
            q.w = (unsigned long long)alone.data();
            q.rows = p.jobs[j].rows;
            q.cols = p.jobs[j].cols;
            q.row0 = p.jobs[j].row0;
            q.num_adapters = p.jobs[j].num_adapters;
            for (unsigned a = 0; a < q.num_adapters; ++a) q.adapters[a] = p.jobs[j].adapters[a];
            if (kind == MMA) {
                launch_grid(pick(wdt, offload_lowrank_merge_mma_f32, offload_lowrank_merge_mma_f16,
                                 offload_lowrank_merge_mma_bf16),
                            q, OFFLOAD_LR_THREADS, 1, J.blocks, 1);
            } else if (kind == PIPE) {
                launch_grid(pick(wdt, offload_lowrank_merge_pipe_f32, offload_lowrank_merge_pipe_f16,
                                 offload_lowrank_merge_pipe_bf16),
                            q, OFFLOAD_PIPE_THREADS, 1, J.blocks, 1);
            } else if (kind == PIPE_TALL) {
                launch_grid(pick(wdt, offload_lowrank_merge_pipe_tall_f32, offload_lowrank_merge_pipe_tall_f16,
                                 offload_lowrank_merge_pipe_tall_bf16),
                            q, OFFLOAD_PIPE_TALL_THREADS, 1, J.blocks, 1);
            } else {
                launch_grid(
                    pick(wdt, offload_lowrank_merge_f32, offload_lowrank_merge_f16, offload_lowrank_merge_bf16), q,
                    OFFLOAD_LR_THREADS, 1, J.blocks, 1);
            }
            const long differ = check_identical(group, c, j, wdt, B.cols, J.r0, J.n, B.w, alone);
            failures += differ;
            identical += differ == 0;
        }
        for (size_t b = 0; b < bufs.size(); ++b) {
            const BatchBuffer& B = bufs[b];
            std::snprintf(where, sizeof where, " buffer %zu (job%s", b, B.jobs.size() > 1 ? "s" : "");
            for (unsigned j : B.jobs) std::snprintf(where + std::strlen(where), sizeof where - std::strlen(where), " %u", j);
            std::snprintf(where + std::strlen(where), sizeof where - std::strlen(where), ")");
            failures += check_untouched(group, c, where, "outside every slice", wdt, B.out + 1, B.cols, B.w, B.w0,
                                        B.covered);
        }
        jobs_total += num_jobs;
        blocks_total += next_block + after;
    }
    failures += emu_faults - faults0;
    std::printf("%s: %d cases, %ld jobs (%ld in %ld shared buffers, %ld of them fused), %ld blocks (%ld with no "
                "tile), %ld elements, %ld cp.async copies, %ld of %ld jobs bit-identical to their launch alone, "
                "%ld failures\n",
                group, cases, jobs_total, shared_jobs, shared_buffers, fused_buffers, blocks_total, idle_total,
                elements, emu_cp_async_count - copies0, identical, jobs_total, failures);
    return failures;
}

static unsigned rand_divisor(unsigned x) {
    std::vector<unsigned> ds;
    for (unsigned d = 1; d <= x; ++d)
        if (x % d == 0) ds.push_back(d);
    return ds[rng() % ds.size()];
}

static OffloadMergeTerm product_term(const Mat& l, const Mat& r, unsigned row_div, unsigned row_mod,
                                     unsigned col_div, unsigned col_mod) {
    return {l.addr(), r.addr(), l.cols, l.dt, r.dt, r.cols, row_div, row_mod, col_div, col_mod};
}

static OffloadMergeTerm full_term(const Mat& m, unsigned row_div, unsigned row_mod, unsigned col_div,
                                  unsigned col_mod) {
    return {m.addr(), 0, 0, m.dt, 0, m.cols, row_div, row_mod, col_div, col_mod};
}

static long general_cases(int cases) {
    long failures = 0, elements = 0;
    long kinds[3] = {0, 0, 0}, lokr_sides[2] = {0, 0};
    for (int c = 0; c < cases; ++c) {
        unsigned out, r0, n, cols;
        if (c % 2 == 0) {
            // Rows and columns with many divisors, for LoKr.
            n = (1 + rng() % 6) * (1 + rng() % 24);
            cols = (1 + rng() % 6) * (1 + rng() % 24);
            out = n + (c % 3 == 0 ? 0 : rng() % 40);
            r0 = rng() % (out - n + 1);
        } else {
            rand_slice(c, 150, out, r0, n);
            cols = 1 + rng() % 150;
        }
        Weight W = rand_weight(out, cols, r0, n);
        OffloadMergeParams p{};
        p.w = (unsigned long long)W.w.data();
        p.rows = n;
        p.cols = cols;
        p.row0 = r0;
        p.num_adapters = c == 3 ? OFFLOAD_MERGE_MAX_ADAPTERS : 1 + rng() % 6;
        std::vector<Mat> store;
        store.reserve(4 * p.num_adapters);
        auto mat = [&](unsigned rows, unsigned cs) -> const Mat& {
            store.push_back(rand_mat(rows, cs, rng() % 3));
            return store.back();
        };
        for (unsigned a = 0; a < p.num_adapters; ++a) {
            OffloadMergeAdapter& ad = p.adapters[a];
            ad.scale = 2 * uniform(rng);
            const unsigned kind = (c + a) % 3;  // every kind in most cases
            kinds[kind]++;
            std::vector<double> d, da;
            if (kind == 0) {
                const unsigned rank = 1 + rng() % 70;
                const Mat& up = mat(n, rank);
                const Mat& down = mat(rank, cols);
                ad.num_terms = 1;
                ad.terms[0] = product_term(up, down, 1, n, 1, cols);
                matmul(up, down, d, da);
            } else if (kind == 1) {
                const unsigned r1 = 1 + rng() % 40, r2 = 1 + rng() % 40;
                const Mat& w1a = mat(n, r1);
                const Mat& w1b = mat(r1, cols);
                const Mat& w2a = mat(n, r2);
                const Mat& w2b = mat(r2, cols);
                ad.num_terms = 2;
                ad.terms[0] = product_term(w1a, w1b, 1, n, 1, cols);
                ad.terms[1] = product_term(w2a, w2b, 1, n, 1, cols);
                std::vector<double> h1, h1a, h2, h2a;
                matmul(w1a, w1b, h1, h1a);
                matmul(w2a, w2b, h2, h2a);
                d.resize(h1.size());
                da.resize(h1.size());
                for (size_t i = 0; i < h1.size(); ++i) {
                    d[i] = h1[i] * h2[i];
                    da[i] = h1a[i] * h2a[i];
                }
            } else {
                // kron(w1, w2): w1 [a1, b1], w2 [c2, d2], a1 c2 = n, b1 d2 = cols.
                const unsigned c2 = rand_divisor(n), d2 = rand_divisor(cols);
                const unsigned a1 = n / c2, b1 = cols / d2;
                std::vector<double> m[2], ma[2];
                const unsigned shape[2][2] = {{a1, b1}, {c2, d2}};
                const unsigned maps[2][4] = {{c2, a1, d2, b1}, {1, c2, 1, d2}};
                for (int s = 0; s < 2; ++s) {
                    const unsigned sr = shape[s][0], scol = shape[s][1];
                    const bool full = rng() % 2 == 0;
                    lokr_sides[full ? 0 : 1]++;
                    if (full) {
                        const Mat& f = mat(sr, scol);
                        ad.terms[s] = full_term(f, maps[s][0], maps[s][1], maps[s][2], maps[s][3]);
                        m[s] = f.v;
                        ma[s].resize(f.v.size());
                        for (size_t i = 0; i < f.v.size(); ++i) ma[s][i] = std::fabs(f.v[i]);
                    } else {
                        const unsigned r = 1 + rng() % 40;
                        const Mat& la = mat(sr, r);
                        const Mat& lb = mat(r, scol);
                        ad.terms[s] = product_term(la, lb, maps[s][0], maps[s][1], maps[s][2], maps[s][3]);
                        matmul(la, lb, m[s], ma[s]);
                    }
                }
                ad.num_terms = 2;
                d.resize((size_t)n * cols);
                da.resize((size_t)n * cols);
                for (unsigned i = 0; i < n; ++i)
                    for (unsigned j = 0; j < cols; ++j) {
                        const size_t e1 = (size_t)(i / c2) * b1 + j / d2, e2 = (size_t)(i % c2) * d2 + j % d2;
                        d[(size_t)i * cols + j] = m[0][e1] * m[1][e2];
                        da[(size_t)i * cols + j] = ma[0][e1] * ma[1][e2];
                    }
            }
            add_delta(W, ad.scale, d, da);
        }
        launch(pick(W.dt, offload_merge_f32, offload_merge_f16, offload_merge_bf16), p, OFFLOAD_BLOCK_X,
               OFFLOAD_BLOCK_Y);
        failures += check("general", c, W);
        elements += (long)n * cols;
    }
    std::printf("general: %d cases, %ld elements, %ld failures (adapters: %ld low-rank, %ld LoHa, %ld LoKr; "
                "LoKr sides: %ld whole, %ld low-rank)\n",
                cases, elements, failures, kinds[0], kinds[1], kinds[2], lokr_sides[0], lokr_sides[1]);
    return failures;
}

int main(int argc, char** argv) {
    const int cases = argc > 1 ? std::atoi(argv[1]) : 20;
    const bool batch_only = argc > 2 && std::strcmp(argv[2], "batch") == 0;
    const bool pipe_only = argc > 2 && std::strcmp(argv[2], "pipe") == 0;
    const bool stream_only = argc > 2 && std::strcmp(argv[2], "stream") == 0;
    const int batch = std::max(2, cases / 2);
    long failures = 0;
    int total = 0;
    if (stream_only) {
        failures += stream_cases(cases, 8);
        failures += stream_cases(cases, 32);
        failures += stream_cases(cases, 8, true);
        std::printf("all: %d cases, %ld failures\n", 3 * cases, failures);
        return failures == 0 ? 0 : 1;
    }
    if (pipe_only) {
        failures += lowrank_cases(cases, PIPE);
        failures += lowrank_cases(cases, PIPE_TALL);
        failures += batch_cases(batch, PIPE);
        failures += batch_cases(batch, PIPE_TALL);
        std::printf("all: %d cases, %ld failures\n", 2 * (cases + batch), failures);
        return failures == 0 ? 0 : 1;
    }
    if (!batch_only) {
        failures += lowrank_cases(cases, FMA);
        failures += lowrank_cases(cases, MMA);
        failures += lowrank_cases(cases, PIPE);
        failures += lowrank_cases(cases, PIPE_TALL);
        long mmas = 0;
        for (long m : emu_mma_count) mmas += m;
        std::printf("mma: %ld warp-wide mma.m16n8k16 emulated\n", mmas);
        failures += general_cases(2 * cases);
        failures += stream_cases(cases, 8);
        failures += stream_cases(cases, 32);
        failures += stream_cases(cases, 8, true);
        total += 9 * cases;
    }
    failures += batch_cases(batch, FMA);
    failures += batch_cases(batch, MMA);
    failures += batch_cases(batch, PIPE);
    failures += batch_cases(batch, PIPE_TALL);
    total += 4 * batch;
    std::printf("all: %d cases, %ld failures\n", total, failures);
    return failures == 0 ? 0 : 1;
}
