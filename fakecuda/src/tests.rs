//! The fake driver's own checks, calling its C API in this process.

use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cudarc::driver::sys::{self, CUresult as E};

use super::*;

/// `cuInit` and the primary context, current on this thread.
fn ready() {
    assert_eq!(cuInit(0), E::CUDA_SUCCESS);
    let mut ctx: CUcontext = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cuDevicePrimaryCtxRetain(&mut ctx, 0) },
        E::CUDA_SUCCESS
    );
    assert_eq!(cuCtxSetCurrent(ctx), E::CUDA_SUCCESS);
}

fn stream() -> CUstream {
    let mut s: CUstream = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuStreamCreate(&mut s, 0) }, E::CUDA_SUCCESS);
    s
}

fn event() -> CUevent {
    let mut e: CUevent = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuEventCreate(&mut e, 0) }, E::CUDA_SUCCESS);
    e
}

fn pinned(len: usize) -> *mut u8 {
    let mut p: *mut c_void = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemHostAlloc(&mut p, len, 0) }, E::CUDA_SUCCESS);
    p.cast()
}

fn prop() -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct for which all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// One granule reserved, created, mapped and made accessible.
fn mapped() -> (u64, u64, usize) {
    let g = DRIVER.get().unwrap().config.granularity;
    let (mut va, mut h) = (0u64, 0u64);
    // SAFETY: out-pointers to locals; `prop` lives for the call.
    unsafe {
        assert_eq!(cuMemAddressReserve(&mut va, g, 0, 0, 0), E::CUDA_SUCCESS);
        assert_eq!(cuMemCreate(&mut h, g, &prop(), 0), E::CUDA_SUCCESS);
    }
    assert_eq!(cuMemMap(va, g, 0, h, 0), E::CUDA_SUCCESS);
    // SAFETY: a zeroed descriptor with the read-write flag set.
    let mut desc: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
    desc.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    desc.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    // SAFETY: one valid descriptor.
    assert_eq!(unsafe { cuMemSetAccess(va, g, &desc, 1) }, E::CUDA_SUCCESS);
    (va, h, g)
}

#[test]
fn copies_follow_stream_order_and_cross_stream_events() {
    ready();
    let len = 3 << 20;
    let mut dptr = 0u64;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemAlloc_v2(&mut dptr, len) }, E::CUDA_SUCCESS);
    let (src, back) = (pinned(len), pinned(len));
    for i in 0..len {
        // SAFETY: `src` holds `len` bytes.
        unsafe { *src.add(i) = (i * 7 + 3) as u8 };
    }
    let (a, b, e) = (stream(), stream(), event());
    // Hold stream a until released, so the copy cannot have run yet.
    static GO: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn hold(_: *mut c_void) {
        while !GO.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
    assert_eq!(cuLaunchHostFunc(a, Some(hold), null_mut()), E::CUDA_SUCCESS);
    // SAFETY: both buffers live until the streams are synchronised below.
    unsafe {
        assert_eq!(
            cuMemcpyHtoDAsync_v2(dptr, src.cast(), len, a),
            E::CUDA_SUCCESS
        );
        assert_eq!(cuEventRecord(e, a), E::CUDA_SUCCESS);
        assert_eq!(cuStreamWaitEvent(b, e, 0), E::CUDA_SUCCESS);
        assert_eq!(
            cuMemcpyDtoHAsync_v2(back.cast(), dptr, len, b),
            E::CUDA_SUCCESS
        );
    }
    assert_eq!(cuEventQuery(e), E::CUDA_ERROR_NOT_READY);
    GO.store(true, Ordering::Release);
    assert_eq!(cuStreamSynchronize(b), E::CUDA_SUCCESS);
    assert_eq!(cuEventQuery(e), E::CUDA_SUCCESS);
    // SAFETY: both hold `len` bytes; the copies are done.
    let (x, y) = unsafe {
        (
            std::slice::from_raw_parts(src, len),
            std::slice::from_raw_parts(back, len),
        )
    };
    assert!(x == y, "the read-back differs from what was uploaded");
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_ERROR_INVALID_VALUE);
    for p in [src, back] {
        assert_eq!(cuMemFreeHost(p.cast()), E::CUDA_SUCCESS);
    }
    assert_eq!(cuStreamDestroy_v2(a), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(b), E::CUDA_SUCCESS);
    assert_eq!(cuStreamSynchronize(a), E::CUDA_ERROR_INVALID_HANDLE);
    assert_eq!(cuEventDestroy_v2(e), E::CUDA_SUCCESS);
}

