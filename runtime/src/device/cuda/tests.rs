//! Tests of the CUDA backend.
//!
//! The GPU tests construct a [`CudaDevice`] explicitly and fail, never skip,
//! when it cannot be made; they are ignored by default, so on a machine
//! without a GPU they show as ignored, not passed. Run them with
//! `cargo test -p offload-runtime cuda -- --ignored`. The two tests that are
//! not ignored check that a machine without a driver is handled without a panic.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::device::DeviceExt;

/// Whether libcuda can be loaded here (without touching anything that panics).
fn culib_present() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { sys::is_culib_present() }
}

fn gpu() -> CudaDevice {
    CudaDevice::new(0).expect("this test needs a CUDA GPU and CudaDevice::new(0) failed")
}

fn vmm_gpu() -> CudaDevice {
    let d = gpu();
    assert!(
        d.vmm_supported(),
        "the virtual memory API is unavailable here: {:?}",
        d.vmm_unavailable_reason()
    );
    d
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// Reserve `pages` pages and map a fresh page at each; returns the range and the pages.
fn mapped_range(d: &CudaDevice, pages: usize) -> (VirtualRange, Vec<PhysPage>) {
    let ps = d.info().page_size;
    let range = d.reserve(pages * ps).unwrap();
    let phys: Vec<PhysPage> = (0..pages).map(|_| d.alloc_page().unwrap()).collect();
    for (i, p) in phys.iter().enumerate() {
        d.map(range.base.offset(i * ps), *p).unwrap();
    }
    (range, phys)
}

fn unmap_all(d: &CudaDevice, range: VirtualRange, pages: Vec<PhysPage>) {
    let ps = d.info().page_size;
    for i in 0..pages.len() {
        d.unmap(range.base.offset(i * ps)).unwrap();
    }
    d.release(range).unwrap();
    for p in pages {
        d.free_page(p).unwrap();
    }
}

#[test]
fn probe_without_driver_is_an_error_not_a_panic() {
    let r = probe();
    if !culib_present() {
        assert!(matches!(r, Err(ProbeError::NoDriver)), "got {r:?}");
    } else {
        // With a driver library the probe says something else than "no driver".
        assert!(!matches!(r, Err(ProbeError::NoDriver)), "got {r:?}");
    }
}

/// `OFFLOAD_MERGE_KERNEL`: unset, empty, `auto` or `pipelined` keep the
/// default kernels (pipelined tensor-core merges), `tensor-cores` turns them
/// off, anything else is a configuration error naming the variable and the
/// value.
#[test]
fn merge_kernel_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_merge_kernel_var(v.map(OsStr::new));
    for v in [None, Some(""), Some("auto"), Some("pipelined")] {
        let c = with(v).unwrap();
        assert!(c.pipelined_merges && c.use_vmm, "{v:?}");
    }
    assert!(!with(Some("tensor-cores")).unwrap().pipelined_merges);
    for v in ["Pipelined", "tensor_cores", "fma", " pipelined"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(MERGE_KERNEL_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
}

/// `OFFLOAD_MERGE_SMS`: unset or empty for every SM, a whole number of at
/// least 1 for that many; anything else is a configuration error naming
/// the variable and the value.
#[test]
fn merge_sms_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_merge_sms_var(v.map(OsStr::new));
    for v in [None, Some("")] {
        assert_eq!(with(v).unwrap().merge_multiprocessors, None, "{v:?}");
    }
    assert_eq!(with(Some("1")).unwrap().merge_multiprocessors, Some(1));
    assert_eq!(with(Some("66")).unwrap().merge_multiprocessors, Some(66));
    for v in ["0", "-4", "half", " 66", "66 ", "1.5", "4294967296"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(MERGE_SMS_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
    // Both variables apply together.
    let c = CudaConfig::default()
        .with_merge_kernel_var(Some(OsStr::new("tensor-cores")))
        .and_then(|c| c.with_merge_sms_var(Some(OsStr::new("8"))))
        .unwrap();
    assert!(!c.pipelined_merges);
    assert_eq!(c.merge_multiprocessors, Some(8));
}

/// `OFFLOAD_STREAM8`: unset, empty or `registers` for the default ranks-8
/// streaming kernel, `shared` for the one with the down factors in shared
/// memory; anything else is a configuration error naming the variable and
/// the value.
#[test]
fn stream8_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_stream8_var(v.map(OsStr::new));
    assert!(!CudaConfig::default().stream8_shared);
    for v in [None, Some(""), Some("registers")] {
        assert!(!with(v).unwrap().stream8_shared, "{v:?}");
    }
    assert!(with(Some("shared")).unwrap().stream8_shared);
    for v in ["Shared", "smem", " shared", "1"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(STREAM8_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
}

/// `OFFLOAD_PIPE_ROWS`: unset, empty or `64` for the pipelined merge on
/// 64-row tiles, `128` for 128-row tiles; anything else is a
/// configuration error naming the variable and the value.
#[test]
fn pipe_rows_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_pipe_rows_var(v.map(OsStr::new));
    assert!(!CudaConfig::default().pipe_tall);
    for v in [None, Some(""), Some("64")] {
        assert!(!with(v).unwrap().pipe_tall, "{v:?}");
    }
    assert!(with(Some("128")).unwrap().pipe_tall);
    for v in ["256", "tall", " 128", "128 ", "32"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(PIPE_ROWS_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
}

/// `OFFLOAD_MATMUL`: unset, empty or `gemm-ex` for `cublasGemmEx`, `lt`
/// for cuBLASLt; anything else is a configuration error naming the
/// variable and the value.
#[test]
fn matmul_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_matmul_var(v.map(OsStr::new));
    assert_eq!(CudaConfig::default().matmul, MatmulLibrary::GemmEx);
    for v in [None, Some(""), Some("gemm-ex")] {
        assert_eq!(with(v).unwrap().matmul, MatmulLibrary::GemmEx, "{v:?}");
    }
    assert_eq!(with(Some("lt")).unwrap().matmul, MatmulLibrary::Lt);
    for v in ["LT", "cublaslt", " lt", "gemm_ex", "1"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(MATMUL_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
}

#[test]
fn graphs_variable_is_parsed_strictly() {
    use std::ffi::OsStr;
    let with = |v: Option<&str>| CudaConfig::default().with_graphs_var(v.map(OsStr::new));
    assert!(!CudaConfig::default().graphs);
    for v in [None, Some(""), Some("off")] {
        assert!(!with(v).unwrap().graphs, "{v:?}");
    }
    assert!(with(Some("on")).unwrap().graphs);
    for v in ["ON", "1", "true", " on"] {
        let e = with(Some(v)).unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains(GRAPHS_ENV) && m.contains(v)),
            "{v}: {e}"
        );
    }
}

#[test]
fn cuda_device_without_driver_is_an_error_not_a_panic() {
    let r = CudaDevice::new(0);
    if !culib_present() {
        assert!(matches!(r, Err(Error::Unsupported(_))), "got {r:?}");
    } else if probe().is_ok() {
        // A GPU answers the probe: the device opens.
        assert!(r.is_ok(), "got {r:?}");
    }
}

/// The GPU tests of this file, and those of `kernel_tests` that check the
/// merge kernels' and cuBLAS's results (not their speed, nor NVRTC), run in
/// a child process of this test binary whose CUDA driver, cuBLAS, cuBLASLt
/// and NVRTC are `offload-fakecuda` (a driver that runs on the CPU and checks every
/// operation's device memory when its stream runs it, and runs the merge
/// kernels from their launch parameters): the backend's host-side logic
/// (memory modes, VMM mapping, streams, events, host functions, pinned and
/// registered memory, cuBLAS and its conversion kernels, the choice, launch
/// parameters, grids and batching of every merge kernel) on every machine.
/// A GPU run is still what says it works on a GPU: the fake checks nothing
/// of the device code itself.
#[test]
fn gpu_tests_pass_on_the_fake_driver() {
    let kernel_tests = [
        "gpu_matmul_cublas_matches_cpu",
        "gpu_matmul_edge_cases_and_checks",
        "gpu_gemm_accumulate_matches_an_f64_reference",
        "gpu_matmul_scratch_outlives_the_products_queued_on_it",
        "gpu_matmul_through_cublaslt_matches_cpu_and_plans_once",
        "gpu_graphs_of_products_match_their_products_and_are_kept",
        "gpu_merge_lowrank_matches_cpu_merge",
        "gpu_merge_lowrank_rejects_bad_operands",
        "gpu_merge_lowrank_tensor_cores_match_cpu_merge",
        "gpu_merge_lowrank_batch_matches_one_launch_per_tensor",
        "gpu_pipe_tall_matches_pipe_bit_for_bit",
        "gpu_auto_merges_route_by_the_merge_kernel_config",
        "gpu_merge_batch_kernel_matches_one_merge_per_op",
        "gpu_merge_loha_lokr_match_cpu_merge",
        "gpu_merge_general_rejects_bad_operands",
    ]
    .map(|t| format!("device::cuda::kernel_tests::{t}"));
    for t in &kernel_tests {
        let name = t.rsplit("::").next().unwrap_or_default();
        assert!(
            include_str!("kernel_tests.rs").contains(&format!("fn {name}()")),
            "{t} is not a test of kernel_tests.rs"
        );
    }
    // Every ignored test of this file, counted from its source, plus those
    // of kernel_tests.
    let attr = concat!("#[ignore = \"needs a CUDA", " GPU\"]");
    let expected = include_str!("tests.rs").matches(attr).count() + kernel_tests.len();
    assert!(expected >= 28, "counted {expected} tests");
    let mut args = vec!["--ignored", "--test-threads=2", "device::cuda::tests::gpu_"];
    args.extend(kernel_tests.iter().map(String::as_str));
    // Once as fast as the CPU goes, once with every stream operation 200 µs
    // late, so that work is still queued when a missing wait lets the host
    // free or reuse its memory; both times a context that ends with
    // anything still allocated aborts.
    if let Err(e) =
        offload_fakecuda::rerun_tests_on_the_fake("rt", &args, &[], &["0", "200"], expected)
    {
        panic!("the GPU tests on the fake driver: {e}");
    }
    // A cuBLASLt heuristic that finds nothing, which only the fake can be
    // made to do.
    let fallback = "device::cuda::kernel_tests::fake_lt_without_an_algorithm_falls_back_to_gemm_ex";
    if let Err(e) = offload_fakecuda::rerun_tests_on_the_fake(
        "rt-lt",
        &["--ignored", "--exact", fallback],
        &[("OFFLOAD_FAKECUDA_LT_NO_ALGORITHM", "1")],
        &["0"],
        1,
    ) {
        panic!("{fallback} on the fake driver: {e}");
    }
    // A driver that will not capture, which only the fake can be made to be.
    let refused = "device::cuda::kernel_tests::fake_capture_refused_turns_graphs_off";
    if let Err(e) = offload_fakecuda::rerun_tests_on_the_fake(
        "rt-capture",
        &["--ignored", "--exact", refused],
        &[("OFFLOAD_FAKECUDA_NO_CAPTURE", "1")],
        &["0"],
        1,
    ) {
        panic!("{refused} on the fake driver: {e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_facts_and_handle_checks() {
    let d = gpu();
    let info = d.info().clone();
    assert_eq!(info.kind, BackendKind::Cuda);
    assert!(info.page_size.is_power_of_two(), "{info:?}");
    assert!(info.compute_capability.is_some());
    let m = d.memory().unwrap();
    assert!(m.total > 0 && m.free <= m.total, "{m:?}");
    assert!(matches!(
        d.reserve(0),
        Err(Error::BadAddress { .. }) | Err(Error::Unsupported(_))
    ));
    let s = d.create_stream().unwrap();
    d.destroy_stream(s).unwrap();
    assert!(matches!(d.destroy_stream(s), Err(Error::UnknownStream(_))));
    // Priorities, by the driver's own account: a normal stream has the
    // least, a high one the greatest (lower numbers are greater).
    d.ctx.bind().unwrap();
    let (least, greatest) = result::ctx_stream_priority_range().unwrap();
    assert!(greatest <= least, "({least}, {greatest})");
    assert_eq!(d.stream_priority_range().unwrap(), Some((least, greatest)));
    let normal = d
        .create_stream_with_priority(StreamPriority::Normal)
        .unwrap();
    let high = d.create_stream_with_priority(StreamPriority::High).unwrap();
    let prio = |s: StreamId| {
        // SAFETY: both streams are live until destroyed below.
        unsafe { result::stream_get_priority(s.0 as usize as sys::CUstream) }.unwrap()
    };
    assert_eq!((prio(normal), prio(high)), (least, greatest));
    // Both non-blocking (no implicit synchronisation with the legacy stream).
    let flags = |s: StreamId| {
        // SAFETY: as above.
        unsafe { result::stream_get_flags(s.0 as usize as sys::CUstream) }.unwrap()
    };
    let nb = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
    assert_eq!((flags(normal), flags(high)), (nb, nb));
    d.destroy_stream(normal).unwrap();
    d.destroy_stream(high).unwrap();
    assert!(matches!(
        d.stream_synchronize(StreamId(0xdead_0000)),
        Err(Error::UnknownStream(_))
    ));
    let e = d.create_event().unwrap();
    d.destroy_event(e).unwrap();
    assert!(matches!(d.event_query(e), Err(Error::UnknownEvent(_))));
    assert!(matches!(
        d.destroy_event(EventId(8)),
        Err(Error::UnknownEvent(_))
    ));
    assert!(matches!(d.alloc_pinned(0), Err(Error::ZeroSize)));
    assert!(matches!(
        d.alloc_pinned_write_combined(0),
        Err(Error::ZeroSize)
    ));
    let plain = d.alloc_pinned(64).unwrap();
    let wc = d.alloc_pinned_write_combined(64).unwrap();
    assert_eq!((plain.write_combined(), wc.write_combined()), (false, true));
    // What the driver was asked for, by its own account.
    let flags = |b: &PinnedBuffer| result::mem_host_get_flags(b.as_ptr() as *mut _).unwrap();
    assert_eq!(
        (
            flags(&plain) & sys::CU_MEMHOSTALLOC_WRITECOMBINED,
            flags(&wc) & sys::CU_MEMHOSTALLOC_WRITECOMBINED
        ),
        (0, sys::CU_MEMHOSTALLOC_WRITECOMBINED)
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_vmm_map_write_read_back() {
    let d = vmm_gpu();
    let ps = d.info().page_size;
    let s = d.create_stream().unwrap();
    assert!(matches!(d.reserve(ps + 1), Err(Error::BadAddress { .. })));
    let range = d.reserve(3 * ps).unwrap();
    assert_eq!(range.base.0 % ps as u64, 0);
    let a = d.alloc_page().unwrap();
    let b = d.alloc_page().unwrap();
    // Pages in the opposite order of allocation: contiguous in the range only.
    d.map(range.base, b).unwrap();
    d.map(range.base.offset(ps), a).unwrap();
    let data = pattern(2 * ps, 0x5a);
    d.write_blocking(range.base, &data, s).unwrap();
    let mut back = vec![0u8; 2 * ps];
    d.read_blocking(range.base, &mut back, s).unwrap();
    assert!(back == data, "data read back differs");
    // Across the page boundary.
    let mut mid = vec![0u8; 4096];
    d.read_blocking(range.base.offset(ps - 2048), &mut mid, s)
        .unwrap();
    assert_eq!(mid, data[ps - 2048..ps + 2048]);

    // The same checks as the host backend.
    let c = d.alloc_page().unwrap();
    assert!(matches!(
        d.map(range.base, c),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(
        d.map(range.base.offset(2 * ps), a),
        Err(Error::BadPage { .. })
    ));
    assert!(matches!(
        d.map(range.base.offset(2 * ps + 4096), c),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(d.free_page(a), Err(Error::BadPage { .. })));
    assert!(matches!(d.release(range), Err(Error::BadAddress { .. })));
    assert!(matches!(
        d.unmap(range.base.offset(2 * ps)),
        Err(Error::BadAddress { .. })
    ));
    // A copy that touches the unmapped third page is refused, not faulted.
    assert!(matches!(
        d.write_blocking(range.base.offset(2 * ps - 8), &[1u8; 16], s),
        Err(Error::BadAddress { .. })
    ));

    // Unmap, then map page `a` into another range: its bytes survived.
    d.unmap(range.base).unwrap();
    d.unmap(range.base.offset(ps)).unwrap();
    d.release(range).unwrap();
    let other = d.reserve(ps).unwrap();
    d.map(other.base, a).unwrap();
    let mut page = vec![0u8; ps];
    d.read_blocking(other.base, &mut page, s).unwrap();
    assert!(page == data[ps..], "page contents changed across remapping");
    d.unmap(other.base).unwrap();
    d.release(other).unwrap();
    for p in [a, b, c] {
        d.free_page(p).unwrap();
    }
    assert!(matches!(d.free_page(a), Err(Error::BadPage { .. })));
    d.destroy_stream(s).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_fallback_mode_memory_is_plain_allocations() {
    let d = CudaDevice::with_config(
        0,
        &CudaConfig {
            use_vmm: false,
            ..CudaConfig::default()
        },
    )
    .expect("a CUDA GPU");
    assert!(!d.vmm_supported());
    assert!(!d.maps_pages());
    assert_eq!(
        d.vmm_unavailable_reason(),
        Some("disabled by configuration")
    );
    assert!(d.memory_mode_note().contains("disabled by configuration"));
    let ps = d.info().page_size;
    assert!(matches!(d.reserve(ps), Err(Error::Unsupported(_))));
    assert!(matches!(d.alloc_page(), Err(Error::Unsupported(_))));
    assert!(matches!(d.alloc_contiguous(0), Err(Error::ZeroSize)));
    assert!(matches!(
        d.alloc_contiguous(ps + 1),
        Err(Error::BadAddress { .. })
    ));
    let s = d.create_stream().unwrap();
    let sizes = [1usize, 3, 17];
    let blocks: Vec<DevicePtr> = sizes
        .iter()
        .map(|&n| d.alloc_contiguous(n * ps).unwrap())
        .collect();
    for (&n, &b) in sizes.iter().zip(&blocks) {
        assert_eq!(b.0 % ps as u64, 0, "page aligned");
        d.write_blocking(b, &pattern(n * ps, n as u8), s).unwrap();
    }
    for (&n, &b) in sizes.iter().zip(&blocks) {
        let mut back = vec![0u8; n * ps];
        d.read_blocking(b, &mut back, s).unwrap();
        assert!(
            back == pattern(n * ps, n as u8),
            "block of {n} pages differs"
        );
    }
    // Past the end of a block is refused, not faulted.
    assert!(matches!(
        d.write_blocking(blocks[1].offset(3 * ps - 1), &[0u8; 2], s),
        Err(Error::BadAddress { .. })
    ));
    // A kernel across a page boundary of one block.
    d.launch(
        &Kernel::Fill {
            dst: blocks[1].offset(ps - 100),
            len: 200,
            value: 0xab,
        },
        s,
    )
    .unwrap();
    let mut back = vec![0u8; 200];
    d.read_blocking(blocks[1].offset(ps - 100), &mut back, s)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
    for b in &blocks {
        d.free_contiguous(*b).unwrap();
    }
    assert!(lock(&d.mem).blocks.is_empty());
    assert!(matches!(
        d.free_contiguous(blocks[0]),
        Err(Error::BadAddress { .. })
    ));
    assert!(matches!(
        d.write_blocking(blocks[0], &[1], s),
        Err(Error::BadAddress { .. })
    ));
    // More than the GPU has: the device's typed error, not a panic.
    let huge = (d.info().total_memory / ps + 1) * ps;
    assert!(matches!(
        d.alloc_contiguous(huge),
        Err(Error::DeviceOutOfMemory { .. })
    ));
    d.destroy_stream(s).unwrap();
}

/// One component's layers of one tensor each, in memory, for the runtime tests.
struct Layers(Vec<Vec<u8>>);

/// A one-component model of `layers` layers of one `bytes`-byte tensor
/// each, with distinct contents.
fn layer_model(name: &str, layers: usize, bytes: usize) -> (crate::model::ModelDesc, Arc<Layers>) {
    use crate::model::{ComponentDesc, DType, LayerDesc, ModelDesc, Pin, TensorDesc};
    let src = Arc::new(Layers(
        (0..layers).map(|l| pattern(bytes, l as u8 + 10)).collect(),
    ));
    let desc = ModelDesc {
        name: name.into(),
        components: vec![ComponentDesc {
            name: "denoiser".into(),
            pin: Pin::Auto,
            layers: (0..layers)
                .map(|l| LayerDesc {
                    name: format!("layer{l}"),
                    tensors: vec![TensorDesc {
                        name: format!("layer{l}.weight"),
                        dtype: DType::U8,
                        shape: vec![bytes],
                        bytes,
                    }],
                })
                .collect(),
        }],
    };
    (desc, src)
}

impl crate::model::WeightSource for Layers {
    fn read(
        &self,
        component: usize,
        layer: usize,
        tensor: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> std::result::Result<(), crate::model::SourceError> {
        let fail = |message: &str| crate::model::SourceError {
            what: format!("tensor {component}/{layer}/{tensor}"),
            message: message.into(),
        };
        let src = self
            .0
            .get(layer)
            .filter(|_| component == 0 && tensor == 0)
            .ok_or_else(|| fail("no such tensor"))?;
        let end = offset
            .checked_add(dst.len())
            .filter(|&e| e <= src.len())
            .ok_or_else(|| fail("read past the end"))?;
        dst.copy_from_slice(&src[offset..end]);
        Ok(())
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_fallback_arena_and_runtime_keep_every_byte() {
    use crate::arena::{Arena, ArenaConfig, Tag};
    use crate::residency::{LayerId, Mode, Policy, Runtime, RuntimeConfig};

    let d = Arc::new(
        CudaDevice::with_config(
            0,
            &CudaConfig {
                use_vmm: false,
                ..CudaConfig::default()
            },
        )
        .expect("a CUDA GPU"),
    );
    assert!(!d.maps_pages());
    let ps = d.info().page_size;

    // The arena: a multi-page allocation and slab slots, each one plain
    // allocation, read back byte for byte.
    {
        let arena = Arena::new(
            d.clone(),
            ArenaConfig {
                capacity: Some(16 * ps),
            },
        )
        .unwrap();
        let big_len = 3 * ps + 12_345;
        let big = arena.alloc(big_len, Tag(0)).unwrap();
        let small: Vec<_> = (0..5)
            .map(|i| arena.alloc(1000 + i, Tag(1)).unwrap())
            .collect();
        let data = pattern(big_len, 1);
        arena.write(big, 0, &data).unwrap();
        for (i, &id) in small.iter().enumerate() {
            arena.write(id, 0, &pattern(1000 + i, i as u8)).unwrap();
        }
        let mut back = vec![0u8; big_len];
        arena.read(big, 0, &mut back).unwrap();
        assert!(back == data, "the multi-page allocation differs");
        for (i, &id) in small.iter().enumerate() {
            let mut back = vec![0u8; 1000 + i];
            arena.read(id, 0, &mut back).unwrap();
            assert!(back == pattern(1000 + i, i as u8), "slot {i} differs");
        }
        let st = arena.stats();
        assert_eq!(
            (st.pages_used, st.slab_pages, st.live_allocations),
            (5, 1, 6)
        );
        let big_ptr = arena.ptr(big).unwrap();
        arena.free(big).unwrap();
        assert_eq!(arena.stats().pages_pooled, 4);
        // Same page count: the cached allocation comes back.
        let again = arena.alloc(4 * ps, Tag(0)).unwrap();
        assert_eq!(arena.ptr(again).unwrap(), big_ptr);
        assert_eq!(arena.stats().pages_pooled, 0);
        assert!(matches!(
            arena.alloc(12 * ps, Tag(0)),
            Err(Error::OutOfMemory {
                pages: 12,
                free_pages: 11,
                ..
            })
        ));
        for id in small {
            arena.free(id).unwrap();
        }
        arena.free(again).unwrap();
        assert_eq!(arena.trim(), 5);
        assert_eq!(arena.pages_held(), 0);
    }
    assert!(lock(&d.mem).blocks.is_empty(), "the arena freed everything");

    // The runtime, balanced: 8 layers of 4 pages, 24 pages of high
    // watermark, prefetch depth 1; the same figures as on the host backend.
    let layer = 4 * ps;
    let (desc, src) = layer_model("fallback", 8, layer);
    let compute = d.create_stream().unwrap();
    let rt = Runtime::new(
        d.clone(),
        compute,
        RuntimeConfig {
            mode: Some(Mode::Balanced),
            policy: Policy::Planned,
            prefetch_depth: 1,
            device_memory: Some(64 * ps),
            high_watermark: Some(24 * ps),
            low_watermark: Some(0),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    let m = rt.load(desc, src.clone()).unwrap();
    let pass = || -> u64 {
        rt.synchronize().unwrap();
        let before = rt.stats().bytes_h2d;
        for l in 0..8 {
            let g = rt
                .acquire(LayerId {
                    model: m,
                    component: 0,
                    layer: l,
                })
                .unwrap();
            let view = g.tensor(0).unwrap();
            let mut back = vec![0u8; view.bytes];
            // On the compute stream, after the wait the runtime queued.
            d.read_blocking(view.ptr, &mut back, compute).unwrap();
            assert!(back == src.0[l], "layer {l} differs");
            drop(g);
        }
        rt.synchronize().unwrap();
        rt.stats().bytes_h2d - before
    };
    let layer = layer as u64;
    assert_eq!(pass(), 8 * layer, "first pass: everything once");
    assert_eq!(pass(), 5 * layer, "and layer 4 of the next pass");
    for _ in 0..3 {
        assert_eq!(pass(), 4 * layer, "the four streamed layers");
    }
    assert!(rt.stats().peak_device_bytes <= 24 * ps);
    drop(rt);
    d.destroy_stream(compute).unwrap();
    assert!(
        lock(&d.mem).blocks.is_empty(),
        "the runtime freed everything"
    );
}

/// A runtime on `d` whose high watermark holds three of the six layers of
/// [`layer_model`] with `3 * page + 777` bytes each, so a pass evicts and
/// reuses pages; the model loaded. Layer `l` is `LayerId` `(model, 0, l)`.
fn three_layer_budget(
    d: &Arc<CudaDevice>,
    compute: StreamId,
    (mode, policy, prefetch_depth): (crate::residency::Mode, crate::residency::Policy, usize),
    host_policy: crate::residency::HostPolicy,
    model: (crate::model::ModelDesc, Arc<Layers>),
) -> (crate::residency::Runtime, crate::residency::ModelId) {
    use crate::residency::{Runtime, RuntimeConfig};
    let ps = d.info().page_size;
    let rt = Runtime::new(
        d.clone(),
        compute,
        RuntimeConfig {
            mode: Some(mode),
            policy,
            prefetch_depth,
            device_memory: Some(64 * ps),
            high_watermark: Some(12 * ps),
            low_watermark: Some(0),
            host_policy,
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    let m = rt.load(model.0, model.1).unwrap();
    (rt, m)
}

/// The runtime in balanced and sequential mode, with the pinned and the
/// staged host policy (staging buffers smaller than a layer, so each is
/// reused within a pass; in plain and in write-combined pinned memory), driven from a thread that has no current CUDA
/// context: every call must bind the device's context itself. Every layer
/// of every pass is read back on the compute stream and must be the
/// source's bytes; every byte of device and pinned memory goes back at the end.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_runtime_hands_out_every_byte_to_a_thread_without_a_context() {
    use crate::residency::{HostPolicy, LayerId, Mode, Policy};

    let d = Arc::new(vmm_gpu());
    let ps = d.info().page_size;
    let (desc, src) = layer_model("no-context", 6, 3 * ps + 777);
    let policies = [
        HostPolicy::Pinned,
        HostPolicy::Staged {
            buffers: 3,
            buffer_bytes: ps,
            threads: 2,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: false,
        },
        HostPolicy::Staged {
            buffers: 3,
            buffer_bytes: ps,
            threads: 2,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: true,
        },
    ];
    for mode in [Mode::Balanced, Mode::Sequential] {
        for host_policy in policies {
            let (d, desc, src) = (d.clone(), desc.clone(), src.clone());
            std::thread::spawn(move || {
                // SAFETY: null unbinds this thread; nothing of CUDA is in use on it.
                unsafe { result::ctx_set_current(std::ptr::null_mut()) }.unwrap();
                let compute = d.create_stream().unwrap();
                let (rt, m) = three_layer_budget(
                    &d,
                    compute,
                    (mode, Policy::Planned, 2),
                    host_policy,
                    (desc, src.clone()),
                );
                for pass in 0..3 {
                    for l in 0..6 {
                        let id = LayerId {
                            model: m,
                            component: 0,
                            layer: l,
                        };
                        let g = rt.acquire(id).unwrap();
                        let view = g.tensor(0).unwrap();
                        let mut back = vec![0u8; view.bytes];
                        d.read_blocking(view.ptr, &mut back, compute).unwrap();
                        assert!(
                            back == src.0[l],
                            "{mode:?} {host_policy:?} pass {pass} layer {l} differs"
                        );
                    }
                }
                rt.synchronize().unwrap();
                drop(rt);
                d.destroy_stream(compute).unwrap();
            })
            .join()
            .unwrap();
        }
    }
    let mem = lock(&d.mem);
    assert_eq!(
        (mem.pages.len(), mem.ranges.len(), mem.blocks.len()),
        (0, 0, 0),
        "pages, ranges and allocations left"
    );
}

/// Every entry point binds the device's context itself: each call below
/// runs on a thread whose current context was just unset (a thread of the
/// engine's that never used this device, or used another), and the bytes
/// come back right.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_every_call_binds_the_context_itself() {
    let d = Arc::new(vmm_gpu());
    let ps = d.info().page_size;
    let made_here = d.alloc_pinned(4096).unwrap();
    let d2 = d.clone();
    std::thread::spawn(move || {
        let unbind = || {
            // SAFETY: null unbinds this thread; nothing of CUDA is in use on it.
            unsafe { result::ctx_set_current(std::ptr::null_mut()) }.unwrap()
        };
        let d = d2;
        unbind();
        let s = d.create_stream().unwrap();
        unbind();
        let (e, t0, t1) = (
            d.create_event().unwrap(),
            d.create_timing_event().unwrap(),
            d.create_timing_event().unwrap(),
        );
        unbind();
        let range = d.reserve(ps).unwrap();
        let page = d.alloc_page().unwrap();
        d.map(range.base, page).unwrap();
        unbind();
        let block = d.alloc_contiguous(ps).unwrap();
        unbind();
        let mut host = d.alloc_pinned(ps).unwrap();
        host.as_mut_slice().copy_from_slice(&pattern(ps, 9));
        unbind();
        d.record_event(t0, s).unwrap();
        unbind();
        // SAFETY: `host` lives until the stream is synchronised below.
        unsafe { d.copy_h2d_async(range.base, host.as_ptr(), ps, s) }.unwrap();
        unbind();
        d.launch(
            &Kernel::Fill {
                dst: block,
                len: ps,
                value: 0x3c,
            },
            s,
        )
        .unwrap();
        unbind();
        d.record_event(e, s).unwrap();
        unbind();
        d.stream_wait_event(s, e).unwrap();
        unbind();
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        d.launch_host_fn(s, Box::new(move || *r.lock().unwrap() = true))
            .unwrap();
        unbind();
        d.record_event(t1, s).unwrap();
        unbind();
        d.event_wait(t1, Some(Duration::from_secs(10))).unwrap();
        unbind();
        assert!(d.event_query(e).unwrap());
        unbind();
        assert!(d.event_elapsed(t0, t1).unwrap().is_some());
        unbind();
        d.stream_synchronize(s).unwrap();
        assert!(*ran.lock().unwrap());
        unbind();
        let mut back = vec![0u8; ps];
        d.read_blocking(range.base, &mut back, s).unwrap();
        assert!(back == pattern(ps, 9), "the upload differs");
        unbind();
        let mut out = d.alloc_pinned(ps).unwrap();
        unbind();
        // SAFETY: `out` lives until the stream is synchronised below.
        unsafe { d.copy_d2h_async(out.as_mut_ptr(), block, ps, s) }.unwrap();
        unbind();
        d.stream_synchronize(s).unwrap();
        assert!(
            out.as_slice().iter().all(|&b| b == 0x3c),
            "the fill differs"
        );
        unbind();
        d.memory().unwrap();
        for buffer in [host, out, made_here] {
            unbind();
            drop(buffer);
        }
        unbind();
        d.unmap(range.base).unwrap();
        unbind();
        d.release(range).unwrap();
        unbind();
        d.free_page(page).unwrap();
        unbind();
        d.free_contiguous(block).unwrap();
        for ev in [e, t0, t1] {
            unbind();
            d.destroy_event(ev).unwrap();
        }
        unbind();
        d.destroy_stream(s).unwrap();
    })
    .join()
    .unwrap();
}

/// Dropping the device with copies still queued behind a held stream waits
/// for them before it unmaps and frees: the copy into a pinned buffer that
/// outlives the device lands whole.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_drop_waits_for_queued_copies() {
    let d = vmm_gpu();
    let ps = d.info().page_size;
    let s = d.create_stream().unwrap();
    let (range, _pages) = mapped_range(&d, 1);
    let mut src = d.alloc_pinned(ps).unwrap();
    src.as_mut_slice().copy_from_slice(&pattern(ps, 4));
    let mut out = d.alloc_pinned(ps).unwrap();
    out.as_mut_slice().fill(0);
    d.launch_host_fn(
        s,
        Box::new(|| std::thread::sleep(Duration::from_millis(30))),
    )
    .unwrap();
    // SAFETY: both buffers outlive the device, whose drop waits for the stream.
    unsafe {
        d.copy_h2d_async(range.base, src.as_ptr(), ps, s).unwrap();
        d.copy_d2h_async(out.as_mut_ptr(), range.base, ps, s)
            .unwrap();
    }
    drop(d);
    assert!(
        out.as_slice() == pattern(ps, 4),
        "the queued copies did not run whole"
    );
}

/// A layer the engine evicts may still be read by work queued on the
/// compute stream: each layer is copied out asynchronously on the compute
/// stream, held back by a host function, and its guard dropped at once,
/// while a budget of three layers out of six makes the runtime evict and
/// reuse those pages for the next uploads. Every copy must still see its
/// layer's bytes: eviction waits for the users' done events.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_evicted_layers_wait_for_work_still_reading_them() {
    use crate::residency::{HostPolicy, LayerId, Mode, Policy};

    let d = Arc::new(vmm_gpu());
    let layer = 3 * d.info().page_size + 777;
    let (desc, src) = layer_model("readers", 6, layer);
    for (mode, policy) in [
        (Mode::Balanced, Policy::Planned),
        (Mode::Balanced, Policy::Lru),
        (Mode::Sequential, Policy::Planned),
    ] {
        let compute = d.create_stream().unwrap();
        let (rt, m) = three_layer_budget(
            &d,
            compute,
            (mode, policy, 1),
            HostPolicy::Pinned,
            (desc.clone(), src.clone()),
        );
        let mut outs: Vec<_> = (0..6).map(|_| d.alloc_pinned(layer).unwrap()).collect();
        for pass in 0..3 {
            for o in &mut outs {
                o.as_mut_slice().fill(0);
            }
            d.launch_host_fn(
                compute,
                Box::new(|| std::thread::sleep(Duration::from_millis(20))),
            )
            .unwrap();
            for (l, out) in outs.iter_mut().enumerate() {
                let g = rt
                    .acquire(LayerId {
                        model: m,
                        component: 0,
                        layer: l,
                    })
                    .unwrap();
                let view = g.tensor(0).unwrap();
                // SAFETY: `out` lives until the compute stream is synchronised below.
                unsafe { d.copy_d2h_async(out.as_mut_ptr(), view.ptr, view.bytes, compute) }
                    .unwrap();
                drop(g);
            }
            d.stream_synchronize(compute).unwrap();
            for (l, out) in outs.iter().enumerate() {
                assert!(
                    out.as_slice() == src.0[l].as_slice(),
                    "{mode:?} {policy:?} pass {pass}: layer {l} changed under its reader"
                );
            }
        }
        rt.synchronize().unwrap();
        drop(rt);
        drop(outs);
        d.destroy_stream(compute).unwrap();
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_events_query_wait_and_cross_stream_wait() {
    let d = gpu();
    let a = d.create_stream().unwrap();
    let b = d.create_stream().unwrap();
    let e = d.create_event().unwrap();
    let e2 = d.create_event().unwrap();
    // Never recorded: complete.
    assert!(d.event_query(e).unwrap());
    d.event_wait(e, None).unwrap();
    // Hold stream `a` in a host function until we let it go.
    let (tx, rx) = mpsc::channel::<()>();
    d.launch_host_fn(
        a,
        Box::new(move || {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }),
    )
    .unwrap();
    d.record_event(e, a).unwrap();
    assert!(!d.event_query(e).unwrap());
    let t = Instant::now();
    assert!(matches!(
        d.event_wait(e, Some(Duration::from_millis(30))),
        Err(Error::Timeout { .. })
    ));
    assert!(t.elapsed() >= Duration::from_millis(30));
    // Stream `b` waits for `e`, so `e2` recorded after that is pending too.
    d.stream_wait_event(b, e).unwrap();
    d.record_event(e2, b).unwrap();
    assert!(!d.event_query(e2).unwrap());
    tx.send(()).unwrap();
    d.event_wait(e2, Some(Duration::from_secs(10))).unwrap();
    assert!(d.event_query(e).unwrap());
    d.event_wait(e, None).unwrap();
    for ev in [e, e2] {
        d.destroy_event(ev).unwrap();
    }
    d.destroy_stream(a).unwrap();
    d.destroy_stream(b).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_timing_events_measure_a_held_stream() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let (a, b) = (
        d.create_timing_event().unwrap(),
        d.create_timing_event().unwrap(),
    );
    let plain = d.create_event().unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    d.record_event(a, s).unwrap();
    d.launch_host_fn(
        s,
        Box::new(move || {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }),
    )
    .unwrap();
    d.record_event(b, s).unwrap();
    d.record_event(plain, s).unwrap();
    assert_eq!(d.event_elapsed(a, b).unwrap(), None, "`b` is held");
    std::thread::sleep(Duration::from_millis(50));
    tx.send(()).unwrap();
    d.stream_synchronize(s).unwrap();
    let t = d.event_elapsed(a, b).unwrap().unwrap();
    assert!(
        t >= Duration::from_millis(45) && t < Duration::from_secs(30),
        "{t:?}"
    );
    assert!(
        d.event_elapsed(a, plain).is_err(),
        "an event made without timing has no time"
    );
    for e in [a, b, plain] {
        d.destroy_event(e).unwrap();
    }
    d.destroy_stream(s).unwrap();
}

/// The runtime times the compute stream's wait for an upload with timing
/// events on CUDA too: a 256 MiB layer acquired as soon as it is queued
/// (about 5 ms over PCIe gen 5) is waited for, the wait is counted once
/// the stream has passed it, and a checkpoint after it says the same.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_runtime_times_a_wait_for_an_upload() {
    use crate::residency::{LayerId, Mode, Policy, Runtime, RuntimeConfig};
    let d = Arc::new(gpu());
    let bytes = 256 << 20;
    let (desc, src) = layer_model("stall", 2, bytes);
    let compute = d.create_stream().unwrap();
    let rt = Runtime::new(
        d.clone(),
        compute,
        RuntimeConfig {
            mode: Some(Mode::Sequential),
            policy: Policy::Planned,
            prefetch_depth: 1,
            device_memory: Some(4 * bytes),
            ..RuntimeConfig::default()
        },
    )
    .unwrap();
    let m = rt.load(desc, src).unwrap();
    let before = rt.stats().stall_ns;
    let g = rt
        .acquire(LayerId {
            model: m,
            component: 0,
            layer: 0,
        })
        .unwrap();
    drop(g);
    let after = rt.stall_checkpoint();
    d.stream_synchronize(compute).unwrap();
    rt.synchronize().unwrap();
    let st = rt.stats();
    let waited = st.stall_ns - before;
    assert!(
        waited > 100_000 && waited < 10_000_000_000,
        "waited {waited} ns for a 256 MiB upload"
    );
    assert_eq!(after.ns(), Some(st.stall_ns));
    assert_eq!(st.stall_unmeasured, 0, "every wait was timed");
    drop(rt);
    d.destroy_stream(compute).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_async_copy_returns_before_it_is_done() {
    let d = vmm_gpu();
    let ps = d.info().page_size;
    let len = (256 << 20) / ps * ps;
    let (range, pages) = mapped_range(&d, len / ps);
    let mut host = d.alloc_pinned(len).unwrap();
    host.as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i >> 12) as u8);
    let s = d.create_stream().unwrap();
    let e = d.create_event().unwrap();
    let t = Instant::now();
    // SAFETY: `host` outlives the copy: we wait for the event below before it drops.
    unsafe { d.copy_h2d_async(range.base, host.as_ptr(), len, s).unwrap() };
    let queued = t.elapsed();
    d.record_event(e, s).unwrap();
    // 256 MiB take milliseconds on any PCIe link; the query comes microseconds after queuing.
    assert!(
        !d.event_query(e).unwrap(),
        "a 256 MiB copy completed while being queued"
    );
    d.event_wait(e, None).unwrap();
    let done = t.elapsed();
    assert!(queued < done, "queued in {queued:?}, done in {done:?}");
    for off in [0, len / 2 + 12345, len - 4096] {
        let mut back = vec![0u8; 4096];
        d.read_blocking(range.base.offset(off), &mut back, s)
            .unwrap();
        assert_eq!(back, host.as_slice()[off..off + 4096], "offset {off}");
    }
    eprintln!(
        "256 MiB pinned H2D: queued in {queued:?}, done in {done:?} ({:.1} GB/s)",
        len as f64 / done.as_secs_f64() / 1e9
    );
    d.destroy_event(e).unwrap();
    d.destroy_stream(s).unwrap();
    unmap_all(&d, range, pages);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_fill_kernel() {
    let d = vmm_gpu();
    let ps = d.info().page_size;
    let (range, pages) = mapped_range(&d, 2);
    let s = d.create_stream().unwrap();
    let fill = |dst: DevicePtr, len: usize, value: u8| Kernel::Fill { dst, len, value };
    d.launch(&fill(range.base, 2 * ps, 0), s).unwrap();
    d.launch(&fill(range.base.offset(ps - 100), 200, 0xab), s)
        .unwrap();
    d.launch(&fill(range.base, 0, 0xff), s).unwrap();
    assert!(matches!(
        d.launch(&fill(range.base.offset(ps), 2 * ps, 1), s),
        Err(Error::BadAddress { .. })
    ));
    let mut back = vec![1u8; 2 * ps];
    d.read_blocking(range.base, &mut back, s).unwrap();
    for (i, &v) in back.iter().enumerate() {
        let want = if (ps - 100..ps + 100).contains(&i) {
            0xab
        } else {
            0
        };
        assert_eq!(v, want, "byte {i}");
    }
    d.destroy_stream(s).unwrap();
    unmap_all(&d, range, pages);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_host_functions_run_in_stream_order() {
    let d = vmm_gpu();
    let (range, pages) = mapped_range(&d, 1);
    let s = d.create_stream().unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut host = d.alloc_pinned(64).unwrap();
    let host_addr = host.as_mut_ptr() as usize;
    let seen = Arc::new(Mutex::new(Vec::new()));
    for i in 0..40u32 {
        let value = i as u8;
        d.launch(
            &Kernel::Fill {
                dst: range.base,
                len: 64,
                value,
            },
            s,
        )
        .unwrap();
        // SAFETY: `host` lives until after the stream synchronises below, and
        // only the stream touches it until then.
        unsafe {
            d.copy_d2h_async(host_addr as *mut u8, range.base, 64, s)
                .unwrap()
        };
        let (order, seen) = (order.clone(), seen.clone());
        d.launch_host_fn(
            s,
            Box::new(move || {
                order.lock().unwrap().push(i);
                // SAFETY: the copy queued before this function has completed
                // (stream order) and nothing else touches the buffer now.
                let byte = unsafe { *(host_addr as *const u8) };
                seen.lock().unwrap().push(byte);
            }),
        )
        .unwrap();
    }
    d.stream_synchronize(s).unwrap();
    assert_eq!(*order.lock().unwrap(), (0..40).collect::<Vec<u32>>());
    assert_eq!(
        *seen.lock().unwrap(),
        (0..40).map(|i| i as u8).collect::<Vec<u8>>()
    );
    // A panicking host function is reported once, at the next synchronisation.
    d.launch_host_fn(
        s,
        Box::new(|| panic!("deliberate panic in a host function")),
    )
    .unwrap();
    assert!(matches!(
        d.stream_synchronize(s),
        Err(Error::StreamFailed { .. })
    ));
    d.stream_synchronize(s).unwrap();
    drop(host);
    d.destroy_stream(s).unwrap();
    unmap_all(&d, range, pages);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pinned_and_registered_host_memory() {
    let d = vmm_gpu();
    let ps = d.info().page_size;
    let (range, pages) = mapped_range(&d, 1);
    let s = d.create_stream().unwrap();
    assert!(
        d.host_register_supported(),
        "cuMemHostRegister does not work here"
    );
    let os_page = rustix::param::page_size();
    let layout = std::alloc::Layout::from_size_align(ps, os_page).unwrap();
    // SAFETY: non-zero size.
    let buf = unsafe { std::alloc::alloc(layout) };
    assert!(!buf.is_null());
    let data = pattern(ps, 3);
    // SAFETY: `buf` holds `ps` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, ps) };
    for read_only in [false, true] {
        if read_only && !d.read_only_register_supported() {
            continue;
        }
        // SAFETY: `buf` stays allocated until after the registration drops.
        let reg = unsafe { d.register_host(buf, ps, read_only).unwrap() };
        assert_eq!(
            (reg.as_ptr(), reg.len(), reg.is_read_only()),
            (buf as *const u8, ps, read_only)
        );
        d.launch(
            &Kernel::Fill {
                dst: range.base,
                len: ps,
                value: 0,
            },
            s,
        )
        .unwrap();
        // SAFETY: the registered buffer outlives the copy (synchronised below).
        unsafe { d.copy_h2d_async(range.base, reg.as_ptr(), ps, s).unwrap() };
        d.stream_synchronize(s).unwrap();
        drop(reg);
        let mut back = vec![0u8; ps];
        d.read_blocking(range.base, &mut back, s).unwrap();
        assert!(back == data, "read_only={read_only}: data differs");
    }
    // SAFETY: allocated above with this layout; registrations are gone.
    unsafe { std::alloc::dealloc(buf, layout) };
    d.destroy_stream(s).unwrap();
    unmap_all(&d, range, pages);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_drop_with_live_resources_and_pinned_buffer_outliving_device() {
    let d = gpu();
    let s = d.create_stream().unwrap();
    let _e = d.create_event().unwrap();
    if d.vmm_supported() {
        let _ = mapped_range(&d, 2);
        let _spare = d.alloc_page().unwrap();
        let _empty = d.reserve(d.info().page_size).unwrap();
    }
    let _block = d.alloc_contiguous(2 * d.info().page_size).unwrap();
    let mut pinned = d.alloc_pinned(1 << 20).unwrap();
    d.launch_host_fn(
        s,
        Box::new(|| std::thread::sleep(Duration::from_millis(20))),
    )
    .unwrap();
    drop(d);
    // The buffer holds the context: still valid memory after the device is gone.
    pinned.as_mut_slice().fill(7);
    assert!(pinned.as_slice().iter().all(|&b| b == 7));
    drop(pinned);
    // A fresh device opens fine afterwards.
    let d = gpu();
    d.memory().unwrap();
}
