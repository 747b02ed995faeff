//! The CPU implementation of the merge, used by the host backend.
//!
//! # How it works
//!
//! 1. Once per call, every factor is decoded to f32 (whatever its dtype and
//!    alignment) and packed for the inner loop, with the adapter's scale
//!    folded into its left factor. All low-rank adapters are stacked into one
//!    product of rank `Σ rankᵢ`: `Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … sₖBₖ] · [A₁; …; Aₖ]`.
//! 2. The target rows are split into contiguous blocks, one per thread
//!    (`std::thread::scope`); each thread owns its rows of `W` exclusively.
//! 3. A thread walks its rows in tiles of 6 rows × 256 columns: the tile of
//!    `W` is decoded to f32 once, every adapter's contribution is
//!    accumulated into it in f32, and it is rounded back to `W`'s dtype
//!    (nearest, ties to even) and stored once. The low-rank and LoHa products
//!    run a register-blocked 6 × 16 micro-kernel over the rank (12 AVX
//!    accumulators; both factors packed so the inner loop reads them
//!    contiguously: the tile's slice of the left factor stays in L1, the right
//!    factor streams from L2/L3); LoKr forms the two rows `w1[i / c, :]` and
//!    `w2[i % c, :]` once per row and adds their Kronecker product.
//!
//! On x86-64 CPUs with AVX2, FMA and F16C (detected at run time) the same
//! code is compiled a second time with those features, fused multiply-adds
//! and hardware f16 conversions; elsewhere a portable build (separate
//! multiply and add, branch-free software conversions) runs. The two differ
//! only in the f32 rounding of the accumulation, both well inside the
//! tolerance the tests check; f16/bf16 rounding is identical. For a given
//! CPU, results do not depend on the thread count.

use std::num::NonZeroUsize;

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
/// Columns of a tile; a multiple of [`NR`].
const CB: usize = 256;
/// With the default thread count, each thread gets at least this many
/// elements of `W`, so small merges do not pay for spawning threads.
const MIN_ELEMENTS_PER_THREAD: usize = 1 << 16;

/// The default thread count: the machine's available parallelism (1 if it
/// cannot be determined).
pub fn default_threads() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
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

/// The merge with an explicit instruction set (tests run every one).
fn merge_with(
    w: &mut [u8],
    spec: &MergeSpec<'_>,
    threads: Option<NonZeroUsize>,
    isa: Isa,
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
    let prep = Prepared::new(spec);
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
    let ctx = Ctx {
        prep: &prep,
        dtype: spec.dtype(),
        cols,
        isa,
    };
    if threads == 1 {
        ctx.run(target, 0, n);
        return Ok(());
    }
    // Blocks are whole tiles, so a tile never straddles two threads and each
    // element is computed exactly as it would be by one thread.
    let rows_per_thread = tiles.div_ceil(threads) * MR;
    std::thread::scope(|scope| {
        let mut rest = target;
        let mut first = 0;
        while first < n {
            let rows = rows_per_thread.min(n - first);
            let (block, tail) = std::mem::take(&mut rest).split_at_mut(rows * row_bytes);
            rest = tail;
            if first + rows < n {
                scope.spawn(move || ctx.run(block, first, rows));
            } else {
                ctx.run(block, first, rows);
            }
            first += rows;
        }
    });
    Ok(())
}

/// The instruction-set-specific pieces of the inner loops. A value of the
/// type proves the CPU can run them.
pub(crate) trait Simd: Copy {
    /// `a · b + c`.
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

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
/// [`run_rows_avx2_fma`], so the compiler uses AVX2 registers for both.
#[cfg(target_arch = "x86_64")]
impl Simd for x86::Avx2Fma {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
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
struct Ctx<'p> {
    prep: &'p Prepared,
    dtype: Dtype,
    cols: usize,
    isa: Isa,
}

impl Ctx<'_> {
    /// Merges `rows` rows starting at row `first` of the target (relative to
    /// the row slice; a multiple of [`MR`]); `w` holds exactly those rows.
    fn run(self, w: &mut [u8], first: usize, rows: usize) {
        match self.isa {
            Isa::Portable => run_rows(Plain, self, w, first, rows),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma(token) => {
                // SAFETY: `token` is an `x86::Avx2Fma`, which is only made
                // after the CPU reported AVX2, FMA and F16C; supporting the
                // enabled target features is the only precondition of
                // calling `run_rows_avx2_fma`.
                unsafe { run_rows_avx2_fma(token, self, w, first, rows) }
            }
        }
    }
}

