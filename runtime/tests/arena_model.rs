//! Model-based property tests of the page arena on the host backend.
//!
//! Random sequences of alloc / free / deferred free (`free_after`) / event
//! firing / reclaim / write / read / trim run against the arena and a plain
//! reference model (live allocations with their bytes and page tables,
//! deferred frees with the event each waits for). After every step:
//!
//! - every figure of [`ArenaStats`] equals the model's (pages used and free,
//!   deferred pages, live bytes, exact page-tail waste, slab pages and slab
//!   waste, use per tag), and used ≤ capacity;
//! - the pages the host device reports as mapped are exactly the pages of
//!   the live and deferred allocations' page tables, and each allocation's
//!   address maps, page by page, to the physical page its table names;
//! - no byte of device memory belongs to two allocations (live or waiting
//!   for their event);
//! - data reads back unchanged, and the bytes of a deferred free stay
//!   untouched until the arena reclaims it;
//! - every request gets exactly the outcome the model predicts: success, or
//!   the typed error with the requested and free figures; in particular a
//!   request the free pages cover always succeeds (no external
//!   fragmentation), and a failed request leaves the arena unchanged.
//!
//! Every sequence runs twice: on a host device that maps pages, and on one
//! without the virtual memory API ([`HostDevice::without_vmm`]), where each
//! allocation is one contiguous device allocation. There the page-table
//! checks give way to their counterparts: no page is mapped, the device's
//! contiguous bytes are the pages the arena holds, no two allocations share
//! an address, and deferred frees are read back through the device.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use offload_runtime::arena::{AllocId, Arena, ArenaConfig, ArenaStats, Extent, Tag, TagUsage};
use offload_runtime::device::{
    Device, DeviceExt, DevicePtr, EventId, HostConfig, HostDevice, StreamId,
};
use offload_runtime::Error;
use proptest::prelude::*;

const PAGE: usize = 64 << 10;
const CAPACITY_PAGES: usize = 48;
/// The slab's smallest slot (see `Slab::class_for`).
const MIN_SLOT: usize = 256;
/// Streams the test queues its event gates on (gates on one stream fire in order).
const GATE_STREAMS: usize = 2;
/// Longest a gate holds its stream if the test forgets it (it never should).
const GATE_TIMEOUT: Duration = Duration::from_secs(60);
const WAIT: Option<Duration> = Some(Duration::from_secs(20));

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        size: usize,
        align: usize,
        tag: u32,
    },
    Free(usize),
    /// Free behind an event that fires only when a later `Fire` opens its gate.
    FreeAfter {
        target: usize,
        stream: usize,
    },
    /// Open one pending gate.
    Fire(usize),
    Reclaim,
    FreeStale(usize),
    Write {
        target: usize,
        at: f64,
        len: usize,
        seed: u8,
    },
    Read(usize),
    Trim,
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..PAGE / 4,                       // slab
        4 => PAGE / 4..4 * PAGE,                     // a few pages
        2 => 4 * PAGE..20 * PAGE,                    // large layers
        1 => Just(0usize),                           // zero size
        1 => (CAPACITY_PAGES * PAGE + 1)..(CAPACITY_PAGES * PAGE * 2), // never fits
        1 => prop_oneof![Just(CAPACITY_PAGES * PAGE), Just(CAPACITY_PAGES * PAGE + 1)], // the edge
    ]
}

fn align_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => (0u32..=8).prop_map(|k| 1usize << k),
        // Up to two pages: over PAGE (2^16) is refused.
        2 => (9u32..=17).prop_map(|k| 1usize << k),
        1 => Just(PAGE / 4),
        1 => Just(0usize),
        // Strictly between two powers of two: never a power of two.
        1 => (2u32..=17).prop_flat_map(|k| ((1usize << (k - 1)) + 1)..(1usize << k)),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size_strategy(), align_strategy(), 0u32..4)
            .prop_map(|(size, align, tag)| Op::Alloc { size, align, tag }),
        3 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 0..GATE_STREAMS)
            .prop_map(|(target, stream)| Op::FreeAfter { target, stream }),
        1 => any::<usize>().prop_map(Op::Fire),
        1 => Just(Op::Reclaim),
        1 => any::<usize>().prop_map(Op::FreeStale),
        3 => (any::<usize>(), 0.0f64..1.0, 1usize..100_000, any::<u8>())
            .prop_map(|(target, at, len, seed)| Op::Write { target, at, len, seed }),
        2 => any::<usize>().prop_map(Op::Read),
        1 => Just(Op::Trim),
    ]
}

