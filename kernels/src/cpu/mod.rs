//! The CPU implementation of the merge, used by the host backend.
//!
//! # How it works
//!
//! The low-rank and LoHa products are computed like a BLIS-style GEMM
//! `W ← W + L · R` whose `C` is `W` decoded to f32:
//!
//! 1. All low-rank adapters are stacked into one product of rank
//!    `K = Σ rankᵢ`: `Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … sₙBₙ] · [A₁; …; Aₙ]`, so one pass
//!    of the micro-kernel handles every adapter (each LoHa adapter is two
//!    such products, its scale in the first).
//! 2. Once per call, the right factors (`Aᵢ`, `[K, cols]`) are decoded to f32
//!    and packed as `[cols / NR][K][NR]`, so that the micro-kernel reads them
//!    contiguously; the threads pack a range of columns each.
//! 3. The target rows are handed out to the threads (`std::thread::scope`)
//!    in blocks of at most `mc` rows (whole 6-row tiles, smaller towards the
//!    end so that the threads finish together); a thread owns its block's
//!    rows of `W` exclusively. For a block, the thread decodes, scales
//!    (`sᵢ·Bᵢ` in f32) and packs the left factors as `[mc / MR][K][MR]`
//!    (they stay in L2), then walks the columns in blocks of `nc`: that
//!    block of `W` is decoded to f32 once, every adapter's contribution is
//!    accumulated into it in f32, and it is rounded back to `W`'s dtype
//!    (nearest, ties to even) and stored once.
//! 4. Inside a block, the rank is walked in steps of `kc`; for each 16-column
//!    chunk, its `kc × NR` panel of the right factor stays in L1 while the
//!    register-blocked 6 × 16 micro-kernel (12 AVX accumulators, broadcasting
//!    the left factor's values and loading the right one's rows) runs over
//!    every tile of the block. Meanwhile the next panel and the next block
//!    of `W` are prefetched a little at a time. Each element of `W` still
//!    gets the products' terms added in rank order, whatever the blocking.
//! 5. LoKr forms the two rows `w1[i / c, :]` and `w2[i % c, :]` once per row
//!    and adds their Kronecker product.
//!
//! The packed factors and blocks are kept in a pool (at most 64 MiB) for
//! the next call: fresh memory costs a page fault per 4 KiB, which for a
//! large merge cost as much as a tenth of its time.
//!
//! On x86-64 CPUs with AVX2, FMA and F16C (detected at run time) the same
//! code is compiled a second time with those features, fused multiply-adds
//! and hardware f16 conversions; elsewhere a portable build (separate
//! multiply and add, branch-free software conversions) runs. The two differ
//! only in the f32 rounding of the accumulation, both well inside the
//! tolerance the tests check; f16/bf16 rounding is identical. For a given
//! CPU, results depend neither on the thread count nor on the blocking.

use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};

use crate::dtype::Dtype;
use crate::error::KernelError;
use crate::merge::{Delta, Factor, KronFactor, MergeSpec};

mod convert;
#[cfg(test)]
mod tests;

/// Rows of a tile (and of the micro-kernel).
const MR: usize = 6;
/// Columns of the micro-kernel (two AVX registers of f32).
const NR: usize = 16;
/// With the default thread count, each thread gets at least this many
/// elements of `W`, so small merges do not pay for spawning threads.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;
/// Right factors are packed on several threads only when each gets at least
/// this many elements.
const MIN_PACKED_PER_THREAD: usize = 1 << 15;

/// The default thread count: the machine's available parallelism (1 if it
/// cannot be determined), read once per process.
///
/// `std::thread::available_parallelism` reads the cgroup files under
/// `/proc` on every call (tens of microseconds), and every merge and
/// product that is not given a thread count asks for it.
pub fn default_threads() -> NonZeroUsize {
    static THREADS: std::sync::OnceLock<NonZeroUsize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
}

/// Runs the merge described by `spec` on the CPU, in place on `w`.
///
/// `w` holds the whole weight (all `out` rows, `spec.weight_bytes()` bytes,
/// little-endian `spec.dtype()` elements, any alignment); only the rows in
/// `spec.row_range()` are read and written, each element once.
///
/// `threads`: `Some(t)` uses at most `t` threads (never more than there are
/// tiles of rows); `None` uses [`default_threads`], fewer for small weights
/// (at least 64 Ki elements per thread). The calling thread does one share
/// of the work.
///
/// Returns [`KernelError::WeightLength`] if `w` has the wrong length, in
/// which case `w` is untouched; every other check was done by
/// [`MergeSpec::new`], so the merge cannot fail once it starts.
pub fn merge_cpu(
    w: &mut [u8],
    spec: &MergeSpec<'_>,
    threads: Option<NonZeroUsize>,
) -> Result<(), KernelError> {
    merge_with(w, spec, threads, Isa::detect())
}

