//! Bookkeeping of a `CudaDevice`'s physical pages and virtual ranges.
//!
//! Pure state, no driver calls: the device checks a request here, makes the
//! driver calls, and then records the outcome. The checks mirror the host
//! backend's, with the same error variants, so the layers above the trait see
//! the same behaviour on both backends and a bad handle or address becomes an
//! error instead of a driver fault.
//!
//! Two modes:
//! - VMM (the virtual memory management API works): a page is a `cuMemCreate`
//!   handle, ranges come from `cuMemAddressReserve`, pages are mapped into them.
//! - Fallback (it does not, e.g. under a sandboxing kernel): there are no
//!   pages and no ranges.
//!
//! In both modes contiguous allocations (`cuMemAlloc`, page aligned) are
//! kept by their address; in fallback mode they are the only device memory.

use std::collections::BTreeMap;

use crate::device::{DevicePtr, PhysPage, VirtualRange};
use crate::error::{Error, Result};

/// State of one allocated page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PageState {
    /// Allocated, mapped nowhere.
    Allocated,
    /// Mapped at this device address (VMM mode only).
    Mapped(u64),
}

/// One reserved virtual range.
#[derive(Debug)]
pub(super) struct Range {
    /// Length in bytes.
    pub(super) len: usize,
    /// The page handle mapped at each page slot.
    pub(super) slots: Vec<Option<u64>>,
}

/// A contiguous allocation from `cuMemAlloc`.
#[derive(Debug)]
pub(super) struct Block {
    /// The address `cuMemAlloc` returned (what `cuMemFree` takes); at or
    /// below the page-aligned address the block is known by.
    pub(super) raw: u64,
    /// Usable bytes from the aligned address.
    pub(super) len: usize,
}

/// Pages and ranges of one device.
#[derive(Debug)]
pub(super) struct MemState {
    page_size: usize,
    vmm: bool,
    /// Allocated pages by handle (VMM mode only).
    pub(super) pages: BTreeMap<u64, PageState>,
    /// Reserved ranges by base address (VMM mode only).
    pub(super) ranges: BTreeMap<u64, Range>,
    /// Contiguous allocations by their page-aligned address.
    pub(super) blocks: BTreeMap<u64, Block>,
}

impl MemState {
    /// Empty state for pages of `page_size` bytes, in VMM mode or not.
    pub(super) fn new(page_size: usize, vmm: bool) -> Self {
        MemState {
            page_size,
            vmm,
            pages: BTreeMap::new(),
            ranges: BTreeMap::new(),
            blocks: BTreeMap::new(),
        }
    }

    /// Check a request for a contiguous allocation of `len` bytes.
    pub(super) fn check_contiguous(&self, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len % self.page_size != 0 {
            return Err(Error::BadAddress {
                addr: DevicePtr(0),
                len,
                what: "a non-zero multiple of the page size",
            });
        }
        Ok(())
    }

    /// Record a contiguous allocation of `len` bytes at the page-aligned
    /// `base`, from the `cuMemAlloc` address `raw`.
    pub(super) fn add_block(&mut self, base: u64, raw: u64, len: usize) {
        self.blocks.insert(base, Block { raw, len });
    }

    /// The `cuMemAlloc` address of the contiguous allocation at `ptr`, if
    /// `ptr` is one's address.
    pub(super) fn check_free_block(&self, ptr: DevicePtr) -> Result<u64> {
        match self.blocks.get(&ptr.0) {
            Some(b) => Ok(b.raw),
            None => Err(Error::BadAddress {
                addr: ptr,
                len: 0,
                what: "the address of a live contiguous allocation",
            }),
        }
    }

    /// Forget a contiguous allocation that [`check_free_block`](Self::check_free_block) accepted.
    pub(super) fn remove_block(&mut self, ptr: DevicePtr) {
        self.blocks.remove(&ptr.0);
    }

