//! The LoRA merge on CUDA: the kernels of `offload_kernels::cuda`, compiled
//! by NVRTC for the device at first use ([`super::nvrtc`]) and launched on a
//! stream of the device.
//!
//! Four kernels (see `offload_kernels::cuda`): the low-rank merge in fp32
//! FMA, the same on the tensor cores (taken by [`CudaDevice::merge_lowrank`]
//! when every adapter's factors are both f16 or both bf16, some rank is 32
//! or more or the ranks add up to more than 32, and the device has compute
//! capability 8.0 or newer) on a device opened with
//! `OFFLOAD_MERGE_KERNEL=tensor-cores`, a pipelined tensor-core version of
//! it (what [`CudaDevice::merge_lowrank`] takes by default, from rank 16 up
//! rather than 32:
//! [`CudaConfig::pipelined_merges`](super::CudaConfig::pipelined_merges);
//! an H200 timed it faster than the other at every rank and stack
//! measured), and the
//! general merge of any mix of low-rank, LoHa and LoKr deltas
//! ([`CudaDevice::merge`]). [`Kernel::Merge`](crate::device::Kernel::Merge)
//! takes the low-rank kernels for plain low-rank merges (as `Auto` chooses)
//! and the general one otherwise.
//!
//! The low-rank kernels also come batched: one launch merges up to
//! [`BATCH_MAX_JOBS`](offload_kernels::cuda::BATCH_MAX_JOBS) tensors of one W dtype, each with up to
//! [`BATCH_MAX_ADAPTERS`] adapters ([`CudaDevice::merge_lowrank_batch`],
//! and [`Kernel::MergeBatch`](crate::device::Kernel::MergeBatch), which the
//! runtime queues once per uploaded layer): a [`Batcher`] groups the
//! tensors by W dtype and kernel, gives each tensor the blocks its own
//! launch would have, and launches a group when it is full, when a tensor
//! that conflicts with a waiting one comes (its weight overlaps theirs, or
//! their factors), and at the end. Tensors that do not fit a job get a
//! launch of their own, as one [`Kernel::Merge`](crate::device::Kernel::Merge).

use std::ffi::c_void;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys;
use offload_kernels::cuda::{
    delta_factors, dtype_code, lowrank_merge_batch_entry, lowrank_merge_entry,
    lowrank_merge_mma_batch_entry, lowrank_merge_mma_entry, lowrank_merge_pipe_batch_entry,
    lowrank_merge_pipe_entry, lowrank_merge_pipe_tall_batch_entry, lowrank_merge_pipe_tall_entry,
    merge_entry, LowRankBatchParams, LowRankJobParams, LowRankMergeParams, MergeParams,
    StreamKernel, BATCH_MAX_ADAPTERS, LOWRANK_MERGE_SRC, MAX_ADAPTERS, MERGE_MAX_ADAPTERS,
    MMA_MIN_COMPUTE_CAPABILITY, PIPE_TALL_BLOCK_DIM,
};
use offload_kernels::{Delta, Dtype, MergeSpec};

use super::disk_cache::DiskCache;
use super::nvrtc::{self, Image, Module, Target};
use super::{lock, result, CudaDevice};
use crate::device::{DevicePtr, MergeOp, StreamId};
use crate::error::{Error, Result};

/// The merge kernels loaded into a device's context, each indexed by
/// [`dtype_code`] of W.
pub(super) struct MergeKernels {
    _module: Module,
    lowrank: [sys::CUfunction; 3],
    lowrank_mma: [sys::CUfunction; 3],
    lowrank_batch: [sys::CUfunction; 3],
    lowrank_mma_batch: [sys::CUfunction; 3],
    lowrank_pipe: [sys::CUfunction; 3],
    lowrank_pipe_batch: [sys::CUfunction; 3],
    /// The pipelined kernel on 128-row tiles, alone and batched.
    lowrank_pipe_tall: [sys::CUfunction; 3],
    lowrank_pipe_tall_batch: [sys::CUfunction; 3],
    /// The streaming kernels' entry points by [`stream_slot`], then W's
    /// dtype code.
    lowrank_stream: [[sys::CUfunction; 3]; 3],
    general: [sys::CUfunction; 3],
    image: Arc<Image>,
    /// The NVRTC library mapped in the process when they were built.
    library: Option<PathBuf>,
}

// SAFETY: the functions are driver handles usable from any thread with the
// context bound (launches are thread-safe); we never dereference them.
unsafe impl Send for MergeKernels {}
// SAFETY: as above; shared use only reads the handles.
unsafe impl Sync for MergeKernels {}

/// How the merge kernels were built for a device, for reports.
#[derive(Clone, Debug)]
pub struct MergeKernelsInfo {
    /// What NVRTC built: `sm_XY` machine code, or PTX for the driver to compile.
    pub target: Target,
    /// NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// How long building took (once per process): NVRTC's compilation, or
    /// reading the image from the disk cache.
    pub build_time: Duration,
    /// Whether the image came from the disk cache, was written to it, or neither.
    pub disk_cache: DiskCache,
    /// The options NVRTC was given.
    pub options: Vec<String>,
    /// NVRTC's log (warnings; usually empty).
    pub log: String,
    /// The NVRTC library loaded, as mapped in the process.
    pub library: Option<PathBuf>,
}

/// One line: the target, and whether NVRTC compiled the kernels (how long,
/// whether the image was kept on disk) or they were read from the disk cache.
impl fmt::Display for MergeKernelsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor) = self.nvrtc_version;
        let secs = self.build_time.as_secs_f64();
        write!(f, "merge kernels for {}: ", self.target)?;
        match &self.disk_cache {
            DiskCache::Loaded(path) => write!(
                f,
                "loaded in {secs:.3} s from the kernel disk cache ({}; built by NVRTC {major}.{minor})",
                path.display()
            ),
            DiskCache::Stored(path) => write!(
                f,
                "compiled by NVRTC {major}.{minor} in {secs:.1} s, kept in {}",
                path.display()
            ),
            DiskCache::NotStored { path, error } => write!(
                f,
                "compiled by NVRTC {major}.{minor} in {secs:.1} s; not kept in {} ({error})",
                path.display()
            ),
            DiskCache::Off => write!(
                f,
                "compiled by NVRTC {major}.{minor} in {secs:.1} s (kernel disk cache off)"
            ),
        }
    }
}

fn merge_error(message: String) -> Error {
    Error::Kernel {
        kernel: "merge",
        message,
    }
}

/// A device region a merge touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) addr: DevicePtr,
    pub(super) len: usize,
    /// Required alignment of `addr` (the element size).
    pub(super) align: usize,
}

/// The regions a merge of `spec` into W at `w` with the factors at
/// `factors` touches: W's row slice first, then every factor of every
/// adapter, `factors[i]` holding adapter `i`'s addresses in the order of
/// [`delta_factors`]. Errors if a count is wrong.
pub(super) fn merge_regions(
    spec: &MergeSpec<'_>,
    w: DevicePtr,
    factors: &[Vec<DevicePtr>],
) -> Result<Vec<Region>> {
    let adapters = spec.adapters();
    if factors.len() != adapters.len() {
        return Err(merge_error(format!(
            "{} factor address lists for {} adapters",
            factors.len(),
            adapters.len()
        )));
    }
    let size = spec.dtype().size_in_bytes();
    let row_bytes = spec.cols() * size;
    let mut regions = vec![Region {
        addr: w.offset(spec.row_range().start * row_bytes),
        len: spec.delta_rows() * row_bytes,
        align: size,
    }];
    for (i, (adapter, addrs)) in adapters.iter().zip(factors).enumerate() {
        let fs = delta_factors(&adapter.delta);
        if fs.len() != addrs.len() {
            return Err(merge_error(format!(
                "adapter {i}: {} factor addresses for {} factors",
                addrs.len(),
                fs.len()
            )));
        }
        // MergeSpec::new checked that each factor's bytes match its shape.
        for (f, &addr) in fs.iter().zip(addrs) {
            regions.push(Region {
                addr,
                len: f.data.len(),
                align: f.dtype.size_in_bytes(),
            });
        }
    }
    Ok(regions)
}