#[test]
fn calls_need_a_context_and_host_functions_may_not_call_the_driver() {
    ready();
    let current = || {
        let mut c: CUcontext = 7 as CUcontext;
        // SAFETY: out-pointer to a local.
        assert_eq!(unsafe { cuCtxGetCurrent(&mut c) }, E::CUDA_SUCCESS);
        c as usize
    };
    assert_eq!(current(), CONTEXT);
    let on_other_thread = std::thread::spawn(move || {
        // No context is current on a new thread.
        assert_eq!(current(), 0);
        let mut p = 0u64;
        // SAFETY: out-pointer to a local.
        unsafe { cuMemAlloc_v2(&mut p, 4096) }
    })
    .join()
    .unwrap();
    assert_eq!(on_other_thread, E::CUDA_ERROR_INVALID_CONTEXT);
    static SEEN: AtomicU32 = AtomicU32::new(u32::MAX);
    unsafe extern "C" fn calls_driver(_: *mut c_void) {
        SEEN.store(cuCtxSynchronize() as u32, Ordering::Release);
    }
    let s = stream();
    assert_eq!(
        cuLaunchHostFunc(s, Some(calls_driver), null_mut()),
        E::CUDA_SUCCESS
    );
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    assert_eq!(
        SEEN.load(Ordering::Acquire),
        E::CUDA_ERROR_NOT_PERMITTED as u32
    );
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

#[test]
fn vmm_rules_are_enforced() {
    ready();
    let (va, h, g) = mapped();
    // Mapping over a mapping, unmapping part of one, freeing a range with a
    // mapping in it: all refused, as misuse that a real driver may not catch.
    let mut h2 = 0u64;
    // SAFETY: out-pointer to a local; `prop` lives for the call.
    assert_eq!(
        unsafe { cuMemCreate(&mut h2, g, &prop(), 0) },
        E::CUDA_SUCCESS
    );
    assert_eq!(cuMemMap(va, g, 0, h2, 0), E::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cuMemUnmap(va, g / 2), E::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cuMemAddressFree(va, g), E::CUDA_ERROR_INVALID_VALUE);
    let mem = || DRIVER.get().unwrap().mem_read().resolve(va, g).map(|_| ());
    assert_eq!(mem(), Ok(()));
    // Released while mapped: the memory stays until unmapped.
    // (Other tests allocate in parallel, so this checks the bytes, not `used`.)
    assert_eq!(cuMemRelease(h), E::CUDA_SUCCESS);
    assert_eq!(mem(), Ok(()), "released while mapped: still there");
    assert_eq!(cuMemUnmap(va, g), E::CUDA_SUCCESS);
    assert!(
        mem().unwrap_err().contains("reserved but not mapped"),
        "{:?}",
        mem()
    );
    assert_eq!(cuMemMap(va, g, 0, h, 0), E::CUDA_ERROR_INVALID_HANDLE);
    // Mapped without cuMemSetAccess: not accessible.
    assert_eq!(cuMemMap(va, g, 0, h2, 0), E::CUDA_SUCCESS);
    assert!(mem().unwrap_err().contains("cuMemSetAccess"), "{:?}", mem());
    let s = stream();
    let host = [0u8; 16];
    // SAFETY: a live local source; the call is refused before queuing.
    let r = unsafe { cuMemcpyHtoDAsync_v2(va, host.as_ptr().cast(), 16, s) };
    assert_eq!(r, E::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cuMemUnmap(va, g), E::CUDA_SUCCESS);
    assert_eq!(cuMemRelease(h2), E::CUDA_SUCCESS);
    assert_eq!(cuMemAddressFree(va, g), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
    // More than the device has.
    let mut p = 0u64;
    let total = DRIVER.get().unwrap().config.memory;
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cuMemAlloc_v2(&mut p, total + 1) },
        E::CUDA_ERROR_OUT_OF_MEMORY
    );
}

