//! The whole runtime on a device without the virtual memory API
//! ([`HostDevice::without_vmm`], as a GPU where the CUDA one is unavailable):
//! the arena makes every allocation one plain device allocation, and every
//! mode moves exactly the bytes it moves on a device that maps pages (the
//! figures of `residency.rs`), every acquired tensor reads back as its
//! source, no page is ever mapped, streaming reuses its allocations across
//! passes, LoRA merges run on that memory, and dropping the runtime frees
//! every device allocation.

use std::sync::Arc;

use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice};
use offload_runtime::lora::LoraMode;
use offload_runtime::residency::{HostPolicy, LayerId, Mode, ModelId, Policy, RuntimeConfig};
use offload_runtime::Error;

mod common;

use common::lora::{bindings, check, f16_model, Kind, Set};
use common::{cfg, model, setup_on, uniform, MemSource, Setup, PAGE};

fn device() -> Arc<HostDevice> {
    Arc::new(
        HostDevice::without_vmm(HostConfig {
            capacity: 64 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    )
}

fn setup(cfg: RuntimeConfig) -> Setup {
    let dev = device();
    assert!(!dev.maps_pages());
    setup_on(dev, cfg)
}

/// The device has mapped nothing, and holds in plain allocations exactly
/// the pages the runtime's arena holds.
fn nothing_mapped(s: &Setup) {
    let c = s.dev.counters();
    assert_eq!(
        (
            c.pages_mapped,
            c.ranges_reserved,
            c.map_calls,
            c.unmap_calls
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(c.contiguous_bytes, s.rt.arena().pages_held() * PAGE);
    assert_eq!(c.pages_allocated, s.rt.arena().pages_held());
}

/// [`common::pass`], then: nothing mapped.
fn pass(s: &Setup, m: ModelId, src: &MemSource, c: usize) -> u64 {
    let moved = common::pass(s, m, src, c);
    nothing_mapped(s);
    moved
}

#[test]
fn sequential_moves_every_layer_every_pass_through_plain_allocations() {
    let sizes = [10_000, 30_000, 20_000, 5_000, 25_000];
    let (desc, src) = model(&[sizes.iter().map(|&n| vec![n]).collect()]);
    let s = setup(cfg(Mode::Sequential, Policy::Planned, 2, 256, None));
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0), 90_000, "pass 1: every layer once");
    assert_eq!(pass(&s, m, &src, 0), 110_000, "and two layers of pass 3");
    for _ in 0..3 {
        assert_eq!(pass(&s, m, &src, 0), 90_000);
    }
    assert_eq!(
        s.rt.plan_of(m, 0).unwrap(),
        Some((vec![false; 5], 3, 8 * PAGE)),
        "three slots of the largest layer's pages"
    );
    let st = s.rt.stats();
    assert_eq!(st.peak_device_bytes, 3 * 8 * PAGE);
    assert_eq!(st.bytes_h2d, s.dev.counters().bytes_h2d);
    // The ring: three 8-page allocations, nothing else.
    let c = s.dev.counters();
    assert_eq!(
        (c.contiguous_allocations, c.contiguous_bytes),
        (3, 3 * 8 * PAGE)
    );
}

#[test]
fn balanced_planned_and_lru_move_what_they_move_with_page_mapping() {
    // Denoiser: 8 layers of 4 pages (D = 32 pages); high watermark 24 pages; depth 1.
    let layer = 4 * PAGE;
    let d = 8 * layer;
    let (desc, src) = model(&[uniform(8, layer)]);

    let s = setup(cfg(Mode::Balanced, Policy::Planned, 1, 64, Some(24)));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0) as usize, d, "first pass: everything");
    assert_eq!(
        s.rt.plan_of(m, 0).unwrap().unwrap(),
        (
            vec![true, true, true, true, false, false, false, false],
            2,
            layer
        )
    );
    assert_eq!(pass(&s, m, &src, 0) as usize, 5 * layer);
    for _ in 0..3 {
        assert_eq!(
            pass(&s, m, &src, 0) as usize,
            4 * layer,
            "the streamed four"
        );
    }
    assert!(s.rt.stats().peak_device_bytes <= 24 * PAGE);

    let s = setup(cfg(Mode::Balanced, Policy::Lru, 1, 64, Some(24)));
    let m = s.rt.load(desc, src.clone()).unwrap();
    assert_eq!(pass(&s, m, &src, 0) as usize, d);
    assert_eq!(pass(&s, m, &src, 0) as usize, d + layer);
    for _ in 0..3 {
        assert_eq!(pass(&s, m, &src, 0) as usize, d, "LRU moves all of D");
    }
    assert!(s.rt.stats().peak_device_bytes <= 24 * PAGE);
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
    assert_eq!(s.rt.stats().evictions, 8, "two whole components offloaded");
}

#[test]
fn mode_none_uploads_at_load_and_a_refused_model_leaves_nothing() {
    let (desc, src) = model(&[uniform(3, 2 * PAGE), uniform(2, 5 * PAGE)]);
    let s = setup(cfg(Mode::None, Policy::Planned, 2, 64, None));
    let m = s.rt.load(desc.clone(), src.clone()).unwrap();
    assert_eq!(s.rt.stats().bytes_h2d, 16 * PAGE as u64);
    assert_eq!(pass(&s, m, &src, 0) + pass(&s, m, &src, 1), 0);
    // One device allocation per layer.
    assert_eq!(s.dev.counters().contiguous_allocations, 5);

    let s = setup(cfg(Mode::None, Policy::Planned, 2, 15, None));
    match s.rt.load(desc, src).unwrap_err() {
        Error::DoesNotFit {
            needed, available, ..
        } => assert_eq!((needed, available), (16 * PAGE, 15 * PAGE)),
        other => panic!("{other}"),
    }
    assert_eq!(s.dev.counters().contiguous_allocations, 0);
    assert_eq!(s.rt.stats().host_bytes, 0);
}

