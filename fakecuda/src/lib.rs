//! A CUDA driver (and cuBLAS) that runs on the CPU: a test double for the
//! CUDA backend on machines without a GPU.
//!
//! Built as a shared library and put on `LD_LIBRARY_PATH` under the names
//! `libcuda.so`, `libcublas.so`, `libcublasLt.so` and `libnvrtc.so` (see
//! [`install`]), it answers the driver
//! calls `offload-runtime`'s CUDA backend makes through cudarc: one device,
//! memory (`cuMemAlloc`, the virtual memory API, pinned and registered host
//! memory), streams (each a thread running its operations in order), events
//! (with timing), host functions, copies and memsets. Device memory is host
//! memory, so the backend's code above the driver runs unchanged and its
//! results can be checked byte for byte.
//!
//! It is stricter than a real driver where a real driver's failure would be
//! silent or a crash:
//! - every call but the device queries needs `cuInit`, and every call that
//!   a real driver runs in the current context needs one set on the calling
//!   thread (`CUDA_ERROR_INVALID_CONTEXT`);
//! - a host function that calls the driver gets `CUDA_ERROR_NOT_PERMITTED`;
//! - copies and memsets check their device bytes when queued (an error) and
//!   again when their stream runs them: memory unmapped, freed or never made
//!   accessible by then aborts the process with a message naming the
//!   operation and the addresses, which is what a real GPU's illegal address
//!   would have been, silently or not;
//! - a pinned host buffer is read or written when the stream gets there, not
//!   when the copy is queued, so reusing one too early shows up as wrong
//!   bytes; a pageable one is copied at once, as the real driver does;
//! - stream capture (`graph.rs`) keeps the products, the conversion kernels
//!   and memsets; anything else queued on a capturing stream is refused and
//!   invalidates the capture; `cuMemAlloc` on a thread with a capture open
//!   is refused (relaxed mode allows it; the runtime means to allocate
//!   nothing inside a capture); a launched graph's operations check their
//!   device bytes when they run, like any other.
//!
//! It runs no GPU code. Its NVRTC (`libnvrtc.so`, [`nvrtc`]) records a
//! program's kernel names in an image only its `cuModuleLoadData` accepts;
//! of those kernels, the activation conversions run on the CPU
//! ([`kernels`]), and the LoRA merges run as an emulation of what each
//! computes, from its launch parameters and grid (`merge.rs`: the host
//! side of a merge is checked, not the CUDA code). `cublasGemmEx` and
//! `cublasLtMatmul` (`libcublasLt.so`, `blaslt.rs`) are computed on the CPU
//! in f32.
//!
//! Environment, read at `cuInit`:
//! - `OFFLOAD_FAKECUDA_MEMORY_MIB`: device memory (default 2048);
//! - `OFFLOAD_FAKECUDA_GRANULARITY_KIB`: allocation granularity, the page
//!   size of the VMM arena (default 2048, as on NVIDIA GPUs);
//! - `OFFLOAD_FAKECUDA_NO_VMM=1`: the device says it has no virtual memory
//!   management and `cuMemCreate` fails (the backend's fallback mode);
//! - `OFFLOAD_FAKECUDA_NO_HOST_REGISTER=1`: `cuMemHostRegister` fails;
//! - `OFFLOAD_FAKECUDA_STREAM_DELAY_US=N`: each stream waits N µs before
//!   each operation, so work is still queued when a missing wait lets the
//!   host free or reuse its memory (which then aborts or reads wrong);
//! - `OFFLOAD_FAKECUDA_LEAK_CHECK=1`: the primary context's last release
//!   aborts if any allocation, pinned buffer, registration, physical
//!   allocation or reserved range is left (a cleanup that failed unseen);
//! - `OFFLOAD_FAKECUDA_LT_NO_ALGORITHM=1` (read at each call): cuBLASLt's
//!   heuristic finds no algorithm for any shape;
//! - `OFFLOAD_FAKECUDA_NO_CAPTURE=1` (read at each call): stream capture
//!   is not supported;
//! - `OFFLOAD_FAKECUDA_MARK=FILE`: `cuInit` writes the device's name to
//!   FILE, so a harness can tell that this library was the one loaded.

#![allow(non_snake_case)]
// The exported functions are the driver's C API: their pointer arguments
// are the caller's to keep valid, as with the real library.
#![allow(clippy::missing_safety_doc)]