/// Run by [`a_copy_whose_memory_was_unmapped_before_it_ran_aborts`] in a
/// child process: unmaps a page while a queued copy to it waits its turn.
#[test]
#[ignore = "run by a_copy_whose_memory_was_unmapped_before_it_ran_aborts"]
fn child_unmaps_under_a_queued_copy() {
    ready();
    let (va, h, g) = mapped();
    static GO: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn hold(_: *mut c_void) {
        while !GO.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
    let s = stream();
    let src = pinned(g);
    assert_eq!(cuLaunchHostFunc(s, Some(hold), null_mut()), E::CUDA_SUCCESS);
    // SAFETY: `src` is never freed in this process.
    unsafe { assert_eq!(cuMemcpyHtoDAsync_v2(va, src.cast(), g, s), E::CUDA_SUCCESS) };
    assert_eq!(cuMemUnmap(va, g), E::CUDA_SUCCESS);
    assert_eq!(cuMemRelease(h), E::CUDA_SUCCESS);
    GO.store(true, Ordering::Release);
    let _ = cuStreamSynchronize(s);
    println!("the stream ran the copy to unmapped memory");
}

#[test]
fn a_copy_whose_memory_was_unmapped_before_it_ran_aborts() {
    let (status, stdout, stderr) = child("tests::child_unmaps_under_a_queued_copy");
    assert!(
        !status.success(),
        "the child succeeded:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("FATAL: host-to-device copy") && stderr.contains("reserved but not mapped"),
        "{stderr}"
    );
    assert!(!stdout.contains("the stream ran the copy"), "{stdout}");
}

#[test]
fn timing_events_measure_what_a_stream_ran() {
    ready();
    let s = stream();
    let (a, b) = (event(), event());
    let mut no_timing: CUevent = null_mut();
    let flag = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cuEventCreate(&mut no_timing, flag) },
        E::CUDA_SUCCESS
    );
    unsafe extern "C" fn sleep(_: *mut c_void) {
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    assert_eq!(cuEventRecord(a, s), E::CUDA_SUCCESS);
    assert_eq!(cuEventRecord(no_timing, s), E::CUDA_SUCCESS);
    assert_eq!(
        cuLaunchHostFunc(s, Some(sleep), null_mut()),
        E::CUDA_SUCCESS
    );
    assert_eq!(cuEventRecord(b, s), E::CUDA_SUCCESS);
    let mut ms = 0f32;
    // SAFETY: out-pointer to a local (for each call).
    unsafe {
        assert_eq!(
            cuEventElapsedTime_v2(&mut ms, a, b),
            E::CUDA_ERROR_NOT_READY
        );
        assert_eq!(cuEventSynchronize(b), E::CUDA_SUCCESS);
        assert_eq!(cuEventElapsedTime_v2(&mut ms, a, b), E::CUDA_SUCCESS);
        assert!((30.0..5_000.0).contains(&ms), "{ms} ms");
        assert_eq!(
            cuEventElapsedTime_v2(&mut ms, a, no_timing),
            E::CUDA_ERROR_INVALID_HANDLE
        );
    }
    for e in [a, b, no_timing] {
        assert_eq!(cuEventDestroy_v2(e), E::CUDA_SUCCESS);
    }
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

#[test]
fn gemm_ex_matches_a_plain_product_for_every_transpose() {
    use cudarc::cublas::sys::cublasHandle_t;
    ready();
    let (m, n, k) = (5usize, 3usize, 7usize);
    let mut h: cublasHandle_t = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { blas::cublasCreate_v2(&mut h) } as u32, 0);
    let s = stream();
    assert_eq!(blas::cublasSetStream_v2(h, s.cast()) as u32, 0);
    let dev = |bytes: &[u8]| {
        let mut p = 0u64;
        // SAFETY: out-pointer to a local; then a blocking-enough copy from a
        // pageable buffer, which the driver stages before returning.
        unsafe {
            assert_eq!(cuMemAlloc_v2(&mut p, bytes.len()), E::CUDA_SUCCESS);
            assert_eq!(
                cuMemcpyHtoDAsync_v2(p, bytes.as_ptr().cast(), bytes.len(), s),
                E::CUDA_SUCCESS
            );
        }
        p
    };
    let a: Vec<half::f16> = (0..m * k)
        .map(|i| half::f16::from_f32((i as f32 * 0.37).sin()))
        .collect();
    let b: Vec<half::f16> = (0..k * n)
        .map(|i| half::f16::from_f32((i as f32 * 0.11).cos()))
        .collect();
    let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (da, db, dc) = (
            dev(bytemuck_bytes(&a)),
            dev(bytemuck_bytes(&b)),
            dev(bytemuck_bytes(&c0)),
        );
        let (lda, ldb) = (if ta { k } else { m }, if tb { n } else { k });
        let (alpha, beta) = (1.5f32, 0.5f32);
        // SAFETY: device buffers of the spans the shapes need; host scalars.
        let r = unsafe {
            blas::cublasGemmEx(
                h,
                ta as u32,
                tb as u32,
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                da as *const c_void,
                2,
                lda as i32,
                db as *const c_void,
                2,
                ldb as i32,
                (&beta as *const f32).cast(),
                dc as *mut c_void,
                0,
                m as i32,
                68,
                -1,
            )
        };
        assert_eq!(r as u32, 0);
        let mut got = vec![0f32; m * n];
        // SAFETY: pageable destination: the call returns once the bytes are there.
        unsafe {
            assert_eq!(
                cuMemcpyDtoHAsync_v2(got.as_mut_ptr().cast(), dc, m * n * 4, s),
                E::CUDA_SUCCESS
            );
        }
        for i in 0..m {
            for j in 0..n {
                let mut want = beta as f64 * c0[j * m + i] as f64;
                for l in 0..k {
                    let x = if ta { a[i * lda + l] } else { a[l * lda + i] }.to_f64();
                    let y = if tb { b[l * ldb + j] } else { b[j * ldb + l] }.to_f64();
                    want += alpha as f64 * x * y;
                }
                let g = got[j * m + i] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{ta} {tb} ({i},{j}): {g} vs {want}"
                );
            }
        }
        for p in [da, db, dc] {
            assert_eq!(cuMemFree_v2(p), E::CUDA_SUCCESS);
        }
    }
    // f32 A with f16 B: not in cuBLAS's table for CUBLAS_COMPUTE_32F.
    let (alpha, beta) = (1f32, 0f32);
    let dummy = dev(&[0u8; 64]);
    // SAFETY: refused before any memory is read.
    let r = unsafe {
        blas::cublasGemmEx(
            h,
            0,
            0,
            1,
            1,
            1,
            (&alpha as *const f32).cast(),
            dummy as *const c_void,
            0,
            1,
            dummy as *const c_void,
            2,
            1,
            (&beta as *const f32).cast(),
            dummy as *mut c_void,
            0,
            1,
            68,
            -1,
        )
    };
    assert_eq!(r as u32, 15, "CUBLAS_STATUS_NOT_SUPPORTED");
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(dummy), E::CUDA_SUCCESS);
    assert_eq!(blas::cublasDestroy_v2(h) as u32, 0);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

