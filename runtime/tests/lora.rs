//! LoRA sets on the host backend, in every LoRA mode and offload mode: the
//! bytes the compute stream sees against a plain f64 reference merge (and,
//! exactly, against the CPU merge of the pristine bytes), hot swaps that
//! re-derive only what changed, restores that are bit-identical to the
//! file, host memory per mode, and bad sets that change nothing.
//!
//! With the `cuda` feature, `lora_flows_pass_on_the_fake_cuda_driver` runs
//! the flows built on [`setup`] again on the CUDA backend over
//! `offload-fakecuda` (a CUDA driver that runs on the CPU, with 4 KiB pages
//! and the merge kernels run from their launch parameters): the same
//! runtime code with device merges on the merge stream, events and
//! timing events in place of the host backend's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice, MergeDelta, StreamId};
use offload_runtime::lora::LoraMode;
use offload_runtime::model::ModelDesc;
use offload_runtime::residency::{
    HostPolicy, LayerId, Mode, ModelId, Policy, Runtime, RuntimeConfig,
};
use offload_runtime::Error;

mod common;

use common::lora::{bindings, check, f16_model, Factors, Kind, Lora, Set};
use common::MemSource;

const PAGE: usize = 4096;
/// Tensors per layer: a patched weight [64, 48], a second weight [32, 48], a bias.
const SHAPES: [&[usize]; 3] = [&[64, 48], &[32, 48], &[64]];
const LAYERS: usize = 6;

/// The test model: one component of `LAYERS` layers of `SHAPES` f16 tensors.
fn model() -> (ModelDesc, Arc<MemSource>) {
    let layer: Vec<Vec<usize>> = SHAPES.iter().map(|s| s.to_vec()).collect();
    f16_model("lora-test", 1, &[vec![layer; LAYERS]])
}

/// A LoRA named `lora{seed}` over tensor `t` of each layer in `layers`.
fn lora(seed: u64, layers: &[usize], t: usize, kind: Kind) -> Lora {
    let targets: Vec<_> = layers.iter().map(|&l| (0, l, t)).collect();
    common::lora::lora(seed, &model().0, &targets, kind)
}

struct Setup {
    dev: Arc<dyn Device>,
    compute: StreamId,
    rt: Runtime,
    desc: ModelDesc,
    w: Arc<MemSource>,
    m: ModelId,
}

fn setup(mode: Mode, pages: usize, policy: HostPolicy, lora_mode: LoraMode) -> Setup {
    setup_with(mode, pages, policy, lora_mode, |_| {})
}

/// [`setup`], with `tweak` applied to the runtime's configuration.
fn setup_with(
    mode: Mode,
    pages: usize,
    policy: HostPolicy,
    lora_mode: LoraMode,
    tweak: impl FnOnce(&mut RuntimeConfig),
) -> Setup {
    let dev = device();
    let compute = dev.create_stream().unwrap();
    let mut cfg = RuntimeConfig {
        mode: Some(mode),
        policy: Policy::Planned,
        prefetch_depth: 1,
        device_memory: Some(pages * PAGE),
        high_watermark: Some(pages * PAGE / 2),
        low_watermark: Some(0),
        host_policy: policy,
        wait_timeout: Duration::from_secs(20),
        lora_mode,
        ..RuntimeConfig::default()
    };
    tweak(&mut cfg);
    let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
    let (desc, w) = model();
    let m = rt.load(desc.clone(), w.clone()).unwrap();
    Setup {
        dev,
        compute,
        rt,
        desc,
        w,
        m,
    }
}

/// Set to `cuda` in the child process of
/// `lora_flows_pass_on_the_fake_cuda_driver`: [`setup`] opens the CUDA
/// backend instead of the host backend.
const DEVICE_ENV: &str = "OFFLOAD_TEST_LORA_DEVICE";

/// The device [`setup`] runs on: the host backend with 4 KiB pages, or the
/// CUDA backend when [`DEVICE_ENV`] says `cuda` (its page is the driver's
/// granularity, which the fake driver is told is 4 KiB).
fn device() -> Arc<dyn Device> {
    match std::env::var(DEVICE_ENV).as_deref() {
        #[cfg(feature = "cuda")]
        Ok("cuda") => {
            let d = offload_runtime::device::cuda::CudaDevice::new(0).unwrap();
            assert_eq!(d.info().page_size, PAGE, "the fake driver's granularity");
            Arc::new(d)
        }
        Ok(other) => panic!("{DEVICE_ENV}={other:?}: only `cuda`, with the cuda feature"),
        Err(_) => host_device(),
    }
}

