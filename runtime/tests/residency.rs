//! The residency engine on the host backend: exact bytes moved per mode and
//! policy, contents of every acquired tensor as the compute stream sees
//! them, budgets, late done events, errors, and no leaked page.

use std::sync::Arc;
use std::time::Duration;

use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice, StreamId};
use offload_runtime::model::Pin;
use offload_runtime::residency::{HostPolicy, LayerId, Mode, Policy, Runtime, RuntimeConfig};
use offload_runtime::Error;

mod common;

use common::{cfg, model, pass, setup_on, uniform, Setup, PAGE};

fn setup(cfg: RuntimeConfig) -> Setup {
    let dev = HostDevice::new(HostConfig {
        capacity: 64 << 20,
        page_size: PAGE,
        link_gbps: None,
    })
    .unwrap();
    setup_on(Arc::new(dev), cfg)
}

#[test]
fn sequential_streams_every_layer_and_keeps_what_the_ring_can() {
    let sizes = [10_000, 30_000, 20_000, 5_000, 25_000];
    let (desc, src) = model(&[sizes.iter().map(|&n| vec![n]).collect()]);
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 2, 256, None));
    let m = s.rt.load(desc, src.clone()).unwrap();
    // Every pass moves every layer once: the ring holds the layer in use and the next two.
    assert_eq!(pass(&s, m, &src, 0), 90_000, "pass 1: every layer once");
    // Pass 2 is the first that prefetches across the pass boundary: layer 2
    // stayed from pass 1 (−20 000) and layers 0 and 1 of pass 3 come early (+40 000).
    assert_eq!(pass(&s, m, &src, 0), 110_000);
    // Steady state: every layer once per pass; the ring holds the layer in use and the next two.
    for _ in 0..3 {
        assert_eq!(pass(&s, m, &src, 0), 90_000);
    }
    let plan = s.rt.plan_of(m, 0).unwrap();
    assert_eq!(
        plan,
        Some((vec![false; 5], 3, 8 * PAGE)),
        "three slots of the largest layer's pages"
    );
    let st = s.rt.stats();
    // Peak: the ring, 3 × the largest layer's 8 pages.
    assert_eq!(st.peak_device_bytes, 3 * 8 * PAGE);
    assert!(st.peak_device_bytes <= 3 * 30_000 + 5 * PAGE);
    assert_eq!(
        st.bytes_h2d,
        s.dev.counters().bytes_h2d,
        "runtime and device agree on bytes moved"
    );
}

#[test]
fn balanced_planned_moves_d_minus_b_plus_the_ring_and_lru_moves_everything() {
    // Denoiser: 8 layers of 4 pages (D = 32 pages); high watermark B = 24 pages; depth 1.
    let layer = 4 * PAGE;
    let d = 8 * layer;
    let b = 24 * PAGE;
    let (desc, src) = model(&[uniform(8, layer)]);

    let s = setup(cfg(Mode::Balanced, Policy::Planned, 1, 64, Some(24)));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    assert_eq!(
        pass(&s, m, &src, 0),
        d as u64,
        "first pass: everything once"
    );
    let plan = s.rt.plan_of(m, 0).unwrap().unwrap();
    // Ring of 2 slots (8 pages) leaves 16 pages: the first 4 layers stay.
    assert_eq!(
        plan,
        (
            vec![true, true, true, true, false, false, false, false],
            2,
            layer
        )
    );
    // Pass 2 also prefetches layer 4 for pass 3, across the pass boundary.
    assert_eq!(pass(&s, m, &src, 0) as usize, 5 * layer);
    for _ in 0..3 {
        let moved = pass(&s, m, &src, 0) as usize;
        assert_eq!(moved, 4 * layer, "the four streamed layers");
        assert!(
            moved <= (d - b) + 2 * layer,
            "bound (D − B) + (depth + 1) × largest"
        );
    }
    assert!(s.rt.stats().peak_device_bytes <= b);

    let s = setup(cfg(Mode::Balanced, Policy::Lru, 1, 64, Some(24)));
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0) as usize, d);
    assert_eq!(
        pass(&s, m, &src, 0) as usize,
        d + layer,
        "and layer 0 of pass 3, across the boundary"
    );
    for _ in 0..3 {
        assert_eq!(
            pass(&s, m, &src, 0) as usize,
            d,
            "LRU over a cyclic pass larger than its budget moves all of D"
        );
    }
    assert!(s.rt.stats().peak_device_bytes <= b);
}

