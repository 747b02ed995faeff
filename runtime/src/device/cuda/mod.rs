//! The CUDA backend (feature `cuda`): probing for a driver and a GPU, and `CudaDevice`.
//!
//! cudarc is used with dynamic loading, so this module compiles and the
//! binary starts on machines without CUDA. cudarc panics if its safe layer is
//! used without a driver library, so [`probe()`] checks for the library and a
//! device with raw `sys` calls before anything else touches CUDA.
//!
//! The device is built on the raw driver API only (`cudarc::driver::sys`),
//! layered like cudarc itself: `result` holds checked wrappers of the driver
//! calls returning our [`Error::Cuda`] (with the raw code), `handles` owns
//! contexts, streams, events and host registrations, `memory` keeps the
//! page and range bookkeeping, and [`CudaDevice`] puts them together behind
//! the [`Device`] trait. cudarc's safe `CudaSlice` is not used: it carries
//! read/write events that would serialise the copy and compute streams.
//!
//! Memory comes in one of two modes, chosen when the device is opened:
//! the virtual memory management API (pages from `cuMemCreate` at the
//! allocation granularity, ranges from `cuMemAddressReserve`, mapped with
//! `cuMemMap` + `cuMemSetAccess`), or, where a trial of that API fails (some
//! GPU machines run under a sandboxing kernel), a fallback without pages or
//! ranges ([`Device::maps_pages`] is false; [`Device::alloc_page`],
//! [`Device::reserve`] and [`Device::map`] fail with [`Error::Unsupported`])
//! in which device memory is plain `cuMemAlloc` allocations
//! ([`Device::alloc_contiguous`], which works in both modes); the arena then
//! makes each of its allocations one of those. [`CudaDevice::vmm_supported`]
//! says which mode is in use and [`CudaDevice::vmm_unavailable_reason`] why.
//!
//! Kernels: [`Kernel::Fill`] is a driver memset; [`Kernel::Matmul`] goes
//! through cuBLAS ([`cublas`]); the LoRA merge kernels of
//! `offload_kernels::cuda` are compiled by NVRTC ([`nvrtc`]) for the
//! device's compute capability at first use; [`Kernel::Merge`] runs the
//! low-rank kernel (fp32 FMA, or tensor cores for ranks above 32 with
//! f16/bf16 factors on sm_80+) when every adapter is low-rank, else the
//! general kernel that takes low-rank, LoHa and LoKr adapters in one launch
//! ([`CudaDevice::merge_lowrank`], `merge.rs`); [`Kernel::MergeBatch`] merges
//! a layer's low-rank tensors in one batched launch per W dtype and kernel
//! (up to 16 tensors each, [`CudaDevice::merge_lowrank_batch`]) and the
//! others one launch each.

pub mod cublas;
pub mod cublaslt;
pub mod disk_cache;
mod graphs;
mod handles;
mod memory;
mod merge;
pub mod nvrtc;
pub mod probe;
mod result;

#[cfg(test)]
mod kernel_tests;
#[cfg(test)]
mod tests;

pub use cublas::BlasInfo;
pub use cublaslt::MatmulLaunches;
pub use disk_cache::DiskCache;
pub use graphs::{GraphLaunches, MAX_GRAPHS};
pub use handles::HostRegistration;
pub use merge::{LowRankKernel, LowRankMerge, MergeKernelsInfo, MergeLaunches};
pub use nvrtc::NvrtcError;
pub use probe::{probe, Probe, ProbeError};

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use dashmap::DashMap;

use self::handles::{Context, Event, Stream};
use self::memory::MemState;
use super::pinned::PinnedFree;
use super::{
    BackendKind, Device, DeviceInfo, DevicePtr, EventId, HostFn, Kernel, KernelFamily, MemoryInfo,
    PhysPage, PinnedBuffer, StreamId, StreamPriority, VirtualRange,
};
use crate::error::{Error, Result};

/// Page size used in fallback mode when the driver reports no allocation granularity.
const FALLBACK_PAGE_SIZE: usize = 2 << 20;

/// Longest sleep between two polls of an event in [`Device::event_wait`] with a timeout.
const MAX_POLL_SLEEP: Duration = Duration::from_micros(500);

/// Options for opening a [`CudaDevice`].
#[derive(Clone, Debug)]
pub struct CudaConfig {
    /// Use the virtual memory management API when a trial of it works (default).
    /// When false, the device runs in fallback mode, as on machines where the
    /// trial fails: useful to test that mode on any GPU.
    pub use_vmm: bool,
    /// Give [`LowRankKernel::Auto`]'s tensor-core merges to the pipelined
    /// tensor-core kernel ([`LowRankKernel::Pipelined`], from rank 16 up:
    /// [`offload_kernels::cuda::LowRankMergeParams::pipelined_tensor_cores`];
    /// the default, timed faster on an H200) rather than to the other one
    /// ([`LowRankKernel::TensorCores`], from rank 32 up:
    /// [`offload_kernels::cuda::LowRankMergeParams::tensor_cores`]). Covers
    /// every merge the runtime queues (fuse-on-upload included).
    pub pipelined_merges: bool,
    /// How many SMs the low-rank merge kernels size their grids for: `None`
    /// (the default) for all of them; fewer leave more SMs to the engine's
    /// kernels while merges run beside them (the merge grids are
    /// persistent: a block holds its SM until it has walked its share of
    /// W). A batched launch shares the cap among its jobs (at least one SM
    /// each). A grid keeps at least one block per column strip of W, so a
    /// small W, or a batch of many, can take more than the cap; values
    /// above the GPU's SM count count as all of them.
    pub merge_multiprocessors: Option<u32>,
    /// Merge stacks of ranks adding up to at most 8 that go to a streaming
    /// kernel on its variant with the down factors in shared memory
    /// ([`offload_kernels::cuda::StreamKernel::Ranks8Shared`]: twice the
    /// rows of W in flight a warp, the same bits) rather than in
    /// registers (the default, the one timed on a GPU).
    pub stream8_shared: bool,
    /// Run the pipelined tensor-core merges ([`LowRankKernel::Pipelined`],
    /// fuse-on-upload's included) on 128 × 128 tiles, sixteen warps and one
    /// block an SM
    /// ([`offload_kernels::cuda::lowrank_merge_pipe_tall_entry`]: each
    /// chunk of the down factors read once per 128 rows of W instead of
    /// 64, the same bits) rather than on 64 × 128 tiles (the default, the
    /// one timed on a GPU).
    pub pipe_tall: bool,
    /// Which cuBLAS interface queues the products of [`Kernel::Matmul`].
    pub matmul: MatmulLibrary,
    /// Queue each list of products handed to [`Device::launch_all`] as one
    /// CUDA graph, captured at the list's second call (the first queues it
    /// product by product) and launched again at every later one with the
    /// same operands (counted in [`GraphLaunches`]);
    /// off by default (not yet timed on a GPU).
    pub graphs: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            use_vmm: true,
            pipelined_merges: true,
            merge_multiprocessors: None,
            stream8_shared: false,
            pipe_tall: false,
            matmul: MatmulLibrary::GemmEx,
            graphs: false,
        }
    }
}

