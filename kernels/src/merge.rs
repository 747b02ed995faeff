//! The description of a merge that every implementation consumes.
//!
//! A merge updates a weight `W` in place:
//!
//! ```text
//! W[r0 + i, j] ← W[r0 + i, j] + Σₖ sₖ · Δₖ[i, j]      for i in 0..n, j in 0..cols
//! ```
//!
//! where `W` is viewed as a row-major matrix of `out` rows and
//! `cols = in · kh · kw` columns (2-D `[out, in]` weights have `cols = in`),
//! `r0..r0 + n` is the row slice the adapters target (the whole weight unless
//! the target is a slice of a fused weight, such as one of q, k, v in FLUX's
//! fused qkv), and each adapter `k` contributes its delta `Δₖ` (an `n × cols`
//! matrix, see [`Delta`]) times its scale `sₖ`.
//!
//! The scale is the whole factor the caller wants applied: for kohya-style
//! files that is `multiplier · alpha / rank`; the kernels never look at
//! alpha.
//!
//! Every implementation (CPU in [`crate::cpu`], CUDA in `crate::cuda`) has the
//! same semantics: each element of `W` in the slice is read once, all
//! adapters' contributions are accumulated in f32, and the sum is written
//! once, rounded to `W`'s dtype to nearest, ties to even. Elements outside
//! the row slice are neither read nor written.
//!
//! [`MergeSpec::new`] validates every shape and byte length up front and
//! returns a [`KernelError`] naming the adapter and the numbers, so a merge
//! either runs to completion or leaves `W` untouched.

use std::ops::Range;

use crate::dtype::Dtype;
use crate::error::KernelError;

/// A matrix of factor values: a row-major `rows × cols` array of `dtype`
/// elements, little-endian, at any alignment.
///
/// Factors stored with more than two dimensions (a LoCon down weight
/// `[rank, in, kh, kw]`, an up weight `[out, rank, 1, 1]`) are viewed as
/// `[shape[0], product of the rest]`; [`Factor::from_shape`] does that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factor<'a> {
    /// The raw bytes, `rows · cols · dtype.size_in_bytes()` of them.
    pub data: &'a [u8],
    /// Element type of `data`.
    pub dtype: Dtype,
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
}

impl<'a> Factor<'a> {
    /// A `rows × cols` factor over `data`. Nothing is checked here; shapes and
    /// lengths are validated by [`MergeSpec::new`].
    pub const fn new(data: &'a [u8], dtype: Dtype, rows: usize, cols: usize) -> Self {
        Factor {
            data,
            dtype,
            rows,
            cols,
        }
    }

    /// A factor from a tensor shape: `[rows]` is a column vector
    /// `rows × 1`, `[d0, d1, ...]` is `d0 × (d1 · ...)`. An empty shape
    /// (a scalar) is `1 × 1`.
    pub fn from_shape(data: &'a [u8], dtype: Dtype, shape: &[usize]) -> Result<Self, KernelError> {
        let (rows, rest) = match shape.split_first() {
            Some((&rows, rest)) => (rows, rest),
            None => (1, &[][..]),
        };
        let cols = checked_product(rest).ok_or(KernelError::Overflow {
            what: "factor shape",
        })?;
        Ok(Factor::new(data, dtype, rows, cols))
    }

    /// `rows · cols` (saturating; validated in [`MergeSpec::new`]).
    pub fn len(&self) -> usize {
        self.rows.saturating_mul(self.cols)
    }

    /// Whether the factor has no element.
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.cols == 0
    }
}

/// One side of a LoKr Kronecker product: stored whole, or as the product of
/// two low-rank factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KronFactor<'a> {
    /// The matrix itself (`lokr_w1` / `lokr_w2`).
    Full(Factor<'a>),
    /// The matrix as `a · b`, with `a` `[m, r]` and `b` `[r, n]`
    /// (`lokr_w1_a`, `lokr_w1_b` or `lokr_w2_a`, `lokr_w2_b`).
    LowRank {
        /// Left factor, `[m, r]`.
        a: Factor<'a>,
        /// Right factor, `[r, n]`.
        b: Factor<'a>,
    },
}

impl KronFactor<'_> {
    /// `[rows, cols]` of the matrix this side stands for.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            KronFactor::Full(m) => [m.rows, m.cols],
            KronFactor::LowRank { a, b } => [a.rows, b.cols],
        }
    }
}

