//! Tests of the CPU merge against the f64 reference in [`reference`].

mod reference;

use std::num::NonZeroUsize;
use std::ops::Range;

use half::{bf16, f16};
use proptest::prelude::*;

use super::{merge_blocked, merge_with, Blocking, Isa, MR, NR};
use crate::{merge_cpu, Adapter, Delta, Dtype, Factor, KernelError, KronFactor, MergeSpec};
use reference::Expected;

// ---------------------------------------------------------------------------
// Owned test data. Every buffer is stored at a chosen byte offset inside a
// larger allocation, so slices handed to the kernel are misaligned as they
// are in safetensors files.

/// Bytes stored at offset `off` of `store`.
#[derive(Clone)]
struct Buf {
    store: Vec<u8>,
    off: usize,
}

impl Buf {
    fn new(bytes: &[u8], off: usize) -> Buf {
        let mut store = vec![0xA5; off];
        store.extend_from_slice(bytes);
        Buf { store, off }
    }

    fn get(&self) -> &[u8] {
        &self.store[self.off..]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.store[self.off..]
    }
}

fn encode_values(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_in_bytes());
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            Dtype::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

#[derive(Clone)]
struct OwnedFactor {
    buf: Buf,
    dtype: Dtype,
    rows: usize,
    cols: usize,
}

impl OwnedFactor {
    fn from_values(dtype: Dtype, rows: usize, cols: usize, values: &[f32], off: usize) -> Self {
        assert_eq!(values.len(), rows * cols);
        OwnedFactor {
            buf: Buf::new(&encode_values(dtype, values), off),
            dtype,
            rows,
            cols,
        }
    }

    fn random(rng: &mut Rng, dtype: Dtype, rows: usize, cols: usize) -> Self {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.sym()).collect();
        let off = rng.below(4);
        Self::from_values(dtype, rows, cols, &values, off)
    }

    fn view(&self) -> Factor<'_> {
        Factor::new(self.buf.get(), self.dtype, self.rows, self.cols)
    }

    /// The transposed matrix (same dtype, exact).
    fn transposed(&self) -> OwnedFactor {
        let size = self.dtype.size_in_bytes();
        let src = self.buf.get();
        let mut out = vec![0; src.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                let from = (i * self.cols + j) * size;
                let to = (j * self.rows + i) * size;
                out[to..to + size].copy_from_slice(&src[from..from + size]);
            }
        }
        OwnedFactor {
            buf: Buf::new(&out, self.buf.off),
            dtype: self.dtype,
            rows: self.cols,
            cols: self.rows,
        }
    }
}

#[derive(Clone)]
enum OwnedKron {
    Full(OwnedFactor),
    LowRank(OwnedFactor, OwnedFactor),
}

impl OwnedKron {
    fn view(&self) -> KronFactor<'_> {
        match self {
            OwnedKron::Full(m) => KronFactor::Full(m.view()),
            OwnedKron::LowRank(a, b) => KronFactor::LowRank {
                a: a.view(),
                b: b.view(),
            },
        }
    }
}

#[derive(Clone)]
enum OwnedDelta {
    LowRank {
        up: OwnedFactor,
        down: OwnedFactor,
    },
    LoHa {
        w1a: OwnedFactor,
        w1b: OwnedFactor,
        w2a: OwnedFactor,
        w2b: OwnedFactor,
    },
    LoKr {
        w1: OwnedKron,
        w2: OwnedKron,
    },
}

#[derive(Clone)]
struct OwnedAdapter {
    scale: f32,
    delta: OwnedDelta,
}

impl OwnedAdapter {
    fn view(&self) -> Adapter<'_> {
        let delta = match &self.delta {
            OwnedDelta::LowRank { up, down } => Delta::LowRank {
                up: up.view(),
                down: down.view(),
            },
            OwnedDelta::LoHa { w1a, w1b, w2a, w2b } => Delta::LoHa {
                w1a: w1a.view(),
                w1b: w1b.view(),
                w2a: w2a.view(),
                w2b: w2b.view(),
            },
            OwnedDelta::LoKr { w1, w2 } => Delta::LoKr {
                w1: w1.view(),
                w2: w2.view(),
            },
        };
        Adapter {
            scale: self.scale,
            delta,
        }
    }

    fn describe(&self) -> String {
        let f = |f: &OwnedFactor| format!("{}x{} {}", f.rows, f.cols, f.dtype);
        let k = |k: &OwnedKron| match k {
            OwnedKron::Full(m) => f(m),
            OwnedKron::LowRank(a, b) => format!("({})·({})", f(a), f(b)),
        };
        match &self.delta {
            OwnedDelta::LowRank { up, down } => {
                format!("{} · lowrank up {} down {}", self.scale, f(up), f(down))
            }
            OwnedDelta::LoHa { w1a, w1b, w2a, w2b } => format!(
                "{} · loha ({})·({}) ⊙ ({})·({})",
                self.scale,
                f(w1a),
                f(w1b),
                f(w2a),
                f(w2b)
            ),
            OwnedDelta::LoKr { w1, w2 } => {
                format!("{} · lokr {} ⊗ {}", self.scale, k(w1), k(w2))
            }
        }
    }
}

