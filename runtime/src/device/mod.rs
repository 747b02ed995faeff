//! The `Device` trait every backend implements, its handle types, and backend selection.
//!
//! A device offers what the arena and the residency engine need and nothing more:
//! physical pages of a fixed size, virtual address ranges that pages are mapped
//! into (so an allocation is contiguous although its pages are not) or, on a
//! device that cannot map pages, plain contiguous allocations, pinned host
//! buffers, streams that run queued work in order, events that stream work or
//! the host waits on, asynchronous copies, and a kernel launch hook.
//!
//! Two backends implement it: [`HostDevice`] (device memory emulated on the CPU,
//! always available) and, with the `cuda` feature, [`cuda::CudaDevice`].
//! [`auto`] picks one at run time.

pub mod fault;
pub mod host;
pub mod merge;
pub mod pinned;

#[cfg(feature = "cuda")]
pub mod cuda;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use host::{HostConfig, HostDevice};
pub use merge::{MergeAdapter, MergeDelta, MergeFactor, MergeKron, MergeOp};
pub use pinned::PinnedBuffer;

use crate::error::Result;

/// An address in a device's address space (a host virtual address on the host backend).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DevicePtr(pub u64);

impl DevicePtr {
    /// The address `bytes` past this one (saturating: an address past the end
    /// of the address space is no valid address and fails any check).
    pub fn offset(self, bytes: usize) -> DevicePtr {
        DevicePtr(self.0.saturating_add(bytes as u64))
    }
}

impl fmt::Debug for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for DevicePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A handle to one physical page of device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysPage(pub u64);

/// A reserved, initially unmapped, range of device virtual addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VirtualRange {
    /// First address of the range (page aligned).
    pub base: DevicePtr,
    /// Length in bytes (a multiple of the page size).
    pub len: usize,
}

/// A handle to a stream: a queue of work the device runs in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId(pub u64);

/// A handle to an event: a point in a stream's work that others can wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventId(pub u64);

/// How a stream's kernels rank when the GPU has more blocks to start than
/// room: a high-priority stream's waiting blocks start first. Blocks
/// already running are not stopped, and copies are not affected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StreamPriority {
    /// The default (on CUDA, the least priority, as `cuStreamCreate` gives).
    #[default]
    Normal,
    /// The greatest priority the device has (the same as `Normal` on a
    /// device without priorities): for the engine's compute stream, so that
    /// when its products and the runtime's merges (queued ahead of use on
    /// a normal-priority stream) both have blocks waiting, the products'
    /// start first.
    High,
}

impl std::fmt::Display for StreamPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamPriority::Normal => "normal",
            StreamPriority::High => "high",
        })
    }
}

/// Which backend a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Device memory emulated on the CPU ([`HostDevice`]).
    Host,
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
}

/// What a device is: fixed facts reported once.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Backend kind.
    pub kind: BackendKind,
    /// Human-readable name (GPU name, or "host (emulated)").
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Size of one physical page in bytes (the allocation granularity).
    pub page_size: usize,
    /// CUDA compute capability (major, minor), if a GPU.
    pub compute_capability: Option<(u32, u32)>,
}

/// Current memory use of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Total bytes.
    pub total: usize,
    /// Bytes not in use by anyone.
    pub free: usize,
}