/// An error of entry `context` of a batch: a kernel error's message says
/// which op it was about (other errors name their address or call already).
fn in_batch(e: Error, context: impl FnOnce() -> String) -> Error {
    match e {
        Error::Kernel { kernel, message } => Error::Kernel {
            kernel,
            message: format!("{}: {message}", context()),
        },
        e => e,
    }
}

/// One tensor of [`CudaDevice::merge_lowrank_batch`]: what
/// [`CudaDevice::merge_lowrank`] takes for it.
#[derive(Clone, Copy)]
pub struct LowRankMerge<'a, 's> {
    /// W's dtype and shape, the row slice and the adapters (low-rank only).
    pub spec: &'a MergeSpec<'s>,
    /// Device address of W's first element.
    pub w: DevicePtr,
    /// Device addresses of each adapter's `(up, down)`.
    pub factors: &'a [(DevicePtr, DevicePtr)],
}

/// Byte ranges `[start, end)` of device memory a merge writes (its weight,
/// or W's row slice) and reads (its factors).
#[derive(Clone, Debug)]
struct Access {
    writes: (u64, u64),
    reads: Vec<(u64, u64)>,
}

impl Access {
    /// From [`merge_regions`]: W's row slice first, then the factors.
    fn of_regions(regions: &[Region]) -> Access {
        let span = |r: &Region| (r.addr.0, r.addr.0.saturating_add(r.len as u64));
        Access {
            writes: span(&regions[0]),
            reads: regions[1..].iter().map(span).collect(),
        }
    }

    /// An op's whole weight and its factors (for ops that are not checked
    /// region by region before their own launch).
    fn of_op(w: DevicePtr, op: &MergeOp) -> Access {
        let wb = op.weight_bytes() as u64;
        Access {
            writes: (w.0, w.0.saturating_add(wb)),
            reads: op
                .factors()
                .map(|f| (f.ptr.0, f.ptr.0.saturating_add(f.bytes() as u64)))
                .collect(),
        }
    }

    /// Whether running `self` and `other` in either order, or at once,
    /// could differ: one writes what the other reads or writes.
    fn conflicts(&self, other: &Access) -> bool {
        let meet = |a: (u64, u64), b: (u64, u64)| a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1;
        meet(self.writes, other.writes)
            || other.reads.iter().any(|&r| meet(self.writes, r))
            || self.reads.iter().any(|&r| meet(other.writes, r))
    }
}

/// Groups of low-rank merges waiting for one batched launch each: one group
/// per W dtype and kernel (index `Body::COUNT · dtype_code + body`), each
/// with the accesses of its jobs. Merges in waiting groups never conflict
/// with each other ([`Access::conflicts`]), so the groups may be launched
/// in any order, and after merges queued later that do not conflict with
/// them; a merge that conflicts with a waiting one launches every group
/// first. `launch_group(batch, dtype code, body)` queues one
/// batched launch (on a GPU, [`CudaDevice::launch_lowrank_batch`]; the unit
/// tests record it instead).
struct Batcher<L> {
    launch_group: L,
    stream: StreamId,
    groups: Vec<(LowRankBatchParams, Vec<Access>)>,
    /// Launches queued so far: batched ones, and one per merge that had its
    /// own.
    launches: usize,
    /// SMs each batched job's grid is sized for ([`job_multiprocessors`]).
    job_sms: u32,
}

impl<L: FnMut(&mut LowRankBatchParams, usize, Body) -> Result<()>> Batcher<L> {
    /// `groups` groups: [`Body::COUNT`] × the W dtypes.
    fn new(launch_group: L, stream: StreamId, groups: usize) -> Self {
        Batcher {
            launch_group,
            stream,
            groups: (0..groups)
                .map(|_| (LowRankBatchParams::default(), Vec::new()))
                .collect(),
            launches: 0,
            job_sms: 1,
        }
    }

    /// Launches every waiting group if `access` conflicts with a waiting
    /// merge (call it before queueing a merge that is not batched).
    fn before(&mut self, access: &Access) -> Result<()> {
        let conflict = self
            .groups
            .iter()
            .any(|(_, accesses)| accesses.iter().any(|a| a.conflicts(access)));
        if conflict {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds `job` (`blocks` blocks) to group `key`, launching that group
    /// first when it is full and every group when `access` conflicts with a
    /// waiting merge.
    fn push(
        &mut self,
        key: usize,
        job: LowRankJobParams,
        blocks: u32,
        access: Access,
    ) -> Result<()> {
        self.before(&access)?;
        if !self.groups[key].0.push(job, blocks) {
            self.launch(key)?;
            if !self.groups[key].0.push(job, blocks) {
                return Err(merge_error(format!(
                    "a batched merge job of {blocks} blocks does not fit an empty batch"
                )));
            }
        }
        self.groups[key].1.push(access);
        Ok(())
    }

    /// Launches group `key` if it holds a job. The group is emptied first:
    /// a launch that fails is not tried again (by [`Self::fail`]).
    fn launch(&mut self, key: usize) -> Result<()> {
        let (batch, accesses) = &mut self.groups[key];
        if batch.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(batch);
        accesses.clear();
        (self.launch_group)(&mut batch, key / Body::COUNT, Body::ALL[key % Body::COUNT])?;
        self.launches += 1;
        Ok(())
    }

    /// Launches every waiting group.
    fn flush(&mut self) -> Result<()> {
        for key in 0..self.groups.len() {
            self.launch(key)?;
        }
        Ok(())
    }

    /// Launches every waiting group and says how many launches were queued.
    fn finish(mut self) -> Result<usize> {
        self.flush()?;
        Ok(self.launches)
    }

    /// After merge `failed` could not be queued: the merges before it that
    /// are still waiting are queued (as they are when each has a launch of
    /// its own; a group whose launch failed is not tried again), and the
    /// error is `failed`, or the first of those launches' errors.
    fn fail(self, failed: Error) -> Error {
        match self.finish() {
            Ok(_) => failed,
            Err(e) => e,
        }
    }
}

/// The kernel a low-rank merge runs on ([`CudaDevice::merge_lowrank_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowRankKernel {
    /// The pipelined tensor-core kernel on a device that has tensor cores
    /// where the factors allow and some rank is 16 or more or the ranks add
    /// up to more than 16
    /// ([`offload_kernels::cuda::LowRankMergeParams::pipelined_tensor_cores`]),
    /// fp32 FMA otherwise; on a device opened without
    /// [`CudaConfig::pipelined_merges`](super::CudaConfig::pipelined_merges),
    /// the unpipelined tensor-core kernel where some rank is 32 or more or
    /// the ranks add up to more than 32
    /// ([`offload_kernels::cuda::LowRankMergeParams::tensor_cores`]). A
    /// one-tensor merge of ranks adding up to at most 8 into a large 16-bit
    /// W takes the streaming kernel instead
    /// ([`offload_kernels::cuda::LowRankMergeParams::auto_streaming`]),
    /// also in a batch (a launch of its own).
    Auto,
    /// The fp32 FMA kernel.
    Fma,
    /// The tensor-core kernel.
    TensorCores,
    /// The pipelined tensor-core kernel (factors streamed through shared
    /// memory with `cp.async`, 64 × 128 tiles); the same operands and
    /// device requirements as [`LowRankKernel::TensorCores`].
    Pipelined,
    /// The streaming fp32 FMA kernels (the down factors in registers, no
    /// block-wide barrier) for stacks whose ranks add up to at most 32
    /// ([`offload_kernels::cuda::StreamKernel`]), one launch per tensor
    /// (also in [`CudaDevice::merge_lowrank_batch`]); larger stacks take
    /// the fp32 FMA kernel. Any factor dtypes, any device.
    Streaming,
}

/// The streaming kernel a low-rank merge of `params` into a W of `dtype`
/// runs on when `kernel` is asked for: any that holds the ranks for
/// [`LowRankKernel::Streaming`], the ranks-8 one for large 16-bit W with
/// [`LowRankKernel::Auto`]
/// ([`offload_kernels::cuda::LowRankMergeParams::auto_streaming`]); `None`
/// otherwise. The ranks-8 one is [`StreamKernel::Ranks8Shared`] on a device
/// configured for it ([`CudaConfig::stream8_shared`](super::CudaConfig::stream8_shared)).
fn streaming_kernel(
    params: &LowRankMergeParams,
    kernel: LowRankKernel,
    dtype: Dtype,
    stream8_shared: bool,
) -> Option<StreamKernel> {
    let k = match kernel {
        LowRankKernel::Streaming => params.stream_kernel(),
        LowRankKernel::Auto if params.auto_streaming(dtype) => params.stream_kernel(),
        _ => None,
    };
    match k {
        Some(StreamKernel::Ranks8) if stream8_shared => Some(StreamKernel::Ranks8Shared),
        k => k,
    }
}

/// The SMs each job of a batch of `jobs` merges sizes its grid for, on a
/// GPU of `all` SMs whose merges are capped at `cap`
/// ([`CudaConfig::merge_multiprocessors`](super::CudaConfig::merge_multiprocessors)):
/// every SM when uncapped (each job as if alone), else the cap shared
/// among the jobs, at least one each, so that a batched launch (the sum of
/// its jobs' grids) stays near the cap. A job's grid keeps at least one
/// block per column strip of its W either way.
fn job_multiprocessors(all: u32, cap: u32, jobs: usize) -> u32 {
    if cap >= all {
        all
    } else {
        let jobs = u32::try_from(jobs.max(1)).unwrap_or(u32::MAX);
        (cap / jobs).max(1)
    }
}

/// Where [`MergeKernels`] keeps the entry points of streaming kernel `k`.
fn stream_slot(k: StreamKernel) -> usize {
    match k {
        StreamKernel::Ranks8 => 0,
        StreamKernel::Ranks32 => 1,
        StreamKernel::Ranks8Shared => 2,
    }
}

/// How many merge kernels a [`CudaDevice`] has launched, by kernel
/// ([`CudaDevice::merge_launches`]): each launch that was queued counts
/// once, whatever it merges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeLaunches {
    /// One-tensor low-rank launches on the fp32 FMA kernel.
    pub fma: u64,
    /// One-tensor low-rank launches on the tensor-core kernel.
    pub tensor_cores: u64,
    /// One-tensor low-rank launches on the pipelined tensor-core kernel.
    pub pipelined: u64,
    /// Batched low-rank launches ([`CudaDevice::merge_lowrank_batch`]) on
    /// the fp32 FMA kernel.
    pub fma_batched: u64,
    /// Batched low-rank launches on the tensor-core kernel.
    pub tensor_cores_batched: u64,
    /// Batched low-rank launches on the pipelined tensor-core kernel.
    pub pipelined_batched: u64,
    /// Of the pipelined launches (one-tensor and batched), those on
    /// 128-row tiles ([`CudaConfig::pipe_tall`](super::CudaConfig::pipe_tall)).
    pub pipelined_tall: u64,
    /// One-tensor low-rank launches on a streaming kernel.
    pub streaming: u64,
    /// Of those, launches on the ranks-8 one with its down factors in
    /// shared memory ([`StreamKernel::Ranks8Shared`]).
    pub streaming_shared: u64,
    /// Launches of the general kernel (LoHa, LoKr, or more adapters than
    /// the low-rank kernels take).
    pub general: u64,
}