/// The slab slot size a valid request gets, or `None` for whole pages: the
/// rule of `Slab::class_for`.
fn slab_class(size: usize, align: usize) -> Option<usize> {
    if size >= PAGE / 4 {
        return None;
    }
    let class = size.next_power_of_two().max(align).max(MIN_SLOT);
    (class <= PAGE / 4).then_some(class)
}

/// One allocation as the model sees it.
struct ModelAlloc {
    size: usize,
    tag: Tag,
    data: Vec<u8>,
    ptr: DevicePtr,
    /// The page table the arena reported when it was made (allocations never
    /// move); empty on a device that maps no pages.
    extents: Vec<Extent>,
    /// Slab slot size, or `None` for a page allocation.
    class: Option<usize>,
}

impl ModelAlloc {
    /// Whole pages it holds on its own (0 for a slab slot).
    fn pages(&self) -> usize {
        match self.class {
            Some(_) => 0,
            None => self.size.div_ceil(PAGE),
        }
    }
}

/// An event that fires when the test opens its gate (and every earlier gate
/// on the same stream).
struct Gate {
    stream: usize,
    event: EventId,
    tx: Option<Sender<()>>,
    fired: bool,
}

/// A freed allocation whose pages wait for its gate's event.
struct Deferred {
    alloc: ModelAlloc,
    gate: usize,
}

#[derive(Debug)]
enum Expect {
    Zero,
    BadAlign,
    NeverFits { pages: usize },
    OutOfMemory { pages: usize, free_pages: usize },
    Ok { class: Option<usize> },
}

struct Model {
    live: BTreeMap<AllocId, ModelAlloc>,
    deferred: Vec<Deferred>,
    freed: Vec<AllocId>,
    gates: Vec<Gate>,
}

impl Model {
    fn all(&self) -> impl Iterator<Item = &ModelAlloc> {
        self.live
            .values()
            .chain(self.deferred.iter().map(|d| &d.alloc))
    }

    /// Slab pages in use, each with its slot size and slots taken (by live
    /// allocations and by deferred frees, whose slots stay taken until reclaimed).
    fn slab_pages(&self) -> BTreeMap<u64, (usize, usize)> {
        let mut pages = BTreeMap::new();
        for a in self.all() {
            if let Some(class) = a.class {
                // A slab page is one page-aligned page of addresses.
                let e = pages.entry(a.ptr.0 / PAGE as u64).or_insert((class, 0));
                assert_eq!(e.0, class, "a slab page holds slots of one size");
                e.1 += 1;
            }
        }
        pages
    }

    fn pages_used(&self) -> usize {
        self.all().map(ModelAlloc::pages).sum::<usize>() + self.slab_pages().len()
    }

    /// Release the deferred frees whose events have fired, as the arena's
    /// reclaim does; returns how many.
    fn reclaim(&mut self) -> usize {
        let before = self.deferred.len();
        let gates = &self.gates;
        self.deferred.retain(|d| !gates[d.gate].fired);
        before - self.deferred.len()
    }

    /// What a request must give; applies the reclaim the arena does before
    /// it takes pages. Returns the expectation and whether a reclaim released anything.
    fn expect_alloc(&mut self, size: usize, align: usize) -> (Expect, bool) {
        if size == 0 {
            return (Expect::Zero, false);
        }
        if !align.is_power_of_two() || align > PAGE {
            return (Expect::BadAlign, false);
        }
        let class = slab_class(size, align);
        let pages = match class {
            Some(_) => 1,
            None => size.div_ceil(PAGE),
        };
        if pages > CAPACITY_PAGES {
            return (Expect::NeverFits { pages }, false);
        }
        if let Some(c) = class {
            let partial = self
                .slab_pages()
                .values()
                .any(|&(pc, n)| pc == c && n < PAGE / c);
            if partial {
                return (Expect::Ok { class }, false);
            }
        }
        // The request needs fresh pages: fired deferred frees go back first.
        let reclaimed = self.reclaim() > 0;
        let free_pages = CAPACITY_PAGES - self.pages_used();
        if pages > free_pages {
            (Expect::OutOfMemory { pages, free_pages }, reclaimed)
        } else {
            (Expect::Ok { class }, reclaimed)
        }
    }