/// Work a device runs on a stream besides copies.
///
/// Kernels are named operations, not code: each backend has its own
/// implementation of each (CPU code on the host backend, CUDA kernels on a GPU).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Kernel {
    /// Set `len` bytes starting at `dst` to `value`.
    Fill {
        /// First byte.
        dst: DevicePtr,
        /// Number of bytes.
        len: usize,
        /// The byte value written.
        value: u8,
    },
    /// `Y = X · Wᵀ`: X is `[tokens, k]` in `x_dtype`, W is `[n, k]` in
    /// `w_dtype` (a conv weight viewed as `[out, in·kh·kw]`), Y is f32
    /// `[tokens, n]`, overwritten; products exact, sums in f32. X is f32, or
    /// of W's own 16-bit type (activations an engine keeps in the weights'
    /// type: used as they are, where f32 ones are first rounded to W's type
    /// on CUDA); any other pair is an error. X and Y are 4-byte aligned and
    /// do not overlap. The benchmark's layer compute.
    Matmul {
        /// Activations.
        x: DevicePtr,
        /// Element type of X: f32, or `w_dtype` when that is f16 or bf16.
        x_dtype: offload_kernels::Dtype,
        /// Rows of X and Y.
        tokens: usize,
        /// Weight.
        w: DevicePtr,
        /// Element type of W.
        w_dtype: offload_kernels::Dtype,
        /// Rows of W (columns of Y).
        n: usize,
        /// Columns of X and W.
        k: usize,
        /// Output.
        y: DevicePtr,
    },
    /// The LoRA merge `W ← W + Σᵢ sᵢ · Δᵢ` into the weight at `w` (its
    /// first element), with the factors at the device addresses in `op`.
    /// The factors must not overlap the weight.
    Merge {
        /// The weight.
        w: DevicePtr,
        /// What to merge.
        op: Arc<MergeOp>,
    },
    /// Several LoRA merges, each into its own weight: for every
    /// `(offset, op)` of `ops`, in order, the merge of `op` into the weight
    /// at `base + offset` — the result of one [`Kernel::Merge`] per entry,
    /// queued as one kernel (one launch to a fault-injecting device, one
    /// stream operation on the host backend). The runtime queues a layer's
    /// merges this way after its upload (`base`: the layer's allocation,
    /// `offset`: each tensor's place in it). Each op's factors must not
    /// overlap its own weight, as for [`Kernel::Merge`].
    ///
    /// The CUDA backend merges the low-rank ops of up to four adapters in
    /// as few launches as it can: one per W dtype and kernel kind (fp32
    /// FMA or tensor cores, the same choice as for one op), up to 16 ops
    /// each (`offload_kernels::cuda::BATCH_MAX_JOBS`), each op's result
    /// bit-identical to its own launch; other ops (LoHa, LoKr, more
    /// adapters) get a launch of their own, as [`Kernel::Merge`] would.
    /// A kernel error names the op (its index, weight and address) and says
    /// what [`Kernel::Merge`] of that op would have said; an address error
    /// names the address. When an op fails, the ops before it may already
    /// be queued (on CUDA, but for those of a batched launch that failed;
    /// on the host backend, every other op still runs): the weights of a
    /// failed batch are undefined, as after a failed [`Kernel::Merge`].
    MergeBatch {
        /// The address the offsets count from.
        base: DevicePtr,
        /// `(offset of the weight from base, what to merge into it)`.
        ops: Arc<[(usize, Arc<MergeOp>)]>,
    },
}

/// A family of kernels that a device may build before their first launch
/// ([`Device::prepare`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    /// [`Kernel::Matmul`].
    Matmul,
    /// [`Kernel::Merge`] and [`Kernel::MergeBatch`].
    Merge,
}

impl Kernel {
    /// Whether a [`Kernel::Matmul`] takes activations of type `x` with a
    /// weight of type `w`: f32 ones with any weight, 16-bit ones with a
    /// weight of the same type.
    pub fn matmul_types_supported(x: offload_kernels::Dtype, w: offload_kernels::Dtype) -> bool {
        x == offload_kernels::Dtype::F32 || x == w
    }