impl MergeKernels {
    /// Counts a launch of `f` in `launches`, under the entry point it is
    /// (what was launched, not what was meant to be).
    fn count(&self, f: sys::CUfunction, launches: &mut MergeLaunches) {
        if self.lowrank_stream.iter().any(|e| e.contains(&f)) {
            launches.streaming += 1;
            if self.lowrank_stream[stream_slot(StreamKernel::Ranks8Shared)].contains(&f) {
                launches.streaming_shared += 1;
            }
            return;
        }
        // The 128-row pipelined kernel's launches count as pipelined ones too.
        let tall = self.lowrank_pipe_tall.contains(&f);
        let tall_batch = self.lowrank_pipe_tall_batch.contains(&f);
        if tall || tall_batch {
            launches.pipelined_tall += 1;
        }
        let counter = [
            (&self.lowrank, &mut launches.fma),
            (&self.lowrank_mma, &mut launches.tensor_cores),
            (&self.lowrank_pipe, &mut launches.pipelined),
            (&self.lowrank_batch, &mut launches.fma_batched),
            (&self.lowrank_mma_batch, &mut launches.tensor_cores_batched),
            (&self.lowrank_pipe_batch, &mut launches.pipelined_batched),
            (&self.general, &mut launches.general),
        ]
        .into_iter()
        .find(|(entries, _)| entries.contains(&f));
        if let Some((_, c)) = counter {
            *c += 1;
        } else if tall {
            launches.pipelined += 1;
        } else if tall_batch {
            launches.pipelined_batched += 1;
        }
    }
}

/// The kernel body a low-rank launch runs: the resolution of a
/// [`LowRankKernel`] for one merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Fma,
    Mma,
    Pipe,
    /// The pipelined kernel on 128-row tiles (on a device configured for it).
    PipeTall,
}

impl Body {
    const COUNT: usize = 4;
    /// Indexed by `self as usize` (the Batcher's group keys).
    const ALL: [Body; Body::COUNT] = [Body::Fma, Body::Mma, Body::Pipe, Body::PipeTall];
}

const _: () = assert!(
    Body::Fma as usize == 0
        && Body::Mma as usize == 1
        && Body::Pipe as usize == 2
        && Body::PipeTall as usize == 3,
    "Body::ALL is indexed by discriminant"
);