/// The cuBLAS interface that queues the products of [`Kernel::Matmul`]
/// ([`CudaConfig::matmul`]); both compute the same product in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulLibrary {
    /// One `cublasGemmEx` a product, which chooses an algorithm at every
    /// call (the default, the one timed on GPUs so far).
    #[default]
    GemmEx,
    /// cuBLASLt: the heuristic asked once per shape, then one
    /// `cublasLtMatmul` a product with the kept algorithm, meant to cost
    /// the queueing thread less a product (see [`cublaslt`]; not yet timed
    /// on a GPU).
    Lt,
}

/// The environment variable [`CudaConfig::from_env`] reads for
/// [`CudaConfig::matmul`]: `gemm-ex` (or unset, or empty) for the default,
/// `lt` for cuBLASLt.
pub const MATMUL_ENV: &str = "OFFLOAD_MATMUL";

/// The environment variable [`CudaConfig::from_env`] reads for
/// [`CudaConfig::graphs`]: `on`, or `off` (or unset, or empty) for the default.
pub const GRAPHS_ENV: &str = "OFFLOAD_GRAPHS";

/// The environment variable [`CudaConfig::from_env`] reads: `auto` (or
/// unset, or empty) or `pipelined` for the default merge kernels,
/// `tensor-cores` for the unpipelined tensor-core kernel in their place
/// ([`CudaConfig::pipelined_merges`] false).
pub const MERGE_KERNEL_ENV: &str = "OFFLOAD_MERGE_KERNEL";

/// The environment variable [`CudaConfig::from_env`] reads for
/// [`CudaConfig::merge_multiprocessors`]: a whole number of SMs (at least
/// 1), or unset or empty for all of them.
pub const MERGE_SMS_ENV: &str = "OFFLOAD_MERGE_SMS";

/// The environment variable [`CudaConfig::from_env`] reads for
/// [`CudaConfig::stream8_shared`]: `shared`, or `registers` (or unset, or
/// empty) for the default.
pub const STREAM8_ENV: &str = "OFFLOAD_STREAM8";

/// The environment variable [`CudaConfig::from_env`] reads for
/// [`CudaConfig::pipe_tall`]: `128`, or `64` (or unset, or empty) for the
/// default.
pub const PIPE_ROWS_ENV: &str = "OFFLOAD_PIPE_ROWS";

impl CudaConfig {
    /// The default configuration with [`MERGE_KERNEL_ENV`],
    /// [`MERGE_SMS_ENV`], [`STREAM8_ENV`], [`PIPE_ROWS_ENV`], [`MATMUL_ENV`] and [`GRAPHS_ENV`] applied; what
    /// [`CudaDevice::new`] (and so [`auto`](crate::device::auto)) opens a
    /// GPU with, so that a benchmark can compare merge and product settings
    /// end to end without a rebuild. Any other
    /// value is an [`Error::Config`] naming the variable and the value.
    pub fn from_env() -> Result<CudaConfig> {
        CudaConfig::default()
            .with_merge_kernel_var(std::env::var_os(MERGE_KERNEL_ENV).as_deref())?
            .with_merge_sms_var(std::env::var_os(MERGE_SMS_ENV).as_deref())?
            .with_stream8_var(std::env::var_os(STREAM8_ENV).as_deref())?
            .with_pipe_rows_var(std::env::var_os(PIPE_ROWS_ENV).as_deref())?
            .with_matmul_var(std::env::var_os(MATMUL_ENV).as_deref())?
            .with_graphs_var(std::env::var_os(GRAPHS_ENV).as_deref())
    }