/// Instruction sets the inner loops are compiled for (shared with
/// [`crate::gemm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Baseline code, separate multiply and add.
    Portable,
    /// AVX2, FMA and F16C; holds the proof that the CPU has them.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma(x86::Avx2Fma),
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if let Some(token) = x86::Avx2Fma::detect() {
            return Isa::Avx2Fma(token);
        }
        Isa::Portable
    }

    /// Every instruction set this CPU supports (for tests).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            all.push(Isa::detect());
        }
        all
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256, _mm256_cvtph_ps, _mm256_cvtps_ph, _MM_FROUND_TO_NEAREST_INT,
    };

    /// Proof that the CPU supports AVX2, FMA and F16C: only
    /// [`Avx2Fma::detect`] makes one, after asking the CPU.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Avx2Fma(());

    impl Avx2Fma {
        pub(crate) fn detect() -> Option<Avx2Fma> {
            (std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c"))
            .then_some(Avx2Fma(()))
        }

        /// Eight little-endian f16 values to f32, exactly (`vcvtph2ps`).
        #[inline(always)]
        pub(crate) fn f16x8_to_f32(self, bytes: [u8; 16]) -> [f32; 8] {
            let h: __m128i = bytemuck::cast(bytes);
            // SAFETY: `self` proves that the CPU supports F16C, the only
            // requirement of this intrinsic; it takes and returns values.
            let f: __m256 = unsafe { _mm256_cvtph_ps(h) };
            bytemuck::cast(f)
        }

        /// Eight f32 values to little-endian f16, rounded to nearest, ties
        /// to even (`vcvtps2ph` with immediate 0).
        #[inline(always)]
        pub(crate) fn f32x8_to_f16(self, values: [f32; 8]) -> [u8; 16] {
            let f: __m256 = bytemuck::cast(values);
            // SAFETY: as in `f16x8_to_f32`.
            let h: __m128i = unsafe { _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(f) };
            bytemuck::cast(h)
        }
    }
}

/// Cache blocking of the products (any positive values give the same
/// result; tests use odd ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Blocking {
    /// Rows of a block of `W`: a multiple of [`MR`]. The block's packed
    /// left factors (`mc · K` f32) stay in L2 while the columns are walked.
    mc: usize,
    /// Columns of a block of `W`: a multiple of [`NR`].
    nc: usize,
    /// Rank steps per pass over a block: `kc · NR` f32 of the right factor
    /// stay in L1 while the block's tiles stream past.
    kc: usize,
    /// Right factors are packed on several threads only when each gets at
    /// least this many elements.
    pack_grain: usize,
}

impl Blocking {
    /// The blocking for products of rank at most `k`.
    fn choose(k: usize) -> Blocking {
        // The block's packed left factors take at most about 192 KiB.
        let mc = ((192 << 10) / (4 * k.max(1)) / MR * MR).clamp(4 * MR, 16 * MR);
        Blocking {
            mc,
            nc: 256,
            kc: 256,
            pack_grain: MIN_PACKED_PER_THREAD,
        }
    }
}

/// The merge with an explicit instruction set (tests run every one).
fn merge_with(
    w: &mut [u8],
    spec: &MergeSpec<'_>,
    threads: Option<NonZeroUsize>,
    isa: Isa,
) -> Result<(), KernelError> {
    let k = Prepared::max_rank(spec);
    merge_blocked(w, spec, threads, isa, Blocking::choose(k))
}

/// The merge with an explicit instruction set and blocking.
fn merge_blocked(
    w: &mut [u8],
    spec: &MergeSpec<'_>,
    threads: Option<NonZeroUsize>,
    isa: Isa,
    blocking: Blocking,
) -> Result<(), KernelError> {
    if w.len() != spec.weight_bytes() {
        return Err(KernelError::WeightLength {
            shape: spec.shape().to_vec(),
            dtype: spec.dtype(),
            expected: spec.weight_bytes(),
            actual: w.len(),
        });
    }
    if spec.adapters().is_empty() {
        return Ok(());
    }
    let cols = spec.cols();
    let row_bytes = cols * spec.dtype().size_in_bytes();
    let range = spec.row_range();
    let target = &mut w[range.start * row_bytes..range.end * row_bytes];
    let n = spec.delta_rows();
    let tiles = n.div_ceil(MR);
    let wanted = match threads {
        Some(t) => t.get(),
        None => default_threads()
            .get()
            .min((n.saturating_mul(cols) / MIN_ELEMENTS_PER_THREAD).max(1)),
    };
    let threads = wanted.clamp(1, tiles);

    let mut prep = Prepared::new(spec);
    prep.pack_right(isa, threads, blocking.pack_grain);

    let ctx = Ctx {
        prep: &prep,
        dtype: spec.dtype(),
        cols,
        blocking,
    };
    let blocks = Blocks::new(target, n, row_bytes, threads, blocking.mc);
    let worker = Worker {
        ctx,
        blocks: &blocks,
    };
    if threads == 1 {
        dispatch(isa, worker);
    } else {
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(move || dispatch(isa, worker));
            }
            dispatch(isa, worker);
        });
    }
    prep.release();
    Ok(())
}

/// The target's rows, handed out to the worker threads in blocks of whole
/// tiles as they ask: each block goes to one thread, which owns its rows of
/// `W` exclusively. Blocks shrink towards the end (each is about a
/// `1 / (2 · threads)` share of the tiles left, at most `mc` rows), so the
/// threads finish together even when the machine is busy. The result does
/// not depend on which thread computes which block.
struct Blocks<'w> {
    /// The rows not handed out yet, and the index of the first.
    rest: Mutex<(&'w mut [u8], usize)>,
    n: usize,
    row_bytes: usize,
    threads: usize,
    /// Tiles in a block at most.
    max_tiles: usize,
}

