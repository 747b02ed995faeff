//! Model file reading for Offload: safetensors checkpoints with strict
//! validation and checked reads ([`safetensors`]), model layouts
//! (components, layers, tensors) built from tensor names ([`layout`]), and
//! LoRA files in every common convention, resolved against a model layout
//! ([`lora`]), and a writer of synthetic checkpoints for tests and
//! benchmarks ([`synth`]).
//!
//! The crate knows nothing about devices: it describes where each tensor's
//! bytes are and reads them into buffers the caller provides.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod dtype;
pub mod error;
pub mod layout;
pub mod lora;
pub mod safetensors;
pub mod synth;

pub use dtype::Dtype;
pub use error::{LoaderError, Result};
pub use layout::{Component, ComponentKind, Layer, Model, ModelLayout, TensorRef};
pub use lora::{Adapter, Delta, LoraFile, LoraProblem, ResolveOptions, ResolvedLora, TargetIndex};
pub use safetensors::{Checkpoint, SafetensorsFile, TensorInfo};
