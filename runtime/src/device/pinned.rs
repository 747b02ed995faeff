//! Page-locked host memory owned by a device backend.

use std::fmt;
use std::ptr::NonNull;

/// How a backend gives a pinned buffer's memory back.
pub type PinnedFree = Box<dyn FnOnce(NonNull<u8>, usize) + Send + Sync>;

/// A block of page-locked host memory that asynchronous copies can read from and write to.
///
/// Made by [`crate::device::Device::alloc_pinned`]; the memory is returned to
/// the backend when the buffer drops. The contents start zeroed on the host
/// backend and unspecified on CUDA.
pub struct PinnedBuffer {
    ptr: NonNull<u8>,
    len: usize,
    free: Option<PinnedFree>,
    write_combined: bool,
}

// SAFETY: a PinnedBuffer exclusively owns plain bytes; the free function is
// Send + Sync, and access to the bytes goes through &/&mut borrows.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared references only allow reading the bytes.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Wrap memory a backend allocated.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes, exclusively owned by
    /// the returned buffer, and stay so until `free` is called with the same
    /// pointer and length (which happens exactly once, on drop).
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize, free: PinnedFree) -> Self {
        PinnedBuffer {
            ptr,
            len,
            free: Some(free),
            write_combined: false,
        }
    }

    /// The same buffer, marked as write-combined memory (by the backend
    /// that allocated it so).
    pub fn mark_write_combined(mut self) -> Self {
        self.write_combined = true;
        self
    }

    /// True when the memory is write-combined: fast for the host to write
    /// and for copies to read, very slow for the host to read.
    pub fn write_combined(&self) -> bool {
        self.write_combined
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to the first byte, for queuing copies.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte, for queuing copies into the buffer.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The bytes. Not for write-combined buffers, whose host reads are very
    /// slow (debug builds assert it).
    pub fn as_slice(&self) -> &[u8] {
        debug_assert!(
            !self.write_combined,
            "a write-combined pinned buffer read on the host"
        );
        // SAFETY: from_raw_parts' contract: valid, exclusively owned, `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("write_combined", &self.write_combined)
            .finish()
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if let Some(free) = self.free.take() {
            free(self.ptr, self.len);
        }
    }
}