fn bytemuck_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: plain numbers with no padding, viewed as their bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

#[test]
fn nvrtc_images_name_their_kernels() {
    let src =
        "extern \"C\" __global__ void __launch_bounds__(256, 2)\n merge_f16(const float* a) {}\n\
               extern \"C\" __global__ void plain(int n) {}\n__device__ int helper(int x);";
    assert_eq!(nvrtc::kernel_names(src), ["merge_f16", "plain"]);
}

/// Runs `test` (an ignored test of this file) in a child process; returns
/// its status, stdout and stderr.
fn child(test: &str) -> (std::process::ExitStatus, String, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", test, "--nocapture"])
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "run by a_pinned_buffer_freed_under_a_queued_copy_aborts"]
fn child_frees_a_pinned_buffer_under_a_queued_copy() {
    ready();
    let mut dptr = 0u64;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemAlloc_v2(&mut dptr, 4096) }, E::CUDA_SUCCESS);
    static GO: AtomicBool = AtomicBool::new(false);
    unsafe extern "C" fn hold(_: *mut c_void) {
        while !GO.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }
    let s = stream();
    let src = pinned(4096);
    assert_eq!(cuLaunchHostFunc(s, Some(hold), null_mut()), E::CUDA_SUCCESS);
    // SAFETY: deliberately freed below, before the copy runs: the driver must abort.
    unsafe {
        assert_eq!(
            cuMemcpyHtoDAsync_v2(dptr, src.cast(), 4096, s),
            E::CUDA_SUCCESS
        )
    };
    let _ = cuMemFreeHost(src.cast());
    println!("the buffer was freed under the copy");
}

#[test]
fn a_pinned_buffer_freed_under_a_queued_copy_aborts() {
    let (status, stdout, stderr) = child("tests::child_frees_a_pinned_buffer_under_a_queued_copy");
    assert!(
        !status.success(),
        "the child succeeded:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("FATAL: cuMemFreeHost")
            && stderr.contains("1 queued operation(s) still use it"),
        "{stderr}"
    );
    assert!(!stdout.contains("the buffer was freed"), "{stdout}");
}

#[test]
#[ignore = "run by the_context_takes_its_resources_when_its_last_reference_goes"]
fn child_releases_the_context() {
    ready();
    let s = stream();
    let mut dptr = 0u64;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemAlloc_v2(&mut dptr, 4096) }, E::CUDA_SUCCESS);
    assert_eq!(cuDevicePrimaryCtxRelease_v2(0), E::CUDA_SUCCESS);
    assert_eq!(cuStreamSynchronize(s), E::CUDA_ERROR_INVALID_CONTEXT);
    ready();
    assert_eq!(cuStreamSynchronize(s), E::CUDA_ERROR_INVALID_HANDLE);
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_ERROR_INVALID_VALUE);
    let s2 = stream();
    // Refused: `dptr` went with the context.
    assert_eq!(
        cuMemsetD8Async(dptr, 0, 16, s2),
        E::CUDA_ERROR_INVALID_VALUE
    );
    println!("context checks done");
}

