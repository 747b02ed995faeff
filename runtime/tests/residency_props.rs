//! Property tests of the residency engine over random layouts, budgets,
//! modes, policies, host policies and acquire orders, on the host backend.
//!
//! For every acquire the test reads each tensor on the compute stream (after
//! the wait the runtime queued) and compares it with the source. Some guards
//! are handed back with an event the test fires late, after a "kernel" that
//! reads the layer through its pointer: if the runtime reused the memory
//! before that event, the kernel sees other bytes and the test fails. After
//! each case: the runtime's byte count equals the device's, peak device use
//! is within the budget, and dropping the runtime returns every page.
//!
//! Every case also runs on a host device without the virtual memory API
//! ([`HostDevice::without_vmm`]), where the arena makes each allocation one
//! plain device allocation: the same promises, and no page ever mapped.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{model, MemSource, PAGE};
use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice};
use offload_runtime::residency::{
    HostPolicy, LayerGuard, LayerId, Mode, Policy, Runtime, RuntimeConfig,
};
use offload_runtime::Error;
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Case {
    layout: Vec<Vec<Vec<usize>>>,
    mode: Mode,
    policy: Policy,
    depth: usize,
    device_pages: usize,
    high_pages: Option<usize>,
    staged: bool,
    /// Passes: component, layer to skip (if any), hold the previous guard, late release.
    passes: Vec<(usize, Option<usize>, bool, bool)>,
}

fn case() -> impl Strategy<Value = Case> {
    let layout = prop::collection::vec(
        prop::collection::vec(prop::collection::vec(1usize..5 * PAGE, 1..4), 1..7),
        1..4,
    );
    (
        layout,
        prop_oneof![
            Just(Mode::None),
            Just(Mode::Model),
            Just(Mode::Balanced),
            Just(Mode::Sequential)
        ],
        prop_oneof![Just(Policy::Lru), Just(Policy::Planned)],
        0usize..4,
        0.2f64..1.6,
        prop::option::of(0.3f64..1.0),
        any::<bool>(),
        prop::collection::vec(
            (
                any::<usize>(),
                any::<Option<usize>>(),
                any::<bool>(),
                any::<bool>(),
            ),
            1..8,
        ),
    )
        .prop_map(
            |(layout, mode, policy, depth, dev_frac, high_frac, staged, passes)| {
                let pages: Vec<usize> = layout
                    .iter()
                    .flat_map(|c| c.iter().map(|l| layer_pages(l)))
                    .collect();
                let total: usize = pages.iter().sum();
                let largest = *pages.iter().max().unwrap();
                let device_pages = ((total as f64 * dev_frac) as usize).max(largest);
                let high_pages = high_frac.map(|f| ((device_pages as f64 * f) as usize).max(1));
                let n = layout.len();
                let passes = passes
                    .into_iter()
                    .map(|(c, skip, hold, late)| {
                        let c = c % n;
                        (c, skip.map(|s| s % layout[c].len()), hold, late)
                    })
                    .collect();
                Case {
                    layout,
                    mode,
                    policy,
                    depth,
                    device_pages,
                    high_pages,
                    staged,
                    passes,
                }
            },
        )
}

/// Pages of a layer whose tensors are packed 256-byte aligned.
fn layer_pages(tensors: &[usize]) -> usize {
    let mut end = 0usize;
    for &t in tensors {
        end = end.next_multiple_of(256) + t;
    }
    end.div_ceil(PAGE).max(1)
}

/// Check a guard's bytes on the compute stream.
fn check(
    dev: &HostDevice,
    compute: offload_runtime::device::StreamId,
    g: &LayerGuard,
    src: &MemSource,
) {
    let id = g.id();
    for (t, v) in g.tensors().enumerate() {
        let mut back = vec![0u8; v.bytes];
        dev.read_blocking(v.ptr, &mut back, compute).unwrap();
        assert!(
            back == src.data[id.component][id.layer][t],
            "tensor {} differs",
            v.name
        );
    }
}

