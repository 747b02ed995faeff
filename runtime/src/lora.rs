//! LoRA sets as the runtime sees them: which model tensors each adapter
//! changes, with which factors and scale, and where the factor bytes come
//! from. A file format (kohya, peft, LyCORIS) is the loader's business; the
//! runtime takes a [`LoraDesc`] and a [`LoraSource`] (`offload-bench`'s
//! `source` module builds them from the loader's resolved LoRAs).
//!
//! How a set is applied is the [`LoraMode`]; see
//! [`Runtime::set_loras`](crate::residency::Runtime::set_loras).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use crate::model::{DType, SourceError};

/// How the runtime applies LoRAs to the weights it hands out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoraMode {
    /// Merged on the device right after each upload, on the copy stream,
    /// before the layer's ready event. The host copy stays pristine, a
    /// switch re-derives only the resident tensors it changes.
    #[default]
    FuseOnUpload,
    /// Weights stay pristine; the factors are resident and handed to the
    /// engine in the acquire guard ([`LayerGuard::lora`](crate::residency::LayerGuard::lora)),
    /// which computes the low-rank path itself.
    Unfused,
    /// Fused once into the host copy (and device copies); the originals
    /// of the changed layers are kept on the host to restore. Pinned host
    /// policy only.
    Backup,
    /// Fused once into the host copy (and device copies); restored by
    /// re-reading the checkpoint. Pinned host policy only.
    Fuse,
}

impl LoraMode {
    /// Every mode, in the order the benchmark lists them.
    pub const ALL: [LoraMode; 4] = [
        LoraMode::FuseOnUpload,
        LoraMode::Backup,
        LoraMode::Fuse,
        LoraMode::Unfused,
    ];

    /// The mode's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            LoraMode::FuseOnUpload => "fuse-on-upload",
            LoraMode::Unfused => "unfused",
            LoraMode::Backup => "backup",
            LoraMode::Fuse => "fuse",
        }
    }

    /// Whether the mode changes the host copy of the weights.
    pub fn fuses_host_copy(self) -> bool {
        matches!(self, LoraMode::Backup | LoraMode::Fuse)
    }
}

impl fmt::Display for LoraMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LoraMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LoraMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                format!("unknown LoRA mode {s:?} (fuse-on-upload, unfused, backup, fuse)")
            })
    }
}

/// A factor tensor of a LoRA file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FactorDesc {
    /// Name in the file.
    pub name: String,
    /// Element type (f32, f16 or bf16).
    pub dtype: DType,
    /// Shape as stored; viewed as `[shape[0], product of the rest]`.
    pub shape: Vec<usize>,
}

impl FactorDesc {
    /// `(rows, cols)` of the matrix view, `None` if it overflows.
    pub fn matrix(&self) -> Option<(usize, usize)> {
        let (&rows, rest) = self.shape.split_first().unwrap_or((&1, &[]));
        let cols = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        Some((rows, cols))
    }

    /// Bytes of the factor, `None` if it overflows.
    pub fn bytes(&self) -> Option<usize> {
        let (r, c) = self.matrix()?;
        r.checked_mul(c)?.checked_mul(self.dtype.size())
    }
}

/// One side of a LoKr product, as factor indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKron {
    /// The matrix itself.
    Full(usize),
    /// The matrix as `a · b`.
    LowRank {
        /// `[m, r]`.
        a: usize,
        /// `[r, n]`.
        b: usize,
    },
}

/// The delta of one adapter, as indices into [`LoraDesc::factors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchDelta {
    /// `up · down`.
    LowRank {
        /// `[n, rank]` (`lora_up`, `lora_B`).
        up: usize,
        /// `[rank, cols]` (`lora_down`, `lora_A`).
        down: usize,
    },
    /// `(w1a · w1b) ⊙ (w2a · w2b)`.
    LoHa {
        /// `[n, r1]`.
        w1a: usize,
        /// `[r1, cols]`.
        w1b: usize,
        /// `[n, r2]`.
        w2a: usize,
        /// `[r2, cols]`.
        w2b: usize,
    },
    /// `kron(w1, w2)`.
    LoKr {
        /// Left side.
        w1: PatchKron,
        /// Right side.
        w2: PatchKron,
    },
}