    /// `self` with [`GRAPHS_ENV`]'s value `value` (`None`: unset) applied,
    /// as [`CudaConfig::from_env`] does.
    fn with_graphs_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        let choices = [("off", false), ("on", true)];
        self.graphs = env_choice(GRAPHS_ENV, value, &choices)?.unwrap_or(false);
        Ok(self)
    }

    /// `self` with [`MATMUL_ENV`]'s value `value` (`None`: unset) applied,
    /// as [`CudaConfig::from_env`] does.
    fn with_matmul_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        let choices = [
            ("gemm-ex", MatmulLibrary::GemmEx),
            ("lt", MatmulLibrary::Lt),
        ];
        self.matmul = env_choice(MATMUL_ENV, value, &choices)?.unwrap_or_default();
        Ok(self)
    }

    /// `self` with [`STREAM8_ENV`]'s value `value` (`None`: unset) applied,
    /// as [`CudaConfig::from_env`] does.
    fn with_stream8_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        let choices = [("registers", false), ("shared", true)];
        self.stream8_shared = env_choice(STREAM8_ENV, value, &choices)?.unwrap_or(false);
        Ok(self)
    }

    /// `self` with [`PIPE_ROWS_ENV`]'s value `value` (`None`: unset)
    /// applied, as [`CudaConfig::from_env`] does.
    fn with_pipe_rows_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        let choices = [("64", false), ("128", true)];
        self.pipe_tall = env_choice(PIPE_ROWS_ENV, value, &choices)?.unwrap_or(false);
        Ok(self)
    }

    /// `self` with [`MERGE_SMS_ENV`]'s value `value` (`None`: unset)
    /// applied, as [`CudaConfig::from_env`] does.
    fn with_merge_sms_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        match value.map(|v| v.to_str()) {
            None | Some(Some("")) => {}
            Some(Some(v)) if v.parse::<u32>().is_ok_and(|n| n > 0) => {
                self.merge_multiprocessors = v.parse().ok();
            }
            Some(_) => {
                return Err(Error::Config(format!(
                    "{MERGE_SMS_ENV}={:?}: expected a whole number of SMs, at least 1",
                    value.unwrap_or_default()
                )))
            }
        }
        Ok(self)
    }

    /// `self` with [`MERGE_KERNEL_ENV`]'s value `value` (`None`: unset)
    /// applied, as [`CudaConfig::from_env`] does.
    fn with_merge_kernel_var(mut self, value: Option<&std::ffi::OsStr>) -> Result<CudaConfig> {
        // `auto` (as unset) keeps the default.
        let choices = [
            ("auto", None),
            ("pipelined", Some(true)),
            ("tensor-cores", Some(false)),
        ];
        if let Some(Some(pipelined)) = env_choice(MERGE_KERNEL_ENV, value, &choices)? {
            self.pipelined_merges = pipelined;
        }
        Ok(self)
    }
}

/// What `value`, the value of the environment variable `var`, names among
/// `choices` (name, what it selects): `None` when unset or empty; any other
/// value is an [`Error::Config`] naming the variable, the value and the
/// names it takes.
fn env_choice<T: Copy>(
    var: &str,
    value: Option<&std::ffi::OsStr>,
    choices: &[(&str, T)],
) -> Result<Option<T>> {
    let Some(v) = value else {
        return Ok(None);
    };
    match v.to_str() {
        Some("") => return Ok(None),
        Some(name) => {
            if let Some(&(_, t)) = choices.iter().find(|(n, _)| *n == name) {
                return Ok(Some(t));
            }
        }
        None => {}
    }
    let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
    let expected = match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "nothing".to_string(),
    };
    Err(Error::Config(format!("{var}={v:?}: expected {expected}")))
}

/// Host-function failures (panics) per stream, reported at the stream's next synchronisation.
type HostFnFailures = Arc<Mutex<HashMap<u64, String>>>;