#[test]
fn a_denoiser_under_the_high_watermark_moves_nothing_after_the_first_pass() {
    let (desc, src) = model(&[uniform(6, 3 * PAGE)]);
    for mode in [Mode::Balanced, Mode::Model] {
        let s = setup(cfg(mode, Policy::Planned, 2, 64, Some(40)));
        let m = s.rt.load(desc.clone(), src.clone()).unwrap();
        assert_eq!(pass(&s, m, &src, 0), 18 * PAGE as u64, "{mode}");
        for _ in 0..3 {
            assert_eq!(pass(&s, m, &src, 0), 0, "{mode}");
        }
    }
}

#[test]
fn model_mode_moves_whole_components_on_demand() {
    let (desc, src) = model(&[uniform(4, 4 * PAGE), uniform(4, 4 * PAGE)]);
    // 20 pages hold one 16-page component, not two.
    let s = setup(cfg(Mode::Model, Policy::Planned, 2, 20, None));
    let m = s.rt.load(desc, src.clone()).unwrap();
    let comp = (16 * PAGE) as u64;
    assert_eq!(pass(&s, m, &src, 0), comp);
    assert_eq!(pass(&s, m, &src, 0), 0);
    assert_eq!(pass(&s, m, &src, 1), comp);
    assert_eq!(pass(&s, m, &src, 0), comp);
    assert!(s.rt.stats().peak_device_bytes <= 20 * PAGE);
    assert_eq!(
        s.rt.stats().evictions,
        8,
        "two whole components were offloaded"
    );
}

#[test]
fn mode_none_uploads_at_load_and_refuses_what_does_not_fit() {
    let (desc, src) = model(&[uniform(3, 2 * PAGE), uniform(2, 5 * PAGE)]);
    let s = setup(cfg(Mode::None, Policy::Planned, 2, 64, None));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    assert_eq!(s.rt.stats().bytes_h2d, 16 * PAGE as u64);
    assert_eq!(pass(&s, m, &src, 0) + pass(&s, m, &src, 1), 0);

    let s = setup(cfg(Mode::None, Policy::Planned, 2, 15, None));
    let e = s.rt.load(desc, src).unwrap_err();
    match e {
        Error::DoesNotFit {
            needed, available, ..
        } => assert_eq!((needed, available), (16 * PAGE, 15 * PAGE)),
        other => panic!("{other}"),
    }
    assert_eq!(s.dev.counters().pages_mapped, 0, "nothing stays allocated");
    assert_eq!(s.rt.stats().host_bytes, 0, "nor on the host");
}

