//! Model-based property tests of the page arena on the host backend.
//!
//! Random sequences of alloc / free / write / read / trim run against the
//! arena and a plain reference model (live allocations and their bytes).
//! After every step: no byte of device memory belongs to two live
//! allocations, used ≤ capacity, the arena's accounting equals the model's
//! and the host backend's own count of mapped pages, data reads back
//! unchanged, a request that the free pages cover succeeds (no external
//! fragmentation), and a failed request leaves the arena unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use offload_runtime::arena::{AllocId, Arena, ArenaConfig, Tag};
use offload_runtime::device::{HostConfig, HostDevice};
use offload_runtime::Error;
use proptest::prelude::*;

const PAGE: usize = 64 << 10;
const CAPACITY_PAGES: usize = 48;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        size: usize,
        align_log2: u32,
        tag: u32,
    },
    Free(usize),
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

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size_strategy(), prop_oneof![8 => 0u32..=8, 1 => 9u32..=17, 1 => Just(3u32)], 0u32..4)
            .prop_map(|(size, align_log2, tag)| Op::Alloc { size, align_log2, tag }),
        3 => any::<usize>().prop_map(Op::Free),
        1 => any::<usize>().prop_map(Op::FreeStale),
        3 => (any::<usize>(), 0.0f64..1.0, 1usize..100_000, any::<u8>())
            .prop_map(|(target, at, len, seed)| Op::Write { target, at, len, seed }),
        2 => any::<usize>().prop_map(Op::Read),
        1 => Just(Op::Trim),
    ]
}

