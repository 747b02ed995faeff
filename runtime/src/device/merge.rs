//! The LoRA merge as a device kernel ([`Kernel::Merge`](super::Kernel::Merge)):
//! `W ← W + Σᵢ sᵢ · Δᵢ` on a weight in device memory, with every adapter's
//! factors in device memory too.
//!
//! A [`MergeOp`] is built once per target tensor when a LoRA set is applied
//! and launched after each upload of the tensor, so it holds everything but
//! the weight's address. Each factor carries its device address (what a
//! backend reads) and its host bytes (the same values, kept by the runtime;
//! they let [`MergeOp::validate`] check every shape and length with
//! [`MergeSpec::new`] before anything runs). The semantics are those of
//! [`offload_kernels::merge`].

use std::ops::Range;
use std::sync::Arc;

use offload_kernels::{Adapter, Delta, Dtype, Factor, KronFactor, MergeSpec};

use super::DevicePtr;
use crate::error::{Error, Result};

/// One factor matrix of an adapter, row-major `rows × cols`.
#[derive(Clone, Debug)]
pub struct MergeFactor {
    /// Device address of the first element.
    pub ptr: DevicePtr,
    /// The same bytes on the host.
    pub host: Arc<[u8]>,
    /// Element type.
    pub dtype: Dtype,
    /// Rows.
    pub rows: usize,
    /// Columns (trailing dimensions of the stored tensor flattened).
    pub cols: usize,
}

impl MergeFactor {
    /// Bytes of the factor.
    pub fn bytes(&self) -> usize {
        self.host.len()
    }

    fn view<'a>(&'a self, data: &mut dyn FnMut(&'a MergeFactor) -> &'a [u8]) -> Factor<'a> {
        Factor::new(data(self), self.dtype, self.rows, self.cols)
    }
}

/// One side of a LoKr product.
#[derive(Clone, Debug)]
pub enum MergeKron {
    /// The matrix itself.
    Full(MergeFactor),
    /// The matrix as `a · b`.
    LowRank {
        /// `[m, r]`.
        a: MergeFactor,
        /// `[r, n]`.
        b: MergeFactor,
    },
}

/// The delta of one adapter (see [`offload_kernels::Delta`]).
#[derive(Clone, Debug)]
pub enum MergeDelta {
    /// `up · down`.
    LowRank {
        /// `[n, rank]`.
        up: MergeFactor,
        /// `[rank, cols]`.
        down: MergeFactor,
    },
    /// `(w1a · w1b) ⊙ (w2a · w2b)`.
    LoHa {
        /// `[n, r1]`.
        w1a: MergeFactor,
        /// `[r1, cols]`.
        w1b: MergeFactor,
        /// `[n, r2]`.
        w2a: MergeFactor,
        /// `[r2, cols]`.
        w2b: MergeFactor,
    },
    /// `kron(w1, w2)`.
    LoKr {
        /// Left side.
        w1: MergeKron,
        /// Right side.
        w2: MergeKron,
    },
}

impl MergeDelta {
    /// Every factor, in a fixed order.
    pub fn factors(&self) -> Vec<&MergeFactor> {
        match self {
            MergeDelta::LowRank { up, down } => vec![up, down],
            MergeDelta::LoHa { w1a, w1b, w2a, w2b } => vec![w1a, w1b, w2a, w2b],
            MergeDelta::LoKr { w1, w2 } => {
                let mut v: Vec<&MergeFactor> = Vec::new();
                for side in [w1, w2] {
                    match side {
                        MergeKron::Full(m) => v.push(m),
                        MergeKron::LowRank { a, b } => {
                            v.push(a);
                            v.push(b);
                        }
                    }
                }
                v
            }
        }
    }

    /// Whether this is a plain low-rank (`up · down`) delta.
    pub fn is_low_rank(&self) -> bool {
        matches!(self, MergeDelta::LowRank { .. })
    }
}

/// One adapter: its full scale and its delta.
#[derive(Clone, Debug)]
pub struct MergeAdapter {
    /// Multiplier × alpha / rank (or whatever the convention says); finite.
    pub scale: f32,
    /// The delta's factors.
    pub delta: MergeDelta,
}

/// A merge into one weight, for any number of stacked adapters.
#[derive(Clone, Debug)]
pub struct MergeOp {
    /// The weight's element type.
    pub dtype: Dtype,
    /// The weight's shape (2-D or 4-D).
    pub shape: Vec<usize>,
    /// The rows the adapters change (`None`: all).
    pub rows: Option<Range<usize>>,
    /// The adapters, applied in one pass.
    pub adapters: Vec<MergeAdapter>,
}

