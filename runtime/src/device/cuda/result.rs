//! Checked wrappers over the raw CUDA driver calls the backend makes.
//!
//! This is the layer cudarc calls `driver::result`, but returning our own
//! [`Error::Cuda`], which stores the raw `CUresult` code: formatting one of
//! cudarc's `DriverError`s calls into the driver, and so does everything in
//! `sys` when cudarc loads the library dynamically (a call without the
//! library panics). Hence the rule for this module: call nothing here before
//! [`driver_present`] has returned true. [`crate::device::cuda::CudaDevice`]
//! checks that in its constructor, so every method of a device may use these.
//!
//! A wrapper is an `unsafe fn` when a wrong argument is undefined behaviour
//! in the driver (a destroyed stream, an address still in use, a dangling host
//! pointer); wrappers whose only inputs are plain values or out-pointers to
//! locals are safe.

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys;

use crate::error::{Error, Result};

static DRIVER_LOADED: AtomicBool = AtomicBool::new(false);

/// Whether the CUDA driver library can be loaded. Once this returned true,
/// the other functions of this module can be called without panicking.
pub fn driver_present() -> bool {
    if DRIVER_LOADED.load(Ordering::Acquire) {
        return true;
    }
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    let present = unsafe { sys::is_culib_present() };
    if present {
        DRIVER_LOADED.store(true, Ordering::Release);
    }
    present
}

/// The symbolic name of a `CUresult` (`"CUDA_ERROR_OUT_OF_MEMORY"`), asked of the driver.
pub fn error_name(code: sys::CUresult) -> String {
    if !DRIVER_LOADED.load(Ordering::Acquire) {
        return "unknown: the driver library is not loaded".to_string();
    }
    let mut p: *const std::ffi::c_char = ptr::null();
    // SAFETY: the library is loaded (checked above), so the symbol resolves;
    // `p` is a valid out-pointer to a local.
    let r = unsafe { sys::cuGetErrorName(code, &mut p) };
    if r == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
        // SAFETY: on success the driver points `p` at a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("unrecognised CUresult {}", code as i32)
    }
}

/// Our error for a failed driver call.
pub fn error(call: &'static str, code: sys::CUresult) -> Error {
    Error::Cuda {
        call,
        code: code as i32,
        name: error_name(code),
    }
}

/// `Ok` for `CUDA_SUCCESS`, our error otherwise.
pub fn check(call: &'static str, code: sys::CUresult) -> Result<()> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(error(call, code))
    }
}

/// The raw `CUresult` code an error carries, if it is a driver error.
pub fn code_of(err: &Error) -> Option<i32> {
    match err {
        Error::Cuda { code, .. } => Some(*code),
        _ => None,
    }
}

/// `cuInit(0)`.
pub fn init() -> Result<()> {
    // SAFETY: no arguments; the library is loaded (module rule).
    check("cuInit", unsafe { sys::cuInit(0) })
}

/// `cuDeviceGet`.
pub fn device_get(ordinal: u32) -> Result<sys::CUdevice> {
    let mut dev: sys::CUdevice = 0;
    // SAFETY: out-pointer to a local; an out-of-range ordinal is reported as an error.
    check("cuDeviceGet", unsafe {
        sys::cuDeviceGet(&mut dev, ordinal as c_int)
    })?;
    Ok(dev)
}