    /// Open gate `g`; returns the gates whose events fire because of it.
    fn open(&mut self, g: usize) -> Vec<usize> {
        drop(self.gates[g].tx.take());
        let stream = self.gates[g].stream;
        let mut now_fired = Vec::new();
        for (i, gate) in self.gates.iter_mut().enumerate() {
            if gate.stream != stream {
                continue;
            }
            if gate.tx.is_some() {
                break; // this one and every later one on the stream still wait
            }
            if !gate.fired {
                gate.fired = true;
                now_fired.push(i);
            }
        }
        now_fired
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn check_invariants(arena: &Arena<HostDevice>, dev: &HostDevice, model: &Model, check: StreamId) {
    let stats = arena.stats();
    assert!(stats.pages_used <= stats.capacity_pages);

    // Every figure of the arena's accounting equals the model's.
    let slab = model.slab_pages();
    let pages_used = model.pages_used();
    let mut by_tag: BTreeMap<Tag, TagUsage> = BTreeMap::new();
    let (mut tail_waste, mut slot_bytes) = (0, 0);
    for a in model.live.values() {
        let u = by_tag.entry(a.tag).or_default();
        u.allocations += 1;
        u.bytes += a.size;
        match a.class {
            Some(class) => {
                u.slab_bytes += class;
                slot_bytes += a.size;
            }
            None => {
                u.pages += a.pages();
                tail_waste += a.pages() * PAGE - a.size;
            }
        }
    }
    let expected = ArenaStats {
        page_size: PAGE,
        capacity_pages: CAPACITY_PAGES,
        pages_used,
        pages_free: CAPACITY_PAGES - pages_used,
        // How many free pages the arena keeps from the device is its own
        // choice; it is checked against the device below.
        pages_pooled: stats.pages_pooled,
        pages_deferred: model.deferred.iter().map(|d| d.alloc.pages()).sum(),
        live_allocations: model.live.len(),
        bytes_live: model.live.values().map(|a| a.size).sum(),
        tail_waste,
        slab_pages: slab.len(),
        slab_waste: slab.len() * PAGE - slot_bytes,
        by_tag,
    };
    assert_eq!(stats, expected, "arena accounting vs the model");

    // The arena's accounting agrees with the backend's own page counts.
    let c = dev.counters();
    assert_eq!(c.pages_allocated, arena.pages_held());
    assert_eq!(arena.pages_held(), stats.pages_used + stats.pages_pooled);
    assert!(
        arena.pages_held() <= CAPACITY_PAGES,
        "the arena holds past its cap"
    );

    // No two allocations (live or deferred) share an address: a page
    // allocation owns its pages, a slot its slot.
    let mut spans: Vec<(u64, u64)> = model
        .all()
        .map(|a| {
            let len = a.class.unwrap_or(a.pages() * PAGE) as u64;
            (a.ptr.0, a.ptr.0 + len)
        })
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "allocations {w:?} overlap");
    }
    for a in model.all().filter(|a| a.class.is_none()) {
        assert_eq!(
            a.ptr.0 % PAGE as u64,
            0,
            "a page allocation is page aligned"
        );
    }

