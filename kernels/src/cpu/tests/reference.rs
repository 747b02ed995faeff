//! A plain f64 reference for the merge and the element-wise check against
//! it. Written from the definitions in `crate::merge`, independently of the
//! CPU kernel: no tiling, no packing, no f32, no shared helpers.

use std::ops::Range;

use half::{bf16, f16};

use crate::{Adapter, Delta, Dtype, Factor, KronFactor};

/// Decodes little-endian `dtype` bytes to f64 (exactly: every f32, f16 and
/// bf16 value is an f64 value).
pub fn decode_f64(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect(),
    }
}

/// A dense row-major f64 matrix.
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub v: Vec<f64>,
}

impl Mat {
    fn of(f: &Factor<'_>) -> Mat {
        let v = decode_f64(f.dtype, f.data);
        assert_eq!(v.len(), f.rows * f.cols, "reference: factor length");
        Mat {
            rows: f.rows,
            cols: f.cols,
            v,
        }
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.cols + j]
    }

    fn abs(&self) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            v: self.v.iter().map(|x| x.abs()).collect(),
        }
    }

    /// The textbook triple loop.
    fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "reference: inner dimensions");
        let mut v = vec![0.0; self.rows * other.cols];
        for i in 0..self.rows {
            for j in 0..other.cols {
                let mut s = 0.0;
                for k in 0..self.cols {
                    s += self.at(i, k) * other.at(k, j);
                }
                v[i * other.cols + j] = s;
            }
        }
        Mat {
            rows: self.rows,
            cols: other.cols,
            v,
        }
    }

    fn hadamard(&self, other: &Mat) -> Mat {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        Mat {
            rows: self.rows,
            cols: self.cols,
            v: self.v.iter().zip(&other.v).map(|(a, b)| a * b).collect(),
        }
    }

    /// `kron(self, other)[i, j] = self[i / c, j / d] · other[i % c, j % d]`.
    fn kron(&self, other: &Mat) -> Mat {
        let (c, d) = (other.rows, other.cols);
        let (rows, cols) = (self.rows * c, self.cols * d);
        let mut v = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                v[i * cols + j] = self.at(i / c, j / d) * other.at(i % c, j % d);
            }
        }
        Mat { rows, cols, v }
    }
}

/// One side of a LoKr product and its absolute-value counterpart
/// (`|a|·|b|` for a low-rank side).
fn kron_side(side: &KronFactor<'_>) -> (Mat, Mat) {
    match side {
        KronFactor::Full(m) => {
            let m = Mat::of(m);
            let a = m.abs();
            (m, a)
        }
        KronFactor::LowRank { a, b } => {
            let (a, b) = (Mat::of(a), Mat::of(b));
            (a.matmul(&b), a.abs().matmul(&b.abs()))
        }
    }
}

/// An adapter's delta `Δ` and the matching product of absolute values
/// (`|B|·|A|` for a low-rank delta, and likewise for LoHa and LoKr).
pub fn delta(adapter: &Adapter<'_>) -> (Mat, Mat) {
    match &adapter.delta {
        Delta::LowRank { up, down } => {
            let (b, a) = (Mat::of(up), Mat::of(down));
            (b.matmul(&a), b.abs().matmul(&a.abs()))
        }
        Delta::LoHa { w1a, w1b, w2a, w2b } => {
            let (p, q) = (Mat::of(w1a), Mat::of(w1b));
            let (r, s) = (Mat::of(w2a), Mat::of(w2b));
            let exact = p.matmul(&q).hadamard(&r.matmul(&s));
            let bound = p.abs().matmul(&q.abs()).hadamard(&r.abs().matmul(&s.abs()));
            (exact, bound)
        }
        Delta::LoKr { w1, w2 } => {
            let (m1, a1) = kron_side(w1);
            let (m2, a2) = kron_side(w2);
            (m1.kron(&m2), a1.kron(&a2))
        }
    }
}

/// The exact merged weight and the error bound's scale, element by element
/// over the whole weight (`rows × cols`): `exact = W + Σ sᵢ·Δᵢ` and
/// `bound = |W| + Σ |sᵢ|·|Δᵢ|` inside the row slice; `W` and `|W|` outside.
pub struct Expected {
    pub exact: Vec<f64>,
    pub bound: Vec<f64>,
}

pub fn expected(
    w_dtype: Dtype,
    w: &[u8],
    cols: usize,
    rows: Range<usize>,
    adapters: &[Adapter<'_>],
) -> Expected {
    let mut exact = decode_f64(w_dtype, w);
    let mut bound: Vec<f64> = exact.iter().map(|x| x.abs()).collect();
    for adapter in adapters {
        let (d, a) = delta(adapter);
        assert_eq!(
            (d.rows, d.cols),
            (rows.len(), cols),
            "reference: delta shape"
        );
        let s = f64::from(adapter.scale);
        for i in 0..d.rows {
            for j in 0..cols {
                let at = (rows.start + i) * cols + j;
                exact[at] += s * d.at(i, j);
                bound[at] += s.abs() * a.at(i, j);
            }
        }
    }
    Expected { exact, bound }
}

/// The relative tolerance of the f32 accumulation.
pub const TOL: f64 = 1e-5;

/// One unit in the last place of `dtype` at the magnitude of `x`
/// (subnormal spacing below the smallest normal). Zero for f32, whose
/// rounding error is inside `TOL`.
pub fn ulp(dtype: Dtype, x: f64) -> f64 {
    let (mantissa_bits, min_exp) = match dtype {
        Dtype::F32 => return 0.0,
        Dtype::F16 => (10, -14),
        Dtype::BF16 => (7, -126),
    };
    let exp = if x == 0.0 || !x.is_finite() {
        min_exp
    } else {
        // floor(log2 |x|) from the f64 exponent field (x is a normal f64 in
        // every test).
        let e = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
        e.max(min_exp)
    };
    2f64.powi(exp - mantissa_bits)
}

/// Checks a merged weight element by element against the reference:
///
/// - inside the row slice, never NaN, and
///   `|result − exact| ≤ TOL · bound` for f32, or
///   `|result − exact| ≤ ulp(exact) + TOL · bound` for f16/bf16 (the result
///   is within one unit in the last place of the exact value, plus the f32
///   accumulation's error);
/// - outside it, bit-identical to the original.
///
/// Returns a description of the first violation.
pub fn check(
    dtype: Dtype,
    original: &[u8],
    result: &[u8],
    cols: usize,
    rows: Range<usize>,
    expected: &Expected,
) -> Result<(), String> {
    let size = dtype.size_in_bytes();
    let got = decode_f64(dtype, result);
    for (at, (&v, (&exact, &bound))) in got
        .iter()
        .zip(expected.exact.iter().zip(&expected.bound))
        .enumerate()
    {
        let (i, j) = (at / cols, at % cols);
        if !rows.contains(&i) {
            let span = at * size..(at + 1) * size;
            if original[span.clone()] != result[span] {
                return Err(format!(
                    "[{i}, {j}] is outside the row slice {rows:?} but changed"
                ));
            }
            continue;
        }
        let allowed = ulp(dtype, exact) + TOL * bound;
        let err = (v - exact).abs();
        // NaN (in the result or the error) fails too.
        if v.is_nan() || err.is_nan() || err > allowed {
            return Err(format!(
                "[{i}, {j}] ({dtype}): got {v:e}, exact {exact:e}, error {err:e} > allowed {allowed:e} \
                 (bound {bound:e})"
            ));
        }
    }
    Ok(())
}