/// `cuDeviceGetName`.
pub fn device_name(dev: sys::CUdevice) -> Result<String> {
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer is writable for `name.len()` bytes, the length we pass.
    check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev)
    })?;
    // The driver NUL-terminates within the length; make sure regardless.
    name[name.len() - 1] = 0;
    // SAFETY: the buffer holds a NUL byte (set above), so the string ends inside it.
    Ok(unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// `cuDeviceTotalMem_v2`.
pub fn device_total_mem(dev: sys::CUdevice) -> Result<usize> {
    let mut bytes = 0usize;
    // SAFETY: out-pointer to a local.
    check("cuDeviceTotalMem", unsafe {
        sys::cuDeviceTotalMem_v2(&mut bytes, dev)
    })?;
    Ok(bytes)
}

/// `cuDeviceGetAttribute`.
pub fn device_attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32> {
    let mut v: c_int = 0;
    // SAFETY: out-pointer to a local.
    check("cuDeviceGetAttribute", unsafe {
        sys::cuDeviceGetAttribute(&mut v, attr, dev)
    })?;
    Ok(v)
}

/// `cuDevicePrimaryCtxRetain`: the device's primary context, with its reference count raised.
pub fn primary_ctx_retain(dev: sys::CUdevice) -> Result<sys::CUcontext> {
    let mut ctx: sys::CUcontext = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuDevicePrimaryCtxRetain", unsafe {
        sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
    })?;
    Ok(ctx)
}

/// `cuDevicePrimaryCtxRelease_v2`.
///
/// # Safety
/// Balances one [`primary_ctx_retain`] of `dev`; nothing may use the context
/// through that reference afterwards (when the count drops to zero the
/// context and every resource in it are destroyed).
pub unsafe fn primary_ctx_release(dev: sys::CUdevice) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuDevicePrimaryCtxRelease", unsafe {
        sys::cuDevicePrimaryCtxRelease_v2(dev)
    })
}

/// `cuCtxSetCurrent`: bind `ctx` to the calling thread.
///
/// # Safety
/// `ctx` must be a live context.
pub unsafe fn ctx_set_current(ctx: sys::CUcontext) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })
}

/// `cuCtxGetCurrent`: the context current on the calling thread (null for none).
pub fn ctx_get_current() -> Result<sys::CUcontext> {
    let mut ctx: sys::CUcontext = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut ctx) })?;
    Ok(ctx)
}

/// `cuCtxSynchronize`: wait for all work of the current context.
pub fn ctx_synchronize() -> Result<()> {
    // SAFETY: no arguments; without a current context the driver reports an error.
    check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
}

/// `cuMemGetInfo_v2` of the current context: (free, total).
pub fn mem_get_info() -> Result<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: out-pointers to locals.
    check("cuMemGetInfo", unsafe {
        sys::cuMemGetInfo_v2(&mut free, &mut total)
    })?;
    Ok((free, total))
}

/// Allocation properties of pinned device memory on GPU `ordinal`.
fn device_alloc_prop(ordinal: u32) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal as c_int,
        },
        win32HandleMetaData: ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// `cuMemGetAllocationGranularity` (minimum) for pinned device memory on GPU `ordinal`.
pub fn allocation_granularity(ordinal: u32) -> Result<usize> {
    let prop = device_alloc_prop(ordinal);
    let mut g = 0usize;
    // SAFETY: `prop` is a fully initialised local; `g` an out-pointer to a local.
    check("cuMemGetAllocationGranularity", unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    })?;
    Ok(g)
}

/// `cuMemCreate`: a physical allocation of `size` bytes (a multiple of the granularity) on GPU `ordinal`.
pub fn mem_create(size: usize, ordinal: u32) -> Result<sys::CUmemGenericAllocationHandle> {
    let prop = device_alloc_prop(ordinal);
    let mut handle: sys::CUmemGenericAllocationHandle = 0;
    // SAFETY: `prop` is a fully initialised local; `handle` an out-pointer to a local.
    check("cuMemCreate", unsafe {
        sys::cuMemCreate(&mut handle, size, &prop, 0)
    })?;
    Ok(handle)
}

/// `cuMemRelease`.
///
/// # Safety
/// `handle` came from [`mem_create`] and is released once; it may stay mapped
/// (the memory is freed when the last mapping goes), but the handle itself
/// must not be used again.
pub unsafe fn mem_release(handle: sys::CUmemGenericAllocationHandle) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemRelease", unsafe { sys::cuMemRelease(handle) })
}

/// `cuMemAddressReserve` of `size` bytes aligned to `align`, at an address the driver picks.
pub fn address_reserve(size: usize, align: usize) -> Result<sys::CUdeviceptr> {
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: out-pointer to a local; a zero hint lets the driver choose.
    check("cuMemAddressReserve", unsafe {
        sys::cuMemAddressReserve(&mut p, size, align, 0, 0)
    })?;
    Ok(p)
}