/// Blocks get at least this many tiles (fewer only at the end), so that the
/// packed right panels each block streams stay worth fetching.
const MIN_BLOCK_TILES: usize = 4;

impl<'w> Blocks<'w> {
    fn new(w: &'w mut [u8], n: usize, row_bytes: usize, threads: usize, mc: usize) -> Self {
        Blocks {
            rest: Mutex::new((w, 0)),
            n,
            row_bytes,
            threads,
            max_tiles: (mc / MR).max(1),
        }
    }

    /// The next block: its rows of `W`, the index of its first row
    /// (relative to the row slice), and its row count; `None` when every
    /// row has been handed out.
    fn next(&self) -> Option<(&'w mut [u8], usize, usize)> {
        let mut rest = self.rest.lock().unwrap_or_else(PoisonError::into_inner);
        let (w, first) = &mut *rest;
        let left = self.n - *first;
        if left == 0 {
            return None;
        }
        let tiles = left
            .div_ceil(MR)
            .div_ceil(2 * self.threads)
            .clamp(MIN_BLOCK_TILES.min(self.max_tiles), self.max_tiles);
        let rows = (tiles * MR).min(left);
        let (block, tail) = std::mem::take(w).split_at_mut(rows * self.row_bytes);
        *w = tail;
        let at = *first;
        *first += rows;
        Some((block, at, rows))
    }
}

/// Work compiled for each instruction set: [`dispatch`] runs it with the
/// best one the caller chose.
trait Job {
    /// What the work returns.
    type Output;

    /// Runs the work with `simd`'s inner loops.
    fn run<M: Simd>(self, simd: M) -> Self::Output;
}

/// Runs `job` with the instruction set `isa`.
fn dispatch<J: Job>(isa: Isa, job: J) -> J::Output {
    match isa {
        Isa::Portable => job.run(Plain),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma(token) => {
            // SAFETY: `token` is an `x86::Avx2Fma`, which is only made after
            // the CPU reported AVX2, FMA and F16C; supporting the enabled
            // target features is the only precondition of calling
            // `run_avx2_fma`.
            unsafe { run_avx2_fma(token, job) }
        }
    }
}

/// `job.run(token)` compiled with AVX2, FMA and F16C (every job inlines its
/// inner loops, so they are compiled with them too).
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2_fma<J: Job>(token: x86::Avx2Fma, job: J) -> J::Output {
    job.run(token)
}

/// The instruction-set-specific pieces of the inner loops. A value of the
/// type proves the CPU can run them.
pub(crate) trait Simd: Copy {
    /// `a · b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// Hints that `_line`'s cache line will be read soon (no effect on
    /// results; a no-op by default).
    #[inline(always)]
    fn prefetch<T>(_line: &T) {}

    /// Decodes little-endian f16 `bytes` into `out` (same element count).
    #[inline(always)]
    fn decode_f16(self, bytes: &[u8], out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = convert::f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        }
    }

    /// Rounds `values` to f16 and stores them little-endian in `bytes`.
    #[inline(always)]
    fn encode_f16(self, values: &[f32], bytes: &mut [u8]) {
        for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
            b.copy_from_slice(&convert::f32_to_f16(*v).to_le_bytes());
        }
    }
}

/// The baseline: separate multiply and add, software f16 conversions.
#[derive(Clone, Copy)]
pub(crate) struct Plain;

impl Simd for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Fused multiply-add and F16C conversions; only run inside
/// [`run_avx2_fma`], so the compiler uses AVX2 registers for both.
#[cfg(target_arch = "x86_64")]
impl Simd for x86::Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn prefetch<T>(line: &T) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: `prefetch` only hints the cache; it never faults nor
        // changes memory, and SSE (which it needs) is part of x86-64. The
        // pointer comes from a reference anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(line).cast::<i8>()) }
    }

    #[inline(always)]
    fn decode_f16(self, bytes: &[u8], out: &mut [f32]) {
        let mut src = bytes.chunks_exact(16);
        let mut dst = out.chunks_exact_mut(8);
        for (s, d) in (&mut src).zip(&mut dst) {
            let mut b = [0u8; 16];
            b.copy_from_slice(s);
            d.copy_from_slice(&self.f16x8_to_f32(b));
        }
        Plain.decode_f16(src.remainder(), dst.into_remainder());
    }

    #[inline(always)]
    fn encode_f16(self, values: &[f32], bytes: &mut [u8]) {
        let mut src = values.chunks_exact(8);
        let mut dst = bytes.chunks_exact_mut(16);
        for (s, d) in (&mut src).zip(&mut dst) {
            let mut v = [0f32; 8];
            v.copy_from_slice(s);
            d.copy_from_slice(&self.f32x8_to_f16(v));
        }
        Plain.encode_f16(src.remainder(), dst.into_remainder());
    }
}

/// Everything a worker thread needs; shared by reference.
#[derive(Clone, Copy)]
struct Ctx<'p, 'a> {
    prep: &'p Prepared<'a>,
    dtype: Dtype,
    cols: usize,
    blocking: Blocking,
}