/// The host backend the tests run on: 16 MiB of 4 KiB pages, no link limit.
fn host_device() -> Arc<HostDevice> {
    Arc::new(
        HostDevice::new(HostConfig {
            capacity: 16 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    )
}

/// The test model loaded under `cfg` on the host backend, whatever
/// `OFFLOAD_TEST_DEVICE` says, with the device kept for its counters.
fn setup_on_host(cfg: RuntimeConfig) -> (Arc<HostDevice>, Setup) {
    let host = host_device();
    let dev: Arc<dyn Device> = host.clone();
    let compute = dev.create_stream().unwrap();
    let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
    let (desc, w) = model();
    let m = rt.load(desc.clone(), w.clone()).unwrap();
    let s = Setup {
        dev,
        compute,
        rt,
        desc,
        w,
        m,
    };
    (host, s)
}

/// The tests of this file built on [`setup`], again on the CUDA backend
/// over `offload-fakecuda`, in a child process of this test binary: once as
/// fast as the CPU goes and once with every stream operation 200 µs late,
/// both with the fake's leak check (a context that ends with anything
/// still allocated aborts).
#[cfg(feature = "cuda")]
#[test]
fn lora_flows_pass_on_the_fake_cuda_driver() {
    const FLOWS: [&str; 12] = [
        "fuse_on_upload_matches_the_reference_in_every_offload_mode",
        "factors_dropped_under_queued_work_are_freed_after_it",
        "a_hot_swap_moves_only_the_tensors_it_changes_and_an_empty_set_restores_the_file",
        "unfused_hands_the_factors_and_keeps_the_weights_pristine",
        "backup_and_fuse_fuse_the_host_copy_and_differ_in_host_memory",
        "backup_and_fuse_need_the_pinned_policy",
        "the_mode_changes_between_passes",
        "a_bad_set_is_an_error_that_changes_nothing",
        "factors_that_cannot_fit_beside_the_ring_fail_at_set_loras",
        "an_acquire_during_set_loras_waits_and_sees_the_new_set",
        "the_timeline_shows_merges_apart_from_uploads",
        "the_staged_timeline_shows_merges_apart_from_staging",
    ];
    let src = include_str!("lora.rs");
    // Every test built on setup is in the list (and nothing else is).
    let on_setup = src
        .split("#[test]\nfn ")
        .skip(1)
        .filter(|t| !t.starts_with("lora_flows_pass_on_the_fake_cuda_driver"))
        .filter(|t| {
            let body = t.split("\n}\n").next().unwrap_or_default();
            ["setup(", "setup_with(", "check_merges_in_timeline("]
                .iter()
                .any(|f| body.contains(f))
        })
        .count();
    assert_eq!(
        on_setup,
        FLOWS.len(),
        "FLOWS is not every test built on setup"
    );
    let mut args = vec!["--exact", "--test-threads=2"];
    args.extend(FLOWS);
    let env = [
        (DEVICE_ENV, "cuda"),
        ("OFFLOAD_FAKECUDA_GRANULARITY_KIB", "4"),
    ];
    if let Err(e) =
        offload_fakecuda::rerun_tests_on_the_fake("lora", &args, &env, &["0", "200"], FLOWS.len())
    {
        panic!("the LoRA flows on the fake driver: {e}");
    }
}

fn staged() -> HostPolicy {
    HostPolicy::Staged {
        buffers: 3,
        buffer_bytes: 8192,
        threads: 2,
        fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
        write_combined: false,
    }
}

/// One pass over every layer: each tensor as the compute stream sees it
/// must be the file's bytes where `set` patches nothing, else within the
/// tolerance of the f64 reference, element by element: |got − ref| ≤
/// 2⁻¹⁰·(|W| + Σ|s|·|B|·|A|) (one f16 unit in the last place), never NaN.
fn pass(s: &Setup, set: &Set) {
    for l in 0..LAYERS {
        let g =
            s.rt.acquire(LayerId {
                model: s.m,
                component: 0,
                layer: l,
            })
            .unwrap();
        for (t, view) in g.tensors().enumerate() {
            let mut back = vec![0u8; view.bytes];
            s.dev.read_blocking(view.ptr, &mut back, s.compute).unwrap();
            if let Err(e) = check(&s.desc, &s.w, set, (0, l, t), &back) {
                panic!("{}: {e}", view.name);
            }
        }
        drop(g);
    }
    s.rt.synchronize().unwrap();
}

/// The device copy of every resident tensor of layer l, as it is now.
fn resident(s: &Setup, l: usize) -> Vec<Vec<u8>> {
    let g =
        s.rt.acquire(LayerId {
            model: s.m,
            component: 0,
            layer: l,
        })
        .unwrap();
    let v = g
        .tensors()
        .map(|view| {
            let mut back = vec![0u8; view.bytes];
            s.dev.read_blocking(view.ptr, &mut back, s.compute).unwrap();
            back
        })
        .collect();
    drop(g);
    v
}

#[test]
fn fuse_on_upload_matches_the_reference_in_every_offload_mode() {
    let a = lora(1, &[0, 2, 3, 5], 0, Kind::LowRank(8));
    let b = lora(2, &[1, 2, 5], 0, Kind::LoHa(4));
    let c = lora(3, &[0, 4], 1, Kind::LoKr);
    let d = lora(4, &[3, 5], 0, Kind::Slice(4));
    let set: Set = vec![(a, 0.8), (b, -0.5), (c, 1.5), (d, 1.0)];
    for (mode, pages) in [
        (Mode::None, 64),
        (Mode::Balanced, 24),
        (Mode::Sequential, 16),
    ] {
        // Pinned uploads queued by the uploader thread (a GPU's default)
        // and by the acquiring thread.
        for (policy, upload_thread) in [
            (HostPolicy::Pinned, true),
            (HostPolicy::Pinned, false),
            (staged(), true),
        ] {
            let is_staged = policy != HostPolicy::Pinned;
            let s = setup_with(mode, pages, policy, LoraMode::FuseOnUpload, |c| {
                c.upload_thread = Some(upload_thread)
            });
            pass(&s, &vec![]);
            let r = s.rt.set_loras(s.m, &bindings(&set)).unwrap();
            // Distinct patched tensors: t0 of layers 0, 1, 2, 3, 5 and t1 of layers 0, 4.
            assert_eq!(r.tensors_changed, 7);
            assert_eq!(r.tensors_patched, 7);
            let before = s.rt.stats();
            for _ in 0..3 {
                pass(&s, &set);
            }
            let st = s.rt.stats().since(&before);
            if mode == Mode::None && !is_staged {
                assert_eq!(
                    st.merges, 0,
                    "resident weights are merged once, at set_loras"
                );
                assert_eq!(r.tensors_rederived, 7);
                assert_eq!(st.bytes_h2d, 0);
            } else if mode == Mode::None {
                // No host copy to re-derive from: the patched layers (all six)
                // were dropped and are merged once, at their next upload.
                assert_eq!(r.layers_dropped, 6);
                assert_eq!(
                    st.merges, 9,
                    "7 tensors, two of them with a full and a sliced group"
                );
            } else {
                assert!(
                    st.merges > 0,
                    "{mode:?}: streamed layers are merged on upload"
                );
            }
            // Removing the set gives the file's bytes back, bit for bit.
            s.rt.set_loras(s.m, &[]).unwrap();
            pass(&s, &vec![]);
            assert_eq!(s.rt.stats().lora_device_bytes, 0);
            s.rt.unload(s.m).unwrap();
            assert_eq!(
                s.rt.arena().pages_used(),
                0,
                "{mode:?}: every page returned"
            );
            let staging = if is_staged { 3 * 8192 } else { 0 };
            assert_eq!(
                s.rt.stats().host_bytes,
                staging,
                "only the staging ring is left"
            );
        }
    }
}

#[test]
fn a_hot_swap_moves_only_the_tensors_it_changes_and_an_empty_set_restores_the_file() {
    let s = setup(Mode::None, 64, HostPolicy::Pinned, LoraMode::FuseOnUpload);
    let a = lora(11, &[0, 1, 2], 0, Kind::LowRank(8));
    let b = lora(12, &[2, 3], 1, Kind::LowRank(16));
    let c = lora(13, &[4], 0, Kind::LoKr);
    let t_bytes = |t: usize| SHAPES[t].iter().product::<usize>() * 2;
    let factor_bytes = |l: &Lora| l.1.data.iter().map(Vec::len).sum::<usize>();

    let set1: Set = vec![(a.clone(), 1.0), (b.clone(), 0.5)];
    let h0 = s.rt.stats().bytes_h2d;
    let r = s.rt.set_loras(s.m, &bindings(&set1)).unwrap();
    // The factors once, and the five patched tensors re-derived in place.
    assert_eq!(
        s.rt.stats().bytes_h2d - h0,
        (factor_bytes(&a) + factor_bytes(&b) + 3 * t_bytes(0) + 2 * t_bytes(1)) as u64
    );
    assert_eq!((r.tensors_changed, r.tensors_rederived), (5, 5));
    pass(&s, &set1);
    let untouched = resident(&s, 5);

    // Same files, a new multiplier for `a`, `b` gone, `c` added: a's three
    // tensors and b's two change, c's one is new; a's factors stay on the device.
    let set2: Set = vec![(a.clone(), -0.75), (c.clone(), 2.0)];
    let h1 = s.rt.stats().bytes_h2d;
    let r = s.rt.set_loras(s.m, &bindings(&set2)).unwrap();
    assert_eq!(
        s.rt.stats().bytes_h2d - h1,
        (factor_bytes(&c) + 4 * t_bytes(0) + 2 * t_bytes(1)) as u64,
        "only c's factors and the six changed tensors move"
    );
    assert_eq!((r.tensors_changed, r.tensors_rederived), (6, 6));
    pass(&s, &set2);
    assert_eq!(
        resident(&s, 5),
        untouched,
        "a layer no LoRA touches is never re-derived"
    );

    // The same set again moves nothing.
    let h2 = s.rt.stats().bytes_h2d;
    let r = s.rt.set_loras(s.m, &bindings(&set2)).unwrap();
    assert_eq!((r.tensors_changed, s.rt.stats().bytes_h2d - h2), (0, 0));

    // Removing everything re-derives the four patched tensors from the host
    // copy: every weight is the file's, bit for bit (never a subtracted delta).
    let h3 = s.rt.stats().bytes_h2d;
    s.rt.set_loras(s.m, &[]).unwrap();
    assert_eq!(s.rt.stats().bytes_h2d - h3, 4 * t_bytes(0) as u64);
    pass(&s, &vec![]);
    assert!(s.rt.loras(s.m).unwrap().is_empty());
    assert_eq!(s.rt.stats().lora_device_bytes, 0);
    assert_eq!(
        s.rt.stats().merges,
        5 + 4,
        "merged at set_loras only: set1's five tensors, set2's four patched ones"
    );
}

#[test]
fn unfused_hands_the_factors_and_keeps_the_weights_pristine() {
    let s = setup(Mode::Balanced, 24, HostPolicy::Pinned, LoraMode::Unfused);
    let a = lora(21, &[0, 3, 5], 0, Kind::LowRank(8));
    let d = lora(22, &[3], 0, Kind::Slice(4));
    let set: Set = vec![(a.clone(), 0.7), (d.clone(), 1.0)];
    let r = s.rt.set_loras(s.m, &bindings(&set)).unwrap();
    assert_eq!(r.tensors_rederived, 0, "weights stay as they are");
    for _ in 0..2 {
        pass(&s, &vec![]);
    }
    for l in 0..LAYERS {
        let g =
            s.rt.acquire(LayerId {
                model: s.m,
                component: 0,
                layer: l,
            })
            .unwrap();
        let ops: Vec<_> = g.lora(0).collect();
        let want = [0, 3, 5].contains(&l) as usize + (l == 3) as usize;
        assert_eq!(ops.len(), want, "layer {l}: one op per row slice");
        for op in ops {
            let scale = if op.rows.is_some() { 0.25 } else { 0.7 / 8.0 };
            assert!((op.adapters[0].scale - scale).abs() < 1e-7);
            for f in op.factors() {
                let mut back = vec![0u8; f.bytes()];
                s.dev.read_blocking(f.ptr, &mut back, s.compute).unwrap();
                assert!(
                    back[..] == f.host[..],
                    "the factor on the device is the file's"
                );
            }
        }
        assert_eq!(g.lora(1).count(), 0);
        drop(g);
    }
    assert_eq!(s.rt.stats().merges, 0);
    // LoHa and LoKr have no low-rank path for the engine.
    let e =
        s.rt.set_loras(
            s.m,
            &bindings(&vec![(lora(23, &[1], 0, Kind::LoHa(2)), 1.0)]),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::Lora { .. }) && e.to_string().contains("unfused"),
        "{e}"
    );
    assert_eq!(s.rt.loras(s.m).unwrap().len(), 2, "the old set stays");
}

/// Unfused: the engine's work queued on the compute stream reads the
/// factors its guard handed out. A set that drops them while that work is
/// still queued (here behind a host function that holds the compute
/// stream) must free their pages only after it: the next set's factors,
/// uploaded meanwhile, must not land under the queued read.
#[test]
fn factors_dropped_under_queued_work_are_freed_after_it() {
    use std::sync::mpsc;
    let s = setup(Mode::None, 64, HostPolicy::Pinned, LoraMode::Unfused);
    let a = lora(91, &[0, 1, 2, 3, 4, 5], 0, Kind::LowRank(8));
    let b = lora(92, &[0, 1, 2, 3, 4, 5], 0, Kind::LowRank(8));
    s.rt.set_loras(s.m, &bindings(&vec![(a, 1.0)])).unwrap();
    let g =
        s.rt.acquire(LayerId {
            model: s.m,
            component: 0,
            layer: 2,
        })
        .unwrap();
    let (up_ptr, up_host) = {
        let op = g.lora(0).next().expect("layer 2 tensor 0 has an adapter");
        let MergeDelta::LowRank { up, .. } = &op.adapters[0].delta else {
            panic!("a low-rank adapter");
        };
        (up.ptr, up.host.to_vec())
    };
    // Hold the compute stream, then queue a read of the factor behind it.
    let (go, wait) = mpsc::channel::<()>();
    s.dev
        .launch_host_fn(
            s.compute,
            Box::new(move || {
                let _ = wait.recv_timeout(Duration::from_secs(10));
            }),
        )
        .unwrap();
    let mut back = s.dev.alloc_pinned(up_host.len()).unwrap();
    // SAFETY: `back` (pinned) outlives the read: the stream is synchronised
    // below before it is read or dropped.
    unsafe {
        s.dev
            .copy_d2h_async(back.as_mut_ptr(), up_ptr, up_host.len(), s.compute)
            .unwrap()
    };
    drop(g);
    // Drop the set, then put another whose factors need pages, while the
    // read still waits.
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let _ = go.send(());
    });
    s.rt.set_loras(s.m, &[]).unwrap();
    s.rt.set_loras(s.m, &bindings(&vec![(b, 1.0)])).unwrap();
    release.join().unwrap();
    s.dev.stream_synchronize(s.compute).unwrap();
    assert!(
        back.as_slice() == &up_host[..],
        "the queued read saw other bytes than the factor it was queued on"
    );
}