impl MergeOp {
    /// The kernels' view of the merge with each factor's bytes taken from
    /// `data` (its host bytes, or its device memory on a backend where
    /// device memory is host memory).
    pub fn adapters_with<'a>(
        &'a self,
        data: &mut dyn FnMut(&'a MergeFactor) -> &'a [u8],
    ) -> Vec<Adapter<'a>> {
        self.adapters
            .iter()
            .map(|a| {
                let mut kron = |k: &'a MergeKron| match k {
                    MergeKron::Full(m) => KronFactor::Full(m.view(data)),
                    MergeKron::LowRank { a, b } => KronFactor::LowRank {
                        a: a.view(data),
                        b: b.view(data),
                    },
                };
                let delta = match &a.delta {
                    MergeDelta::LowRank { up, down } => Delta::LowRank {
                        up: up.view(data),
                        down: down.view(data),
                    },
                    MergeDelta::LoHa { w1a, w1b, w2a, w2b } => Delta::LoHa {
                        w1a: w1a.view(data),
                        w1b: w1b.view(data),
                        w2a: w2a.view(data),
                        w2b: w2b.view(data),
                    },
                    MergeDelta::LoKr { w1, w2 } => Delta::LoKr {
                        w1: kron(w1),
                        w2: kron(w2),
                    },
                };
                Adapter {
                    scale: a.scale,
                    delta,
                }
            })
            .collect()
    }

    /// Checks every shape, length and scale against the weight (with the
    /// factors' host bytes); the error names the adapter and the numbers.
    pub fn validate(&self) -> Result<()> {
        let adapters = self.adapters_with(&mut |f| &f.host);
        MergeSpec::new(self.dtype, &self.shape, self.rows.clone(), &adapters)
            .map(|_| ())
            .map_err(|e| Error::Kernel {
                kernel: "merge",
                message: e.to_string(),
            })
    }

    /// Bytes of the whole weight.
    pub fn weight_bytes(&self) -> usize {
        self.shape
            .iter()
            .try_fold(self.dtype.size_in_bytes(), |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Bytes of the weight the merge reads and writes (the row slice).
    pub fn touched_bytes(&self) -> usize {
        match (&self.rows, self.shape.first()) {
            (Some(r), Some(&out)) if out > 0 => {
                self.weight_bytes() / out * (r.end.saturating_sub(r.start))
            }
            _ => self.weight_bytes(),
        }
    }

    /// Every factor of every adapter.
    pub fn factors(&self) -> impl Iterator<Item = &MergeFactor> {
        self.adapters.iter().flat_map(|a| a.delta.factors())
    }

    /// How an error names entry `index` of `count` of a
    /// [`Kernel::MergeBatch`](super::Kernel::MergeBatch), merged into the
    /// weight at `w`: "op 3 of 10 (F16 [1280, 640] rows 0..320 at 0x…)".
    pub(crate) fn batch_context(&self, index: usize, count: usize, w: DevicePtr) -> String {
        let rows = match &self.rows {
            Some(r) => format!(" rows {r:?}"),
            None => String::new(),
        };
        format!(
            "op {index} of {count} ({} {:?}{rows} at {w})",
            self.dtype, self.shape
        )
    }

    /// Multiply-adds of one run (see [`MergeSpec::multiply_adds`]).
    pub fn multiply_adds(&self) -> u64 {
        let adapters = self.adapters_with(&mut |f| &f.host);
        MergeSpec::new(self.dtype, &self.shape, self.rows.clone(), &adapters)
            .map_or(0, |s| s.multiply_adds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factor(rows: usize, cols: usize) -> MergeFactor {
        MergeFactor {
            ptr: DevicePtr(0),
            host: vec![0u8; rows * cols * 2].into(),
            dtype: Dtype::F16,
            rows,
            cols,
        }
    }

    #[test]
    fn validate_names_the_mismatch() {
        let mut op = MergeOp {
            dtype: Dtype::F16,
            shape: vec![8, 6],
            rows: None,
            adapters: vec![MergeAdapter {
                scale: 0.5,
                delta: MergeDelta::LowRank {
                    up: factor(8, 2),
                    down: factor(2, 6),
                },
            }],
        };
        op.validate().unwrap();
        assert_eq!(op.weight_bytes(), 96);
        assert_eq!(op.factors().count(), 2);
        assert_eq!(op.multiply_adds(), 8 * 6 * 2);
        op.adapters[0].delta = MergeDelta::LowRank {
            up: factor(8, 2),
            down: factor(2, 5),
        };
        let e = op.validate().unwrap_err().to_string();
        assert!(
            e.contains("merge") && e.contains('5') && e.contains('6'),
            "{e}"
        );
        op.adapters[0].delta = MergeDelta::LowRank {
            up: factor(8, 2),
            down: factor(2, 6),
        };
        op.adapters[0].scale = f32::NAN;
        assert!(op.validate().is_err());
    }

    #[test]
    fn lokr_factors_in_order() {
        let d = MergeDelta::LoKr {
            w1: MergeKron::Full(factor(2, 3)),
            w2: MergeKron::LowRank {
                a: factor(4, 1),
                b: factor(1, 2),
            },
        };
        let rows: Vec<usize> = d.factors().iter().map(|f| f.rows).collect();
        assert_eq!(rows, [2, 4, 1]);
        assert!(!d.is_low_rank());
    }
}