/// [`NR`] f32 values on one cache line: a row of a packed right factor, and
/// the unit of the f32 blocks of `W` (so their rows start on cache lines).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Lane([f32; NR]);

impl Lane {
    const ZERO: Lane = Lane([0.0; NR]);
}

/// Buffers of lanes kept from one call to the next, so that a large merge
/// does not page-fault its packed factors and blocks in anew each time
/// (a page fault per 4 KiB: about a tenth of a large merge). At most
/// [`POOL_BYTES`].
static POOL: Mutex<Vec<Vec<Lane>>> = Mutex::new(Vec::new());
/// The most bytes [`POOL`] keeps.
const POOL_BYTES: usize = 64 << 20;

/// A buffer of `len` lanes: one from [`POOL`] when one is large enough
/// (holding whatever it held), else a new, zeroed one.
fn take_lanes(len: usize) -> Vec<Lane> {
    if len == 0 {
        return Vec::new();
    }
    let found = {
        let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
        let best = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity());
        best.map(|i| pool.swap_remove(i))
    };
    let mut v = found.unwrap_or_default();
    v.resize(len, Lane::ZERO);
    v
}

/// Returns `bufs` to [`POOL`], which keeps the largest buffers that fit in
/// [`POOL_BYTES`] together.
fn give_lanes(bufs: impl IntoIterator<Item = Vec<Lane>>) {
    let mut pool = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    pool.extend(bufs.into_iter().filter(|v| v.capacity() > 0));
    pool.sort_unstable_by_key(|v| std::cmp::Reverse(v.capacity()));
    let mut bytes = 0;
    pool.retain(|v| {
        let size = v.capacity() * std::mem::size_of::<Lane>();
        let keep = bytes + size <= POOL_BYTES;
        if keep {
            bytes += size;
        }
        keep
    });
}

/// `lanes` viewed as `len` f32 values.
fn f32s(lanes: &mut [Lane], len: usize) -> &mut [f32] {
    &mut bytemuck::cast_slice_mut(lanes)[..len]
}

/// A worker thread: merges blocks of rows until none is left.
#[derive(Clone, Copy)]
struct Worker<'b, 'w, 'p, 'a> {
    ctx: Ctx<'p, 'a>,
    blocks: &'b Blocks<'w>,
}

impl Job for Worker<'_, '_, '_, '_> {
    type Output = ();

    #[inline(always)]
    fn run<M: Simd>(self, simd: M) {
        run_blocks(simd, self.ctx, self.blocks)
    }
}