    if !dev.maps_pages() {
        assert_eq!(
            (
                c.pages_mapped,
                c.ranges_reserved,
                c.map_calls,
                c.unmap_calls
            ),
            (0, 0, 0, 0),
            "a device without VMM maps nothing"
        );
        assert_eq!(c.contiguous_bytes, arena.pages_held() * PAGE);
        // One device allocation per page allocation and slab page, plus the cached ones.
        let in_use = model.all().filter(|a| a.class.is_none()).count() + slab.len();
        assert!(c.contiguous_allocations >= in_use);
        assert!(c.contiguous_allocations - in_use <= stats.pages_pooled);
        for (&id, a) in &model.live {
            assert!(matches!(
                arena.page_table(id),
                Err(offload_runtime::Error::Unsupported(_))
            ));
            assert_eq!(arena.ptr(id).unwrap(), a.ptr);
        }
        // The bytes of a deferred free are untouched until it is reclaimed
        // (its memory is still allocated, so the device can read it).
        for d in &model.deferred {
            let mut back = vec![0u8; d.alloc.size];
            dev.read_blocking(d.alloc.ptr, &mut back, check).unwrap();
            assert!(
                back == d.alloc.data,
                "a deferred free's bytes changed before it was reclaimed"
            );
        }
        return;
    }
    assert_eq!(
        c.pages_mapped, stats.pages_used,
        "arena used pages vs pages mapped on the device"
    );

    // Page tables: each live one is still what the arena reported at first.
    for (&id, a) in &model.live {
        assert_eq!(arena.page_table(id).unwrap(), a.extents, "{id:?} moved");
        assert_eq!(arena.ptr(id).unwrap(), a.ptr);
    }

    // The pages the device has mapped are exactly those of the page tables,
    // and every allocation's address maps to the pages its table names.
    let mapped = dev.mapped_pages();
    let page_at: BTreeMap<u64, u64> = mapped.iter().map(|(a, p)| (a.0, p.0)).collect();
    assert_eq!(page_at.len(), mapped.len(), "two pages at one address");
    let device_pages: BTreeSet<u64> = mapped.iter().map(|m| m.1 .0).collect();
    let mut table_pages = BTreeSet::new();
    for a in model.all() {
        let mut at = 0usize;
        for e in &a.extents {
            let fresh = table_pages.insert(e.page.0);
            if a.class.is_none() {
                assert!(fresh, "page {:?} of a page allocation is shared", e.page);
            }
            let page_addr = (a.ptr.0 + at as u64)
                .checked_sub(e.offset as u64)
                .expect("extent offset within its page");
            assert_eq!(
                page_addr % PAGE as u64,
                0,
                "extent of {:?} misplaced",
                a.ptr
            );
            assert_eq!(
                page_at.get(&page_addr),
                Some(&e.page.0),
                "{:#x}+{at} is not mapped to the page the table names",
                a.ptr.0
            );
            at += e.len;
        }
    }
    assert_eq!(device_pages, table_pages, "mapped pages vs the page tables");
    assert_eq!(device_pages.len(), stats.pages_used);

    // No byte of device memory belongs to two allocations, live or deferred.
    let mut extents = Vec::new();
    for a in model.all() {
        assert_eq!(a.extents.iter().map(|e| e.len).sum::<usize>(), a.size);
        for e in &a.extents {
            assert!(e.offset + e.len <= PAGE);
            extents.push((e.page, e.offset, e.offset + e.len));
        }
    }
    extents.sort();
    for w in extents.windows(2) {
        if w[0].0 == w[1].0 {
            assert!(
                w[0].2 <= w[1].1,
                "overlapping extents {:?} and {:?}",
                w[0],
                w[1]
            );
        }
    }

    // The bytes of a deferred free are untouched until it is reclaimed.
    for d in &model.deferred {
        let mut back = vec![0u8; d.alloc.size];
        let mut at = 0;
        for e in &d.alloc.extents {
            // SAFETY: nothing writes device memory while this runs: the test
            // thread waits for its own copies, and the gate streams run only
            // host functions that touch no device memory.
            unsafe {
                dev.read_physical(e.page, e.offset, &mut back[at..at + e.len])
                    .unwrap()
            };
            at += e.len;
        }
        assert!(
            back == d.alloc.data,
            "a deferred free's bytes changed before it was reclaimed"
        );
    }
}