#[test]
fn backup_and_fuse_fuse_the_host_copy_and_differ_in_host_memory() {
    let a = lora(31, &[0, 1, 2, 3], 0, Kind::LowRank(8));
    let c = lora(32, &[4], 1, Kind::LoKr);
    let set: Set = vec![(a.clone(), 0.9), (c.clone(), -1.25)];
    let factors: usize = [&a, &c]
        .iter()
        .map(|l| l.1.data.iter().map(Vec::len).sum::<usize>())
        .sum();
    let mut peaks = Vec::new();
    for lora_mode in [LoraMode::Backup, LoraMode::Fuse] {
        let s = setup(Mode::Balanced, 24, HostPolicy::Pinned, lora_mode);
        pass(&s, &vec![]);
        let host0 = s.rt.stats().host_bytes;
        s.rt.reset_peaks();
        let r = s.rt.set_loras(s.m, &bindings(&set)).unwrap();
        assert_eq!(r.host_layers_changed, 5);
        assert_eq!(r.factor_bytes, 0, "no factor goes to the device");
        let before = s.rt.stats();
        for _ in 0..3 {
            pass(&s, &set);
        }
        let st = s.rt.stats().since(&before);
        assert_eq!(
            st.merges, 0,
            "{lora_mode}: streamed layers carry the fused host copy"
        );
        assert!(st.bytes_h2d > 0, "layers stream");
        let grown = s.rt.stats().peak_host_bytes - host0;
        assert!(grown >= factors, "the factors were read: {grown}");
        peaks.push(grown);
        // Backup keeps the five changed layers' originals; fuse nothing (the
        // factors were dropped once fused into the host copy).
        let kept = s.rt.stats().host_bytes - host0;
        if lora_mode == LoraMode::Backup {
            assert!(kept >= 5 * (t_total()), "backup holds five layers: {kept}");
        } else {
            assert_eq!(kept, 0, "fuse holds nothing beyond the model");
        }
        // A new multiplier reads the factors again and fuses from pristine bytes.
        let again: Set = vec![(a.clone(), -0.4), (c.clone(), -1.25)];
        s.rt.set_loras(s.m, &bindings(&again)).unwrap();
        pass(&s, &again);
        s.rt.set_loras(s.m, &[]).unwrap();
        pass(&s, &vec![]);
        assert_eq!(
            s.rt.stats().host_bytes,
            host0,
            "{lora_mode}: everything given back"
        );
    }
    assert!(
        peaks[0] > peaks[1],
        "backup needs more host memory than fuse: {peaks:?}"
    );
}