/// The worker loop; see the module documentation.
#[inline(always)]
fn run_blocks<M: Simd>(simd: M, ctx: Ctx<'_, '_>, blocks: &Blocks<'_>) {
    let Ctx {
        prep,
        dtype,
        cols,
        blocking: Blocking { nc, kc, .. },
    } = ctx;
    let esz = dtype.size_in_bytes();
    let row_bytes = cols * esz;
    // The f32 blocks: `mc` rows (whole tiles), `stride` columns apart.
    let stride = nc.min(cols.next_multiple_of(NR));
    let block_rows = (blocks.max_tiles * MR).min(blocks.n.next_multiple_of(MR));
    let block_len = block_rows * stride;
    let loha = !prep.loha.is_empty();
    let mut acc_buf = take_lanes(block_len.div_ceil(NR));
    let mut h1_buf = take_lanes(if loha { block_len.div_ceil(NR) } else { 0 });
    let mut h2_buf = take_lanes(if loha { block_len.div_ceil(NR) } else { 0 });
    let acc = f32s(&mut acc_buf, block_len);
    let h1 = f32s(&mut h1_buf, if loha { block_len } else { 0 });
    let h2 = f32s(&mut h2_buf, if loha { block_len } else { 0 });
    // The packed left factors of the current block of rows: the low-rank
    // product's, then each LoHa adapter's two.
    let products: Vec<&Product<'_>> = prep.products().collect();
    let mut left_bufs: Vec<Vec<Lane>> = products
        .iter()
        .map(|p| take_lanes((block_rows * p.k).div_ceil(NR)))
        .collect();
    let mut row_buf = Vec::new();
    // Per LoKr adapter: the rows of w1 and w2 that the block's rows use.
    let mut kron_rows: Vec<(Vec<f32>, Vec<f32>)> = prep
        .lokr
        .iter()
        .map(|k| {
            (
                vec![0.0; block_rows * k.w1.cols()],
                vec![0.0; block_rows * k.w2.cols()],
            )
        })
        .collect();

    while let Some((w, row0, m)) = blocks.next() {
        let tiles = m.div_ceil(MR);
        let mut lefts: Vec<&[[f32; MR]]> = Vec::with_capacity(products.len());
        for (p, buf) in products.iter().zip(left_bufs.iter_mut()) {
            let left = bytemuck::cast_slice_mut(f32s(buf, tiles * MR * p.k));
            p.pack_left(simd, row0, m, left, &mut row_buf);
            lefts.push(left);
        }
        let (left_lowrank, left_loha) = if prep.lowrank.is_some() {
            (lefts[0], &lefts[1..])
        } else {
            (&[][..], &lefts[..])
        };
        for (k, (r1, r2)) in prep.lokr.iter().zip(kron_rows.iter_mut()) {
            let (b, d) = (k.w1.cols(), k.w2.cols());
            for r in 0..m {
                let i = row0 + r;
                k.w1.row_into::<M>(i / k.c, &mut r1[r * b..(r + 1) * b]);
                k.w2.row_into::<M>(i % k.c, &mut r2[r * d..(r + 1) * d]);
            }
        }

        let mut c0 = 0;
        while c0 < cols {
            let cb = nc.min(cols - c0);
            let width = cb.next_multiple_of(NR);
            let (chunk0, chunks) = (c0 / NR, width / NR);
            let block = Block {
                stride,
                tiles,
                chunk0,
                chunks,
                kc,
            };
            for r in 0..tiles * MR {
                let row = &mut acc[r * stride..r * stride + width];
                if r < m {
                    let off = r * row_bytes + c0 * esz;
                    decode(simd, dtype, &w[off..off + cb * esz], &mut row[..cb]);
                    row[cb..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
            }
            // The next block of `W` (along the row) is fetched while this
            // one is computed, by the first product.
            let next_c0 = c0 + cb;
            let mut next = Some(Lines::new(
                w,
                row_bytes,
                m,
                next_c0 * esz,
                nc.min(cols - next_c0.min(cols)) * esz,
            ));
            if let Some(p) = &prep.lowrank {
                p.apply::<M>(acc, left_lowrank, block, next.take());
            }
            for ((p1, p2), l) in prep.loha.iter().zip(left_loha.chunks_exact(2)) {
                let (l1, l2) = (l[0], l[1]);
                for r in 0..tiles * MR {
                    h1[r * stride..r * stride + width].fill(0.0);
                    h2[r * stride..r * stride + width].fill(0.0);
                }
                p1.apply::<M>(h1, l1, block, next.take());
                p2.apply::<M>(h2, l2, block, None);
                for r in 0..m {
                    let row = r * stride..r * stride + cb;
                    for ((a, x), y) in acc[row.clone()]
                        .iter_mut()
                        .zip(&h1[row.clone()])
                        .zip(&h2[row])
                    {
                        *a = M::mul_add(*x, *y, *a);
                    }
                }
            }
            for (k, (r1, r2)) in prep.lokr.iter().zip(&kron_rows) {
                let (b, d) = (k.w1.cols(), k.w2.cols());
                for r in 0..m {
                    kron_row::<M>(
                        &mut acc[r * stride..r * stride + cb],
                        c0,
                        &r1[r * b..(r + 1) * b],
                        &r2[r * d..(r + 1) * d],
                    );
                }
            }
            for r in 0..m {
                let off = r * row_bytes + c0 * esz;
                encode(
                    simd,
                    dtype,
                    &acc[r * stride..r * stride + cb],
                    &mut w[off..off + cb * esz],
                );
            }
            c0 += cb;
        }
    }
    give_lanes([acc_buf, h1_buf, h2_buf].into_iter().chain(left_bufs));
}

/// Where a product goes in a block of `W` (f32, `tiles · MR` rows `stride`
/// apart, `chunks · NR` columns): column 0 of the block is column
/// `chunk0 · NR` of the product.
#[derive(Clone, Copy)]
struct Block {
    stride: usize,
    tiles: usize,
    chunk0: usize,
    chunks: usize,
    kc: usize,
}

/// Cache lines to prefetch: `len` bytes from byte `start` of each of `rows`
/// rows `row_bytes` apart in `bytes`, a few at a time.
struct Lines<'x> {
    bytes: &'x [u8],
    row_bytes: usize,
    rows: usize,
    start: usize,
    len: usize,
    /// The next line: its row, and its offset from `start`.
    row: usize,
    at: usize,
    /// Lines per [`Lines::step`].
    per_step: usize,
}

impl<'x> Lines<'x> {
    fn new(bytes: &'x [u8], row_bytes: usize, rows: usize, start: usize, len: usize) -> Self {
        Lines {
            bytes,
            row_bytes,
            rows: if len == 0 { 0 } else { rows },
            start,
            len,
            row: 0,
            at: 0,
            per_step: 0,
        }
    }

    /// Spreads the lines over `steps` calls of [`Lines::step`].
    fn spread(&mut self, steps: usize) {
        self.per_step = (self.rows * self.len.div_ceil(64)).div_ceil(steps.max(1));
    }

    /// Prefetches the next few lines.
    #[inline(always)]
    fn step<M: Simd>(&mut self) {
        for _ in 0..self.per_step {
            if self.row >= self.rows {
                return;
            }
            M::prefetch(&self.bytes[self.row * self.row_bytes + self.start + self.at]);
            self.at += 64;
            if self.at >= self.len {
                self.at = 0;
                self.row += 1;
            }
        }
    }
}

/// The micro-kernel: adds `Σₖ left[k][i] · right[k][j]` to the `MR × NR`
/// tile of `acc` whose top-left element is `acc[0]` (rows `stride` apart),
/// one `k` after the other.
#[inline(always)]
fn micro<M: Simd>(acc: &mut [f32], stride: usize, left: &[[f32; MR]], right: &[Lane]) {
    let mut c = [[0.0f32; NR]; MR];
    for (r, c) in c.iter_mut().enumerate() {
        c.copy_from_slice(&acc[r * stride..r * stride + NR]);
    }
    for (l, r) in left.iter().zip(right) {
        for (c, &l) in c.iter_mut().zip(l) {
            for (c, &r) in c.iter_mut().zip(&r.0) {
                *c = M::mul_add(l, r, *c);
            }
        }
    }
    for (r, c) in c.iter().enumerate() {
        acc[r * stride..r * stride + NR].copy_from_slice(c);
    }
}

/// Adds `kron(w1row, w2row)[c0 .. c0 + acc.len()]` to `acc`: column `j` of
/// the product is `w1row[j / d] · w2row[j % d]`, `d = w2row.len()`.
#[inline(always)]
fn kron_row<M: Simd>(acc: &mut [f32], c0: usize, w1row: &[f32], w2row: &[f32]) {
    let d = w2row.len();
    let mut j = 0;
    while j < acc.len() {
        let col = c0 + j;
        let (jb, jd) = (col / d, col % d);
        let len = (d - jd).min(acc.len() - j);
        let s = w1row[jb];
        for (a, v) in acc[j..j + len].iter_mut().zip(&w2row[jd..jd + len]) {
            *a = M::mul_add(s, *v, *a);
        }
        j += len;
    }
}

/// Decodes little-endian `dtype` elements from `bytes` into `out`
/// (`bytes.len() == out.len() · size`).
#[inline(always)]
pub(crate) fn decode<M: Simd>(simd: M, dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => simd.decode_f16(bytes, out),
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = convert::bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
    }
}