/// `cuMemAddressFree`.
///
/// # Safety
/// `ptr..ptr+size` is exactly a range from [`address_reserve`], fully
/// unmapped, and nothing uses its addresses any more.
pub unsafe fn address_free(ptr: sys::CUdeviceptr, size: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemAddressFree", unsafe {
        sys::cuMemAddressFree(ptr, size)
    })
}

/// `cuMemMap` of the whole of `handle` (`size` bytes) at `ptr`.
///
/// # Safety
/// `ptr..ptr+size` lies in a reserved range and is not mapped; `handle` is a
/// live allocation of `size` bytes.
pub unsafe fn mem_map(
    ptr: sys::CUdeviceptr,
    size: usize,
    handle: sys::CUmemGenericAllocationHandle,
) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemMap", unsafe {
        sys::cuMemMap(ptr, size, 0, handle, 0)
    })
}

/// `cuMemSetAccess`: make `ptr..ptr+size` readable and writable from GPU `ordinal`.
///
/// # Safety
/// `ptr..ptr+size` is mapped.
pub unsafe fn mem_set_access_rw(ptr: sys::CUdeviceptr, size: usize, ordinal: u32) -> Result<()> {
    let desc = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal as c_int,
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: `desc` is one initialised descriptor (count 1); the range is the caller's contract.
    check("cuMemSetAccess", unsafe {
        sys::cuMemSetAccess(ptr, size, &desc, 1)
    })
}

/// `cuMemUnmap`.
///
/// # Safety
/// `ptr..ptr+size` was mapped by [`mem_map`] and no queued or running work uses it.
pub unsafe fn mem_unmap(ptr: sys::CUdeviceptr, size: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemUnmap", unsafe { sys::cuMemUnmap(ptr, size) })
}

/// `cuMemAlloc_v2` in the current context.
pub fn mem_alloc(size: usize) -> Result<sys::CUdeviceptr> {
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: out-pointer to a local.
    check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, size) })?;
    Ok(p)
}

/// `cuMemFree_v2`.
///
/// # Safety
/// `ptr` came from [`mem_alloc`], is freed once, and no work uses it.
pub unsafe fn mem_free(ptr: sys::CUdeviceptr) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemFree", unsafe { sys::cuMemFree_v2(ptr) })
}

/// `cuMemHostAlloc`: `size` bytes of page-locked host memory.
pub fn mem_host_alloc(size: usize, flags: c_uint) -> Result<*mut c_void> {
    let mut p: *mut c_void = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuMemHostAlloc", unsafe {
        sys::cuMemHostAlloc(&mut p, size, flags)
    })?;
    Ok(p)
}

/// `cuMemHostGetFlags`: the flags the [`mem_host_alloc`] block at `p` was
/// made with.
pub fn mem_host_get_flags(p: *mut c_void) -> Result<c_uint> {
    let mut flags: c_uint = 0;
    // SAFETY: out-pointer to a local; the driver checks `p` against its own
    // allocations and answers an error for anything else.
    check("cuMemHostGetFlags", unsafe {
        sys::cuMemHostGetFlags(&mut flags, p)
    })?;
    Ok(flags)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// `p` came from [`mem_host_alloc`], is freed once, and nothing (host code or
/// queued copies) uses it any more.
pub unsafe fn mem_free_host(p: *mut c_void) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(p) })
}

/// `cuMemHostRegister_v2`: page-lock an existing host range.
///
/// # Safety
/// `p..p+size` is mapped host memory that stays mapped until [`mem_host_unregister`].
pub unsafe fn mem_host_register(p: *mut c_void, size: usize, flags: c_uint) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemHostRegister", unsafe {
        sys::cuMemHostRegister_v2(p, size, flags)
    })
}

