//! The page pool: physical pages held by an arena, under a hard page cap.

use crate::device::{Device, DevicePtr, PhysPage, VirtualRange};
use crate::error::{Error, Result};

/// Physical pages an arena holds: those in use plus a free list kept for reuse.
///
/// Pages come from the device lazily, the first time they are needed, and go
/// back to the free list when an allocation is freed (asking a GPU driver for
/// memory is slow); [`PagePool::trim`] returns the free list to the device.
/// `held` never exceeds `capacity`.
#[derive(Debug)]
pub(crate) struct PagePool {
    free: Vec<PhysPage>,
    held: usize,
    capacity: usize,
    peak_used: usize,
}

impl PagePool {
    pub(crate) fn new(capacity: usize) -> Self {
        PagePool {
            free: Vec::new(),
            held: 0,
            capacity,
            peak_used: 0,
        }
    }

    /// Pages the pool may hold in all.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Pages held (in use or pooled).
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Pages in use.
    pub(crate) fn used(&self) -> usize {
        self.held - self.free.len()
    }

    /// Most pages in use at once since creation or the last [`PagePool::reset_peak`].
    pub(crate) fn peak_used(&self) -> usize {
        self.peak_used
    }

    /// Start a new peak measurement from the current use.
    pub(crate) fn reset_peak(&mut self) {
        self.peak_used = self.used();
    }

    /// Pages held but not in use.
    pub(crate) fn pooled(&self) -> usize {
        self.free.len()
    }

    /// Pages that can be handed out now (pooled plus not yet taken from the device).
    pub(crate) fn available(&self) -> usize {
        self.capacity - self.used()
    }

    /// Take `n` pages, allocating from the device what the free list lacks;
    /// returns them and how many (at the end) came fresh from the device.
    /// On failure nothing changes.
    pub(crate) fn take(
        &mut self,
        device: &(impl Device + ?Sized),
        n: usize,
    ) -> Result<(Vec<PhysPage>, usize)> {
        debug_assert!(n <= self.available());
        let from_pool = n.min(self.free.len());
        let mut fresh = Vec::with_capacity(n - from_pool);
        while fresh.len() < n - from_pool {
            match device.alloc_page() {
                Ok(p) => fresh.push(p),
                Err(e) => {
                    // Give back what this call took from the device, keep the pool as it was.
                    for p in fresh {
                        let _ = device.free_page(p);
                    }
                    return Err(e);
                }
            }
        }
        self.held += fresh.len();
        let fresh_count = fresh.len();
        let mut pages = self.free.split_off(self.free.len() - from_pool);
        pages.extend(fresh);
        self.peak_used = self.peak_used.max(self.used());
        Ok((pages, fresh_count))
    }

    /// Undo a [`PagePool::take`] whose pages were never mapped: pooled pages
    /// go back to the free list, fresh ones back to the device.
    pub(crate) fn untake(
        &mut self,
        device: &(impl Device + ?Sized),
        mut pages: Vec<PhysPage>,
        fresh: usize,
    ) {
        for p in pages.split_off(pages.len() - fresh) {
            if device.free_page(p).is_ok() {
                self.held -= 1;
            } else {
                self.free.push(p);
            }
        }
        self.free.extend(pages);
    }

    /// Return pages to the free list.
    pub(crate) fn give(&mut self, pages: impl IntoIterator<Item = PhysPage>) {
        self.free.extend(pages);
        debug_assert!(self.free.len() <= self.held);
    }

    /// Return every pooled page to the device; returns how many.
    pub(crate) fn trim(&mut self, device: &(impl Device + ?Sized)) -> usize {
        let mut n = 0;
        let mut kept = Vec::new();
        for p in self.free.drain(..) {
            match device.free_page(p) {
                Ok(()) => n += 1,
                Err(_) => kept.push(p),
            }
        }
        self.free = kept;
        self.held -= n;
        n
    }
}

/// Reserve a virtual range for `pages` and map them in order. On failure
/// everything done is undone and the pages are untouched.
pub(crate) fn map_pages(
    device: &(impl Device + ?Sized),
    pages: &[PhysPage],
) -> Result<VirtualRange> {
    let ps = device.info().page_size;
    let range = device.reserve(pages.len() * ps)?;
    for (i, &p) in pages.iter().enumerate() {
        if let Err(e) = device.map(range.base.offset(i * ps), p) {
            for j in 0..i {
                let _ = device.unmap(range.base.offset(j * ps));
            }
            let _ = device.release(range);
            return Err(e);
        }
    }
    Ok(range)
}

/// Unmap every page of `range` and release it. Reports the first failure but
/// always tries every page.
pub(crate) fn unmap_pages(device: &(impl Device + ?Sized), range: VirtualRange) -> Result<()> {
    let ps = device.info().page_size;
    let mut first: Option<Error> = None;
    for i in 0..range.len / ps {
        if let Err(e) = device.unmap(DevicePtr(range.base.0 + (i * ps) as u64)) {
            first.get_or_insert(e);
        }
    }
    if let Err(e) = device.release(range) {
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}