/// Rounds `values` to `dtype` (nearest, ties to even) and stores them
/// little-endian into `bytes`.
#[inline(always)]
fn encode<M: Simd>(simd: M, dtype: Dtype, values: &[f32], bytes: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (b, v) in bytes.chunks_exact_mut(4).zip(values) {
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F16 => simd.encode_f16(values, bytes),
        Dtype::BF16 => {
            for (b, v) in bytes.chunks_exact_mut(2).zip(values) {
                b.copy_from_slice(&convert::f32_to_bf16(*v).to_le_bytes());
            }
        }
    }
}

/// Decodes a whole factor to f32, row-major.
fn decode_factor(f: &Factor<'_>) -> Vec<f32> {
    let mut out = vec![0.0; f.rows * f.cols];
    decode(Plain, f.dtype, f.data, &mut out);
    out
}

/// Factors decoded, scaled and packed for the inner loops.
struct Prepared<'a> {
    /// All low-rank adapters, stacked into one product.
    lowrank: Option<Product<'a>>,
    /// Per LoHa adapter: its two products (the scale is in the first).
    loha: Vec<(Product<'a>, Product<'a>)>,
    /// Per LoKr adapter (the scale is in `w1`).
    lokr: Vec<KronPrep>,
}

impl<'a> Prepared<'a> {
    /// The largest rank of the products `spec` makes.
    fn max_rank(spec: &MergeSpec<'_>) -> usize {
        let mut lowrank = 0;
        let mut most = 0;
        for adapter in spec.adapters() {
            match &adapter.delta {
                Delta::LowRank { up, .. } => lowrank += up.cols,
                Delta::LoHa { w1a, w2a, .. } => most = most.max(w1a.cols).max(w2a.cols),
                Delta::LoKr { .. } => {}
            }
        }
        most.max(lowrank)
    }

    /// Collects the products (right factors not packed yet) and decodes the
    /// LoKr factors.
    fn new(spec: &MergeSpec<'a>) -> Prepared<'a> {
        let cols = spec.cols();
        let mut lowrank = Product::new(cols);
        let mut loha = Vec::new();
        let mut lokr = Vec::new();
        for adapter in spec.adapters() {
            match adapter.delta {
                Delta::LowRank { up, down } => lowrank.push(up, adapter.scale, down),
                Delta::LoHa { w1a, w1b, w2a, w2b } => {
                    let mut p1 = Product::new(cols);
                    p1.push(w1a, adapter.scale, w1b);
                    let mut p2 = Product::new(cols);
                    p2.push(w2a, 1.0, w2b);
                    loha.push((p1, p2));
                }
                Delta::LoKr { w1, w2 } => lokr.push(KronPrep {
                    w1: KronMat::new(&w1, adapter.scale),
                    w2: KronMat::new(&w2, 1.0),
                    c: w2.shape()[0],
                }),
            }
        }
        Prepared {
            lowrank: (lowrank.k > 0).then_some(lowrank),
            loha,
            lokr,
        }
    }

    /// The products: the low-rank one, then each LoHa adapter's two.
    fn products(&self) -> impl Iterator<Item = &Product<'a>> {
        self.lowrank
            .iter()
            .chain(self.loha.iter().flat_map(|(p1, p2)| [p1, p2]))
    }

    /// Returns the packed right factors to the pool.
    fn release(self) {
        give_lanes(
            self.lowrank
                .into_iter()
                .chain(self.loha.into_iter().flat_map(|(p1, p2)| [p1, p2]))
                .flat_map(|p| p.right),
        );
    }

