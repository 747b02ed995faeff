//! Owned driver handles: the primary context, streams, events, host registrations.
//!
//! Each owns one driver object and gives it back on drop. Streams and events
//! are held in `Arc`s by the device, so a call that is using one keeps it
//! alive while another thread destroys it: the handle is destroyed when the
//! last user lets go, and no call ever sees a destroyed handle.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;

use super::result;
use crate::error::Result;

/// A retained reference to a device's primary context.
///
/// Things that must outlive the device's own reference (pinned buffers, host
/// registrations) hold an `Arc` of it, so the context, and with it their
/// memory, lives until the last of them is gone.
#[derive(Debug)]
pub(super) struct Context {
    raw: sys::CUcontext,
    dev: sys::CUdevice,
}

// SAFETY: a CUcontext is a handle the driver lets any thread use (binding it
// with cuCtxSetCurrent); we never dereference it.
unsafe impl Send for Context {}
// SAFETY: as above: all use goes through thread-safe driver calls.
unsafe impl Sync for Context {}

impl Context {
    /// Retain the primary context of `dev`.
    pub(super) fn retain(dev: sys::CUdevice) -> Result<Self> {
        let raw = result::primary_ctx_retain(dev)?;
        Ok(Context { raw, dev })
    }

    /// Make the context current on the calling thread. Asks first and sets
    /// it only when another context (or none) is current, as cudarc's
    /// `bind_to_thread` does: every device call binds, and a thread that
    /// keeps calling (the engine's, the uploader) then sets it once.
    pub(super) fn bind(&self) -> Result<()> {
        if result::ctx_get_current()? == self.raw {
            return Ok(());
        }
        // SAFETY: `raw` stays live while we hold our retain of it, i.e. while `self` exists.
        unsafe { result::ctx_set_current(self.raw) }
    }

    /// The raw context.
    pub(super) fn raw(&self) -> sys::CUcontext {
        self.raw
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Context::retain`; every user of the
        // context through this reference held an Arc of it and is gone.
        let _ = unsafe { result::primary_ctx_release(self.dev) };
    }
}

/// A stream; destroyed when the last `Arc` of it drops.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) raw: sys::CUstream,
    ctx: Arc<Context>,
}

// SAFETY: CUstream handles may be used from any thread; we never dereference them.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    /// Create a non-blocking stream (no implicit synchronisation with the legacy default stream).
    pub(super) fn new(ctx: &Arc<Context>) -> Result<Self> {
        ctx.bind()?;
        let raw = result::stream_create(sys::CUstream_flags::CU_STREAM_NON_BLOCKING)?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// Create a non-blocking stream of the context's greatest priority.
    pub(super) fn high_priority(ctx: &Arc<Context>) -> Result<Self> {
        ctx.bind()?;
        let (_, greatest) = result::ctx_stream_priority_range()?;
        let raw = result::stream_create_with_priority(
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING,
            greatest,
        )?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: the stream is live and this is the last reference to it;
        // the driver finishes work still queued on it before freeing it.
        let _ = unsafe { result::stream_destroy(self.raw) };
    }
}

/// An event; destroyed when the last `Arc` of it drops.
#[derive(Debug)]
pub(super) struct Event {
    pub(super) raw: sys::CUevent,
    ctx: Arc<Context>,
}

// SAFETY: CUevent handles may be used from any thread; we never dereference them.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Create an event without timing (cheaper to record and query).
    pub(super) fn new(ctx: &Arc<Context>) -> Result<Self> {
        Self::with_flags(ctx, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
    }

    /// Create an event that records a timestamp, for `cuEventElapsedTime`.
    pub(super) fn new_timing(ctx: &Arc<Context>) -> Result<Self> {
        Self::with_flags(ctx, sys::CUevent_flags::CU_EVENT_DEFAULT)
    }

    fn with_flags(ctx: &Arc<Context>, flags: sys::CUevent_flags) -> Result<Self> {
        ctx.bind()?;
        let raw = result::event_create(flags)?;
        Ok(Event {
            raw,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: the event is live and this is the last reference to it.
        let _ = unsafe { result::event_destroy(self.raw) };
    }
}

/// An existing host buffer page-locked with `cuMemHostRegister`; unregistered on drop.
///
/// Made by [`super::CudaDevice::register_host`]. While it lives, asynchronous
/// copies from and to the buffer run at pinned-memory speed.
#[derive(Debug)]
pub struct HostRegistration {
    ptr: *mut u8,
    len: usize,
    read_only: bool,
    ctx: Arc<Context>,
}

// SAFETY: the registration holds an address it never dereferences; unregistering
// is a thread-safe driver call.
unsafe impl Send for HostRegistration {}
// SAFETY: as above; shared references only read the plain fields.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Register `ptr..ptr+len`.
    ///
    /// # Safety
    /// As [`super::CudaDevice::register_host`].
    pub(super) unsafe fn new(
        ctx: &Arc<Context>,
        ptr: *const u8,
        len: usize,
        read_only: bool,
    ) -> Result<Self> {
        ctx.bind()?;
        let mut flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
        if read_only {
            flags |= sys::CU_MEMHOSTREGISTER_READ_ONLY;
        }
        // SAFETY: the caller guarantees the range stays mapped until this
        // registration drops, which unregisters it.
        unsafe { result::mem_host_register(ptr as *mut c_void, len, flags)? };
        Ok(HostRegistration {
            ptr: ptr as *mut u8,
            len,
            read_only,
            ctx: ctx.clone(),
        })
    }

    /// First byte of the registered range.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// Length of the registered range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the range is empty (never, registrations have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the range was registered read-only (the device only reads it).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: we registered `ptr`; the contract of `register_host` makes
        // the owner keep copies that use it finished before dropping this.
        let _ = unsafe { result::mem_host_unregister(self.ptr.cast()) };
    }
}