#[test]
fn a_slot_is_not_reused_before_its_done_event_fires() {
    // Depth 0: one ring slot, so the next layer must overwrite this one's slot.
    let (desc, src) = model(&[uniform(2, 2 * PAGE)]);
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 0, 64, None));
    let m = s.rt.load(desc, src.clone()).unwrap();
    let user = s.dev.create_stream().unwrap();
    let done = s.dev.create_event().unwrap();
    let g =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    let view = g.tensor(0).unwrap();
    let (ptr, len) = (view.ptr.0 as usize, view.bytes);
    let expect = src.data[0][0][0].clone();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<bool>();
    // The engine's "kernel": runs late, reads the layer through its pointer.
    s.dev.stream_wait_event(user, g.ready_event()).unwrap();
    s.dev
        .launch_host_fn(
            user,
            Box::new(move || {
                let _ = go_rx.recv_timeout(Duration::from_secs(20));
                // SAFETY: on the host backend a device pointer is a host address;
                // the runtime keeps the slot mapped and unchanged until `done` fires.
                let now = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
                let _ = seen_tx.send(now == expect.as_slice());
            }),
        )
        .unwrap();
    s.dev.record_event(done, user).unwrap();
    s.rt.release(g, done).unwrap();
    // Layer 1 goes into the same slot; its upload must wait for `done`.
    let g1 =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 1,
        })
        .unwrap();
    assert_eq!(g1.tensor(0).unwrap().ptr.0 as usize, ptr, "the same slot");
    std::thread::sleep(Duration::from_millis(50));
    go_tx.send(()).unwrap();
    assert!(
        seen_rx.recv_timeout(Duration::from_secs(20)).unwrap(),
        "the slot changed under a live user"
    );
    let mut back = vec![0u8; len];
    s.dev
        .read_blocking(g1.tensor(0).unwrap().ptr, &mut back, s.compute)
        .unwrap();
    assert!(back == src.data[0][1][0]);
}

#[test]
fn bad_requests_are_typed_errors() {
    let (desc, src) = model(&[uniform(2, 6 * PAGE)]);
    // A high watermark below the largest layer.
    let s = setup(cfg(Mode::Balanced, Policy::Planned, 2, 64, Some(5)));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    match s
        .rt
        .acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap_err()
    {
        Error::BudgetTooSmall {
            budget,
            largest_layer,
        } => assert_eq!((budget, largest_layer), (5 * PAGE, 6 * PAGE)),
        other => panic!("{other}"),
    }
    let s = setup(cfg(Mode::Balanced, Policy::Planned, 2, 64, None));
    let m = s.rt.load(desc, src).unwrap();
    for (c, l) in [(1, 0), (0, 2)] {
        let e =
            s.rt.acquire(LayerId {
                model: m,
                component: c,
                layer: l,
            })
            .unwrap_err();
        assert!(matches!(e, Error::UnknownLayer { .. }), "{e}");
    }
    let g =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    assert!(
        matches!(s.rt.unload(m), Err(Error::UnknownLayer { .. })),
        "unloading under a live guard"
    );
    drop(g);
    s.rt.unload(m).unwrap();
    let e =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap_err();
    assert!(e.to_string().contains("not loaded"), "{e}");
    assert_eq!(s.dev.counters().pages_mapped, 0);
    assert_eq!(s.rt.stats().host_bytes, 0);
}

#[test]
fn staged_uploads_read_through_the_staging_ring() {
    staged_uploads_through_a_ring(false);
}

/// Write-combined staging buffers are asked of the device for the ring, and
/// nothing else changes (the host backend gives plain pinned memory).
#[test]
fn write_combined_staging_asks_the_device_for_write_combined_buffers() {
    staged_uploads_through_a_ring(true);
}

fn staged_uploads_through_a_ring(write_combined: bool) {
    let (desc, src) = model(&[vec![
        vec![3 * PAGE + 100, 50],
        vec![9 * PAGE + 5],
        vec![PAGE],
        vec![2 * PAGE],
    ]]);
    let mut c = cfg(Mode::Sequential, Policy::Planned, 1, 64, None);
    c.host_policy = HostPolicy::Staged {
        buffers: 2,
        buffer_bytes: 2 * PAGE,
        threads: 2,
        // Parts of half a page: a full buffer's fill is split across both threads.
        fill_part_bytes: PAGE / 2,
        write_combined,
    };
    let s = setup(c);
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(
        s.dev.counters().write_combined_requests,
        if write_combined { 2 } else { 0 },
        "the ring's buffers, write-combined as the policy says"
    );
    assert_eq!(
        s.rt.stats().host_bytes,
        4 * PAGE,
        "only the staging ring is held on the host"
    );
    // Staged uploads copy each layer packed as on the device, as the pinned
    // policy does: layer 0's second tensor starts at the next multiple of
    // 256 bytes, and the 156-byte gap before it goes in the same copy.
    let layer0 = (3 * PAGE + 256 + 50) as u64;
    let total: u64 = layer0 + (9 * PAGE + 5 + PAGE + 2 * PAGE) as u64;
    let copies = s.dev.counters().copies_h2d;
    assert_eq!(pass(&s, m, &src, 0), total);
    // One copy per 2-page staging buffer filled, not per tensor: layer 0
    // (3 pages and 306 bytes) in 2, layer 1 in 5, layers 2 and 3 in 1 each.
    assert_eq!(s.dev.counters().copies_h2d - copies, 2 + 5 + 1 + 1);
    // Pass 2 also prefetches layer 0 (its two tensors) for pass 3.
    assert_eq!(pass(&s, m, &src, 0), total + layer0);
    for _ in 0..2 {
        assert_eq!(pass(&s, m, &src, 0), total);
    }
    assert_eq!(s.rt.stats().bytes_h2d, s.dev.counters().bytes_h2d);
}