/// An NVIDIA GPU driven through the CUDA driver API.
///
/// Stream and event handles hold the raw `CUstream` / `CUevent` pointer
/// values; handles the device does not know (never made, or destroyed) are
/// rejected with [`Error::UnknownStream`] / [`Error::UnknownEvent`]. Every
/// method makes the device's primary context current on the calling thread.
///
/// Host functions ([`Device::launch_host_fn`]) run on a driver thread and,
/// as CUDA requires, must not call into CUDA, so not into this device either.
pub struct CudaDevice {
    info: DeviceInfo,
    ordinal: u32,
    ctx: Arc<Context>,
    vmm_unavailable: Option<String>,
    host_register: bool,
    read_only_register: bool,
    /// Streaming multiprocessors.
    multiprocessors: u32,
    /// The SMs the merge kernels size their grids by
    /// ([`CudaConfig::merge_multiprocessors`], at most `multiprocessors`).
    merge_multiprocessors: u32,
    /// [`CudaConfig::pipelined_merges`].
    pipelined_merges: bool,
    /// [`CudaConfig::stream8_shared`].
    stream8_shared: bool,
    /// [`CudaConfig::pipe_tall`].
    pipe_tall: bool,
    /// [`CudaConfig::matmul`].
    matmul: MatmulLibrary,
    mem: Mutex<MemState>,
    streams: DashMap<u64, Arc<Stream>>,
    events: DashMap<u64, Arc<Event>>,
    host_fn_failures: HostFnFailures,
    /// The merge kernels, loaded at the first merge.
    merge: Mutex<Option<Arc<merge::MergeKernels>>>,
    /// Merge kernels launched, by kernel ([`CudaDevice::merge_launches`]).
    merge_launches: Mutex<MergeLaunches>,
    /// cuBLAS, created at the first product; the lock serialises
    /// `cublasSetStream` + the product.
    blas: Mutex<Option<cublas::Blas>>,
    /// [`CudaConfig::graphs`].
    graphs_on: bool,
    /// The graphs of [`Device::launch_all`] kept so far.
    graphs: Mutex<graphs::Graphs>,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("info", &self.info)
            .field("vmm", &self.vmm_supported())
            .field("host_register", &self.host_register)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_oom(e: &Error) -> bool {
    result::code_of(e) == Some(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY as i32)
}

impl CudaDevice {
    /// `len` bytes from cuMemHostAlloc with `flags`, owned by a [`PinnedBuffer`].
    fn host_alloc(&self, len: usize, flags: std::ffi::c_uint) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        self.ctx.bind()?;
        let p = match result::mem_host_alloc(len, flags) {
            Ok(p) => p,
            Err(e) if is_oom(&e) => {
                return Err(Error::DeviceOutOfMemory {
                    wanted: len,
                    available: 0,
                })
            }
            Err(e) => return Err(e),
        };
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Error::DeviceOutOfMemory {
            wanted: len,
            available: 0,
        })?;
        let ctx = self.ctx.clone();
        let free: PinnedFree = Box::new(move |p, _| {
            let _ = ctx.bind();
            // SAFETY: allocated by cuMemHostAlloc above and freed once, when the
            // buffer drops; queued copies must have finished by then (the copy
            // functions' contract).
            let _ = unsafe { result::mem_free_host(p.as_ptr().cast()) };
        });
        // SAFETY: `ptr` is a fresh cuMemHostAlloc block of `len` bytes that only
        // the buffer owns; `free` gives it back once, with the context kept
        // alive by the Arc it holds.
        Ok(unsafe { PinnedBuffer::from_raw_parts(ptr, len, free) })
    }

    /// Open GPU `ordinal` with the default configuration and
    /// [`MERGE_KERNEL_ENV`] applied ([`CudaConfig::from_env`]).
    ///
    /// Fails, without panicking, when no driver library can be loaded, or
    /// with [`Error::Config`] when the variable holds an unknown value.
    pub fn new(ordinal: u32) -> Result<Self> {
        Self::with_config(ordinal, &CudaConfig::from_env()?)
    }

    /// Open GPU `ordinal`: retain its primary context, read its facts, and
    /// probe whether the virtual memory API and host registration work.
    pub fn with_config(ordinal: u32, config: &CudaConfig) -> Result<Self> {
        if !result::driver_present() {
            return Err(Error::Unsupported(
                "the CUDA backend without a driver library (libcuda.so could not be loaded)",
            ));
        }
        result::init()?;
        let dev = result::device_get(ordinal)?;
        let ctx = Arc::new(Context::retain(dev)?);
        ctx.bind()?;
        let name = result::device_name(dev)?;
        let total_memory = result::device_total_mem(dev)?;
        let major = result::device_attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )?;
        let minor = result::device_attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )?;
        let multiprocessors = result::device_attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?
        .max(1) as u32;
        let granularity = result::allocation_granularity(ordinal);
        let page_size = match granularity {
            Ok(g) if g.is_power_of_two() => g,
            _ => FALLBACK_PAGE_SIZE,
        };
        let vmm_unavailable = if config.use_vmm {
            probe_vmm(dev, ordinal, &granularity)
        } else {
            Some("disabled by configuration".to_string())
        };
        let host_register = probe_host_register(dev);
        let read_only_register = host_register
            && result::device_attribute(
                dev,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
            )
            .is_ok_and(|v| v != 0);
        let vmm = vmm_unavailable.is_none();
        let graphs = graphs::Graphs::new(&ctx);
        Ok(CudaDevice {
            info: DeviceInfo {
                kind: BackendKind::Cuda,
                name,
                total_memory,
                page_size,
                compute_capability: Some((major as u32, minor as u32)),
            },
            ordinal,
            ctx,
            vmm_unavailable,
            host_register,
            read_only_register,
            multiprocessors,
            merge_multiprocessors: config
                .merge_multiprocessors
                .map_or(multiprocessors, |n| n.clamp(1, multiprocessors.max(1))),
            pipelined_merges: config.pipelined_merges,
            stream8_shared: config.stream8_shared,
            pipe_tall: config.pipe_tall,
            matmul: config.matmul,
            mem: Mutex::new(MemState::new(page_size, vmm)),
            streams: DashMap::new(),
            events: DashMap::new(),
            host_fn_failures: Arc::new(Mutex::new(HashMap::new())),
            merge: Mutex::new(None),
            merge_launches: Mutex::new(MergeLaunches::default()),
            blas: Mutex::new(None),
            graphs_on: config.graphs,
            graphs: Mutex::new(graphs),
        })
    }

    /// Fixed facts about the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The GPU's streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    /// The SMs the merge kernels size their grids for
    /// ([`CudaConfig::merge_multiprocessors`]; all of them by default).
    pub fn merge_multiprocessors(&self) -> u32 {
        self.merge_multiprocessors
    }

    /// Whether ranks-8 streaming merges keep the down factors in shared
    /// memory ([`CudaConfig::stream8_shared`]).
    pub fn stream8_shared(&self) -> bool {
        self.stream8_shared
    }

    /// Whether pipelined tensor-core merges run on 128-row tiles
    /// ([`CudaConfig::pipe_tall`]).
    pub fn pipe_tall(&self) -> bool {
        self.pipe_tall
    }

    /// The cuBLAS interface that queues the products ([`CudaConfig::matmul`]).
    pub fn matmul_library(&self) -> MatmulLibrary {
        self.matmul
    }

    /// Whether tensor-core merges run on the pipelined kernel
    /// ([`CudaConfig::pipelined_merges`]).
    pub fn pipelined_merges(&self) -> bool {
        self.pipelined_merges
    }

    /// Whether memory goes through the virtual memory API (pages mapped into
    /// reserved ranges) rather than the fallback of plain allocations.
    pub fn vmm_supported(&self) -> bool {
        self.vmm_unavailable.is_none()
    }

    /// Why the virtual memory API is not used, in fallback mode.
    pub fn vmm_unavailable_reason(&self) -> Option<&str> {
        self.vmm_unavailable.as_deref()
    }

    /// Whether registering existing host memory ([`register_host`](Self::register_host)) works here.
    pub fn host_register_supported(&self) -> bool {
        self.host_register
    }

    /// Whether host memory can be registered read-only (needed for read-only mappings such as a mapped file).
    pub fn read_only_register_supported(&self) -> bool {
        self.read_only_register
    }

    /// The raw primary context, for libraries that need it (cuBLAS, module loading).
    pub fn raw_context(&self) -> sys::CUcontext {
        self.ctx.raw()
    }

    /// Make the device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind()
    }

    /// The raw `CUstream` of a live stream, for libraries that queue work on
    /// it (cuBLAS). It stays valid until the stream is destroyed.
    pub fn raw_stream(&self, stream: StreamId) -> Result<sys::CUstream> {
        Ok(self.stream(stream)?.raw)
    }

    /// What [`auto`](crate::device::auto) adds to its line about the
    /// device: empty when the virtual memory API and host registration work,
    /// else (starting with "; ") which fallback is in use and why.
    pub fn memory_mode_note(&self) -> String {
        let mut note = String::new();
        if let Some(why) = self.vmm_unavailable_reason() {
            note.push_str(&format!(
                "; fallback arena: one plain cuMemAlloc allocation per arena allocation, no page mapping, because the CUDA virtual memory API is unavailable ({why})"
            ));
        }
        if !self.host_register {
            note.push_str("; cuMemHostRegister does not work here (not needed: the runtime pins host memory with cuMemHostAlloc)");
        }
        if !self.pipelined_merges {
            note.push_str(&format!(
                "; tensor-core merges on the unpipelined kernel ({MERGE_KERNEL_ENV}=tensor-cores)"
            ));
        }
        if self.stream8_shared {
            note.push_str(&format!(
                "; ranks-8 streaming merges with the down factors in shared memory ({STREAM8_ENV}=shared)"
            ));
        }
        if self.pipe_tall {
            note.push_str(&format!(
                "; pipelined tensor-core merges on 128-row tiles ({PIPE_ROWS_ENV}=128)"
            ));
        }
        if self.merge_multiprocessors < self.multiprocessors {
            note.push_str(&format!(
                "; merge grids sized for {} of the {} SMs ({MERGE_SMS_ENV})",
                self.merge_multiprocessors, self.multiprocessors
            ));
        }
        if self.matmul == MatmulLibrary::Lt {
            note.push_str(&format!(
                "; matrix products through cuBLASLt, one algorithm a shape ({MATMUL_ENV}=lt)"
            ));
        }
        if self.graphs_on {
            note.push_str(&match self.graphs_off() {
                None => format!("; each list of products as one CUDA graph ({GRAPHS_ENV}=on)"),
                Some(why) => format!("; {GRAPHS_ENV}=on, but graphs are off: {why}"),
            });
        }
        note
    }

    /// Page-lock an existing host buffer with `cuMemHostRegister` (read-only
    /// when `read_only`: the device only reads it, and read-only mappings can
    /// be registered), so that asynchronous copies from it run at pinned speed.
    /// Unregistered when the returned registration drops.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped host memory (and writable unless
    /// `read_only`) that stays mapped until the registration drops, and no
    /// copy queued on it may still be running when it drops.
    pub unsafe fn register_host(
        &self,
        ptr: *const u8,
        len: usize,
        read_only: bool,
    ) -> Result<HostRegistration> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !self.host_register {
            return Err(Error::Unsupported(
                "registering host memory (cuMemHostRegister failed its probe)",
            ));
        }
        if read_only && !self.read_only_register {
            return Err(Error::Unsupported("registering host memory read-only"));
        }
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { HostRegistration::new(&self.ctx, ptr, len, read_only) }
    }

    fn stream(&self, stream: StreamId) -> Result<Arc<Stream>> {
        self.streams
            .get(&stream.0)
            .map(|s| s.clone())
            .ok_or(Error::UnknownStream(stream))
    }

    fn event(&self, event: EventId) -> Result<Arc<Event>> {
        self.events
            .get(&event.0)
            .map(|e| e.clone())
            .ok_or(Error::UnknownEvent(event))
    }

    fn out_of_memory(&self, wanted: usize) -> Error {
        Error::DeviceOutOfMemory {
            wanted,
            available: result::mem_get_info().map(|(f, _)| f).unwrap_or(0),
        }
    }

    /// `cuMemAlloc` of `len` bytes, out of memory as [`Error::DeviceOutOfMemory`].
    fn mem_alloc(&self, len: usize) -> Result<u64> {
        match result::mem_alloc(len) {
            Ok(p) => Ok(p),
            Err(e) if is_oom(&e) => Err(self.out_of_memory(len)),
            Err(e) => Err(e),
        }
    }
}

