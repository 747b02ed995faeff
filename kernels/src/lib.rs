//! LoRA merge kernels for Offload.
//!
//! A merge adds the deltas of any number of stacked adapters to a weight in
//! one pass: `W ← W + Σᵢ sᵢ · Δᵢ`, accumulated in f32 and rounded once to
//! `W`'s dtype (f32, f16 or bf16). Deltas are low-rank products (kohya,
//! diffusers/peft, LoCon), LyCORIS LoHa (Hadamard product of two low-rank
//! products) or LyCORIS LoKr (Kronecker product); the target may be a 2-D
//! linear weight, a 4-D conv weight, or a row slice of a fused weight.
//!
//! - [`MergeSpec`] describes and validates a merge ([`merge`] documents the
//!   exact semantics); every implementation consumes it.
//! - [`merge_cpu`] runs it on the CPU: blocked and multi-threaded (the host
//!   backend's kernel).
//! - `cuda` (feature `cuda`) holds the CUDA C source for NVRTC and the
//!   layout of its launch parameters.
//!
//! [`matmul_xwt`] is the host backend's layer compute: `Y = X · Wᵀ` for an
//! f32 activation batch and an f32/f16/bf16 weight as stored, blocked and
//! multi-threaded ([`gemm`] documents it).
#![warn(missing_docs)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod gemm;
pub mod merge;

pub use cpu::{default_threads, merge_cpu};
pub use dtype::Dtype;
pub use error::{KernelError, Result};
pub use gemm::{matmul_flops, matmul_xwt, weight_matrix_dims};
pub use merge::{Adapter, Delta, Factor, KronFactor, MergeSpec};