struct Model {
    live: BTreeMap<AllocId, (usize, Tag, Vec<u8>)>,
    freed: Vec<AllocId>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn check_invariants(arena: &Arena<HostDevice>, dev: &HostDevice, model: &Model) {
    let stats = arena.stats();
    assert!(stats.pages_used <= stats.capacity_pages);
    assert_eq!(stats.pages_used + stats.pages_free, stats.capacity_pages);
    assert_eq!(stats.live_allocations, model.live.len());
    assert_eq!(
        stats.bytes_live,
        model.live.values().map(|v| v.0).sum::<usize>()
    );
    // The arena's accounting agrees with the backend's own page counts.
    let c = dev.counters();
    assert_eq!(
        c.pages_mapped, stats.pages_used,
        "arena used pages vs pages mapped on the device"
    );
    assert_eq!(c.pages_allocated, arena.pages_held());
    assert_eq!(arena.pages_held(), stats.pages_used + stats.pages_pooled);
    // Whole pages of page allocations + slab pages = used pages.
    let page_alloc_pages: usize = stats.by_tag.values().map(|u| u.pages).sum();
    assert_eq!(page_alloc_pages + stats.slab_pages, stats.pages_used);
    // Per-tag bytes add up.
    for (tag, usage) in &stats.by_tag {
        let (n, bytes) = model
            .live
            .values()
            .filter(|v| v.1 == *tag)
            .fold((0, 0), |(n, b), v| (n + 1, b + v.0));
        assert_eq!((usage.allocations, usage.bytes), (n, bytes), "tag {tag:?}");
    }
    // No byte of device memory belongs to two live allocations.
    let mut extents = Vec::new();
    for &id in model.live.keys() {
        let table = arena.page_table(id).unwrap();
        assert_eq!(
            table.iter().map(|e| e.len).sum::<usize>(),
            model.live[&id].0
        );
        for e in table {
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
}

fn run(ops: Vec<Op>) {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 * PAGE,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let arena = Arena::new(
        dev.clone(),
        ArenaConfig {
            capacity: Some(CAPACITY_PAGES * PAGE + PAGE / 2),
        },
    )
    .unwrap();
    let mut model = Model {
        live: BTreeMap::new(),
        freed: Vec::new(),
    };
    let pick = |model: &Model, i: usize| -> Option<AllocId> {
        (!model.live.is_empty()).then(|| *model.live.keys().nth(i % model.live.len()).unwrap())
    };
    for op in ops {
        match op {
            Op::Alloc {
                size,
                align_log2,
                tag,
            } => {
                let align = 1usize << align_log2;
                let before = arena.stats();
                let slab = size < PAGE / 4 && align <= PAGE / 4;
                let pages = size.div_ceil(PAGE);
                let r = arena.alloc_aligned(size, align, Tag(tag));
                match r {
                    Ok(id) => {
                        let ptr = arena.ptr(id).unwrap();
                        assert_eq!(ptr.0 % align as u64, 0, "alignment {align}");
                        let data = pattern(size, id.raw() as u8);
                        arena.write(id, 0, &data).unwrap();
                        model.live.insert(id, (size, Tag(tag), data));
                    }
                    Err(e) => {
                        assert_eq!(
                            arena.stats(),
                            before,
                            "a failed request changed the arena: {e}"
                        );
                        match e {
                            Error::ZeroSize => assert_eq!(size, 0),
                            Error::BadAlignment { align: a, .. } => {
                                assert_eq!(a, align);
                                assert!(align > PAGE);
                            }
                            Error::NeverFits {
                                requested,
                                capacity,
                                ..
                            } => {
                                assert_eq!(requested, size);
                                assert_eq!(capacity, CAPACITY_PAGES * PAGE);
                                assert!(pages > CAPACITY_PAGES);
                            }
                            Error::OutOfMemory {
                                requested,
                                free,
                                free_pages,
                                ..
                            } => {
                                assert_eq!(requested, size);
                                assert!(
                                    pages <= CAPACITY_PAGES,
                                    "a request that can never fit must say so"
                                );
                                assert_eq!(free_pages, before.pages_free);
                                assert_eq!(free, before.pages_free * PAGE);
                                // Zero external fragmentation: a request the free pages cover always fits.
                                if slab {
                                    assert_eq!(before.pages_free, 0);
                                } else {
                                    assert!(
                                        pages > before.pages_free,
                                        "{pages} pages refused with {} free",
                                        before.pages_free
                                    );
                                }
                            }
                            other => panic!("unexpected error {other}"),
                        }
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
            Op::FreeStale(i) => {
                if !model.freed.is_empty() {
                    let id = model.freed[i % model.freed.len()];
                    let before = arena.stats();
                    assert!(matches!(arena.free(id), Err(Error::UnknownAllocation(_))));
                    assert!(matches!(arena.ptr(id), Err(Error::UnknownAllocation(_))));
                    assert!(matches!(
                        arena.read(id, 0, &mut [0u8; 1]),
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
                    let size = model.live[&id].0;
                    let off = ((size as f64) * at) as usize;
                    let data = pattern(len, seed);
                    let r = arena.write(id, off, &data);
                    if off + len <= size {
                        r.unwrap();
                        model.live.get_mut(&id).unwrap().2[off..off + len].copy_from_slice(&data);
                    } else {
                        assert!(matches!(r, Err(Error::OutOfBounds { .. })), "{r:?}");
                    }
                }
            }
            Op::Read(i) => {
                if let Some(id) = pick(&model, i) {
                    let expect = &model.live[&id].2;
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
        check_invariants(&arena, &dev, &model);
    }
    // Every allocation still holds its bytes after all the churn.
    for (id, (_, _, data)) in &model.live {
        let mut back = vec![0u8; data.len()];
        arena.read(*id, 0, &mut back).unwrap();
        assert!(&back == data);
    }
    // Free returns every page.
    for id in model.live.keys().copied().collect::<Vec<_>>() {
        arena.free(id).unwrap();
        model.live.remove(&id);
    }
    check_invariants(&arena, &dev, &model);
    assert_eq!(arena.stats().pages_used, 0);
    assert_eq!(dev.counters().pages_mapped, 0);
    assert_eq!(dev.counters().ranges_reserved, 0);
    arena.trim();
    assert_eq!(dev.counters().pages_allocated, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arena_matches_reference_model(ops in proptest::collection::vec(op_strategy(), 1..80)) {
        run(ops);
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