#[test]
fn the_context_takes_its_resources_when_its_last_reference_goes() {
    let (status, stdout, stderr) = child("tests::child_releases_the_context");
    assert!(
        status.success() && stdout.contains("context checks done"),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn new_memory_is_poisoned_and_device_addresses_are_not_host_pointers() {
    ready();
    let s = stream();
    let mut dptr = 0u64;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemAlloc_v2(&mut dptr, 8192) }, E::CUDA_SUCCESS);
    let mut back = vec![0u8; 8192];
    // SAFETY: pageable destination: the call returns once the bytes are there.
    unsafe {
        assert_eq!(
            cuMemcpyDtoHAsync_v2(back.as_mut_ptr().cast(), dptr, 8192, s),
            E::CUDA_SUCCESS
        );
    }
    assert!(back.iter().all(|&b| b == memory::POISON));
    let p = pinned(64);
    // SAFETY: `p` holds 64 bytes.
    assert!(unsafe { std::slice::from_raw_parts(p, 64) }
        .iter()
        .all(|&b| b == memory::POISON));
    // A device pointer given as the host side of a copy is refused.
    // SAFETY: refused before anything is read.
    let r = unsafe { cuMemcpyHtoDAsync_v2(dptr, dptr as *const c_void, 16, s) };
    assert_eq!(r, E::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_SUCCESS);
    assert_eq!(cuMemFreeHost(p.cast()), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

#[test]
fn host_allocations_take_the_driver_flags_and_refuse_others() {
    ready();
    let s = stream();
    let wc = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_WRITECOMBINED;
    let mut p: *mut c_void = null_mut();
    // SAFETY: out-pointer to a local; refused before anything is allocated.
    assert_eq!(
        unsafe { cuMemHostAlloc(&mut p, 64, 0x80) },
        E::CUDA_ERROR_INVALID_VALUE
    );
    assert!(p.is_null());
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemHostAlloc(&mut p, 64, wc) }, E::CUDA_SUCCESS);
    let mut flags = 0;
    // SAFETY: out-pointer to a local.
    assert_eq!(unsafe { cuMemHostGetFlags(&mut flags, p) }, E::CUDA_SUCCESS);
    assert_eq!(flags, wc, "the flags it was made with");
    let plain = pinned(64);
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cuMemHostGetFlags(&mut flags, plain.cast()) },
        E::CUDA_SUCCESS
    );
    assert_eq!(flags, 0);
    assert_eq!(cuMemFreeHost(plain.cast()), E::CUDA_SUCCESS);
    // A write-combined buffer is an upload's source like any pinned one.
    // SAFETY: `p` holds 64 bytes that nothing else uses.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, 64) };
    let mut dptr = 0u64;
    let mut back = [0u8; 64];
    // SAFETY: out-pointer to a local; the copies stay inside both buffers and
    // the stream is synchronised before `back` is read.
    unsafe {
        assert_eq!(cuMemAlloc_v2(&mut dptr, 64), E::CUDA_SUCCESS);
        assert_eq!(cuMemcpyHtoDAsync_v2(dptr, p, 64, s), E::CUDA_SUCCESS);
        assert_eq!(
            cuMemcpyDtoHAsync_v2(back.as_mut_ptr().cast(), dptr, 64, s),
            E::CUDA_SUCCESS
        );
    }
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    assert_eq!(back, [0x5a; 64]);
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_SUCCESS);
    assert_eq!(cuMemFreeHost(p), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

#[test]
fn read_only_registrations_refuse_device_writes() {
    ready();
    let s = stream();
    let mut host = vec![0u8; 8192];
    let ro = sys::CU_MEMHOSTREGISTER_READ_ONLY;
    assert_eq!(
        cuMemHostRegister_v2(host.as_mut_ptr().cast(), 8192, 0x100),
        E::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(
        cuMemHostRegister_v2(host.as_mut_ptr().cast(), 8192, ro),
        E::CUDA_SUCCESS
    );
    let mut dptr = 0u64;
    // SAFETY: out-pointer to a local; the copy is refused before queuing.
    unsafe {
        assert_eq!(cuMemAlloc_v2(&mut dptr, 8192), E::CUDA_SUCCESS);
        let r = cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast(), dptr, 8192, s);
        assert_eq!(r, E::CUDA_ERROR_INVALID_VALUE);
        // Reading it (an upload) is fine.
        let r = cuMemcpyHtoDAsync_v2(dptr, host.as_ptr().cast(), 8192, s);
        assert_eq!(r, E::CUDA_SUCCESS);
    }
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    assert_eq!(
        cuMemHostUnregister(host.as_mut_ptr().cast()),
        E::CUDA_SUCCESS
    );
    assert_eq!(cuMemFree_v2(dptr), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

/// A module of this driver's NVRTC holding the merge kernels.
fn merge_module() -> sys::CUmodule {
    let names = nvrtc::kernel_names(offload_kernels::cuda::LOWRANK_MERGE_SRC);
    let mut image = nvrtc::MAGIC.to_vec();
    image.extend_from_slice(format!("lowrank_merge.cu\n{}", names.join("\n")).as_bytes());
    image.push(0);
    let mut m: sys::CUmodule = null_mut();
    // SAFETY: out-pointer to a local; the image is NUL-terminated.
    let r = unsafe { kernels::cuModuleLoadData(&mut m, image.as_ptr().cast()) };
    assert_eq!(r, E::CUDA_SUCCESS);
    m
}

fn function(m: sys::CUmodule, name: &str) -> sys::CUfunction {
    let mut f: sys::CUfunction = null_mut();
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: out-pointer to a local, a NUL-terminated name.
    let r = unsafe { kernels::cuModuleGetFunction(&mut f, m, name.as_ptr()) };
    assert_eq!(r, E::CUDA_SUCCESS);
    f
}

/// Device memory holding `v` (f32).
fn device_f32(v: &[f32], s: CUstream) -> u64 {
    let mut p = 0u64;
    // SAFETY: out-pointer to a local; `v` outlives the synchronous copy.
    unsafe {
        assert_eq!(cuMemAlloc_v2(&mut p, v.len() * 4), E::CUDA_SUCCESS);
        assert_eq!(
            cuMemcpyHtoDAsync_v2(p, v.as_ptr().cast(), v.len() * 4, s),
            E::CUDA_SUCCESS
        );
    }
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    p
}

fn read_f32(p: u64, n: usize, s: CUstream) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // SAFETY: `v` holds n f32 and outlives the synchronised copy.
    unsafe {
        assert_eq!(
            cuMemcpyDtoHAsync_v2(v.as_mut_ptr().cast(), p, n * 4, s),
            E::CUDA_SUCCESS
        );
    }
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    v
}

/// Launches `f` with `params` (by value) on `s`.
fn launch<T>(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    params: &T,
    s: CUstream,
) -> E {
    let mut args = [(params as *const T).cast_mut().cast::<c_void>()];
    // SAFETY: one parameter, pointing to a live parameter block.
    unsafe {
        kernels::cuLaunchKernel(
            f,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            0,
            s,
            args.as_mut_ptr(),
            null_mut(),
        )
    }
}

/// The low-rank merge runs from its parameters: a row slice of W gets
/// `scale · up · down` (checked against a plain f64 product), rows outside
/// it and tiles no block walks are untouched, and launches a GPU would run
/// wrong are refused.
#[test]
fn merge_kernels_run_from_their_parameters() {
    use offload_kernels::cuda::{self as k, LowRankAdapterParams, LowRankMergeParams};
    ready();
    let s = stream();
    let m = merge_module();
    let f = function(m, k::lowrank_merge_entry(offload_kernels::Dtype::F32));
    let (rows, cols, rank, row0, slice) = (10usize, 300usize, 3usize, 2usize, 7usize);
    let w0: Vec<f32> = (0..rows * cols).map(|i| (i % 17) as f32 * 0.25).collect();
    let up: Vec<f32> = (0..slice * rank).map(|i| (i % 5) as f32 - 2.0).collect();
    let down: Vec<f32> = (0..rank * cols).map(|i| (i % 7) as f32 * 0.5).collect();
    let (wp, upp, downp) = (device_f32(&w0, s), device_f32(&up, s), device_f32(&down, s));
    let mut p = LowRankMergeParams {
        w: wp,
        rows: slice as u32,
        cols: cols as u32,
        row0: row0 as u32,
        num_adapters: 1,
        ..Default::default()
    };
    p.adapters[0] = LowRankAdapterParams {
        up: upp,
        down: downp,
        rank: rank as u32,
        up_dtype: 0,
        down_dtype: 0,
        scale: 0.5,
    };
    let want = |r: usize, c: usize| {
        let mut v = f64::from(w0[r * cols + c]);
        if (row0..row0 + slice).contains(&r) {
            let i = r - row0;
            let d: f64 = (0..rank)
                .map(|q| f64::from(up[i * rank + q]) * f64::from(down[q * cols + c]))
                .sum();
            v += 0.5 * d;
        }
        v as f32
    };
    // Three column strips of 128; one block per strip walks its one tile.
    let block = k::LOWRANK_BLOCK_DIM;
    assert_eq!(launch(f, (3, 1, 1), block, &p, s), E::CUDA_SUCCESS);
    let got = read_f32(wp, rows * cols, s);
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(got[r * cols + c], want(r, c), "row {r} column {c}");
        }
    }
    // Two blocks for three strips: step 0, every block idle, W unchanged.
    let fresh = device_f32(&w0, s);
    p.w = fresh;
    assert_eq!(launch(f, (2, 1, 1), block, &p, s), E::CUDA_SUCCESS);
    assert_eq!(read_f32(fresh, rows * cols, s), w0);
    // Refused: the wrong block shape, a 2-D grid, a block over 1024
    // threads, more blocks than the slice's three tiles (a grid sized for
    // another kernel's tiles), a bad dtype code, W overlapping a factor.
    for (grid, blk) in [
        ((3, 1, 1), (128, 1, 1)),
        ((3, 2, 1), block),
        ((3, 1, 1), (2048, 1, 1)),
        ((6, 1, 1), block),
    ] {
        assert_eq!(
            launch(f, grid, blk, &p, s),
            E::CUDA_ERROR_INVALID_VALUE,
            "{grid:?} {blk:?}"
        );
    }
    // The tensor-core kernel with f32 factors (it would read them as f16),
    // and W not aligned to its f32 elements.
    let mma = function(m, k::lowrank_merge_mma_entry(offload_kernels::Dtype::F32));
    assert_eq!(
        launch(mma, (3, 1, 1), k::MMA_BLOCK_DIM, &p, s),
        E::CUDA_ERROR_INVALID_VALUE
    );
    let mut bad = p;
    bad.w = fresh + 2;
    assert_eq!(
        launch(f, (3, 1, 1), block, &bad, s),
        E::CUDA_ERROR_INVALID_VALUE
    );
    let mut bad = p;
    bad.adapters[0].up_dtype = 3;
    assert_eq!(
        launch(f, (3, 1, 1), block, &bad, s),
        E::CUDA_ERROR_INVALID_VALUE
    );
    let mut bad = p;
    bad.adapters[0].down = fresh + 4;
    assert_eq!(
        launch(f, (3, 1, 1), block, &bad, s),
        E::CUDA_ERROR_INVALID_VALUE
    );
    assert_eq!(read_f32(fresh, rows * cols, s), w0, "a refused launch ran");
    // Nothing queued uses them any more (the stream was synchronised).
    for ptr in [wp, upp, downp, fresh] {
        assert_eq!(cuMemFree_v2(ptr), E::CUDA_SUCCESS);
    }
    assert_eq!(kernels::cuModuleUnload(m), E::CUDA_SUCCESS);
}

