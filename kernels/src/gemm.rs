//! The CPU matrix product `Y = X · Wᵀ`: a layer's compute on the host
//! backend.
//!
//! [`matmul_xwt`] computes `Y[t, j] = Σ_c X[t, c] · W[j, c]` for an
//! activation batch `X` (f32, row-major `[tokens, k]`) and a weight `W` as
//! stored in a checkpoint (little-endian f32, f16 or bf16, row-major
//! `[n, k]`, any alignment); `Y` is f32, row-major `[tokens, n]`. A linear
//! layer's weight `[out, in]` is used as is; a conv weight
//! `[out, in, kh, kw]` is viewed as `[out, in · kh · kw]`
//! ([`weight_matrix_dims`] gives `n` and `k` for either).
//!
//! # How it works
//!
//! 1. Once per call, `X` is copied into chunks of `KC` (512) columns,
//!    zero-padded to whole lanes of eight, and within a chunk into blocks of
//!    `TR` (4) tokens interleaved lane group by lane group, the order in which
//!    the micro-kernel reads them.
//! 2. The rows of `W` (the output columns of `Y`) are split into contiguous
//!    blocks, one per thread (`std::thread::scope`); each thread writes only
//!    its columns of `Y`.
//! 3. A thread walks its rows `MR` (3) at a time. For each chunk of `KC`
//!    columns the `MR × KC` tile of `W` is decoded to f32 once (with the
//!    merge's conversions: F16C on CPUs that have it), interleaved, and
//!    reused for every token: a register-blocked micro-kernel multiplies it
//!    with `TR` tokens at a time, keeping `MR × TR` accumulators of eight
//!    lanes (12 AVX registers, plus 3 for the tile and 1 for a token); the
//!    accumulators carry over from chunk to chunk, and their lanes are
//!    summed at the end, in a fixed order.
//!
//! On a 2-core Zen 3 VM (AVX2 build, f16 `W`, `n = k = 2048`, 16 tokens) this
//! runs at about 48 GFLOP/s on one thread (about two thirds of the FMA
//! peak) and 63 GFLOP/s on two (`examples/matmul_throughput.rs`); with one
//! token it is bound by reading `W`.
//!
//! As in the merge, the same code is compiled a second time with AVX2, FMA
//! and F16C, chosen at run time; elsewhere a portable build runs (separate
//! multiply and add). For a given CPU the result does not depend on the
//! thread count. Each output is a sum of `k` products in f32 (eight partial
//! sums of `k / 8` terms, then a tree of three additions), so its error is
//! at most about `(k / 8 + 4) · 2⁻²⁴ · Σ |x · w|` (one more `2⁻²⁴` in the
//! portable build, which rounds each product): within the tests'
//! `1e-5 · Σ |x · w|` up to `k` ≈ 1300 even in the worst case, and far
//! inside it in practice (the errors of random terms partly cancel).

use std::num::NonZeroUsize;

use crate::cpu::{decode, default_threads, Isa, Plain, Simd};
use crate::dtype::Dtype;
use crate::error::KernelError;

#[cfg(test)]
mod tests;

/// Lanes of an accumulator (one AVX register of f32).
const LANES: usize = 8;
/// Rows of `W` per micro-kernel call.
const MR: usize = 3;
/// Tokens per micro-kernel call (fewer for the last block of tokens).
const TR: usize = 4;
/// Columns per chunk of `k`; a multiple of [`LANES`]. A chunk of `X` is
/// `tokens × KC` f32 (32 KiB for 16 tokens, read from L1/L2 once per tile),
/// the tile of `W` `MR × KC` (6 KiB, in L1).
const KC: usize = 512;
/// With the default thread count, each thread gets at least this many
/// multiply-adds, so small products do not pay for spawning threads.
const MIN_MACS_PER_THREAD: usize = 1 << 20;

// `run_rows` dispatches the last, partial block of tokens (1 to TR - 1 of
// them) to the instances T = 1, 2, 3 of the micro-kernel.
const _: () = assert!(TR == 4 && KC % LANES == 0 && KC > 0);

/// Eight f32 lanes, aligned for AVX loads.
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(32))]
struct V([f32; LANES]);