/// Bytes of one layer's tensors.
fn t_total() -> usize {
    SHAPES.iter().map(|s| s.iter().product::<usize>() * 2).sum()
}

#[test]
fn backup_and_fuse_need_the_pinned_policy() {
    let dev = Arc::new(HostDevice::new(HostConfig::default()).unwrap());
    let compute = dev.create_stream().unwrap();
    let cfg = RuntimeConfig {
        host_policy: staged(),
        lora_mode: LoraMode::Backup,
        ..RuntimeConfig::default()
    };
    let e = Runtime::new(dev.clone(), compute, cfg).unwrap_err();
    assert!(
        matches!(e, Error::Config(_)) && e.to_string().contains("pinned"),
        "{e}"
    );
    let s = setup(Mode::Balanced, 24, staged(), LoraMode::FuseOnUpload);
    let e = s.rt.set_lora_mode(LoraMode::Fuse).unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    assert_eq!(s.rt.lora_mode(), LoraMode::FuseOnUpload);
}

/// A LoRA set that re-derives resident copies records their ready events
/// again: the acquires after it ask the device about each of those copies
/// again (a failed re-derive is caught there), where before it they asked
/// nothing, and see the merged weights.
#[test]
fn a_rederived_copy_is_asked_about_again() {
    let (host, s) = setup_on_host(RuntimeConfig {
        mode: Some(Mode::None),
        device_memory: Some(64 * PAGE),
        host_policy: HostPolicy::Pinned,
        lora_mode: LoraMode::FuseOnUpload,
        ..RuntimeConfig::default()
    });
    // Two passes: every copy has been seen ready, and a third asks nothing.
    pass(&s, &vec![]);
    pass(&s, &vec![]);
    let queries = host.counters().event_queries;
    pass(&s, &vec![]);
    assert_eq!(host.counters().event_queries, queries, "copies seen ready");
    // Three layers re-derived on the device (mode none, pinned).
    let set: Set = vec![(lora(43, &[0, 2, 4], 0, Kind::LowRank(4)), 1.0)];
    let r = s.rt.set_loras(s.m, &bindings(&set)).unwrap();
    assert_eq!(r.tensors_rederived, 3);
    let queries = host.counters().event_queries;
    pass(&s, &set);
    assert_eq!(
        host.counters().event_queries - queries,
        3,
        "one query for each re-derived copy, none for the others"
    );
    let queries = host.counters().event_queries;
    pass(&s, &set);
    assert_eq!(host.counters().event_queries, queries, "seen ready again");
}

