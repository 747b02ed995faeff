//! The page arena: device memory for weights as a pool of fixed-size pages.
//!
//! An allocation owns a virtual range and a page table. Its pages need not be
//! physically adjacent, so there is no external fragmentation and no
//! compaction: any request fits while enough free pages exist. On a device
//! that cannot map pages ([`Device::maps_pages`] false: a GPU without the
//! CUDA virtual memory API) each allocation is instead one contiguous device
//! allocation of its pages ([`Device::alloc_contiguous`]), still counted in
//! pages against the same capacity, so budgets and statistics read the
//! same; freed ones are kept by size for reuse (see [`Arena::trim`]). A layer's
//! tensors are packed (256-byte aligned, see [`pack`]) into one allocation, so
//! page-tail waste is at most one page per layer. Requests under a quarter
//! page are packed into shared pages by a slab. The arena never holds more
//! pages than its capacity, and reports its use at any moment ([`ArenaStats`]).
//!
//! The arena is generic over [`Device`], so it is also a standalone allocator
//! for device memory:
//!
//! ```
//! use std::sync::Arc;
//! use offload_runtime::arena::{Arena, ArenaConfig, Tag};
//! use offload_runtime::device::{HostConfig, HostDevice};
//!
//! # fn main() -> offload_runtime::Result<()> {
//! // 64 MiB of emulated device memory in 64 KiB pages.
//! let device = Arc::new(HostDevice::new(HostConfig {
//!     capacity: 64 << 20,
//!     page_size: 64 << 10,
//!     link_gbps: None,
//! })?);
//! let arena = Arena::new(device, ArenaConfig::default())?;
//!
//! // One layer: three tensors packed into one allocation.
//! let (layer, layout) = arena.alloc_packed(&[300_000, 1_000, 65_536], Tag(1))?;
//! arena.write(layer, layout.offsets[1], &[7u8; 1_000])?;
//! let mut back = [0u8; 1_000];
//! arena.read(layer, layout.offsets[1], &mut back)?;
//! assert_eq!(back, [7u8; 1_000]);
//!
//! // A small standalone allocation goes to the slab.
//! let small = arena.alloc(4_000, Tag(2))?;
//! let stats = arena.stats();
//! assert_eq!(stats.live_allocations, 2);
//! assert_eq!(stats.slab_pages, 1);
//!
//! arena.free(layer)?;
//! arena.free(small)?;
//! assert!(arena.free(small).is_err()); // a double free is an error, not UB
//! assert_eq!(arena.stats().pages_used, 0);
//! # Ok(())
//! # }
//! ```

mod pack;
mod pool;
mod slab;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use pack::{pack, PackedLayout, TENSOR_ALIGN};

use crate::device::{Device, DeviceExt, DevicePtr, EventId, PhysPage, StreamId};
use crate::error::{Error, Result};
use pool::{PagePool, Run};
use slab::Slab;

/// Who an allocation belongs to (a component, a model, ...), for accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tag(pub u32);

/// A handle to a live allocation of one arena. Using it after it was freed,
/// or with another arena, is an [`Error::UnknownAllocation`], never a use of
/// someone else's memory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId {
    arena: u32,
    index: u32,
    generation: u64,
}

impl AllocId {
    fn index(self) -> usize {
        self.index as usize
    }
    /// A number for logs and errors (index and generation; not unique across arenas).
    pub fn raw(self) -> u64 {
        (self.generation << 32) ^ self.index as u64
    }
}

impl fmt::Debug for AllocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AllocId({}:{}#{})",
            self.arena, self.index, self.generation
        )
    }
}

static NEXT_ARENA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Configuration of an [`Arena`].
#[derive(Clone, Debug, Default)]
pub struct ArenaConfig {
    /// Most bytes of device memory the arena may hold, rounded down to whole
    /// pages. `None`: the device's total memory.
    pub capacity: Option<usize>,
}

/// Where a run of an allocation's bytes lives physically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The physical page.
    pub page: PhysPage,
    /// First byte inside the page.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// Use of the arena by one owner tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagUsage {
    /// Live allocations.
    pub allocations: usize,
    /// Bytes requested by them.
    pub bytes: usize,
    /// Whole pages held by its page allocations.
    pub pages: usize,
    /// Bytes of slab slots held by its small allocations.
    pub slab_bytes: usize,
}

