//! Resource limits: a model whose host copy does not fit the configured host
//! memory limit is refused at load, with the numbers, before anything is
//! allocated (no host byte, no device page, no upload).

mod common;

use std::sync::Arc;

use common::{model, PAGE};
use offload_runtime::device::{Device, HostConfig, HostDevice};
use offload_runtime::residency::{HostPolicy, Mode, Runtime, RuntimeConfig};
use offload_runtime::Error;

/// Bytes of a layer packed as on the device (tensors 256-byte aligned), at least 1.
fn packed(tensors: &[usize]) -> usize {
    let mut end = 0usize;
    for &t in tensors {
        end = end.next_multiple_of(256) + t;
    }
    end.max(1)
}

fn runtime(limit: usize, host_policy: HostPolicy, mode: Mode) -> (Arc<HostDevice>, Runtime) {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 16 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let compute = dev.create_stream().unwrap();
    let rt = Runtime::new(
        dev.clone(),
        compute,
        RuntimeConfig {
            mode: Some(mode),
            host_policy,
            host_memory_limit: Some(limit),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    (dev, rt)
}

fn layout() -> Vec<Vec<Vec<usize>>> {
    vec![
        vec![vec![1000, 3], vec![PAGE + 1]],
        vec![vec![5 * PAGE, 17, 300]; 3],
    ]
}

#[test]
fn a_model_over_the_host_limit_is_refused_before_anything_is_allocated() {
    let sizes = layout();
    let need: usize = sizes.iter().flatten().map(|l| packed(l)).sum();
    // Mode none would upload everything at load: the refusal comes first.
    for mode in [Mode::None, Mode::Sequential] {
        let (dev, rt) = runtime(need - 1, HostPolicy::Pinned, mode);
        let (desc, src) = model(&sizes);
        match rt.load(desc.clone(), src.clone()) {
            Err(Error::HostMemory {
                what,
                needed,
                limit,
            }) => {
                assert_eq!((needed, limit), (need, need - 1), "{mode}");
                assert!(what.contains("test") && what.contains("pinned"), "{what}");
            }
            other => panic!("{mode}: {other:?}"),
        }
        let e = rt.load(desc.clone(), src.clone()).unwrap_err().to_string();
        assert!(
            e.contains(&need.to_string()) && e.contains(&(need - 1).to_string()),
            "the message gives the numbers: {e}"
        );
        let st = rt.stats();
        assert_eq!(
            (st.peak_host_bytes, st.uploads, st.peak_device_bytes),
            (0, 0, 0),
            "{mode}: allocated before refusing"
        );
        assert_eq!(dev.counters().pages_allocated, 0);
        // At the limit exactly, it loads.
        let (_, rt) = runtime(need, HostPolicy::Pinned, mode);
        rt.load(desc, src).unwrap();
        assert_eq!(rt.stats().host_bytes, need);
    }
}

#[test]
fn the_limit_counts_what_the_runtime_already_holds() {
    let sizes = layout();
    let need: usize = sizes.iter().flatten().map(|l| packed(l)).sum();
    let (_, rt) = runtime(2 * need - 1, HostPolicy::Pinned, Mode::Sequential);
    let (desc, src) = model(&sizes);
    let first = rt.load(desc.clone(), src.clone()).unwrap();
    match rt.load(desc.clone(), src.clone()) {
        Err(Error::HostMemory { needed, limit, .. }) => {
            assert_eq!((needed, limit), (2 * need, 2 * need - 1))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rt.stats().host_bytes,
        need,
        "the refused load holds nothing"
    );
    // Unloading the first makes room for the second.
    rt.unload(first).unwrap();
    rt.load(desc, src).unwrap();
}

#[test]
fn with_the_staged_policy_the_staging_ring_is_what_counts() {
    let ring = 3 * 2 * PAGE;
    let staged = HostPolicy::Staged {
        buffers: 3,
        buffer_bytes: 2 * PAGE,
        threads: 1,
        fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
        write_combined: false,
    };
    // The model's pinned copy would be far above the limit; staged, only the ring is held.
    let (desc, src) = model(&layout());
    let (_, rt) = runtime(ring, staged, Mode::Sequential);
    rt.load(desc.clone(), src.clone()).unwrap();
    assert_eq!(rt.stats().host_bytes, ring);
    let (_, rt) = runtime(ring - 1, staged, Mode::Sequential);
    match rt.load(desc, src) {
        Err(Error::HostMemory {
            what,
            needed,
            limit,
        }) => {
            assert_eq!((needed, limit), (ring, ring - 1));
            assert!(what.contains("staged"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rt.stats().uploads, 0);
}
