//! The crate's error type.

use crate::dtype::Dtype;

/// Everything that can go wrong when describing or running a merge or a
/// matrix product ([`matmul_xwt`](crate::matmul_xwt)).
///
/// Every variant names the numbers involved and, for adapter factors, the
/// index of the adapter in the list passed to
/// [`MergeSpec::new`](crate::MergeSpec::new) and the factor's role
/// (`"up"`, `"down"`, `"w1a"`, ...), so a caller can say which LoRA file and
/// tensor is at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A dtype name that the kernels do not handle (they handle F32, F16, BF16).
    #[error("dtype {name:?} is not supported by the merge kernels (F32, F16 and BF16 are)")]
    UnsupportedDtype {
        /// The name as given.
        name: String,
    },

    /// The weight's shape is neither 2-D `[out, in]` nor 4-D
    /// `[out, in, kh, kw]`, or has a zero dimension.
    #[error(
        "weight shape {shape:?} is not supported: expected 2-D [out, in] or 4-D [out, in, kh, kw] \
         with no zero dimension"
    )]
    WeightShape {
        /// The shape as given.
        shape: Vec<usize>,
    },

    /// The weight buffer's length does not match its shape and dtype.
    #[error("weight buffer holds {actual} bytes, but shape {shape:?} in {dtype} needs {expected}")]
    WeightLength {
        /// The weight's shape.
        shape: Vec<usize>,
        /// The weight's dtype.
        dtype: Dtype,
        /// Bytes the shape and dtype need.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },

    /// The row slice is empty or reaches past the weight's rows.
    #[error("row slice {start}..{end} is empty or outside the weight's {rows} rows")]
    RowSlice {
        /// First row of the slice.
        start: usize,
        /// One past the last row of the slice.
        end: usize,
        /// Rows of the weight (its first dimension).
        rows: usize,
    },

    /// An adapter's scale is NaN or infinite.
    #[error("adapter {adapter}: scale {scale} is not finite")]
    NonFiniteScale {
        /// Index of the adapter.
        adapter: usize,
        /// The scale as given.
        scale: f32,
    },

    /// A factor has a zero dimension (for example rank 0).
    #[error(
        "adapter {adapter}: factor {factor} is {rows}x{cols}; a zero dimension is not allowed"
    )]
    EmptyFactor {
        /// Index of the adapter.
        adapter: usize,
        /// Role of the factor (`"up"`, `"down"`, `"w1a"`, ...).
        factor: &'static str,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
    },

    /// A factor's byte length does not match its shape and dtype.
    #[error(
        "adapter {adapter}: factor {factor} ({rows}x{cols} {dtype}) needs {expected} bytes, \
         got {actual}"
    )]
    FactorLength {
        /// Index of the adapter.
        adapter: usize,
        /// Role of the factor.
        factor: &'static str,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
        /// Its dtype.
        dtype: Dtype,
        /// Bytes the shape and dtype need.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },

    /// A factor's dimension does not match the target or its partner factor.
    #[error("adapter {adapter}: factor {factor} has {actual} {dim}, expected {expected} ({why})")]
    FactorDim {
        /// Index of the adapter.
        adapter: usize,
        /// Role of the factor.
        factor: &'static str,
        /// `"rows"` or `"cols"`.
        dim: &'static str,
        /// The dimension that was expected.
        expected: usize,
        /// The dimension given.
        actual: usize,
        /// Where the expected number comes from.
        why: &'static str,
    },

    /// The Kronecker product of a LoKr adapter's factors does not have the
    /// target's shape.
    #[error(
        "adapter {adapter}: LoKr factors w1 {w1:?} and w2 {w2:?} give a {}x{} delta, \
         but the target is {rows}x{cols}",
        w1[0].saturating_mul(w2[0]),
        w1[1].saturating_mul(w2[1])
    )]
    KronShape {
        /// Index of the adapter.
        adapter: usize,
        /// `[rows, cols]` of w1 (after the low-rank product, if any).
        w1: [usize; 2],
        /// `[rows, cols]` of w2 (after the low-rank product, if any).
        w2: [usize; 2],
        /// Rows of the target (the row slice's length).
        rows: usize,
        /// Columns of the target.
        cols: usize,
    },

    /// A valid merge that this implementation does not handle (for example
    /// a LoKr delta given to the CUDA low-rank kernel).
    #[error("not supported: {what}")]
    Unsupported {
        /// What is not supported, with the numbers.
        what: String,
    },

    /// An f32 operand of a matrix product (the activations `x` or the
    /// output `y` of [`matmul_xwt`](crate::matmul_xwt)) has the wrong
    /// length.
    #[error("{what} holds {actual} f32 values, but as a {rows}x{cols} matrix it needs {expected}")]
    MatrixLength {
        /// `"activations x"` or `"output y"`.
        what: &'static str,
        /// Rows the matrix should have.
        rows: usize,
        /// Columns the matrix should have.
        cols: usize,
        /// Values the shape needs.
        expected: usize,
        /// Values given.
        actual: usize,
    },

    /// A size computation overflowed `usize`.
    #[error("size of {what} overflows usize")]
    Overflow {
        /// What was being sized.
        what: &'static str,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