fn run(ops: Vec<Op>, vmm: bool) {
    let config = HostConfig {
        capacity: 64 * PAGE,
        page_size: PAGE,
        link_gbps: None,
    };
    let dev = Arc::new(if vmm {
        HostDevice::new(config).unwrap()
    } else {
        HostDevice::without_vmm(config).unwrap()
    });
    let arena = Arena::new(
        dev.clone(),
        ArenaConfig {
            capacity: Some(CAPACITY_PAGES * PAGE + PAGE / 2),
        },
    )
    .unwrap();
    let streams: Vec<StreamId> = (0..GATE_STREAMS)
        .map(|_| dev.create_stream().unwrap())
        .collect();
    // Never recorded, so complete: for `free_after` of stale ids.
    let idle_event = dev.create_event().unwrap();
    // Where the checks read device memory (never held by a gate).
    let check = dev.create_stream().unwrap();
    // Declared after the arena so that, if a check fails, the gates open
    // (their senders drop) before the arena waits for its deferred frees.
    let mut model = Model {
        live: BTreeMap::new(),
        deferred: Vec::new(),
        freed: Vec::new(),
        gates: Vec::new(),
    };
    let pick = |model: &Model, i: usize| -> Option<AllocId> {
        (!model.live.is_empty()).then(|| *model.live.keys().nth(i % model.live.len()).unwrap())
    };
    for op in ops {
        match op {
            Op::Alloc { size, align, tag } => {
                let before = arena.stats();
                let (expect, reclaims) = model.expect_alloc(size, align);
                let r = arena.alloc_aligned(size, align, Tag(tag));
                if let Err(e) = &r {
                    if !reclaims {
                        assert_eq!(
                            arena.stats(),
                            before,
                            "a failed request changed the arena: {e}"
                        );
                    }
                }
                match (expect, r) {
                    (Expect::Ok { class }, Ok(id)) => {
                        let ptr = arena.ptr(id).unwrap();
                        assert_eq!(ptr.0 % align as u64, 0, "alignment {align}");
                        let extents = if vmm {
                            arena.page_table(id).unwrap()
                        } else {
                            Vec::new()
                        };
                        match class {
                            _ if !vmm => {}
                            Some(class) => {
                                assert_eq!(extents.len(), 1);
                                assert_eq!(extents[0].offset % class, 0);
                                assert!(extents[0].offset + class <= PAGE);
                            }
                            None => {
                                assert_eq!(extents.len(), size.div_ceil(PAGE));
                                assert!(extents.iter().all(|e| e.offset == 0));
                            }
                        }
                        let data = pattern(size, id.raw() as u8);
                        arena.write(id, 0, &data).unwrap();
                        model.live.insert(
                            id,
                            ModelAlloc {
                                size,
                                tag: Tag(tag),
                                data,
                                ptr,
                                extents,
                                class,
                            },
                        );
                    }
                    (Expect::Zero, Err(Error::ZeroSize)) => {}
                    (
                        Expect::BadAlign,
                        Err(Error::BadAlignment {
                            align: a,
                            page_size,
                        }),
                    ) => {
                        assert_eq!((a, page_size), (align, PAGE));
                    }
                    (
                        Expect::NeverFits { pages },
                        Err(Error::NeverFits {
                            requested,
                            pages: p,
                            capacity,
                        }),
                    ) => {
                        assert_eq!(
                            (requested, p, capacity),
                            (size, pages, CAPACITY_PAGES * PAGE)
                        );
                    }
                    (
                        Expect::OutOfMemory { pages, free_pages },
                        Err(
                            e @ Error::OutOfMemory {
                                requested,
                                pages: p,
                                free,
                                free_pages: f,
                            },
                        ),
                    ) => {
                        // Zero external fragmentation: refused only when the free pages fall short.
                        assert!(pages > free_pages);
                        assert_eq!(
                            (requested, p, free, f),
                            (size, pages, free_pages * PAGE, free_pages)
                        );
                        let msg = e.to_string();
                        assert!(
                            msg.contains(&format!("requested {size} bytes"))
                                && msg.contains(&format!("{} bytes", free_pages * PAGE)),
                            "{msg}"
                        );
                    }
                    (expect, r) => {
                        panic!("alloc({size}, align {align}): expected {expect:?}, got {r:?}")
                    }
                }
            }
            Op::Free(i) => {
                if let Some(id) = pick(&model, i) {
                    arena.free(id).unwrap();
                    model.live.remove(&id);
                    model.freed.push(id);
                }
            }
            Op::FreeAfter { target, stream } => {
                if let Some(id) = pick(&model, target) {
                    let s = streams[stream];
                    let event = dev.create_event().unwrap();
                    let (tx, rx) = channel::<()>();
                    dev.launch_host_fn(
                        s,
                        Box::new(move || {
                            let _ = rx.recv_timeout(GATE_TIMEOUT);
                        }),
                    )
                    .unwrap();
                    dev.record_event(event, s).unwrap();
                    arena.free_after(id, event).unwrap();
                    assert!(!dev.event_query(event).unwrap(), "the gate holds the event");
                    // The id is dead at once.
                    assert!(matches!(arena.ptr(id), Err(Error::UnknownAllocation(_))));
                    assert!(matches!(arena.free(id), Err(Error::UnknownAllocation(_))));
                    let alloc = model.live.remove(&id).unwrap();
                    model.freed.push(id);
                    model.gates.push(Gate {
                        stream,
                        event,
                        tx: Some(tx),
                        fired: false,
                    });
                    model.deferred.push(Deferred {
                        alloc,
                        gate: model.gates.len() - 1,
                    });
                }
            }
            Op::Fire(i) => {
                let pending: Vec<usize> = (0..model.gates.len())
                    .filter(|&g| model.gates[g].tx.is_some())
                    .collect();
                if !pending.is_empty() {
                    let g = pending[i % pending.len()];
                    for f in model.open(g) {
                        dev.event_wait(model.gates[f].event, WAIT).unwrap();
                    }
                    // Gates still held keep their events pending.
                    for gate in model.gates.iter().filter(|g| !g.fired) {
                        assert!(!dev.event_query(gate.event).unwrap());
                    }
                }
            }
            Op::Reclaim => {
                let expect = model.reclaim();
                assert_eq!(arena.reclaim().unwrap(), expect);
            }
            Op::FreeStale(i) => {
                if !model.freed.is_empty() {
                    let id = model.freed[i % model.freed.len()];
                    let before = arena.stats();
                    assert!(matches!(arena.free(id), Err(Error::UnknownAllocation(_))));
                    assert!(matches!(
                        arena.free_after(id, idle_event),
                        Err(Error::UnknownAllocation(_))
                    ));
                    assert!(matches!(arena.ptr(id), Err(Error::UnknownAllocation(_))));
                    assert!(matches!(
                        arena.read(id, 0, &mut [0u8; 1]),
                        Err(Error::UnknownAllocation(_))
                    ));
                    assert!(matches!(
                        arena.write(id, 0, &[0u8; 1]),
                        Err(Error::UnknownAllocation(_))
                    ));
                    assert_eq!(arena.stats(), before);
                }
            }
            Op::Write {
                target,
                at,
                len,
                seed,
            } => {
                if let Some(id) = pick(&model, target) {
                    let size = model.live[&id].size;
                    let off = ((size as f64) * at) as usize;
                    let data = pattern(len, seed);
                    let r = arena.write(id, off, &data);
                    if off + len <= size {
                        r.unwrap();
                        model.live.get_mut(&id).unwrap().data[off..off + len]
                            .copy_from_slice(&data);
                    } else {
                        assert!(matches!(r, Err(Error::OutOfBounds { .. })), "{r:?}");
                    }
                }
            }
            Op::Read(i) => {
                if let Some(id) = pick(&model, i) {
                    let expect = &model.live[&id].data;
                    let mut back = vec![0u8; expect.len()];
                    arena.read(id, 0, &mut back).unwrap();
                    assert!(&back == expect, "allocation {id:?} lost its contents");
                }
            }
            Op::Trim => {
                arena.trim();
                assert_eq!(arena.stats().pages_pooled, 0);
            }
        }
        check_invariants(&arena, &dev, &model, check);
    }
    // Every allocation still holds its bytes after all the churn.
    for (id, a) in &model.live {
        let mut back = vec![0u8; a.size];
        arena.read(*id, 0, &mut back).unwrap();
        assert!(back == a.data);
    }
    // Open every gate: every deferred free comes back.
    for g in 0..model.gates.len() {
        if model.gates[g].tx.is_some() {
            for f in model.open(g) {
                dev.event_wait(model.gates[f].event, WAIT).unwrap();
            }
        }
    }
    arena.reclaim_all(WAIT).unwrap();
    model.reclaim();
    assert!(model.deferred.is_empty());
    check_invariants(&arena, &dev, &model, check);
    // Free returns every page.
    for id in model.live.keys().copied().collect::<Vec<_>>() {
        arena.free(id).unwrap();
        model.live.remove(&id);
    }
    check_invariants(&arena, &dev, &model, check);
    assert_eq!(arena.stats().pages_used, 0);
    assert_eq!(dev.counters().pages_mapped, 0);
    assert_eq!(dev.counters().ranges_reserved, 0);
    arena.trim();
    assert_eq!(dev.counters().pages_allocated, 0);
    assert_eq!(dev.counters().contiguous_allocations, 0);
    for gate in &model.gates {
        dev.destroy_event(gate.event).unwrap();
    }
    dev.destroy_event(idle_event).unwrap();
    dev.destroy_stream(check).unwrap();
    for s in streams {
        dev.destroy_stream(s).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arena_matches_reference_model(ops in proptest::collection::vec(op_strategy(), 1..80)) {
        run(ops, true);
    }

    #[test]
    fn arena_matches_reference_model_without_vmm(
        ops in proptest::collection::vec(op_strategy(), 1..80)
    ) {
        run(ops, false);
    }
}

#[test]
fn dropping_the_arena_returns_every_page_to_the_device() {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 * PAGE,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    {
        let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
        arena.alloc(5 * PAGE, Tag(0)).unwrap();
        arena.alloc(100, Tag(0)).unwrap();
        let gone = arena.alloc(PAGE, Tag(1)).unwrap();
        arena.free(gone).unwrap();
        assert_eq!(dev.counters().pages_allocated, 7);
    }
    let c = dev.counters();
    assert_eq!(
        (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
        (0, 0, 0)
    );
}

#[test]
fn freed_pages_are_poisoned_so_stale_reads_show() {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 8 * PAGE,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    let id = arena.alloc(PAGE, Tag(0)).unwrap();
    arena.write(id, 0, &vec![0x11; PAGE]).unwrap();
    let page = arena.page_table(id).unwrap()[0].page;
    arena.free(id).unwrap();
    arena.trim();
    let mut raw = vec![0u8; PAGE];
    // SAFETY: every stream is idle (the copies above were synchronised).
    unsafe { dev.read_physical(page, 0, &mut raw).unwrap() };
    assert!(raw
        .iter()
        .all(|&b| b == offload_runtime::device::host::POISON));
}

#[test]
fn deferred_free_waits_for_its_event() {
    use offload_runtime::device::Device;
    use std::time::Duration;
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 4 * PAGE,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let arena = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    let id = arena.alloc(4 * PAGE, Tag(0)).unwrap();
    let s = dev.create_stream().unwrap();
    let ev = dev.create_event().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    // The "kernel" using the allocation finishes only when we say so.
    dev.launch_host_fn(
        s,
        Box::new(move || {
            let _ = rx.recv_timeout(Duration::from_secs(20));
        }),
    )
    .unwrap();
    dev.record_event(ev, s).unwrap();
    arena.free_after(id, ev).unwrap();
    assert!(
        matches!(arena.ptr(id), Err(Error::UnknownAllocation(_))),
        "the id is dead at once"
    );
    assert_eq!(arena.stats().pages_deferred, 4);
    assert_eq!(arena.stats().pages_used, 4);
    // Its pages are not reusable while the event is pending.
    let r = arena.alloc(PAGE, Tag(0));
    assert!(
        matches!(r, Err(Error::OutOfMemory { free_pages: 0, .. })),
        "{r:?}"
    );
    tx.send(()).unwrap();
    dev.event_wait(ev, Some(Duration::from_secs(20))).unwrap();
    // The next allocation reclaims them.
    let again = arena.alloc(4 * PAGE, Tag(0)).unwrap();
    assert_eq!(arena.stats().pages_deferred, 0);
    arena.free(again).unwrap();
    assert_eq!(dev.counters().pages_mapped, 0);
}