impl CudaDevice {
    fn merge_kernels(&self) -> Result<Arc<MergeKernels>> {
        let mut slot = lock(&self.merge);
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let cc = self.info.compute_capability.unwrap_or((0, 0));
        let image = nvrtc::compile("lowrank_merge.cu", LOWRANK_MERGE_SRC, cc)?;
        let module = Module::load(&self.ctx, &image)?;
        let functions = |entry: fn(Dtype) -> &'static str| -> Result<[sys::CUfunction; 3]> {
            let mut f = [std::ptr::null_mut(); 3];
            for dtype in Dtype::ALL {
                f[dtype_code(dtype) as usize] = module.function(entry(dtype))?;
            }
            Ok(f)
        };
        let k = Arc::new(MergeKernels {
            lowrank: functions(lowrank_merge_entry)?,
            lowrank_mma: functions(lowrank_merge_mma_entry)?,
            lowrank_batch: functions(lowrank_merge_batch_entry)?,
            lowrank_mma_batch: functions(lowrank_merge_mma_batch_entry)?,
            lowrank_pipe: functions(lowrank_merge_pipe_entry)?,
            lowrank_pipe_batch: functions(lowrank_merge_pipe_batch_entry)?,
            lowrank_pipe_tall: functions(lowrank_merge_pipe_tall_entry)?,
            lowrank_pipe_tall_batch: functions(lowrank_merge_pipe_tall_batch_entry)?,
            lowrank_stream: [
                functions(|d| StreamKernel::Ranks8.entry(d))?,
                functions(|d| StreamKernel::Ranks32.entry(d))?,
                functions(|d| StreamKernel::Ranks8Shared.entry(d))?,
            ],
            general: functions(merge_entry)?,
            _module: module,
            image,
            library: nvrtc::loaded_library("libnvrtc.so"),
        });
        *slot = Some(k.clone());
        Ok(k)
    }

    /// Build (NVRTC, once per process) and load the merge kernels now rather
    /// than at the first merge, and say how they were built.
    ///
    /// Errors: [`Error::Unsupported`] when no NVRTC library loads;
    /// [`Error::Kernel`] with NVRTC's log when the source does not compile.
    pub fn prepare_merge(&self) -> Result<MergeKernelsInfo> {
        let k = self.merge_kernels()?;
        Ok(MergeKernelsInfo {
            target: k.image.target,
            nvrtc_version: k.image.nvrtc_version,
            build_time: k.image.build_time,
            disk_cache: k.image.disk_cache.clone(),
            options: k.image.options.clone(),
            log: k.image.log.clone(),
            library: k.library.clone(),
        })
    }

    /// Whether [`Self::merge_lowrank`] runs `spec` on the tensor cores on
    /// this device (every adapter's factors both f16 or both bf16, compute
    /// capability 8.0 or newer, and the ranks [`LowRankKernel::Auto`] gives
    /// the tensor-core kernel this device uses).
    pub fn merge_uses_tensor_cores(&self, spec: &MergeSpec<'_>) -> bool {
        let addrs = vec![(0, 0); spec.adapters().len()];
        self.info
            .compute_capability
            .is_some_and(|cc| cc >= MMA_MIN_COMPUTE_CAPABILITY)
            && LowRankMergeParams::new(spec, 0, &addrs).is_ok_and(|p| self.auto_tensor_cores(&p))
    }

    /// The kernel [`LowRankKernel::Auto`] runs `spec` on on this device:
    /// [`LowRankKernel::Streaming`] for ranks adding up to at most 8 into a
    /// large 16-bit W
    /// ([`offload_kernels::cuda::LowRankMergeParams::auto_streaming`]), else
    /// [`LowRankKernel::Fma`] unless [`Self::merge_uses_tensor_cores`], then
    /// [`LowRankKernel::Pipelined`] or, on a device opened without
    /// [`CudaConfig::pipelined_merges`](super::CudaConfig::pipelined_merges),
    /// [`LowRankKernel::TensorCores`].
    pub fn auto_lowrank_kernel(&self, spec: &MergeSpec<'_>) -> LowRankKernel {
        let addrs = vec![(0, 0); spec.adapters().len()];
        let streams = LowRankMergeParams::new(spec, 0, &addrs).is_ok_and(|p| {
            streaming_kernel(&p, LowRankKernel::Auto, spec.dtype(), self.stream8_shared).is_some()
        });
        if streams {
            LowRankKernel::Streaming
        } else if !self.merge_uses_tensor_cores(spec) {
            LowRankKernel::Fma
        } else if self.pipelined_merges {
            LowRankKernel::Pipelined
        } else {
            LowRankKernel::TensorCores
        }
    }

    /// Whether [`LowRankKernel::Auto`] gives merges with these parameters to
    /// this device's tensor-core kernel (compute capability aside).
    fn auto_tensor_cores(&self, params: &LowRankMergeParams) -> bool {
        if self.pipelined_merges {
            params.pipelined_tensor_cores()
        } else {
            params.tensor_cores()
        }
    }

    /// Queue `W[rows] += Σₐ sₐ · Δₐ` for `op` on `stream` (semantics of
    /// [`offload_kernels::merge`]: one pass, f32 accumulation, one rounding
    /// to W's dtype; rows outside the op's row slice untouched).
    ///
    /// [`Kernel::Merge`](crate::device::Kernel::Merge) on this device: up to
    /// [`MAX_ADAPTERS`] adapters that are all low-rank go to
    /// [`Self::merge_lowrank`] (fp32 FMA or tensor cores); anything else —
    /// LoHa, LoKr, a mix, or more low-rank adapters — to the general kernel
    /// ([`Self::merge`]), in launches of [`MERGE_MAX_ADAPTERS`] adapters
    /// (each launch rounds once, so a merge rounds once unless more than
    /// that many adapters are stacked). Every factor's device address comes
    /// from the op, in the order of
    /// [`MergeDelta::factors`](crate::device::MergeDelta::factors).
    pub(super) fn launch_merge(&self, w: DevicePtr, op: &MergeOp, stream: StreamId) -> Result<()> {
        let adapters = op.adapters_with(&mut |f| &f.host);
        let spec = MergeSpec::new(op.dtype, &op.shape, op.rows.clone(), &adapters)
            .map_err(|e| merge_error(e.to_string()))?;
        // MergeDelta::factors and delta_factors list the factors in the same order.
        let factors: Vec<Vec<DevicePtr>> = op
            .adapters
            .iter()
            .map(|a| a.delta.factors().iter().map(|f| f.ptr).collect())
            .collect();
        if adapters.len() <= MAX_ADAPTERS && op.adapters.iter().all(|a| a.delta.is_low_rank()) {
            let pairs: Vec<(DevicePtr, DevicePtr)> = factors.iter().map(|f| (f[0], f[1])).collect();
            return self.merge_lowrank(&spec, w, &pairs, stream);
        }
        for (chunk, addrs) in adapters
            .chunks(MERGE_MAX_ADAPTERS)
            .zip(factors.chunks(MERGE_MAX_ADAPTERS))
        {
            let spec = MergeSpec::new(op.dtype, &op.shape, Some(spec.row_range()), chunk)
                .map_err(|e| merge_error(e.to_string()))?;
            self.merge(&spec, w, addrs, stream)?;
        }
        Ok(())
    }

    /// Checks the regions of a merge before a launch: every one mapped,
    /// aligned to its element size, and no factor overlapping W's row slice
    /// (the first region).
    fn check_merge_regions(&self, regions: &[Region]) -> Result<()> {
        {
            let mem = lock(&self.mem);
            for r in regions {
                mem.check_access(r.addr, r.len)?;
            }
        }
        for r in regions {
            if r.addr.0 % r.align as u64 != 0 {
                return Err(merge_error(format!(
                    "operand at {} is not aligned to its {}-byte elements",
                    r.addr, r.align
                )));
            }
        }
        let out = regions[0];
        for r in &regions[1..] {
            let apart = r.addr.0.saturating_add(r.len as u64) <= out.addr.0
                || out.addr.0.saturating_add(out.len as u64) <= r.addr.0;
            if !apart {
                return Err(merge_error(format!(
                    "a factor at {} (+{} bytes) overlaps W's row slice",
                    r.addr, r.len
                )));
            }
        }
        Ok(())
    }

    /// Queue the low-rank LoRA merge `W[rows] += Σₐ sₐ · upₐ · downₐ` on
    /// `stream` (semantics of [`offload_kernels::merge`]).
    ///
    /// `spec` gives W's dtype and shape, the row slice and the adapters
    /// (scales, factor shapes and dtypes; the factors' host bytes are not
    /// read). `w` is the device address of W's first element (row 0 of the
    /// whole weight); `factors[i]` the device addresses of adapter `i`'s
    /// `(up, down)` factors, row-major as in the spec. Every region the
    /// kernel touches must be mapped, each address aligned to its element
    /// size, and the factors must not overlap W's row slice. At most
    /// [`MAX_ADAPTERS`] adapters, all low-rank.
    ///
    /// Runs on the kernel [`Self::auto_lowrank_kernel`] names: the tensor
    /// cores when [`Self::merge_uses_tensor_cores`] says so, the streaming
    /// kernel for ranks adding up to at most 8 into a large 16-bit W, fp32
    /// FMA otherwise. The kernels are compiled at the first call (see
    /// [`Self::prepare_merge`]).
    pub fn merge_lowrank(
        &self,
        spec: &MergeSpec<'_>,
        w: DevicePtr,
        factors: &[(DevicePtr, DevicePtr)],
        stream: StreamId,
    ) -> Result<()> {
        self.merge_lowrank_with(spec, w, factors, stream, LowRankKernel::Auto)
    }

    /// [`Self::merge_lowrank`] on the kernel `kernel` names (for benchmarks
    /// and tests that compare the two on the same merge). Asking for
    /// [`LowRankKernel::TensorCores`] where the device (compute capability
    /// below 8.0) or the factors (not both f16 or both bf16 per adapter)
    /// rule it out is an [`Error::Kernel`].
    pub fn merge_lowrank_with(
        &self,
        spec: &MergeSpec<'_>,
        w: DevicePtr,
        factors: &[(DevicePtr, DevicePtr)],
        stream: StreamId,
        kernel: LowRankKernel,
    ) -> Result<()> {
        let (mut params, _) = self.checked_lowrank_params(spec, w, factors)?;
        let s = self.stream(stream)?;
        if spec.adapters().is_empty() {
            return Ok(());
        }
        let kernels = self.merge_kernels()?;
        let code = dtype_code(spec.dtype()) as usize;
        let stream_kernel = streaming_kernel(&params, kernel, spec.dtype(), self.stream8_shared);
        let (function, (grid, block)) = match stream_kernel {
            Some(k) => (
                kernels.lowrank_stream[stream_slot(k)][code],
                params.stream_launch_dims(k, spec.dtype(), self.merge_multiprocessors),
            ),
            None => match self.lowrank_body(&params, kernel)? {
                Body::Fma => (
                    kernels.lowrank[code],
                    params.launch_dims(self.merge_multiprocessors),
                ),
                Body::Mma => (
                    kernels.lowrank_mma[code],
                    params.mma_launch_dims(self.merge_multiprocessors),
                ),
                Body::Pipe => (
                    kernels.lowrank_pipe[code],
                    params.pipe_launch_dims(self.merge_multiprocessors),
                ),
                Body::PipeTall => (
                    kernels.lowrank_pipe_tall[code],
                    params.pipe_tall_launch_dims(self.merge_multiprocessors),
                ),
            },
        };
        self.ctx.bind()?;
        let mut args: [*mut c_void; 1] = [(&mut params as *mut LowRankMergeParams).cast()];
        // SAFETY: the function (a low-rank entry point for W's dtype)
        // belongs to a module loaded in this context and takes one parameter,
        // OffloadLowRankMergeParams by value, whose layout LowRankMergeParams
        // mirrors (checked in offload-kernels); the block is the one that
        // entry point is written for, and the tensor-core ones are only
        // chosen on compute capability 8.0 or newer, where their
        // instructions exist (lowrank_body); a streaming one only for
        // ranks adding up to what it holds (stream_kernel);
        // every region the kernel touches is mapped and aligned (checked
        // above) and the trait makes callers keep it mapped until the queued
        // kernel has run; the stream is live (Arc).
        unsafe { result::launch_kernel(function, grid, block, s.raw, &mut args) }?;
        kernels.count(function, &mut lock(&self.merge_launches));
        Ok(())
    }

    /// The merge kernels this device has launched so far, by kernel.
    pub fn merge_launches(&self) -> MergeLaunches {
        *lock(&self.merge_launches)
    }

    /// The checks of [`Self::merge_lowrank_with`] (at most [`MAX_ADAPTERS`]
    /// adapters, all low-rank; every region mapped and aligned, no factor
    /// overlapping W's row slice) and the kernels' parameters, with what
    /// the merge writes and reads.
    fn checked_lowrank_params(
        &self,
        spec: &MergeSpec<'_>,
        w: DevicePtr,
        factors: &[(DevicePtr, DevicePtr)],
    ) -> Result<(LowRankMergeParams, Access)> {
        if spec.adapters().len() > MAX_ADAPTERS {
            return Err(merge_error(format!(
                "{} adapters in one low-rank merge (at most {MAX_ADAPTERS})",
                spec.adapters().len()
            )));
        }
        for (i, a) in spec.adapters().iter().enumerate() {
            if !matches!(a.delta, Delta::LowRank { .. }) {
                return Err(merge_error(format!(
                    "adapter {i} is LoHa or LoKr: merge_lowrank takes low-rank deltas only \
                     (CudaDevice::merge takes every kind)"
                )));
            }
        }
        let lists: Vec<Vec<DevicePtr>> = factors.iter().map(|&(u, d)| vec![u, d]).collect();
        let regions = merge_regions(spec, w, &lists)?;
        self.check_merge_regions(&regions)?;
        let addrs: Vec<(u64, u64)> = factors.iter().map(|(u, d)| (u.0, d.0)).collect();
        let params =
            LowRankMergeParams::new(spec, w.0, &addrs).map_err(|e| merge_error(e.to_string()))?;
        Ok((params, Access::of_regions(&regions)))
    }

    /// The kernel body a low-rank merge with these parameters runs when
    /// `kernel` is asked for; an error where the device or the factors rule
    /// out [`LowRankKernel::TensorCores`] or [`LowRankKernel::Pipelined`].
    fn lowrank_body(&self, params: &LowRankMergeParams, kernel: LowRankKernel) -> Result<Body> {
        let device_has_mma = self
            .info
            .compute_capability
            .is_some_and(|cc| cc >= MMA_MIN_COMPUTE_CAPABILITY);
        match kernel {
            LowRankKernel::Auto if device_has_mma && self.auto_tensor_cores(params) => {
                Ok(if self.pipelined_merges {
                    self.pipe_body()
                } else {
                    Body::Mma
                })
            }
            LowRankKernel::Auto | LowRankKernel::Fma | LowRankKernel::Streaming => Ok(Body::Fma),
            LowRankKernel::TensorCores | LowRankKernel::Pipelined => {
                if !device_has_mma {
                    return Err(merge_error(format!(
                        "the tensor-core merge needs compute capability {}.{} or newer (this device: {:?})",
                        MMA_MIN_COMPUTE_CAPABILITY.0,
                        MMA_MIN_COMPUTE_CAPABILITY.1,
                        self.info.compute_capability
                    )));
                }
                if !params.tensor_core_operands() {
                    return Err(merge_error(format!(
                        "the {} merge needs both factors of every adapter in f16, or both in bf16",
                        if kernel == LowRankKernel::Pipelined {
                            "pipelined tensor-core"
                        } else {
                            "tensor-core"
                        }
                    )));
                }
                Ok(if kernel == LowRankKernel::Pipelined {
                    self.pipe_body()
                } else {
                    Body::Mma
                })
            }
        }
    }

    /// The pipelined kernel's body on this device: on 128-row tiles where
    /// configured ([`CudaConfig::pipe_tall`](super::CudaConfig::pipe_tall)).
    fn pipe_body(&self) -> Body {
        if self.pipe_tall {
            Body::PipeTall
        } else {
            Body::Pipe
        }
    }

    /// Queue the low-rank merges `merges` on `stream` in as few launches as
    /// the batched kernels allow; the result is that of
    /// [`Self::merge_lowrank_with`] on each merge in order, each merge's
    /// elements bit-identical to it.
    ///
    /// Merges with one to [`BATCH_MAX_ADAPTERS`] adapters (and a non-empty
    /// row slice) are grouped by W's dtype and by kernel (`kernel`'s choice
    /// for each merge, as for one merge) into batched launches of up to
    /// [`BATCH_MAX_JOBS`](offload_kernels::cuda::BATCH_MAX_JOBS) merges, each merge given the blocks its own launch
    /// would have. A group is launched when it is full, before a merge
    /// whose weight overlaps a waiting merge's weight or factors (or whose
    /// factors overlap a waiting weight), and at the end. Others (more
    /// adapters, none) go to [`Self::merge_lowrank_with`] on their own.
    /// Returns the number of launches queued (a batched launch counts once;
    /// a merge with no adapter, none).
    ///
    /// Each merge is checked as [`Self::merge_lowrank_with`] checks it; the
    /// first that fails stops the call after the merges before it are
    /// queued (but for those of a batched launch that itself failed), with
    /// its error (a [`Error::Kernel`] message starting with "merge i of n";
    /// an address error names the address instead).
    pub fn merge_lowrank_batch(
        &self,
        merges: &[LowRankMerge<'_, '_>],
        stream: StreamId,
        kernel: LowRankKernel,
    ) -> Result<usize> {
        self.stream(stream)?;
        let groups = Body::COUNT * Dtype::ALL.len();
        let launch = |b: &mut LowRankBatchParams, code, body| {
            self.launch_lowrank_batch(b, code, body, stream)
        };
        let mut b = Batcher::new(launch, stream, groups);
        b.job_sms = job_multiprocessors(
            self.multiprocessors,
            self.merge_multiprocessors,
            merges.len(),
        );
        let n = merges.len();
        for (i, m) in merges.iter().enumerate() {
            if let Err(e) = self.batch_lowrank(&mut b, m, kernel) {
                return Err(b.fail(in_batch(e, || format!("merge {i} of {n}"))));
            }
        }
        b.finish()
    }

    /// Adds one low-rank merge to `b`, or queues it on its own (after the
    /// waiting merges it conflicts with) when it does not fit a job.
    fn batch_lowrank<L: FnMut(&mut LowRankBatchParams, usize, Body) -> Result<()>>(
        &self,
        b: &mut Batcher<L>,
        m: &LowRankMerge<'_, '_>,
        kernel: LowRankKernel,
    ) -> Result<()> {
        let (params, access) = self.checked_lowrank_params(m.spec, m.w, m.factors)?;
        let body = self.lowrank_body(&params, kernel)?;
        // The streaming kernels have no batched form.
        let streamed =
            streaming_kernel(&params, kernel, m.spec.dtype(), self.stream8_shared).is_some();
        let job = LowRankJobParams::from_params(&params)
            .filter(|j| !streamed && j.num_adapters > 0 && j.rows > 0 && j.cols > 0);
        let Some(job) = job else {
            b.before(&access)?;
            self.merge_lowrank_with(m.spec, m.w, m.factors, b.stream, kernel)?;
            if params.num_adapters > 0 {
                b.launches += 1;
            }
            return Ok(());
        };
        let (grid, _) = match body {
            Body::Fma => params.launch_dims(b.job_sms),
            Body::Mma => params.mma_launch_dims(b.job_sms),
            Body::Pipe => params.pipe_launch_dims(b.job_sms),
            Body::PipeTall => params.pipe_tall_launch_dims(b.job_sms),
        };
        let key = Body::COUNT * dtype_code(m.spec.dtype()) as usize + body as usize;
        b.push(key, job, grid.0, access)
    }

    /// One batched launch of `batch` (jobs whose regions were checked, W
    /// dtype [`dtype_code`] `code`) on the kernel body `body`.
    fn launch_lowrank_batch(
        &self,
        batch: &mut LowRankBatchParams,
        code: usize,
        body: Body,
        stream: StreamId,
    ) -> Result<()> {
        let s = self.stream(stream)?;
        let kernels = self.merge_kernels()?;
        let function = match body {
            Body::Fma => kernels.lowrank_batch[code],
            Body::Mma => kernels.lowrank_mma_batch[code],
            Body::Pipe => kernels.lowrank_pipe_batch[code],
            Body::PipeTall => kernels.lowrank_pipe_tall_batch[code],
        };
        let (grid, block) = batch.launch_dims();
        // The 128-row pipelined kernel's blocks are twice as large.
        let block = if body == Body::PipeTall {
            PIPE_TALL_BLOCK_DIM
        } else {
            block
        };
        self.ctx.bind()?;
        let mut args: [*mut c_void; 1] = [(batch as *mut LowRankBatchParams).cast()];
        // SAFETY: the function (a batched low-rank entry point for the
        // jobs' W dtype) belongs to a module loaded in this context and
        // takes one parameter, OffloadLowRankBatchParams by value (2504
        // bytes, under the 4 KiB parameter limit), whose layout
        // LowRankBatchParams mirrors (checked in offload-kernels); the block
        // is the one those entry points are written for (256 threads, 512 for
        // the 128-row pipelined kernel), and the tensor-core ones are only chosen on compute
        // capability 8.0 or newer (lowrank_body); every job's regions were checked mapped
        // and aligned, with no factor overlapping its own row slice
        // (checked_lowrank_params), and the Batcher only groups jobs whose
        // row slices overlap no other job's slice or factors, so blocks of
        // different jobs never touch the same written bytes; the trait
        // makes callers keep the regions mapped until the queued kernel has
        // run; the stream is live (Arc).
        unsafe { result::launch_kernel(function, grid, block, s.raw, &mut args) }?;
        kernels.count(function, &mut lock(&self.merge_launches));
        Ok(())
    }

    /// [`Kernel::MergeBatch`](crate::device::Kernel::MergeBatch) on this
    /// device: the low-rank ops of one to [`BATCH_MAX_ADAPTERS`] adapters
    /// through [`Self::merge_lowrank_batch`]'s grouping (the kernel chosen
    /// as for one op), every other op as one
    /// [`Kernel::Merge`](crate::device::Kernel::Merge) of its own
    /// ([`Self::launch_merge`]), in order with the waiting groups it
    /// conflicts with. The first op that fails stops the call after the ops
    /// before it are queued; a kernel error names it
    /// ([`MergeOp::batch_context`]).
    pub(super) fn launch_merge_batch(
        &self,
        base: DevicePtr,
        ops: &[(usize, Arc<MergeOp>)],
        stream: StreamId,
    ) -> Result<()> {
        self.stream(stream)?;
        let groups = Body::COUNT * Dtype::ALL.len();
        let launch = |b: &mut LowRankBatchParams, code, body| {
            self.launch_lowrank_batch(b, code, body, stream)
        };
        let mut b = Batcher::new(launch, stream, groups);
        b.job_sms =
            job_multiprocessors(self.multiprocessors, self.merge_multiprocessors, ops.len());
        let n = ops.len();
        for (i, (off, op)) in ops.iter().enumerate() {
            let w = base.offset(*off);
            if let Err(e) = self.batch_op(&mut b, w, op) {
                return Err(b.fail(in_batch(e, || op.batch_context(i, n, w))));
            }
        }
        b.finish().map(|_| ())
    }

    /// Adds one op of a [`Kernel::MergeBatch`](crate::device::Kernel::MergeBatch) to `b`.
    fn batch_op<L: FnMut(&mut LowRankBatchParams, usize, Body) -> Result<()>>(
        &self,
        b: &mut Batcher<L>,
        w: DevicePtr,
        op: &MergeOp,
    ) -> Result<()> {
        let batchable = !op.adapters.is_empty()
            && op.adapters.len() <= BATCH_MAX_ADAPTERS
            && op.adapters.iter().all(|a| a.delta.is_low_rank());
        if !batchable {
            b.before(&Access::of_op(w, op))?;
            self.launch_merge(w, op, b.stream)?;
            if !op.adapters.is_empty() {
                b.launches += 1;
            }
            return Ok(());
        }
        let adapters = op.adapters_with(&mut |f| &f.host);
        let spec = MergeSpec::new(op.dtype, &op.shape, op.rows.clone(), &adapters)
            .map_err(|e| merge_error(e.to_string()))?;
        // MergeDelta::factors lists a low-rank delta's up, then its down.
        let pairs: Vec<(DevicePtr, DevicePtr)> = op
            .adapters
            .iter()
            .map(|a| {
                let f = a.delta.factors();
                (f[0].ptr, f[1].ptr)
            })
            .collect();
        let m = LowRankMerge {
            spec: &spec,
            w,
            factors: &pairs,
        };
        self.batch_lowrank(b, &m, LowRankKernel::Auto)
    }

    /// Queue the LoRA merge `W[rows] += Σₐ sₐ · Δₐ` of any mix of low-rank,
    /// LoHa and LoKr deltas on `stream`, in one launch of the general kernel
    /// (semantics of [`offload_kernels::merge`]: one pass, f32 accumulation,
    /// one rounding to W's dtype).
    ///
    /// `spec` as for [`Self::merge_lowrank`]; `factors[i]` holds the device
    /// addresses of adapter `i`'s factors in the order of
    /// [`offload_kernels::cuda::delta_factors`] (`up, down`; `w1a, w1b, w2a,
    /// w2b`; LoKr `w1` or `w1a, w1b`, then `w2` or `w2a, w2b`). Every region
    /// must be mapped, each address aligned to its element size, and no
    /// factor may overlap W's row slice. At most [`MERGE_MAX_ADAPTERS`]
    /// adapters.
    pub fn merge(
        &self,
        spec: &MergeSpec<'_>,
        w: DevicePtr,
        factors: &[Vec<DevicePtr>],
        stream: StreamId,
    ) -> Result<()> {
        if spec.adapters().len() > MERGE_MAX_ADAPTERS {
            return Err(merge_error(format!(
                "{} adapters in one merge (at most {MERGE_MAX_ADAPTERS})",
                spec.adapters().len()
            )));
        }
        let regions = merge_regions(spec, w, factors)?;
        self.check_merge_regions(&regions)?;
        let addrs: Vec<Vec<u64>> = factors
            .iter()
            .map(|f| f.iter().map(|p| p.0).collect())
            .collect();
        let mut params =
            MergeParams::new(spec, w.0, &addrs).map_err(|e| merge_error(e.to_string()))?;
        let s = self.stream(stream)?;
        if spec.adapters().is_empty() {
            return Ok(());
        }
        let kernels = self.merge_kernels()?;
        let (grid, block) = params.launch_dims();
        self.ctx.bind()?;
        let mut args: [*mut c_void; 1] = [(&mut params as *mut MergeParams).cast()];
        let function = kernels.general[dtype_code(spec.dtype()) as usize];
        // SAFETY: the function (the general entry point for W's dtype)
        // belongs to a module loaded in this context and takes one parameter,
        // OffloadMergeParams by value (3352 bytes, under the 4 KiB parameter
        // limit), whose layout MergeParams mirrors (checked in
        // offload-kernels); every region the kernel touches is mapped and
        // aligned (checked above) and the trait makes callers keep it mapped
        // until the queued kernel has run; the stream is live (Arc).
        unsafe { result::launch_kernel(function, grid, block, s.raw, &mut args) }?;
        kernels.count(function, &mut lock(&self.merge_launches));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_kernels::cuda::BATCH_MAX_JOBS;
    use offload_kernels::{Adapter, Factor, KronFactor};
    use std::collections::BTreeSet;

    /// Which streaming kernel a merge runs on: any that holds the ranks when
    /// asked for by name, the ranks-8 one for `auto` only into a 16-bit W of
    /// 2²⁴ elements or more, kernel 1c in place of the ranks-8 one on a
    /// device configured for it (never in place of the ranks-32 one), none
    /// for the other kernels; each in a slot of its own.
    #[test]
    fn streaming_kernel_by_request_configuration_and_size() {
        use LowRankKernel::{Auto, Fma, Pipelined, Streaming, TensorCores};
        use StreamKernel::{Ranks32, Ranks8, Ranks8Shared};
        let params = |ranks: &[u32], rows: u32, cols: u32| {
            let mut p = LowRankMergeParams {
                rows,
                cols,
                ..Default::default()
            };
            p.num_adapters = ranks.len() as u32;
            for (a, &r) in p.adapters.iter_mut().zip(ranks) {
                a.rank = r;
            }
            p
        };
        let small = params(&[8], 1280, 5120);
        let big = params(&[4, 4], 4096, 4096);
        let wide = params(&[8, 1], 4096, 4096);
        let (f16, bf16, f32) = (Dtype::F16, Dtype::BF16, Dtype::F32);
        assert_eq!(
            streaming_kernel(&small, Streaming, f16, false),
            Some(Ranks8)
        );
        assert_eq!(
            streaming_kernel(&small, Streaming, f32, true),
            Some(Ranks8Shared)
        );
        assert_eq!(streaming_kernel(&wide, Streaming, f16, true), Some(Ranks32));
        assert_eq!(
            streaming_kernel(&params(&[33], 8, 8), Streaming, f16, true),
            None
        );
        assert_eq!(streaming_kernel(&small, Auto, f16, false), None);
        assert_eq!(streaming_kernel(&big, Auto, f16, false), Some(Ranks8));
        assert_eq!(streaming_kernel(&big, Auto, bf16, true), Some(Ranks8Shared));
        assert_eq!(streaming_kernel(&big, Auto, f32, false), None);
        assert_eq!(streaming_kernel(&wide, Auto, f16, true), None);
        for k in [Fma, TensorCores, Pipelined] {
            assert_eq!(streaming_kernel(&big, k, f16, true), None, "{k:?}");
        }
        let slots: BTreeSet<usize> = [Ranks8, Ranks32, Ranks8Shared]
            .into_iter()
            .map(stream_slot)
            .collect();
        assert_eq!(slots, BTreeSet::from([0, 1, 2]));
    }

    /// A batch's jobs size their grids for every SM when merges are not
    /// capped, else for the cap shared among them, at least one SM each.
    #[test]
    fn batched_jobs_share_the_merge_sm_cap() {
        assert_eq!(job_multiprocessors(132, 132, 7), 132);
        assert_eq!(job_multiprocessors(132, 132, 0), 132);
        assert_eq!(job_multiprocessors(132, 33, 1), 33);
        assert_eq!(job_multiprocessors(132, 33, 7), 4);
        assert_eq!(job_multiprocessors(132, 33, 100), 1);
        assert_eq!(job_multiprocessors(132, 33, 0), 33);
        assert_eq!(job_multiprocessors(132, 1, usize::MAX), 1);
    }

    /// The grouping on its own, with launches recorded instead of queued:
    /// random merges over 4 weights of 4 row slices each (batched with a
    /// random W dtype and kernel, or on their own), reading factors of
    /// their own, shared ones, or bytes of another merge's weight. Every
    /// merge is launched once; no launch holds two merges that conflict or
    /// more than `BATCH_MAX_JOBS`; of two that conflict, the earlier is in
    /// an earlier launch; disjoint slices of one weight do share launches.
    #[test]
    fn batcher_never_groups_conflicting_merges_and_keeps_their_order() {
        use std::cell::RefCell;
        let mut state = 0x5eed_u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut shared_launches = 0;
        for _ in 0..300 {
            // Launches: the merges each holds, in queue order.
            let log: RefCell<Vec<Vec<usize>>> = RefCell::new(Vec::new());
            let record = |b: &mut LowRankBatchParams, _code: usize, _body: Body| {
                assert!(b.len() <= BATCH_MAX_JOBS);
                log.borrow_mut()
                    .push(b.jobs[..b.len()].iter().map(|j| j.w as usize).collect());
                Ok(())
            };
            let mut b = Batcher::new(record, StreamId(0), 9);
            let mut accesses = Vec::new();
            for i in 0..(1 + next(40) as usize) {
                let weight = 10_000 * next(4);
                let slice = weight + 100 * next(4);
                let writes = (slice, slice + 100 * (1 + next(2)));
                let reads = (0..1 + next(3))
                    .map(|_| match next(4) {
                        // Another merge's weight bytes.
                        0 => {
                            let at = 10_000 * next(4) + next(400);
                            (at, at + 8)
                        }
                        // A factor shared with others, or one of its own.
                        1 => (90_000, 90_064),
                        _ => {
                            let at = 100_000 + 1_000 * i as u64;
                            (at, at + 64)
                        }
                    })
                    .collect();
                let access = Access { writes, reads };
                if next(5) == 0 {
                    b.before(&access).unwrap();
                    log.borrow_mut().push(vec![i]);
                } else {
                    let job = LowRankJobParams {
                        w: i as u64,
                        cols: 1,
                        ..LowRankJobParams::default()
                    };
                    let blocks = 1 + next(64) as u32;
                    b.push(next(9) as usize, job, blocks, access.clone())
                        .unwrap();
                }
                accesses.push(access);
            }
            b.finish().unwrap();
            let log = log.into_inner();
            let mut launch_of = vec![usize::MAX; accesses.len()];
            for (k, launch) in log.iter().enumerate() {
                for &i in launch {
                    assert_eq!(launch_of[i], usize::MAX, "merge {i} launched twice");
                    launch_of[i] = k;
                }
                for (x, &i) in launch.iter().enumerate() {
                    for &j in &launch[x + 1..] {
                        assert!(
                            !accesses[i].conflicts(&accesses[j]),
                            "merges {i} and {j} conflict but share launch {k}: {log:?}"
                        );
                    }
                }
                let weights: BTreeSet<u64> = launch
                    .iter()
                    .map(|&i| accesses[i].writes.0 / 10_000)
                    .collect();
                if weights.len() < launch.len() {
                    shared_launches += 1;
                }
            }
            for i in 0..accesses.len() {
                assert_ne!(launch_of[i], usize::MAX, "merge {i} never launched");
                for j in i + 1..accesses.len() {
                    if accesses[i].conflicts(&accesses[j]) {
                        assert!(
                            launch_of[i] < launch_of[j],
                            "merge {i} conflicts with {j} but is not launched before it: {log:?}"
                        );
                    }
                }
            }
        }
        assert!(
            shared_launches > 0,
            "no launch held two slices of one weight"
        );
    }

    /// A group whose launch fails is not launched again when the call
    /// fails, and its error is the one reported.
    #[test]
    fn a_failed_group_launch_is_not_retried() {
        let tries = std::cell::Cell::new(0);
        let fail = |_: &mut LowRankBatchParams, _: usize, _: Body| {
            tries.set(tries.get() + 1);
            Err(merge_error("refused".into()))
        };
        let mut b = Batcher::new(fail, StreamId(0), 2);
        let access = |w: u64| Access {
            writes: (w, w + 10),
            reads: Vec::new(),
        };
        let job = LowRankJobParams {
            cols: 1,
            ..LowRankJobParams::default()
        };
        b.push(0, job, 1, access(0)).unwrap();
        // A merge over the same weight launches the waiting group first.
        let e = b.before(&access(5)).unwrap_err();
        assert_eq!(tries.get(), 1);
        let e = b.fail(e);
        assert_eq!(tries.get(), 1, "the failed group was launched again");
        assert!(e.to_string().contains("refused"), "{e}");
    }

    #[test]
    fn accesses_conflict_where_one_writes_what_the_other_touches() {
        let a = |writes: (u64, u64), reads: &[(u64, u64)]| Access {
            writes,
            reads: reads.to_vec(),
        };
        let x = a((100, 200), &[(1000, 1100)]);
        // Disjoint weights, shared factors (both only read): no conflict.
        assert!(!x.conflicts(&a((200, 300), &[(1000, 1100)])));
        // The same weight, or overlapping slices of one.
        assert!(x.conflicts(&a((100, 200), &[(2000, 2100)])));
        assert!(x.conflicts(&a((199, 300), &[])));
        // One writes what the other reads, either way round.
        assert!(x.conflicts(&a((1050, 1060), &[])));
        assert!(x.conflicts(&a((500, 600), &[(150, 160)])));
        assert!(a((500, 600), &[(150, 160)]).conflicts(&x));
        // Empty ranges touch nothing.
        assert!(!x.conflicts(&a((150, 150), &[])));
        // Of regions: W's row slice written, the factors read.
        let r = |addr: u64, len: usize| Region {
            addr: DevicePtr(addr),
            len,
            align: 2,
        };
        let acc = Access::of_regions(&[r(10, 20), r(40, 4), r(50, 6)]);
        assert_eq!(
            (acc.writes, acc.reads),
            ((10, 30), vec![(40, 44), (50, 56)])
        );
    }

    #[test]
    fn regions_cover_the_row_slice_and_every_factor() {
        let up = vec![0u8; 30 * 4 * 2];
        let down = vec![0u8; 4 * 70 * 4];
        let adapters = [Adapter {
            scale: 0.5,
            delta: Delta::LowRank {
                up: Factor::new(&up, Dtype::BF16, 30, 4),
                down: Factor::new(&down, Dtype::F32, 4, 70),
            },
        }];
        let spec = MergeSpec::new(Dtype::F16, &[100, 70], Some(10..40), &adapters).unwrap();
        let r = merge_regions(
            &spec,
            DevicePtr(0x10000),
            &[vec![DevicePtr(0x20000), DevicePtr(0x30000)]],
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                Region {
                    addr: DevicePtr(0x10000 + 10 * 70 * 2),
                    len: 30 * 70 * 2,
                    align: 2
                },
                Region {
                    addr: DevicePtr(0x20000),
                    len: 30 * 4 * 2,
                    align: 2
                },
                Region {
                    addr: DevicePtr(0x30000),
                    len: 4 * 70 * 4,
                    align: 4
                },
            ]
        );
        assert!(merge_regions(&spec, DevicePtr(0), &[]).is_err());
        assert!(merge_regions(&spec, DevicePtr(0), &[vec![DevicePtr(0x20000)]]).is_err());
    }

    #[test]
    fn merge_op_factors_and_kernel_factors_share_their_order() {
        use crate::device::{MergeAdapter, MergeDelta, MergeFactor, MergeKron, MergeOp};
        // Distinct shapes, so a different order shows.
        let f = |rows: usize, cols: usize, dtype: Dtype| MergeFactor {
            ptr: DevicePtr(0x1000 * (rows * 100 + cols) as u64),
            host: vec![0u8; rows * cols * dtype.size_in_bytes()].into(),
            dtype,
            rows,
            cols,
        };
        let adapter = |delta| MergeAdapter { scale: 1.0, delta };
        let op = MergeOp {
            dtype: Dtype::F16,
            shape: vec![12, 10],
            rows: None,
            adapters: vec![
                adapter(MergeDelta::LowRank {
                    up: f(12, 3, Dtype::F16),
                    down: f(3, 10, Dtype::F32),
                }),
                adapter(MergeDelta::LoHa {
                    w1a: f(12, 2, Dtype::BF16),
                    w1b: f(2, 10, Dtype::F16),
                    w2a: f(12, 4, Dtype::F32),
                    w2b: f(4, 10, Dtype::BF16),
                }),
                adapter(MergeDelta::LoKr {
                    w1: MergeKron::Full(f(3, 2, Dtype::F32)),
                    w2: MergeKron::LowRank {
                        a: f(4, 1, Dtype::F16),
                        b: f(1, 5, Dtype::BF16),
                    },
                }),
                adapter(MergeDelta::LoKr {
                    w1: MergeKron::LowRank {
                        a: f(6, 2, Dtype::BF16),
                        b: f(2, 5, Dtype::F32),
                    },
                    w2: MergeKron::Full(f(2, 2, Dtype::F16)),
                }),
            ],
        };
        op.validate().unwrap();
        let views = op.adapters_with(&mut |f| &f.host);
        for (a, view) in op.adapters.iter().zip(&views) {
            let ours: Vec<(usize, usize, Dtype)> = a
                .delta
                .factors()
                .iter()
                .map(|f| (f.rows, f.cols, f.dtype))
                .collect();
            let kernels: Vec<(usize, usize, Dtype)> = delta_factors(&view.delta)
                .iter()
                .map(|f| (f.rows, f.cols, f.dtype))
                .collect();
            assert_eq!(ours, kernels);
        }
    }

    #[test]
    fn regions_of_loha_and_lokr_follow_the_factor_order() {
        // W [12, 10] f32, whole; LoKr w1 [3, 2] whole (bf16), w2 [4, 5] = a [4, 1] · b [1, 5].
        let w1 = vec![0u8; 3 * 2 * 2];
        let (a, b) = (vec![0u8; 4 * 4], vec![0u8; 5 * 2]);
        let h = vec![0u8; 12 * 2 * 2];
        let hb = vec![0u8; 2 * 10 * 4];
        let adapters = [
            Adapter {
                scale: 1.0,
                delta: Delta::LoKr {
                    w1: KronFactor::Full(Factor::new(&w1, Dtype::BF16, 3, 2)),
                    w2: KronFactor::LowRank {
                        a: Factor::new(&a, Dtype::F32, 4, 1),
                        b: Factor::new(&b, Dtype::F16, 1, 5),
                    },
                },
            },
            Adapter {
                scale: 1.0,
                delta: Delta::LoHa {
                    w1a: Factor::new(&h, Dtype::F16, 12, 2),
                    w1b: Factor::new(&hb, Dtype::F32, 2, 10),
                    w2a: Factor::new(&h, Dtype::BF16, 12, 2),
                    w2b: Factor::new(&hb, Dtype::F32, 2, 10),
                },
            },
        ];
        let spec = MergeSpec::new(Dtype::F32, &[12, 10], None, &adapters).unwrap();
        let p = |a: u64| DevicePtr(a);
        let r = merge_regions(
            &spec,
            p(0x1000),
            &[
                vec![p(0x2000), p(0x3000), p(0x4000)],
                vec![p(0x5000), p(0x6000), p(0x7000), p(0x8000)],
            ],
        )
        .unwrap();
        let got: Vec<(u64, usize, usize)> = r.iter().map(|r| (r.addr.0, r.len, r.align)).collect();
        assert_eq!(
            got,
            [
                (0x1000, 12 * 10 * 4, 4),
                (0x2000, 12, 2),
                (0x3000, 16, 4),
                (0x4000, 10, 2),
                (0x5000, 48, 2),
                (0x6000, 80, 4),
                (0x7000, 48, 2),
                (0x8000, 80, 4),
            ]
        );
        // A LoKr with a low-rank side takes three addresses, not two.
        assert!(merge_regions(
            &spec,
            p(0x1000),
            &[
                vec![p(0x2000), p(0x3000)],
                vec![p(0x5000), p(0x6000), p(0x7000), p(0x8000)],
            ],
        )
        .is_err());
    }
}
