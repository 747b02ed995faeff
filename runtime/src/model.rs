//! What the runtime knows of a model: names, dtypes, shapes and sizes, in
//! execution order, and a source it reads tensor bytes from.
//!
//! The runtime knows no file format. A loader turns a checkpoint into a
//! [`ModelDesc`] and a [`WeightSource`] (the bench does it for
//! `offload-loader` models).

use std::fmt;

/// Element type of a tensor (the safetensors set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl DType {
    /// The kernels' element type, for the types a merge or a matrix product
    /// takes (f32, f16, bf16); `None` for the others.
    pub fn kernel(self) -> Option<offload_kernels::Dtype> {
        match self {
            DType::F32 => Some(offload_kernels::Dtype::F32),
            DType::F16 => Some(offload_kernels::Dtype::F16),
            DType::BF16 => Some(offload_kernels::Dtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool | DType::F8E4M3 | DType::F8E5M2 => 1,
        }
    }

    /// The safetensors name (`"F16"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parse a safetensors dtype name.
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// Full name in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Size in bytes (`shape` product × dtype size).
    pub bytes: usize,
}

/// The finest unit that runs as one piece; its tensors are resident together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerDesc {
    /// Name (for statistics and errors).
    pub name: String,
    /// Tensors, in checkpoint order.
    pub tensors: Vec<TensorDesc>,
}

impl LayerDesc {
    /// Bytes of all tensors (unpadded).
    pub fn bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}

/// Whether a component may be moved between host and device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pin {
    /// The mode decides.
    #[default]
    Auto,
    /// Loaded at start and never offloaded (it must fit).
    AlwaysResident,
    /// Streamed layer by layer, never kept resident.
    NeverResident,
}

/// A text encoder, denoiser, VAE, ...: an ordered list of layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentDesc {
    /// Name (`unet`, `text_encoder`, ...).
    pub name: String,
    /// Layers in execution order.
    pub layers: Vec<LayerDesc>,
    /// Residency override.
    pub pin: Pin,
}

impl ComponentDesc {
    /// Bytes of all layers (unpadded).
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerDesc::bytes).sum()
    }
}

/// A model: components in the order a generation runs them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelDesc {
    /// Name (file or preset), for errors.
    pub name: String,
    /// Components.
    pub components: Vec<ComponentDesc>,
}

impl ModelDesc {
    /// Bytes of all tensors (unpadded).
    pub fn bytes(&self) -> usize {
        self.components.iter().map(ComponentDesc::bytes).sum()
    }
}

/// Where the runtime reads tensor bytes from (a checkpoint on disk, memory, ...).
///
/// Reads must be checked (positional reads, not a memory map of a file that
/// may change) and may come from several threads at once.
pub trait WeightSource: Send + Sync {
    /// Read `dst.len()` bytes of tensor `tensor` of layer `layer` of component
    /// `component`, starting `offset` bytes into the tensor.
    ///
    /// Write `dst`; do not read it back: with the staged host policy it may
    /// be write-combined memory ([`crate::residency::HostPolicy::Staged`]),
    /// where host reads are very slow.
    fn read(
        &self,
        component: usize,
        layer: usize,
        tensor: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), SourceError>;

    /// All bytes of tensor `tensor` of layer `layer` of `component` when the
    /// source holds them in memory for its whole life; `None` (the default)
    /// when they can only be [`read`](Self::read).
    ///
    /// The runtime then fills its host buffers (staging buffers, pinned
    /// layer copies) from these bytes itself, with stores that bypass the
    /// CPU caches, instead of calling `read`: that fill moved 1.5–1.7× the
    /// bytes per second of an ordinary copy into memory that is not in
    /// cache on the CI machine (docs/benchmarks.md). `read` is still
    /// required, and called where the runtime reads into memory of its own
    /// (restoring a tensor in the backup and fuse LoRA modes). A slice
    /// whose length is not the tensor's is an error naming the tensor and
    /// both lengths. As with `read`, not a memory map of a file that may
    /// change.
    fn in_memory(&self, component: usize, layer: usize, tensor: usize) -> Option<&[u8]> {
        let _ = (component, layer, tensor);
        None
    }
}

/// A failed read from a [`WeightSource`]: it names where and what.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reading {what}: {message}")]
pub struct SourceError {
    /// What was read (file and tensor).
    pub what: String,
    /// Why it failed.
    pub message: String,
}
