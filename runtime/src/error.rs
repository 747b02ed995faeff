//! The runtime's error type.

use crate::device::{DevicePtr, EventId, PhysPage, StreamId};

/// Errors raised by devices and the arena.
///
/// Arena errors separate a request that can never fit ([`Error::NeverFits`])
/// from one that does not fit now ([`Error::OutOfMemory`]: evict and retry).
///
/// Errors are `Clone` (an OS error is shared), so an upload queued by one of
/// the runtime's threads reports its own error to every caller that waits
/// for it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A request for zero bytes.
    #[error("zero-size allocation requested")]
    ZeroSize,
    /// An alignment that is not a power of two, or larger than a page.
    #[error("alignment {align} is not a power of two no larger than the page size {page_size}")]
    BadAlignment {
        /// Requested alignment in bytes.
        align: usize,
        /// The arena's page size in bytes.
        page_size: usize,
    },
    /// The request is larger than the arena's whole capacity: evicting cannot help.
    #[error("request of {requested} bytes ({pages} pages) can never fit: arena capacity is {capacity} bytes")]
    NeverFits {
        /// Requested bytes.
        requested: usize,
        /// Pages the request needs.
        pages: usize,
        /// Total capacity of the arena in bytes.
        capacity: usize,
    },
    /// Not enough free pages now: free or evict something and retry.
    #[error("out of device memory: requested {requested} bytes ({pages} pages), {free} bytes ({free_pages} pages) free")]
    OutOfMemory {
        /// Requested bytes.
        requested: usize,
        /// Pages the request needs.
        pages: usize,
        /// Free bytes in the arena.
        free: usize,
        /// Free pages in the arena.
        free_pages: usize,
    },
    /// An allocation id that is not live (never allocated, or already freed).
    #[error("allocation {0} is not live (already freed or never allocated)")]
    UnknownAllocation(u64),
    /// An access outside an allocation's bounds.
    #[error("access of {len} bytes at offset {offset} is outside allocation {id} of {size} bytes")]
    OutOfBounds {
        /// Allocation id.
        id: u64,
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the allocation.
        size: usize,
    },
    /// The device has no more physical memory, though the arena's budget allows more.
    #[error("device out of physical memory: wanted {wanted} more bytes, device has {available} bytes available")]
    DeviceOutOfMemory {
        /// Bytes asked of the device.
        wanted: usize,
        /// Bytes the device can still give.
        available: usize,
    },
    /// An address that is not inside a reserved range, or a range that is not mapped.
    #[error("device address {addr} (+{len} bytes) is not {what}")]
    BadAddress {
        /// Device address.
        addr: DevicePtr,
        /// Length of the access or mapping.
        len: usize,
        /// What the address should have been (e.g. "mapped", "reserved", "page aligned").
        what: &'static str,
    },
    /// A physical page handle that is unknown to the device or still mapped.
    #[error("physical page {page:?} {what}")]
    BadPage {
        /// The page.
        page: PhysPage,
        /// What is wrong with it.
        what: &'static str,
    },
    /// A stream handle the device does not know.
    #[error("unknown stream {0:?}")]
    UnknownStream(StreamId),
    /// An event handle the device does not know.
    #[error("unknown event {0:?}")]
    UnknownEvent(EventId),
    /// Waiting for an event took longer than the given timeout.
    #[error("timed out after {waited_ms} ms waiting for event {event:?}")]
    Timeout {
        /// The event waited for.
        event: EventId,
        /// How long the wait lasted.
        waited_ms: u64,
    },
    /// An upload job was still queueing its copies after `waited_ms`, so
    /// the copy stream could not be synchronised (the job, stuck in a
    /// driver call or held back, still owns what it reads and writes).
    #[error("an upload job was still queueing its copies after {waited_ms} ms; the copy stream was not synchronised")]
    UploadsStuck {
        /// How long the synchronisation waited for the job.
        waited_ms: u64,
    },
    /// Work queued on a stream failed; the stream reports it once, at the next synchronisation.
    #[error("stream {stream:?} failed: {message}")]
    StreamFailed {
        /// The stream.
        stream: StreamId,
        /// What failed.
        message: String,
    },
    /// The device memory given to weights cannot hold even the largest layer.
    #[error("budget of {budget} bytes is below the largest layer ({largest_layer} bytes): raise the high watermark or device memory")]
    BudgetTooSmall {
        /// Budget in bytes (page-rounded).
        budget: usize,
        /// Largest layer in bytes (page-rounded).
        largest_layer: usize,
    },
    /// A model (or component) does not fit in the device memory its mode needs it in.
    #[error("{what} needs {needed} bytes of device memory but {mode} mode has {available} bytes")]
    DoesNotFit {
        /// What does not fit (model or component name).
        what: String,
        /// Bytes needed (page-rounded).
        needed: usize,
        /// Bytes available.
        available: usize,
        /// The mode.
        mode: String,
    },
    /// A host memory limit would be exceeded.
    #[error("{what} needs {needed} bytes of host memory, the limit is {limit}")]
    HostMemory {
        /// What needs it.
        what: String,
        /// Bytes needed.
        needed: usize,
        /// The limit.
        limit: usize,
    },
    /// A layer id that names no layer of a loaded model.
    #[error("no layer {layer} in component {component} of model {model} ({why})")]
    UnknownLayer {
        /// Model id.
        model: u32,
        /// Component index.
        component: usize,
        /// Layer index.
        layer: usize,
        /// Why (unloaded, out of range).
        why: String,
    },
    /// Every place a component could load a layer into holds a layer in use.
    #[error("component {component}: {in_use} layers in use fill its ring or budget: release a guard before acquiring more")]
    AllInUse {
        /// Component name.
        component: String,
        /// Layers in use.
        in_use: usize,
    },
    /// Reading weights from their source failed.
    #[error(transparent)]
    Source(#[from] crate::model::SourceError),
    /// An invalid configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An operating-system call failed (host backend).
    #[error("{call} failed: {source}")]
    Os {
        /// The call that failed.
        call: &'static str,
        /// The OS error.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call {call} failed with code {code} ({name})")]
    Cuda {
        /// The driver function.
        call: &'static str,
        /// The raw `CUresult` code.
        code: i32,
        /// The symbolic name of the code.
        name: String,
    },
    /// A kernel failed to run (bad arguments or a backend failure).
    #[error("kernel {kernel} failed: {message}")]
    Kernel {
        /// Kernel name.
        kernel: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The operation is not supported by this device backend.
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    /// A LoRA cannot be applied as given: a multiplier that is not finite,
    /// an adapter that does not fit its target, a mode the runtime's host
    /// policy cannot serve. Nothing was changed.
    #[error("LoRA {lora}: {message}")]
    Lora {
        /// The LoRA's name (its file).
        lora: String,
        /// What is wrong, with the module key, tensor and numbers.
        message: String,
    },
}

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when evicting resident data and retrying could make the request succeed.
    pub fn is_retryable_oom(&self) -> bool {
        matches!(
            self,
            Error::OutOfMemory { .. } | Error::DeviceOutOfMemory { .. }
        )
    }

    pub(crate) fn os(call: &'static str, err: impl Into<std::io::Error>) -> Self {
        Error::Os {
            call,
            source: std::sync::Arc::new(err.into()),
        }
    }
}