#[test]
fn a_failing_source_is_an_error_and_the_layer_stays_unloaded() {
    let (desc, src) = model(&[uniform(3, 2 * PAGE)]);
    // The description says layer 1 is bigger than the source holds.
    let mut desc = desc;
    desc.components[0].layers[1].tensors[0].shape = vec![3 * PAGE];
    desc.components[0].layers[1].tensors[0].bytes = 3 * PAGE;
    let mut c = cfg(Mode::Sequential, Policy::Planned, 1, 64, None);
    c.host_policy = HostPolicy::staged(1);
    let s = setup(c);
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    drop(
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap(),
    );
    let e =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 1,
        })
        .unwrap_err();
    assert!(e.to_string().contains("past its"), "{e}");
    // Layer 2 still works.
    drop(
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 2,
        })
        .unwrap(),
    );
    // With the pinned policy the same fault stops the load, and nothing is left allocated.
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 1, 64, None));
    let e = s.rt.load(desc, src).unwrap_err();
    assert!(e.to_string().contains("past its"), "{e}");
    assert_eq!(s.rt.stats().host_bytes, 0);
}

/// A source that holds its tensors in memory and says so
/// (`WeightSource::in_memory`), on a copy of `common::MemSource`'s weights
/// that counts the reads it is asked for; it can hand out a slice one byte
/// short for one tensor once `broken` is set (a promise broken after load,
/// or from the start).
struct Held {
    inner: common::MemSource,
    short: Option<(usize, usize, usize)>,
    broken: std::sync::atomic::AtomicBool,
}

impl Held {
    fn new(src: &common::MemSource, short: Option<(usize, usize, usize)>) -> Arc<Held> {
        Arc::new(Held {
            inner: common::MemSource::new(src.data.clone()),
            short,
            broken: Default::default(),
        })
    }

    fn reads(&self) -> usize {
        self.inner.reads()
    }
}

impl offload_runtime::model::WeightSource for Held {
    fn read(
        &self,
        c: usize,
        l: usize,
        t: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), offload_runtime::model::SourceError> {
        self.inner.read(c, l, t, offset, dst)
    }

    fn in_memory(&self, c: usize, l: usize, t: usize) -> Option<&[u8]> {
        let bytes = &self.inner.data[c][l][t];
        let cut =
            self.short == Some((c, l, t)) && self.broken.load(std::sync::atomic::Ordering::SeqCst);
        Some(if cut {
            &bytes[..bytes.len() - 1]
        } else {
            bytes
        })
    }
}

