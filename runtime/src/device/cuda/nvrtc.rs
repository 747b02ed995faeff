//! Run-time compilation of CUDA C with NVRTC, and loading the result into a context.
//!
//! [`compile`] builds a source for one compute capability at first use and
//! caches the image for the process, per (name, source, compute capability):
//! a second device, or a second [`super::CudaDevice`] of the same GPU,
//! reuses it. The device loads an image into a context with
//! `cuModuleLoadData` (modules are per context, so each device keeps its own).
//!
//! The target is the device's own architecture, `--gpu-architecture=sm_XY`, which
//! makes NVRTC emit a cubin: the driver then loads machine code and never
//! JIT-compiles PTX, so an NVRTC newer than the driver (whose PTX the driver
//! would reject) still works. Only when this NVRTC does not know the
//! device's architecture is PTX for the newest older one (`compute_XY`)
//! emitted, which the driver compiles at load.
//!
//! Every program is given Offload's own minimal `cuda_fp16.h` and
//! `cuda_bf16.h` ([`HEADERS`]): NVRTC 13.0 bundles neither (checked with
//! the nvidia-cuda-nvrtc 13.0.88 wheel), and the program needs no CUDA
//! include folder on the machine.
//!
//! cudarc loads libnvrtc dynamically and panics when a call is made without
//! it, so [`nvrtc_present`] is asked first and a missing library is
//! [`NvrtcError::LibraryMissing`], listing the names tried
//! ([`library_candidates`]). For the CUDA 13.0 bindings (cudarc feature
//! `cuda-13000`) on Linux these are, in order: `libnvrtc.so`,
//! `libnvrtc64.so`, `libnvrtc64_13.so`, `libnvrtc64_130.so`,
//! `libnvrtc64_130_0.so`, `libnvrtc64_130_0.so`, `libnvrtc64_10.so`,
//! `libnvrtc64_11.so`, `libnvrtc64_12.so`, `libnvrtc64_130_0.so`,
//! `libnvrtc64_9.so`, `libnvrtc.so.13`, `libnvrtc.so.12`, `libnvrtc.so.11`,
//! `libnvrtc.so.10`, `libnvrtc.so.9`, `libnvrtc.so.1`; a CUDA 13 toolkit
//! answers to `libnvrtc.so.13` (and to `libnvrtc.so` where its development
//! link is installed).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use cudarc::nvrtc::sys as nv;

use super::disk_cache::{self, DiskCache};
use super::handles::Context;
use super::result;
use crate::error::{Error, Result};

/// Why a source could not be compiled.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NvrtcError {
    /// No NVRTC library could be loaded.
    #[error(
        "the NVRTC library could not be loaded (tried {}); install the CUDA toolkit's libnvrtc or add its folder to LD_LIBRARY_PATH",
        .candidates.join(", ")
    )]
    LibraryMissing {
        /// The library names tried.
        candidates: Vec<String>,
    },
    /// An NVRTC call other than the compilation failed.
    #[error("NVRTC call {call} failed with code {code} ({message})")]
    Call {
        /// The NVRTC function.
        call: &'static str,
        /// The raw `nvrtcResult`.
        code: i32,
        /// NVRTC's description of the code.
        message: String,
    },
    /// The source did not compile; `log` is NVRTC's program log.
    #[error("NVRTC {version} could not compile {name} for {target}:\n{log}")]
    Compile {
        /// The program's name.
        name: String,
        /// The target, e.g. `sm_90`.
        target: Target,
        /// NVRTC's version, e.g. `13.0`.
        version: String,
        /// NVRTC's program log.
        log: String,
    },
    /// NVRTC knows no architecture this device can run.
    #[error("NVRTC {version} cannot build code for compute capability {major}.{minor} (it supports {supported:?})")]
    UnsupportedArch {
        /// Compute capability, major.
        major: u32,
        /// Compute capability, minor.
        minor: u32,
        /// NVRTC's version.
        version: String,
        /// The `sm_XY` numbers NVRTC supports.
        supported: Vec<i32>,
    },
    /// The source or name holds a NUL byte.
    #[error("{0} holds a NUL byte")]
    NulByte(&'static str),
    /// cudarc panicked inside NVRTC's loading (a symbol missing from the library found).
    #[error("loading NVRTC panicked: {0}")]
    Panicked(String),
}