fn run(c: Case, vmm: bool) {
    let config = HostConfig {
        capacity: 64 << 20,
        page_size: PAGE,
        link_gbps: None,
    };
    let dev = Arc::new(if vmm {
        HostDevice::new(config).unwrap()
    } else {
        HostDevice::without_vmm(config).unwrap()
    });
    let compute = dev.create_stream().unwrap();
    let user = dev.create_stream().unwrap();
    let bad_kernels = Arc::new(AtomicUsize::new(0));
    let late_kernels = Arc::new(AtomicUsize::new(0));
    {
        let cfg = RuntimeConfig {
            mode: Some(c.mode),
            policy: c.policy,
            prefetch_depth: c.depth,
            device_memory: Some(c.device_pages * PAGE),
            high_watermark: c.high_pages.map(|p| p * PAGE),
            low_watermark: Some(0),
            host_policy: if c.staged {
                HostPolicy::Staged {
                    buffers: 2,
                    buffer_bytes: 3 * PAGE,
                    threads: 2,
                    fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
                    write_combined: false,
                }
            } else {
                HostPolicy::Pinned
            },
            wait_timeout: Duration::from_secs(20),
            ..RuntimeConfig::default()
        };
        let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
        let (desc, src) = model(&c.layout);
        let all_pages: usize = c
            .layout
            .iter()
            .flat_map(|l| l.iter().map(|t| layer_pages(t)))
            .sum();
        let m = match rt.load(desc, src.clone()) {
            Ok(m) => m,
            Err(Error::DoesNotFit {
                needed, available, ..
            }) => {
                assert_eq!(c.mode, Mode::None);
                assert_eq!(needed, all_pages * PAGE);
                assert!(needed > available);
                assert_eq!(dev.counters().pages_mapped, 0);
                assert_eq!(dev.counters().contiguous_allocations, 0);
                return;
            }
            Err(e) => panic!("load: {e}"),
        };
        for &(ci, skip, hold, late) in &c.passes {
            let mut held: Option<LayerGuard> = None;
            for l in 0..c.layout[ci].len() {
                if Some(l) == skip {
                    continue;
                }
                let id = LayerId {
                    model: m,
                    component: ci,
                    layer: l,
                };
                let g = match rt.acquire(id) {
                    Ok(g) => g,
                    Err(e)
                        if held.is_some()
                            && (matches!(e, Error::AllInUse { .. }) || e.is_retryable_oom()) =>
                    {
                        // Holding the previous layer filled the ring or the memory: let it go and retry.
                        drop(held.take());
                        rt.acquire(id).unwrap_or_else(|e| {
                            panic!("acquire {id:?} with nothing held: {e} in {c:?}")
                        })
                    }
                    Err(Error::BudgetTooSmall {
                        budget,
                        largest_layer,
                    }) => {
                        assert!(largest_layer > budget, "{largest_layer} > {budget}");
                        assert!(c.policy == Policy::Lru || c.mode == Mode::Balanced);
                        break;
                    }
                    Err(Error::DoesNotFit {
                        needed, available, ..
                    }) => {
                        assert!(needed > available);
                        assert!(c.mode == Mode::Model);
                        break;
                    }
                    Err(e) => panic!("acquire {id:?}: {e} in {c:?}"),
                };
                check(&dev, compute, &g, &src);
                if late {
                    // A kernel on another stream that reads the layer late; the
                    // guard goes back with the event recorded after it.
                    let expect: Vec<Vec<u8>> = src.data[ci][l].clone();
                    let views: Vec<(usize, usize)> =
                        g.tensors().map(|v| (v.ptr.0 as usize, v.bytes)).collect();
                    let (bad, ran) = (bad_kernels.clone(), late_kernels.clone());
                    dev.stream_wait_event(user, g.ready_event()).unwrap();
                    dev.launch_host_fn(
                        user,
                        Box::new(move || {
                            std::thread::sleep(Duration::from_millis(2));
                            for ((p, n), e) in views.iter().zip(&expect) {
                                // SAFETY: a host-backend device pointer is a host address; the
                                // runtime keeps it mapped until the event recorded after this runs.
                                let now =
                                    unsafe { std::slice::from_raw_parts(*p as *const u8, *n) };
                                if now != e.as_slice() {
                                    eprintln!("late kernel of layer {l} at {p:#x}: changed");
                                    bad.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            ran.fetch_add(1, Ordering::SeqCst);
                        }),
                    )
                    .unwrap();
                    let done = dev.create_event().unwrap();
                    dev.record_event(done, user).unwrap();
                    rt.release(g, done).unwrap();
                } else if hold {
                    held = Some(g);
                } else {
                    drop(g);
                }
            }
            drop(held);
        }
        dev.stream_synchronize(user).unwrap();
        rt.synchronize().unwrap();
        let st = rt.stats();
        assert_eq!(
            st.bytes_h2d,
            dev.counters().bytes_h2d,
            "runtime and device disagree on bytes moved"
        );
        assert!(st.peak_device_bytes <= c.device_pages * PAGE);
        // Deferred frees whose uploads have run are released at the next look.
        rt.arena().pages_free();
        let dc = dev.counters();
        if vmm {
            assert_eq!(
                rt.stats().device_bytes,
                dc.pages_mapped * PAGE,
                "runtime and device disagree on pages in use"
            );
        } else {
            assert_eq!(
                (dc.pages_mapped, dc.map_calls),
                (0, 0),
                "a device without VMM mapped pages"
            );
            assert_eq!(
                dc.contiguous_bytes,
                rt.arena().pages_held() * PAGE,
                "arena and device disagree on memory held"
            );
            // With the freed blocks the arena keeps given back, the device
            // holds exactly what the runtime says is in use.
            rt.arena().trim();
            assert_eq!(
                rt.stats().device_bytes,
                dev.counters().contiguous_bytes,
                "runtime and device disagree on memory in use"
            );
        }
    }
    assert_eq!(
        bad_kernels.load(Ordering::SeqCst),
        0,
        "a late kernel saw its layer change under it"
    );
    let c2 = dev.counters();
    assert_eq!(
        (
            c2.pages_allocated,
            c2.pages_mapped,
            c2.ranges_reserved,
            c2.contiguous_allocations
        ),
        (0, 0, 0, 0),
        "leak after drop"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_keeps_every_promise(c in case()) {
        run(c, true);
    }

    #[test]
    fn the_engine_keeps_every_promise_without_vmm(c in case()) {
        run(c, false);
    }
}

/// Found by the property test: sequential, depth 3, a ring as large as the device, late releases.
#[test]
fn regression_late_release_in_a_full_ring() {
    let case = Case {
        layout: vec![vec![
            vec![1],
            vec![4609, 6657, 4609],
            vec![1],
            vec![12289],
            vec![8193],
        ]],
        mode: Mode::Sequential,
        policy: Policy::Planned,
        depth: 3,
        device_pages: 20,
        high_pages: None,
        staged: false,
        passes: vec![
            (0, None, false, false),
            (0, None, false, true),
            (0, None, false, false),
        ],
    };
    run(case.clone(), true);
    run(case, false);
}

/// Found by the property test: sequential LRU over two components, staged, a device of 12 pages.
#[test]
fn regression_lru_component_switch() {
    let case = Case {
        layout: vec![
            vec![
                vec![6946, 19149, 12352],
                vec![8840, 499],
                vec![5424, 2921, 14098],
                vec![2671],
            ],
            vec![
                vec![3728, 17548],
                vec![20280, 3363],
                vec![18011, 12016],
                vec![374, 17931],
                vec![17999, 9487, 12985],
            ],
        ],
        mode: Mode::Sequential,
        policy: Policy::Lru,
        depth: 2,
        device_pages: 12,
        high_pages: Some(9),
        staged: true,
        passes: vec![
            (0, Some(0), true, false),
            (0, Some(0), true, true),
            (0, Some(0), false, false),
            (1, None, true, true),
            (0, Some(2), false, false),
            (0, Some(1), false, false),
            (0, Some(0), false, false),
        ],
    };
    run(case.clone(), true);
    run(case, false);
}
