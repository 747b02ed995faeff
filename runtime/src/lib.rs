//! Offload's runtime: the [`device::Device`] trait and its backends, the
//! page [`arena`] that places weight tensors in device memory, and the
//! [`residency`] engine that keeps the right layers resident and streams the rest.
#![warn(missing_docs)]

pub mod arena;
pub mod device;
pub mod error;
pub mod host_copy;
pub mod lora;
pub mod model;
pub mod residency;

pub use error::{Error, Result};