impl From<NvrtcError> for Error {
    fn from(e: NvrtcError) -> Self {
        match e {
            NvrtcError::LibraryMissing { .. } => Error::Unsupported(
                "CUDA kernels without the NVRTC library (libnvrtc.so.13 or libnvrtc.so could not be loaded)",
            ),
            other => Error::Kernel {
                kernel: "nvrtc",
                message: other.to_string(),
            },
        }
    }
}

/// What NVRTC is asked to produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Machine code for `sm_XY` (the number is `10 · major + minor`): a cubin.
    Cubin(u32),
    /// PTX for `compute_XY`, compiled by the driver when loaded.
    Ptx(u32),
}

impl Target {
    /// The `--gpu-architecture` option for this target.
    pub fn option(self) -> String {
        match self {
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cubin(a) => write!(f, "sm_{a}"),
            Target::Ptx(a) => write!(f, "compute_{a} (PTX)"),
        }
    }
}

/// The target for a device of compute capability `cc`, given the `sm_XY`
/// numbers NVRTC supports (empty if NVRTC could not say): the device's own
/// architecture when supported (or when the list is empty), else PTX for the
/// newest supported one below it; `None` if every supported one is newer.
pub fn choose_target(cc: (u32, u32), supported: &[i32]) -> Option<Target> {
    let arch = cc.0 * 10 + cc.1;
    if supported.is_empty() || supported.contains(&(arch as i32)) {
        return Some(Target::Cubin(arch));
    }
    supported
        .iter()
        .filter_map(|&a| u32::try_from(a).ok())
        .filter(|&a| a < arch)
        .max()
        .map(Target::Ptx)
}

/// The library names cudarc tries for NVRTC, in order (for the CUDA version
/// feature it was built with).
pub fn library_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("nvrtc")
}

static NVRTC_PRESENT: OnceLock<bool> = OnceLock::new();

/// Whether an NVRTC library can be loaded; asked once per process. Once
/// this returned true, the other functions of this module do not panic.
pub fn nvrtc_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    *NVRTC_PRESENT.get_or_init(|| unsafe { nv::is_culib_present() })
}

fn check(call: &'static str, r: nv::nvrtcResult) -> Result<(), NvrtcError> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: the library is loaded (every caller checked nvrtc_present);
    // nvrtcGetErrorString returns a static NUL-terminated string or null.
    let p = unsafe { nv::nvrtcGetErrorString(r) };
    let message = if p.is_null() {
        "no description".to_string()
    } else {
        // SAFETY: non-null, static and NUL-terminated (above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    Err(NvrtcError::Call {
        call,
        code: r as i32,
        message,
    })
}

fn missing() -> NvrtcError {
    NvrtcError::LibraryMissing {
        candidates: library_candidates(),
    }
}

/// Runs `f`, turning a panic (cudarc panics when a symbol is missing from
/// the loaded library) into [`NvrtcError::Panicked`].
fn guarded<T>(f: impl FnOnce() -> Result<T, NvrtcError>) -> Result<T, NvrtcError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(NvrtcError::Panicked(panic_message(p.as_ref()))),
    }
}

/// The message of a caught panic.
pub(super) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// NVRTC's version, `(major, minor)`.
pub fn version() -> Result<(i32, i32), NvrtcError> {
    if !nvrtc_present() {
        return Err(missing());
    }
    guarded(|| {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: the library is present (checked above); out-pointers to locals.
        check("nvrtcVersion", unsafe {
            nv::nvrtcVersion(&mut major, &mut minor)
        })?;
        Ok((major, minor))
    })
}