    /// Record a fresh page.
    pub(super) fn add_page(&mut self, page: u64) {
        self.pages.insert(page, PageState::Allocated);
    }

    /// Check that `page` may be freed: allocated and mapped nowhere.
    pub(super) fn check_free(&self, page: PhysPage) -> Result<()> {
        match self.pages.get(&page.0) {
            Some(PageState::Allocated) => Ok(()),
            Some(PageState::Mapped(_)) => Err(Error::BadPage {
                page,
                what: "is still mapped",
            }),
            None => Err(Error::BadPage {
                page,
                what: "is not allocated",
            }),
        }
    }

    /// Forget a page that [`check_free`](Self::check_free) accepted.
    pub(super) fn remove_page(&mut self, page: PhysPage) {
        self.pages.remove(&page.0);
    }

    /// Check a request to reserve `len` bytes.
    pub(super) fn check_reserve(&self, len: usize) -> Result<()> {
        if !self.vmm {
            return Err(Error::Unsupported(
                "reserving virtual ranges without the CUDA virtual memory API (fallback mode)",
            ));
        }
        if len == 0 || len % self.page_size != 0 {
            return Err(Error::BadAddress {
                addr: DevicePtr(0),
                len,
                what: "a non-zero multiple of the page size",
            });
        }
        Ok(())
    }

    /// Record a reserved range.
    pub(super) fn add_range(&mut self, base: u64, len: usize) {
        self.ranges.insert(
            base,
            Range {
                len,
                slots: vec![None; len / self.page_size],
            },
        );
    }

    /// Check that `range` may be released: reserved exactly so and fully unmapped.
    pub(super) fn check_release(&self, range: VirtualRange) -> Result<()> {
        match self.ranges.get(&range.base.0) {
            Some(r) if r.len == range.len => {
                if r.slots.iter().any(Option::is_some) {
                    Err(Error::BadAddress {
                        addr: range.base,
                        len: range.len,
                        what: "fully unmapped before release",
                    })
                } else {
                    Ok(())
                }
            }
            _ => Err(Error::BadAddress {
                addr: range.base,
                len: range.len,
                what: "a reserved range",
            }),
        }
    }

    /// Forget a range that [`check_release`](Self::check_release) accepted.
    pub(super) fn remove_range(&mut self, range: VirtualRange) {
        self.ranges.remove(&range.base.0);
    }