/// `cuMemHostUnregister`.
///
/// # Safety
/// `p` was registered by [`mem_host_register`] and no queued copy uses it.
pub unsafe fn mem_host_unregister(p: *mut c_void) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemHostUnregister", unsafe {
        sys::cuMemHostUnregister(p)
    })
}

/// `cuStreamCreate` in the current context.
pub fn stream_create(flags: sys::CUstream_flags) -> Result<sys::CUstream> {
    let mut s: sys::CUstream = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut s, flags as c_uint)
    })?;
    Ok(s)
}

/// `cuStreamCreateWithPriority` in the current context (`priority` within
/// [`ctx_stream_priority_range`]; lower numbers are greater priorities).
pub fn stream_create_with_priority(
    flags: sys::CUstream_flags,
    priority: i32,
) -> Result<sys::CUstream> {
    let mut s: sys::CUstream = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuStreamCreateWithPriority", unsafe {
        sys::cuStreamCreateWithPriority(&mut s, flags as c_uint, priority as c_int)
    })?;
    Ok(s)
}

/// `cuCtxGetStreamPriorityRange` of the current context: (least, greatest)
/// priority, e.g. (0, -5); (0, 0) where the device has no priorities.
pub fn ctx_stream_priority_range() -> Result<(i32, i32)> {
    let (mut least, mut greatest): (c_int, c_int) = (0, 0);
    // SAFETY: out-pointers to locals.
    check("cuCtxGetStreamPriorityRange", unsafe {
        sys::cuCtxGetStreamPriorityRange(&mut least, &mut greatest)
    })?;
    Ok((least, greatest))
}

#[cfg(test)]
/// `cuStreamGetPriority` (for the tests).
///
/// # Safety
/// `stream` must be a live stream.
pub unsafe fn stream_get_priority(stream: sys::CUstream) -> Result<i32> {
    let mut p: c_int = 0;
    // SAFETY: the caller guarantees the stream; out-pointer to a local.
    check("cuStreamGetPriority", unsafe {
        sys::cuStreamGetPriority(stream, &mut p)
    })?;
    Ok(p)
}

#[cfg(test)]
/// `cuStreamGetFlags` (for the tests).
///
/// # Safety
/// `stream` must be a live stream.
pub unsafe fn stream_get_flags(stream: sys::CUstream) -> Result<u32> {
    let mut f: c_uint = 0;
    // SAFETY: the caller guarantees the stream; out-pointer to a local.
    check("cuStreamGetFlags", unsafe {
        sys::cuStreamGetFlags(stream, &mut f)
    })?;
    Ok(f)
}

/// `cuStreamDestroy_v2`.
///
/// # Safety
/// `s` is a live stream, destroyed once, and not used afterwards.
pub unsafe fn stream_destroy(s: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuStreamDestroy", unsafe { sys::cuStreamDestroy_v2(s) })
}

/// `cuStreamSynchronize`.
///
/// # Safety
/// `s` is a live stream.
pub unsafe fn stream_synchronize(s: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(s)
    })
}

/// `cuEventCreate` in the current context.
pub fn event_create(flags: sys::CUevent_flags) -> Result<sys::CUevent> {
    let mut e: sys::CUevent = ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuEventCreate", unsafe {
        sys::cuEventCreate(&mut e, flags as c_uint)
    })?;
    Ok(e)
}

/// `cuEventDestroy_v2`.
///
/// # Safety
/// `e` is a live event, destroyed once, and not used afterwards.
pub unsafe fn event_destroy(e: sys::CUevent) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(e) })
}

/// `cuEventRecord`.
///
/// # Safety
/// `e` and `s` are live and belong to the same context.
pub unsafe fn event_record(e: sys::CUevent, s: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuEventRecord", unsafe { sys::cuEventRecord(e, s) })
}

/// `cuStreamWaitEvent`.
///
/// # Safety
/// `s` and `e` are live.
pub unsafe fn stream_wait_event(s: sys::CUstream, e: sys::CUevent) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuStreamWaitEvent", unsafe {
        sys::cuStreamWaitEvent(s, e, 0)
    })
}