/// The `sm_XY` numbers this NVRTC can build for (e.g. `[75, 80, 86, 87, 89, 90, ...]`).
pub fn supported_archs() -> Result<Vec<i32>, NvrtcError> {
    if !nvrtc_present() {
        return Err(missing());
    }
    guarded(|| {
        let mut n: c_int = 0;
        // SAFETY: the library is present; out-pointer to a local.
        check("nvrtcGetNumSupportedArchs", unsafe {
            nv::nvrtcGetNumSupportedArchs(&mut n)
        })?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        if !archs.is_empty() {
            // SAFETY: `archs` holds the `n` entries NVRTC writes.
            check("nvrtcGetSupportedArchs", unsafe {
                nv::nvrtcGetSupportedArchs(archs.as_mut_ptr())
            })?;
        }
        Ok(archs)
    })
}

/// The path of a loaded shared library whose file name starts with
/// `prefix` (e.g. `"libnvrtc.so"`), read from `/proc/self/maps`.
pub fn loaded_library(prefix: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            p.rsplit('/')
                .next()
                .is_some_and(|file| file.starts_with(prefix))
        })
        .map(PathBuf::from)
}

/// A compiled image: a cubin, or NUL-terminated PTX.
#[derive(Debug)]
pub struct Image {
    /// What was built.
    pub target: Target,
    /// The cubin, or the PTX text with its terminating NUL.
    pub bytes: Vec<u8>,
    /// NVRTC's program log (warnings; usually empty, and always empty for
    /// an image read from the disk cache).
    pub log: String,
    /// NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// How long building took: NVRTC's compilation, or reading the image
    /// from the disk cache.
    pub build_time: Duration,
    /// The options NVRTC was given.
    pub options: Vec<String>,
    /// Whether the image came from the disk cache, was written to it, or neither.
    pub disk_cache: DiskCache,
}

/// An NVRTC program; destroyed on drop.
struct Program(nv::nvrtcProgram);

impl Program {
    fn new(source: &CStr, name: &CStr) -> Result<Self, NvrtcError> {
        let texts: Vec<CString> = HEADERS
            .iter()
            .map(|(_, t)| CString::new(*t).map_err(|_| NvrtcError::NulByte("a header")))
            .collect::<Result<_, _>>()?;
        let names: Vec<CString> = HEADERS
            .iter()
            .map(|(n, _)| CString::new(*n).map_err(|_| NvrtcError::NulByte("a header name")))
            .collect::<Result<_, _>>()?;
        let text_ptrs: Vec<*const c_char> = texts.iter().map(|t| t.as_ptr()).collect();
        let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let mut p: nv::nvrtcProgram = ptr::null_mut();
        // SAFETY: the library is present (callers check); every string is
        // NUL-terminated and lives for the call; the two header arrays have
        // `HEADERS.len()` entries each (NVRTC copies them).
        check("nvrtcCreateProgram", unsafe {
            nv::nvrtcCreateProgram(
                &mut p,
                source.as_ptr(),
                name.as_ptr(),
                HEADERS.len() as c_int,
                text_ptrs.as_ptr(),
                name_ptrs.as_ptr(),
            )
        })?;
        Ok(Program(p))
    }

