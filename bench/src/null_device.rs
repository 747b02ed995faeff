//! A bookkeeping-only device: pages and address ranges without memory.
//!
//! It lets the arena benchmark time the arena's own work (page tables, slab,
//! accounting) apart from the cost of real mappings (mmap on the host
//! backend, cuMemMap on a GPU), for a fair comparison with
//! offset-allocator, which also only manages offsets. Copies, kernels and
//! pinned memory are unsupported.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use offload_runtime::device::{
    BackendKind, Device, DeviceInfo, DevicePtr, EventId, HostFn, Kernel, MemoryInfo, PhysPage,
    PinnedBuffer, StreamId, VirtualRange,
};
use offload_runtime::{Error, Result};

#[derive(Default)]
struct State {
    free_pages: Vec<u64>,
    next_page: u64,
    next_addr: u64,
    ranges: HashMap<u64, usize>,
    mapped: HashMap<u64, u64>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct NullDevice {
    info: DeviceInfo,
    pages: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("mapped", &self.mapped.len())
            .finish()
    }
}

impl NullDevice {
    /// A device of `capacity` bytes in pages of `page_size` bytes.
    pub fn new(capacity: usize, page_size: usize) -> Self {
        NullDevice {
            info: DeviceInfo {
                kind: BackendKind::Host,
                name: "null (bookkeeping only)".into(),
                total_memory: capacity / page_size * page_size,
                page_size,
                compute_capability: None,
            },
            pages: (capacity / page_size) as u64,
            state: Mutex::new(State {
                next_addr: 1 << 40,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Device for NullDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn memory(&self) -> Result<MemoryInfo> {
        let s = self.lock();
        let used = s.next_page as usize - s.free_pages.len();
        Ok(MemoryInfo {
            total: self.info.total_memory,
            free: self.info.total_memory - used * self.info.page_size,
        })
    }
    fn alloc_page(&self) -> Result<PhysPage> {
        let mut s = self.lock();
        if let Some(p) = s.free_pages.pop() {
            return Ok(PhysPage(p));
        }
        if s.next_page == self.pages {
            return Err(Error::DeviceOutOfMemory {
                wanted: self.info.page_size,
                available: 0,
            });
        }
        s.next_page += 1;
        Ok(PhysPage(s.next_page - 1))
    }
    fn free_page(&self, page: PhysPage) -> Result<()> {
        self.lock().free_pages.push(page.0);
        Ok(())
    }
    fn reserve(&self, len: usize) -> Result<VirtualRange> {
        let mut s = self.lock();
        let base = s.next_addr;
        s.next_addr += len as u64;
        s.ranges.insert(base, len);
        Ok(VirtualRange {
            base: DevicePtr(base),
            len,
        })
    }
    fn release(&self, range: VirtualRange) -> Result<()> {
        self.lock().ranges.remove(&range.base.0);
        Ok(())
    }
    fn map(&self, addr: DevicePtr, page: PhysPage) -> Result<()> {
        self.lock().mapped.insert(addr.0, page.0);
        Ok(())
    }
    fn unmap(&self, addr: DevicePtr) -> Result<()> {
        self.lock().mapped.remove(&addr.0);
        Ok(())
    }
    fn alloc_pinned(&self, _len: usize) -> Result<PinnedBuffer> {
        Err(Error::Unsupported("pinned memory on the null device"))
    }
    fn create_stream(&self) -> Result<StreamId> {
        Ok(StreamId(1))
    }
    fn destroy_stream(&self, _stream: StreamId) -> Result<()> {
        Ok(())
    }
    fn create_event(&self) -> Result<EventId> {
        Ok(EventId(1))
    }
    fn create_timing_event(&self) -> Result<EventId> {
        Ok(EventId(1))
    }
    fn destroy_event(&self, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn record_event(&self, _event: EventId, _stream: StreamId) -> Result<()> {
        Ok(())
    }
    fn stream_wait_event(&self, _stream: StreamId, _event: EventId) -> Result<()> {
        Ok(())
    }
    fn event_query(&self, _event: EventId) -> Result<bool> {
        Ok(true)
    }
    fn event_elapsed(&self, _start: EventId, _end: EventId) -> Result<Option<Duration>> {
        // Nothing runs on this device: every event is reached at once.
        Ok(Some(Duration::ZERO))
    }
    fn event_wait(&self, _event: EventId, _timeout: Option<Duration>) -> Result<()> {
        Ok(())
    }
    fn stream_synchronize(&self, _stream: StreamId) -> Result<()> {
        Ok(())
    }
    unsafe fn copy_h2d_async(
        &self,
        _: DevicePtr,
        _: *const u8,
        _: usize,
        _: StreamId,
    ) -> Result<()> {
        Err(Error::Unsupported("copies on the null device"))
    }
    unsafe fn copy_d2h_async(&self, _: *mut u8, _: DevicePtr, _: usize, _: StreamId) -> Result<()> {
        Err(Error::Unsupported("copies on the null device"))
    }
    fn launch(&self, _kernel: &Kernel, _stream: StreamId) -> Result<()> {
        Err(Error::Unsupported("kernels on the null device"))
    }
    fn launch_host_fn(&self, _stream: StreamId, _f: HostFn) -> Result<()> {
        Err(Error::Unsupported("host functions on the null device"))
    }
}