/// The delta one adapter adds, as an `n × cols` matrix (`n` the row slice's
/// length, `cols` the weight's flattened columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta<'a> {
    /// `Δ = up · down` (kohya `lora_up · lora_down`, peft `lora_B · lora_A`,
    /// LoCon). `up` is `[n, rank]`, `down` is `[rank, cols]`. For a LoCon
    /// 3x3 conv, `down` is `[rank, in · 3 · 3]` and `up` `[out, rank]`
    /// (`[out, rank, 1, 1]` flattened); a 1x1/1x1 pair fits the same way.
    LowRank {
        /// B: `[n, rank]`.
        up: Factor<'a>,
        /// A: `[rank, cols]`.
        down: Factor<'a>,
    },
    /// LyCORIS LoHa: `Δ = (w1a · w1b) ⊙ (w2a · w2b)`, with `w1a` `[n, r1]`,
    /// `w1b` `[r1, cols]`, `w2a` `[n, r2]`, `w2b` `[r2, cols]`
    /// (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`). The Tucker
    /// form (`hada_t1`, `hada_t2`) is not handled here.
    LoHa {
        /// `[n, r1]`.
        w1a: Factor<'a>,
        /// `[r1, cols]`.
        w1b: Factor<'a>,
        /// `[n, r2]`.
        w2a: Factor<'a>,
        /// `[r2, cols]`.
        w2b: Factor<'a>,
    },
    /// LyCORIS LoKr: `Δ = kron(w1, w2)`, with `w1` `[a, b]` and `w2` `[c, d]`,
    /// `a · c = n` and `b · d = cols`, so
    /// `Δ[i, j] = w1[i / c, j / d] · w2[i % c, j % d]`.
    ///
    /// Conv weights work on the flattened columns: the LoKr files in the wild
    /// store 3x3 conv deltas already flattened (`w1` `[16, 48]` and `w2`
    /// `[20, 60]` for a `[320, 320, 3, 3]` conv), and a 4-D `w2`
    /// `[c, d, kh, kw]` is the same matrix as `[c, d · kh · kw]`
    /// ([`Factor::from_shape`]). The Tucker form (`lokr_t2`) is not handled.
    LoKr {
        /// Left side of the product, `[a, b]`.
        w1: KronFactor<'a>,
        /// Right side of the product, `[c, d]`.
        w2: KronFactor<'a>,
    },
}

/// One adapter of a merge: a delta and the scale it is applied with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adapter<'a> {
    /// The full scale, for example `multiplier · alpha / rank`. Must be
    /// finite.
    pub scale: f32,
    /// The delta.
    pub delta: Delta<'a>,
}

/// A validated merge: the weight's dtype and shape, the rows the adapters
/// target, and the adapters. Build it with [`MergeSpec::new`], then run it
/// with [`merge_cpu`](crate::merge_cpu) (or the CUDA kernel).
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    row_range: Range<usize>,
    adapters: &'a [Adapter<'a>],
}

impl<'a> MergeSpec<'a> {
    /// Validates a merge into a weight of `dtype` and `shape` (2-D
    /// `[out, in]` or 4-D `[out, in, kh, kw]`), restricted to the rows
    /// `row_slice` of the weight (`None`: all `out` rows).
    ///
    /// Checks that the shape has no zero dimension and its byte size fits in
    /// `usize`, that the row slice is non-empty and inside the weight, and for
    /// each adapter that its scale is finite, that every factor has no zero
    /// dimension and exactly the bytes its shape and dtype need, and that the
    /// factors' shapes compose to an `n × cols` delta. The first failure is
    /// returned. An empty adapter list is valid (the merge is a no-op).
    pub fn new(
        dtype: Dtype,
        shape: &[usize],
        row_slice: Option<Range<usize>>,
        adapters: &'a [Adapter<'a>],
    ) -> Result<Self, KernelError> {
        if !(shape.len() == 2 || shape.len() == 4) || shape.contains(&0) {
            return Err(KernelError::WeightShape {
                shape: shape.to_vec(),
            });
        }
        let rows = shape[0];
        let cols = checked_product(&shape[1..]).ok_or(KernelError::Overflow { what: "weight" })?;
        rows.checked_mul(cols)
            .and_then(|e| e.checked_mul(dtype.size_in_bytes()))
            .ok_or(KernelError::Overflow { what: "weight" })?;
        let row_range = row_slice.unwrap_or(0..rows);
        if row_range.start >= row_range.end || row_range.end > rows {
            return Err(KernelError::RowSlice {
                start: row_range.start,
                end: row_range.end,
                rows,
            });
        }
        let n = row_range.end - row_range.start;
        for (index, adapter) in adapters.iter().enumerate() {
            validate_adapter(index, adapter, n, cols)?;
        }
        Ok(MergeSpec {
            dtype,
            shape: shape.to_vec(),
            rows,
            cols,
            row_range,
            adapters,
        })
    }

    /// The weight's dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The weight's shape as given.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Rows of the weight (`out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the weight viewed as a matrix (`in · kh · kw`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rows of the weight the adapters change.
    pub fn row_range(&self) -> Range<usize> {
        self.row_range.clone()
    }

    /// Rows of each delta (the row slice's length).
    pub fn delta_rows(&self) -> usize {
        self.row_range.end - self.row_range.start
    }

    /// The adapters, in order.
    pub fn adapters(&self) -> &'a [Adapter<'a>] {
        self.adapters
    }

    /// Bytes of the whole weight buffer (`out · cols · element size`).
    pub fn weight_bytes(&self) -> usize {
        // Cannot overflow: checked in `new`.
        self.rows * self.cols * self.dtype.size_in_bytes()
    }

    /// Bytes of the weight the merge reads and writes (each once): the row
    /// slice's elements times the element size.
    pub fn touched_bytes(&self) -> usize {
        self.delta_rows() * self.cols * self.dtype.size_in_bytes()
    }

    /// Multiply-adds the merge performs, as the CPU implementation does them
    /// (low-rank: `n · cols · rank`; LoHa: `n · cols · (r1 + r2 + 1)`; LoKr:
    /// `n · cols` plus the rows of `w1` and `w2` it forms from low-rank
    /// factors). Saturates at `u64::MAX`.
    pub fn multiply_adds(&self) -> u64 {
        let n = self.delta_rows() as u64;
        let area = n.saturating_mul(self.cols as u64);
        self.adapters
            .iter()
            .map(|a| match &a.delta {
                Delta::LowRank { up, .. } => area.saturating_mul(up.cols as u64),
                Delta::LoHa { w1a, w2a, .. } => {
                    area.saturating_mul(w1a.cols as u64 + w2a.cols as u64 + 1)
                }
                Delta::LoKr { w1, w2 } => {
                    let side = |k: &KronFactor<'_>| match k {
                        KronFactor::Full(_) => 0u64,
                        KronFactor::LowRank { a, b } => n
                            .saturating_mul(a.cols as u64)
                            .saturating_mul(b.cols as u64),
                    };
                    area.saturating_add(side(w1)).saturating_add(side(w2))
                }
            })
            .fold(0u64, u64::saturating_add)
    }
}