/// Fuse-on-upload records a streamed layer's ready event on the merge
/// stream, and its next upload waits on the host for that recording
/// before recording it again; where an acquire has seen it complete, the
/// upload does not wait (on a GPU, a driver call an upload saves).
#[test]
fn an_upload_after_a_seen_merge_does_not_wait_for_it() {
    let (host, s) = setup_on_host(RuntimeConfig {
        mode: Some(Mode::Sequential),
        policy: Policy::Planned,
        prefetch_depth: 1,
        device_memory: Some(16 * PAGE),
        host_policy: HostPolicy::Pinned,
        lora_mode: LoraMode::FuseOnUpload,
        upload_thread: Some(false),
        ..RuntimeConfig::default()
    });
    let (rt, m) = (&s.rt, s.m);
    let set: Set = vec![(lora(47, &[0, 1, 2, 3, 4, 5], 0, Kind::LowRank(4)), 1.0)];
    rt.set_loras(m, &bindings(&set)).unwrap();
    // Host waits inside acquires and releases only, each layer acquired
    // once its upload and merges are over (so that the acquire sees them).
    let pass_waits = || {
        let mut waits = 0;
        for l in 0..LAYERS {
            rt.synchronize().unwrap();
            let before = host.counters().event_waits;
            drop(
                rt.acquire(LayerId {
                    model: m,
                    component: 0,
                    layer: l,
                })
                .unwrap(),
            );
            waits += host.counters().event_waits - before;
        }
        rt.synchronize().unwrap();
        s.dev.stream_synchronize(s.compute).unwrap();
        waits
    };
    let uploads = rt.stats().uploads;
    pass_waits();
    pass_waits();
    assert!(
        rt.stats().uploads - uploads >= 2 * LAYERS as u64,
        "every layer streams"
    );
    assert_eq!(
        pass_waits(),
        0,
        "no upload waits for a merge already seen done"
    );
    rt.unload(m).unwrap();
}

