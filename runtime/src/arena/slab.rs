//! The slab: small allocations packed into shared pages.
//!
//! A request under a quarter page gets a slot of a power-of-two size class
//! (256 bytes up to a quarter page). Each slab page holds slots of one class
//! and is a one-page run of its own (a one-page mapping, or a one-page
//! contiguous allocation on a device that does not map pages); it goes back
//! to the page pool as soon as its last slot is freed.

use super::pool::Run;

/// Smallest slot in bytes.
pub(crate) const MIN_SLOT: usize = 256;

pub(crate) struct SlabPage {
    /// Its memory: one page.
    pub(crate) run: Run,
    pub(crate) class: usize,
    bitmap: Vec<u64>,
    slots: usize,
    used: usize,
    /// Position in the class's partial list, when the page has a free slot.
    partial_pos: Option<usize>,
}

/// All slab pages, by size class.
#[derive(Default)]
pub(crate) struct Slab {
    pages: Vec<Option<SlabPage>>,
    vacant: Vec<usize>,
    /// Per class (index k: slot size MIN_SLOT << k), the slab pages that have a free slot.
    partial: Vec<Vec<usize>>,
    live_pages: usize,
}

impl Slab {
    pub(crate) fn new(page_size: usize) -> Self {
        let classes = if page_size / 4 >= MIN_SLOT {
            (page_size / 4 / MIN_SLOT).trailing_zeros() as usize + 1
        } else {
            0
        };
        Slab {
            partial: vec![Vec::new(); classes],
            ..Default::default()
        }
    }

    /// The slot size for a request, or `None` if it belongs on whole pages.
    pub(crate) fn class_for(&self, size: usize, align: usize, page_size: usize) -> Option<usize> {
        if size >= page_size / 4 || self.partial.is_empty() {
            return None;
        }
        let class = size.next_power_of_two().max(align).max(MIN_SLOT);
        (class <= page_size / 4).then_some(class)
    }

    fn class_index(class: usize) -> usize {
        (class / MIN_SLOT).trailing_zeros() as usize
    }

    /// Slab pages in use.
    pub(crate) fn live_pages(&self) -> usize {
        self.live_pages
    }

    /// The live slab page at `idx`.
    pub(crate) fn page(&self, idx: usize) -> &SlabPage {
        self.pages[idx].as_ref().expect("index of a live slab page")
    }

    /// Take a free slot of `class` from a partial page: (slab page index, slot index).
    pub(crate) fn take_slot(&mut self, class: usize) -> Option<(usize, usize)> {
        let ci = Self::class_index(class);
        let &idx = self.partial[ci].last()?;
        let page = self.pages[idx]
            .as_mut()
            .expect("partial list names a live page");
        let (w, bits) = page
            .bitmap
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .map(|(i, w)| (i, *w))
            .expect("a partial page has a free slot");
        let bit = (!bits).trailing_zeros() as usize;
        let slot = w * 64 + bit;
        debug_assert!(slot < page.slots);
        page.bitmap[w] |= 1 << bit;
        page.used += 1;
        if page.used == page.slots {
            self.unlist(ci, idx);
        }
        Some((idx, slot))
    }

    /// Add a fresh, empty slab page of `page_size` bytes for `class` and return its index.
    pub(crate) fn add_page(&mut self, class: usize, run: Run, page_size: usize) -> usize {
        let slots = page_size / class;
        let mut bitmap = vec![0u64; slots.div_ceil(64)];
        // Mark the bits past the last slot as taken so a full page is all ones.
        if slots % 64 != 0 {
            *bitmap.last_mut().expect("at least one word") = !0u64 << (slots % 64);
        }
        let sp = SlabPage {
            run,
            class,
            bitmap,
            slots,
            used: 0,
            partial_pos: None,
        };
        let idx = match self.vacant.pop() {
            Some(i) => {
                self.pages[i] = Some(sp);
                i
            }
            None => {
                self.pages.push(Some(sp));
                self.pages.len() - 1
            }
        };
        self.live_pages += 1;
        let ci = Self::class_index(class);
        self.list(ci, idx);
        idx
    }

    /// Free a slot. Returns the slab page if it became empty (it is then removed).
    pub(crate) fn free_slot(&mut self, idx: usize, slot: usize) -> Option<SlabPage> {
        let page = self.pages[idx].as_mut().expect("slot of a live slab page");
        let (w, bit) = (slot / 64, slot % 64);
        debug_assert!(page.bitmap[w] & (1 << bit) != 0, "slot is taken");
        page.bitmap[w] &= !(1 << bit);
        let was_full = page.used == page.slots;
        page.used -= 1;
        let ci = Self::class_index(page.class);
        if page.used == 0 {
            if !was_full {
                self.unlist(ci, idx);
            }
            self.vacant.push(idx);
            self.live_pages -= 1;
            return self.pages[idx].take();
        }
        if was_full {
            self.list(ci, idx);
        }
        None
    }

    /// Remove and return every slab page (arena teardown).
    pub(crate) fn drain(&mut self) -> Vec<SlabPage> {
        for p in &mut self.partial {
            p.clear();
        }
        self.vacant.clear();
        self.live_pages = 0;
        self.pages.drain(..).flatten().collect()
    }

    fn list(&mut self, ci: usize, idx: usize) {
        let pos = self.partial[ci].len();
        self.partial[ci].push(idx);
        self.pages[idx].as_mut().expect("live").partial_pos = Some(pos);
    }

    fn unlist(&mut self, ci: usize, idx: usize) {
        let pos = self.pages[idx]
            .as_mut()
            .expect("live")
            .partial_pos
            .take()
            .expect("listed");
        self.partial[ci].swap_remove(pos);
        if let Some(&moved) = self.partial[ci].get(pos) {
            self.pages[moved].as_mut().expect("live").partial_pos = Some(pos);
        }
    }
}