/// Batched launches: blocks walk several tiles of their strip (f16 W,
/// 100 rows of 32-row tiles, one block per strip), each job merges only its
/// own rows, and jobs whose W slices overlap are refused.
#[test]
fn batched_merges_walk_their_strips_and_refuse_overlapping_jobs() {
    use offload_kernels::cuda::{
        self as k, LowRankAdapterParams, LowRankBatchParams, LowRankJobParams,
    };
    ready();
    let s = stream();
    let m = merge_module();
    let f = function(m, k::lowrank_merge_batch_entry(offload_kernels::Dtype::F16));
    let (rows, cols) = (100usize, 130usize);
    // W: f16 zeros, two copies side by side; factors f32, rank 1: Δ[i, j] = (i + 1) · 0.5.
    let zeros = vec![0f32; rows * cols];
    let wp = device_f32(&zeros, s); // 2 · rows · cols f16 values fit in rows · cols f32
    let up: Vec<f32> = (0..rows).map(|i| (i + 1) as f32).collect();
    let down = vec![0.5f32; cols];
    let (upp, downp) = (device_f32(&up, s), device_f32(&down, s));
    let job = |w: u64, row0: u32, n: u32| {
        let mut j = LowRankJobParams {
            w,
            rows: n,
            cols: cols as u32,
            row0,
            num_adapters: 1,
            ..Default::default()
        };
        j.adapters[0] = LowRankAdapterParams {
            up: upp,
            down: downp,
            rank: 1,
            up_dtype: 0,
            down_dtype: 0,
            scale: 1.0,
        };
        j
    };
    // Job 0: rows 0..50 of the first W; job 1: rows 50..100 of it. Two
    // column strips each, one block per strip: each block walks two tiles.
    let mut p = LowRankBatchParams::default();
    assert!(p.push(job(wp, 0, 50), 2));
    assert!(p.push(job(wp, 50, 50), 2));
    let (grid, block) = p.launch_dims();
    assert_eq!(launch(f, grid, block, &p, s), E::CUDA_SUCCESS);
    let got = read_f32(wp, rows * cols / 2, s);
    let halves: Vec<u16> = got
        .iter()
        .flat_map(|v| {
            let b = v.to_bits();
            [b as u16, (b >> 16) as u16]
        })
        .collect();
    for i in 0..rows {
        for j in 0..cols {
            // Job 0 has up rows 0..50, job 1 rows 0..50 too (its slice's own rows).
            let want = half::f16::from_f32((i % 50 + 1) as f32 * 0.5).to_bits();
            assert_eq!(halves[i * cols + j], want, "row {i} column {j}");
        }
    }
    // Overlapping slices of one W in one batch: refused, W unchanged.
    let mut bad = LowRankBatchParams::default();
    assert!(bad.push(job(wp, 0, 60), 2));
    assert!(bad.push(job(wp, 40, 60), 2));
    assert_eq!(launch(f, grid, block, &bad, s), E::CUDA_ERROR_INVALID_VALUE);
    assert_eq!(read_f32(wp, rows * cols / 2, s), got);
    for ptr in [wp, upp, downp] {
        assert_eq!(cuMemFree_v2(ptr), E::CUDA_SUCCESS);
    }
    assert_eq!(kernels::cuModuleUnload(m), E::CUDA_SUCCESS);
}

