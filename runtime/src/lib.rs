//! Offload's runtime: the [`device::Device`] trait and its backends, and the
//! page [`arena`] that places weight tensors in device memory.
#![warn(missing_docs)]

pub mod arena;
pub mod device;
pub mod error;

pub use error::{Error, Result};