/// Whether the virtual memory API works on this device: `None` if it does,
/// else why not. Tries one page: create, reserve, map, set access, undo.
fn probe_vmm(dev: sys::CUdevice, ordinal: u32, granularity: &Result<usize>) -> Option<String> {
    match result::device_attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
    ) {
        Ok(0) => return Some("the device reports no virtual memory management support".into()),
        Err(e) => return Some(format!("querying virtual memory management support: {e}")),
        Ok(_) => {}
    }
    let g = match granularity {
        Ok(g) if g.is_power_of_two() => *g,
        Ok(g) => return Some(format!("allocation granularity {g} is not a power of two")),
        Err(e) => return Some(format!("querying the allocation granularity: {e}")),
    };
    let handle = match result::mem_create(g, ordinal) {
        Ok(h) => h,
        Err(e) => return Some(format!("a trial cuMemCreate of one page: {e}")),
    };
    let trial = (|| -> Result<()> {
        let va = result::address_reserve(g, g)?;
        // SAFETY: `va..va+g` is the range just reserved, unmapped; `handle` a
        // live allocation of `g` bytes. Nothing else knows either, so
        // unmapping and freeing them here affects no one.
        let mapped = unsafe {
            result::mem_map(va, g, handle).and_then(|()| {
                let access = result::mem_set_access_rw(va, g, ordinal);
                let unmap = result::mem_unmap(va, g);
                access.and(unmap)
            })
        };
        // SAFETY: as above; the range is unmapped again (or was never mapped).
        let freed = unsafe { result::address_free(va, g) };
        mapped.and(freed)
    })();
    // SAFETY: `handle` came from mem_create above and is no longer mapped.
    let _ = unsafe { result::mem_release(handle) };
    trial.err().map(|e| format!("a trial map of one page: {e}"))
}

/// Whether `cuMemHostRegister` works here: the device attribute, then a trial on one OS page.
fn probe_host_register(dev: sys::CUdevice) -> bool {
    let supported = result::device_attribute(
        dev,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED,
    );
    if !supported.is_ok_and(|v| v != 0) {
        return false;
    }
    let ps = rustix::param::page_size();
    let Ok(layout) = std::alloc::Layout::from_size_align(ps, ps) else {
        return false;
    };
    // SAFETY: the layout has a non-zero size.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return false;
    }
    // SAFETY: `p` is a live, page-aligned allocation of one page that stays
    // allocated until after we unregister it below; no copy uses it.
    let ok = unsafe {
        result::mem_host_register(p.cast(), ps, sys::CU_MEMHOSTREGISTER_PORTABLE)
            .and_then(|()| result::mem_host_unregister(p.cast()))
            .is_ok()
    };
    // SAFETY: allocated above with this layout, unregistered (or never registered).
    unsafe { std::alloc::dealloc(p, layout) };
    ok
}