/// Floating-point operations of [`matmul_xwt`] with these dimensions:
/// `2 · tokens · n · k` (one multiply and one add per term), saturating at
/// `u64::MAX`.
pub fn matmul_flops(tokens: usize, n: usize, k: usize) -> u64 {
    [tokens, n, k]
        .iter()
        .fold(2u64, |acc, &d| acc.saturating_mul(d as u64))
}

/// `(n, k)` of a weight of shape `shape` seen as a matrix: `[out, in]` is
/// `(out, in)`, a conv weight `[out, in, kh, kw]` is `(out, in · kh · kw)`.
///
/// Any other rank, or a zero dimension, is [`KernelError::WeightShape`]; a
/// product that overflows is [`KernelError::Overflow`].
pub fn weight_matrix_dims(shape: &[usize]) -> Result<(usize, usize), KernelError> {
    let bad = || KernelError::WeightShape {
        shape: shape.to_vec(),
    };
    if !matches!(shape.len(), 2 | 4) || shape.contains(&0) {
        return Err(bad());
    }
    let k = shape[1..]
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(KernelError::Overflow {
            what: "weight columns (in · kh · kw)",
        })?;
    Ok((shape[0], k))
}

/// `Y = X · Wᵀ`: `y[t·n + j] = Σ_c x[t·k + c] · w[j, c]` for
/// `t < tokens`, `j < n`, `c < k` (see the [module documentation](self)).
///
/// - `x`: activations, f32, row-major `[tokens, k]` (`tokens · k` values).
/// - `w`: weight bytes, little-endian `w_dtype`, row-major `[n, k]`
///   (`n · k · size` bytes), any alignment.
/// - `y`: output, f32, row-major `[tokens, n]`; overwritten (never read).
/// - `threads`: `Some(t)` uses at most `t` threads (never more than there
///   are blocks of 3 rows of `W`); `None` uses [`default_threads`],
///   fewer for small products (at least 2²⁰ multiply-adds per thread). The
///   calling thread does one share of the work.
///
/// A zero dimension is allowed: with `k = 0`, `y` is filled with zeros.
///
/// # Errors
///
/// [`KernelError::MatrixLength`] if `x` or `y` has the wrong length,
/// [`KernelError::WeightLength`] (with shape `[n, k]`) if `w` does,
/// [`KernelError::Overflow`] if a size overflows `usize`. On error `y` is
/// untouched; once the checks pass the product cannot fail.
#[allow(clippy::too_many_arguments)]
pub fn matmul_xwt(
    x: &[f32],
    tokens: usize,
    w: &[u8],
    w_dtype: Dtype,
    n: usize,
    k: usize,
    y: &mut [f32],
    threads: Option<NonZeroUsize>,
) -> Result<(), KernelError> {
    matmul_with(
        Operands {
            x,
            tokens,
            w,
            w_dtype,
            n,
            k,
        },
        y,
        threads,
        Isa::detect(),
    )
}

/// The inputs of a product, borrowed.
#[derive(Clone, Copy)]
struct Operands<'a> {
    x: &'a [f32],
    tokens: usize,
    w: &'a [u8],
    w_dtype: Dtype,
    n: usize,
    k: usize,
}

/// Checks that `len` is `rows · cols`.
fn check_matrix(
    what: &'static str,
    rows: usize,
    cols: usize,
    len: usize,
) -> Result<(), KernelError> {
    let expected = rows
        .checked_mul(cols)
        .ok_or(KernelError::Overflow { what })?;
    if len != expected {
        return Err(KernelError::MatrixLength {
            what,
            rows,
            cols,
            expected,
            actual: len,
        });
    }
    Ok(())
}

