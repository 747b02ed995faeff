//! Tests of the matrix product against an f64 reference written here (it
//! decodes W with `half`, not with the kernel's conversions).

use std::num::NonZeroUsize;

use half::{bf16, f16};
use proptest::prelude::*;

use super::{matmul_with, Operands, KC, MR, TR};
use crate::cpu::Isa;
use crate::{matmul_flops, matmul_xwt, weight_matrix_dims, Dtype, KernelError};

/// SplitMix64: deterministic data from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// A value of varied magnitude (2⁻⁶ .. 2⁶), one in eight exactly zero.
    fn value(&mut self) -> f32 {
        if self.next() % 8 == 0 {
            return 0.0;
        }
        let e = (self.next() % 13) as i32 - 6;
        self.sym() * 2f32.powi(e)
    }
}

/// A weight `[n, k]` stored at byte offset `off` of `store` (so the kernel
/// sees it misaligned, as in a safetensors file).
struct Weight {
    store: Vec<u8>,
    off: usize,
    dtype: Dtype,
    n: usize,
    k: usize,
}

impl Weight {
    fn from_values(dtype: Dtype, n: usize, k: usize, values: &[f32], off: usize) -> Weight {
        assert_eq!(values.len(), n * k);
        let mut store = vec![0xA5; off];
        for &v in values {
            match dtype {
                Dtype::F32 => store.extend_from_slice(&v.to_le_bytes()),
                Dtype::F16 => store.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                Dtype::BF16 => store.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            }
        }
        Weight {
            store,
            off,
            dtype,
            n,
            k,
        }
    }

    fn random(rng: &mut Rng, dtype: Dtype, n: usize, k: usize) -> Weight {
        let values: Vec<f32> = (0..n * k).map(|_| rng.value()).collect();
        let off = (rng.next() % 4) as usize;
        Weight::from_values(dtype, n, k, &values, off)
    }

    fn bytes(&self) -> &[u8] {
        &self.store[self.off..]
    }

    /// The stored values, exactly, decoded with `half`.
    fn values(&self) -> Vec<f64> {
        let size = self.dtype.size_in_bytes();
        self.bytes()
            .chunks_exact(size)
            .map(|b| match self.dtype {
                Dtype::F32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                Dtype::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
                Dtype::BF16 => bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64(),
            })
            .collect()
    }

