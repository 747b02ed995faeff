//! The arena on a device that maps no pages ([`HostDevice::without_vmm`], as
//! a GPU without the CUDA virtual memory API): every page allocation and
//! slab page is one contiguous device allocation, counted in pages exactly
//! as on a device that maps them. (The arena on a device that maps pages is
//! tested by `runtime/tests/arena_model.rs`, which also runs without VMM.)

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::device::fault::{FaultConfig, FaultDevice, FaultRates};
use crate::device::{HostConfig, HostDevice};

const PAGE: usize = 64 << 10;
const WAIT: Option<Duration> = Some(Duration::from_secs(20));

fn device(pages: usize) -> Arc<HostDevice> {
    Arc::new(
        HostDevice::without_vmm(HostConfig {
            capacity: pages * PAGE,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    )
}

fn arena(dev: &Arc<HostDevice>, pages: usize) -> Arena<HostDevice> {
    Arena::new(
        dev.clone(),
        ArenaConfig {
            capacity: Some(pages * PAGE),
        },
    )
    .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(9) as u8 ^ seed)
        .collect()
}

fn read_all<D: Device + ?Sized>(a: &Arena<D>, id: AllocId) -> Vec<u8> {
    let mut back = vec![0u8; a.size(id).unwrap()];
    a.read(id, 0, &mut back).unwrap();
    back
}

/// An event on `s` that completes once the returned sender sends or drops.
fn gate(dev: &HostDevice, s: StreamId) -> (EventId, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel::<()>();
    dev.launch_host_fn(
        s,
        Box::new(move || {
            let _ = rx.recv_timeout(Duration::from_secs(60));
        }),
    )
    .unwrap();
    let ev = dev.create_event().unwrap();
    dev.record_event(ev, s).unwrap();
    (ev, tx)
}

#[test]
fn a_page_allocation_is_one_contiguous_device_allocation() {
    let dev = device(64);
    let a = arena(&dev, 32);
    let size = 3 * PAGE + PAGE / 2;
    let id = a.alloc(size, Tag(3)).unwrap();
    let ptr = a.ptr(id).unwrap();
    assert_eq!(ptr.0 % PAGE as u64, 0, "page aligned");
    let data = pattern(size, 1);
    a.write(id, 0, &data).unwrap();
    assert!(read_all(&a, id) == data, "bytes differ");
    // Across a page boundary.
    a.write(id, PAGE - 3, &[9, 8, 7, 6, 5, 4]).unwrap();
    let mut six = [0u8; 6];
    a.read(id, PAGE - 3, &mut six).unwrap();
    assert_eq!(six, [9, 8, 7, 6, 5, 4]);
    assert!(matches!(
        a.write(id, size - 1, &[0, 0]),
        Err(Error::OutOfBounds { .. })
    ));
    let st = a.stats();
    assert_eq!(
        (
            st.pages_used,
            st.pages_free,
            st.pages_pooled,
            st.live_allocations,
            st.bytes_live,
            st.tail_waste
        ),
        (4, 28, 0, 1, size, PAGE / 2)
    );
    assert_eq!(
        st.by_tag[&Tag(3)],
        TagUsage {
            allocations: 1,
            bytes: size,
            pages: 4,
            slab_bytes: 0
        }
    );
    let c = dev.counters();
    assert_eq!(
        (
            c.contiguous_allocations,
            c.contiguous_bytes,
            c.contiguous_calls,
            c.pages_allocated
        ),
        (1, 4 * PAGE, 1, 4)
    );
    assert_eq!(
        (
            c.pages_mapped,
            c.ranges_reserved,
            c.map_calls,
            c.unmap_calls
        ),
        (0, 0, 0, 0),
        "nothing mapped"
    );
    assert!(matches!(a.page_table(id), Err(Error::Unsupported(_))));
    a.free(id).unwrap();
    assert!(matches!(a.free(id), Err(Error::UnknownAllocation(_))));
}

#[test]
fn slab_pages_are_one_page_allocations() {
    let dev = device(16);
    let a = arena(&dev, 16);
    // 1000-byte requests take 1024-byte slots: 64 to a page.
    let ids: Vec<AllocId> = (0..65)
        .map(|i| a.alloc(1000, Tag(i % 2)).unwrap())
        .collect();
    let st = a.stats();
    assert_eq!(
        (st.slab_pages, st.pages_used, st.slab_waste),
        (2, 2, 2 * PAGE - 65 * 1000)
    );
    assert_eq!(st.by_tag[&Tag(0)].slab_bytes, 33 * 1024);
    assert_eq!(dev.counters().contiguous_allocations, 2);
    let base = a.ptr(ids[0]).unwrap();
    assert_eq!(base.0 % PAGE as u64, 0);
    for (i, id) in ids[..64].iter().enumerate() {
        assert_eq!(a.ptr(*id).unwrap(), base.offset(i * 1024), "slot {i}");
    }
    assert!(matches!(a.page_table(ids[0]), Err(Error::Unsupported(_))));
    for (i, &id) in ids.iter().enumerate() {
        a.write(id, 0, &pattern(1000, i as u8)).unwrap();
    }
    for (i, &id) in ids.iter().enumerate() {
        assert!(read_all(&a, id) == pattern(1000, i as u8), "slot {i}");
    }
    // Emptying a slab page gives its allocation back to the pool, which keeps it.
    for &id in &ids[..64] {
        a.free(id).unwrap();
    }
    let st = a.stats();
    assert_eq!((st.slab_pages, st.pages_used, st.pages_pooled), (1, 1, 1));
    assert_eq!(dev.counters().contiguous_allocations, 2);
    // A one-page allocation reuses it: no new device allocation.
    let calls = dev.counters().contiguous_calls;
    let one = a.alloc(PAGE, Tag(0)).unwrap();
    assert_eq!(a.ptr(one).unwrap(), base);
    assert_eq!(dev.counters().contiguous_calls, calls);
    assert!(
        read_all(&a, ids[64]) == pattern(1000, 64),
        "the other page kept its slot"
    );
}

#[test]
fn freed_allocations_are_reused_by_size_and_trimmed() {
    let dev = device(64);
    let a = arena(&dev, 32);
    let x = a.alloc(4 * PAGE, Tag(0)).unwrap();
    let y = a.alloc(2 * PAGE, Tag(0)).unwrap();
    let px = a.ptr(x).unwrap();
    a.free(x).unwrap();
    a.free(y).unwrap();
    let st = a.stats();
    assert_eq!((st.pages_used, st.pages_pooled, st.pages_free), (0, 6, 32));
    assert_eq!(a.pages_held(), 6);
    let c = dev.counters();
    assert_eq!((c.contiguous_allocations, c.contiguous_calls), (2, 2));
    // The same page count: the cached allocation, not a new one.
    let x2 = a.alloc(4 * PAGE - 100, Tag(1)).unwrap();
    assert_eq!(a.ptr(x2).unwrap(), px);
    assert_eq!(dev.counters().contiguous_calls, 2);
    // Another page count: a new one; the 2-page one stays cached.
    let z = a.alloc(3 * PAGE, Tag(1)).unwrap();
    assert_eq!(dev.counters().contiguous_calls, 3);
    assert_eq!(a.stats().pages_pooled, 2);
    assert_eq!(a.trim(), 2);
    assert_eq!(a.stats().pages_pooled, 0);
    assert_eq!(a.pages_held(), 7);
    assert_eq!(dev.counters().contiguous_allocations, 2);
    a.free(x2).unwrap();
    a.free(z).unwrap();
    assert_eq!(a.trim(), 7);
    let c = dev.counters();
    assert_eq!(
        (
            c.contiguous_allocations,
            c.contiguous_bytes,
            c.pages_allocated
        ),
        (0, 0, 0)
    );
}

#[test]
fn cached_allocations_give_way_under_the_cap_largest_first() {
    let dev = device(64);
    let a = arena(&dev, 8);
    let x = a.alloc(6 * PAGE, Tag(0)).unwrap();
    a.free(x).unwrap();
    // 6 cached + 4 new would pass the cap of 8: the 6-page one goes back.
    let y = a.alloc(4 * PAGE, Tag(0)).unwrap();
    assert_eq!((a.stats().pages_used, a.stats().pages_pooled), (4, 0));
    assert_eq!(a.pages_held(), 4);
    let c = dev.counters();
    assert_eq!(
        (c.contiguous_allocations, c.contiguous_bytes),
        (1, 4 * PAGE)
    );
    let s1 = a.alloc(PAGE, Tag(0)).unwrap();
    let s3 = a.alloc(3 * PAGE, Tag(0)).unwrap();
    a.free(s1).unwrap();
    a.free(s3).unwrap();
    assert_eq!(a.stats().pages_pooled, 4);
    // 8 held + 2 new: giving back the largest cached one (3 pages) is enough.
    let w = a.alloc(2 * PAGE, Tag(0)).unwrap();
    let st = a.stats();
    assert_eq!((st.pages_used, st.pages_pooled), (6, 1));
    assert_eq!(a.pages_held(), 7);
    assert_eq!(dev.counters().contiguous_bytes, 7 * PAGE);
    a.free(w).unwrap();
    a.free(y).unwrap();
}

#[test]
fn out_of_memory_and_never_fits_leave_the_arena_unchanged() {
    let dev = device(64);
    let a = arena(&dev, 8);
    let x = a.alloc(6 * PAGE, Tag(0)).unwrap();
    a.write(x, 0, &pattern(6 * PAGE, 2)).unwrap();
    let before = a.stats();
    let calls = dev.counters().contiguous_calls;
    match a.alloc(3 * PAGE, Tag(0)) {
        Err(
            e @ Error::OutOfMemory {
                requested,
                pages,
                free,
                free_pages,
            },
        ) => {
            assert_eq!(
                (requested, pages, free, free_pages),
                (3 * PAGE, 3, 2 * PAGE, 2)
            );
            assert!(e.is_retryable_oom());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.stats(), before);
    match a.alloc(8 * PAGE + 1, Tag(0)) {
        Err(Error::NeverFits {
            requested,
            pages,
            capacity,
        }) => assert_eq!((requested, pages, capacity), (8 * PAGE + 1, 9, 8 * PAGE)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(a.alloc(0, Tag(0)), Err(Error::ZeroSize)));
    assert!(matches!(
        a.alloc_aligned(100, 3, Tag(0)),
        Err(Error::BadAlignment {
            align: 3,
            page_size: PAGE
        })
    ));
    assert_eq!(a.stats(), before);
    assert_eq!(dev.counters().contiguous_calls, calls);
    assert!(read_all(&a, x) == pattern(6 * PAGE, 2));
    // What the free pages cover fits.
    a.alloc(2 * PAGE, Tag(0)).unwrap();
    assert_eq!(a.stats().pages_free, 0);
}

#[test]
fn the_device_running_out_is_retryable_and_changes_nothing_in_use() {
    let dev = device(8);
    let a = arena(&dev, 8);
    // Another user of the device holds half of it.
    let outside = dev.alloc_contiguous(4 * PAGE).unwrap();
    let x = a.alloc(2 * PAGE, Tag(0)).unwrap();
    a.free(x).unwrap();
    let live = a.alloc(PAGE, Tag(7)).unwrap();
    a.write(live, 0, &pattern(PAGE, 5)).unwrap();
    let before = a.stats();
    assert_eq!((before.pages_used, before.pages_pooled), (1, 2));
    // The arena has 7 free pages; the device 1, and 3 once the cached 2 go back.
    let e = a.alloc(4 * PAGE, Tag(0)).unwrap_err();
    assert!(e.is_retryable_oom(), "{e}");
    assert!(
        matches!(e, Error::DeviceOutOfMemory { wanted, available } if (wanted, available) == (4 * PAGE, 3 * PAGE)),
        "{e}"
    );
    assert_eq!(
        a.stats(),
        ArenaStats {
            pages_pooled: 0,
            ..before
        },
        "only the cache went back to the device"
    );
    assert_eq!(a.pages_held(), 1);
    assert!(read_all(&a, live) == pattern(PAGE, 5));
    // With the other user gone the same request fits.
    dev.free_contiguous(outside).unwrap();
    let y = a.alloc(4 * PAGE, Tag(0)).unwrap();
    a.free(y).unwrap();
    // The device has 3 free pages, then 1: a 2-page request fits once the
    // cached 4-page allocation goes back, which the arena does by itself.
    let outside = dev.alloc_contiguous(2 * PAGE).unwrap();
    let z = a.alloc(2 * PAGE, Tag(0)).unwrap();
    let st = a.stats();
    assert_eq!((st.pages_used, st.pages_pooled), (3, 0));
    assert_eq!(dev.counters().contiguous_bytes, 5 * PAGE);
    a.free(z).unwrap();
    dev.free_contiguous(outside).unwrap();
}

#[test]
fn a_deferred_free_waits_for_its_event_and_keeps_its_bytes() {
    let dev = device(16);
    let a = arena(&dev, 8);
    let x = a.alloc(6 * PAGE, Tag(0)).unwrap();
    let data = pattern(6 * PAGE, 9);
    a.write(x, 0, &data).unwrap();
    let ptr = a.ptr(x).unwrap();
    let s = dev.create_stream().unwrap();
    let (ev, tx) = gate(&dev, s);
    a.free_after(x, ev).unwrap();
    assert!(matches!(a.ptr(x), Err(Error::UnknownAllocation(_))));
    let st = a.stats();
    assert_eq!(
        (st.pages_deferred, st.pages_used, st.live_allocations),
        (6, 6, 0)
    );
    // Not reusable before the event, not even by a request of its size.
    assert!(matches!(
        a.alloc(6 * PAGE, Tag(0)),
        Err(Error::OutOfMemory {
            pages: 6,
            free_pages: 2,
            ..
        })
    ));
    assert_eq!(a.reclaim().unwrap(), 0);
    // Its bytes stay as they were meanwhile.
    let other = dev.create_stream().unwrap();
    let mut back = vec![0u8; 6 * PAGE];
    dev.read_blocking(ptr, &mut back, other).unwrap();
    assert!(back == data);
    tx.send(()).unwrap();
    dev.event_wait(ev, WAIT).unwrap();
    // The next request reclaims it and reuses its allocation.
    let y = a.alloc(6 * PAGE, Tag(0)).unwrap();
    assert_eq!(a.ptr(y).unwrap(), ptr);
    assert_eq!(a.stats().pages_deferred, 0);
    assert_eq!(dev.counters().contiguous_calls, 1);
    a.free(y).unwrap();
    dev.destroy_event(ev).unwrap();
    dev.destroy_stream(s).unwrap();
    dev.destroy_stream(other).unwrap();
}

#[test]
fn the_peak_counts_pages_in_use() {
    let dev = device(32);
    let a = arena(&dev, 16);
    let x = a.alloc(5 * PAGE, Tag(0)).unwrap();
    let _y = a.alloc(3 * PAGE, Tag(0)).unwrap();
    assert_eq!(a.peak_pages_used(), 8);
    a.free(x).unwrap();
    assert_eq!((a.pages_used(), a.peak_pages_used()), (3, 8));
    a.reset_peak();
    assert_eq!(a.peak_pages_used(), 3);
    let _z = a.alloc(2 * PAGE, Tag(0)).unwrap();
    assert_eq!(a.peak_pages_used(), 5);
    // A cached allocation counts as soon as it is reused.
    let _x = a.alloc(5 * PAGE, Tag(0)).unwrap();
    assert_eq!(a.peak_pages_used(), 10);
    assert_eq!(a.stats().pages_pooled, 0);
}

#[test]
fn dropping_the_arena_frees_every_device_allocation() {
    let dev = device(32);
    {
        let a = arena(&dev, 32);
        let _live = a.alloc(3 * PAGE, Tag(0)).unwrap();
        let _slot = a.alloc(100, Tag(0)).unwrap();
        let cached = a.alloc(2 * PAGE, Tag(0)).unwrap();
        a.free(cached).unwrap();
        let deferred = a.alloc(4 * PAGE, Tag(0)).unwrap();
        let s = dev.create_stream().unwrap();
        let (ev, tx) = gate(&dev, s);
        a.free_after(deferred, ev).unwrap();
        let c = dev.counters();
        assert_eq!(
            (c.contiguous_allocations, c.contiguous_bytes),
            (4, 10 * PAGE)
        );
        // The arena waits for the event when it drops.
        drop(tx);
    }
    let c = dev.counters();
    assert_eq!(
        (
            c.contiguous_allocations,
            c.contiguous_bytes,
            c.pages_allocated
        ),
        (0, 0, 0)
    );
    assert_eq!(dev.memory().unwrap().free, 32 * PAGE);
}

#[test]
fn injected_allocation_faults_are_retryable_and_change_nothing() {
    let inner = device(16);
    let dev = Arc::new(FaultDevice::new(
        inner.clone(),
        FaultConfig {
            seed: 1,
            rates: FaultRates {
                alloc_page: 1.0,
                ..FaultRates::default()
            },
            ..FaultConfig::default()
        },
    ));
    let a = Arena::new(dev.clone(), ArenaConfig::default()).unwrap();
    assert_eq!(a.capacity(), 16 * PAGE);
    let before = a.stats();
    for size in [3 * PAGE, 10] {
        let e = a.alloc(size, Tag(0)).unwrap_err();
        assert!(
            matches!(e, Error::DeviceOutOfMemory { .. }) && e.is_retryable_oom(),
            "{e}"
        );
        assert_eq!(a.stats(), before);
    }
    assert_eq!(dev.counts().alloc_page, 2);
    assert_eq!(inner.counters().contiguous_allocations, 0);
    dev.set_enabled(false);
    let id = a.alloc(3 * PAGE, Tag(0)).unwrap();
    a.write(id, 0, &pattern(3 * PAGE, 4)).unwrap();
    assert!(read_all(&a, id) == pattern(3 * PAGE, 4));
    assert_eq!(inner.counters().contiguous_allocations, 1);
}
