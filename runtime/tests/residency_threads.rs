//! Several engine threads acquiring layers of two models at once under a
//! budget of a few layers: no deadlock (a watchdog fails the test), no wrong
//! byte, no leaked page.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{model, uniform, PAGE};
use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice};
use offload_runtime::residency::{HostPolicy, LayerId, Mode, Policy, Runtime, RuntimeConfig};
use offload_runtime::Error;

fn stress(mode: Mode, policy: Policy, host_policy: HostPolicy) {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 << 20,
            page_size: PAGE,
            link_gbps: Some(2.0),
        })
        .unwrap(),
    );
    let compute = dev.create_stream().unwrap();
    // Two models of 6 layers of 2 pages and one of 3; the device holds 14 pages.
    let (desc_a, src_a) = model(&[uniform(6, 2 * PAGE)]);
    let (desc_b, src_b) = model(&[vec![vec![PAGE, 100]; 3], uniform(4, 2 * PAGE)]);
    let cfg = RuntimeConfig {
        mode: Some(mode),
        policy,
        prefetch_depth: 1,
        device_memory: Some(14 * PAGE),
        high_watermark: Some(8 * PAGE),
        low_watermark: Some(0),
        host_policy,
        wait_timeout: Duration::from_secs(10),
        ..RuntimeConfig::default()
    };
    let rt = Arc::new(Runtime::new(dev.clone(), compute, cfg).unwrap());
    let a = rt.load(desc_a, src_a.clone()).unwrap();
    let b = rt.load(desc_b, src_b.clone()).unwrap();
    let jobs = [
        (a, 0, src_a.clone()),
        (a, 0, src_a),
        (b, 0, src_b.clone()),
        (b, 1, src_b),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for (t, (m, c, src)) in jobs.into_iter().enumerate() {
        let (rt, dev, tx) = (rt.clone(), dev.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            // Each thread reads back on its own stream after the compute stream's wait.
            let mine = dev.create_stream().unwrap();
            let mut checked = 0usize;
            let mut busy = 0usize;
            for pass in 0..12 {
                for l in 0..src.data[c].len() {
                    let id = LayerId {
                        model: m,
                        component: c,
                        layer: l,
                    };
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let g = loop {
                        match rt.acquire(id) {
                            Ok(g) => break g,
                            // Other threads hold every slot, or the memory another component
                            // needs, for a moment: try again.
                            Err(e)
                                if (matches!(e, Error::AllInUse { .. })
                                    || e.is_retryable_oom())
                                    && Instant::now() < deadline =>
                            {
                                busy += 1;
                                std::thread::sleep(Duration::from_micros(200));
                            }
                            Err(e) => panic!("thread {t} pass {pass} layer {l}: {e}"),
                        }
                    };
                    dev.stream_wait_event(mine, g.ready_event()).unwrap();
                    for (i, v) in g.tensors().enumerate() {
                        let mut back = vec![0u8; v.bytes];
                        dev.read_blocking(v.ptr, &mut back, mine).unwrap();
                        assert!(
                            back == src.data[c][l][i],
                            "thread {t}: tensor {} differs",
                            v.name
                        );
                        checked += v.bytes;
                    }
                    drop(g);
                }
            }
            let _ = tx.send((t, checked, busy));
        }));
    }
    drop(tx);
    let mut total = 0;
    for _ in 0..4 {
        let (_, checked, _) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("an engine thread hung or panicked (deadlock?)");
        total += checked;
    }
    // Each thread has reported; joining also drops its handle on the runtime.
    for h in handles {
        h.join().expect("engine thread");
    }
    // 12 passes × (2 × 6 × 2 pages + 3 × (PAGE + 100) + 4 × 2 pages)
    assert_eq!(total, 12 * (2 * 12 * PAGE + 3 * (PAGE + 100) + 8 * PAGE));
    rt.synchronize().unwrap();
    let st = rt.stats();
    assert_eq!(st.bytes_h2d, dev.counters().bytes_h2d);
    assert!(st.peak_device_bytes <= 14 * PAGE);
    drop(rt);
    let c = dev.counters();
    assert_eq!((c.pages_allocated, c.pages_mapped), (0, 0), "leaked pages");
}

#[test]
fn threads_share_a_tiny_budget_sequential_planned() {
    stress(Mode::Sequential, Policy::Planned, HostPolicy::Pinned);
}

#[test]
fn threads_share_a_tiny_budget_balanced_lru_staged() {
    stress(
        Mode::Balanced,
        Policy::Lru,
        HostPolicy::Staged {
            buffers: 3,
            buffer_bytes: PAGE,
            threads: 2,
        },
    );
}

#[test]
fn threads_share_a_tiny_budget_model_mode() {
    stress(Mode::Model, Policy::Planned, HostPolicy::Pinned);
}