mod blas;
mod blaslt;
mod graph;
pub mod kernels;
mod memory;
mod merge;
pub mod nvrtc;
mod stream;

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use cudarc::driver::sys::{
    self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUhostFn, CUresult, CUstream,
};

use memory::Memory;
use stream::{Event, Stream};

/// The device's name, as `cuDeviceGetName` gives it.
pub const DEVICE_NAME: &str = "Offload fake CUDA device (host memory)";

/// The file names under which the library must be found: cudarc's first
/// candidates for the driver, cuBLAS, cuBLASLt and NVRTC.
pub const LIBRARY_NAMES: [&str; 4] = [
    "libcuda.so",
    "libcublas.so",
    "libcublasLt.so",
    "libnvrtc.so",
];

/// Makes `dir` a folder to put on `LD_LIBRARY_PATH`: links named
/// [`LIBRARY_NAMES`] to `library` (this crate's cdylib).
pub fn install(library: &Path, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for name in LIBRARY_NAMES {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(library, &link)?;
    }
    Ok(())
}

/// Re-runs tests of the calling test binary in child processes whose CUDA
/// libraries are this crate's: `args` (test names and libtest options) and
/// `env`, once per value in `delays` of `OFFLOAD_FAKECUDA_STREAM_DELAY_US`,
/// each with `OFFLOAD_FAKECUDA_LEAK_CHECK=1` and the kernel disk cache off.
/// Returns `Err` with what went wrong unless every run loaded this library
/// (not a real driver found elsewhere) and ended with `expected` tests
/// passed and none failed. `tag` names the temporary folder of links.
pub fn rerun_tests_on_the_fake(
    tag: &str,
    args: &[&str],
    env: &[(&str, &str)],
    delays: &[&str],
    expected: usize,
) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let lib = find_library(&exe).ok_or_else(|| {
        format!(
            "liboffload_fakecuda.so is not beside {} (cargo builds it as a dev-dependency)",
            exe.display()
        )
    })?;
    let dir = std::env::temp_dir().join(format!("offload-fakecuda-{tag}-{}", std::process::id()));
    install(&lib, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mark = dir.join("loaded");
    let summary = format!("test result: ok. {expected} passed; 0 failed");
    let mut result = Ok(());
    for delay in delays {
        let _ = std::fs::remove_file(&mark);
        let out = std::process::Command::new(&exe)
            .args(args)
            .envs(env.iter().copied())
            .env("LD_LIBRARY_PATH", &dir)
            .env("OFFLOAD_KERNEL_CACHE", "off")
            .env("OFFLOAD_FAKECUDA_MARK", &mark)
            .env("OFFLOAD_FAKECUDA_STREAM_DELAY_US", delay)
            .env("OFFLOAD_FAKECUDA_LEAK_CHECK", "1")
            .output()
            .map_err(|e| format!("running {}: {e}", exe.display()))?;
        let loaded = std::fs::read_to_string(&mark).unwrap_or_default();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if loaded != DEVICE_NAME || !out.status.success() || !stdout.contains(&summary) {
            result = Err(format!(
                "expected `{summary}` on the fake driver (stream delay {delay} µs); got {:?}, \
                 loaded {loaded:?}\n{stdout}\n{stderr}",
                out.status
            ));
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Where cargo put this crate's cdylib for a test or binary at `exe`
/// (`target/<profile>/deps/…` or `target/<profile>/…`), if it is there.
pub fn find_library(exe: &Path) -> Option<PathBuf> {
    let name = "liboffload_fakecuda.so";
    let dir = exe.parent()?;
    [dir.join(name), dir.join("deps").join(name)]
        .into_iter()
        .chain(dir.parent().map(|p| p.join(name)))
        .find(|p| p.is_file())
}

const CONTEXT: usize = 0xC0_0000;

struct Config {
    memory: usize,
    granularity: usize,
    vmm: bool,
    host_register: bool,
    /// Each stream waits this long before each operation.
    stream_delay: Option<std::time::Duration>,
    /// The end of the context aborts if anything is left.
    leak_check: bool,
}

impl Config {
    fn from_env() -> Config {
        let num = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(d)
        };
        let flag = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let granularity = num("OFFLOAD_FAKECUDA_GRANULARITY_KIB", 2048).max(4) << 10;
        Config {
            memory: num("OFFLOAD_FAKECUDA_MEMORY_MIB", 2048) << 20,
            granularity: granularity.next_power_of_two(),
            vmm: !flag("OFFLOAD_FAKECUDA_NO_VMM"),
            host_register: !flag("OFFLOAD_FAKECUDA_NO_HOST_REGISTER"),
            stream_delay: match num("OFFLOAD_FAKECUDA_STREAM_DELAY_US", 0) {
                0 => None,
                us => Some(std::time::Duration::from_micros(us as u64)),
            },
            leak_check: flag("OFFLOAD_FAKECUDA_LEAK_CHECK"),
        }
    }
}

struct Driver {
    config: Config,
    memory: RwLock<Memory>,
    streams: Mutex<HashMap<usize, Arc<Stream>>>,
    null_stream: OnceLock<Arc<Stream>>,
    /// Destroyed streams that may still have queued work.
    closing: Mutex<Vec<Arc<Stream>>>,
    events: Mutex<HashMap<usize, Arc<Event>>>,
    context_refs: Mutex<u32>,
    next_id: AtomicUsize,
}

static DRIVER: OnceLock<Driver> = OnceLock::new();

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Driver {
    fn mem(&self) -> RwLockWriteGuard<'_, Memory> {
        self.memory.write().unwrap_or_else(|p| p.into_inner())
    }

    fn mem_read(&self) -> RwLockReadGuard<'_, Memory> {
        self.memory.read().unwrap_or_else(|p| p.into_inner())
    }

    fn id(&self) -> usize {
        self.next_id.fetch_add(16, Ordering::Relaxed)
    }

    /// A stream that runs what is queued now: a capturing one refuses the
    /// operation and its capture is invalidated, as the real driver does
    /// with an operation it cannot capture.
    fn stream(&self, s: CUstream) -> Result<Arc<Stream>, CUresult> {
        let st = self.stream_any(s)?;
        if st.capturing(true) {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        Ok(st)
    }

    /// A stream, capturing or not.
    fn stream_any(&self, s: CUstream) -> Result<Arc<Stream>, CUresult> {
        if s.is_null() {
            return Ok(Arc::clone(self.null_stream.get_or_init(|| {
                Stream::spawn(0, (STREAM_PRIORITY_LEAST, 0), self.config.stream_delay)
            })));
        }
        lock(&self.streams)
            .get(&(s as usize))
            .cloned()
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    }

    fn event(&self, e: CUevent) -> Result<Arc<Event>, CUresult> {
        lock(&self.events)
            .get(&(e as usize))
            .cloned()
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    }

    /// Every stream with work: live ones, and destroyed ones still running
    /// what was queued before.
    fn all_streams(&self) -> Vec<Arc<Stream>> {
        let mut v: Vec<_> = lock(&self.streams).values().cloned().collect();
        v.extend(self.null_stream.get().cloned());
        let mut closing = lock(&self.closing);
        closing.retain(|s| !s.is_done(s.tail()));
        v.extend(closing.iter().cloned());
        v
    }

    /// The primary context's last reference went: it waits for its streams,
    /// then its streams, events, modules, allocations and page-locked
    /// buffers are gone (a later use of any of them fails or faults).
    fn destroy_context(&self) {
        for s in self.all_streams() {
            s.synchronize();
        }
        for (_, s) in lock(&self.streams).drain() {
            s.close();
        }
        lock(&self.events).clear();
        kernels::forget_modules();
        let graphs = graph::forget();
        if let (true, Some(left)) = (self.config.leak_check, graphs) {
            fatal(
                "the primary context's last release",
                &format!("leaked {left}"),
            );
        }
        let mut mem = self.mem();
        if self.config.leak_check {
            if let Some(left) = mem.leftovers() {
                fatal(
                    "the primary context's last release",
                    &format!("leaked {left}"),
                );
            }
        }
        mem.destroy_context();
    }
}

/// The driver, for a call that needs `cuInit` (and a current context when
/// `context`); never from a host function.
fn driver(context: bool) -> Result<&'static Driver, CUresult> {
    if IN_CALLBACK.with(Cell::get) {
        return Err(CUresult::CUDA_ERROR_NOT_PERMITTED);
    }
    let d = DRIVER.get().ok_or(CUresult::CUDA_ERROR_NOT_INITIALIZED)?;
    if context && (CURRENT.with(Cell::get) != CONTEXT || *lock(&d.context_refs) == 0) {
        return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
    }
    Ok(d)
}