    fn log(&self) -> Result<String, NvrtcError> {
        let mut n = 0usize;
        // SAFETY: a live program; out-pointer to a local.
        check("nvrtcGetProgramLogSize", unsafe {
            nv::nvrtcGetProgramLogSize(self.0, &mut n)
        })?;
        let mut buf = vec![0u8; n.max(1)];
        // SAFETY: `buf` holds the `n` bytes (NUL included) NVRTC writes.
        check("nvrtcGetProgramLog", unsafe {
            nv::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast::<c_char>())
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).trim_end().to_string())
    }

    fn output(&self, target: Target) -> Result<Vec<u8>, NvrtcError> {
        let mut n = 0usize;
        let mut buf;
        match target {
            Target::Cubin(_) => {
                // SAFETY: a live, compiled program; out-pointer to a local.
                check("nvrtcGetCUBINSize", unsafe {
                    nv::nvrtcGetCUBINSize(self.0, &mut n)
                })?;
                buf = vec![0u8; n];
                // SAFETY: `buf` holds the `n` bytes NVRTC writes.
                check("nvrtcGetCUBIN", unsafe {
                    nv::nvrtcGetCUBIN(self.0, buf.as_mut_ptr().cast::<c_char>())
                })?;
            }
            Target::Ptx(_) => {
                // SAFETY: as above.
                check("nvrtcGetPTXSize", unsafe {
                    nv::nvrtcGetPTXSize(self.0, &mut n)
                })?;
                buf = vec![0u8; n];
                // SAFETY: `buf` holds the `n` bytes (NUL included) NVRTC writes.
                check("nvrtcGetPTX", unsafe {
                    nv::nvrtcGetPTX(self.0, buf.as_mut_ptr().cast::<c_char>())
                })?;
                if buf.last() != Some(&0) {
                    buf.push(0);
                }
            }
        }
        Ok(buf)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: a live program, destroyed once.
        let _ = unsafe { nv::nvrtcDestroyProgram(&mut self.0) };
    }
}

/// The headers every program gets, `(include name, text)`: Offload's own
/// minimal `cuda_fp16.h` and `cuda_bf16.h` (see `nvrtc_include/`), since
/// NVRTC 13.0 bundles neither and a machine need not have a CUDA include
/// folder.
pub const HEADERS: [(&str, &str); 2] = [
    ("cuda_fp16.h", include_str!("nvrtc_include/cuda_fp16.h")),
    ("cuda_bf16.h", include_str!("nvrtc_include/cuda_bf16.h")),
];

fn compile_once(
    name: &str,
    source: &str,
    target: Target,
    options: &[String],
) -> Result<(Vec<u8>, String), NvrtcError> {
    let src = CString::new(source).map_err(|_| NvrtcError::NulByte("the source"))?;
    let cname = CString::new(name).map_err(|_| NvrtcError::NulByte("the program name"))?;
    let opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| NvrtcError::NulByte("an option")))
        .collect::<Result<_, _>>()?;
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let prog = Program::new(&src, &cname)?;
    // SAFETY: a live program; `ptrs` holds `ptrs.len()` NUL-terminated
    // options that live (in `opts`) for the call.
    let r = unsafe { nv::nvrtcCompileProgram(prog.0, ptrs.len() as c_int, ptrs.as_ptr()) };
    let log = prog.log().unwrap_or_default();
    if r == nv::nvrtcResult::NVRTC_ERROR_COMPILATION {
        return Err(NvrtcError::Compile {
            name: name.to_string(),
            target,
            version: String::new(),
            log,
        });
    }
    check("nvrtcCompileProgram", r)?;
    Ok((prog.output(target)?, log))
}

/// Builds `source` for `cc`: reads the image from the disk cache folder
/// `cache` when an entry for exactly this build is there, else compiles it
/// and writes it there. `None` always compiles and writes nothing.
fn build(
    name: &str,
    source: &str,
    cc: (u32, u32),
    cache: Option<&Path>,
) -> Result<Image, NvrtcError> {
    if !nvrtc_present() {
        return Err(missing());
    }
    guarded(|| {
        let start = Instant::now();
        let nvrtc_version = version()?;
        let v = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
        let supported = supported_archs().unwrap_or_default();
        let target = choose_target(cc, &supported).ok_or_else(|| NvrtcError::UnsupportedArch {
            major: cc.0,
            minor: cc.1,
            version: v.clone(),
            supported: supported.clone(),
        })?;
        let options = vec![target.option()];
        let key = disk_cache::Key {
            name: name.to_string(),
            target,
            nvrtc_version,
            nvrtc_library: library_identity(),
            options: options.clone(),
            headers: HEADERS
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
            source: source.to_string(),
        };
        if let Some((path, bytes)) = cache.and_then(|dir| disk_cache::load(dir, &key)) {
            return Ok(Image {
                target,
                bytes,
                log: String::new(),
                nvrtc_version,
                build_time: start.elapsed(),
                options,
                disk_cache: DiskCache::Loaded(path),
            });
        }
        let (bytes, log) = compile_once(name, source, target, &options).map_err(|e| match e {
            NvrtcError::Compile {
                name, target, log, ..
            } => NvrtcError::Compile {
                name,
                target,
                version: v.clone(),
                log,
            },
            other => other,
        })?;
        let build_time = start.elapsed();
        let disk_cache = match cache {
            None => DiskCache::Off,
            Some(dir) => match disk_cache::store(dir, &key, &bytes) {
                Ok(path) => DiskCache::Stored(path),
                Err(e) => DiskCache::NotStored {
                    path: dir.join(key.file_name()),
                    error: e.to_string(),
                },
            },
        };
        Ok(Image {
            target,
            bytes,
            log,
            nvrtc_version,
            build_time,
            options,
            disk_cache,
        })
    })
}