/// What [`host_fn_trampoline`] receives: the function and where to report a panic.
struct HostCall {
    f: HostFn,
    stream: u64,
    failures: HostFnFailures,
}

/// Runs a [`HostFn`] queued by [`Device::launch_host_fn`]; called by the driver.
///
/// # Safety
/// `data` is a `Box<HostCall>` turned into a raw pointer by `launch_host_fn`,
/// passed here exactly once.
unsafe extern "C" fn host_fn_trampoline(data: *mut c_void) {
    // SAFETY: the function's contract: we own the box now.
    let call = unsafe { Box::from_raw(data.cast::<HostCall>()) };
    // A panic must not unwind into the driver: catch it, and report it at the
    // stream's next synchronisation as the host backend does.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let HostCall {
            f,
            stream,
            failures,
        } = *call;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            lock(&failures)
                .entry(stream)
                .or_insert_with(|| "host function panicked".to_string());
        }
    }));
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        let ids: Vec<u64> = self.streams.iter().map(|s| *s.key()).collect();
        for id in ids {
            if let Some((_, s)) = self.streams.remove(&id) {
                // SAFETY: `s` keeps the stream alive for this call.
                let _ = unsafe { result::stream_synchronize(s.raw) };
            }
        }
        self.events.clear();
        let _ = result::ctx_synchronize();
        // Nothing is queued any more: unload the kernels, free cuBLAS and its scratch.
        lock(&self.merge).take();
        lock(&self.blas).take();
        let ps = self.info.page_size;
        let vmm = self.vmm_unavailable.is_none();
        let mem = self.mem.get_mut().unwrap_or_else(|p| p.into_inner());
        for (base, range) in std::mem::take(&mut mem.ranges) {
            for (i, slot) in range.slots.iter().enumerate() {
                if slot.is_some() {
                    // SAFETY: we mapped this page; all work of the context has finished.
                    let _ = unsafe { result::mem_unmap(base + (i * ps) as u64, ps) };
                }
            }
            // SAFETY: we reserved this range and just unmapped all of it.
            let _ = unsafe { result::address_free(base, range.len) };
        }
        if vmm {
            for (handle, _) in std::mem::take(&mut mem.pages) {
                // SAFETY: a live handle from cuMemCreate, unmapped above, released once.
                let _ = unsafe { result::mem_release(handle) };
            }
        }
        for (_, block) in std::mem::take(&mut mem.blocks) {
            // SAFETY: `raw` came from cuMemAlloc and is freed once, here (the
            // table no longer has it); all work of the context has finished.
            let _ = unsafe { result::mem_free(block.raw) };
        }
        // `self.ctx` drops after this, releasing the primary context unless
        // pinned buffers or host registrations still hold it.
    }
}