#[test]
fn the_mode_changes_between_passes() {
    let s = setup(
        Mode::Balanced,
        24,
        HostPolicy::Pinned,
        LoraMode::FuseOnUpload,
    );
    let set: Set = vec![(lora(41, &[0, 2, 4, 5], 0, Kind::LowRank(4)), 1.0)];
    s.rt.set_loras(s.m, &bindings(&set)).unwrap();
    pass(&s, &set);
    for mode in [
        LoraMode::Backup,
        LoraMode::Unfused,
        LoraMode::Fuse,
        LoraMode::FuseOnUpload,
    ] {
        s.rt.set_lora_mode(mode).unwrap();
        assert_eq!(s.rt.lora_mode(), mode);
        assert_eq!(s.rt.loras(s.m).unwrap().len(), 1);
        if mode == LoraMode::Unfused {
            pass(&s, &vec![]);
        } else {
            pass(&s, &set);
            pass(&s, &set);
        }
    }
    s.rt.set_loras(s.m, &[]).unwrap();
    pass(&s, &vec![]);
}

#[test]
fn a_bad_set_is_an_error_that_changes_nothing() {
    let s = setup(
        Mode::Balanced,
        24,
        HostPolicy::Pinned,
        LoraMode::FuseOnUpload,
    );
    let good: Set = vec![(lora(51, &[0, 1, 4], 0, Kind::LowRank(8)), 1.0)];
    s.rt.set_loras(s.m, &bindings(&good)).unwrap();
    pass(&s, &good);
    let check = |e: Error, words: &[&str]| {
        let msg = e.to_string();
        assert!(matches!(e, Error::Lora { .. }), "{msg}");
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
        assert_eq!(s.rt.loras(s.m).unwrap().len(), 1);
        pass(&s, &good);
    };
    let other = lora(52, &[2], 0, Kind::LowRank(4));
    for bad in [f32::NAN, f32::INFINITY] {
        let e =
            s.rt.set_loras(s.m, &bindings(&vec![(other.clone(), bad)]))
                .unwrap_err();
        check(e, &["lora52.safetensors", "multiplier"]);
    }
    // A factor of the wrong shape for its target.
    let mut desc = (*other.0).clone();
    desc.factors[1].shape = vec![4, 40];
    let srcs = Arc::new(Factors {
        data: vec![other.1.data[0].clone(), vec![0u8; 4 * 40 * 2]],
        fail: AtomicBool::new(false),
    });
    let e =
        s.rt.set_loras(s.m, &bindings(&vec![((Arc::new(desc), srcs), 1.0)]))
            .unwrap_err();
    check(e, &["lora52_c0_l2_t0", "c0.l2.t0", "40", "48"]);
    // A target the model does not have.
    let mut desc = (*other.0).clone();
    desc.patches[0].layer = 99;
    let e =
        s.rt.set_loras(
            s.m,
            &bindings(&vec![((Arc::new(desc), other.1.clone()), 1.0)]),
        )
        .unwrap_err();
    check(e, &["lora52_c0_l2_t0", "0/99/0"]);
    // A file that cannot be read any more.
    other.1.fail.store(true, Ordering::Relaxed);
    let e =
        s.rt.set_loras(s.m, &bindings(&vec![(other.clone(), 1.0)]))
            .unwrap_err();
    check(e, &["lora52.safetensors", "changed"]);
    // A layer in use.
    let g =
        s.rt.acquire(LayerId {
            model: s.m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    let e = s.rt.set_loras(s.m, &[]).unwrap_err();
    assert!(matches!(e, Error::AllInUse { .. }), "{e}");
    drop(g);
}

#[test]
fn factors_that_cannot_fit_beside_the_ring_fail_at_set_loras() {
    // Sequential, 8 pages: the largest layer needs 3; 6+ pages of factors cannot fit beside it.
    let s = setup(
        Mode::Sequential,
        8,
        HostPolicy::Pinned,
        LoraMode::FuseOnUpload,
    );
    pass(&s, &vec![]);
    let big: Set = vec![(lora(61, &[0, 1, 2, 3, 4, 5], 0, Kind::LowRank(32)), 1.0)];
    let e = s.rt.set_loras(s.m, &bindings(&big)).unwrap_err();
    assert!(matches!(e, Error::DoesNotFit { .. }), "{e}");
    assert!(e.to_string().contains("LoRA set"), "{e}");
    assert!(s.rt.loras(s.m).unwrap().is_empty());
    pass(&s, &vec![]);
    // A small set fits, and the plan shrinks to make room for it.
    let small: Set = vec![(lora(62, &[1, 4], 0, Kind::LowRank(2)), 1.0)];
    s.rt.set_loras(s.m, &bindings(&small)).unwrap();
    for _ in 0..2 {
        pass(&s, &small);
    }
    assert!(s.rt.stats().peak_device_bytes <= 8 * PAGE);
}

/// Factors that make the reader wait at a barrier until the test lets it
/// go, so another thread can act while `set_loras` is under way.
struct Gated {
    inner: Arc<Factors>,
    reached: std::sync::Barrier,
    release: std::sync::Barrier,
    first: AtomicBool,
}

impl offload_runtime::lora::LoraSource for Gated {
    fn read(
        &self,
        factor: usize,
        dst: &mut [u8],
    ) -> Result<(), offload_runtime::model::SourceError> {
        if self.first.swap(false, Ordering::SeqCst) {
            self.reached.wait();
            self.release.wait();
        }
        self.inner.read(factor, dst)
    }
}

#[test]
fn an_acquire_during_set_loras_waits_and_sees_the_new_set() {
    use offload_runtime::lora::LoraBinding;
    let s = Arc::new(setup(
        Mode::None,
        64,
        HostPolicy::Pinned,
        LoraMode::FuseOnUpload,
    ));
    pass(&s, &vec![]);
    let a = lora(71, &[0, 1, 2], 0, Kind::LowRank(8));
    let gated = Arc::new(Gated {
        inner: a.1.clone(),
        reached: std::sync::Barrier::new(2),
        release: std::sync::Barrier::new(2),
        first: AtomicBool::new(true),
    });
    let binding = LoraBinding {
        desc: a.0.clone(),
        source: gated.clone(),
        multiplier: 1.0,
    };
    let setter = {
        let s = s.clone();
        std::thread::spawn(move || s.rt.set_loras(s.m, &[binding]).map(|_| ()))
    };
    // set_loras is reading the factors now, with the model marked.
    gated.reached.wait();
    let reader = {
        let s = s.clone();
        std::thread::spawn(move || {
            let g =
                s.rt.acquire(LayerId {
                    model: s.m,
                    component: 0,
                    layer: 0,
                })
                .unwrap();
            let v = g.tensor(0).unwrap();
            let mut back = vec![0u8; v.bytes];
            s.dev.read_blocking(v.ptr, &mut back, s.compute).unwrap();
            drop(g);
            back
        })
    };
    // The acquire cannot get through while set_loras holds the model.
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !reader.is_finished(),
        "an acquire got a layer whose weights are being changed"
    );
    gated.release.wait();
    setter.join().unwrap().unwrap();
    let back = reader.join().unwrap();
    // What it saw is the new set's weight, never the old one mid-change.
    let set: Set = vec![(a, 1.0)];
    check(&s.desc, &s.w, &set, (0, 0, 0), &back).unwrap();
}

/// Fuse-on-upload merges run on their own stream after each copy. A layer
/// prefetched into a ring slot and displaced before anyone used it leaves
/// no done event behind; its merge, made late here (every kernel waits up
/// to 150 ms), must be over before the next layer's copy lands in the
/// slot, or it would add its delta to that layer's bytes.
#[test]
fn a_late_merge_of_a_displaced_prefetch_never_lands_on_the_next_layer() {
    use offload_runtime::device::fault::{FaultConfig, FaultDevice, FaultRates};
    let host = host_device();
    let dev = Arc::new(FaultDevice::new(
        host.clone(),
        FaultConfig {
            seed: 11,
            rates: FaultRates {
                launch_delay: 1.0,
                ..FaultRates::default()
            },
            max_delay: Duration::from_millis(150),
        },
    ));
    let compute = host.create_stream().unwrap();
    for policy in [HostPolicy::Pinned, staged()] {
        let rt = Runtime::new(
            dev.clone(),
            compute,
            RuntimeConfig {
                mode: Some(Mode::Sequential),
                policy: Policy::Planned,
                prefetch_depth: 1,
                device_memory: Some(16 * PAGE),
                host_policy: policy,
                wait_timeout: Duration::from_secs(20),
                lora_mode: LoraMode::FuseOnUpload,
                ..RuntimeConfig::default()
            },
        )
        .unwrap();
        let (desc, w) = model();
        let m = rt.load(desc.clone(), w.clone()).unwrap();
        let all: Vec<usize> = (0..LAYERS).collect();
        let set: Set = vec![(lora(5, &all, 0, Kind::LowRank(8)), 1.0)];
        rt.set_loras(m, &bindings(&set)).unwrap();
        let layer = |l: usize| LayerId {
            model: m,
            component: 0,
            layer: l,
        };
        let see = |l: usize| {
            let g = rt.acquire(layer(l)).unwrap();
            for (t, view) in g.tensors().enumerate() {
                let mut back = vec![0u8; view.bytes];
                host.read_blocking(view.ptr, &mut back, compute).unwrap();
                if let Err(e) = check(&desc, &w, &set, (0, l, t), &back) {
                    panic!("{policy:?}: {}: {e}", view.name);
                }
            }
        };
        let merges = rt.stats().merges;
        // Layer 0 goes to one slot, layer 1 is prefetched into the other;
        // then layer 4 displaces layer 1, which nobody used.
        see(0);
        let (resident, slots, _) = rt.plan_of(m, 0).unwrap().expect("a streaming plan");
        assert_eq!(slots, 2, "prefetch depth 1: a ring of two slots");
        assert!(resident.iter().all(|r| !r), "every layer streams");
        see(4);
        // And every layer in order after that.
        for l in 0..LAYERS {
            see(l);
        }
        rt.synchronize().unwrap();
        assert!(
            rt.stats().merges - merges >= 3,
            "{policy:?}: layers 0, 1 and 4 were merged on upload"
        );
        rt.unload(m).unwrap();
    }
    assert!(dev.counts().launch_delay > 0);
}

/// One sequential pass of every layer with `patched` carrying a LoRA, on a
/// runtime with the timeline on and host policy `host`: checks that each
/// fuse-on-upload merge is its own `"merge"` entry (on the merge stream),
/// one per `copy_kind` entry (`"upload"`, or `"stage"` for the staged
/// policy, whose stager queues the merges behind the layer's copies) of a
/// patched layer, none for the others, each starting after that layer's
/// copy entry started.
fn check_merges_in_timeline(host: HostPolicy, copy_kind: &str, patched: &[usize]) {
    let s = setup_with(Mode::Sequential, 16, host, LoraMode::FuseOnUpload, |c| {
        c.timeline = true
    });
    let (rt, m) = (&s.rt, s.m);
    let set: Set = vec![(lora(6, patched, 0, Kind::LowRank(4)), 0.5)];
    rt.set_loras(m, &bindings(&set)).unwrap();
    let _ = rt.take_timeline();
    for l in 0..LAYERS {
        drop(
            rt.acquire(LayerId {
                model: m,
                component: 0,
                layer: l,
            })
            .unwrap(),
        );
    }
    rt.synchronize().unwrap();
    let tl = rt.take_timeline();
    let copies: Vec<_> = tl.iter().filter(|e| e.kind == copy_kind).collect();
    let merges: Vec<_> = tl.iter().filter(|e| e.kind == "merge").collect();
    let name = |l: usize| format!("/layer{l}");
    let is_patched = |layer: &str| patched.iter().any(|&l| layer.ends_with(&name(l)));
    let patched_copies = copies.iter().filter(|e| is_patched(&e.layer)).count();
    assert!(patched_copies >= patched.len(), "{copies:?}");
    assert_eq!(merges.len(), patched_copies, "{tl:?}");
    for mg in &merges {
        assert!(
            is_patched(&mg.layer),
            "a merge of an unpatched layer: {mg:?}"
        );
        assert!(
            copies
                .iter()
                .any(|c| c.layer == mg.layer && c.start_s <= mg.start_s),
            "a merge before its layer's {copy_kind}: {mg:?}"
        );
        assert!(mg.bytes > 0 && mg.end_s >= mg.start_s, "{mg:?}");
    }
}

/// The timeline shows each fuse-on-upload merge as its own entry, after
/// its layer's upload started, with the pinned host policy.
#[test]
fn the_timeline_shows_merges_apart_from_uploads() {
    check_merges_in_timeline(HostPolicy::Pinned, "upload", &[1, 2, 4]);
}

/// The same with the staged host policy, where the merges are queued by
/// the stager after a layer's copies.
#[test]
fn the_staged_timeline_shows_merges_apart_from_staging() {
    check_merges_in_timeline(
        HostPolicy::Staged {
            buffers: 4,
            buffer_bytes: PAGE,
            threads: 2,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: false,
        },
        "stage",
        &[0, 3, 5],
    );
}