/// A snapshot of the arena's accounting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Page size in bytes.
    pub page_size: usize,
    /// Most pages the arena may hold.
    pub capacity_pages: usize,
    /// Pages mapped now: page allocations, slab pages, and freed allocations waiting for an event.
    pub pages_used: usize,
    /// `capacity_pages - pages_used`: pages any request may still get.
    pub pages_free: usize,
    /// Free pages kept from the device for reuse (part of `pages_free`): free
    /// physical pages, or, on a device that does not map pages, the pages of
    /// freed contiguous allocations kept for reuse.
    pub pages_pooled: usize,
    /// Pages of freed allocations that wait for their event before reuse (part of `pages_used`).
    pub pages_deferred: usize,
    /// Live allocations.
    pub live_allocations: usize,
    /// Bytes requested by live allocations.
    pub bytes_live: usize,
    /// Bytes past the end of page allocations up to their last page boundary.
    pub tail_waste: usize,
    /// Pages used by the slab.
    pub slab_pages: usize,
    /// Bytes of slab pages not holding requested bytes (free slots and slot rounding).
    pub slab_waste: usize,
    /// Use per owner tag.
    pub by_tag: BTreeMap<Tag, TagUsage>,
}

enum Kind {
    Pages(Run),
    Slot {
        slab_page: usize,
        slot: usize,
        class: usize,
    },
}

struct Live {
    size: usize,
    ptr: DevicePtr,
    tag: Tag,
    kind: Kind,
}

struct Entry {
    generation: u64,
    live: Option<Live>,
}

struct Inner {
    /// This arena's number, carried by its ids.
    serial: u32,
    pool: PagePool,
    slab: Slab,
    entries: Vec<Entry>,
    vacant: Vec<u32>,
    live: usize,
    bytes_live: usize,
    tail_waste: usize,
    slot_bytes_requested: usize,
    by_tag: BTreeMap<Tag, TagUsage>,
    deferred: Vec<(Live, EventId)>,
    deferred_pages: usize,
}

/// A pool of fixed-size device pages that allocations are mapped from; see the module docs.
pub struct Arena<D: Device + ?Sized = dyn Device> {
    device: Arc<D>,
    page_size: usize,
    stream: StreamId,
    inner: Mutex<Inner>,
}

impl<D: Device + ?Sized> fmt::Debug for Arena<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena")
            .field("device", &self.device)
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

impl<D: Device + ?Sized> Arena<D> {
    /// Make an arena on `device`.
    pub fn new(device: Arc<D>, config: ArenaConfig) -> Result<Self> {
        let info = device.info();
        let page_size = info.page_size;
        let bytes = config
            .capacity
            .unwrap_or(info.total_memory)
            .min(info.total_memory);
        let capacity_pages = bytes / page_size;
        if capacity_pages == 0 {
            return Err(Error::Config(format!(
                "arena capacity {bytes} bytes is less than one page of {page_size} bytes"
            )));
        }
        let stream = device.create_stream()?;
        Ok(Arena {
            page_size,
            stream,
            inner: Mutex::new(Inner {
                serial: NEXT_ARENA.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                pool: PagePool::new(capacity_pages, device.maps_pages()),
                slab: Slab::new(page_size),
                entries: Vec::new(),
                vacant: Vec::new(),
                live: 0,
                bytes_live: 0,
                tail_waste: 0,
                slot_bytes_requested: 0,
                by_tag: BTreeMap::new(),
                deferred: Vec::new(),
                deferred_pages: 0,
            }),
            device,
        })
    }