    /// Decodes and packs every product's right factors, on up to `threads`
    /// threads, each with at least `grain` elements (each packs a range of
    /// column chunks of every product).
    fn pack_right(&mut self, isa: Isa, threads: usize, grain: usize) {
        let mut products: Vec<&mut Product<'a>> = self
            .lowrank
            .iter_mut()
            .chain(self.loha.iter_mut().flat_map(|(p1, p2)| [p1, p2]))
            .collect();
        let Some(first) = products.first() else {
            return;
        };
        let (cols, chunks) = (first.cols, first.cols.div_ceil(NR));
        let elements: usize = products.iter().map(|p| p.k * cols).sum();
        let threads = threads.min(elements / grain.max(1)).clamp(1, chunks);
        let per = chunks.div_ceil(threads);
        let jobs = |i: usize| -> Vec<PackRight<'_, 'a>> {
            let chunk0 = i * per;
            products
                .iter()
                .map(|p| PackRight {
                    parts: &p.parts,
                    k: p.k,
                    cols,
                    chunk0,
                    chunks: per.min(chunks - chunk0),
                })
                .collect()
        };
        let run = |jobs: Vec<PackRight<'_, 'a>>| -> Vec<Vec<Lane>> {
            jobs.into_iter().map(|job| dispatch(isa, job)).collect()
        };
        // `pieces[i][j]`: thread `i`'s chunks of product `j`.
        let pieces: Vec<Vec<Vec<Lane>>> = if threads == 1 {
            vec![run(jobs(0))]
        } else {
            std::thread::scope(|scope| {
                let theirs: Vec<_> = (1..threads.min(chunks.div_ceil(per)))
                    .map(|i| {
                        let jobs = jobs(i);
                        scope.spawn(move || run(jobs))
                    })
                    .collect();
                let mine = run(jobs(0));
                std::iter::once(mine)
                    .chain(theirs.into_iter().map(|h| match h.join() {
                        Ok(v) => v,
                        Err(e) => std::panic::resume_unwind(e),
                    }))
                    .collect()
            })
        };
        for piece in pieces {
            for (p, lanes) in products.iter_mut().zip(piece) {
                p.right.push(lanes);
            }
        }
        for p in products {
            p.per = per;
        }
    }
}

/// One part of a product: `scale · left` (`[n, r]`) times `right`
/// (`[r, cols]`), at rank offset `k0` of the product.
struct Part<'a> {
    k0: usize,
    left: Factor<'a>,
    scale: f32,
    right: Factor<'a>,
}

/// A product `L · R` (`L` `[n, k]`, `R` `[k, cols]`), the concatenation of
/// its parts along the rank. `R` is packed for the micro-kernel as
/// `[cols / NR][k][NR]` (zero-padded), in pieces of `per` chunks (one per
/// packing thread); `L` is packed per block of rows by
/// [`Product::pack_left`] as `[rows / MR][k][MR]` (zero-padded), with each
/// part's scale folded in.
struct Product<'a> {
    k: usize,
    cols: usize,
    parts: Vec<Part<'a>>,
    right: Vec<Vec<Lane>>,
    per: usize,
}

impl<'a> Product<'a> {
    fn new(cols: usize) -> Product<'a> {
        Product {
            k: 0,
            cols,
            parts: Vec::new(),
            right: Vec::new(),
            per: 1,
        }
    }

    /// Appends `scale · left · right` along the rank.
    fn push(&mut self, left: Factor<'a>, scale: f32, right: Factor<'a>) {
        self.parts.push(Part {
            k0: self.k,
            left,
            scale,
            right,
        });
        self.k += left.cols;
    }

    /// Packs rows `row0 .. row0 + m` of the scaled left factor into `out`
    /// (`[m / MR][k]`, rounded up; `row_buf` is scratch).
    #[inline(always)]
    fn pack_left<M: Simd>(
        &self,
        simd: M,
        row0: usize,
        m: usize,
        out: &mut [[f32; MR]],
        row_buf: &mut Vec<f32>,
    ) {
        let k = self.k;
        // The rows past `m` of the last tile are zero.
        if m % MR != 0 {
            for p in &mut out[(m / MR) * k..] {
                p[m % MR..].fill(0.0);
            }
        }
        for part in &self.parts {
            let (f, r) = (&part.left, part.left.cols);
            let esz = f.dtype.size_in_bytes();
            row_buf.resize(r, 0.0);
            for i in 0..m {
                let off = (row0 + i) * r * esz;
                decode(
                    simd,
                    f.dtype,
                    &f.data[off..off + r * esz],
                    &mut row_buf[..r],
                );
                let packed = &mut out[(i / MR) * k + part.k0..][..r];
                for (p, &v) in packed.iter_mut().zip(row_buf.iter()) {
                    p[i % MR] = part.scale * v;
                }
            }
        }
    }

    /// Adds the product's block `block` (its rows' left factor packed in
    /// `left`) to `acc`, prefetching `next` on the way.
    #[inline(always)]
    fn apply<M: Simd>(
        &self,
        acc: &mut [f32],
        left: &[[f32; MR]],
        block: Block,
        next: Option<Lines<'_>>,
    ) {
        let Block {
            stride,
            tiles,
            chunk0,
            chunks,
            kc,
        } = block;
        let k = self.k;
        let total = self.cols.div_ceil(NR);
        let mut w_next = next;
        if let Some(w) = &mut w_next {
            w.spread(chunks * tiles);
        }
        let panel = |chunk: usize, k0: usize, len: usize| {
            let (piece, at) = (chunk / self.per, chunk % self.per);
            &self.right[piece][at * k + k0..][..len]
        };
        let mut k0 = 0;
        while k0 < k {
            let len = kc.min(k - k0);
            for ch in 0..chunks {
                let right = panel(chunk0 + ch, k0, len);
                // The panel after this one, fetched into L1 a slice per tile
                // while this one is in use (it comes from L3 otherwise).
                let next = if ch + 1 < chunks {
                    panel(chunk0 + ch + 1, k0, len)
                } else if k0 + len < k {
                    panel(chunk0, k0 + len, kc.min(k - k0 - len))
                } else if chunk0 + chunks < total {
                    panel(chunk0 + chunks, 0, kc.min(k))
                } else {
                    &[]
                };
                let per_tile = next.len().div_ceil(tiles);
                for t in 0..tiles {
                    let lo = (t * per_tile).min(next.len());
                    for lane in &next[lo..(lo + per_tile).min(next.len())] {
                        M::prefetch(lane);
                    }
                    if let (0, Some(w)) = (k0, &mut w_next) {
                        w.step::<M>();
                    }
                    let left = &left[t * k + k0..][..len];
                    let tile = &mut acc[t * MR * stride + ch * NR..];
                    micro::<M>(tile, stride, left, right);
                }
            }
            k0 += len;
        }
    }
}