/// Runs a call's body, turning a panic into `CUDA_ERROR_UNKNOWN`.
fn call(f: impl FnOnce() -> Result<(), CUresult>) -> CUresult {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(e)) => e,
        Err(_) => CUresult::CUDA_ERROR_UNKNOWN,
    }
}

/// Stops the process with a message naming what went wrong: misuse that a
/// real GPU would not report, or not there.
pub(crate) fn fatal(what: &str, msg: &str) -> ! {
    eprintln!("offload-fakecuda: FATAL: {what}: {msg}");
    std::process::abort()
}

/// A memory call's result: `Err(Ok(code))` is returned, `Err(Err(message))`
/// (memory that queued work still uses) aborts.
fn or_abort(call: &str, r: Result<(), Result<CUresult, String>>) -> Result<(), CUresult> {
    match r {
        Ok(()) => Ok(()),
        Err(Ok(code)) => Err(code),
        Err(Err(msg)) => fatal(
            call,
            &format!("{msg} (on a GPU the queued work would use freed memory)"),
        ),
    }
}

/// Writes through an out-pointer the caller passed.
fn out<T>(p: *mut T, v: T) -> Result<(), CUresult> {
    if p.is_null() {
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    // SAFETY: the caller passes a valid pointer for the result (the C API's contract).
    unsafe { p.write(v) };
    Ok(())
}

/// A pointer sent to a stream thread: the C API makes the caller keep it valid.
#[derive(Clone, Copy)]
struct SendPtr(usize);
// SAFETY: only an address; what may be done with it is decided by the call's contract.
unsafe impl Send for SendPtr {}

// ---------------------------------------------------------------- init, device

#[no_mangle]
pub extern "C" fn cuInit(flags: c_uint) -> CUresult {
    call(|| {
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        DRIVER.get_or_init(|| {
            if let Some(mark) = std::env::var_os("OFFLOAD_FAKECUDA_MARK") {
                // Lets a harness check that this library, not a real driver, was loaded.
                let _ = std::fs::write(mark, DEVICE_NAME);
            }
            let config = Config::from_env();
            Driver {
                memory: RwLock::new(Memory::new(config.memory, config.granularity)),
                config,
                streams: Mutex::new(HashMap::new()),
                null_stream: OnceLock::new(),
                closing: Mutex::new(Vec::new()),
                events: Mutex::new(HashMap::new()),
                context_refs: Mutex::new(0),
                next_id: AtomicUsize::new(0x10_0000),
            }
        });
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    call(|| out(v, 13000))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    call(|| {
        driver(false)?;
        out(n, 1)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut CUdevice, ordinal: c_int) -> CUresult {
    call(|| {
        driver(false)?;
        if ordinal != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_DEVICE);
        }
        out(dev, 0)
    })
}

fn check_device(dev: CUdevice) -> Result<&'static Driver, CUresult> {
    let d = driver(false)?;
    if dev != 0 {
        return Err(CUresult::CUDA_ERROR_INVALID_DEVICE);
    }
    Ok(d)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    call(|| {
        check_device(dev)?;
        if name.is_null() || len <= 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let bytes = DEVICE_NAME.as_bytes();
        let n = bytes.len().min(len as usize - 1);
        // SAFETY: the caller's buffer holds `len` bytes; we write `n + 1 <= len`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
            *name.add(n) = 0;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    call(|| out(bytes, check_device(dev)?.config.memory))
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    v: *mut c_int,
    attr: c_uint,
    dev: CUdevice,
) -> CUresult {
    use sys::CUdevice_attribute as A;
    call(|| {
        let d = check_device(dev)?;
        let value = match attr {
            a if a == A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as u32 => 9,
            a if a == A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as u32 => 0,
            a if a == A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT as u32 => 4,
            a if a == A::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED as u32 => {
                d.config.vmm as c_int
            }
            a if a == A::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED as u32 => {
                d.config.host_register as c_int
            }
            a if a == A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED as u32 => {
                d.config.host_register as c_int
            }
            _ => return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED),
        };
        out(v, value)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: c_uint, s: *mut *const c_char) -> CUresult {
    static NAMES: OnceLock<Mutex<HashMap<u32, CString>>> = OnceLock::new();
    call(|| {
        let name = error_name(code).ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let mut names = lock(NAMES.get_or_init(Default::default));
        let c = names
            .entry(code)
            .or_insert_with(|| CString::new(name).expect("no NUL"));
        // The strings live as long as the process, like the driver's.
        out(s, c.as_ptr())
    })
}

fn error_name(code: u32) -> Option<String> {
    use CUresult as E;
    [
        E::CUDA_SUCCESS,
        E::CUDA_ERROR_INVALID_VALUE,
        E::CUDA_ERROR_OUT_OF_MEMORY,
        E::CUDA_ERROR_NOT_INITIALIZED,
        E::CUDA_ERROR_INVALID_DEVICE,
        E::CUDA_ERROR_INVALID_IMAGE,
        E::CUDA_ERROR_INVALID_CONTEXT,
        E::CUDA_ERROR_INVALID_HANDLE,
        E::CUDA_ERROR_NOT_FOUND,
        E::CUDA_ERROR_NOT_READY,
        E::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED,
        E::CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED,
        E::CUDA_ERROR_NOT_PERMITTED,
        E::CUDA_ERROR_NOT_SUPPORTED,
        E::CUDA_ERROR_UNKNOWN,
    ]
    .into_iter()
    .find(|e| *e as u32 == code)
    .map(|e| format!("{e:?}"))
}

// ---------------------------------------------------------------- contexts

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    call(|| {
        let d = check_device(dev)?;
        out(ctx, CONTEXT as CUcontext)?;
        *lock(&d.context_refs) += 1;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    call(|| {
        let d = check_device(dev)?;
        let mut refs = lock(&d.context_refs);
        if *refs == 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        *refs -= 1;
        if *refs == 0 {
            d.destroy_context();
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    call(|| {
        let d = driver(false)?;
        let c = ctx as usize;
        if c != 0 && (c != CONTEXT || *lock(&d.context_refs) == 0) {
            return Err(CUresult::CUDA_ERROR_INVALID_CONTEXT);
        }
        CURRENT.with(|cur| cur.set(c));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut CUcontext) -> CUresult {
    call(|| {
        driver(false)?;
        out(ctx, CURRENT.with(Cell::get) as CUcontext)
    })
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    call(|| {
        for s in driver(true)?.all_streams() {
            s.synchronize();
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- memory

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let m = d.mem_read();
        out(free, m.capacity - m.used)?;
        out(total, m.capacity)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetAllocationGranularity(
    g: *mut usize,
    prop: *const sys::CUmemAllocationProp,
    _option: c_uint,
) -> CUresult {
    call(|| {
        let d = driver(false)?;
        if prop.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if !d.config.vmm {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        out(g, d.config.granularity)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemCreate(
    handle: *mut u64,
    size: usize,
    prop: *const sys::CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    call(|| {
        let d = driver(false)?;
        if prop.is_null() || flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if !d.config.vmm {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        let h = d.mem().create(size)?;
        out(handle, h)
    })
}

#[no_mangle]
pub extern "C" fn cuMemRelease(handle: u64) -> CUresult {
    call(|| driver(false)?.mem().release(handle))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    align: usize,
    addr: CUdeviceptr,
    flags: u64,
) -> CUresult {
    call(|| {
        let d = driver(false)?;
        if addr != 0 || flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let p = d.mem().reserve(size, align)?;
        out(ptr, p)
    })
}

#[no_mangle]
pub extern "C" fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    call(|| driver(false)?.mem().address_free(ptr, size))
}

#[no_mangle]
pub extern "C" fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: u64,
    flags: u64,
) -> CUresult {
    call(|| {
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        driver(false)?.mem().map(ptr, size, offset, handle)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const sys::CUmemAccessDesc,
    count: usize,
) -> CUresult {
    call(|| {
        let d = driver(false)?;
        if desc.is_null() || count != 1 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // The descriptor read as its three 32-bit fields (location type,
        // location id, flags), so an out-of-range value is an error here
        // rather than an invalid Rust enum.
        // SAFETY: the caller passes `count` (1) valid descriptors, 12 bytes each.
        let [kind, id, flags] = unsafe { desc.cast::<[u32; 3]>().read_unaligned() };
        let device = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE as u32;
        if kind != device || id != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_DEVICE);
        }
        if flags != sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE as u32 {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        d.mem().set_access(ptr, size)
    })
}

#[no_mangle]
pub extern "C" fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    call(|| driver(false)?.mem().unmap(ptr, size))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut CUdeviceptr, size: usize) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if graph::capturing_here() {
            eprintln!(
                "offload-fakecuda: cuMemAlloc of {size} bytes while this thread captures a graph"
            );
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        let p = d.mem().alloc(size)?;
        out(ptr, p)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFree_v2(ptr: CUdeviceptr) -> CUresult {
    call(|| driver(true)?.mem().free(ptr))
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CUresult {
    call(|| {
        // Write-combining changes only how fast the CPU reaches the memory.
        let known = sys::CU_MEMHOSTALLOC_PORTABLE
            | sys::CU_MEMHOSTALLOC_DEVICEMAP
            | sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        if flags & !known != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let p = driver(true)?.mem().host_alloc(size, flags)?;
        out(pp, p)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostGetFlags(flags: *mut c_uint, p: *mut c_void) -> CUresult {
    call(|| {
        let f = driver(true)?.mem().host_flags(p)?;
        out(flags, f)
    })
}

#[no_mangle]
pub extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    call(|| {
        let r = driver(true)?.mem().free_host(p);
        or_abort("cuMemFreeHost", r)
    })
}

#[no_mangle]
pub extern "C" fn cuMemHostRegister_v2(p: *mut c_void, size: usize, flags: c_uint) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let known = sys::CU_MEMHOSTREGISTER_PORTABLE
            | sys::CU_MEMHOSTREGISTER_DEVICEMAP
            | sys::CU_MEMHOSTREGISTER_IOMEMORY
            | sys::CU_MEMHOSTREGISTER_READ_ONLY;
        if flags & !known != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if !d.config.host_register {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        let read_only = flags & sys::CU_MEMHOSTREGISTER_READ_ONLY != 0;
        d.mem().register(p, size, read_only)
    })
}

#[no_mangle]
pub extern "C" fn cuMemHostUnregister(p: *mut c_void) -> CUresult {
    call(|| {
        let r = driver(true)?.mem().unregister(p);
        or_abort("cuMemHostUnregister", r)
    })
}

// ---------------------------------------------------------------- streams, events

/// The least priority this driver reports, as an H100's (the default).
const STREAM_PRIORITY_LEAST: c_int = 0;
/// The greatest priority this driver reports, as an H100's.
const STREAM_PRIORITY_GREATEST: c_int = -5;

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut CUstream, flags: c_uint) -> CUresult {
    // SAFETY: the caller's pointer, passed on.
    unsafe { cuStreamCreateWithPriority(s, flags, STREAM_PRIORITY_LEAST) }
}

/// Out-of-range priorities are clamped to the range, as the driver does.
#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    s: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if s.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let id = d.id();
        let priority = priority.clamp(STREAM_PRIORITY_GREATEST, STREAM_PRIORITY_LEAST);
        if flags & !(sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint) != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        lock(&d.streams).insert(
            id,
            Stream::spawn(id, (priority, flags), d.config.stream_delay),
        );
        out(s, id as CUstream)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    call(|| {
        driver(true)?;
        // Either may be null, as with the driver.
        if !least.is_null() {
            out(least, STREAM_PRIORITY_LEAST)?;
        }
        if !greatest.is_null() {
            out(greatest, STREAM_PRIORITY_GREATEST)?;
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetPriority(s: CUstream, priority: *mut c_int) -> CUresult {
    call(|| {
        let st = driver(true)?.stream_any(s)?;
        if priority.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        out(priority, st.priority)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamGetFlags(s: CUstream, flags: *mut c_uint) -> CUresult {
    call(|| out(flags, driver(true)?.stream_any(s)?.flags))
}

#[no_mangle]
pub extern "C" fn cuStreamDestroy_v2(s: CUstream) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let st = lock(&d.streams)
            .remove(&(s as usize))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        st.close();
        lock(&d.closing).push(st);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: CUstream) -> CUresult {
    call(|| {
        driver(true)?.stream(s)?.synchronize();
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuStreamWaitEvent(s: CUstream, e: CUevent, flags: c_uint) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let st = d.stream(s)?;
        if let Some(rec) = d.event(e)?.last() {
            if !Arc::ptr_eq(&rec.stream, &st) {
                st.enqueue(Box::new(move || rec.stream.wait_for(rec.seq)));
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut CUevent, flags: c_uint) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if e.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let timing = flags & sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32 == 0;
        let id = d.id();
        lock(&d.events).insert(id, Arc::new(Event::new(timing)));
        out(e, id as CUevent)
    })
}

#[no_mangle]
pub extern "C" fn cuEventDestroy_v2(e: CUevent) -> CUresult {
    call(|| {
        let d = driver(true)?;
        lock(&d.events)
            .remove(&(e as usize))
            .map(|_| ())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    })
}

#[no_mangle]
pub extern "C" fn cuEventRecord(e: CUevent, s: CUstream) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let ev = d.event(e)?;
        ev.record(&d.stream(s)?);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuEventQuery(e: CUevent) -> CUresult {
    call(|| match driver(true)?.event(e)?.last() {
        Some(r) if !r.is_done() => Err(CUresult::CUDA_ERROR_NOT_READY),
        _ => Ok(()),
    })
}

#[no_mangle]
pub extern "C" fn cuEventSynchronize(e: CUevent) -> CUresult {
    call(|| {
        if let Some(r) = driver(true)?.event(e)?.last() {
            r.stream.wait_for(r.seq);
        }
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: CUevent,
    end: CUevent,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let (a, b) = (d.event(start)?, d.event(end)?);
        if !a.timing || !b.timing {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        }
        let (Some(ra), Some(rb)) = (a.last(), b.last()) else {
            return Err(CUresult::CUDA_ERROR_INVALID_HANDLE);
        };
        let (Some(ta), Some(tb)) = (ra.time.get(), rb.time.get()) else {
            return Err(CUresult::CUDA_ERROR_NOT_READY);
        };
        let v = if tb >= ta {
            (*tb - *ta).as_secs_f32() * 1e3
        } else {
            -((*ta - *tb).as_secs_f32() * 1e3)
        };
        out(ms, v)
    })
}

#[no_mangle]
pub extern "C" fn cuLaunchHostFunc(s: CUstream, f: CUhostFn, data: *mut c_void) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let f = f.ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        let data = SendPtr(data as usize);
        d.stream(s)?.enqueue(Box::new(move || {
            // Host functions of all streams run one at a time, which CUDA
            // allows ("may be serialized"), so one that waits for another
            // stream's host function deadlocks here as it may on a GPU.
            static HOST_FNS: Mutex<()> = Mutex::new(());
            let _one = lock(&HOST_FNS);
            IN_CALLBACK.with(|c| c.set(true));
            // SAFETY: the caller keeps `f`'s data valid until the function has run.
            unsafe { f(data.0 as *mut c_void) };
            IN_CALLBACK.with(|c| c.set(false));
        }));
        Ok(())
    })
}

// ---------------------------------------------------------------- copies

/// The driver and the stream for an operation on `len` bytes; `None` when
/// there are none (nothing is queued, as with the real driver).
fn queue_on(s: CUstream, len: usize) -> Result<Option<(&'static Driver, Arc<Stream>)>, CUresult> {
    let d = driver(true)?;
    let st = d.stream(s)?;
    Ok((len > 0).then_some((d, st)))
}

/// Checks device bytes when an operation is queued.
fn check_queued(d: &Driver, ptr: u64, len: usize) -> Result<(), CUresult> {
    d.mem_read().resolve(ptr, len).map(|_| ()).map_err(|m| {
        eprintln!("offload-fakecuda: {m}");
        CUresult::CUDA_ERROR_INVALID_VALUE
    })
}

/// Refuses a host pointer that is really a device address.
fn check_host(d: &Driver, p: usize, len: usize) -> Result<(), CUresult> {
    if d.mem_read().is_device_address(p, len) {
        eprintln!("offload-fakecuda: host pointer {p:#x} (+{len}) is a device address");
        return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
    }
    Ok(())
}

/// Finds the device bytes when the stream runs the operation, and runs `f`
/// with their host addresses while holding the memory read lock, so nothing
/// is unmapped meanwhile; aborts if any of them is gone.
pub(crate) fn run_checked(what: &str, ranges: &[(u64, usize)], f: impl FnOnce(&[usize])) {
    let d = DRIVER
        .get()
        .expect("initialised before any operation was queued");
    let m = d.mem_read();
    let mut at = Vec::with_capacity(ranges.len());
    for &(p, len) in ranges {
        match m.resolve(p, len) {
            Ok(a) => at.push(a),
            Err(msg) => fatal(
                what,
                &format!("{msg} (on a GPU: an illegal address, or memory corrupted unseen)"),
            ),
        }
    }
    f(&at);
}

/// Marks a pinned buffer's use by a queued operation as over when dropped.
struct Done(Option<memory::PinnedUse>);

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(u) = &self.0 {
            u.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    s: CUstream,
) -> CUresult {
    call(|| {
        let Some((d, st)) = queue_on(s, len)? else {
            return Ok(());
        };
        if src.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        check_host(d, src as usize, len)?;
        check_queued(d, dst, len)?;
        let what = format!(
            "host-to-device copy of {len} bytes to {dst:#x} on stream {:#x}",
            st.id
        );
        let pinned = d.mem_read().use_pinned(src as usize, len);
        // Pageable memory: the driver stages it before returning; pinned
        // memory is read when the stream gets there.
        let staged = pinned.is_none().then(|| {
            // SAFETY: the caller's source holds `len` readable bytes.
            unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) }.to_vec()
        });
        let (done, src) = (Done(pinned), SendPtr(src as usize));
        st.enqueue(Box::new(move || {
            let _done = done;
            let from = staged.as_ref().map_or(src.0 as *const u8, |v| v.as_ptr());
            run_checked(&what, &[(dst, len)], |at| {
                // SAFETY: `from` holds `len` bytes: the staged copy, or the
                // pinned source the caller keeps valid until the copy has run
                // (freeing it before then aborts); the destination is
                // accessible device memory, resolved under the lock.
                unsafe { std::ptr::copy(from, at[0] as *mut u8, len) }
            })
        }));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    s: CUstream,
) -> CUresult {
    call(|| {
        let Some((d, st)) = queue_on(s, len)? else {
            return Ok(());
        };
        if dst.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        check_host(d, dst as usize, len)?;
        check_queued(d, src, len)?;
        let pinned = d.mem_read().use_pinned(dst as usize, len);
        let done = Done(pinned);
        let sync = match &done.0 {
            Some(u) if u.read_only => {
                eprintln!(
                    "offload-fakecuda: device-to-host copy into {dst:p}, registered read-only"
                );
                return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
            }
            Some(_) => false,
            None => true,
        };
        let what = format!(
            "device-to-host copy of {len} bytes from {src:#x} on stream {:#x}",
            st.id
        );
        let p = SendPtr(dst as usize);
        let seq = st.enqueue(Box::new(move || {
            let _done = done;
            run_checked(&what, &[(src, len)], |at| {
                // SAFETY: the caller keeps the destination valid until the copy
                // has run; the source is accessible device memory, resolved
                // under the lock.
                unsafe { std::ptr::copy(at[0] as *const u8, p.0 as *mut u8, len) }
            })
        }));
        if sync {
            // Pageable memory: the call returns once the bytes are there.
            st.wait_for(seq);
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    s: CUstream,
) -> CUresult {
    call(|| {
        let Some((d, st)) = queue_on(s, len)? else {
            return Ok(());
        };
        check_queued(d, dst, len)?;
        check_queued(d, src, len)?;
        if src < dst + len as u64 && dst < src + len as u64 {
            eprintln!("offload-fakecuda: device-to-device copy between overlapping ranges {src:#x} and {dst:#x} (+{len})");
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let what = format!("device-to-device copy of {len} bytes {src:#x} -> {dst:#x}");
        st.enqueue(Box::new(move || {
            run_checked(&what, &[(src, len), (dst, len)], |at| {
                // SAFETY: both ranges resolved to accessible device memory;
                // they do not overlap (checked when queued).
                unsafe { std::ptr::copy_nonoverlapping(at[0] as *const u8, at[1] as *mut u8, len) }
            })
        }));
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuMemsetD8Async(
    dst: CUdeviceptr,
    value: u8,
    len: usize,
    s: CUstream,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        // Can be captured in a graph.
        let st = d.stream_any(s)?;
        if len == 0 {
            return Ok(());
        }
        check_queued(d, dst, len)?;
        let what = format!("memset of {len} bytes at {dst:#x}");
        st.submit(Arc::new(move || {
            let what = what.clone();
            Box::new(move || {
                run_checked(&what, &[(dst, len)], |at| {
                    // SAFETY: the range resolved to accessible device memory.
                    unsafe { std::ptr::write_bytes(at[0] as *mut u8, value, len) }
                })
            })
        }));
        Ok(())
    })
}

#[cfg(test)]
mod tests;