impl Device for CudaDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn memory(&self) -> Result<MemoryInfo> {
        self.ctx.bind()?;
        let (free, total) = result::mem_get_info()?;
        Ok(MemoryInfo { total, free })
    }

    fn alloc_page(&self) -> Result<PhysPage> {
        if !self.vmm_supported() {
            return Err(Error::Unsupported(
                "physical pages without the CUDA virtual memory API (fallback mode: use alloc_contiguous)",
            ));
        }
        self.ctx.bind()?;
        let ps = self.info.page_size;
        let handle = match result::mem_create(ps, self.ordinal) {
            Ok(h) => h,
            Err(e) if is_oom(&e) => return Err(self.out_of_memory(ps)),
            Err(e) => return Err(e),
        };
        lock(&self.mem).add_page(handle);
        Ok(PhysPage(handle))
    }

    fn free_page(&self, page: PhysPage) -> Result<()> {
        let mut mem = lock(&self.mem);
        mem.check_free(page)?;
        mem.remove_page(page);
        drop(mem);
        self.ctx.bind()?;
        // SAFETY: the page is a live cuMemCreate handle, mapped nowhere (checked),
        // and out of our table, so it is released once and never used again.
        unsafe { result::mem_release(page.0) }
    }

    fn reserve(&self, len: usize) -> Result<VirtualRange> {
        lock(&self.mem).check_reserve(len)?;
        self.ctx.bind()?;
        let base = result::address_reserve(len, self.info.page_size)?;
        lock(&self.mem).add_range(base, len);
        Ok(VirtualRange {
            base: DevicePtr(base),
            len,
        })
    }

    fn release(&self, range: VirtualRange) -> Result<()> {
        let mut mem = lock(&self.mem);
        mem.check_release(range)?;
        self.ctx.bind()?;
        // SAFETY: the range is exactly one we reserved, fully unmapped (checked
        // under the lock we hold), so no copy or kernel can use it.
        unsafe { result::address_free(range.base.0, range.len)? };
        mem.remove_range(range);
        Ok(())
    }

    fn map(&self, addr: DevicePtr, page: PhysPage) -> Result<()> {
        let ps = self.info.page_size;
        let mut mem = lock(&self.mem);
        let (base, slot) = mem.check_map(addr, page)?;
        self.ctx.bind()?;
        // SAFETY: `addr..addr+ps` is a page-aligned, unmapped page of a range we
        // reserved, and `page` a live, unmapped cuMemCreate handle of `ps`
        // bytes (both checked under the lock we hold).
        unsafe { result::mem_map(addr.0, ps, page.0)? };
        // SAFETY: mapped just above.
        if let Err(e) = unsafe { result::mem_set_access_rw(addr.0, ps, self.ordinal) } {
            // SAFETY: we mapped it just above and nothing has used it.
            let _ = unsafe { result::mem_unmap(addr.0, ps) };
            return Err(e);
        }
        mem.set_mapped(base, slot, addr, page);
        Ok(())
    }

    fn unmap(&self, addr: DevicePtr) -> Result<()> {
        let ps = self.info.page_size;
        let mut mem = lock(&self.mem);
        let (base, slot, page) = mem.check_unmap(addr)?;
        self.ctx.bind()?;
        // SAFETY: the page at `addr` is mapped (checked under the lock); the
        // trait's contract makes the caller finish work that uses it first.
        unsafe { result::mem_unmap(addr.0, ps)? };
        mem.set_unmapped(base, slot, page);
        Ok(())
    }

    fn maps_pages(&self) -> bool {
        self.vmm_supported()
    }

    fn alloc_contiguous(&self, len: usize) -> Result<DevicePtr> {
        let ps = self.info.page_size;
        lock(&self.mem).check_contiguous(len)?;
        self.ctx.bind()?;
        let mut raw = self.mem_alloc(len)?;
        let mut base = raw;
        if raw % ps as u64 != 0 {
            // cuMemAlloc promises 256-byte alignment only (large blocks are
            // page aligned in practice): allocate a page more and align inside it.
            // SAFETY: `raw` came from cuMemAlloc just above; nobody else knows it.
            unsafe { result::mem_free(raw)? };
            let padded = len.checked_add(ps).ok_or(Error::DeviceOutOfMemory {
                wanted: len,
                available: 0,
            })?;
            raw = self.mem_alloc(padded)?;
            base = raw.next_multiple_of(ps as u64);
        }
        lock(&self.mem).add_block(base, raw, len);
        Ok(DevicePtr(base))
    }

    fn free_contiguous(&self, ptr: DevicePtr) -> Result<()> {
        let mut mem = lock(&self.mem);
        let raw = mem.check_free_block(ptr)?;
        self.ctx.bind()?;
        // SAFETY: `raw` is the cuMemAlloc address of a live block of ours
        // (checked under the lock we hold, and forgotten below under it, so
        // it is freed once); the trait's contract makes the caller finish
        // work that uses it first.
        unsafe { result::mem_free(raw)? };
        mem.remove_block(ptr);
        Ok(())
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        // Portable (usable from every context), not write-combined: the CPU
        // reads some of these back (downloads, host copies LoRAs are fused into).
        self.host_alloc(len, sys::CU_MEMHOSTALLOC_PORTABLE)
    }

    fn alloc_pinned_write_combined(&self, len: usize) -> Result<PinnedBuffer> {
        let b = self.host_alloc(
            len,
            sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_WRITECOMBINED,
        )?;
        // Marked by the driver's own account of the block.
        let flags = result::mem_host_get_flags(b.as_ptr().cast_mut().cast())?;
        Ok(if flags & sys::CU_MEMHOSTALLOC_WRITECOMBINED != 0 {
            b.mark_write_combined()
        } else {
            b
        })
    }

    fn create_stream(&self) -> Result<StreamId> {
        self.create_stream_with_priority(StreamPriority::Normal)
    }

    fn stream_priority_range(&self) -> Result<Option<(i32, i32)>> {
        self.ctx.bind()?;
        result::ctx_stream_priority_range().map(Some)
    }

    fn create_stream_with_priority(&self, priority: StreamPriority) -> Result<StreamId> {
        let s = match priority {
            StreamPriority::Normal => Stream::new(&self.ctx)?,
            StreamPriority::High => Stream::high_priority(&self.ctx)?,
        };
        let id = s.raw as u64;
        self.streams.insert(id, Arc::new(s));
        Ok(StreamId(id))
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        let (_, s) = self
            .streams
            .remove(&stream.0)
            .ok_or(Error::UnknownStream(stream))?;
        self.ctx.bind()?;
        // Its graphs (launches still queued finish), then its matmul
        // scratch (if any): taken out, and freed after a synchronisation.
        lock(&self.graphs).forget_stream(stream.0);
        self.release_stream_scratch(s.raw, stream.0);
        // Wait for the queued work, as the trait promises; the stream itself is
        // destroyed when the last user (possibly a call in flight) lets go.
        // SAFETY: `s` keeps the stream alive for this call.
        let _ = unsafe { result::stream_synchronize(s.raw) };
        lock(&self.host_fn_failures).remove(&stream.0);
        Ok(())
    }

    fn create_event(&self) -> Result<EventId> {
        let e = Event::new(&self.ctx)?;
        let id = e.raw as u64;
        self.events.insert(id, Arc::new(e));
        Ok(EventId(id))
    }

    fn create_timing_event(&self) -> Result<EventId> {
        let e = Event::new_timing(&self.ctx)?;
        let id = e.raw as u64;
        self.events.insert(id, Arc::new(e));
        Ok(EventId(id))
    }

    fn destroy_event(&self, event: EventId) -> Result<()> {
        self.events
            .remove(&event.0)
            .map(|_| ())
            .ok_or(Error::UnknownEvent(event))
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        let e = self.event(event)?;
        let s = self.stream(stream)?;
        self.ctx.bind()?;
        // SAFETY: both are live (we hold Arcs) and belong to our context.
        unsafe { result::event_record(e.raw, s.raw) }
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        let s = self.stream(stream)?;
        let e = self.event(event)?;
        self.ctx.bind()?;
        // SAFETY: both are live (we hold Arcs).
        unsafe { result::stream_wait_event(s.raw, e.raw) }
    }

    fn event_query(&self, event: EventId) -> Result<bool> {
        let e = self.event(event)?;
        self.ctx.bind()?;
        // SAFETY: live (we hold an Arc).
        unsafe { result::event_query(e.raw) }
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Option<Duration>> {
        let (a, b) = (self.event(start)?, self.event(end)?);
        self.ctx.bind()?;
        // SAFETY: both live (we hold Arcs) and of our context; one made
        // without timing is refused by the driver with an error, not UB.
        let ms = unsafe { result::event_elapsed(a.raw, b.raw)? };
        // Negative when `end` was reached first: no time.
        Ok(ms.map(|ms| Duration::from_secs_f64((f64::from(ms) * 1e-3).max(0.0))))
    }

    fn event_wait(&self, event: EventId, timeout: Option<Duration>) -> Result<()> {
        let e = self.event(event)?;
        self.ctx.bind()?;
        let Some(timeout) = timeout else {
            // SAFETY: live (we hold an Arc).
            return unsafe { result::event_synchronize(e.raw) };
        };
        let start = Instant::now();
        let Some(deadline) = start.checked_add(timeout) else {
            // SAFETY: live (we hold an Arc).
            return unsafe { result::event_synchronize(e.raw) };
        };
        let mut pause = Duration::from_micros(10);
        loop {
            // SAFETY: live (we hold an Arc).
            if unsafe { result::event_query(e.raw)? } {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    event,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_POLL_SLEEP);
        }
    }

    fn stream_synchronize(&self, stream: StreamId) -> Result<()> {
        let s = self.stream(stream)?;
        self.ctx.bind()?;
        // SAFETY: live (we hold an Arc).
        unsafe { result::stream_synchronize(s.raw)? };
        match lock(&self.host_fn_failures).remove(&stream.0) {
            Some(message) => Err(Error::StreamFailed { stream, message }),
            None => Ok(()),
        }
    }

    unsafe fn copy_h2d_async(
        &self,
        dst: DevicePtr,
        src: *const u8,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        lock(&self.mem).check_access(dst, len)?;
        let s = self.stream(stream)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: the stream is live (Arc); the device range is mapped now
        // (checked) and the caller keeps it mapped and `src..src+len` valid
        // until the copy has run (the trait's contract).
        unsafe { result::memcpy_htod_async(dst.0, src.cast(), len, s.raw) }
    }

    unsafe fn copy_d2h_async(
        &self,
        dst: *mut u8,
        src: DevicePtr,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        lock(&self.mem).check_access(src, len)?;
        let s = self.stream(stream)?;
        if len == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        // SAFETY: as in copy_h2d_async, with `dst..dst+len` kept valid and
        // untouched by the caller until the copy has run.
        unsafe { result::memcpy_dtoh_async(dst.cast(), src.0, len, s.raw) }
    }

    fn launch(&self, kernel: &Kernel, stream: StreamId) -> Result<()> {
        match *kernel {
            Kernel::Fill { dst, len, value } => {
                lock(&self.mem).check_access(dst, len)?;
                let s = self.stream(stream)?;
                if len == 0 {
                    return Ok(());
                }
                self.ctx.bind()?;
                // SAFETY: the stream is live (Arc) and the device range is
                // mapped now (checked); the trait makes callers keep it mapped
                // until queued work that uses it has run.
                unsafe { result::memset_d8_async(dst.0, value, len, s.raw) }
            }
            Kernel::Matmul { .. } => self.launch_matmul(kernel, stream),
            Kernel::Merge { w, ref op } => self.launch_merge(w, op, stream),
            Kernel::MergeBatch { base, ref ops } => self.launch_merge_batch(base, ops, stream),
        }
    }

    fn launch_all(&self, kernels: &[Kernel], stream: StreamId) -> Result<()> {
        let products = kernels.iter().all(|k| matches!(k, Kernel::Matmul { .. }));
        if self.graphs_on && products && !kernels.is_empty() {
            return self.launch_graph(kernels, stream);
        }
        kernels.iter().try_for_each(|k| self.launch(k, stream))
    }

    fn launch_host_fn(&self, stream: StreamId, f: HostFn) -> Result<()> {
        let s = self.stream(stream)?;
        self.ctx.bind()?;
        let data = Box::into_raw(Box::new(HostCall {
            f,
            stream: stream.0,
            failures: self.host_fn_failures.clone(),
        }));
        // SAFETY: the stream is live (Arc); the trampoline takes ownership of
        // `data` exactly once and catches panics, so none unwinds into the driver.
        let r = unsafe { result::launch_host_func(s.raw, host_fn_trampoline, data.cast()) };
        if r.is_err() {
            // SAFETY: the launch failed, so the driver will not call the
            // trampoline: the box is still ours, and freed once here.
            drop(unsafe { Box::from_raw(data) });
        }
        r
    }

    fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        let p = self.matmul_launches();
        let m = self.merge_launches();
        let g = self.graph_launches();
        vec![
            ("products_gemm_ex", p.gemm_ex),
            ("products_lt", p.lt),
            ("lt_plans", p.lt_plans),
            ("lt_plans_without_algorithm", p.lt_no_algorithm),
            ("products_first_seen", g.first_seen),
            ("graphs_captured", g.captured),
            ("products_captured", g.captured_products),
            ("graph_launches", g.launched),
            ("products_in_graphs", g.products),
            ("graph_cache_clears", g.cleared),
            ("graph_failures", g.failed),
            ("merges_fma", m.fma),
            ("merges_tensor_cores", m.tensor_cores),
            ("merges_pipelined", m.pipelined),
            ("merges_fma_batched", m.fma_batched),
            ("merges_tensor_cores_batched", m.tensor_cores_batched),
            ("merges_pipelined_batched", m.pipelined_batched),
            ("merges_pipelined_tall", m.pipelined_tall),
            ("merges_streaming", m.streaming),
            ("merges_streaming_shared", m.streaming_shared),
            ("merges_general", m.general),
        ]
    }

    fn warnings(&self) -> Vec<String> {
        self.graphs_off()
            .map(|why| format!("{GRAPHS_ENV}=on, but graphs are off: {why}"))
            .into_iter()
            .collect()
    }

    fn prepare(&self, family: KernelFamily) -> Result<Option<String>> {
        Ok(Some(match family {
            KernelFamily::Merge => self.prepare_merge()?.to_string(),
            KernelFamily::Matmul => {
                let blas = self.prepare_matmul()?;
                let path = |p: Option<std::path::PathBuf>, name: &str| {
                    p.map_or_else(|| name.to_string(), |p| p.display().to_string())
                };
                let library = match blas.interface {
                    MatmulLibrary::GemmEx => path(blas.library, "cuBLAS"),
                    MatmulLibrary::Lt => format!(
                        "{}, algorithms chosen once a shape ({MATMUL_ENV}=lt)",
                        path(blas.lt_library, "cuBLASLt")
                    ),
                };
                match blas.convert_error {
                    None => format!("matrix products: {library}"),
                    Some(e) => format!(
                        "matrix products: {library}; f16/bf16 weights cannot be multiplied: {e}"
                    ),
                }
            }
        }))
    }
}