/// Packs column chunks `chunk0 .. chunk0 + chunks` of a product's right
/// factors (`[chunks][k]` lanes).
struct PackRight<'p, 'a> {
    parts: &'p [Part<'a>],
    k: usize,
    cols: usize,
    chunk0: usize,
    chunks: usize,
}

impl Job for PackRight<'_, '_> {
    type Output = Vec<Lane>;

    #[inline(always)]
    fn run<M: Simd>(self, simd: M) -> Vec<Lane> {
        let PackRight {
            parts,
            k,
            cols,
            chunk0,
            chunks,
        } = self;
        let mut out = take_lanes(chunks * k);
        // Groups of `G` chunks: one pass over the rows per group writes `G`
        // sequential streams.
        const G: usize = 8;
        let mut row = [0.0f32; G * NR];
        for g0 in (0..chunks).step_by(G) {
            let g = G.min(chunks - g0);
            let c0 = (chunk0 + g0) * NR;
            let len = ((chunk0 + g0 + g) * NR).min(cols) - c0;
            // Columns past `cols` are zero.
            row[len..].fill(0.0);
            for part in parts {
                let f = &part.right;
                let esz = f.dtype.size_in_bytes();
                for kk in 0..f.rows {
                    let off = (kk * cols + c0) * esz;
                    decode(
                        simd,
                        f.dtype,
                        &f.data[off..off + len * esz],
                        &mut row[..len],
                    );
                    for (j, v) in row.chunks_exact(NR).take(g).enumerate() {
                        out[(g0 + j) * k + part.k0 + kk].0.copy_from_slice(v);
                    }
                }
            }
        }
        out
    }
}

/// One side of a LoKr product, decoded.
enum KronMat {
    /// The matrix, row-major, `cols` wide.
    Full { m: Vec<f32>, cols: usize },
    /// `a` (`[rows, r]`) times `b` (`[r, cols]`), row-major.
    LowRank {
        a: Vec<f32>,
        b: Vec<f32>,
        r: usize,
        cols: usize,
    },
}

impl KronMat {
    /// Decodes `side`, with `scale` folded into it.
    fn new(side: &KronFactor<'_>, scale: f32) -> KronMat {
        match side {
            KronFactor::Full(m) => KronMat::Full {
                m: decode_factor(m).into_iter().map(|v| scale * v).collect(),
                cols: m.cols,
            },
            KronFactor::LowRank { a, b } => KronMat::LowRank {
                a: decode_factor(a).into_iter().map(|v| scale * v).collect(),
                b: decode_factor(b),
                r: a.cols,
                cols: b.cols,
            },
        }
    }

    fn cols(&self) -> usize {
        match self {
            KronMat::Full { cols, .. } | KronMat::LowRank { cols, .. } => *cols,
        }
    }

    /// Writes row `i` of the matrix into `out` (`cols` long).
    #[inline(always)]
    fn row_into<M: Simd>(&self, i: usize, out: &mut [f32]) {
        match self {
            KronMat::Full { m, cols } => out.copy_from_slice(&m[i * cols..(i + 1) * cols]),
            KronMat::LowRank { a, b, r, cols } => {
                out.fill(0.0);
                for (kk, &av) in a[i * r..(i + 1) * r].iter().enumerate() {
                    for (o, &bv) in out.iter_mut().zip(&b[kk * cols..(kk + 1) * cols]) {
                        *o = M::mul_add(av, bv, *o);
                    }
                }
            }
        }
    }
}

/// A LoKr adapter, decoded: `Δ[i, j] = w1[i / c, j / d] · w2[i % c, j % d]`.
struct KronPrep {
    w1: KronMat,
    w2: KronMat,
    /// Rows of `w2`.
    c: usize,
}