    /// The range containing `addr`, as (base, slot index, whether `addr` is page aligned).
    fn locate(&self, addr: u64) -> Option<(u64, usize, bool)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        if addr >= base + range.len as u64 {
            return None;
        }
        let off = (addr - base) as usize;
        Some((base, off / self.page_size, off % self.page_size == 0))
    }

    /// Check that `page` may be mapped at `addr`; returns the range base and slot.
    pub(super) fn check_map(&self, addr: DevicePtr, page: PhysPage) -> Result<(u64, usize)> {
        let bad = |what| Error::BadAddress {
            addr,
            len: self.page_size,
            what,
        };
        if !self.vmm {
            return Err(Error::Unsupported(
                "mapping pages without the CUDA virtual memory API (fallback mode)",
            ));
        }
        let Some((base, slot, aligned)) = self.locate(addr.0) else {
            return Err(bad("inside a reserved range"));
        };
        if !aligned {
            return Err(bad("page aligned"));
        }
        if self.ranges[&base].slots[slot].is_some() {
            return Err(bad("unmapped (already mapped)"));
        }
        match self.pages.get(&page.0) {
            Some(PageState::Allocated) => Ok((base, slot)),
            Some(PageState::Mapped(_)) => Err(Error::BadPage {
                page,
                what: "is already mapped elsewhere",
            }),
            None => Err(Error::BadPage {
                page,
                what: "is not allocated",
            }),
        }
    }

    /// Record a mapping that [`check_map`](Self::check_map) accepted and the driver made.
    pub(super) fn set_mapped(&mut self, base: u64, slot: usize, addr: DevicePtr, page: PhysPage) {
        if let Some(r) = self.ranges.get_mut(&base) {
            r.slots[slot] = Some(page.0);
        }
        self.pages.insert(page.0, PageState::Mapped(addr.0));
    }

    /// Check that `addr` is a mapped page address; returns the range base, slot and page.
    pub(super) fn check_unmap(&self, addr: DevicePtr) -> Result<(u64, usize, PhysPage)> {
        let bad = |what| Error::BadAddress {
            addr,
            len: self.page_size,
            what,
        };
        let Some((base, slot, aligned)) = self.locate(addr.0) else {
            return Err(bad("inside a reserved range"));
        };
        if !aligned {
            return Err(bad("a page-aligned address of a reserved range"));
        }
        match self.ranges[&base].slots[slot] {
            Some(h) => Ok((base, slot, PhysPage(h))),
            None => Err(bad("mapped")),
        }
    }

    /// Record an unmapping that [`check_unmap`](Self::check_unmap) accepted and the driver made.
    pub(super) fn set_unmapped(&mut self, base: u64, slot: usize, page: PhysPage) {
        if let Some(r) = self.ranges.get_mut(&base) {
            r.slots[slot] = None;
        }
        if let Some(s) = self.pages.get_mut(&page.0) {
            *s = PageState::Allocated;
        }
    }

    /// Check that `addr..addr+len` is device memory a copy or kernel may touch
    /// now: inside one contiguous allocation, or inside one reserved range
    /// with every page it covers mapped.
    pub(super) fn check_access(&self, addr: DevicePtr, len: usize) -> Result<()> {
        let bad = || Error::BadAddress {
            addr,
            len,
            what: if self.vmm {
                "inside one contiguous allocation, or one reserved range with every page mapped"
            } else {
                "inside one contiguous allocation (fallback mode)"
            },
        };
        let end = addr.0.checked_add(len as u64).ok_or_else(bad)?;
        if let Some((&base, block)) = self.blocks.range(..=addr.0).next_back() {
            if end <= base + block.len as u64 {
                return Ok(());
            }
        }
        let (&base, range) = self.ranges.range(..=addr.0).next_back().ok_or_else(bad)?;
        if end > base + range.len as u64 {
            return Err(bad());
        }
        if len == 0 {
            return Ok(());
        }
        let first = (addr.0 - base) as usize / self.page_size;
        let last = (end - 1 - base) as usize / self.page_size;
        if range.slots[first..=last].iter().all(Option::is_some) {
            Ok(())
        } else {
            Err(bad())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: usize = 1 << 21;

    fn vmm_state() -> MemState {
        let mut m = MemState::new(PS, true);
        m.add_page(11);
        m.add_page(12);
        m.add_range(0x1000_0000, 3 * PS);
        m
    }

    #[test]
    fn map_unmap_bookkeeping_matches_host_rules() {
        let mut m = vmm_state();
        let base = DevicePtr(0x1000_0000);
        // Not in a range, not aligned, unknown page.
        assert!(matches!(
            m.check_map(DevicePtr(0x10), PhysPage(11)),
            Err(Error::BadAddress { .. })
        ));
        assert!(matches!(
            m.check_map(base.offset(4096), PhysPage(11)),
            Err(Error::BadAddress {
                what: "page aligned",
                ..
            })
        ));
        assert!(matches!(
            m.check_map(base, PhysPage(99)),
            Err(Error::BadPage { .. })
        ));
        let (b, s) = m.check_map(base.offset(PS), PhysPage(11)).unwrap();
        m.set_mapped(b, s, base.offset(PS), PhysPage(11));
        // Slot taken, page taken.
        assert!(matches!(
            m.check_map(base.offset(PS), PhysPage(12)),
            Err(Error::BadAddress { .. })
        ));
        assert!(matches!(
            m.check_map(base, PhysPage(11)),
            Err(Error::BadPage { .. })
        ));
        // A mapped page cannot be freed; the range cannot be released.
        assert!(matches!(
            m.check_free(PhysPage(11)),
            Err(Error::BadPage {
                what: "is still mapped",
                ..
            })
        ));
        let range = VirtualRange { base, len: 3 * PS };
        assert!(m.check_release(range).is_err());
        // Access: inside the mapped page only.
        m.check_access(base.offset(PS), PS).unwrap();
        m.check_access(base.offset(PS + 100), 0).unwrap();
        assert!(m.check_access(base.offset(PS - 1), 2).is_err());
        assert!(m.check_access(base, 1).is_err());
        assert!(m.check_access(base.offset(3 * PS), 1).is_err());
        assert!(m.check_access(DevicePtr(u64::MAX), 2).is_err());
        // Unmap.
        assert!(m.check_unmap(base).is_err());
        assert!(m.check_unmap(base.offset(PS + 1)).is_err());
        let (b, s, p) = m.check_unmap(base.offset(PS)).unwrap();
        assert_eq!(p, PhysPage(11));
        m.set_unmapped(b, s, p);
        m.check_free(PhysPage(11)).unwrap();
        m.check_release(range).unwrap();
        assert!(m.check_release(VirtualRange { base, len: PS }).is_err());
        m.remove_page(PhysPage(11));
        assert!(matches!(
            m.check_free(PhysPage(11)),
            Err(Error::BadPage {
                what: "is not allocated",
                ..
            })
        ));
    }

    #[test]
    fn reserve_checks() {
        let m = MemState::new(PS, true);
        assert!(m.check_reserve(0).is_err());
        assert!(m.check_reserve(PS + 1).is_err());
        m.check_reserve(2 * PS).unwrap();
        let f = MemState::new(PS, false);
        assert!(matches!(f.check_reserve(PS), Err(Error::Unsupported(_))));
        assert!(matches!(
            f.check_map(DevicePtr(0), PhysPage(1)),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn contiguous_allocations_are_checked_and_accessed_whole() {
        for vmm in [true, false] {
            let mut m = MemState::new(PS, vmm);
            assert!(matches!(m.check_contiguous(0), Err(Error::ZeroSize)));
            assert!(matches!(
                m.check_contiguous(PS + 1),
                Err(Error::BadAddress { len, .. }) if len == PS + 1
            ));
            m.check_contiguous(3 * PS).unwrap();
            let base = 0x7000_0000u64;
            // Aligned above the raw address, as after an over-allocation.
            m.add_block(base, base - 512, 3 * PS);
            m.add_block(base + 4 * PS as u64, base + 4 * PS as u64, PS);
            m.check_access(DevicePtr(base), 3 * PS).unwrap();
            m.check_access(DevicePtr(base + 10), 2 * PS).unwrap();
            m.check_access(DevicePtr(base + 3 * PS as u64), 0).unwrap();
            // Past the end (into the gap), across two blocks, before the first.
            assert!(m.check_access(DevicePtr(base + 10), 3 * PS).is_err());
            assert!(m.check_access(DevicePtr(base), 5 * PS).is_err());
            assert!(m.check_access(DevicePtr(base - 1), 1).is_err());
            assert!(m.check_access(DevicePtr(u64::MAX), 2).is_err());
            assert_eq!(m.check_free_block(DevicePtr(base)).unwrap(), base - 512);
            assert!(matches!(
                m.check_free_block(DevicePtr(base + PS as u64)),
                Err(Error::BadAddress { .. })
            ));
            m.remove_block(DevicePtr(base));
            assert!(m.check_access(DevicePtr(base), 1).is_err());
            assert!(m.check_free_block(DevicePtr(base)).is_err());
            m.check_access(DevicePtr(base + 4 * PS as u64), PS).unwrap();
        }
    }
}