    /// The same bytes read as the transposed matrix `[k, n]` would be: the
    /// element `(i, j)` of `W` moves to `(j, i)`, and the result is again
    /// handed to the kernel as an `[n, k]` weight (a layout bug).
    fn transposed_bytes(&self) -> Weight {
        let size = self.dtype.size_in_bytes();
        let src = self.bytes();
        let mut out = vec![0; src.len()];
        for i in 0..self.n {
            for j in 0..self.k {
                let from = (i * self.k + j) * size;
                let to = (j * self.n + i) * size;
                out[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
        let mut store = vec![0xA5; self.off];
        store.extend_from_slice(&out);
        Weight { store, ..*self }
    }
}

/// Checks `y` against `Σ_c x[t, c] · w[j, c]` computed in f64:
/// `|y − ref| ≤ 1e-5 · Σ_c |x[t, c] · w[j, c]| + 1e-30`.
fn check(y: &[f32], x: &[f32], tokens: usize, w: &Weight) -> Result<(), String> {
    let (n, k) = (w.n, w.k);
    let wv = w.values();
    if y.len() != tokens * n {
        return Err(format!("y has {} values, expected {}", y.len(), tokens * n));
    }
    for t in 0..tokens {
        for j in 0..n {
            let (mut sum, mut mag) = (0f64, 0f64);
            for c in 0..k {
                let p = f64::from(x[t * k + c]) * wv[j * k + c];
                sum += p;
                mag += p.abs();
            }
            let got = f64::from(y[t * n + j]);
            let tol = 1e-5 * mag + 1e-30;
            let err = (got - sum).abs();
            if err.is_nan() || err > tol {
                return Err(format!(
                    "y[{t}, {j}] = {got:e}, reference {sum:e}, error {err:e} > tolerance {tol:e} \
                     (tokens {tokens}, n {n}, k {k}, {})",
                    w.dtype
                ));
            }
        }
    }
    Ok(())
}

/// Runs the product with an explicit instruction set; `y` starts as NaN so
/// an output that is not written shows.
fn run(
    x: &[f32],
    tokens: usize,
    w: &Weight,
    threads: Option<usize>,
    isa: Isa,
) -> Result<Vec<f32>, KernelError> {
    let mut y = vec![f32::NAN; tokens * w.n];
    let ops = Operands {
        x,
        tokens,
        w: w.bytes(),
        w_dtype: w.dtype,
        n: w.n,
        k: w.k,
    };
    matmul_with(ops, &mut y, threads.and_then(NonZeroUsize::new), isa)?;
    Ok(y)
}

fn random_x(rng: &mut Rng, tokens: usize, k: usize) -> Vec<f32> {
    (0..tokens * k).map(|_| rng.value()).collect()
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Random shapes and dtypes, every instruction set, several thread
    /// counts: within tolerance of the reference, and bit-identical across
    /// thread counts.
    #[test]
    fn matches_reference(
        tokens in 1..33usize,
        n in 1..300usize,
        k in 1..300usize,
        dtype in dtype_strategy(),
        threads in 1..5usize,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng(seed);
        let w = Weight::random(&mut rng, dtype, n, k);
        let x = random_x(&mut rng, tokens, k);
        for isa in Isa::available() {
            let one = run(&x, tokens, &w, Some(1), isa).unwrap();
            if let Err(e) = check(&one, &x, tokens, &w) {
                return Err(TestCaseError::fail(format!("{isa:?}: {e}")));
            }
            for t in [Some(threads), None] {
                let y = run(&x, tokens, &w, t, isa).unwrap();
                let same = y.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits());
                prop_assert!(same, "{isa:?}: {t:?} threads differ from 1 thread");
            }
        }
    }
}

/// The check is not vacuous: a weight handed over transposed (the classic
/// layout bug) fails it, square or not, and so does an output off by twice
/// the tolerance in one place.
#[test]
fn check_rejects_transposed_weight_and_small_errors() {
    let mut rng = Rng(7);
    for (tokens, n, k) in [(5, 37, 53), (3, 40, 40), (1, 9, 300)] {
        for dtype in Dtype::ALL {
            let w = Weight::random(&mut rng, dtype, n, k);
            let x = random_x(&mut rng, tokens, k);
            let y = run(&x, tokens, &w, None, Isa::detect()).unwrap();
            check(&y, &x, tokens, &w).unwrap();

            let wt = w.transposed_bytes();
            let yt = run(&x, tokens, &wt, None, Isa::detect()).unwrap();
            assert!(
                check(&yt, &x, tokens, &w).is_err(),
                "transposed W passed ({tokens}, {n}, {k}, {dtype})"
            );

            // y[0, 0] off by twice the tolerance.
            let wv = w.values();
            let mag: f64 = (0..k).map(|c| (f64::from(x[c]) * wv[c]).abs()).sum();
            let mut bad = y.clone();
            bad[0] += (2e-5 * mag) as f32;
            assert!(check(&bad, &x, tokens, &w).is_err());
        }
    }
}

/// Shapes that cross several chunks of `k`, partial blocks of rows and
/// tokens, and more threads than blocks.
#[test]
fn block_edges() {
    let mut rng = Rng(11);
    let ks = [1, 7, 8, 9, KC - 1, KC, KC + 1, 2 * KC + 13];
    let ns = [1, MR - 1, MR, MR + 1, 4 * MR + 2];
    let ts = [1, TR - 1, TR, TR + 1, 2 * TR + 3];
    for (i, &k) in ks.iter().enumerate() {
        for (j, &n) in ns.iter().enumerate() {
            let tokens = ts[(i + j) % ts.len()];
            let dtype = Dtype::ALL[(i + 2 * j) % 3];
            let w = Weight::random(&mut rng, dtype, n, k);
            let x = random_x(&mut rng, tokens, k);
            for isa in Isa::available() {
                for threads in [Some(1), Some(2), Some(64)] {
                    let y = run(&x, tokens, &w, threads, isa).unwrap();
                    if let Err(e) = check(&y, &x, tokens, &w) {
                        panic!("{isa:?}, {threads:?} threads: {e}");
                    }
                }
            }
        }
    }
}

/// A larger product, as the benchmark runs it, through the public entry.
#[test]
fn larger_product_through_public_api() {
    let mut rng = Rng(3);
    let (tokens, n, k) = (16, 160, 1100);
    let w = Weight::random(&mut rng, Dtype::F16, n, k);
    let x = random_x(&mut rng, tokens, k);
    let mut y = vec![f32::NAN; tokens * n];
    matmul_xwt(&x, tokens, w.bytes(), w.dtype, n, k, &mut y, None).unwrap();
    check(&y, &x, tokens, &w).unwrap();
}

/// A NaN or infinity stays in its own row or column of `Y`: padding and
/// blocking do not spread it.
#[test]
fn non_finite_values_stay_local() {
    let (tokens, n, k) = (6, 8, 21);
    let mut rng = Rng(5);
    let mut values: Vec<f32> = (0..n * k).map(|_| rng.sym()).collect();
    values[5 * k + 3] = f32::NAN;
    let w = Weight::from_values(Dtype::F32, n, k, &values, 1);
    let mut x = random_x(&mut rng, tokens, k);
    x[2 * k + 20] = f32::INFINITY;
    for isa in Isa::available() {
        let y = run(&x, tokens, &w, Some(2), isa).unwrap();
        for t in 0..tokens {
            for j in 0..n {
                let v = y[t * n + j];
                assert_eq!(
                    !v.is_finite(),
                    t == 2 || j == 5,
                    "{isa:?}: y[{t}, {j}] = {v}"
                );
            }
        }
    }
}

#[test]
fn bad_lengths_are_typed_errors_and_leave_y_untouched() {
    let (tokens, n, k) = (3, 5, 7);
    let x = vec![1.0f32; tokens * k];
    let w = vec![0u8; n * k * 2];
    let mut y = vec![42.0f32; tokens * n];
    let dt = Dtype::F16;

    let err = matmul_xwt(&x[1..], tokens, &w, dt, n, k, &mut y, None).unwrap_err();
    assert_eq!(
        err,
        KernelError::MatrixLength {
            what: "activations x",
            rows: 3,
            cols: 7,
            expected: 21,
            actual: 20
        }
    );
    let err = matmul_xwt(&x, tokens, &w, Dtype::F32, n, k, &mut y, None).unwrap_err();
    assert_eq!(
        err,
        KernelError::WeightLength {
            shape: vec![5, 7],
            dtype: Dtype::F32,
            expected: 140,
            actual: 70
        }
    );
    let err = matmul_xwt(&x, tokens, &w[..69], dt, n, k, &mut y, None).unwrap_err();
    assert!(matches!(
        err,
        KernelError::WeightLength {
            expected: 70,
            actual: 69,
            ..
        }
    ));
    let err = matmul_xwt(&x, tokens, &w, dt, n, k, &mut y[..14], None).unwrap_err();
    assert_eq!(
        err,
        KernelError::MatrixLength {
            what: "output y",
            rows: 3,
            cols: 5,
            expected: 15,
            actual: 14
        }
    );
    assert!(y.iter().all(|&v| v == 42.0), "y was written on error");
    assert!(err.to_string().contains("output y holds 14"), "{err}");

    let err = matmul_xwt(&[], usize::MAX, &[], dt, 1, 2, &mut [], None).unwrap_err();
    assert!(matches!(err, KernelError::Overflow { .. }), "{err:?}");
    let err = matmul_xwt(&[], 0, &[], dt, usize::MAX, 2, &mut [], None).unwrap_err();
    assert!(matches!(err, KernelError::Overflow { .. }), "{err:?}");
    let err = matmul_xwt(&[], usize::MAX, &[], dt, 2, 0, &mut [], None).unwrap_err();
    assert!(matches!(err, KernelError::Overflow { .. }), "{err:?}");
}

#[test]
fn zero_dimensions() {
    // k = 0: empty sums, y is overwritten with zeros.
    let mut y = vec![f32::NAN; 6];
    matmul_xwt(&[], 2, &[], Dtype::BF16, 3, 0, &mut y, None).unwrap();
    assert_eq!(y, vec![0.0; 6]);
    // No tokens or no rows: nothing to do.
    matmul_xwt(&[], 0, &[0; 8], Dtype::F32, 1, 2, &mut [], None).unwrap();
    matmul_xwt(&[1.0; 4], 2, &[], Dtype::F16, 0, 2, &mut [], None).unwrap();
}

#[test]
fn weight_matrix_dims_views_conv_weights_as_matrices() {
    assert_eq!(weight_matrix_dims(&[640, 320]), Ok((640, 320)));
    assert_eq!(weight_matrix_dims(&[320, 4, 3, 3]), Ok((320, 36)));
    for bad in [
        &[5][..],
        &[2, 3, 4],
        &[0, 3],
        &[2, 3, 0, 1],
        &[1, 2, 3, 4, 5],
    ] {
        assert_eq!(
            weight_matrix_dims(bad),
            Err(KernelError::WeightShape {
                shape: bad.to_vec()
            })
        );
    }
    assert!(matches!(
        weight_matrix_dims(&[1, usize::MAX, 2, 1]),
        Err(KernelError::Overflow { .. })
    ));
}

#[test]
fn flops() {
    assert_eq!(matmul_flops(16, 2048, 2048), 2 * 16 * 2048 * 2048);
    assert_eq!(matmul_flops(0, 5, 5), 0);
    assert_eq!(matmul_flops(usize::MAX, usize::MAX, 2), u64::MAX);
}