/// `cuEventQuery`: `Ok(true)` when complete, `Ok(false)` for `CUDA_ERROR_NOT_READY`.
///
/// # Safety
/// `e` is a live event.
pub unsafe fn event_query(e: sys::CUevent) -> Result<bool> {
    // SAFETY: the caller's contract.
    match unsafe { sys::cuEventQuery(e) } {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        code => Err(error("cuEventQuery", code)),
    }
}

/// `cuEventElapsedTime_v2`: milliseconds from `start` to `end`, `Ok(None)`
/// for `CUDA_ERROR_NOT_READY` (either has not completed).
///
/// # Safety
/// `start` and `end` are live events of the current context (the driver
/// refuses, with an error, events made with `CU_EVENT_DISABLE_TIMING` or
/// never recorded).
pub unsafe fn event_elapsed(start: sys::CUevent, end: sys::CUevent) -> Result<Option<f32>> {
    let mut ms = 0f32;
    // SAFETY: the caller's contract; the out-pointer is a local.
    match unsafe { sys::cuEventElapsedTime_v2(&mut ms, start, end) } {
        sys::CUresult::CUDA_SUCCESS => Ok(Some(ms)),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(None),
        code => Err(error("cuEventElapsedTime", code)),
    }
}

/// `cuEventSynchronize`.
///
/// # Safety
/// `e` is a live event.
pub unsafe fn event_synchronize(e: sys::CUevent) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(e) })
}

/// `cuMemcpyHtoDAsync_v2`.
///
/// # Safety
/// `s` is live; `dst..dst+len` is mapped device memory; `src..src+len` is
/// host memory that stays valid and unmodified until the copy has run.
pub unsafe fn memcpy_htod_async(
    dst: sys::CUdeviceptr,
    src: *const c_void,
    len: usize,
    s: sys::CUstream,
) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, src, len, s)
    })
}

/// `cuMemcpyDtoHAsync_v2`.
///
/// # Safety
/// `s` is live; `src..src+len` is mapped device memory; `dst..dst+len` is
/// host memory that stays valid, and untouched by others, until the copy has run.
pub unsafe fn memcpy_dtoh_async(
    dst: *mut c_void,
    src: sys::CUdeviceptr,
    len: usize,
    s: sys::CUstream,
) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemcpyDtoHAsync", unsafe {
        sys::cuMemcpyDtoHAsync_v2(dst, src, len, s)
    })
}

/// `cuMemsetD8Async`.
///
/// # Safety
/// `s` is live and `dst..dst+len` is mapped device memory.
pub unsafe fn memset_d8_async(
    dst: sys::CUdeviceptr,
    value: u8,
    len: usize,
    s: sys::CUstream,
) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuMemsetD8Async", unsafe {
        sys::cuMemsetD8Async(dst, value, len, s)
    })
}

/// `cuLaunchHostFunc`: queue `f(data)` on `s`.
///
/// # Safety
/// `s` is live; `f` may be called with `data` on a driver thread, once, after
/// the work queued before it; it must not call CUDA and must not unwind.
/// When this returns an error, `f` will not be called.
pub unsafe fn launch_host_func(
    s: sys::CUstream,
    f: unsafe extern "C" fn(*mut c_void),
    data: *mut c_void,
) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuLaunchHostFunc", unsafe {
        sys::cuLaunchHostFunc(s, Some(f), data)
    })
}

/// `cuModuleLoadData`: load a cubin or a NUL-terminated PTX image into the current context.
///
/// # Safety
/// `image` points to a complete cubin, fatbin or NUL-terminated PTX text
/// that stays valid for the call.
pub unsafe fn module_load_data(image: *const c_void) -> Result<sys::CUmodule> {
    let mut m: sys::CUmodule = ptr::null_mut();
    // SAFETY: out-pointer to a local; the image is the caller's contract.
    check("cuModuleLoadData", unsafe {
        sys::cuModuleLoadData(&mut m, image)
    })?;
    Ok(m)
}