#[test]
fn streaming_reuses_its_allocations_across_passes() {
    for mode in [Mode::Sequential, Mode::Balanced] {
        let (desc, src) = model(&[uniform(8, 4 * PAGE)]);
        let s = setup(cfg(mode, Policy::Planned, 1, 64, Some(24)));
        let m = s.rt.load(desc, src.clone()).unwrap();
        pass(&s, m, &src, 0);
        pass(&s, m, &src, 0);
        let calls = s.dev.counters().contiguous_calls;
        let moved: u64 = (0..4).map(|_| pass(&s, m, &src, 0)).sum();
        assert!(moved > 0, "{mode}: layers stream");
        assert_eq!(
            s.dev.counters().contiguous_calls,
            calls,
            "{mode}: streaming allocated device memory again"
        );
    }
}

#[test]
fn staged_uploads_land_in_plain_allocations() {
    let (desc, src) = model(&[vec![
        vec![3 * PAGE, 100],
        vec![9 * PAGE + 5],
        vec![PAGE],
        vec![2 * PAGE],
    ]]);
    let mut c = cfg(Mode::Sequential, Policy::Planned, 1, 64, None);
    c.host_policy = HostPolicy::Staged {
        buffers: 2,
        buffer_bytes: 2 * PAGE,
        threads: 2,
        fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
        write_combined: false,
    };
    let s = setup(c);
    let m = s.rt.load(desc, src.clone()).unwrap();
    let total: u64 = (3 * PAGE + 100 + 9 * PAGE + 5 + PAGE + 2 * PAGE) as u64;
    assert_eq!(pass(&s, m, &src, 0), total);
    assert_eq!(pass(&s, m, &src, 0), total + 3 * PAGE as u64 + 100);
    for _ in 0..2 {
        assert_eq!(pass(&s, m, &src, 0), total);
    }
    assert_eq!(s.rt.stats().bytes_h2d, s.dev.counters().bytes_h2d);
}

#[test]
fn lora_merges_run_on_plain_allocations() {
    const LAYERS: usize = 6;
    let layer: Vec<Vec<usize>> = vec![vec![64, 48], vec![32, 48], vec![64]];
    let (desc, w) = f16_model("no-vmm", 1, &[vec![layer; LAYERS]]);
    let targets = |layers: &[usize], t: usize| -> Vec<(usize, usize, usize)> {
        layers.iter().map(|&l| (0, l, t)).collect()
    };
    let a = common::lora::lora(1, &desc, &targets(&[0, 2, 3, 5], 0), Kind::LowRank(8));
    let b = common::lora::lora(2, &desc, &targets(&[1, 4], 1), Kind::LoHa(4));
    let set: Set = vec![(a, 0.8), (b, -0.5)];
    for (mode, pages) in [(Mode::None, 64), (Mode::Sequential, 16)] {
        let mut c = cfg(mode, Policy::Planned, 1, pages, Some(pages / 2));
        c.lora_mode = LoraMode::FuseOnUpload;
        let s = setup(c);
        let m = s.rt.load(desc.clone(), w.clone()).unwrap();
        let check_pass = |set: &Set| {
            for l in 0..LAYERS {
                let g =
                    s.rt.acquire(LayerId {
                        model: m,
                        component: 0,
                        layer: l,
                    })
                    .unwrap();
                for (t, view) in g.tensors().enumerate() {
                    let mut back = vec![0u8; view.bytes];
                    s.dev.read_blocking(view.ptr, &mut back, s.compute).unwrap();
                    if let Err(e) = check(&desc, &w, set, (0, l, t), &back) {
                        panic!("{mode}: {}: {e}", view.name);
                    }
                }
                drop(g);
            }
            s.rt.synchronize().unwrap();
            nothing_mapped(&s);
        };
        check_pass(&vec![]);
        let r = s.rt.set_loras(m, &bindings(&set)).unwrap();
        assert_eq!(r.tensors_patched, 6, "{mode}");
        for _ in 0..2 {
            check_pass(&set);
        }
        assert!(s.rt.stats().lora_device_bytes > 0);
        // Removing the set gives the file's bytes back, bit for bit.
        s.rt.set_loras(m, &[]).unwrap();
        check_pass(&vec![]);
        assert_eq!(s.rt.stats().lora_device_bytes, 0);
    }
}

#[test]
fn dropping_the_runtime_frees_every_device_allocation() {
    let (desc, src) = model(&[uniform(5, 3 * PAGE), uniform(3, PAGE)]);
    let dev;
    {
        let s = setup(cfg(Mode::Balanced, Policy::Planned, 2, 64, Some(20)));
        dev = s.dev.clone();
        let m = s.rt.load(desc, src.clone()).unwrap();
        pass(&s, m, &src, 0);
        pass(&s, m, &src, 1);
        assert!(dev.counters().contiguous_allocations > 0);
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
    assert_eq!(dev.memory().unwrap().free, 64 << 20);
}