    /// The device the arena allocates from.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.lock().pool.capacity() * self.page_size
    }

    /// Pages a page allocation of `size` bytes takes.
    pub fn pages_for(&self, size: usize) -> usize {
        size.div_ceil(self.page_size)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocate `size` bytes aligned to [`TENSOR_ALIGN`].
    pub fn alloc(&self, size: usize, tag: Tag) -> Result<AllocId> {
        self.alloc_aligned(size, TENSOR_ALIGN, tag)
    }

    /// Allocate one block holding tensors of the given sizes, packed; returns the block and each tensor's offset.
    pub fn alloc_packed(&self, sizes: &[usize], tag: Tag) -> Result<(AllocId, PackedLayout)> {
        let layout = pack(sizes).ok_or(Error::NeverFits {
            requested: usize::MAX,
            pages: usize::MAX,
            capacity: self.capacity(),
        })?;
        let id = self.alloc(layout.total, tag)?;
        Ok((id, layout))
    }

    /// Allocate `size` bytes whose address is a multiple of `align` (a power of two, at most the page size).
    ///
    /// Fails with [`Error::NeverFits`] when the request exceeds the capacity,
    /// and with [`Error::OutOfMemory`] when not enough pages are free now; in
    /// both cases the arena is unchanged. When the arena has the pages but the
    /// device has not the memory, the device's error comes back
    /// ([`Error::DeviceOutOfMemory`]; [`Error::is_retryable_oom`] is true for
    /// both out-of-memory errors): nothing in use changes, and on a device
    /// that does not map pages the cached free allocations have gone back to
    /// the device first.
    pub fn alloc_aligned(&self, size: usize, align: usize, tag: Tag) -> Result<AllocId> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if !align.is_power_of_two() || align > self.page_size {
            return Err(Error::BadAlignment {
                align,
                page_size: self.page_size,
            });
        }
        let mut inner = self.lock();
        let capacity_pages = inner.pool.capacity();
        let class = inner.slab.class_for(size, align, self.page_size);
        let pages_needed = match class {
            Some(_) => 1,
            None => self.pages_for(size),
        };
        if pages_needed > capacity_pages {
            return Err(Error::NeverFits {
                requested: size,
                pages: pages_needed,
                capacity: capacity_pages * self.page_size,
            });
        }
        let live = match class {
            Some(class) => self.alloc_slot(&mut inner, size, class, tag)?,
            None => {
                self.ensure_available(&mut inner, pages_needed, size)?;
                let run = inner.pool.alloc(&*self.device, pages_needed)?;
                Live {
                    size,
                    ptr: run.base(),
                    tag,
                    kind: Kind::Pages(run),
                }
            }
        };
        Ok(inner.insert(live, self.page_size))
    }

    fn alloc_slot(&self, inner: &mut Inner, size: usize, class: usize, tag: Tag) -> Result<Live> {
        let (slab_page, slot) = match inner.slab.take_slot(class) {
            Some(s) => s,
            None => {
                self.ensure_available(inner, 1, size)?;
                let run = inner.pool.alloc(&*self.device, 1)?;
                inner.slab.add_page(class, run, self.page_size);
                inner
                    .slab
                    .take_slot(class)
                    .expect("a fresh slab page has free slots")
            }
        };
        let base = inner.slab.page(slab_page).run.base();
        Ok(Live {
            size,
            ptr: base.offset(slot * class),
            tag,
            kind: Kind::Slot {
                slab_page,
                slot,
                class,
            },
        })
    }

    /// Make `pages` pages available, reclaiming deferred frees whose events have fired; else OutOfMemory.
    fn ensure_available(&self, inner: &mut Inner, pages: usize, size: usize) -> Result<()> {
        // Deferred frees whose events fired go back first, so the pages in
        // use (and their peak) never count memory that is free.
        if !inner.deferred.is_empty() {
            self.reclaim_locked(inner)?;
        }
        let free_pages = inner.pool.available();
        if free_pages < pages {
            return Err(Error::OutOfMemory {
                requested: size,
                pages,
                free: free_pages * self.page_size,
                free_pages,
            });
        }
        Ok(())
    }

    /// Free an allocation now. Work that uses it must have completed.
    pub fn free(&self, id: AllocId) -> Result<()> {
        let mut inner = self.lock();
        let live = inner.remove(id, self.page_size)?;
        self.release_live(&mut inner, live)
    }

    /// Free an allocation once `event` has completed: the id is invalid at
    /// once, its pages are reused only after the event fires. The event must
    /// not be destroyed before then (a destroyed or failed event counts as fired),
    /// and may be recorded again only on a stream whose work follows the work it covers.
    pub fn free_after(&self, id: AllocId, event: EventId) -> Result<()> {
        let mut inner = self.lock();
        // Check the event is valid before invalidating the id.
        self.device.event_query(event)?;
        let live = inner.remove(id, self.page_size)?;
        inner.deferred_pages += live.pages_held();
        inner.deferred.push((live, event));
        Ok(())
    }

    /// Release the pages of deferred frees whose events have completed; returns how many allocations were released.
    pub fn reclaim(&self) -> Result<usize> {
        let mut inner = self.lock();
        self.reclaim_locked(&mut inner)
    }

    /// Block until every deferred free has been released, waiting at most `timeout` for each event.
    pub fn reclaim_all(&self, timeout: Option<Duration>) -> Result<()> {
        let mut inner = self.lock();
        while let Some((live, event)) = inner.deferred.pop() {
            // As in `reclaim`: an event whose work failed has fired too.
            if let Err(e @ Error::Timeout { .. }) = self.device.event_wait(event, timeout) {
                inner.deferred.push((live, event));
                return Err(e);
            }
            inner.deferred_pages -= live.pages_held();
            self.release_live(&mut inner, live)?;
        }
        Ok(())
    }

    fn reclaim_locked(&self, inner: &mut Inner) -> Result<usize> {
        let mut released = 0;
        let mut i = 0;
        while i < inner.deferred.len() {
            // An event whose work failed (or that is gone) will not fire later: release too.
            if self.device.event_query(inner.deferred[i].1).unwrap_or(true) {
                let (live, _) = inner.deferred.swap_remove(i);
                inner.deferred_pages -= live.pages_held();
                self.release_live(inner, live)?;
                released += 1;
            } else {
                i += 1;
            }
        }
        Ok(released)
    }

    fn release_live(&self, inner: &mut Inner, live: Live) -> Result<()> {
        match live.kind {
            // A page whose unmap failed may still be mapped: it never goes
            // back to the pool and stays counted as used.
            Kind::Pages(run) => inner.pool.free(&*self.device, run),
            Kind::Slot {
                slab_page, slot, ..
            } => match inner.slab.free_slot(slab_page, slot) {
                Some(page) => inner.pool.free(&*self.device, page.run),
                None => Ok(()),
            },
        }
    }

    /// Device address of an allocation's first byte.
    pub fn ptr(&self, id: AllocId) -> Result<DevicePtr> {
        Ok(self.lock().get(id)?.ptr)
    }

    /// Requested size of an allocation in bytes.
    pub fn size(&self, id: AllocId) -> Result<usize> {
        Ok(self.lock().get(id)?.size)
    }

    /// Owner tag of an allocation.
    pub fn tag(&self, id: AllocId) -> Result<Tag> {
        Ok(self.lock().get(id)?.tag)
    }

    /// Where an allocation's bytes live physically, in address order.
    ///
    /// On a device that does not map pages there are no physical pages to
    /// name (an allocation is one plain device allocation, laid out by the
    /// driver): [`Error::Unsupported`].
    pub fn page_table(&self, id: AllocId) -> Result<Vec<Extent>> {
        let inner = self.lock();
        let live = inner.get(id)?;
        let ps = self.page_size;
        let unsupported = || Error::Unsupported("page tables on a device that does not map pages");
        Ok(match &live.kind {
            Kind::Pages(run) => run
                .phys()
                .ok_or_else(unsupported)?
                .iter()
                .enumerate()
                .map(|(i, &page)| Extent {
                    page,
                    offset: 0,
                    len: (live.size - i * ps).min(ps),
                })
                .collect(),
            Kind::Slot {
                slab_page,
                slot,
                class,
            } => vec![Extent {
                page: inner
                    .slab
                    .page(*slab_page)
                    .run
                    .phys()
                    .ok_or_else(unsupported)?[0],
                offset: slot * class,
                len: live.size,
            }],
        })
    }

    fn check_access(
        &self,
        inner: &Inner,
        id: AllocId,
        offset: usize,
        len: usize,
    ) -> Result<DevicePtr> {
        let live = inner.get(id)?;
        if offset.checked_add(len).is_none_or(|end| end > live.size) {
            return Err(Error::OutOfBounds {
                id: id.raw(),
                offset,
                len,
                size: live.size,
            });
        }
        Ok(live.ptr.offset(offset))
    }

    /// Copy `data` into an allocation at `offset` and wait for the copy.
    pub fn write(&self, id: AllocId, offset: usize, data: &[u8]) -> Result<()> {
        let inner = self.lock();
        let dst = self.check_access(&inner, id, offset, data.len())?;
        // The lock is held so the allocation cannot be freed during the copy.
        self.device.write_blocking(dst, data, self.stream)
    }

    /// Copy bytes of an allocation at `offset` into `out` and wait for the copy.
    pub fn read(&self, id: AllocId, offset: usize, out: &mut [u8]) -> Result<()> {
        let inner = self.lock();
        let src = self.check_access(&inner, id, offset, out.len())?;
        self.device.read_blocking(src, out, self.stream)
    }

    /// Return pooled free pages to the device (free physical pages, or, on a
    /// device that does not map pages, the cached contiguous allocations); returns how many pages.
    pub fn trim(&self) -> usize {
        self.lock().pool.trim(&*self.device)
    }

    /// A snapshot of the accounting.
    pub fn stats(&self) -> ArenaStats {
        let inner = self.lock();
        let slab_pages = inner.slab.live_pages();
        let pages_used = inner.pool.used();
        ArenaStats {
            page_size: self.page_size,
            capacity_pages: inner.pool.capacity(),
            pages_used,
            pages_free: inner.pool.capacity() - pages_used,
            pages_pooled: inner.pool.pooled(),
            pages_deferred: inner.deferred_pages,
            live_allocations: inner.live,
            bytes_live: inner.bytes_live,
            tail_waste: inner.tail_waste,
            slab_pages,
            slab_waste: slab_pages * self.page_size - inner.slot_bytes_requested,
            by_tag: inner.by_tag.clone(),
        }
    }

    /// Most pages in use at once since the arena was made or [`Arena::reset_peak`] was called.
    pub fn peak_pages_used(&self) -> usize {
        self.lock().pool.peak_used()
    }

    /// Restart the peak measurement from the current use.
    pub fn reset_peak(&self) {
        self.lock().pool.reset_peak()
    }

    /// Pages of freed allocations still waiting for their event.
    pub fn pages_deferred(&self) -> usize {
        self.lock().deferred_pages
    }

    /// Free pages now (capacity minus pages in use), after releasing deferred
    /// frees whose events have fired.
    pub fn pages_free(&self) -> usize {
        let mut inner = self.lock();
        if !inner.deferred.is_empty() {
            let _ = self.reclaim_locked(&mut inner);
        }
        inner.pool.available()
    }

    /// Pages in use now (page allocations, slab pages, deferred frees); cheaper than [`Arena::stats`].
    pub fn pages_used(&self) -> usize {
        self.lock().pool.used()
    }

    /// Pages held from the device (used plus pooled).
    pub fn pages_held(&self) -> usize {
        self.lock().pool.held()
    }
}