impl PatchDelta {
    /// The factor indices, in a fixed order.
    pub fn factors(&self) -> Vec<usize> {
        let kron = |k: &PatchKron| match *k {
            PatchKron::Full(m) => vec![m],
            PatchKron::LowRank { a, b } => vec![a, b],
        };
        match *self {
            PatchDelta::LowRank { up, down } => vec![up, down],
            PatchDelta::LoHa { w1a, w1b, w2a, w2b } => vec![w1a, w1b, w2a, w2b],
            PatchDelta::LoKr { w1, w2 } => {
                let mut v = kron(&w1);
                v.extend(kron(&w2));
                v
            }
        }
    }
}

/// One adapter on one tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct Patch {
    /// The module key in the file (for errors).
    pub key: String,
    /// Component index in the model's [`ModelDesc`](crate::model::ModelDesc).
    pub component: usize,
    /// Layer index within the component.
    pub layer: usize,
    /// Tensor index within the layer.
    pub tensor: usize,
    /// Rows of the tensor the delta covers (a slice of a fused weight); `None`: all.
    pub rows: Option<Range<usize>>,
    /// The scale at multiplier 1 (`alpha / rank`, or 1).
    pub scale: f32,
    /// The factors.
    pub delta: PatchDelta,
}

/// A LoRA file resolved against one model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraDesc {
    /// A name for messages (the file's path).
    pub name: String,
    /// The factor tensors the patches use.
    pub factors: Vec<FactorDesc>,
    /// The adapters.
    pub patches: Vec<Patch>,
}

/// Where a LoRA's factor bytes come from.
pub trait LoraSource: Send + Sync {
    /// Read the whole factor `factor` (an index into [`LoraDesc::factors`])
    /// into `dst`, whose length is the factor's bytes.
    fn read(&self, factor: usize, dst: &mut [u8]) -> Result<(), SourceError>;
}

/// A LoRA and the multiplier it is applied with.
#[derive(Clone)]
pub struct LoraBinding {
    /// What it changes.
    pub desc: Arc<LoraDesc>,
    /// Its bytes.
    pub source: Arc<dyn LoraSource>,
    /// Strength; must be finite.
    pub multiplier: f32,
}

impl fmt::Debug for LoraBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraBinding")
            .field("name", &self.desc.name)
            .field("patches", &self.desc.patches.len())
            .field("multiplier", &self.multiplier)
            .finish()
    }
}

/// What a [`Runtime::set_loras`](crate::residency::Runtime::set_loras) call did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraReport {
    /// Tensors whose set of adapters (or scales) changed.
    pub tensors_changed: usize,
    /// Tensors with at least one adapter now.
    pub tensors_patched: usize,
    /// Device copies re-derived in place (re-uploaded from the host copy,
    /// merged again where patched).
    pub tensors_rederived: usize,
    /// Layers whose device copy was dropped instead (they are derived at their next upload).
    pub layers_dropped: usize,
    /// Host copies of layers changed (backup and fuse modes).
    pub host_layers_changed: usize,
    /// Bytes of the set's factors now on the device (factors of LoRAs that
    /// left the set but that an upload job still queueing may read stay on
    /// the device until a later call frees them; they are not counted here,
    /// [`RuntimeStats::lora_device_bytes`](crate::residency::RuntimeStats::lora_device_bytes) counts them).
    pub factor_bytes: usize,
    /// Pages the set's factors take (as for `factor_bytes`).
    pub factor_pages: usize,
    /// Wall time of the call.
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_round_trip() {
        for m in LoraMode::ALL {
            assert_eq!(m.name().parse::<LoraMode>(), Ok(m));
        }
        assert!("fused".parse::<LoraMode>().is_err());
        assert_eq!(LoraMode::default(), LoraMode::FuseOnUpload);
    }

    #[test]
    fn factor_sizes() {
        let f = FactorDesc {
            name: "x".into(),
            dtype: DType::F16,
            shape: vec![4, 3, 3, 3],
        };
        assert_eq!(f.matrix(), Some((4, 27)));
        assert_eq!(f.bytes(), Some(216));
        let big = FactorDesc {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![usize::MAX, 2],
        };
        assert_eq!(big.bytes(), None);
        let d = PatchDelta::LoKr {
            w1: PatchKron::Full(3),
            w2: PatchKron::LowRank { a: 1, b: 2 },
        };
        assert_eq!(d.factors(), [3, 1, 2]);
    }
}