/// A source that holds its tensors in memory is never read: the runtime
/// copies from its memory into the staging ring and into the pinned
/// policy's layer copies (with streaming stores), byte for byte, tensors
/// not a multiple of 16 bytes and alignment gaps included; a slice of the
/// wrong length is an error naming the tensor, at load or at upload.
#[test]
fn in_memory_sources_are_copied_not_read() {
    use offload_runtime::model::WeightSource as _;
    let (desc, src) = model(&[vec![
        vec![3 * PAGE + 100, 5000],
        vec![9 * PAGE + 5],
        vec![PAGE, 17],
        vec![2 * PAGE + 3],
    ]]);
    let total = (3 * PAGE + 256 + 5000 + 9 * PAGE + 5 + PAGE + 17 + 2 * PAGE + 3) as u64;
    let staged = || {
        let mut c = cfg(Mode::Sequential, Policy::Planned, 1, 64, None);
        c.host_policy = HostPolicy::Staged {
            buffers: 2,
            buffer_bytes: 2 * PAGE,
            threads: 2,
            fill_part_bytes: PAGE / 2,
            write_combined: false,
        };
        c
    };
    // Staged: every fill from memory; the first pass moves every byte once.
    let held = Held::new(&src, Some((0, 2, 0)));
    let s = setup(staged());
    let m = s.rt.load(desc.clone(), held.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0), total);
    pass(&s, m, &src, 0);
    assert_eq!(held.reads(), 0, "staged fills read the source's memory");
    // The source breaks its promise: the upload of layer 2 fails, naming it.
    held.broken.store(true, std::sync::atomic::Ordering::SeqCst);
    let l2 = LayerId {
        model: m,
        component: 0,
        layer: 2,
    };
    // Layer 2 may still be resident from the last pass: let the ring move on.
    for l in [3, 0, 1] {
        drop(s.rt.acquire(LayerId { layer: l, ..l2 }).unwrap());
    }
    let e = s.rt.acquire(l2).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Source(_))
            && msg.contains("tensor 0 of layer 2 of component 0 (layer comp0/layer2)")
            && msg.contains(&format!("holds {}", PAGE - 1))
            && msg.contains(&format!("says {PAGE}")),
        "{msg}"
    );
    drop(s.rt.acquire(LayerId { layer: 3, ..l2 }).unwrap());
    assert_eq!(held.reads(), 0);

    // Pinned: the load copies every layer from memory.
    let held = Held::new(&src, None);
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 1, 64, None));
    let m = s.rt.load(desc.clone(), held.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0), total);
    assert_eq!(held.reads(), 0, "the pinned copies come from memory");

    // A slice of the wrong length at load: refused before anything is held.
    for policy in [
        staged(),
        cfg(Mode::Sequential, Policy::Planned, 1, 64, None),
    ] {
        let held = Held::new(&src, Some((0, 1, 0)));
        held.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(held.in_memory(0, 1, 0).map(<[u8]>::len), Some(9 * PAGE + 4));
        let s = setup(policy);
        let host_before = s.rt.stats().host_bytes;
        let e = s.rt.load(desc.clone(), held.clone()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::Config(_))
                && msg.contains("c0.l1.t0")
                && msg.contains(&format!("holds {} bytes", 9 * PAGE + 4))
                && msg.contains(&format!("says {}", 9 * PAGE + 5)),
            "{msg}"
        );
        assert_eq!(s.rt.stats().host_bytes, host_before);
        assert_eq!(s.dev.counters().pages_mapped, 0);
        assert_eq!(held.reads(), 0);
    }
}