/// Streams carry the priority they were made with, clamped to the range
/// the context reports; plain streams have the least.
#[test]
fn stream_priorities_are_recorded_clamped_and_reported() {
    ready();
    let (mut least, mut greatest) = (7, 7);
    // SAFETY: out-pointers to locals.
    assert_eq!(
        unsafe { cuCtxGetStreamPriorityRange(&mut least, &mut greatest) },
        E::CUDA_SUCCESS
    );
    assert_eq!((least, greatest), (0, -5));
    let prio = |s: CUstream| {
        let mut p = 99;
        // SAFETY: a live stream and an out-pointer to a local.
        assert_eq!(unsafe { cuStreamGetPriority(s, &mut p) }, E::CUDA_SUCCESS);
        p
    };
    let with = |p: i32| {
        let mut s: CUstream = null_mut();
        // SAFETY: out-pointer to a local.
        assert_eq!(
            unsafe { cuStreamCreateWithPriority(&mut s, 0, p) },
            E::CUDA_SUCCESS
        );
        s
    };
    let plain = stream();
    let (s3, below, above) = (with(-3), with(-100), with(4));
    assert_eq!(
        [prio(plain), prio(s3), prio(below), prio(above)],
        [0, -3, -5, 0]
    );
    // Flags are recorded (these streams': 0) and unknown ones refused.
    let mut f = 7;
    // SAFETY: a live stream and an out-pointer to a local.
    assert_eq!(unsafe { cuStreamGetFlags(s3, &mut f) }, E::CUDA_SUCCESS);
    assert_eq!(f, 0);
    let mut bad: CUstream = null_mut();
    // SAFETY: out-pointer to a local.
    assert_eq!(
        unsafe { cuStreamCreateWithPriority(&mut bad, 0x10, 0) },
        E::CUDA_ERROR_INVALID_VALUE
    );
    for s in [plain, s3, below, above] {
        assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
    }
    let mut p = 0;
    // SAFETY: a stream handle that is no longer live, which the driver refuses.
    assert_eq!(
        unsafe { cuStreamGetPriority(s3, &mut p) },
        E::CUDA_ERROR_INVALID_HANDLE
    );
}