/// A merge problem with its data.
#[derive(Clone)]
struct Case {
    w_dtype: Dtype,
    shape: Vec<usize>,
    row_slice: Option<Range<usize>>,
    w: Buf,
    adapters: Vec<OwnedAdapter>,
}

impl Case {
    fn cols(&self) -> usize {
        self.shape[1..].iter().product()
    }

    fn rows(&self) -> Range<usize> {
        self.row_slice.clone().unwrap_or(0..self.shape[0])
    }

    fn views(&self) -> Vec<Adapter<'_>> {
        self.adapters.iter().map(OwnedAdapter::view).collect()
    }

    /// Runs the CPU merge on a copy of `W`; returns the merged bytes.
    fn run(&self, isa: Isa, threads: Option<usize>) -> Result<Vec<u8>, KernelError> {
        let views = self.views();
        let spec = MergeSpec::new(self.w_dtype, &self.shape, self.row_slice.clone(), &views)?;
        let mut w = self.w.clone();
        merge_with(w.get_mut(), &spec, threads.and_then(NonZeroUsize::new), isa)?;
        Ok(w.get().to_vec())
    }

    /// [`Case::run`] with an explicit blocking.
    fn run_blocked(
        &self,
        isa: Isa,
        threads: usize,
        blocking: Blocking,
    ) -> Result<Vec<u8>, KernelError> {
        let views = self.views();
        let spec = MergeSpec::new(self.w_dtype, &self.shape, self.row_slice.clone(), &views)?;
        let mut w = self.w.clone();
        merge_blocked(
            w.get_mut(),
            &spec,
            NonZeroUsize::new(threads),
            isa,
            blocking,
        )?;
        Ok(w.get().to_vec())
    }

    fn expected(&self) -> Expected {
        reference::expected(
            self.w_dtype,
            self.w.get(),
            self.cols(),
            self.rows(),
            &self.views(),
        )
    }

    fn check(&self, expected: &Expected, result: &[u8]) -> Result<(), String> {
        reference::check(
            self.w_dtype,
            self.w.get(),
            result,
            self.cols(),
            self.rows(),
            expected,
        )
    }

    fn describe(&self) -> String {
        let mut s = format!("W {:?} {} rows {:?}", self.shape, self.w_dtype, self.rows());
        for a in &self.adapters {
            s.push_str("\n  + ");
            s.push_str(&a.describe());
        }
        s
    }
}

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

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

fn random_w(rng: &mut Rng, dtype: Dtype, len: usize) -> Buf {
    let values: Vec<f32> = (0..len).map(|_| 2.0 * rng.sym()).collect();
    Buf::new(&encode_values(dtype, &values), rng.below(4))
}

// ---------------------------------------------------------------------------
// Random cases.

#[derive(Debug, Clone)]
struct AdapterParams {
    kind: u8,
    r1: usize,
    r2: usize,
    dtypes: [Dtype; 4],
    scale: f32,
    sel: u64,
}

#[derive(Debug, Clone)]
struct CaseParams {
    w_dtype: Dtype,
    out: usize,
    conv: Option<(usize, usize, usize)>,
    inn: usize,
    slice_sel: Option<u64>,
    adapters: Vec<AdapterParams>,
    threads: usize,
    seed: u64,
}

fn dtype_strategy() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)]
}

fn adapter_strategy() -> impl Strategy<Value = AdapterParams> {
    (
        0..3u8,
        1..=64usize,
        1..=64usize,
        prop::array::uniform4(dtype_strategy()),
        -2.0f32..2.0,
        any::<u64>(),
    )
        .prop_map(|(kind, r1, r2, dtypes, scale, sel)| AdapterParams {
            kind,
            r1,
            r2,
            dtypes,
            scale,
            sel,
        })
}

fn case_strategy() -> impl Strategy<Value = CaseParams> {
    (
        dtype_strategy(),
        1..=200usize,
        prop::option::weighted(0.25, (1..=22usize, 1..=3usize, 1..=3usize)),
        1..=200usize,
        prop::option::weighted(0.4, any::<u64>()),
        prop::collection::vec(adapter_strategy(), 1..=3),
        1..=4usize,
        any::<u64>(),
    )
        .prop_map(
            |(w_dtype, out, conv, inn, slice_sel, adapters, threads, seed)| CaseParams {
                w_dtype,
                out,
                conv,
                inn,
                slice_sel,
                adapters,
                threads,
                seed,
            },
        )
}