#[test]
fn dropping_the_runtime_returns_every_page() {
    let (desc, src) = model(&[uniform(5, 3 * PAGE), uniform(3, PAGE)]);
    let dev;
    {
        let s = setup(cfg(Mode::Balanced, Policy::Planned, 2, 64, Some(20)));
        dev = s.dev.clone();
        let m = s.rt.load(desc, src.clone()).unwrap();
        pass(&s, m, &src, 0);
        pass(&s, m, &src, 1);
        assert!(dev.counters().pages_mapped > 0);
    }
    let c = dev.counters();
    assert_eq!(
        (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
        (0, 0, 0)
    );
}

#[test]
fn the_ring_stays_mapped_across_passes() {
    for mode in [Mode::Sequential, Mode::Balanced] {
        let (desc, src) = model(&[uniform(8, 4 * PAGE)]);
        let s = setup(cfg(mode, Policy::Planned, 1, 64, Some(24)));
        let m = s.rt.load(desc, src.clone()).unwrap();
        pass(&s, m, &src, 0);
        pass(&s, m, &src, 0);
        let maps = s.dev.counters().map_calls;
        let moved: u64 = (0..4).map(|_| pass(&s, m, &src, 0)).sum();
        assert!(moved > 0, "{mode}: layers stream");
        assert_eq!(
            s.dev.counters().map_calls,
            maps,
            "{mode}: streaming remapped pages"
        );
    }
}

#[test]
fn pinned_components_stay_or_stream_whatever_the_mode() {
    let (mut desc, src) = model(&[uniform(3, 2 * PAGE), uniform(6, 4 * PAGE)]);
    desc.components[0].pin = Pin::AlwaysResident;
    desc.components[1].pin = Pin::NeverResident;
    // Balanced with room for everything: the never-resident denoiser still streams.
    let s = setup(cfg(Mode::Balanced, Policy::Planned, 1, 64, Some(60)));
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(
        s.rt.stats().bytes_h2d,
        6 * PAGE as u64,
        "the always-resident component is uploaded at load"
    );
    for _ in 0..3 {
        assert_eq!(pass(&s, m, &src, 0), 0, "and never moves again");
    }
    pass(&s, m, &src, 1);
    pass(&s, m, &src, 1);
    assert_eq!(
        pass(&s, m, &src, 1),
        6 * 4 * PAGE as u64,
        "never-resident: every layer, every pass"
    );
    assert_eq!(
        pass(&s, m, &src, 0),
        0,
        "the pinned component survived the other's passes"
    );
}

#[test]
fn a_component_offloaded_while_one_of_its_layers_is_held_streams_again() {
    // comp0: 8 layers of 4 pages, above its 24-page high watermark, so it has a ring.
    let (desc, src) = model(&[uniform(8, 4 * PAGE), uniform(4, 4 * PAGE)]);
    let s = setup(cfg(Mode::Balanced, Policy::Planned, 1, 36, Some(24)));
    let m = s.rt.load(desc, src.clone()).unwrap();
    pass(&s, m, &src, 0);
    // Hold a resident layer of comp0 while comp1 starts and offloads comp0's idle memory.
    let held =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    pass(&s, m, &src, 1);
    drop(held);
    // comp0's streamed layers need a ring again.
    pass(&s, m, &src, 0);
    pass(&s, m, &src, 0);
}

#[test]
fn a_runtime_on_an_unknown_compute_stream_is_refused() {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 1 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let e = Runtime::new(dev, StreamId(987_654), RuntimeConfig::default()).unwrap_err();
    assert!(matches!(e, Error::UnknownStream(_)), "{e}");
}

#[test]
fn never_resident_streams_even_in_mode_none() {
    let (mut desc, src) = model(&[uniform(2, 2 * PAGE), uniform(4, 4 * PAGE)]);
    desc.components[1].pin = Pin::NeverResident;
    // The device holds the resident component and a ring, not the whole model.
    let s = setup(cfg(Mode::None, Policy::Planned, 1, 16, None));
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(
        s.rt.stats().bytes_h2d,
        4 * PAGE as u64,
        "only component 0 at load"
    );
    assert_eq!(pass(&s, m, &src, 0), 0);
    pass(&s, m, &src, 1);
    pass(&s, m, &src, 1);
    assert_eq!(
        pass(&s, m, &src, 1),
        16 * PAGE as u64,
        "the never-resident component streams every pass"
    );
    assert_eq!(pass(&s, m, &src, 0), 0);
}

/// Stalls are timed by events around the compute stream's waits, not by
/// host functions (each of which holds a GPU stream until a CPU thread has
/// run it): a pass queues none with the timeline off, and exactly two per
/// wait and per upload with it on. A checkpoint splits the stall in stream
/// order, and is known once the device has passed it.
#[test]
fn stalls_are_timed_by_events_and_queue_no_host_function() {
    use offload_runtime::device::HostFn;
    // 1 MB/s: each 50 kB upload takes 50 ms, so no layer is ready when acquired.
    const LAYERS: usize = 4;
    for timeline in [false, true] {
        let dev = Arc::new(
            HostDevice::new(HostConfig {
                capacity: 64 << 20,
                page_size: PAGE,
                link_gbps: Some(0.001),
            })
            .unwrap(),
        );
        let mut c = cfg(Mode::Sequential, Policy::Planned, 2, 256, None);
        c.timeline = timeline;
        let s = setup_on(dev, c);
        let (desc, src) = model(&[uniform(LAYERS, 50_000)]);
        let m = s.rt.load(desc, src).unwrap();
        let start = s.rt.stall_checkpoint();
        let fns0 = s.dev.counters().host_fns;
        // The engine's compute stream is held until the pass is queued.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let gate: HostFn = Box::new(move || {
            let _ = rx.recv_timeout(Duration::from_secs(20));
        });
        s.dev.launch_host_fn(s.compute, gate).unwrap();
        let t0 = std::time::Instant::now();
        // A checkpoint after each acquire: each layer's wait lies between two.
        let mut marks = vec![start];
        for l in 0..LAYERS {
            drop(
                s.rt.acquire(LayerId {
                    model: m,
                    component: 0,
                    layer: l,
                })
                .unwrap(),
            );
            marks.push(s.rt.stall_checkpoint());
        }
        let _ = s.rt.stats();
        assert_eq!(
            marks[LAYERS].ns(),
            None,
            "the compute stream has not passed its waits"
        );
        tx.send(()).unwrap();
        s.dev.stream_synchronize(s.compute).unwrap();
        s.rt.synchronize().unwrap();
        let wall = t0.elapsed();
        let st = s.rt.stats();
        let ns: Vec<u64> = marks.iter().map(|c| c.ns().unwrap()).collect();
        assert_eq!(
            (ns[0], ns[LAYERS], st.stall_unmeasured),
            (0, st.stall_ns, 0),
            "timeline {timeline}"
        );
        // Every layer was waited for (its upload takes 50 ms), and each
        // checkpoint holds only the waits before it.
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{ns:?}");
        assert!(
            st.stall_ns > 0 && st.stall_ns <= wall.as_nanos() as u64,
            "stall {} ns in a pass of {wall:?}",
            st.stall_ns
        );
        let fns = s.dev.counters().host_fns - fns0 - 1;
        if timeline {
            let tl = s.rt.take_timeline();
            let waits = tl.iter().filter(|e| e.kind == "wait").count();
            let uploads = tl.iter().filter(|e| e.kind == "upload").count();
            assert!(waits > 0, "{tl:?}");
            assert_eq!(uploads as u64, st.uploads);
            assert_eq!(fns, 2 * (waits + uploads) as u64, "{tl:?}");
        } else {
            assert_eq!(
                fns, 0,
                "host functions queued by a pass without the timeline"
            );
        }
    }
}