/// The loaded NVRTC library file as `path:size:modification time` (empty if
/// it cannot be found): NVRTC reports only its major and minor version, and
/// a patch release must not load images the previous one built.
fn library_identity() -> String {
    let Some(path) = loaded_library("libnvrtc.so") else {
        return String::new();
    };
    let meta = std::fs::metadata(&path).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}:{}:{mtime}", path.display(), meta.map_or(0, |m| m.len()))
}

/// Compiles `source` for `cc` with NVRTC now, bypassing both the process's
/// cache and the disk cache (and writing to neither).
pub fn compile_fresh(name: &str, source: &str, cc: (u32, u32)) -> Result<Image, NvrtcError> {
    build(name, source, cc, None)
}

type CacheKey = (String, String, (u32, u32));
type CacheSlot = Arc<OnceLock<Result<Arc<Image>, NvrtcError>>>;

static CACHE: OnceLock<Mutex<HashMap<CacheKey, CacheSlot>>> = OnceLock::new();

/// Compile `source` (a CUDA C translation unit called `name` in messages)
/// for a device of compute capability `cc`, once per process: later calls
/// with the same name, source and capability return the same image (or the
/// same error). Concurrent first calls compile once; the others wait.
/// The first call reads the image from the disk cache
/// ([`disk_cache::cache_dir`]) when an entry for exactly this build is
/// there, and otherwise writes the compiled image to it.
///
/// A compilation error is [`NvrtcError::Compile`] with NVRTC's log.
pub fn compile(name: &str, source: &str, cc: (u32, u32)) -> Result<Arc<Image>, NvrtcError> {
    let slot = {
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((name.to_string(), source.to_string(), cc))
            .or_default()
            .clone()
    };
    slot.get_or_init(|| build(name, source, cc, disk_cache::cache_dir().as_deref()).map(Arc::new))
        .clone()
}

/// A module loaded into a context; unloaded on drop.
#[derive(Debug)]
pub(super) struct Module {
    raw: sys::CUmodule,
    ctx: Arc<Context>,
}

// SAFETY: a CUmodule is a driver handle usable from any thread with its
// context bound; we never dereference it.
unsafe impl Send for Module {}
// SAFETY: as above; shared use only reads the handle.
unsafe impl Sync for Module {}