fn build_case(p: &CaseParams) -> Case {
    let mut rng = Rng(p.seed);
    let shape = match p.conv {
        Some((inn, kh, kw)) => vec![p.out, inn, kh, kw],
        None => vec![p.out, p.inn],
    };
    let cols: usize = shape[1..].iter().product();
    let row_slice = p.slice_sel.map(|sel| {
        let start = (sel % p.out as u64) as usize;
        let len = 1 + ((sel >> 32) % (p.out - start) as u64) as usize;
        start..start + len
    });
    let n = row_slice.as_ref().map_or(p.out, |r| r.len());
    let w = random_w(&mut rng, p.w_dtype, p.out * cols);
    let adapters = p
        .adapters
        .iter()
        .map(|a| {
            let [d0, d1, d2, d3] = a.dtypes;
            let delta = match a.kind {
                0 => OwnedDelta::LowRank {
                    up: OwnedFactor::random(&mut rng, d0, n, a.r1),
                    down: OwnedFactor::random(&mut rng, d1, a.r1, cols),
                },
                1 => OwnedDelta::LoHa {
                    w1a: OwnedFactor::random(&mut rng, d0, n, a.r1),
                    w1b: OwnedFactor::random(&mut rng, d1, a.r1, cols),
                    w2a: OwnedFactor::random(&mut rng, d2, n, a.r2),
                    w2b: OwnedFactor::random(&mut rng, d3, a.r2, cols),
                },
                _ => {
                    let dn = divisors(n);
                    let dc = divisors(cols);
                    let rows1 = dn[(a.sel % dn.len() as u64) as usize];
                    let cols1 = dc[((a.sel >> 16) % dc.len() as u64) as usize];
                    let (rows2, cols2) = (n / rows1, cols / cols1);
                    let mut side = |low: bool, r: usize, rows, cols, da, db| {
                        if low {
                            OwnedKron::LowRank(
                                OwnedFactor::random(&mut rng, da, rows, r),
                                OwnedFactor::random(&mut rng, db, r, cols),
                            )
                        } else {
                            OwnedKron::Full(OwnedFactor::random(&mut rng, da, rows, cols))
                        }
                    };
                    let w1 = side(a.sel >> 40 & 1 == 1, a.r1, rows1, cols1, d0, d1);
                    let w2 = side(a.sel >> 41 & 1 == 1, a.r2, rows2, cols2, d2, d3);
                    OwnedDelta::LoKr { w1, w2 }
                }
            };
            OwnedAdapter {
                scale: a.scale,
                delta,
            }
        })
        .collect();
    Case {
        w_dtype: p.w_dtype,
        shape,
        row_slice,
        w,
        adapters,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random shapes (2-D and 4-D), row slices, 1 to 3 stacked adapters of
    /// every kind, ranks 1..=64, every dtype for W and each factor, 1 to 4
    /// threads, every instruction set this CPU has: each element within the
    /// tolerance of the f64 reference, never NaN, rows outside the slice
    /// untouched.
    #[test]
    fn merge_matches_f64_reference(p in case_strategy()) {
        let case = build_case(&p);
        let expected = case.expected();
        for isa in Isa::available() {
            let got = case.run(isa, Some(p.threads)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Err(e) = case.check(&expected, &got) {
                return Err(TestCaseError::fail(format!("{isa:?}: {e}\n{}", case.describe())));
            }
        }
    }

    /// The same cases with arbitrary cache blockings (blocks of 1 to 8
    /// tiles, 1 to 5 column chunks, rank steps of 1 to 40, right factors
    /// packed on several threads from 1 element each): every boundary the
    /// default blocking only meets on large weights. The result is the
    /// reference's, and bit for bit the default blocking's.
    #[test]
    fn any_blocking_gives_the_same_result(
        p in case_strategy(),
        tiles in 1..=8usize,
        chunks in 1..=5usize,
        kc in 1..=40usize,
        pack_grain in 1..=4096usize,
    ) {
        let case = build_case(&p);
        let expected = case.expected();
        let blocking = Blocking { mc: tiles * MR, nc: chunks * NR, kc, pack_grain };
        for isa in Isa::available() {
            let fail = |e: KernelError| TestCaseError::fail(e.to_string());
            let got = case.run_blocked(isa, p.threads, blocking).map_err(fail)?;
            if let Err(e) = case.check(&expected, &got) {
                return Err(TestCaseError::fail(format!(
                    "{isa:?} {blocking:?}: {e}\n{}",
                    case.describe()
                )));
            }
            let default = case.run(isa, Some(1)).map_err(fail)?;
            prop_assert!(got == default, "{:?} {:?}: differs from the default blocking", isa, blocking);
        }
    }

    /// Arbitrary, mostly inconsistent descriptions: validation returns an
    /// error or the merge runs; nothing panics, and on error W is untouched.
    #[test]
    fn bad_descriptions_never_panic(
        shape in prop::collection::vec(0..6usize, 0..5),
        slice in prop::option::of((0..8usize, 0..8usize)),
        w_extra in -2i64..3,
        dims in prop::collection::vec(0..7usize, 8),
        len_extra in prop::collection::vec(-2i64..3, 4),
        kind in 0..3u8,
        scale in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), -3.0f32..3.0],
    ) {
        let dt = Dtype::F16;
        let mk = |rows: usize, cols: usize, extra: i64| {
            let len = (rows * cols * 2) as i64 + extra;
            vec![0x3cu8; len.max(0) as usize]
        };
        let bufs: Vec<Vec<u8>> = (0..4)
            .map(|i| mk(dims[2 * i], dims[2 * i + 1], len_extra[i]))
            .collect();
        let f = |i: usize| Factor::new(&bufs[i], dt, dims[2 * i], dims[2 * i + 1]);
        let delta = match kind {
            0 => Delta::LowRank { up: f(0), down: f(1) },
            1 => Delta::LoHa { w1a: f(0), w1b: f(1), w2a: f(2), w2b: f(3) },
            _ => Delta::LoKr {
                w1: KronFactor::LowRank { a: f(0), b: f(1) },
                w2: KronFactor::Full(f(2)),
            },
        };
        let adapters = [Adapter { scale, delta }];
        let elements: usize = if shape.is_empty() { 0 } else { shape.iter().product() };
        let w_len = ((elements * 2) as i64 + w_extra).max(0) as usize;
        let original = vec![0x11u8; w_len];
        let mut w = original.clone();
        let slice = slice.map(|(a, b)| a..b);
        match MergeSpec::new(dt, &shape, slice, &adapters) {
            Ok(spec) => {
                if merge_cpu(&mut w, &spec, None).is_err() {
                    prop_assert_eq!(&w, &original);
                }
            }
            Err(e) => {
                // Errors render without panicking.
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed cases.

/// A 65 × 64 weight, rows 0..64 targeted, with four adapters: two low-rank,
/// one LoHa, one LoKr with a low-rank w2. Square shapes so that wrong
/// kernels (transposed, swapped) still have valid shapes.
fn fixed_case(w_dtype: Dtype) -> Case {
    let mut rng = Rng(7);
    let (n, cols) = (64, 64);
    let w = random_w(&mut rng, w_dtype, (n + 1) * cols);
    let f = OwnedFactor::random;
    let adapters = vec![
        OwnedAdapter {
            scale: 0.5,
            delta: OwnedDelta::LowRank {
                up: f(&mut rng, Dtype::F16, n, 8),
                down: f(&mut rng, Dtype::BF16, 8, cols),
            },
        },
        OwnedAdapter {
            scale: -0.75,
            delta: OwnedDelta::LowRank {
                up: f(&mut rng, Dtype::F32, n, 4),
                down: f(&mut rng, Dtype::F32, 4, cols),
            },
        },
        OwnedAdapter {
            scale: 0.8,
            delta: OwnedDelta::LoHa {
                w1a: f(&mut rng, Dtype::F16, n, 4),
                w1b: f(&mut rng, Dtype::F16, 4, cols),
                w2a: f(&mut rng, Dtype::BF16, n, 4),
                w2b: f(&mut rng, Dtype::F32, 4, cols),
            },
        },
        OwnedAdapter {
            scale: 1.25,
            delta: OwnedDelta::LoKr {
                w1: OwnedKron::Full(f(&mut rng, Dtype::F16, 8, 8)),
                w2: OwnedKron::LowRank(
                    f(&mut rng, Dtype::F16, 8, 3),
                    f(&mut rng, Dtype::F16, 3, 8),
                ),
            },
        },
    ];
    Case {
        w_dtype,
        shape: vec![n + 1, cols],
        row_slice: Some(0..n),
        w,
        adapters,
    }
}

/// The check is a real one: kernels with the classic mistakes fail it, in
/// every dtype, while the real kernel passes.
#[test]
fn check_rejects_wrong_kernels() {
    for dtype in Dtype::ALL {
        let case = fixed_case(dtype);
        let expected = case.expected();
        let isa = Isa::detect();
        let good = case.run(isa, None).unwrap();
        case.check(&expected, &good)
            .unwrap_or_else(|e| panic!("the real kernel must pass: {e}"));

        let mut wrong: Vec<(&str, Case)> = Vec::new();
        // A kernel that transposes the low-rank product: (B·A)ᵀ = Aᵀ·Bᵀ.
        let mut c = case.clone();
        if let OwnedDelta::LowRank { up, down } = &mut c.adapters[0].delta {
            let (u, d) = (down.transposed(), up.transposed());
            (*up, *down) = (u, d);
        }
        wrong.push(("transposed product", c));
        // A kernel that reads one factor transposed.
        let mut c = case.clone();
        if let OwnedDelta::LowRank { up, .. } = &mut c.adapters[1].delta {
            // up is 64 x 4; view its bytes as the 64 x 4 matrix read column-major.
            let t = up.transposed();
            up.buf = t.buf;
        }
        wrong.push(("factor read transposed", c));
        // A kernel that drops the scale.
        let mut c = case.clone();
        c.adapters[0].scale = 1.0;
        wrong.push(("scale dropped", c));
        // A kernel that flips the sign of the scale.
        let mut c = case.clone();
        c.adapters[1].scale = 0.75;
        wrong.push(("scale sign", c));
        // A kernel that drops the last adapter.
        let mut c = case.clone();
        c.adapters.pop();
        wrong.push(("adapter dropped", c));
        // A LoHa kernel that pairs the wrong factors.
        let mut c = case.clone();
        if let OwnedDelta::LoHa { w1b, w2b, .. } = &mut c.adapters[2].delta {
            std::mem::swap(w1b, w2b);
        }
        wrong.push(("LoHa pairing", c));
        // A LoKr kernel that takes the Kronecker product in the wrong order.
        let mut c = case.clone();
        if let OwnedDelta::LoKr { w1, w2 } = &mut c.adapters[3].delta {
            std::mem::swap(w1, w2);
        }
        wrong.push(("LoKr order", c));
        // A kernel that writes the slice one row too low.
        let mut c = case.clone();
        c.row_slice = Some(1..65);
        wrong.push(("row slice offset", c));

        for (what, c) in wrong {
            let got = c.run(isa, None).unwrap();
            assert!(
                case.check(&expected, &got).is_err(),
                "{dtype}: a kernel with '{what}' passed the check"
            );
        }

        // A result off by two units in the last place at one element fails.
        if dtype != Dtype::F32 {
            let mut got = good.clone();
            let at = 5 * 64 + 7;
            let bits = u16::from_le_bytes([got[2 * at], got[2 * at + 1]]);
            let bumped = if bits & 0x7fff == 0 { bits } else { bits + 2 };
            got[2 * at..2 * at + 2].copy_from_slice(&bumped.to_le_bytes());
            assert!(
                case.check(&expected, &got).is_err(),
                "{dtype}: two ulps off passed"
            );
        }
    }
}

/// Rounding to f16/bf16 is to nearest, ties to even (cases chosen so the
/// f32 accumulation is exact).
#[test]
fn rounds_to_nearest_even() {
    // (W dtype, W values, delta values, expected bits)
    let h = |x: f32| f16::from_f32(x).to_bits();
    let b = |x: f32| bf16::from_f32(x).to_bits();
    let (e10, e11, e13) = (2f32.powi(-10), 2f32.powi(-11), 2f32.powi(-13));
    let (e7, e8, e10b) = (2f32.powi(-7), 2f32.powi(-8), 2f32.powi(-10));
    let cases = [
        (
            Dtype::F16,
            [1.0, 1.0, 1.0 + e10, 1.0],
            [e11, e11 + e13, e11, e11 - e13],
            [h(1.0), h(1.0) + 1, h(1.0) + 2, h(1.0)],
        ),
        (
            Dtype::BF16,
            [1.0, 1.0, 1.0 + e7, 1.0],
            [e8, e8 + e10b, e8, e8 - e10b],
            [b(1.0), b(1.0) + 1, b(1.0) + 2, b(1.0)],
        ),
    ];
    // Each pattern five times: 20 columns cover the 8-wide conversions and
    // their scalar remainder.
    const REPEAT: usize = 5;
    for (dtype, w, delta, want) in cases {
        let w_bytes = encode_values(dtype, &w.repeat(REPEAT));
        let up = encode_values(Dtype::F32, &[1.0]);
        let down = encode_values(Dtype::F32, &delta.repeat(REPEAT));
        let want = want.repeat(REPEAT);
        let cols = 4 * REPEAT;
        let adapters = [Adapter {
            scale: 1.0,
            delta: Delta::LowRank {
                up: Factor::new(&up, Dtype::F32, 1, 1),
                down: Factor::new(&down, Dtype::F32, 1, cols),
            },
        }];
        let spec = MergeSpec::new(dtype, &[1, cols], None, &adapters).unwrap();
        for isa in Isa::available() {
            let mut out = w_bytes.clone();
            merge_with(&mut out, &spec, None, isa).unwrap();
            let got: Vec<u16> = out
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            assert_eq!(got, want, "{dtype} {isa:?}");
        }
    }
}

/// The result depends neither on the thread count nor on how rows fall into
/// thread blocks; every instruction set passes the reference check.
#[test]
fn thread_count_does_not_change_result() {
    let p = CaseParams {
        w_dtype: Dtype::BF16,
        out: 301,
        conv: None,
        inn: 517,
        slice_sel: None,
        adapters: vec![
            AdapterParams {
                kind: 0,
                r1: 33,
                r2: 1,
                dtypes: [Dtype::F16, Dtype::F32, Dtype::F32, Dtype::F32],
                scale: 0.7,
                sel: 0,
            },
            AdapterParams {
                kind: 1,
                r1: 5,
                r2: 9,
                dtypes: [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::BF16],
                scale: -1.1,
                sel: 0,
            },
            AdapterParams {
                kind: 2,
                r1: 3,
                r2: 4,
                dtypes: [Dtype::F16; 4],
                scale: 0.3,
                // w1 7 x 11, both sides low-rank.
                sel: 3 | (2 << 16) | (3 << 40),
            },
        ],
        threads: 1,
        seed: 99,
    };
    let case = build_case(&p);
    let expected = case.expected();
    for isa in Isa::available() {
        let one = case.run(isa, Some(1)).unwrap();
        case.check(&expected, &one).unwrap();
        for threads in [Some(2), Some(3), Some(5), Some(64), None] {
            assert!(
                case.run(isa, threads).unwrap() == one,
                "{isa:?} {threads:?}"
            );
        }
    }
}

/// Stacked ranks past the rank step (256), rows past a block, columns past
/// a column block and not a whole number of chunks, with the default
/// blocking: within the reference's tolerance, the same on any thread
/// count, and the same again when the merge reuses its pooled buffers.
#[test]
fn large_stacked_ranks() {
    let low = |r1, up, down| AdapterParams {
        kind: 0,
        r1,
        r2: 1,
        dtypes: [up, down, Dtype::F32, Dtype::F32],
        scale: 0.3,
        sel: 0,
    };
    for w_dtype in [Dtype::F16, Dtype::F32] {
        let p = CaseParams {
            w_dtype,
            out: 230,
            conv: None,
            inn: 600,
            // Rows 7..229 of 230.
            slice_sel: Some((221 << 32) | 161),
            adapters: vec![
                low(150, Dtype::F16, Dtype::F16),
                AdapterParams {
                    kind: 1,
                    r1: 20,
                    r2: 9,
                    dtypes: [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F16],
                    scale: -0.4,
                    sel: 0,
                },
                low(130, Dtype::BF16, Dtype::F32),
            ],
            threads: 1,
            seed: 5,
        };
        let case = build_case(&p);
        assert_eq!(case.rows(), 7..229);
        let expected = case.expected();
        for isa in Isa::available() {
            let one = case.run(isa, Some(1)).unwrap();
            case.check(&expected, &one).unwrap();
            for threads in [Some(2), Some(3), None, Some(1)] {
                assert!(
                    case.run(isa, threads).unwrap() == one,
                    "{w_dtype} {isa:?} {threads:?}"
                );
            }
        }
    }
}

/// A 4-D LoCon target: 3x3 down `[rank, in, 3, 3]` and 1x1 up
/// `[out, rank, 1, 1]`, described through `Factor::from_shape`.
#[test]
fn locon_conv_from_shapes() {
    let mut rng = Rng(3);
    let (out, inn, rank) = (40, 12, 8);
    let w = random_w(&mut rng, Dtype::F16, out * inn * 9);
    let down = encode_values(
        Dtype::F16,
        &(0..rank * inn * 9).map(|_| rng.sym()).collect::<Vec<_>>(),
    );
    let up = encode_values(
        Dtype::BF16,
        &(0..out * rank).map(|_| rng.sym()).collect::<Vec<_>>(),
    );
    let adapters = [Adapter {
        scale: 0.6,
        delta: Delta::LowRank {
            up: Factor::from_shape(&up, Dtype::BF16, &[out, rank, 1, 1]).unwrap(),
            down: Factor::from_shape(&down, Dtype::F16, &[rank, inn, 3, 3]).unwrap(),
        },
    }];
    let shape = [out, inn, 3, 3];
    let spec = MergeSpec::new(Dtype::F16, &shape, None, &adapters).unwrap();
    let mut got = w.get().to_vec();
    merge_cpu(&mut got, &spec, None).unwrap();
    let expected = reference::expected(Dtype::F16, w.get(), inn * 9, 0..out, &adapters);
    reference::check(Dtype::F16, w.get(), &got, inn * 9, 0..out, &expected).unwrap();
}

#[test]
fn no_adapters_is_a_no_op() {
    let w = encode_values(Dtype::F16, &[1.5, -2.0, 3.25, 0.0]);
    let spec = MergeSpec::new(Dtype::F16, &[2, 2], None, &[]).unwrap();
    let mut out = w.clone();
    merge_cpu(&mut out, &spec, None).unwrap();
    assert_eq!(out, w);
}

/// Every kind of bad input is a typed error that names the adapter and the
/// numbers, and leaves W untouched.
#[test]
fn bad_input_is_a_typed_error() {
    fn lowrank<'a>(up: &'a [u8], down: &'a [u8], rank_up: usize, rank_down: usize) -> Delta<'a> {
        Delta::LowRank {
            up: Factor::new(up, Dtype::F16, 8, rank_up),
            down: Factor::new(down, Dtype::F16, rank_down, 6),
        }
    }
    let f16s = |n: usize| vec![0u8; 2 * n];
    let (up, down, down3) = (f16s(8 * 2), f16s(2 * 6), f16s(3 * 6));
    let (w1, w2) = (f16s(2 * 3), f16s(2 * 2));
    let (up, down, down3) = (&up[..], &down[..], &down3[..]);
    let good = Adapter {
        scale: 1.0,
        delta: lowrank(up, down, 2, 2),
    };
    let new = |shape: &[usize], slice: Option<Range<usize>>, adapters: &[Adapter<'_>]| {
        MergeSpec::new(Dtype::F16, shape, slice, adapters).map(|_| ())
    };

    assert_eq!(
        new(&[8, 6, 1], None, &[good]),
        Err(KernelError::WeightShape {
            shape: vec![8, 6, 1]
        })
    );
    assert_eq!(
        new(&[8, 0], None, &[good]),
        Err(KernelError::WeightShape { shape: vec![8, 0] })
    );
    assert_eq!(
        new(&[8, 6], Some(4..9), &[good]),
        Err(KernelError::RowSlice {
            start: 4,
            end: 9,
            rows: 8
        })
    );
    assert_eq!(
        new(&[8, 6], Some(3..3), &[good]),
        Err(KernelError::RowSlice {
            start: 3,
            end: 3,
            rows: 8
        })
    );
    let nan = Adapter {
        scale: f32::NAN,
        ..good
    };
    assert!(matches!(
        new(&[8, 6], None, &[good, nan]),
        Err(KernelError::NonFiniteScale { adapter: 1, .. })
    ));
    // Up has 8 rows but the row slice has 4.
    assert_eq!(
        new(&[8, 6], Some(0..4), &[good]),
        Err(KernelError::FactorDim {
            adapter: 0,
            factor: "up",
            dim: "rows",
            expected: 4,
            actual: 8,
            why: "the target's rows"
        })
    );
    // Down has 6 columns, a [8, 3, 1, 1] conv has 3.
    assert!(matches!(
        new(&[8, 3, 1, 1], None, &[good]),
        Err(KernelError::FactorDim {
            adapter: 0,
            factor: "down",
            dim: "cols",
            expected: 3,
            actual: 6,
            ..
        })
    ));
    // Rank mismatch between up (2) and down (3 rows, with bytes to match).
    let bad_rank = Adapter {
        scale: 1.0,
        delta: lowrank(up, down3, 2, 3),
    };
    assert_eq!(
        new(&[8, 6], None, &[good, good, bad_rank]),
        Err(KernelError::FactorDim {
            adapter: 2,
            factor: "down",
            dim: "rows",
            expected: 2,
            actual: 3,
            why: "the rank, the columns of its left partner"
        })
    );
    // Byte length that does not match the shape.
    let short = Adapter {
        scale: 1.0,
        delta: Delta::LowRank {
            up: Factor::new(&up[..up.len() - 1], Dtype::F16, 8, 2),
            down: Factor::new(down, Dtype::F16, 2, 6),
        },
    };
    assert_eq!(
        new(&[8, 6], None, &[short]),
        Err(KernelError::FactorLength {
            adapter: 0,
            factor: "up",
            rows: 8,
            cols: 2,
            dtype: Dtype::F16,
            expected: 32,
            actual: 31
        })
    );
    // Rank 0.
    let empty = Adapter {
        scale: 1.0,
        delta: Delta::LowRank {
            up: Factor::new(&[], Dtype::F16, 8, 0),
            down: Factor::new(&[], Dtype::F16, 0, 6),
        },
    };
    assert!(matches!(
        new(&[8, 6], None, &[empty]),
        Err(KernelError::EmptyFactor {
            adapter: 0,
            factor: "up",
            ..
        })
    ));
    // LoHa with a second pair of the wrong rank.
    let loha = Adapter {
        scale: 1.0,
        delta: Delta::LoHa {
            w1a: Factor::new(up, Dtype::F16, 8, 2),
            w1b: Factor::new(down, Dtype::F16, 2, 6),
            w2a: Factor::new(up, Dtype::F16, 8, 2),
            w2b: Factor::new(down3, Dtype::F16, 3, 6),
        },
    };
    assert!(matches!(
        new(&[8, 6], None, &[loha]),
        Err(KernelError::FactorDim {
            adapter: 0,
            factor: "w2b",
            dim: "rows",
            expected: 2,
            actual: 3,
            ..
        })
    ));
    // LoKr whose product is 4 x 6 for an 8 x 6 target.
    let lokr = Adapter {
        scale: 1.0,
        delta: Delta::LoKr {
            w1: KronFactor::Full(Factor::new(&w1, Dtype::F16, 2, 3)),
            w2: KronFactor::Full(Factor::new(&w2, Dtype::F16, 2, 2)),
        },
    };
    let err = new(&[8, 6], None, &[lokr]).unwrap_err();
    assert_eq!(
        err,
        KernelError::KronShape {
            adapter: 0,
            w1: [2, 3],
            w2: [2, 2],
            rows: 8,
            cols: 6
        }
    );
    assert_eq!(
        err.to_string(),
        "adapter 0: LoKr factors w1 [2, 3] and w2 [2, 2] give a 4x6 delta, but the target is 8x6"
    );
    // A weight buffer of the wrong length is refused before anything is written.
    let adapters = [good];
    let spec = MergeSpec::new(Dtype::F16, &[8, 6], None, &adapters).unwrap();
    let mut w = vec![7u8; 95];
    assert_eq!(
        merge_cpu(&mut w, &spec, None),
        Err(KernelError::WeightLength {
            shape: vec![8, 6],
            dtype: Dtype::F16,
            expected: 96,
            actual: 95
        })
    );
    assert!(w.iter().all(|&b| b == 7));
    assert!(matches!(
        Dtype::from_name("F8_E4M3"),
        Err(KernelError::UnsupportedDtype { .. })
    ));
}

// ---------------------------------------------------------------------------
// Real LoKr files.

/// The tensors of a safetensors file: name → (dtype, shape, bytes).
struct Safetensors {
    bytes: Vec<u8>,
    header: serde_json::Map<String, serde_json::Value>,
    data_start: usize,
}

impl Safetensors {
    fn open(name: &str) -> Option<Safetensors> {
        let path = format!(
            "{}/../../shared/data/lora/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).ok()?;
        let n = u64::from_le_bytes(bytes[..8].try_into().ok()?) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).ok()?;
        Some(Safetensors {
            header: header.as_object()?.clone(),
            bytes,
            data_start: 8 + n,
        })
    }

    fn tensor(&self, name: &str) -> (Dtype, Vec<usize>, &[u8]) {
        let t = &self.header[name];
        let dtype = Dtype::from_name(t["dtype"].as_str().unwrap()).unwrap();
        let shape = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let offsets = t["data_offsets"].as_array().unwrap();
        let (a, b) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        (
            dtype,
            shape,
            &self.bytes[self.data_start + a..self.data_start + b],
        )
    }

    fn factor(&self, name: &str) -> Factor<'_> {
        let (dtype, shape, data) = self.tensor(name);
        Factor::from_shape(data, dtype, &shape).unwrap()
    }

    fn scalar(&self, name: &str) -> f32 {
        let (dtype, _, data) = self.tensor(name);
        reference::decode_f64(dtype, data)[0] as f32
    }
}

/// The three LoKr files of ../shared/data/lora stacked onto one conv weight
/// (3x3 deltas stored flattened) and one linear weight, read straight from
/// the files' unaligned offsets, against the reference.
#[test]
fn real_lokr_files_match_reference() {
    let files: Vec<Safetensors> = [
        "smart_falcon_4_lokr.safetensors",
        "smart_falcon_8_lokr.safetensors",
        "smart_falcon_16_lokr.safetensors",
    ]
    .iter()
    .map(|f| {
        Safetensors::open(f).unwrap_or_else(|| {
            panic!("../shared/data/lora/{f} is missing or unreadable: see ../shared/data/README.md")
        })
    })
    .collect();
    for (module, conv) in [
        ("lora_unet_down_blocks_0_downsamplers_0_conv", true),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", false),
    ] {
        let adapters: Vec<Adapter<'_>> = files
            .iter()
            .map(|st| {
                let w1a = st.factor(&format!("{module}.lokr_w1_a"));
                let w1b = st.factor(&format!("{module}.lokr_w1_b"));
                let w2a = st.factor(&format!("{module}.lokr_w2_a"));
                let w2b = st.factor(&format!("{module}.lokr_w2_b"));
                let alpha = st.scalar(&format!("{module}.alpha"));
                Adapter {
                    scale: 0.8 * alpha / w1a.cols as f32,
                    delta: Delta::LoKr {
                        w1: KronFactor::LowRank { a: w1a, b: w1b },
                        w2: KronFactor::LowRank { a: w2a, b: w2b },
                    },
                }
            })
            .collect();
        let Delta::LoKr { w1, w2 } = adapters[0].delta else {
            unreachable!()
        };
        let (rows, cols) = (w1.shape()[0] * w2.shape()[0], w1.shape()[1] * w2.shape()[1]);
        let shape = if conv {
            assert_eq!(cols % 9, 0);
            vec![rows, cols / 9, 3, 3]
        } else {
            vec![rows, cols]
        };
        let mut rng = Rng(11);
        let values: Vec<f32> = (0..rows * cols).map(|_| 0.05 * rng.sym()).collect();
        let w = Buf::new(&encode_values(Dtype::F16, &values), 1);
        let spec = MergeSpec::new(Dtype::F16, &shape, None, &adapters).unwrap();
        let mut got = w.clone();
        merge_cpu(got.get_mut(), &spec, None).unwrap();
        let expected = reference::expected(Dtype::F16, w.get(), cols, 0..rows, &adapters);
        reference::check(Dtype::F16, w.get(), got.get(), cols, 0..rows, &expected)
            .unwrap_or_else(|e| panic!("{module}: {e}"));
        assert!(got.get() != w.get(), "{module}: the merge changed nothing");
    }
}