fn checked_product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Checks one factor's own consistency: no zero dimension, exact byte length.
fn check_factor(adapter: usize, name: &'static str, f: &Factor<'_>) -> Result<(), KernelError> {
    if f.rows == 0 || f.cols == 0 {
        return Err(KernelError::EmptyFactor {
            adapter,
            factor: name,
            rows: f.rows,
            cols: f.cols,
        });
    }
    let expected = f
        .rows
        .checked_mul(f.cols)
        .and_then(|e| e.checked_mul(f.dtype.size_in_bytes()))
        .ok_or(KernelError::Overflow { what: "factor" })?;
    if f.data.len() != expected {
        return Err(KernelError::FactorLength {
            adapter,
            factor: name,
            rows: f.rows,
            cols: f.cols,
            dtype: f.dtype,
            expected,
            actual: f.data.len(),
        });
    }
    Ok(())
}

/// Checks that one dimension of a factor has the expected size.
fn check_dim(
    adapter: usize,
    factor: &'static str,
    dim: &'static str,
    actual: usize,
    expected: usize,
    why: &'static str,
) -> Result<(), KernelError> {
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::FactorDim {
            adapter,
            factor,
            dim,
            expected,
            actual,
            why,
        })
    }
}

/// Checks a product `a · b` of two factors that must be `[rows, cols]`.
fn check_product(
    adapter: usize,
    (a_name, a): (&'static str, &Factor<'_>),
    (b_name, b): (&'static str, &Factor<'_>),
    rows: usize,
    cols: usize,
) -> Result<(), KernelError> {
    check_factor(adapter, a_name, a)?;
    check_factor(adapter, b_name, b)?;
    check_dim(adapter, a_name, "rows", a.rows, rows, "the target's rows")?;
    check_dim(
        adapter,
        b_name,
        "cols",
        b.cols,
        cols,
        "the target's columns",
    )?;
    check_dim(
        adapter,
        b_name,
        "rows",
        b.rows,
        a.cols,
        "the rank, the columns of its left partner",
    )
}

fn check_kron_side(
    adapter: usize,
    names: [&'static str; 3],
    side: &KronFactor<'_>,
) -> Result<(), KernelError> {
    match side {
        KronFactor::Full(m) => check_factor(adapter, names[0], m),
        KronFactor::LowRank { a, b } => {
            check_factor(adapter, names[1], a)?;
            check_factor(adapter, names[2], b)?;
            check_dim(
                adapter,
                names[2],
                "rows",
                b.rows,
                a.cols,
                "the rank, the columns of its left partner",
            )
        }
    }
}

fn validate_adapter(
    index: usize,
    adapter: &Adapter<'_>,
    n: usize,
    cols: usize,
) -> Result<(), KernelError> {
    if !adapter.scale.is_finite() {
        return Err(KernelError::NonFiniteScale {
            adapter: index,
            scale: adapter.scale,
        });
    }
    match &adapter.delta {
        Delta::LowRank { up, down } => check_product(index, ("up", up), ("down", down), n, cols),
        Delta::LoHa { w1a, w1b, w2a, w2b } => {
            check_product(index, ("w1a", w1a), ("w1b", w1b), n, cols)?;
            check_product(index, ("w2a", w2a), ("w2b", w2b), n, cols)
        }
        Delta::LoKr { w1, w2 } => {
            check_kron_side(index, ["w1", "w1a", "w1b"], w1)?;
            check_kron_side(index, ["w2", "w2a", "w2b"], w2)?;
            let (s1, s2) = (w1.shape(), w2.shape());
            if s1[0].checked_mul(s2[0]) != Some(n) || s1[1].checked_mul(s2[1]) != Some(cols) {
                return Err(KernelError::KronShape {
                    adapter: index,
                    w1: s1,
                    w2: s2,
                    rows: n,
                    cols,
                });
            }
            Ok(())
        }
    }
}