impl<D: Device + ?Sized> Drop for Arena<D> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = self.device.stream_synchronize(self.stream);
        for (live, event) in std::mem::take(&mut inner.deferred) {
            // Unmapping memory a queued kernel still uses would be a device fault: wait.
            let _ = self.device.event_wait(event, None);
            if let Kind::Pages(run) = live.kind {
                let _ = inner.pool.free(&*self.device, run);
            }
        }
        for entry in std::mem::take(&mut inner.entries) {
            if let Some(Live {
                kind: Kind::Pages(run),
                ..
            }) = entry.live
            {
                let _ = inner.pool.free(&*self.device, run);
            }
        }
        for page in inner.slab.drain() {
            let _ = inner.pool.free(&*self.device, page.run);
        }
        inner.pool.trim(&*self.device);
        let _ = self.device.destroy_stream(self.stream);
    }
}

impl Live {
    fn pages_held(&self) -> usize {
        match &self.kind {
            Kind::Pages(run) => run.pages(),
            Kind::Slot { .. } => 0,
        }
    }
}

impl Inner {
    fn insert(&mut self, live: Live, page_size: usize) -> AllocId {
        let usage = self.by_tag.entry(live.tag).or_default();
        usage.allocations += 1;
        usage.bytes += live.size;
        match &live.kind {
            Kind::Pages(run) => {
                usage.pages += run.pages();
                self.tail_waste += run.pages() * page_size - live.size;
            }
            Kind::Slot { class, .. } => {
                usage.slab_bytes += class;
                self.slot_bytes_requested += live.size;
            }
        }
        self.live += 1;
        self.bytes_live += live.size;
        match self.vacant.pop() {
            Some(i) => {
                let e = &mut self.entries[i as usize];
                e.live = Some(live);
                AllocId {
                    arena: self.serial,
                    index: i,
                    generation: e.generation,
                }
            }
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    live: Some(live),
                });
                AllocId {
                    arena: self.serial,
                    index: (self.entries.len() - 1) as u32,
                    generation: 0,
                }
            }
        }
    }

    fn get(&self, id: AllocId) -> Result<&Live> {
        self.entries
            .get(id.index())
            .filter(|e| id.arena == self.serial && e.generation == id.generation)
            .and_then(|e| e.live.as_ref())
            .ok_or(Error::UnknownAllocation(id.raw()))
    }

    fn remove(&mut self, id: AllocId, page_size: usize) -> Result<Live> {
        self.get(id)?;
        let e = &mut self.entries[id.index()];
        let live = e.live.take().expect("checked live");
        e.generation += 1;
        self.vacant.push(id.index() as u32);
        self.live -= 1;
        self.bytes_live -= live.size;
        let usage = self
            .by_tag
            .get_mut(&live.tag)
            .expect("tag of a live allocation");
        usage.allocations -= 1;
        usage.bytes -= live.size;
        match &live.kind {
            Kind::Pages(run) => {
                usage.pages -= run.pages();
                self.tail_waste -= run.pages() * page_size - live.size;
            }
            Kind::Slot { class, .. } => {
                usage.slab_bytes -= class;
                self.slot_bytes_requested -= live.size;
            }
        }
        if usage.allocations == 0 {
            self.by_tag.remove(&live.tag);
        }
        Ok(live)
    }
}