    /// Checks the operand types: a [`Kernel::Matmul`]'s X and W must be a
    /// pair [`Kernel::matmul_types_supported`] takes; an [`Error::Kernel`]
    /// that names both otherwise.
    ///
    /// [`Error::Kernel`]: crate::Error::Kernel
    pub fn check_types(&self) -> crate::Result<()> {
        match *self {
            Kernel::Matmul {
                x_dtype, w_dtype, ..
            } if !Kernel::matmul_types_supported(x_dtype, w_dtype) => Err(crate::Error::Kernel {
                kernel: self.name(),
                message: format!(
                    "activations in {x_dtype} with a weight in {w_dtype}: 16-bit activations need a weight of their own type"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::Fill { .. } => "fill",
            Kernel::Matmul { .. } => "matmul",
            Kernel::Merge { .. } => "merge",
            Kernel::MergeBatch { .. } => "merge batch",
        }
    }

    /// The merges of a [`Kernel::Merge`] or [`Kernel::MergeBatch`], as
    /// `(weight address, op)` in order; empty for other kernels.
    pub fn merges(&self) -> Vec<(DevicePtr, &Arc<MergeOp>)> {
        match self {
            Kernel::Merge { w, op } => vec![(*w, op)],
            Kernel::MergeBatch { base, ops } => ops
                .iter()
                .map(|(off, op)| (base.offset(*off), op))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The device byte ranges the kernel touches: (address, length), or an error for sizes that overflow.
    pub fn regions(&self) -> crate::Result<Vec<(DevicePtr, usize)>> {
        let overflow = || crate::Error::Kernel {
            kernel: self.name(),
            message: "operand size overflows".into(),
        };
        Ok(match *self {
            Kernel::Fill { dst, len, .. } => vec![(dst, len)],
            Kernel::Merge { .. } | Kernel::MergeBatch { .. } => {
                // Per op: its whole weight, then its factors.
                let mut v = Vec::new();
                for (w, op) in self.merges() {
                    let wb = op.weight_bytes();
                    if wb == usize::MAX {
                        return Err(overflow());
                    }
                    v.push((w, wb));
                    v.extend(op.factors().map(|f| (f.ptr, f.bytes())));
                }
                v
            }
            Kernel::Matmul {
                x,
                x_dtype,
                tokens,
                w,
                w_dtype,
                n,
                k,
                y,
            } => {
                let xs = tokens
                    .checked_mul(k)
                    .and_then(|v| v.checked_mul(x_dtype.size_in_bytes()))
                    .ok_or_else(overflow)?;
                let ws = n
                    .checked_mul(k)
                    .and_then(|v| v.checked_mul(w_dtype.size_in_bytes()))
                    .ok_or_else(overflow)?;
                let ys = tokens
                    .checked_mul(n)
                    .and_then(|v| v.checked_mul(4))
                    .ok_or_else(overflow)?;
                vec![(x, xs), (w, ws), (y, ys)]
            }
        })
    }
}

/// A host function a stream runs in order with its other work.
pub type HostFn = Box<dyn FnOnce() + Send + 'static>;

/// A backend that owns device memory and runs queued copies and kernels.
///
/// Device memory is shared memory, as on a GPU: work on different streams
/// that touches the same bytes, one of them writing, must be ordered with
/// events (or a synchronisation); unordered, it races. All methods take
/// `&self`; implementations are thread safe. Handles
/// (pages, ranges, streams, events) are plain values: using one after it was
/// destroyed is an error, never undefined behaviour, except where an `unsafe`
/// method's contract says otherwise.
pub trait Device: Send + Sync + fmt::Debug {
    /// Fixed facts about the device.
    fn info(&self) -> &DeviceInfo;

    /// Current free and total memory.
    fn memory(&self) -> Result<MemoryInfo>;

    /// Allocate one physical page of [`DeviceInfo::page_size`] bytes.
    fn alloc_page(&self) -> Result<PhysPage>;

    /// Return a physical page. It must not be mapped anywhere.
    fn free_page(&self, page: PhysPage) -> Result<()>;

    /// Reserve `len` bytes (a multiple of the page size) of virtual addresses, mapped to nothing.
    fn reserve(&self, len: usize) -> Result<VirtualRange>;

    /// Give back a reserved range. Every page in it must have been unmapped.
    fn release(&self, range: VirtualRange) -> Result<()>;

    /// Map `page` at `addr`, which must be a page-aligned, unmapped address of a reserved range.
    fn map(&self, addr: DevicePtr, page: PhysPage) -> Result<()>;

    /// Unmap the page at `addr`. Work that uses it must have completed.
    fn unmap(&self, addr: DevicePtr) -> Result<()>;

    /// Whether this device maps pages into reserved ranges ([`Device::reserve`],
    /// [`Device::map`]). A device that cannot (a GPU without the CUDA virtual
    /// memory API, or a [`HostDevice::without_vmm`]) offers contiguous
    /// allocations instead ([`Device::alloc_contiguous`]), and the arena makes
    /// each of its allocations one of those.
    fn maps_pages(&self) -> bool {
        true
    }

    /// Allocate `len` bytes of contiguous device memory: `len` a non-zero
    /// multiple of the page size, the address page aligned. A plain device
    /// allocation (`cuMemAlloc` on a GPU), for devices that cannot map pages;
    /// devices that can may offer it too. A device with too little memory
    /// left fails with [`crate::Error::DeviceOutOfMemory`]; one without such
    /// allocations with [`crate::Error::Unsupported`] (the default).
    fn alloc_contiguous(&self, len: usize) -> Result<DevicePtr> {
        let _ = len;
        Err(crate::Error::Unsupported(
            "contiguous device allocations on this device",
        ))
    }

    /// Free an allocation [`Device::alloc_contiguous`] made, by its address.
    /// Work that uses it must have completed.
    fn free_contiguous(&self, ptr: DevicePtr) -> Result<()> {
        let _ = ptr;
        Err(crate::Error::Unsupported(
            "contiguous device allocations on this device",
        ))
    }

    /// Allocate `len` bytes of page-locked host memory that copies can read from asynchronously.
    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer>;

    /// Allocate `len` bytes of page-locked host memory for the host to write
    /// and copies to read, write-combined where the backend has it
    /// ([`PinnedBuffer::write_combined`] says whether it is): host writes
    /// bypass the CPU caches and copies need not snoop them, but host reads
    /// are very slow. Backends without such memory give
    /// [`Device::alloc_pinned`]'s.
    fn alloc_pinned_write_combined(&self, len: usize) -> Result<PinnedBuffer> {
        self.alloc_pinned(len)
    }

    /// Create a stream.
    fn create_stream(&self) -> Result<StreamId>;

    /// Create a stream of the given priority. Backends without priorities
    /// give [`Device::create_stream`]'s.
    fn create_stream_with_priority(&self, priority: StreamPriority) -> Result<StreamId> {
        let _ = priority;
        self.create_stream()
    }

    /// The device's stream priorities as the driver numbers them, (least,
    /// greatest): on CUDA lower numbers are greater, e.g. (0, -5), and
    /// (0, 0) means the device has none. `None` where the backend has no
    /// priorities at all (the host backend).
    fn stream_priority_range(&self) -> Result<Option<(i32, i32)>> {
        Ok(None)
    }

    /// Destroy a stream after its queued work has run.
    fn destroy_stream(&self, stream: StreamId) -> Result<()>;

    /// Create an event. An event that was never recorded counts as complete.
    fn create_event(&self) -> Result<EventId>;

    /// Create an event that also notes when the stream reached it, for
    /// [`Device::event_elapsed`]. Recording it costs a little more than a
    /// plain event; it completes and is waited for like one.
    fn create_timing_event(&self) -> Result<EventId>;

    /// Destroy an event.
    fn destroy_event(&self, event: EventId) -> Result<()>;

    /// Record `event` at the current end of `stream`'s queue: it completes when the work queued before it has.
    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()>;

    /// Make `stream` wait, before running work queued after this call, until `event`'s latest recording completes.
    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<()>;

    /// Whether the latest recording of `event` has completed.
    fn event_query(&self, event: EventId) -> Result<bool>;

    /// Device time from the latest recording of timing event `start` to the
    /// latest recording of timing event `end` (both made by
    /// [`Device::create_timing_event`]); `None` while either has not
    /// completed. Never blocks. An error for an event never recorded or
    /// made without timing, and for a failure of the work the recordings
    /// covered ([`crate::Error::StreamFailed`] on the host backend, the
    /// driver's error on CUDA).
    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Option<Duration>>;

    /// Block the calling thread until `event` completes, or fail with [`crate::Error::Timeout`].
    fn event_wait(&self, event: EventId, timeout: Option<Duration>) -> Result<()>;

    /// Block until all work queued on `stream` has run; reports a failure of that work.
    fn stream_synchronize(&self, stream: StreamId) -> Result<()>;

    /// Queue a copy of `len` bytes from host memory at `src` to device memory at `dst`; returns before the copy runs.
    ///
    /// # Safety
    /// `src..src+len` must stay valid and unmodified until the copy has run
    /// (an event recorded after it completes). For the copy to be truly
    /// asynchronous on a GPU, `src` should lie in a [`PinnedBuffer`].
    unsafe fn copy_h2d_async(
        &self,
        dst: DevicePtr,
        src: *const u8,
        len: usize,
        stream: StreamId,
    ) -> Result<()>;

    /// Queue a copy of `len` bytes from device memory at `src` to host memory at `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` must stay valid, and not be read or written by anyone
    /// else, until the copy has run.
    unsafe fn copy_d2h_async(
        &self,
        dst: *mut u8,
        src: DevicePtr,
        len: usize,
        stream: StreamId,
    ) -> Result<()>;

    /// Queue a kernel on `stream`.
    fn launch(&self, kernel: &Kernel, stream: StreamId) -> Result<()>;

    /// Queue `kernels` on `stream`, in order, with the results one
    /// [`Device::launch`] each would give: what an engine hands over for a
    /// layer (its products). A backend may queue the list as one unit: the
    /// CUDA backend with graphs on (`CudaConfig::graphs`,
    /// `OFFLOAD_GRAPHS=on`) checks every product as `launch` would (nothing
    /// is queued when one fails), then queues a list it sees for the first
    /// time product by product, captures it into a CUDA graph the second
    /// time, and launches that graph at every later call with the same
    /// list; the default launches each in turn, and an error leaves the
    /// kernels before the failing one queued. No other thread may queue
    /// work on `stream` during the call.
    fn launch_all(&self, kernels: &[Kernel], stream: StreamId) -> Result<()> {
        kernels.iter().try_for_each(|k| self.launch(k, stream))
    }

    /// Counts of the work this device has queued, by name, for reports (on
    /// CUDA: the products by cuBLAS interface and the cuBLASLt plans made,
    /// as the CUDA backend's `MatmulLaunches`, and the merge launches by
    /// kernel, as its `MergeLaunches`). Cumulative since the device was
    /// made; empty by default (the host backend).
    fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// What the device has turned off or worked around since it was made,
    /// one line each, for reports (on CUDA: graphs turned off after a
    /// failed capture or graph launch, and why); empty by default.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Build now what the first launch of a kernel of `family` would build
    /// (on CUDA: the cuBLAS handle for [`KernelFamily::Matmul`], the NVRTC
    /// merge kernels for [`KernelFamily::Merge`], which take seconds to
    /// compile when the kernel disk cache does not hold them), so that no
    /// pass waits for it. Returns a line saying what was built and how, or
    /// `None` when there was nothing to build (the default, and the host
    /// backend). Errors say why the family cannot run on this device (on
    /// CUDA: no NVRTC or cuBLAS library, or NVRTC's log).
    fn prepare(&self, family: KernelFamily) -> Result<Option<String>> {
        let _ = family;
        Ok(None)
    }

    /// Queue a host function on `stream`; it runs after the work queued before it.
    ///
    /// The function must not call back into the device: CUDA forbids driver
    /// calls from host functions (the host backend would allow it, so code
    /// that relies on it would work on the CPU and fail on a GPU).
    fn launch_host_fn(&self, stream: StreamId, f: HostFn) -> Result<()>;
}

/// Extension helpers built from the [`Device`] primitives.
pub trait DeviceExt: Device {
    /// Copy `data` to device memory at `dst` and wait for it (uses a temporary pinned buffer).
    fn write_blocking(&self, dst: DevicePtr, data: &[u8], stream: StreamId) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut staging = self.alloc_pinned(data.len())?;
        staging.as_mut_slice()[..data.len()].copy_from_slice(data);
        // SAFETY: `staging` outlives the copy: we synchronise the stream before it drops.
        unsafe { self.copy_h2d_async(dst, staging.as_ptr(), data.len(), stream)? };
        self.stream_synchronize(stream)
    }

    /// Copy device memory at `src` into `out` and wait for it.
    fn read_blocking(&self, src: DevicePtr, out: &mut [u8], stream: StreamId) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let len = out.len();
        // SAFETY: `out` is exclusively borrowed for this whole call and we
        // synchronise the stream before returning, so the copy completes
        // while the borrow is alive.
        unsafe { self.copy_d2h_async(out.as_mut_ptr(), src, len, stream)? };
        self.stream_synchronize(stream)
    }
}

impl<D: Device + ?Sized> DeviceExt for D {}

/// The device [`auto`] chose and why.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The device.
    pub device: Arc<dyn Device>,
    /// One line saying which backend was chosen and why.
    pub reason: String,
}

/// Pick the best available device: CUDA when the `cuda` feature is on, the
/// driver library loads and a GPU answers; otherwise a [`HostDevice`] built
/// from `host`. Never panics when CUDA is missing.
///
/// The GPU is opened with [`cuda::CudaConfig::from_env`]; an invalid value
/// of its variable (`OFFLOAD_MERGE_KERNEL`) is an [`Error::Config`] on any
/// machine, GPU or not, rather than a silent fall back to the host backend.
///
/// [`Error::Config`]: crate::error::Error::Config
pub fn auto(host: &HostConfig) -> Result<Selected> {
    #[cfg(feature = "cuda")]
    let cuda_config = cuda::CudaConfig::from_env()?;
    #[cfg(feature = "cuda")]
    let why_not_cuda = match cuda::probe() {
        Ok(probe) => match cuda::CudaDevice::with_config(probe.ordinal, &cuda_config) {
            Ok(dev) => {
                let reason = format!(
                    "using CUDA device {}: {} ({} GiB, compute capability {}.{}, driver {}){}",
                    probe.ordinal,
                    dev.info().name,
                    dev.info().total_memory >> 30,
                    probe.compute_capability.0,
                    probe.compute_capability.1,
                    probe.driver_version,
                    dev.memory_mode_note(),
                );
                return Ok(Selected {
                    device: Arc::new(dev),
                    reason,
                });
            }
            Err(e) => format!("a GPU answered but the CUDA backend failed to start: {e}"),
        },
        Err(e) => e.to_string(),
    };
    #[cfg(not(feature = "cuda"))]
    let why_not_cuda = "built without the `cuda` feature".to_string();
    let dev = HostDevice::new(host.clone())?;
    let reason = format!(
        "using the host backend ({} MiB emulated device memory, {} KiB pages{}): {why_not_cuda}",
        dev.info().total_memory >> 20,
        dev.info().page_size >> 10,
        match host.link_gbps {
            Some(r) => format!(", link {r} GB/s"),
            None => String::new(),
        }
    );
    Ok(Selected {
        device: Arc::new(dev),
        reason,
    })
}

impl dyn Device {
    /// Same as [`auto`]: CUDA when available, else the host backend, with the reason.
    pub fn auto(host: &HostConfig) -> Result<Selected> {
        auto(host)
    }
}