/// Dropping a runtime whose staged uploads are still queued frees the
/// staging ring only after its copies have run: on a GPU, freeing it
/// earlier lets the copy engine read freed memory. (The host backend
/// counts a pinned buffer freed under a queued copy, and keeps it.)
#[test]
fn dropping_a_runtime_mid_upload_frees_no_staging_buffer_under_a_copy() {
    /// A source that takes 20 ms a read, so that prefetched layers are
    /// still waiting for the reader when the runtime is dropped.
    struct Slow(Arc<common::MemSource>);
    impl offload_runtime::model::WeightSource for Slow {
        fn read(
            &self,
            component: usize,
            layer: usize,
            tensor: usize,
            offset: usize,
            dst: &mut [u8],
        ) -> Result<(), offload_runtime::model::SourceError> {
            std::thread::sleep(Duration::from_millis(20));
            self.0.read(component, layer, tensor, offset, dst)
        }
    }
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 << 20,
            page_size: PAGE,
            link_gbps: Some(0.25),
        })
        .unwrap(),
    );
    let mut c = cfg(Mode::Sequential, Policy::Planned, 4, 8192, None);
    c.host_policy = HostPolicy::Staged {
        buffers: 2,
        buffer_bytes: 64 << 20,
        threads: 1,
        fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
        write_combined: false,
    };
    let s = setup_on(dev.clone(), c);
    // Five 4 MiB layers, each 17 ms over the link: the acquire of layer 0
    // queues its upload and the next four's, which the one reader takes
    // one at a time while the runtime is dropped.
    let (desc, src) = model(&[uniform(5, 4 << 20)]);
    let m = s.rt.load(desc, Arc::new(Slow(src))).unwrap();
    drop(
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap(),
    );
    let Setup { dev, compute, rt } = s;
    drop(rt);
    let c = dev.counters();
    assert_eq!(c.pinned_freed_in_use, 0);
    assert_eq!(c.bytes_h2d, 5 * (4 << 20), "every queued upload ran");
    dev.destroy_stream(compute).unwrap();
}