/// [`run_rows`] compiled with AVX2, FMA and F16C.
///
/// # Safety
///
/// The CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_rows_avx2_fma(
    token: x86::Avx2Fma,
    ctx: Ctx<'_>,
    w: &mut [u8],
    first: usize,
    rows: usize,
) {
    run_rows(token, ctx, w, first, rows)
}

/// A tile of f32 values: [`MR`] rows of [`CB`] columns.
type Tile = Vec<[f32; CB]>;

fn zero_tile() -> Tile {
    vec![[0.0; CB]; MR]
}

/// The worker loop; see the module documentation.
#[inline(always)]
fn run_rows<M: Simd>(simd: M, ctx: Ctx<'_>, w: &mut [u8], first: usize, rows: usize) {
    let Ctx {
        prep, dtype, cols, ..
    } = ctx;
    let esz = dtype.size_in_bytes();
    let row_bytes = cols * esz;
    let mut acc = zero_tile();
    let (mut h1, mut h2) = if prep.loha.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (zero_tile(), zero_tile())
    };
    // Per LoKr adapter: the rows of w1 and w2 that the current tile's rows use.
    let mut kron_rows: Vec<(Vec<f32>, Vec<f32>)> = prep
        .lokr
        .iter()
        .map(|k| (vec![0.0; MR * k.w1.cols()], vec![0.0; MR * k.w2.cols()]))
        .collect();

    let mut start = 0;
    while start < rows {
        let tr = MR.min(rows - start);
        let row0 = first + start;
        let tile = row0 / MR;
        for (k, (r1, r2)) in prep.lokr.iter().zip(kron_rows.iter_mut()) {
            let (b, d) = (k.w1.cols(), k.w2.cols());
            for r in 0..tr {
                let i = row0 + r;
                k.w1.row_into::<M>(i / k.c, &mut r1[r * b..(r + 1) * b]);
                k.w2.row_into::<M>(i % k.c, &mut r2[r * d..(r + 1) * d]);
            }
        }

        let mut c0 = 0;
        while c0 < cols {
            let cb = CB.min(cols - c0);
            let width = cb.next_multiple_of(NR);
            let (chunk0, chunks) = (c0 / NR, width / NR);
            for (r, row) in acc.iter_mut().enumerate() {
                let row = &mut row[..width];
                if r < tr {
                    let off = (start + r) * row_bytes + c0 * esz;
                    decode(simd, dtype, &w[off..off + cb * esz], &mut row[..cb]);
                    row[cb..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
            }
            if let Some(p) = &prep.lowrank {
                p.apply::<M>(&mut acc, tile, chunk0, chunks);
            }
            for (p1, p2) in &prep.loha {
                for row in h1.iter_mut().chain(h2.iter_mut()) {
                    row[..width].fill(0.0);
                }
                p1.apply::<M>(&mut h1, tile, chunk0, chunks);
                p2.apply::<M>(&mut h2, tile, chunk0, chunks);
                for ((a, x), y) in acc.iter_mut().zip(&h1).zip(&h2).take(tr) {
                    for ((a, x), y) in a[..cb].iter_mut().zip(&x[..cb]).zip(&y[..cb]) {
                        *a = M::mul_add(*x, *y, *a);
                    }
                }
            }
            for (k, (r1, r2)) in prep.lokr.iter().zip(&kron_rows) {
                let (b, d) = (k.w1.cols(), k.w2.cols());
                for (r, a) in acc.iter_mut().enumerate().take(tr) {
                    kron_row::<M>(
                        &mut a[..cb],
                        c0,
                        &r1[r * b..(r + 1) * b],
                        &r2[r * d..(r + 1) * d],
                    );
                }
            }
            for (r, row) in acc.iter().enumerate().take(tr) {
                let off = (start + r) * row_bytes + c0 * esz;
                encode(simd, dtype, &row[..cb], &mut w[off..off + cb * esz]);
            }
            c0 += cb;
        }
        start += tr;
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
struct Prepared {
    /// All low-rank adapters, stacked into one product.
    lowrank: Option<Packed>,
    /// Per LoHa adapter: its two products (the scale is in the first).
    loha: Vec<(Packed, Packed)>,
    /// Per LoKr adapter (the scale is in `w1`).
    lokr: Vec<KronPrep>,
}

impl Prepared {
    fn new(spec: &MergeSpec<'_>) -> Prepared {
        let (n, cols) = (spec.delta_rows(), spec.cols());
        let rank: usize = spec
            .adapters()
            .iter()
            .map(|a| match &a.delta {
                Delta::LowRank { up, .. } => up.cols,
                _ => 0,
            })
            .sum();
        let mut lowrank = (rank > 0).then(|| Packed::zeroed(n, cols, rank));
        let mut k0 = 0;
        let mut loha = Vec::new();
        let mut lokr = Vec::new();
        for adapter in spec.adapters() {
            match &adapter.delta {
                Delta::LowRank { up, down } => {
                    if let Some(p) = lowrank.as_mut() {
                        p.put(k0, up, adapter.scale, down);
                    }
                    k0 += up.cols;
                }
                Delta::LoHa { w1a, w1b, w2a, w2b } => {
                    let mut p1 = Packed::zeroed(n, cols, w1a.cols);
                    p1.put(0, w1a, adapter.scale, w1b);
                    let mut p2 = Packed::zeroed(n, cols, w2a.cols);
                    p2.put(0, w2a, 1.0, w2b);
                    loha.push((p1, p2));
                }
                Delta::LoKr { w1, w2 } => lokr.push(KronPrep {
                    w1: KronMat::new(w1, adapter.scale),
                    w2: KronMat::new(w2, 1.0),
                    c: w2.shape()[0],
                }),
            }
        }
        Prepared {
            lowrank,
            loha,
            lokr,
        }
    }
}

/// A product `L · R` (`L` `[n, k]`, `R` `[k, cols]`) packed for the
/// micro-kernel: `L` as `[n / MR][k][MR]`, `R` as `[cols / NR][k][NR]`, both
/// zero-padded, so the micro-kernel reads both contiguously.
struct Packed {
    k: usize,
    left: Vec<[f32; MR]>,
    right: Vec<[f32; NR]>,
}

impl Packed {
    fn zeroed(n: usize, cols: usize, k: usize) -> Packed {
        Packed {
            k,
            left: vec![[0.0; MR]; n.div_ceil(MR) * k],
            right: vec![[0.0; NR]; cols.div_ceil(NR) * k],
        }
    }

    /// Packs `scale · left` (`[n, r]`) and `right` (`[r, cols]`) at rank
    /// offset `k0`.
    fn put(&mut self, k0: usize, left: &Factor<'_>, scale: f32, right: &Factor<'_>) {
        let k = self.k;
        let r = left.cols;
        for (idx, v) in decode_factor(left).into_iter().enumerate() {
            let (i, kk) = (idx / r, idx % r);
            self.left[(i / MR) * k + k0 + kk][i % MR] = scale * v;
        }
        let cols = right.cols;
        for (idx, v) in decode_factor(right).into_iter().enumerate() {
            let (kk, j) = (idx / cols, idx % cols);
            self.right[(j / NR) * k + k0 + kk][j % NR] = v;
        }
    }

    /// Adds the product's rows of tile `tile`, column chunks
    /// `chunk0 .. chunk0 + chunks`, to `acc` (column 0 of `acc` is column
    /// `chunk0 · NR` of the product).
    #[inline(always)]
    fn apply<M: Simd>(&self, acc: &mut Tile, tile: usize, chunk0: usize, chunks: usize) {
        let k = self.k;
        let left = &self.left[tile * k..(tile + 1) * k];
        for ch in 0..chunks {
            let right = &self.right[(chunk0 + ch) * k..(chunk0 + ch + 1) * k];
            let cols = ch * NR..(ch + 1) * NR;
            let mut c = [[0.0f32; NR]; MR];
            for (c, a) in c.iter_mut().zip(acc.iter()) {
                c.copy_from_slice(&a[cols.clone()]);
            }
            for (l, r) in left.iter().zip(right) {
                for (c, &l) in c.iter_mut().zip(l) {
                    for (c, &r) in c.iter_mut().zip(r) {
                        *c = M::mul_add(l, r, *c);
                    }
                }
            }
            for (c, a) in c.iter().zip(acc.iter_mut()) {
                a[cols.clone()].copy_from_slice(c);
            }
        }
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