#[test]
fn captured_work_runs_only_when_its_graph_is_launched() {
    use crate::graph::*;
    use sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED as RELAXED;
    ready();
    let s = stream();
    let p = device_f32(&[1.0; 4], s);
    assert_eq!(begin_capture(s, RELAXED), E::CUDA_SUCCESS);
    // A second capture of the same stream is refused.
    assert_eq!(begin_capture(s, RELAXED), E::CUDA_ERROR_ILLEGAL_STATE);
    assert_eq!(cuMemsetD8Async(p, 0, 8, s), E::CUDA_SUCCESS);
    let mut graph: sys::CUgraph = null_mut();
    // SAFETY: a capturing stream and an out-pointer to a local.
    assert_eq!(
        unsafe { cuStreamEndCapture(s, &mut graph) },
        E::CUDA_SUCCESS
    );
    // Captured, not run.
    assert_eq!(read_f32(p, 4, s), [1.0; 4]);
    let mut exec: sys::CUgraphExec = null_mut();
    // SAFETY: a graph of this context and an out-pointer to a local.
    assert_eq!(
        unsafe { cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
        E::CUDA_SUCCESS
    );
    assert_eq!(cuGraphDestroy(graph), E::CUDA_SUCCESS);
    assert_eq!(cuGraphLaunch(exec, s), E::CUDA_SUCCESS);
    assert_eq!(read_f32(p, 4, s), [0.0, 0.0, 1.0, 1.0]);
    // Launched again: the same work again.
    // SAFETY: `v` outlives the synchronised copy.
    unsafe {
        let v = [2.0f32; 4];
        assert_eq!(
            cuMemcpyHtoDAsync_v2(p, v.as_ptr().cast(), 16, s),
            E::CUDA_SUCCESS
        );
    }
    assert_eq!(cuGraphLaunch(exec, s), E::CUDA_SUCCESS);
    assert_eq!(read_f32(p, 4, s), [0.0, 0.0, 2.0, 2.0]);
    assert_eq!(cuGraphExecDestroy(exec), E::CUDA_SUCCESS);
    assert_eq!(cuGraphLaunch(exec, s), E::CUDA_ERROR_INVALID_HANDLE);
    // What cannot be captured is refused and invalidates the capture.
    assert_eq!(begin_capture(s, RELAXED), E::CUDA_SUCCESS);
    assert_eq!(
        cuEventRecord(event(), s),
        E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    );
    assert_eq!(
        cuStreamSynchronize(s),
        E::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    );
    // SAFETY: as above.
    assert_eq!(
        unsafe { cuStreamEndCapture(s, &mut graph) },
        E::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED
    );
    assert!(graph.is_null());
    // SAFETY: as above; the stream no longer captures.
    assert_eq!(
        unsafe { cuStreamEndCapture(s, &mut graph) },
        E::CUDA_ERROR_ILLEGAL_STATE
    );
    assert_eq!(cuStreamSynchronize(s), E::CUDA_SUCCESS);
    assert_eq!(cuMemFree_v2(p), E::CUDA_SUCCESS);
    assert_eq!(cuStreamDestroy_v2(s), E::CUDA_SUCCESS);
}

fn begin_capture(s: CUstream, mode: sys::CUstreamCaptureMode) -> E {
    crate::graph::cuStreamBeginCapture_v2(s, mode)
}