impl Module {
    /// Load `image` into `ctx`.
    pub(super) fn load(ctx: &Arc<Context>, image: &Image) -> Result<Self> {
        ctx.bind()?;
        // SAFETY: `image.bytes` is a whole cubin or NUL-terminated PTX
        // (Program::output), alive for the call.
        let raw = unsafe { result::module_load_data(image.bytes.as_ptr().cast::<c_void>())? };
        Ok(Module {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// The kernel `name` (an `extern "C"` entry point).
    pub(super) fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let cname = CString::new(name).map_err(|_| Error::Kernel {
            kernel: "nvrtc",
            message: format!("entry point name {name:?} holds a NUL byte"),
        })?;
        self.ctx.bind()?;
        // SAFETY: the module is live while `self` is.
        unsafe { result::module_get_function(self.raw, &cname) }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: loaded by `load`, unloaded once. The device drops its
        // modules only after synchronising the context, so no kernel of
        // this module is queued.
        let _ = unsafe { result::module_unload(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_the_device_arch_when_supported() {
        let archs = [75, 80, 86, 87, 89, 90, 100, 120];
        assert_eq!(choose_target((9, 0), &archs), Some(Target::Cubin(90)));
        assert_eq!(choose_target((8, 9), &archs), Some(Target::Cubin(89)));
        // Unknown to this NVRTC: PTX for the newest older architecture.
        assert_eq!(choose_target((9, 5), &archs), Some(Target::Ptx(90)));
        assert_eq!(choose_target((7, 0), &archs), None);
        // NVRTC could not say: try the device's own.
        assert_eq!(choose_target((9, 0), &[]), Some(Target::Cubin(90)));
        assert_eq!(Target::Cubin(90).option(), "--gpu-architecture=sm_90");
        assert_eq!(Target::Ptx(80).option(), "--gpu-architecture=compute_80");
    }

    #[test]
    fn candidates_include_the_cuda_13_soname() {
        let c = library_candidates();
        eprintln!("{c:?}");
        assert!(c.iter().any(|n| n == "libnvrtc.so.13"), "{c:?}");
        assert!(c.iter().any(|n| n == "libnvrtc.so"), "{c:?}");
    }

    #[test]
    fn without_nvrtc_compiling_is_an_error_not_a_panic() {
        if nvrtc_present() {
            return;
        }
        let r = compile("t", "extern \"C\" __global__ void k() {}", (9, 0));
        assert!(matches!(r, Err(NvrtcError::LibraryMissing { .. })), "{r:?}");
        assert!(matches!(version(), Err(NvrtcError::LibraryMissing { .. })));
        let e: Error = r.unwrap_err().into();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    }

    #[test]
    fn loaded_library_reads_proc_maps() {
        // libc is loaded in every test process.
        assert!(loaded_library("libc.so").is_some() || loaded_library("libc-").is_some());
        assert!(loaded_library("libsurely-not-loaded-offload").is_none());
    }
}

/// Compiling needs the NVRTC library but no GPU: these run wherever libnvrtc loads.
#[cfg(test)]
mod compile_tests {
    use super::*;

    #[test]
    #[ignore = "needs libnvrtc (a CUDA toolkit, or the nvidia-cuda-nvrtc wheel's lib folder on LD_LIBRARY_PATH)"]
    fn nvrtc_compiles_the_kernel_sources() {
        assert!(nvrtc_present(), "no NVRTC library loads here");
        let v = version().unwrap();
        let archs = supported_archs().unwrap();
        eprintln!(
            "NVRTC {v:?} from {:?}, archs {archs:?}",
            loaded_library("libnvrtc.so")
        );
        let sources = [
            ("lowrank_merge.cu", offload_kernels::cuda::LOWRANK_MERGE_SRC),
            ("offload_convert.cu", super::super::cublas::CONVERT_SRC),
        ];
        // H100/H200, A100, and the newest architecture this NVRTC knows.
        let newest = archs.iter().copied().max().unwrap_or(90) as u32;
        for cc in [(9, 0), (8, 0), (newest / 10, newest % 10)] {
            for (name, src) in sources {
                let image = compile_fresh(name, src, cc)
                    .unwrap_or_else(|e| panic!("{name} for {cc:?}: {e}"));
                assert_eq!(image.disk_cache, DiskCache::Off);
                eprintln!(
                    "{name} for {cc:?}: {} bytes of {} in {:?}, options {:?}, log {:?}",
                    image.bytes.len(),
                    image.target,
                    image.build_time,
                    image.options,
                    image.log
                );
                assert!(matches!(image.target, Target::Cubin(_)));
                // An ELF image.
                assert_eq!(&image.bytes[..4], b"\x7fELF");
            }
        }
        // Every entry point of every kernel, the batched ones included.
        use offload_kernels::cuda as k;
        let entries: Vec<&str> = offload_kernels::Dtype::ALL
            .into_iter()
            .flat_map(|d| {
                [
                    k::lowrank_merge_entry(d),
                    k::lowrank_merge_mma_entry(d),
                    k::lowrank_merge_batch_entry(d),
                    k::lowrank_merge_mma_batch_entry(d),
                    k::lowrank_merge_pipe_entry(d),
                    k::lowrank_merge_pipe_batch_entry(d),
                    k::merge_entry(d),
                ]
            })
            .collect();
        assert_eq!(entries.len(), 21);
        let image = compile_fresh(
            "lowrank_merge.cu",
            offload_kernels::cuda::LOWRANK_MERGE_SRC,
            (9, 0),
        )
        .unwrap();
        for e in entries {
            // The cubin's symbol table names each extern "C" entry point.
            assert!(
                image.bytes.windows(e.len()).any(|w| w == e.as_bytes()),
                "{e} is not in the cubin"
            );
        }
        // A compile error carries NVRTC's log.
        let r = compile_fresh(
            "broken.cu",
            "extern \"C\" __global__ void k(float* p) { p[0] = offload_no_such_function(1); }\n",
            (9, 0),
        );
        match r {
            Err(NvrtcError::Compile { log, .. }) => {
                assert!(log.contains("offload_no_such_function"), "{log}")
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }

    #[test]
    #[ignore = "needs libnvrtc (a CUDA toolkit, or the nvidia-cuda-nvrtc wheel's lib folder on LD_LIBRARY_PATH)"]
    fn the_disk_cache_gives_back_what_nvrtc_built() {
        assert!(nvrtc_present(), "no NVRTC library loads here");
        /// Removes the cache folder however the test ends (a failed
        /// assertion included: rehearsals on the fake driver fail it).
        struct Cleanup(std::path::PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("offload-nvrtc-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Cleanup(dir.clone());
        let (name, src) = ("offload_convert.cu", super::super::cublas::CONVERT_SRC);
        let first = build(name, src, (9, 0), Some(&dir)).unwrap();
        let DiskCache::Stored(path) = &first.disk_cache else {
            panic!("not stored: {:?}", first.disk_cache)
        };
        assert!(first.bytes.starts_with(b"\x7fELF"));
        let second = build(name, src, (9, 0), Some(&dir)).unwrap();
        assert_eq!(second.disk_cache, DiskCache::Loaded(path.clone()));
        // `assert!` rather than `assert_eq!`: a failure would print the images.
        assert!(
            second.bytes == first.bytes,
            "the loaded image is not the stored one"
        );
        assert_eq!(
            (second.target, &second.options, second.nvrtc_version),
            (first.target, &first.options, first.nvrtc_version)
        );
        eprintln!(
            "{name}: compiled in {:?}, loaded from {path:?} in {:?}",
            first.build_time, second.build_time
        );
        // Another architecture is another entry.
        let other = build(name, src, (8, 0), Some(&dir)).unwrap();
        assert!(matches!(other.disk_cache, DiskCache::Stored(ref p) if p != path));
        // A damaged entry is compiled again and replaced. (Not compared with
        // the first image: NVRTC 13.0 need not build the same bytes twice.)
        let mut bytes = std::fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(path, &bytes).unwrap();
        let repaired = build(name, src, (9, 0), Some(&dir)).unwrap();
        assert_eq!(repaired.disk_cache, DiskCache::Stored(path.clone()));
        let third = build(name, src, (9, 0), Some(&dir)).unwrap();
        assert_eq!(third.disk_cache, DiskCache::Loaded(path.clone()));
        assert!(
            third.bytes == repaired.bytes,
            "the repaired entry does not load back"
        );
        // A source that does not compile is an error and stores nothing.
        let before = std::fs::read_dir(&dir).unwrap().count();
        assert!(build(
            "broken.cu",
            "extern \"C\" __global__ void k() { nope(); }",
            (9, 0),
            Some(&dir)
        )
        .is_err());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), before);
    }
}
