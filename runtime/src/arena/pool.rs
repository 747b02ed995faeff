//! The page pool: device memory held by an arena, counted in pages under a hard cap.

use std::collections::BTreeMap;

use crate::device::{Device, DevicePtr, PhysPage, VirtualRange};
use crate::error::{Error, Result};

/// The device memory of one page allocation or slab page: `pages` pages,
/// contiguous at [`Run::base`].
#[derive(Debug)]
pub(crate) enum Run {
    /// Physical pages mapped in order into a reserved range (a device that maps pages).
    Mapped {
        range: VirtualRange,
        pages: Vec<PhysPage>,
    },
    /// One plain device allocation of `pages` pages (a device that does not).
    Block { base: DevicePtr, pages: usize },
}

impl Run {
    /// The first byte.
    pub(crate) fn base(&self) -> DevicePtr {
        match self {
            Run::Mapped { range, .. } => range.base,
            Run::Block { base, .. } => *base,
        }
    }

    /// Pages it counts for.
    pub(crate) fn pages(&self) -> usize {
        match self {
            Run::Mapped { pages, .. } => pages.len(),
            Run::Block { pages, .. } => *pages,
        }
    }

    /// Its physical pages in address order, on a device that maps pages.
    pub(crate) fn phys(&self) -> Option<&[PhysPage]> {
        match self {
            Run::Mapped { pages, .. } => Some(pages),
            Run::Block { .. } => None,
        }
    }
}

/// Device memory an arena holds, counted in pages: those in use plus free
/// memory kept for reuse.
///
/// On a device that maps pages the free memory is a list of physical pages:
/// pages come from the device lazily, the first time they are needed, and go
/// back to the free list when an allocation is freed (asking a GPU driver for
/// memory is slow). On a device that does not ([`Device::maps_pages`] false)
/// every run is one contiguous device allocation, and freed ones are kept by
/// size for the next run of the same size (the runtime's ring reuses
/// same-size slots every pass); a run of a new size first gives cached ones
/// back to the device, largest first, when it would take the pool past its
/// cap, and when the device is out of memory. Either way [`PagePool::trim`]
/// returns what is kept to the device, and `held` never exceeds `capacity`.
#[derive(Debug)]
pub(crate) struct PagePool {
    /// Whether runs are mapped pages (else contiguous blocks).
    maps: bool,
    /// Free physical pages (a device that maps pages).
    free: Vec<PhysPage>,
    /// Free contiguous blocks by their size in pages (a device that does not).
    blocks: BTreeMap<usize, Vec<DevicePtr>>,
    held: usize,
    used: usize,
    capacity: usize,
    peak_used: usize,
}