/// An acquire waits for a layer's upload only while it is in flight: once
/// its ready event has completed, the compute stream is given no wait (on a
/// GPU, a driver call per acquire the engine's thread does not make), and
/// once an acquire has seen it complete, later acquires of the same copy
/// do not even ask the device. A copy uploaded again is asked about again.
#[test]
fn layers_uploaded_ahead_are_not_waited_for_again() {
    let (desc, src) = model(&[uniform(4, 2 * PAGE)]);
    // Every layer resident and its upload done: no wait at all.
    let s = setup(cfg(Mode::Balanced, Policy::Planned, 1, 64, None));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    s.rt.synchronize().unwrap();
    let queries = s.dev.counters().event_queries;
    pass(&s, m, &src, 0);
    assert!(
        s.dev.counters().event_queries - queries >= 4,
        "each layer's upload is asked about when it is first acquired"
    );
    // A layer uploaded by its own first acquire was seen done by that
    // acquire's wait, which does not note it: the second acquire asks once more.
    pass(&s, m, &src, 0);
    let (waits, queries) = (
        s.dev.counters().stream_waits,
        s.dev.counters().event_queries,
    );
    // `pass` checks every layer's bytes on the compute stream.
    pass(&s, m, &src, 0);
    assert_eq!(
        (
            s.dev.counters().stream_waits,
            s.dev.counters().event_queries
        ),
        (waits, queries),
        "no wait for done uploads, and no query for uploads seen done"
    );
    // Sequential: every layer is uploaded again each pass, so each
    // acquire asks about its new upload (one query if it is done, two if
    // not: the check, then the wait's own).
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 1, 64, None));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    pass(&s, m, &src, 0);
    let queries = s.dev.counters().event_queries;
    assert!(
        pass(&s, m, &src, 0) >= 4 * 2 * PAGE as u64,
        "every layer uploaded again"
    );
    let asked = s.dev.counters().event_queries - queries;
    assert!(
        (4..=8).contains(&asked),
        "{asked} queries for 4 fresh uploads"
    );
    // Uploads still crossing a slow link (8 KiB layers at 100 kB/s: about
    // 80 ms each) when the first layer is acquired: that acquire waits, once.
    let dev = HostDevice::new(HostConfig {
        capacity: 64 << 20,
        page_size: PAGE,
        link_gbps: Some(0.0001),
    })
    .unwrap();
    let s = setup_on(
        Arc::new(dev),
        cfg(Mode::Balanced, Policy::Planned, 1, 64, None),
    );
    let m = s.rt.load(desc, src.clone()).unwrap();
    let waits = s.dev.counters().stream_waits;
    let g =
        s.rt.acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    // Still in flight now, so it was when the acquire looked.
    assert!(
        !s.dev.event_query(g.ready_event()).unwrap(),
        "the slow link left layer 0's upload in flight"
    );
    assert_eq!(
        s.dev.counters().stream_waits - waits,
        1,
        "one wait, for the upload in flight"
    );
    drop(g);
    pass(&s, m, &src, 0);
}