/// The product with an explicit instruction set (tests run every one).
fn matmul_with(
    ops: Operands<'_>,
    y: &mut [f32],
    threads: Option<NonZeroUsize>,
    isa: Isa,
) -> Result<(), KernelError> {
    let Operands {
        x,
        tokens,
        w,
        w_dtype,
        n,
        k,
    } = ops;
    check_matrix("activations x", tokens, k, x.len())?;
    let w_bytes = n
        .checked_mul(k)
        .and_then(|e| e.checked_mul(w_dtype.size_in_bytes()))
        .ok_or(KernelError::Overflow { what: "weight w" })?;
    if w.len() != w_bytes {
        return Err(KernelError::WeightLength {
            shape: vec![n, k],
            dtype: w_dtype,
            expected: w_bytes,
            actual: w.len(),
        });
    }
    check_matrix("output y", tokens, n, y.len())?;
    if tokens == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }

    let xp = pack_x(x, tokens, k);
    let blocks = n.div_ceil(MR);
    let wanted = match threads {
        Some(t) => t.get(),
        None => default_threads()
            .get()
            .min((tokens.saturating_mul(n).saturating_mul(k) / MIN_MACS_PER_THREAD).max(1)),
    };
    let threads = wanted.clamp(1, blocks);
    // Blocks are whole groups of MR rows, so every thread's rows start at a
    // multiple of MR, as with one thread (not needed for the result, which
    // does not depend on the grouping, but it keeps the blocks full).
    let rows_per_thread = blocks.div_ceil(threads) * MR;
    let ctx = Ctx {
        xp: &xp,
        tokens,
        w,
        w_dtype,
        k,
        isa,
    };
    // Per thread, its columns of every row of y.
    let starts: Vec<usize> = (0..n).step_by(rows_per_thread).collect();
    let mut parts: Vec<Vec<&mut [f32]>> =
        starts.iter().map(|_| Vec::with_capacity(tokens)).collect();
    for row in y.chunks_exact_mut(n) {
        let mut rest = row;
        for part in &mut parts {
            let len = rows_per_thread.min(rest.len());
            let (cols, tail) = std::mem::take(&mut rest).split_at_mut(len);
            part.push(cols);
            rest = tail;
        }
    }
    std::thread::scope(|scope| {
        let mut jobs = starts.into_iter().zip(parts);
        let last = jobs.next_back();
        for (first, mut out) in jobs {
            scope.spawn(move || ctx.run(first, &mut out));
        }
        if let Some((first, mut out)) = last {
            ctx.run(first, &mut out);
        }
    });
    Ok(())
}

/// Copies `x` (`[tokens, k]`) into chunks of [`KC`] columns, zero-padded to
/// whole lanes: chunk `ci` (`kcv` lanes wide) starts at lane
/// `tokens · ci · KC / LANES`; in it, the block of `T` tokens starting at
/// token `t0` (`T` = [`TR`], fewer for the last block) starts `t0 · kcv`
/// lanes further and is interleaved as `[kcv][T]`, the order in which the
/// micro-kernel reads it.
fn pack_x(x: &[f32], tokens: usize, k: usize) -> Vec<V> {
    let mut xp = vec![V::default(); tokens * k.div_ceil(LANES)];
    let mut c0 = 0;
    while c0 < k {
        let kc = KC.min(k - c0);
        let kcv = kc.div_ceil(LANES);
        let chunk = &mut xp[tokens * (c0 / LANES)..][..tokens * kcv];
        let mut t0 = 0;
        while t0 < tokens {
            let tb = TR.min(tokens - t0);
            let block = &mut chunk[t0 * kcv..][..tb * kcv];
            for t in 0..tb {
                let src = &x[(t0 + t) * k + c0..][..kc];
                for (j, lanes) in src.chunks(LANES).enumerate() {
                    block[j * tb + t].0[..lanes.len()].copy_from_slice(lanes);
                }
            }
            t0 += tb;
        }
        c0 += kc;
    }
    xp
}

/// Everything a worker thread needs; shared by reference.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    /// `x`, packed by [`pack_x`].
    xp: &'a [V],
    tokens: usize,
    w: &'a [u8],
    w_dtype: Dtype,
    k: usize,
    isa: Isa,
}