impl PagePool {
    /// An empty pool of at most `capacity` pages; `maps` as the device's [`Device::maps_pages`].
    pub(crate) fn new(capacity: usize, maps: bool) -> Self {
        PagePool {
            maps,
            free: Vec::new(),
            blocks: BTreeMap::new(),
            held: 0,
            used: 0,
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
        self.used
    }

    /// Most pages in use at once since creation or the last [`PagePool::reset_peak`].
    pub(crate) fn peak_used(&self) -> usize {
        self.peak_used
    }

    /// Start a new peak measurement from the current use.
    pub(crate) fn reset_peak(&mut self) {
        self.peak_used = self.used;
    }

    /// Pages held but not in use.
    pub(crate) fn pooled(&self) -> usize {
        self.held - self.used
    }

    /// Pages that can be handed out now (pooled plus not yet taken from the device).
    pub(crate) fn available(&self) -> usize {
        self.capacity - self.used
    }

    /// A run of `n` pages (`n` at most [`PagePool::available`]), mapped or one
    /// block as the device works. On failure nothing in use changes, and no
    /// memory this call took from the device is kept; cached blocks may have
    /// gone back to the device.
    pub(crate) fn alloc(&mut self, device: &(impl Device + ?Sized), n: usize) -> Result<Run> {
        debug_assert!(n <= self.available());
        if !self.maps {
            let base = self.take_block(device, n)?;
            return Ok(Run::Block { base, pages: n });
        }
        let (pages, fresh) = self.take(device, n)?;
        match map_pages(device, &pages) {
            Ok(range) => Ok(Run::Mapped { range, pages }),
            Err(e) => {
                self.untake(device, pages, fresh);
                Err(e)
            }
        }
    }

    /// Give a run's memory back to the pool. A mapped page whose unmap
    /// failed may still be mapped: none of that run's pages goes back, and
    /// they stay counted as used.
    pub(crate) fn free(&mut self, device: &(impl Device + ?Sized), run: Run) -> Result<()> {
        match run {
            Run::Mapped { range, pages } => {
                unmap_pages(device, range)?;
                self.used -= pages.len();
                self.free.extend(pages);
                Ok(())
            }
            Run::Block { base, pages } => {
                self.used -= pages;
                self.blocks.entry(pages).or_default().push(base);
                Ok(())
            }
        }
    }

    /// Take `n` pages, allocating from the device what the free list lacks;
    /// returns them and how many (at the end) came fresh from the device.
    /// On failure nothing changes.
    fn take(
        &mut self,
        device: &(impl Device + ?Sized),
        n: usize,
    ) -> Result<(Vec<PhysPage>, usize)> {
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
        self.used += n;
        self.peak_used = self.peak_used.max(self.used);
        Ok((pages, fresh_count))
    }

    /// Undo a [`PagePool::take`] whose pages were never mapped: pooled pages
    /// go back to the free list, fresh ones back to the device.
    fn untake(&mut self, device: &(impl Device + ?Sized), mut pages: Vec<PhysPage>, fresh: usize) {
        self.used -= pages.len();
        for p in pages.split_off(pages.len() - fresh) {
            if device.free_page(p).is_ok() {
                self.held -= 1;
            } else {
                self.free.push(p);
            }
        }
        self.free.extend(pages);
    }

    /// A contiguous block of `n` pages: a cached one of that size, else a
    /// fresh one from the device.
    fn take_block(&mut self, device: &(impl Device + ?Sized), n: usize) -> Result<DevicePtr> {
        if let Some(base) = self.pop_block(n) {
            self.used += n;
            self.peak_used = self.peak_used.max(self.used);
            return Ok(base);
        }
        // Room under the cap: cached blocks of other sizes go back, largest
        // first (the fewest driver calls). `used + n <= capacity`, so giving
        // back every cached block always makes room.
        while self.held + n > self.capacity {
            if self.blocks.is_empty() {
                // Only if a caller broke `n <= available()`: refuse, never spin.
                return Err(Error::OutOfMemory {
                    requested: n * device.info().page_size,
                    pages: n,
                    free: self.available() * device.info().page_size,
                    free_pages: self.available(),
                });
            }
            self.release_largest(device)?;
        }
        let len = n * device.info().page_size;
        let base = match device.alloc_contiguous(len) {
            Ok(b) => b,
            // The device's memory may be in our cache: give it all back and retry once.
            Err(e) if e.is_retryable_oom() && !self.blocks.is_empty() => {
                while !self.blocks.is_empty() {
                    self.release_largest(device)?;
                }
                device.alloc_contiguous(len)?
            }
            Err(e) => return Err(e),
        };
        self.held += n;
        self.used += n;
        self.peak_used = self.peak_used.max(self.used);
        Ok(base)
    }

    /// A cached block of exactly `n` pages, taken out of the cache.
    fn pop_block(&mut self, n: usize) -> Option<DevicePtr> {
        let list = self.blocks.get_mut(&n)?;
        let base = list.pop();
        if list.is_empty() {
            self.blocks.remove(&n);
        }
        base
    }

    /// Give the largest cached block back to the device. If the device
    /// refuses, the block stays cached and held.
    fn release_largest(&mut self, device: &(impl Device + ?Sized)) -> Result<()> {
        let Some((&n, _)) = self.blocks.iter().next_back() else {
            return Ok(());
        };
        let base = self.pop_block(n).expect("a listed size has a block");
        match device.free_contiguous(base) {
            Ok(()) => {
                self.held -= n;
                Ok(())
            }
            Err(e) => {
                self.blocks.entry(n).or_default().push(base);
                Err(e)
            }
        }
    }

    /// Return every pooled page (free pages, cached blocks) to the device; returns how many pages.
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
        let mut kept_blocks: BTreeMap<usize, Vec<DevicePtr>> = BTreeMap::new();
        for (pages, bases) in std::mem::take(&mut self.blocks) {
            for base in bases {
                match device.free_contiguous(base) {
                    Ok(()) => n += pages,
                    Err(_) => kept_blocks.entry(pages).or_default().push(base),
                }
            }
        }
        self.blocks = kept_blocks;
        self.held -= n;
        n
    }
}

/// Reserve a virtual range for `pages` and map them in order. On failure
/// everything done is undone and the pages are untouched.
fn map_pages(device: &(impl Device + ?Sized), pages: &[PhysPage]) -> Result<VirtualRange> {
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
fn unmap_pages(device: &(impl Device + ?Sized), range: VirtualRange) -> Result<()> {
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