/// `cuModuleGetFunction`.
///
/// # Safety
/// `m` is a live module.
pub unsafe fn module_get_function(m: sys::CUmodule, name: &CStr) -> Result<sys::CUfunction> {
    let mut f: sys::CUfunction = ptr::null_mut();
    // SAFETY: out-pointer to a local, a NUL-terminated name; `m` is the caller's contract.
    check("cuModuleGetFunction", unsafe {
        sys::cuModuleGetFunction(&mut f, m, name.as_ptr())
    })?;
    Ok(f)
}

/// `cuModuleUnload`.
///
/// # Safety
/// `m` is a live module, unloaded once; no queued or running kernel of it
/// remains and none of its functions is used afterwards.
pub unsafe fn module_unload(m: sys::CUmodule) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuModuleUnload", unsafe { sys::cuModuleUnload(m) })
}

/// `cuLaunchKernel` with no dynamic shared memory and no `extra` options.
///
/// # Safety
/// `f` is a live function of a loaded module and `s` a live stream of the
/// same context; `params` holds one pointer per kernel parameter, each
/// pointing to a value of exactly the parameter's type and layout (read
/// during the call); every address the kernel will touch stays valid until
/// it has run.
pub unsafe fn launch_kernel(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    s: sys::CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: the caller's contract; `params` is a live array of the kernel's arity.
    check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
            f,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            0,
            s,
            params.as_mut_ptr(),
            ptr::null_mut(),
        )
    })
}

/// `cuStreamBeginCapture_v2` in relaxed mode: work queued on `s` from here
/// on is recorded into a graph instead of running (relaxed: the capturing
/// thread may still allocate memory, as the products' scratch growth does).
///
/// # Safety
/// `s` is a live stream of the current context, not capturing; until
/// [`stream_end_capture`], nothing but the work meant for the graph is
/// queued on it.
pub unsafe fn stream_begin_capture(s: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuStreamBeginCapture", unsafe {
        sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
    })
}

/// `cuStreamEndCapture`: the graph of what was captured on `s`.
///
/// # Safety
/// `s` is a live stream capturing since [`stream_begin_capture`] on this thread.
pub unsafe fn stream_end_capture(s: sys::CUstream) -> Result<sys::CUgraph> {
    let mut g: sys::CUgraph = ptr::null_mut();
    // SAFETY: the caller's contract; out-pointer to a local.
    check("cuStreamEndCapture", unsafe {
        sys::cuStreamEndCapture(s, &mut g)
    })?;
    Ok(g)
}

/// `cuGraphInstantiateWithFlags` with no flags.
///
/// # Safety
/// `g` is a live graph of the current context.
pub unsafe fn graph_instantiate(g: sys::CUgraph) -> Result<sys::CUgraphExec> {
    let mut e: sys::CUgraphExec = ptr::null_mut();
    // SAFETY: the caller's contract; out-pointer to a local.
    check("cuGraphInstantiateWithFlags", unsafe {
        sys::cuGraphInstantiateWithFlags(&mut e, g, 0)
    })?;
    Ok(e)
}

/// `cuGraphDestroy` (executable graphs made from it stay valid).
///
/// # Safety
/// `g` is a live graph, destroyed once, and not used afterwards.
pub unsafe fn graph_destroy(g: sys::CUgraph) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuGraphDestroy", unsafe { sys::cuGraphDestroy(g) })
}

/// `cuGraphLaunch`.
///
/// # Safety
/// `e` is a live executable graph and `s` a live stream of the current
/// context; every address its work touches stays valid until it has run.
pub unsafe fn graph_launch(e: sys::CUgraphExec, s: sys::CUstream) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuGraphLaunch", unsafe { sys::cuGraphLaunch(e, s) })
}

/// `cuGraphExecDestroy`; launches still queued finish (the driver frees the
/// graph after them).
///
/// # Safety
/// `e` is a live executable graph, destroyed once, and not launched afterwards.
pub unsafe fn graph_exec_destroy(e: sys::CUgraphExec) -> Result<()> {
    // SAFETY: the caller's contract.
    check("cuGraphExecDestroy", unsafe { sys::cuGraphExecDestroy(e) })
}