impl Ctx<'_> {
    /// Computes the columns `first .. first + out[t].len()` of `Y`;
    /// `out[t]` is that part of row `t`.
    fn run(self, first: usize, out: &mut [&mut [f32]]) {
        match self.isa {
            Isa::Portable => run_rows(Plain, self, first, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma(token) => {
                // SAFETY: `token` is a `cpu::x86::Avx2Fma`, which is only
                // made after the CPU reported AVX2, FMA and F16C; supporting
                // the enabled target features is the only precondition of
                // calling `run_rows_avx2_fma`.
                unsafe { run_rows_avx2_fma(token, self, first, out) }
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
    token: crate::cpu::x86::Avx2Fma,
    ctx: Ctx<'_>,
    first: usize,
    out: &mut [&mut [f32]],
) {
    run_rows(token, ctx, first, out)
}

/// The worker loop; see the module documentation.
#[inline(always)]
fn run_rows<M: Simd>(simd: M, ctx: Ctx<'_>, first: usize, out: &mut [&mut [f32]]) {
    let Ctx {
        xp,
        tokens,
        w,
        w_dtype,
        k,
        ..
    } = ctx;
    let rows = out.first().map_or(0, |r| r.len());
    let esz = w_dtype.size_in_bytes();
    let row_bytes = k * esz;
    // The decoded tile of W, interleaved: lane group `j` of its MR rows.
    let mut tile = [[V::default(); MR]; KC / LANES];
    // One row of the tile, decoded.
    let mut row = [0f32; KC];
    // Per token, the accumulators of the current MR rows.
    let mut acc = vec![[V::default(); MR]; tokens];

    let mut r0 = 0;
    while r0 < rows {
        let mr = MR.min(rows - r0);
        acc.fill([V::default(); MR]);
        let mut c0 = 0;
        while c0 < k {
            let kc = KC.min(k - c0);
            let kcv = kc.div_ceil(LANES);
            let tile = &mut tile[..kcv];
            for r in 0..MR {
                let row = &mut row[..kcv * LANES];
                if r < mr {
                    let off = (first + r0 + r) * row_bytes + c0 * esz;
                    decode(simd, w_dtype, &w[off..off + kc * esz], &mut row[..kc]);
                    row[kc..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
                for (t, lanes) in tile.iter_mut().zip(row.chunks_exact(LANES)) {
                    t[r].0.copy_from_slice(lanes);
                }
            }
            let xc = &xp[tokens * (c0 / LANES)..][..tokens * kcv];
            let mut t0 = 0;
            while t0 < tokens {
                let acc = &mut acc[t0..];
                let xb = &xc[t0 * kcv..];
                match tokens - t0 {
                    1 => micro::<M, 1>(tile, xb, acc),
                    2 => micro::<M, 2>(tile, xb, acc),
                    3 => micro::<M, 3>(tile, xb, acc),
                    _ => micro::<M, TR>(tile, xb, acc),
                }
                t0 += TR;
            }
            c0 += kc;
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o[r0..r0 + mr].iter_mut().zip(a) {
                *o = hsum(a);
            }
        }
        r0 += mr;
    }
}

/// Adds the products of the tile's [`MR`] rows (`w`: `kcv` lane groups,
/// interleaved `[kcv][MR]`) with `T` tokens (`x`: at least `T · kcv` lanes,
/// interleaved `[kcv][T]`) to `acc[..T]`.
#[inline(always)]
fn micro<M: Simd, const T: usize>(w: &[[V; MR]], x: &[V], acc: &mut [[V; MR]]) {
    let x = x[..T * w.len()].chunks_exact(T);
    let mut c = [[[0f32; LANES]; MR]; T];
    for (c, a) in c.iter_mut().zip(acc.iter()) {
        for (c, a) in c.iter_mut().zip(a) {
            *c = a.0;
        }
    }
    for (wj, xj) in w.iter().zip(x) {
        for (c, xv) in c.iter_mut().zip(xj) {
            for (c, wv) in c.iter_mut().zip(wj) {
                for ((c, &w), &x) in c.iter_mut().zip(&wv.0).zip(&xv.0) {
                    *c = M::mul_add(w, x, *c);
                }
            }
        }
    }
    for (c, a) in c.iter().zip(acc.iter_mut()) {
        for (c, a) in c.iter().zip(a) {
            a.0 = *c;
        }
    }
}

/// The sum of the eight lanes, in a fixed order.
#[inline(always)]
fn hsum(v: &V) -> f32 {
    let l = v.0;
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}
