//! `HostDevice`: device memory emulated on the CPU, honestly.
//!
//! Physical pages are page-sized offsets in one memfd of the configured
//! capacity. A virtual range is reserved with `mmap(PROT_NONE)` and pages are
//! mapped into it with `MAP_FIXED | MAP_SHARED` views of the memfd, so an
//! allocation is contiguous exactly as with `cuMemMap`, while its pages are
//! not. Each stream is a worker thread that runs its queue in order; events are
//! cross-thread signals; an optional link rate throttles copies like a bus.
//! Freed pages are filled with [`POISON`] so a use after free shows up.
//!
//! Every copy and kernel checks, while it runs, that the device memory it
//! touches is mapped (holding the mapping table's read lock), so a bug above
//! the trait surfaces as a stream error, not a segmentation fault.
//!
//! Contiguous allocations ([`Device::alloc_contiguous`]) take pages of the
//! same memfd, mapped in order into an aligned region of their own, so they
//! share the device's capacity with pages. [`HostDevice::without_vmm`] makes
//! a device that offers only those, as a GPU without the CUDA virtual memory
//! API does: no physical pages, no reserved ranges, no mapping.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dashmap::DashMap;
use rustix::mm::{MapFlags, ProtFlags};

use super::{
    BackendKind, Device, DeviceInfo, DevicePtr, EventId, HostFn, Kernel, MemoryInfo, MergeOp,
    PhysPage, PinnedBuffer, StreamId, StreamPriority, VirtualRange,
};
use crate::error::{Error, Result};

/// The byte written over every freed page of a [`HostDevice`].
pub const POISON: u8 = 0xA5;

/// Copies are throttled and checked in chunks of this many bytes.
const COPY_CHUNK: usize = 1 << 20;

/// Configuration of a [`HostDevice`].
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Emulated device memory in bytes (rounded down to whole pages). Default 4 GiB.
    pub capacity: usize,
    /// Page size in bytes: a power of two, at least the OS page size. Default 2 MiB.
    pub page_size: usize,
    /// Throttle host↔device copies to this rate in GB/s (10⁹ bytes per second), per direction. Default: unthrottled.
    pub link_gbps: Option<f64>,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            capacity: 4 << 30,
            page_size: 2 << 20,
            link_gbps: None,
        }
    }
}

/// Counters a [`HostDevice`] keeps, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Physical pages allocated now, by [`Device::alloc_page`] or behind
    /// contiguous allocations.
    pub pages_allocated: usize,
    /// Pages mapped into virtual ranges now (by [`Device::map`]; the pages
    /// behind contiguous allocations are not counted).
    pub pages_mapped: usize,
    /// Virtual ranges reserved now.
    pub ranges_reserved: usize,
    /// Contiguous allocations ([`Device::alloc_contiguous`]) live now.
    pub contiguous_allocations: usize,
    /// Bytes of the contiguous allocations live now.
    pub contiguous_bytes: usize,
    /// Contiguous allocations made since creation.
    pub contiguous_calls: u64,
    /// Bytes copied host to device since creation.
    pub bytes_h2d: u64,
    /// Host-to-device copies queued since creation (each costs a GPU a
    /// driver call and a copy-engine start, whatever its size).
    pub copies_h2d: u64,
    /// Pinned buffers of this device freed while a copy queued from or to
    /// them had not run: a caller's bug, which on a GPU reads or writes
    /// freed memory. This backend keeps such a buffer instead of freeing it.
    pub pinned_freed_in_use: u64,
    /// Bytes copied device to host since creation.
    pub bytes_d2h: u64,
    /// Map calls since creation.
    pub map_calls: u64,
    /// Unmap calls since creation.
    pub unmap_calls: u64,
    /// Host functions queued since creation, on any stream. On a GPU each
    /// one holds its stream until a driver thread has run it on the CPU,
    /// so work that must not slow a stream queues none there.
    pub host_fns: u64,
    /// Cross-stream waits asked for since creation, on any stream
    /// ([`Device::stream_wait_event`]): on a GPU, a driver call each.
    pub stream_waits: u64,
    /// Event queries since creation ([`Device::event_query`]): on a GPU, a
    /// driver call each.
    pub event_queries: u64,
    /// Host waits for events since creation ([`Device::event_wait`]): on a
    /// GPU, at least one driver call each, and the calling thread blocked
    /// until the event completes.
    pub event_waits: u64,
    /// Write-combined pinned buffers asked for since creation
    /// ([`Device::alloc_pinned_write_combined`]); this backend has no such
    /// memory and gives plain pinned buffers for them.
    pub write_combined_requests: u64,
    /// Streams asked for at [`StreamPriority::High`] since creation; this
    /// backend runs every stream alike.
    pub high_priority_streams: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PageState {
    Free,
    Allocated,
    Mapped(u64),
    /// Behind the contiguous allocation at this address.
    InBlock(u64),
}

struct Pages {
    free: Vec<u32>,
    state: Vec<PageState>,
}

impl Pages {
    /// The index of `page` if it is allocated and not mapped; else `BadPage`
    /// saying `if_mapped`, or that it is not allocated.
    fn allocated_unmapped(&self, page: PhysPage, if_mapped: &'static str) -> Result<usize> {
        let idx = page.0 as usize;
        match self.state.get(idx) {
            Some(PageState::Allocated) => Ok(idx),
            Some(PageState::Mapped(_)) => Err(Error::BadPage {
                page,
                what: if_mapped,
            }),
            Some(PageState::InBlock(_)) => Err(Error::BadPage {
                page,
                what: "is behind a contiguous allocation",
            }),
            _ => Err(Error::BadPage {
                page,
                what: "is not allocated",
            }),
        }
    }
}

struct Range {
    len: usize,
    /// Physical page index mapped at each page slot.
    slots: Vec<Option<u32>>,
    /// A contiguous allocation (every slot mapped, for its whole life),
    /// not a reserved range: `map`, `unmap` and `release` refuse it.
    block: bool,
}

/// A serialised link: copies reserve time on it so their total rate never exceeds it.
struct Link {
    bytes_per_sec: f64,
    next_free: Mutex<Instant>,
}

impl Link {
    /// Reserve time for `bytes`; returns when the transfer may be considered done.
    fn reserve(&self, bytes: usize) -> Instant {
        let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let start = if *next > now { *next } else { now };
        let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec);
        *next = end;
        end
    }
}

/// Recordings of one event. Each `record_event` is a new epoch; recordings
/// on different streams may complete out of order, so completion is kept per
/// epoch (all epochs up to `low` are complete, plus those in `done`), and a
/// wait for epoch `e` waits for that recording only, as with CUDA, where a
/// wait refers to the recording captured when it was queued.
#[derive(Default)]
struct EventInner {
    recorded: u64,
    low: u64,
    done: std::collections::BTreeSet<u64>,
    /// Failures of the stream work that recent recordings covered, by epoch.
    failed: BTreeMap<u64, (StreamId, String)>,
    /// The latest recording completed so far and when it completed, for
    /// [`Device::event_elapsed`].
    reached: Option<(u64, Instant)>,
}

impl EventInner {
    fn is_complete(&self, epoch: u64) -> bool {
        epoch <= self.low || self.done.contains(&epoch)
    }

    fn failure(&self, epoch: u64) -> Option<&(StreamId, String)> {
        self.failed.get(&epoch)
    }
}

#[derive(Default)]
struct EventState {
    inner: Mutex<EventInner>,
    cv: Condvar,
    /// Made by `create_timing_event`: `event_elapsed` refuses others, as CUDA does.
    timing: bool,
}

impl EventState {
    fn complete(&self, epoch: u64, failed: Option<(StreamId, String)>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if epoch > g.low {
            g.done.insert(epoch);
            loop {
                let next = g.low + 1;
                if !g.done.remove(&next) {
                    break;
                }
                g.low = next;
            }
        }
        if let Some(f) = failed {
            g.failed.insert(epoch, f);
        }
        if g.reached.is_none_or(|(e, _)| epoch >= e) {
            g.reached = Some((epoch, Instant::now()));
        }
        // Only recent recordings can still be asked about.
        let keep_from = g.recorded.saturating_sub(64);
        g.failed.retain(|&e, _| e >= keep_from);
        drop(g);
        self.cv.notify_all();
    }

    fn wait_for(&self, epoch: u64, deadline: Option<Instant>) -> std::result::Result<(), ()> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !g.is_complete(epoch) {
            match deadline {
                None => g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(());
                    }
                    g = self
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: the pointer is only dereferenced by the stream worker under the
// contract of `copy_h2d_async` / `copy_d2h_async`, which makes the caller
// keep the memory valid and unshared until the copy has run.
unsafe impl Send for SendPtr {}

/// The host memory of copies queued and not yet run, so that a pinned
/// buffer freed under one is caught (and kept, not freed) instead of read
/// after its free.
#[derive(Default)]
struct InFlight {
    /// (first byte, one past the last) by copy.
    ranges: Mutex<BTreeMap<u64, (usize, usize)>>,
    next: AtomicU64,
    /// Pinned buffers freed while a queued copy still used them.
    freed_in_use: AtomicU64,
}

impl InFlight {
    fn add(self: &Arc<Self>, ptr: *const u8, len: usize) -> Busy {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let start = ptr as usize;
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (start, start.saturating_add(len)));
        Busy(self.clone(), id)
    }

    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|&(a, b)| a < b && a < end && start < b)
    }
}

/// A queued copy's host range, registered until the copy has run (or its
/// op was dropped unrun: a submit that failed, a stream worker that died).
struct Busy(Arc<InFlight>, u64);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

enum Op {
    H2D {
        dst: u64,
        src: SendPtr,
        len: usize,
        busy: Busy,
    },
    D2H {
        dst: SendPtr,
        src: u64,
        len: usize,
        busy: Busy,
    },
    Kernel(Kernel),
    HostFn(HostFn),
    Record(Arc<EventState>, u64),
    Wait(Arc<EventState>, u64),
    Sync(Arc<(Mutex<Option<Option<String>>>, Condvar)>),
}

struct StreamHandle {
    tx: Sender<Op>,
    thread: Option<JoinHandle<()>>,
}

/// State shared by the device and its stream workers.
struct Shared {
    page_size: usize,
    /// A MAP_SHARED view of the whole memfd: physical page `i` is at `phys + i * page_size`.
    phys: NonNull<u8>,
    capacity: usize,
    pages: Mutex<Pages>,
    ranges: RwLock<BTreeMap<u64, Range>>,
    h2d: Option<Link>,
    d2h: Option<Link>,
    bytes_h2d: AtomicU64,
    bytes_d2h: AtomicU64,
    map_calls: AtomicU64,
    unmap_calls: AtomicU64,
    contiguous_calls: AtomicU64,
    write_combined_requests: AtomicU64,
    stream_waits: AtomicU64,
    event_queries: AtomicU64,
    event_waits: AtomicU64,
    high_priority_streams: AtomicU64,
    host_fns: AtomicU64,
    copies_h2d: AtomicU64,
    in_flight: Arc<InFlight>,
}

// SAFETY: `phys` points to a shared mapping that lives as long as `Shared`;
// writes through it (poisoning) happen only for pages that are allocated to
// nobody, under the `pages` lock.
unsafe impl Send for Shared {}
// SAFETY: as above; all other state is behind locks or atomics.
unsafe impl Sync for Shared {}

impl Shared {
    /// Check that `[addr, addr+len)` lies in one reserved range whose pages
    /// are all mapped, or in one contiguous allocation.
    fn check_mapped(
        ranges: &BTreeMap<u64, Range>,
        page_size: usize,
        addr: u64,
        len: usize,
    ) -> std::result::Result<(), String> {
        let Some((&base, range)) = ranges.range(..=addr).next_back() else {
            return Err(format!("address {addr:#x} is not in a reserved range"));
        };
        let end = addr
            .checked_add(len as u64)
            .ok_or_else(|| format!("address {addr:#x} + {len} overflows"))?;
        if end > base + range.len as u64 {
            return Err(format!(
                "access {addr:#x}+{len} runs past the reserved range {base:#x}+{}",
                range.len
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let first = ((addr - base) as usize) / page_size;
        let last = ((end - 1 - base) as usize) / page_size;
        for (i, slot) in range.slots[first..=last].iter().enumerate() {
            if slot.is_none() {
                return Err(format!(
                    "page at {:#x} is not mapped (access {addr:#x}+{len})",
                    base + ((first + i) * page_size) as u64
                ));
            }
        }
        Ok(())
    }

    fn run_copy(
        &self,
        h2d: bool,
        dev: u64,
        host: SendPtr,
        len: usize,
    ) -> std::result::Result<(), String> {
        let link = if h2d { &self.h2d } else { &self.d2h };
        let mut done = 0usize;
        while done < len {
            let n = COPY_CHUNK.min(len - done);
            let end_time = link.as_ref().map(|l| l.reserve(n));
            {
                let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
                Self::check_mapped(&ranges, self.page_size, dev + done as u64, n)?;
                let d = (dev + done as u64) as *mut u8;
                // SAFETY: the device range is mapped read-write (checked above,
                // and the read lock keeps it mapped during the copy); the host
                // side is valid for `len` bytes by the copy's unsafe contract.
                // Device and host memory never overlap: device addresses come
                // from our own reservations. Device memory is shared memory,
                // as on a GPU: the Device contract makes callers order work of
                // different streams on the same bytes with events, so no other
                // stream writes these bytes during the copy.
                unsafe {
                    if h2d {
                        std::ptr::copy_nonoverlapping(host.0.add(done), d, n);
                    } else {
                        std::ptr::copy_nonoverlapping(d, host.0.add(done), n);
                    }
                }
            }
            if let Some(end) = end_time {
                let now = Instant::now();
                if end > now {
                    std::thread::sleep(end - now);
                }
            }
            done += n;
        }
        let counter = if h2d {
            &self.bytes_h2d
        } else {
            &self.bytes_d2h
        };
        counter.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn run_kernel(&self, kernel: &Kernel) -> std::result::Result<(), String> {
        match *kernel {
            Kernel::Fill { dst, len, value } => {
                let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
                Self::check_mapped(&ranges, self.page_size, dst.0, len)?;
                // SAFETY: the range is mapped read-write and stays mapped while
                // we hold the read lock; by the Device contract no other stream
                // touches these bytes unordered with this kernel.
                unsafe { std::ptr::write_bytes(dst.0 as *mut u8, value, len) };
                Ok(())
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
                let regions = kernel.regions().map_err(|e| e.to_string())?;
                let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
                for &(addr, len) in &regions {
                    Self::check_mapped(&ranges, self.page_size, addr.0, len)?;
                }
                let (xl, wl, yl) = (regions[0].1, regions[1].1, regions[2].1);
                if x.0 % 4 != 0 || y.0 % 4 != 0 {
                    return Err("activations must be 4-byte aligned".into());
                }
                let overlap =
                    |a: u64, al: usize, b: u64, bl: usize| a < b + bl as u64 && b < a + al as u64;
                if overlap(y.0, yl, x.0, xl) || overlap(y.0, yl, w.0, wl) {
                    return Err("the output overlaps an input".into());
                }
                // SAFETY: all three ranges are mapped read-write (checked above)
                // and stay mapped while we hold the read lock; X and Y are
                // 4-byte aligned (X's bytes read as such) and Y overlaps
                // neither input, so the shared and exclusive slices do not
                // alias; by the Device contract no other stream writes these
                // bytes meanwhile.
                let (xb, ws, ys) = unsafe {
                    (
                        std::slice::from_raw_parts(x.0 as *const u8, xl),
                        std::slice::from_raw_parts(w.0 as *const u8, wl),
                        std::slice::from_raw_parts_mut(y.0 as *mut f32, yl / 4),
                    )
                };
                // 16-bit activations widened to f32 (exactly): the products
                // and sums are then those of CUDA's, which multiplies them as
                // they are.
                let widened: Vec<f32>;
                let xs: &[f32] = match x_dtype {
                    offload_kernels::Dtype::F32 => {
                        bytemuck::try_cast_slice(xb).map_err(|e| format!("activations: {e}"))?
                    }
                    offload_kernels::Dtype::F16 => {
                        widened = xb
                            .chunks_exact(2)
                            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                            .collect();
                        &widened
                    }
                    offload_kernels::Dtype::BF16 => {
                        widened = xb
                            .chunks_exact(2)
                            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                            .collect();
                        &widened
                    }
                };
                offload_kernels::matmul_xwt(xs, tokens, ws, w_dtype, n, k, ys, None)
                    .map_err(|e| e.to_string())
            }
            Kernel::Merge { w, ref op } => self.run_merge(w, op),
            Kernel::MergeBatch { .. } => {
                // Every op runs, as one Kernel::Merge each would; the first
                // failure is reported, naming its op.
                let merges = kernel.merges();
                let mut first = Ok(());
                for (i, &(w, op)) in merges.iter().enumerate() {
                    if let Err(e) = self.run_merge(w, op) {
                        if first.is_ok() {
                            first = Err(format!("{}: {e}", op.batch_context(i, merges.len(), w)));
                        }
                    }
                }
                first
            }
        }
    }

    /// [`Kernel::Merge`] of `op` into the weight at `w`, with
    /// [`offload_kernels::merge_cpu`].
    fn run_merge(&self, w: DevicePtr, op: &MergeOp) -> std::result::Result<(), String> {
        let wl = op.weight_bytes();
        if wl == usize::MAX {
            return Err("operand size overflows".into());
        }
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        Self::check_mapped(&ranges, self.page_size, w.0, wl)?;
        for f in op.factors() {
            Self::check_mapped(&ranges, self.page_size, f.ptr.0, f.bytes())?;
        }
        let overlap = |a: u64, al: usize, b: u64, bl: usize| a < b + bl as u64 && b < a + al as u64;
        if op.factors().any(|f| overlap(w.0, wl, f.ptr.0, f.bytes())) {
            return Err("a factor overlaps the weight".into());
        }
        let adapters = op.adapters_with(&mut |f| {
            // SAFETY: every factor's range is mapped (checked above) and
            // stays mapped while we hold the read lock, which outlives these
            // slices (they die with `adapters` at the end of this function);
            // none overlaps the weight, the only bytes written, and by the
            // Device contract no other stream writes them meanwhile.
            unsafe { std::slice::from_raw_parts(f.ptr.0 as *const u8, f.bytes()) }
        });
        let spec = offload_kernels::MergeSpec::new(op.dtype, &op.shape, op.rows.clone(), &adapters)
            .map_err(|e| e.to_string())?;
        // SAFETY: the weight's range is mapped read-write (checked above)
        // and stays mapped while we hold the read lock; no factor slice
        // overlaps it, and by the Device contract no other stream touches
        // it meanwhile.
        let ws = unsafe { std::slice::from_raw_parts_mut(w.0 as *mut u8, wl) };
        offload_kernels::merge_cpu(ws, &spec, None).map_err(|e| e.to_string())
    }
}

fn stream_worker(shared: Arc<Shared>, stream: StreamId, rx: Receiver<Op>) {
    // The first failure since the last synchronisation.
    let mut error: Option<String> = None;
    for op in rx {
        let result = match op {
            Op::H2D {
                dst,
                src,
                len,
                busy,
            } => {
                let r = shared.run_copy(true, dst, src, len);
                drop(busy);
                r
            }
            Op::D2H {
                dst,
                src,
                len,
                busy,
            } => {
                let r = shared.run_copy(false, src, dst, len);
                drop(busy);
                r
            }
            Op::Kernel(k) => shared
                .run_kernel(&k)
                .map_err(|e| format!("kernel {}: {e}", k.name())),
            Op::HostFn(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|_| "host function panicked".to_string()),
            Op::Record(ev, epoch) => {
                ev.complete(epoch, error.clone().map(|e| (stream, e)));
                Ok(())
            }
            Op::Wait(ev, epoch) => {
                // The recording this waits for is already queued, so it completes;
                // a failure of the work it covers fails this stream too, as a
                // device error would on a GPU.
                let _ = ev.wait_for(epoch, None);
                let failed = ev
                    .inner
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failure(epoch)
                    .cloned();
                match failed {
                    Some((s, msg)) => Err(format!("waited for stream {s:?}, which failed: {msg}")),
                    None => Ok(()),
                }
            }
            Op::Sync(sig) => {
                let (lock, cv) = &*sig;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.take());
                cv.notify_all();
                Ok(())
            }
        };
        if let Err(e) = result {
            error.get_or_insert(e);
        }
    }
}

/// Device memory emulated on the CPU; see the module documentation.
pub struct HostDevice {
    info: DeviceInfo,
    config: HostConfig,
    /// Whether pages and ranges are offered (else contiguous allocations only).
    vmm: bool,
    shared: Arc<Shared>,
    memfd: OwnedFd,
    streams: DashMap<u64, StreamHandle>,
    events: DashMap<u64, Arc<EventState>>,
    next_id: AtomicU64,
    poison: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for HostDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostDevice")
            .field("config", &self.config)
            .field("vmm", &self.vmm)
            .finish_non_exhaustive()
    }
}

fn os_page_size() -> usize {
    rustix::param::page_size()
}

impl HostDevice {
    /// Create an emulated device.
    pub fn new(config: HostConfig) -> Result<Self> {
        let ps = config.page_size;
        if !ps.is_power_of_two() || ps < os_page_size() {
            return Err(Error::Config(format!(
                "host page size {ps} must be a power of two of at least the OS page size {}",
                os_page_size()
            )));
        }
        let pages = config.capacity / ps;
        if pages == 0 || pages > u32::MAX as usize {
            return Err(Error::Config(format!(
                "host capacity {} bytes holds {pages} pages of {ps} bytes; need 1 to {}",
                config.capacity,
                u32::MAX
            )));
        }
        if let Some(r) = config.link_gbps {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::Config(format!(
                    "link rate {r} GB/s must be positive"
                )));
            }
        }
        // Every mapped page may become its own kernel mapping: stay well under the limit.
        if let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
        {
            if pages > limit / 2 {
                return Err(Error::Config(format!(
                    "{pages} pages of {ps} bytes exceed half the kernel's mapping limit (vm.max_map_count = {limit}): use larger pages or less capacity"
                )));
            }
        }
        let capacity = pages * ps;
        let memfd =
            rustix::fs::memfd_create("offload-host-device", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| Error::os("memfd_create", e))?;
        rustix::fs::ftruncate(&memfd, capacity as u64).map_err(|e| Error::os("ftruncate", e))?;
        // SAFETY: a fresh shared mapping of our own memfd at an address the
        // kernel picks; nothing else is affected.
        let phys = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                capacity,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::NORESERVE,
                memfd.as_fd(),
                0,
            )
        }
        .map_err(|e| Error::os("mmap (physical view)", e))?;
        let phys = NonNull::new(phys.cast::<u8>()).ok_or(Error::Unsupported("null mmap"))?;
        let link = |r: Option<f64>| {
            r.map(|gbps| Link {
                bytes_per_sec: gbps * 1e9,
                next_free: Mutex::new(Instant::now()),
            })
        };
        let shared = Arc::new(Shared {
            page_size: ps,
            phys,
            capacity,
            pages: Mutex::new(Pages {
                free: (0..pages as u32).rev().collect(),
                state: vec![PageState::Free; pages],
            }),
            ranges: RwLock::new(BTreeMap::new()),
            h2d: link(config.link_gbps),
            d2h: link(config.link_gbps),
            bytes_h2d: AtomicU64::new(0),
            bytes_d2h: AtomicU64::new(0),
            map_calls: AtomicU64::new(0),
            unmap_calls: AtomicU64::new(0),
            contiguous_calls: AtomicU64::new(0),
            write_combined_requests: AtomicU64::new(0),
            stream_waits: AtomicU64::new(0),
            event_queries: AtomicU64::new(0),
            event_waits: AtomicU64::new(0),
            high_priority_streams: AtomicU64::new(0),
            host_fns: AtomicU64::new(0),
            copies_h2d: AtomicU64::new(0),
            in_flight: Arc::new(InFlight::default()),
        });
        Ok(HostDevice {
            info: DeviceInfo {
                kind: BackendKind::Host,
                name: "host (emulated device memory)".to_string(),
                total_memory: capacity,
                page_size: ps,
                compute_capability: None,
            },
            config,
            vmm: true,
            shared,
            memfd,
            streams: DashMap::new(),
            events: DashMap::new(),
            next_id: AtomicU64::new(1),
            poison: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Create an emulated device without the virtual memory API, as a GPU
    /// where the CUDA one is unavailable: [`Device::maps_pages`] is false,
    /// [`Device::alloc_page`], [`Device::reserve`] and [`Device::map`] fail
    /// with [`Error::Unsupported`], and device memory comes only from
    /// [`Device::alloc_contiguous`]. Copies and kernels work on it as on
    /// mapped memory.
    pub fn without_vmm(config: HostConfig) -> Result<Self> {
        let mut dev = Self::new(config)?;
        dev.vmm = false;
        dev.info.name = "host (emulated device memory, no virtual memory API)".to_string();
        Ok(dev)
    }

    /// Whether freed pages are filled with [`POISON`] (on by default). Poisoning
    /// touches every freed page, so a benchmark of a large emulated device may
    /// turn it off to keep its host memory small.
    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    /// The configuration this device was made with.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The device's own counts of pages, ranges and bytes copied.
    pub fn counters(&self) -> HostCounters {
        let pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        let pages_allocated = pages.state.len() - pages.free.len();
        let pages_mapped = pages
            .state
            .iter()
            .filter(|s| matches!(s, PageState::Mapped(_)))
            .count();
        drop(pages);
        let ranges = self.shared.ranges.read().unwrap_or_else(|p| p.into_inner());
        let ranges_reserved = ranges.values().filter(|r| !r.block).count();
        let contiguous_allocations = ranges.values().filter(|r| r.block).count();
        let contiguous_bytes = ranges.values().filter(|r| r.block).map(|r| r.len).sum();
        drop(ranges);
        HostCounters {
            pages_allocated,
            pages_mapped,
            ranges_reserved,
            contiguous_allocations,
            contiguous_bytes,
            contiguous_calls: self.shared.contiguous_calls.load(Ordering::Relaxed),
            bytes_h2d: self.shared.bytes_h2d.load(Ordering::Relaxed),
            bytes_d2h: self.shared.bytes_d2h.load(Ordering::Relaxed),
            map_calls: self.shared.map_calls.load(Ordering::Relaxed),
            unmap_calls: self.shared.unmap_calls.load(Ordering::Relaxed),
            host_fns: self.shared.host_fns.load(Ordering::Relaxed),
            copies_h2d: self.shared.copies_h2d.load(Ordering::Relaxed),
            pinned_freed_in_use: self.shared.in_flight.freed_in_use.load(Ordering::Relaxed),
            write_combined_requests: self.shared.write_combined_requests.load(Ordering::Relaxed),
            stream_waits: self.shared.stream_waits.load(Ordering::Relaxed),
            event_queries: self.shared.event_queries.load(Ordering::Relaxed),
            event_waits: self.shared.event_waits.load(Ordering::Relaxed),
            high_priority_streams: self.shared.high_priority_streams.load(Ordering::Relaxed),
        }
    }

    /// Every page mapped now: the address it is mapped at and the physical
    /// page, in physical page order. For tests that cross-check an
    /// allocator's page tables against the device.
    pub fn mapped_pages(&self) -> Vec<(DevicePtr, PhysPage)> {
        let pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        pages
            .state
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match *s {
                PageState::Mapped(addr) => Some((DevicePtr(addr), PhysPage(i as u64))),
                _ => None,
            })
            .collect()
    }

    /// Read the raw bytes of physical page `page` (poisoned if free), for tests.
    ///
    /// # Safety
    /// No stream or host code may write the page while it is read (device
    /// memory is shared memory without synchronisation, as on a GPU).
    pub unsafe fn read_physical(
        &self,
        page: PhysPage,
        offset: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let ps = self.shared.page_size;
        let idx = page.0 as usize;
        if idx >= self.shared.capacity / ps || offset.checked_add(out.len()).is_none_or(|e| e > ps)
        {
            return Err(Error::BadPage {
                page,
                what: "is out of range for this read",
            });
        }
        // SAFETY: in bounds of the physical view (checked above); the caller
        // guarantees that nothing writes the page meanwhile.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.shared.phys.as_ptr().add(idx * ps + offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn stream_tx(&self, stream: StreamId) -> Result<Sender<Op>> {
        self.streams
            .get(&stream.0)
            .map(|s| s.tx.clone())
            .ok_or(Error::UnknownStream(stream))
    }

    fn event(&self, event: EventId) -> Result<Arc<EventState>> {
        self.events
            .get(&event.0)
            .map(|e| e.clone())
            .ok_or(Error::UnknownEvent(event))
    }

    fn submit(&self, stream: StreamId, op: Op) -> Result<()> {
        self.stream_tx(stream)?
            .send(op)
            .map_err(|_| Error::UnknownStream(stream))
    }

    fn check_mapped_now(&self, addr: DevicePtr, len: usize) -> Result<()> {
        let ranges = self.shared.ranges.read().unwrap_or_else(|p| p.into_inner());
        Shared::check_mapped(&ranges, self.shared.page_size, addr.0, len).map_err(|_| {
            Error::BadAddress {
                addr,
                len,
                what: if self.vmm {
                    "inside one reserved range with every page mapped, or one contiguous allocation"
                } else {
                    "inside one contiguous allocation (no virtual memory API)"
                },
            }
        })
    }

    /// Reserve `len` bytes (a multiple of the page size) of `PROT_NONE`
    /// address space aligned to the page size; returns its address.
    fn reserve_aligned(&self, len: usize) -> Result<usize> {
        let ps = self.shared.page_size;
        // Over-reserve by one page so the base can be aligned to the device page size.
        let total = len + ps;
        // SAFETY: a fresh anonymous PROT_NONE mapping at a kernel-chosen address.
        let raw = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                total,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| Error::os("mmap (reserve)", e))? as usize;
        let base = raw.next_multiple_of(ps);
        // SAFETY: the head and tail trimmed here lie inside the mapping we just made and are used by nothing.
        unsafe {
            if base > raw {
                rustix::mm::munmap(raw as *mut _, base - raw)
                    .map_err(|e| Error::os("munmap (trim)", e))?;
            }
            let tail = raw + total - (base + len);
            if tail > 0 {
                rustix::mm::munmap((base + len) as *mut _, tail)
                    .map_err(|e| Error::os("munmap (trim)", e))?;
            }
        }
        Ok(base)
    }

    /// Check a length for a range or a contiguous allocation: a non-zero
    /// multiple of the page size, at most the capacity.
    fn check_len(&self, len: usize) -> Result<()> {
        let ps = self.shared.page_size;
        if len == 0 || len % ps != 0 {
            return Err(Error::BadAddress {
                addr: DevicePtr(0),
                len,
                what: "a non-zero multiple of the page size",
            });
        }
        if len > self.shared.capacity {
            return Err(Error::BadAddress {
                addr: DevicePtr(0),
                len,
                what: "at most the device's capacity",
            });
        }
        Ok(())
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.streams.iter().map(|s| *s.key()).collect();
        for id in ids {
            let _ = self.destroy_stream(StreamId(id));
        }
        let ranges = std::mem::take(
            &mut *self
                .shared
                .ranges
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (base, r) in ranges {
            // SAFETY: we reserved this range; no stream runs any more, so nothing uses it.
            let _ = unsafe { rustix::mm::munmap(base as *mut _, r.len) };
        }
        // SAFETY: the physical view was mapped in `new` with this length; all
        // users (streams) are gone and `Shared` holds only a raw pointer.
        let _ =
            unsafe { rustix::mm::munmap(self.shared.phys.as_ptr().cast(), self.shared.capacity) };
        let _ = &self.memfd;
    }
}

impl Device for HostDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn memory(&self) -> Result<MemoryInfo> {
        let pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        Ok(MemoryInfo {
            total: self.shared.capacity,
            free: pages.free.len() * self.shared.page_size,
        })
    }

    fn alloc_page(&self) -> Result<PhysPage> {
        if !self.vmm {
            return Err(Error::Unsupported(
                "physical pages without the virtual memory API (use alloc_contiguous)",
            ));
        }
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        let Some(idx) = pages.free.pop() else {
            return Err(Error::DeviceOutOfMemory {
                wanted: self.shared.page_size,
                available: 0,
            });
        };
        pages.state[idx as usize] = PageState::Allocated;
        Ok(PhysPage(idx as u64))
    }

    fn free_page(&self, page: PhysPage) -> Result<()> {
        let ps = self.shared.page_size;
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        let idx = pages.allocated_unmapped(page, "is still mapped")?;
        if self.poison.load(Ordering::Relaxed) {
            // SAFETY: the page is allocated and unmapped, so no mapping or stream
            // can touch it; the write stays inside the physical view.
            unsafe { std::ptr::write_bytes(self.shared.phys.as_ptr().add(idx * ps), POISON, ps) };
        }
        pages.state[idx] = PageState::Free;
        pages.free.push(idx as u32);
        Ok(())
    }

    fn reserve(&self, len: usize) -> Result<VirtualRange> {
        if !self.vmm {
            return Err(Error::Unsupported(
                "reserving virtual ranges without the virtual memory API",
            ));
        }
        let ps = self.shared.page_size;
        self.check_len(len)?;
        let base = self.reserve_aligned(len)?;
        self.shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                base as u64,
                Range {
                    len,
                    slots: vec![None; len / ps],
                    block: false,
                },
            );
        Ok(VirtualRange {
            base: DevicePtr(base as u64),
            len,
        })
    }

    fn release(&self, range: VirtualRange) -> Result<()> {
        let mut ranges = self
            .shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner());
        match ranges.get(&range.base.0) {
            Some(r) if r.len == range.len && !r.block => {
                if r.slots.iter().any(Option::is_some) {
                    return Err(Error::BadAddress {
                        addr: range.base,
                        len: range.len,
                        what: "fully unmapped before release",
                    });
                }
            }
            _ => {
                return Err(Error::BadAddress {
                    addr: range.base,
                    len: range.len,
                    what: "a reserved range",
                })
            }
        }
        ranges.remove(&range.base.0);
        // SAFETY: the range was reserved by us, is unmapped, and is now out of the table.
        unsafe { rustix::mm::munmap(range.base.0 as *mut _, range.len) }
            .map_err(|e| Error::os("munmap", e))
    }

    fn map(&self, addr: DevicePtr, page: PhysPage) -> Result<()> {
        if !self.vmm {
            return Err(Error::Unsupported(
                "mapping pages without the virtual memory API",
            ));
        }
        let ps = self.shared.page_size;
        let mut ranges = self
            .shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let bad = |what| Error::BadAddress {
            addr,
            len: ps,
            what,
        };
        let Some((&base, range)) = ranges.range_mut(..=addr.0).next_back() else {
            return Err(bad("inside a reserved range"));
        };
        if addr.0 >= base + range.len as u64 || range.block {
            return Err(bad("inside a reserved range"));
        }
        if (addr.0 - base) as usize % ps != 0 {
            return Err(bad("page aligned"));
        }
        let slot = (addr.0 - base) as usize / ps;
        if range.slots[slot].is_some() {
            return Err(bad("unmapped (already mapped)"));
        }
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        let idx = pages.allocated_unmapped(page, "is already mapped elsewhere")?;
        // SAFETY: `addr..addr+ps` is a PROT_NONE page of a range we reserved
        // and track as unmapped, so replacing it with MAP_FIXED affects no
        // other mapping; the file offset is a page of our memfd.
        unsafe {
            rustix::mm::mmap(
                addr.0 as *mut _,
                ps,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED | MapFlags::FIXED,
                self.memfd.as_fd(),
                (idx * ps) as u64,
            )
        }
        .map_err(|e| Error::os("mmap (map page)", e))?;
        range.slots[slot] = Some(idx as u32);
        pages.state[idx] = PageState::Mapped(addr.0);
        self.shared.map_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&self, addr: DevicePtr) -> Result<()> {
        let ps = self.shared.page_size;
        let mut ranges = self
            .shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let bad = |what| Error::BadAddress {
            addr,
            len: ps,
            what,
        };
        let Some((&base, range)) = ranges.range_mut(..=addr.0).next_back() else {
            return Err(bad("inside a reserved range"));
        };
        if addr.0 >= base + range.len as u64 || (addr.0 - base) as usize % ps != 0 || range.block {
            return Err(bad("a page-aligned address of a reserved range"));
        }
        let slot = (addr.0 - base) as usize / ps;
        let Some(idx) = range.slots[slot] else {
            return Err(bad("mapped"));
        };
        // SAFETY: the page at `addr` is one we mapped; replacing it with a
        // PROT_NONE anonymous page restores the reservation. Streams touch
        // device memory only under the read lock, which we exclude here.
        unsafe {
            rustix::mm::mmap_anonymous(
                addr.0 as *mut _,
                ps,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::FIXED | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| Error::os("mmap (unmap page)", e))?;
        range.slots[slot] = None;
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        pages.state[idx as usize] = PageState::Allocated;
        self.shared.unmap_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn maps_pages(&self) -> bool {
        self.vmm
    }

    fn alloc_contiguous(&self, len: usize) -> Result<DevicePtr> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        self.check_len(len)?;
        let ps = self.shared.page_size;
        let n = len / ps;
        let base = self.reserve_aligned(len)?;
        let unreserve = || {
            // SAFETY: the region reserved just above, known to nobody else.
            let _ = unsafe { rustix::mm::munmap(base as *mut _, len) };
        };
        let mut ranges = self
            .shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        if pages.free.len() < n {
            let available = pages.free.len() * ps;
            drop(pages);
            unreserve();
            return Err(Error::DeviceOutOfMemory {
                wanted: len,
                available,
            });
        }
        let at = pages.free.len() - n;
        let mut idx = pages.free.split_off(at);
        idx.reverse(); // the free list pops from its end: take pages in that order
                       // Map runs of consecutive pages with one call each (fresh pages come in order).
        let mut start = 0;
        while start < n {
            let mut end = start + 1;
            while end < n && idx[end] == idx[end - 1] + 1 {
                end += 1;
            }
            // SAFETY: `base + start·ps .. base + end·ps` lies inside the
            // PROT_NONE region reserved above, which nothing else knows, so
            // MAP_FIXED replaces nothing of anyone's; the file range is pages
            // of our memfd that were free and are now taken by this call.
            let mapped = unsafe {
                rustix::mm::mmap(
                    (base + start * ps) as *mut _,
                    (end - start) * ps,
                    ProtFlags::READ | ProtFlags::WRITE,
                    MapFlags::SHARED | MapFlags::FIXED,
                    self.memfd.as_fd(),
                    (idx[start] as usize * ps) as u64,
                )
            };
            if let Err(e) = mapped {
                idx.reverse();
                pages.free.extend(idx);
                drop(pages);
                unreserve();
                return Err(Error::os("mmap (contiguous allocation)", e));
            }
            start = end;
        }
        for &i in &idx {
            pages.state[i as usize] = PageState::InBlock(base as u64);
        }
        ranges.insert(
            base as u64,
            Range {
                len,
                slots: idx.into_iter().map(Some).collect(),
                block: true,
            },
        );
        self.shared.contiguous_calls.fetch_add(1, Ordering::Relaxed);
        Ok(DevicePtr(base as u64))
    }

    fn free_contiguous(&self, ptr: DevicePtr) -> Result<()> {
        let ps = self.shared.page_size;
        let mut ranges = self
            .shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let len = match ranges.get(&ptr.0) {
            Some(r) if r.block => r.len,
            _ => {
                return Err(Error::BadAddress {
                    addr: ptr,
                    len: 0,
                    what: "the address of a live contiguous allocation",
                })
            }
        };
        // SAFETY: the region is a contiguous allocation of ours (checked);
        // streams touch device memory only under the read lock, which we
        // exclude, and the trait's contract makes callers finish work on it first.
        unsafe { rustix::mm::munmap(ptr.0 as *mut _, len) }
            .map_err(|e| Error::os("munmap (contiguous allocation)", e))?;
        let r = ranges.remove(&ptr.0).expect("checked above");
        let mut pages = self.shared.pages.lock().unwrap_or_else(|p| p.into_inner());
        for i in r.slots.into_iter().flatten() {
            let i = i as usize;
            if self.poison.load(Ordering::Relaxed) {
                // SAFETY: the page was only behind the region just unmapped, so
                // no mapping or stream can touch it; the write stays inside
                // the physical view.
                unsafe { std::ptr::write_bytes(self.shared.phys.as_ptr().add(i * ps), POISON, ps) };
            }
            pages.state[i] = PageState::Free;
            pages.free.push(i as u32);
        }
        Ok(())
    }

    fn alloc_pinned_write_combined(&self, len: usize) -> Result<PinnedBuffer> {
        self.shared
            .write_combined_requests
            .fetch_add(1, Ordering::Relaxed);
        self.alloc_pinned(len)
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let layout = std::alloc::Layout::from_size_align(len, os_page_size())
            .map_err(|_| Error::Config(format!("pinned buffer of {len} bytes is too large")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(Error::DeviceOutOfMemory {
            wanted: len,
            available: 0,
        })?;
        let in_flight = self.shared.in_flight.clone();
        // SAFETY: `ptr` is a fresh allocation of `len` bytes that only this
        // buffer owns; it is freed with the same layout at most once (kept
        // for good if a queued copy still uses it, which a GPU would read
        // after its free).
        Ok(unsafe {
            PinnedBuffer::from_raw_parts(
                ptr,
                len,
                Box::new(move |p, n| {
                    let start = p.as_ptr() as usize;
                    if in_flight.overlaps(start, start + n) {
                        in_flight.freed_in_use.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    std::alloc::dealloc(p.as_ptr(), layout)
                }),
            )
        })
    }

    fn create_stream_with_priority(&self, priority: StreamPriority) -> Result<StreamId> {
        let s = self.create_stream()?;
        if priority == StreamPriority::High {
            self.shared
                .high_priority_streams
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(s)
    }

    fn create_stream(&self) -> Result<StreamId> {
        let id = self.new_id();
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("offload-stream-{id}"))
            .spawn(move || stream_worker(shared, StreamId(id), rx))
            .map_err(|e| Error::os("spawn stream thread", e))?;
        self.streams.insert(
            id,
            StreamHandle {
                tx,
                thread: Some(thread),
            },
        );
        Ok(StreamId(id))
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        let (_, mut handle) = self
            .streams
            .remove(&stream.0)
            .ok_or(Error::UnknownStream(stream))?;
        drop(handle.tx);
        if let Some(t) = handle.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }

    fn create_event(&self) -> Result<EventId> {
        let id = self.new_id();
        self.events.insert(id, Arc::new(EventState::default()));
        Ok(EventId(id))
    }

    fn create_timing_event(&self) -> Result<EventId> {
        let id = self.new_id();
        self.events.insert(
            id,
            Arc::new(EventState {
                timing: true,
                ..EventState::default()
            }),
        );
        Ok(EventId(id))
    }

    fn destroy_event(&self, event: EventId) -> Result<()> {
        self.events
            .remove(&event.0)
            .map(|_| ())
            .ok_or(Error::UnknownEvent(event))
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        let ev = self.event(event)?;
        let tx = self.stream_tx(stream)?;
        let mut g = ev.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.recorded += 1;
        let epoch = g.recorded;
        // Sent under the event's lock so a concurrent waiter never sees an
        // epoch that is not yet queued.
        let sent = tx.send(Op::Record(ev.clone(), epoch));
        if sent.is_err() {
            // The epoch will never complete: mark it done so waits on it end.
            drop(g);
            ev.complete(epoch, Some((stream, "stream destroyed".into())));
            return Err(Error::UnknownStream(stream));
        }
        Ok(())
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        let ev = self.event(event)?;
        let epoch = ev.inner.lock().unwrap_or_else(|p| p.into_inner()).recorded;
        self.shared.stream_waits.fetch_add(1, Ordering::Relaxed);
        self.submit(stream, Op::Wait(ev, epoch))
    }

    fn event_query(&self, event: EventId) -> Result<bool> {
        self.shared.event_queries.fetch_add(1, Ordering::Relaxed);
        let ev = self.event(event)?;
        let g = ev.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !g.is_complete(g.recorded) {
            return Ok(false);
        }
        match g.failure(g.recorded) {
            Some((stream, msg)) => Err(Error::StreamFailed {
                stream: *stream,
                message: msg.clone(),
            }),
            None => Ok(true),
        }
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Option<Duration>> {
        // When the latest recording of `event` completed: `None` if it has not.
        let reached = |event: EventId| -> Result<Option<Instant>> {
            let ev = self.event(event)?;
            if !ev.timing {
                return Err(Error::Config(format!(
                    "{event:?} was made without timing (create_event, not create_timing_event)"
                )));
            }
            let g = ev.inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.recorded == 0 {
                return Err(Error::Config(format!(
                    "{event:?} was never recorded, so it has no time"
                )));
            }
            if !g.is_complete(g.recorded) {
                return Ok(None);
            }
            if let Some((stream, msg)) = g.failure(g.recorded) {
                return Err(Error::StreamFailed {
                    stream: *stream,
                    message: msg.clone(),
                });
            }
            // The latest recording is complete, so it is the one `reached` holds.
            Ok(g.reached.map(|(_, t)| t))
        };
        let (Some(a), Some(b)) = (reached(start)?, reached(end)?) else {
            return Ok(None);
        };
        Ok(Some(b.saturating_duration_since(a)))
    }

    fn event_wait(&self, event: EventId, timeout: Option<Duration>) -> Result<()> {
        self.shared.event_waits.fetch_add(1, Ordering::Relaxed);
        let ev = self.event(event)?;
        let start = Instant::now();
        let epoch = ev.inner.lock().unwrap_or_else(|p| p.into_inner()).recorded;
        ev.wait_for(epoch, timeout.and_then(|t| start.checked_add(t)))
            .map_err(|()| Error::Timeout {
                event,
                waited_ms: start.elapsed().as_millis() as u64,
            })?;
        let g = ev.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.failure(epoch) {
            Some((stream, msg)) => Err(Error::StreamFailed {
                stream: *stream,
                message: msg.clone(),
            }),
            None => Ok(()),
        }
    }

    fn stream_synchronize(&self, stream: StreamId) -> Result<()> {
        let sig = Arc::new((Mutex::new(None), Condvar::new()));
        self.submit(stream, Op::Sync(sig.clone()))?;
        let (lock, cv) = &*sig;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = g.take() {
                return match result {
                    None => Ok(()),
                    Some(message) => Err(Error::StreamFailed { stream, message }),
                };
            }
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    unsafe fn copy_h2d_async(
        &self,
        dst: DevicePtr,
        src: *const u8,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        self.check_mapped_now(dst, len)?;
        self.shared.copies_h2d.fetch_add(1, Ordering::Relaxed);
        self.submit(
            stream,
            Op::H2D {
                dst: dst.0,
                src: SendPtr(src as *mut u8),
                len,
                busy: self.shared.in_flight.add(src, len),
            },
        )
    }

    unsafe fn copy_d2h_async(
        &self,
        dst: *mut u8,
        src: DevicePtr,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        self.check_mapped_now(src, len)?;
        self.submit(
            stream,
            Op::D2H {
                dst: SendPtr(dst),
                src: src.0,
                len,
                busy: self.shared.in_flight.add(dst, len),
            },
        )
    }

    fn launch(&self, kernel: &Kernel, stream: StreamId) -> Result<()> {
        kernel.check_types()?;
        for (addr, len) in kernel.regions()? {
            self.check_mapped_now(addr, len)?;
        }
        self.submit(stream, Op::Kernel(kernel.clone()))
    }

    fn launch_host_fn(&self, stream: StreamId, f: HostFn) -> Result<()> {
        self.shared.host_fns.fetch_add(1, Ordering::Relaxed);
        self.submit(stream, Op::HostFn(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceExt;

    fn small(link_gbps: Option<f64>) -> HostDevice {
        HostDevice::new(HostConfig {
            capacity: 256 << 20,
            page_size: 64 << 10,
            link_gbps,
        })
        .unwrap()
    }

    /// Map `n` fresh pages into a fresh range.
    fn mapped(dev: &HostDevice, n: usize) -> (VirtualRange, Vec<PhysPage>) {
        let ps = dev.info().page_size;
        let range = dev.reserve(n * ps).unwrap();
        let pages: Vec<_> = (0..n).map(|_| dev.alloc_page().unwrap()).collect();
        for (i, &p) in pages.iter().enumerate() {
            dev.map(range.base.offset(i * ps), p).unwrap();
        }
        (range, pages)
    }

    #[test]
    fn enqueued_copy_returns_before_it_is_done() {
        // 64 MiB over a 1 GB/s link takes at least 67 ms.
        let dev = small(Some(1.0));
        let n = (64 << 20) / dev.info().page_size;
        let (range, _) = mapped(&dev, n);
        let s = dev.create_stream().unwrap();
        let ev = dev.create_event().unwrap();
        let mut src = dev.alloc_pinned(64 << 20).unwrap();
        for (i, b) in src.as_mut_slice().iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        // SAFETY: `src` lives until after the event wait below.
        unsafe {
            dev.copy_h2d_async(range.base, src.as_ptr(), 64 << 20, s)
                .unwrap()
        };
        dev.record_event(ev, s).unwrap();
        assert!(
            !dev.event_query(ev).unwrap(),
            "the copy must still be pending right after the call"
        );
        dev.event_wait(ev, Some(Duration::from_secs(30))).unwrap();
        assert!(dev.event_query(ev).unwrap());
        let mut back = vec![0u8; 64 << 20];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert!(back == src.as_slice());
        assert_eq!(dev.counters().bytes_h2d, 64 << 20);
        assert_eq!(dev.counters().bytes_d2h, 64 << 20);
    }

    #[test]
    fn pages_are_contiguous_in_the_range_and_separate_physically() {
        let dev = small(None);
        let ps = dev.info().page_size;
        let (range, pages) = mapped(&dev, 3);
        // Physical pages 0,1,2 are handed out in order; map them reversed to prove the page table is used.
        let range2 = dev.reserve(2 * ps).unwrap();
        let p3 = dev.alloc_page().unwrap();
        let p4 = dev.alloc_page().unwrap();
        dev.map(range2.base, p4).unwrap();
        dev.map(range2.base.offset(ps), p3).unwrap();
        let s = dev.create_stream().unwrap();
        let data: Vec<u8> = (0..2 * ps).map(|i| (i / ps + 1) as u8).collect();
        dev.write_blocking(range2.base, &data, s).unwrap();
        let mut page = vec![0u8; ps];
        // SAFETY: every stream is idle (the copies above were synchronised).
        unsafe { dev.read_physical(p4, 0, &mut page).unwrap() };
        assert!(page.iter().all(|&b| b == 1));
        // SAFETY: every stream is idle (the copies above were synchronised).
        unsafe { dev.read_physical(p3, 0, &mut page).unwrap() };
        assert!(page.iter().all(|&b| b == 2));
        // A write spanning the boundary of the first range lands in both pages.
        dev.write_blocking(range.base.offset(ps - 2), &[9, 9, 9, 9], s)
            .unwrap();
        let mut two = [0u8; 2];
        // SAFETY: every stream is idle (the copies above were synchronised).
        unsafe { dev.read_physical(pages[0], ps - 2, &mut two).unwrap() };
        assert_eq!(two, [9, 9]);
        // SAFETY: every stream is idle (the copies above were synchronised).
        unsafe { dev.read_physical(pages[1], 0, &mut two).unwrap() };
        assert_eq!(two, [9, 9]);
        let c = dev.counters();
        assert_eq!(
            (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
            (5, 5, 2)
        );
    }

    #[test]
    fn freed_pages_are_poisoned_and_handles_checked() {
        let dev = small(None);
        let ps = dev.info().page_size;
        let (range, pages) = mapped(&dev, 1);
        let s = dev.create_stream().unwrap();
        dev.write_blocking(range.base, &vec![1u8; ps], s).unwrap();
        assert!(
            matches!(dev.free_page(pages[0]), Err(Error::BadPage { .. })),
            "mapped page freed"
        );
        assert!(
            matches!(dev.release(range), Err(Error::BadAddress { .. })),
            "release with a mapped page"
        );
        dev.unmap(range.base).unwrap();
        assert!(
            matches!(dev.unmap(range.base), Err(Error::BadAddress { .. })),
            "double unmap"
        );
        dev.free_page(pages[0]).unwrap();
        assert!(
            matches!(dev.free_page(pages[0]), Err(Error::BadPage { .. })),
            "double free"
        );
        assert!(
            matches!(dev.map(range.base, pages[0]), Err(Error::BadPage { .. })),
            "map a free page"
        );
        let mut page = vec![0u8; ps];
        // SAFETY: every stream is idle (the copies above were synchronised).
        unsafe { dev.read_physical(pages[0], 0, &mut page).unwrap() };
        assert!(page.iter().all(|&b| b == POISON));
        // A copy into the now unmapped range is refused at enqueue time.
        let r = dev.write_blocking(range.base, &[1, 2, 3], s);
        assert!(matches!(r, Err(Error::BadAddress { .. })), "{r:?}");
        dev.release(range).unwrap();
        assert!(matches!(dev.release(range), Err(Error::BadAddress { .. })));
        assert_eq!(dev.counters().pages_allocated, 0);
        assert_eq!(dev.memory().unwrap().free, dev.info().total_memory);
    }

    #[test]
    fn map_checks_alignment_and_bounds() {
        let dev = small(None);
        let ps = dev.info().page_size;
        let range = dev.reserve(2 * ps).unwrap();
        let p = dev.alloc_page().unwrap();
        assert!(matches!(
            dev.map(range.base.offset(1), p),
            Err(Error::BadAddress {
                what: "page aligned",
                ..
            })
        ));
        assert!(matches!(
            dev.map(range.base.offset(2 * ps), p),
            Err(Error::BadAddress { .. })
        ));
        assert!(matches!(
            dev.map(DevicePtr(4096), p),
            Err(Error::BadAddress { .. })
        ));
        dev.map(range.base, p).unwrap();
        let q = dev.alloc_page().unwrap();
        assert!(
            matches!(dev.map(range.base, q), Err(Error::BadAddress { .. })),
            "slot taken"
        );
        assert!(matches!(dev.reserve(ps + 1), Err(Error::BadAddress { .. })));
        assert!(matches!(dev.reserve(0), Err(Error::BadAddress { .. })));
    }

    #[test]
    fn a_stream_waits_for_an_event_of_another_stream() {
        use std::sync::atomic::AtomicBool;
        let dev = small(None);
        let (a, b) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
        let ev = dev.create_event().unwrap();
        assert!(
            dev.event_query(ev).unwrap(),
            "an event never recorded counts as complete"
        );
        let flag = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        dev.launch_host_fn(
            a,
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(50));
                f.store(true, Ordering::SeqCst);
            }),
        )
        .unwrap();
        dev.record_event(ev, a).unwrap();
        dev.stream_wait_event(b, ev).unwrap();
        let (f, s2) = (flag.clone(), seen.clone());
        dev.launch_host_fn(
            b,
            Box::new(move || s2.store(f.load(Ordering::SeqCst), Ordering::SeqCst)),
        )
        .unwrap();
        dev.stream_synchronize(b).unwrap();
        assert!(
            seen.load(Ordering::SeqCst),
            "stream b ran before the event it waited for"
        );
    }

    #[test]
    fn a_wait_refers_to_the_recording_it_captured() {
        use std::sync::atomic::AtomicBool;
        // E recorded on a blocked stream A; C waits on it; E re-recorded on an
        // idle stream B completes first. C must still wait for A's recording.
        let dev = small(None);
        let (a, b, c) = (
            dev.create_stream().unwrap(),
            dev.create_stream().unwrap(),
            dev.create_stream().unwrap(),
        );
        let e = dev.create_event().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let a_done = Arc::new(AtomicBool::new(false));
        let flag = a_done.clone();
        dev.launch_host_fn(
            a,
            Box::new(move || {
                let _ = rx.recv_timeout(Duration::from_secs(20));
                flag.store(true, Ordering::SeqCst);
            }),
        )
        .unwrap();
        dev.record_event(e, a).unwrap();
        dev.stream_wait_event(c, e).unwrap();
        dev.record_event(e, b).unwrap();
        dev.stream_synchronize(b).unwrap();
        let seen = Arc::new(AtomicBool::new(false));
        let (flag, s2) = (a_done.clone(), seen.clone());
        dev.launch_host_fn(
            c,
            Box::new(move || s2.store(flag.load(Ordering::SeqCst), Ordering::SeqCst)),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        // As with CUDA, a query asks about the latest recording (B's): complete.
        assert!(dev.event_query(e).unwrap());
        assert!(!seen.load(Ordering::SeqCst));
        tx.send(()).unwrap();
        dev.stream_synchronize(c).unwrap();
        assert!(
            seen.load(Ordering::SeqCst),
            "C ran before the recording it waited for"
        );
        assert!(dev.event_query(e).unwrap());
    }

    #[test]
    fn elapsed_time_is_between_the_latest_recordings_once_both_completed() {
        let dev = small(None);
        let s = dev.create_stream().unwrap();
        let (a, b) = (
            dev.create_timing_event().unwrap(),
            dev.create_timing_event().unwrap(),
        );
        assert!(
            dev.event_elapsed(a, b).is_err(),
            "events never recorded have no time"
        );
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        dev.launch_host_fn(
            s,
            Box::new(move || {
                let _ = rx.recv_timeout(Duration::from_secs(20));
            }),
        )
        .unwrap();
        dev.record_event(a, s).unwrap();
        dev.launch_host_fn(
            s,
            Box::new(|| std::thread::sleep(Duration::from_millis(40))),
        )
        .unwrap();
        dev.record_event(b, s).unwrap();
        // Held behind the gate: neither recording has completed.
        assert_eq!(dev.event_elapsed(a, b).unwrap(), None);
        tx.send(()).unwrap();
        dev.stream_synchronize(s).unwrap();
        let t = dev.event_elapsed(a, b).unwrap().unwrap();
        assert!(t >= Duration::from_millis(40), "{t:?}");
        // Only `a` re-recorded: the latest recordings have `b` first, which
        // reads as no time (the first ones were 40 ms apart).
        dev.record_event(a, s).unwrap();
        dev.stream_synchronize(s).unwrap();
        assert_eq!(dev.event_elapsed(a, b).unwrap(), Some(Duration::ZERO));
        // A plain event has no time, as on CUDA.
        let plain = dev.create_event().unwrap();
        dev.record_event(plain, s).unwrap();
        dev.stream_synchronize(s).unwrap();
        assert!(dev.event_elapsed(a, plain).is_err());
        // A failure of the work a recording covers is the answer's.
        dev.launch_host_fn(s, Box::new(|| panic!("injected")))
            .unwrap();
        dev.record_event(b, s).unwrap();
        let _ = dev.stream_synchronize(s);
        assert!(
            matches!(dev.event_elapsed(a, b), Err(Error::StreamFailed { .. })),
            "{:?}",
            dev.event_elapsed(a, b)
        );
        assert_eq!(dev.counters().host_fns, 3);
    }

    #[test]
    fn event_wait_times_out_and_failures_reach_events() {
        let dev = small(None);
        let s = dev.create_stream().unwrap();
        let ev = dev.create_event().unwrap();
        dev.launch_host_fn(
            s,
            Box::new(|| std::thread::sleep(Duration::from_millis(300))),
        )
        .unwrap();
        dev.record_event(ev, s).unwrap();
        let r = dev.event_wait(ev, Some(Duration::from_millis(10)));
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        dev.stream_synchronize(s).unwrap();
        dev.launch_host_fn(s, Box::new(|| panic!("injected")))
            .unwrap();
        dev.record_event(ev, s).unwrap();
        let r = dev.event_wait(ev, Some(Duration::from_secs(10)));
        assert!(
            matches!(r, Err(Error::StreamFailed { stream, .. }) if stream == s),
            "{r:?}"
        );
        let r = dev.stream_synchronize(s);
        assert!(matches!(r, Err(Error::StreamFailed { .. })), "{r:?}");
        dev.stream_synchronize(s).unwrap(); // reported once
        assert!(matches!(
            dev.destroy_stream(StreamId(9999)),
            Err(Error::UnknownStream(_))
        ));
        assert!(matches!(
            dev.event_query(EventId(9999)),
            Err(Error::UnknownEvent(_))
        ));
    }

    /// A low-rank op merging into a `[rows, cols]` f16 weight: its factors
    /// (f16, rank `rank`) written at `at` on the device, values from `seed`.
    fn lowrank_op(
        dev: &HostDevice,
        s: StreamId,
        at: DevicePtr,
        (rows, cols, rank): (usize, usize, usize),
        seed: u32,
    ) -> Arc<MergeOp> {
        use super::super::{MergeAdapter, MergeDelta, MergeFactor};
        let half = |n: usize, k: u32| -> Vec<u8> {
            (0..n)
                .flat_map(|i| {
                    let v = ((i as u32 * 37 + k * 11) % 17) as f32 / 16.0 - 0.5;
                    half::f16::from_f32(v).to_le_bytes()
                })
                .collect()
        };
        let (up, down) = (half(rows * rank, seed), half(rank * cols, seed + 1));
        let down_at = at.offset(up.len());
        dev.write_blocking(at, &up, s).unwrap();
        dev.write_blocking(down_at, &down, s).unwrap();
        let factor = |ptr, host: Vec<u8>, rows, cols| MergeFactor {
            ptr,
            host: host.into(),
            dtype: offload_kernels::Dtype::F16,
            rows,
            cols,
        };
        Arc::new(MergeOp {
            dtype: offload_kernels::Dtype::F16,
            shape: vec![rows, cols],
            rows: None,
            adapters: vec![MergeAdapter {
                scale: 0.5,
                delta: MergeDelta::LowRank {
                    up: factor(at, up, rows, rank),
                    down: factor(down_at, down, rank, cols),
                },
            }],
        })
    }

    #[test]
    fn merge_batch_runs_each_op_as_one_merge_would_and_names_a_failed_op() {
        let dev = small(None);
        let (range, _) = mapped(&dev, 4);
        let ps = dev.info().page_size;
        let s = dev.create_stream().unwrap();
        // Three weights in the first page (the third one twice merged), the
        // factors in the pages after it.
        let shapes = [(8, 40, 4), (16, 24, 2), (8, 40, 3)];
        let offsets = [0, 8 * 40 * 2, 8 * 40 * 2 + 16 * 24 * 2];
        let w: Vec<u8> = (0..ps).map(|i| (i * 13 % 200) as u8 & 0x3b).collect();
        let ops: Vec<(usize, Arc<MergeOp>)> = (0..4)
            .map(|i| {
                let t = i.min(2);
                let at = range.base.offset(ps + i * (ps / 2));
                (offsets[t], lowrank_op(&dev, s, at, shapes[t], i as u32))
            })
            .collect();
        let run = |kernels: Vec<Kernel>| {
            dev.write_blocking(range.base, &w, s).unwrap();
            for k in &kernels {
                dev.launch(k, s).unwrap();
            }
            let mut back = vec![0u8; ps];
            dev.read_blocking(range.base, &mut back, s).unwrap();
            back
        };
        let one_by_one = run(ops
            .iter()
            .map(|(off, op)| Kernel::Merge {
                w: range.base.offset(*off),
                op: op.clone(),
            })
            .collect());
        let batch = Kernel::MergeBatch {
            base: range.base,
            ops: ops.clone().into(),
        };
        assert_eq!(batch.name(), "merge batch");
        assert_eq!(batch.merges().len(), 4);
        assert_eq!(batch.regions().unwrap().len(), 4 * 3);
        let batched = run(vec![batch]);
        assert_ne!(one_by_one, w, "the merges changed the weights");
        assert_eq!(batched, one_by_one);

        // An op whose factor overlaps its weight: the batch fails on the
        // stream, naming that op; the others still run, as they would one
        // by one.
        let mut bad = ops.clone();
        bad[1].0 = bad[1].1.adapters[0].delta.factors()[0].ptr.0 as usize - range.base.0 as usize;
        dev.write_blocking(range.base, &w, s).unwrap();
        dev.launch(
            &Kernel::MergeBatch {
                base: range.base,
                ops: bad.into(),
            },
            s,
        )
        .unwrap();
        let e = dev.stream_synchronize(s).unwrap_err().to_string();
        assert!(
            e.contains("kernel merge batch: op 1 of 4 (F16 [16, 24] at ")
                && e.contains("a factor overlaps the weight"),
            "{e}"
        );
        let mut back = vec![0u8; ps];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        let first = offsets[1];
        assert_eq!(back[..first], one_by_one[..first], "op 0 ran");
    }

    /// High-priority streams are counted (and run like any other); through
    /// the fault wrapper too.
    #[test]
    fn high_priority_streams_are_counted() {
        let dev = Arc::new(small(None));
        let normal = dev
            .create_stream_with_priority(StreamPriority::Normal)
            .unwrap();
        let high = dev
            .create_stream_with_priority(StreamPriority::High)
            .unwrap();
        let plain = dev.create_stream().unwrap();
        assert_eq!(dev.counters().high_priority_streams, 1);
        let faulty = crate::device::fault::FaultDevice::new(
            dev.clone(),
            crate::device::fault::FaultConfig::default(),
        );
        let via = faulty
            .create_stream_with_priority(StreamPriority::High)
            .unwrap();
        assert_eq!(dev.counters().high_priority_streams, 2);
        // No priorities to report: every stream runs alike.
        assert_eq!(dev.stream_priority_range().unwrap(), None);
        assert_eq!(faulty.stream_priority_range().unwrap(), None);
        let (range, _) = mapped(&dev, 1);
        for (i, s) in [normal, high, plain, via].into_iter().enumerate() {
            dev.launch(
                &Kernel::Fill {
                    dst: range.base.offset(i),
                    len: 1,
                    value: i as u8 + 1,
                },
                s,
            )
            .unwrap();
            let mut back = [0u8; 1];
            dev.read_blocking(range.base.offset(i), &mut back, s)
                .unwrap();
            assert_eq!(back[0], i as u8 + 1);
            dev.destroy_stream(s).unwrap();
        }
    }

    #[test]
    fn fill_kernel_and_bad_config() {
        let dev = small(None);
        let (range, _) = mapped(&dev, 2);
        let s = dev.create_stream().unwrap();
        dev.launch(
            &Kernel::Fill {
                dst: range.base.offset(100),
                len: 70_000,
                value: 3,
            },
            s,
        )
        .unwrap();
        let mut back = vec![0u8; 70_200];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(back[100..70_100].iter().all(|&b| b == 3));
        assert!(back[70_100..].iter().all(|&b| b == 0));
        let bad = |c: HostConfig| matches!(HostDevice::new(c), Err(Error::Config(_)));
        assert!(bad(HostConfig {
            page_size: 3000,
            ..HostConfig::default()
        }));
        assert!(bad(HostConfig {
            capacity: 1000,
            ..HostConfig::default()
        }));
        assert!(bad(HostConfig {
            link_gbps: Some(0.0),
            ..HostConfig::default()
        }));
        assert!(matches!(dev.alloc_pinned(0), Err(Error::ZeroSize)));
    }

    /// Y of the two matmul tests' X [2, 3] · W [2, 3]ᵀ.
    const X_TIMES_W_T: [f32; 4] = [1.0 - 3.0, 2.0 + 4.0 + 6.0, -1.0 - 0.25, -2.0 + 1.0 + 0.5];

    /// `N` f32 values read back from `at`.
    fn read_f32s<const N: usize>(dev: &HostDevice, at: DevicePtr, s: StreamId) -> [f32; N] {
        let mut b = vec![0u8; 4 * N];
        dev.read_blocking(at, &mut b, s).unwrap();
        std::array::from_fn(|i| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
    }

    #[test]
    fn matmul_kernel_computes_x_times_w_transposed() {
        let dev = small(None);
        let (range, _) = mapped(&dev, 1);
        let s = dev.create_stream().unwrap();
        // X [2, 3], W [2, 3] in f16, Y [2, 2].
        let x: [f32; 6] = [1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
        let w: [f32; 6] = [1.0, 0.0, -1.0, 2.0, 2.0, 2.0];
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wb: Vec<u8> = w
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let (xp, wp, yp) = (range.base, range.base.offset(256), range.base.offset(512));
        dev.write_blocking(xp, &xb, s).unwrap();
        dev.write_blocking(wp, &wb, s).unwrap();
        let mm = |y| Kernel::Matmul {
            x: xp,
            x_dtype: offload_kernels::Dtype::F32,
            tokens: 2,
            w: wp,
            w_dtype: offload_kernels::Dtype::F16,
            n: 2,
            k: 3,
            y,
        };
        dev.launch(&mm(yp), s).unwrap();
        assert_eq!(read_f32s::<4>(&dev, yp, s), X_TIMES_W_T);
        // An output overlapping an input is a stream error, not undefined behaviour.
        dev.launch(&mm(xp.offset(4)), s).unwrap();
        assert!(matches!(
            dev.stream_synchronize(s),
            Err(Error::StreamFailed { .. })
        ));
        // Operands outside mapped memory are refused at launch.
        assert!(matches!(
            dev.launch(&mm(range.base.offset(dev.info().page_size - 8)), s),
            Err(Error::BadAddress { .. })
        ));
    }

    #[test]
    fn matmul_kernel_takes_activations_of_the_weights_type() {
        use offload_kernels::Dtype;
        let dev = small(None);
        let (range, _) = mapped(&dev, 1);
        let ps = dev.info().page_size;
        let s = dev.create_stream().unwrap();
        // X [2, 3], W [2, 3], both f16 (X's values exact in f16), Y [2, 2].
        let x: [f32; 6] = [1.0, 2.0, 3.0, -1.0, 0.5, 0.25];
        let w: [f32; 6] = [1.0, 0.0, -1.0, 2.0, 2.0, 2.0];
        let f16s = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect()
        };
        // X in f16 takes 12 bytes: it fits in the page's last 12 (f32's 24 would not).
        let (xp, wp, yp) = (
            range.base.offset(ps - 12),
            range.base.offset(256),
            range.base.offset(512),
        );
        dev.write_blocking(xp, &f16s(&x), s).unwrap();
        dev.write_blocking(wp, &f16s(&w), s).unwrap();
        let mm = |x_dtype, w_dtype| Kernel::Matmul {
            x: xp,
            x_dtype,
            tokens: 2,
            w: wp,
            w_dtype,
            n: 2,
            k: 3,
            y: yp,
        };
        dev.launch(&mm(Dtype::F16, Dtype::F16), s).unwrap();
        assert_eq!(read_f32s::<4>(&dev, yp, s), X_TIMES_W_T);
        // Other pairs are refused at launch, before anything is queued.
        for (xd, wd) in [(Dtype::BF16, Dtype::F16), (Dtype::F16, Dtype::F32)] {
            assert!(matches!(
                dev.launch(&mm(xd, wd), s),
                Err(Error::Kernel {
                    kernel: "matmul",
                    ..
                })
            ));
        }
        // As f32, the same X would run past the page.
        assert!(matches!(
            dev.launch(&mm(Dtype::F32, Dtype::F16), s),
            Err(Error::BadAddress { .. })
        ));
        dev.stream_synchronize(s).unwrap();
    }

    #[test]
    fn device_out_of_pages_is_an_error() {
        let dev = HostDevice::new(HostConfig {
            capacity: 2 << 16,
            page_size: 1 << 16,
            link_gbps: None,
        })
        .unwrap();
        let _a = dev.alloc_page().unwrap();
        let _b = dev.alloc_page().unwrap();
        assert!(matches!(
            dev.alloc_page(),
            Err(Error::DeviceOutOfMemory { .. })
        ));
        assert_eq!(dev.memory().unwrap().free, 0);
    }

    fn no_vmm(pages: usize) -> HostDevice {
        HostDevice::without_vmm(HostConfig {
            capacity: pages << 16,
            page_size: 1 << 16,
            link_gbps: None,
        })
        .unwrap()
    }

    #[test]
    fn without_vmm_offers_contiguous_memory_only() {
        let dev = no_vmm(8);
        let ps = dev.info().page_size;
        assert!(!dev.maps_pages());
        assert!(dev.info().name.contains("no virtual memory API"));
        assert!(matches!(dev.alloc_page(), Err(Error::Unsupported(_))));
        assert!(matches!(dev.reserve(ps), Err(Error::Unsupported(_))));
        assert!(matches!(
            dev.map(DevicePtr(1 << 30), PhysPage(0)),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(dev.alloc_contiguous(0), Err(Error::ZeroSize)));
        for len in [ps + 1, 9 * ps] {
            assert!(matches!(
                dev.alloc_contiguous(len),
                Err(Error::BadAddress { len: l, .. }) if l == len
            ));
        }
        let a = dev.alloc_contiguous(3 * ps).unwrap();
        let b = dev.alloc_contiguous(4 * ps).unwrap();
        assert_eq!((a.0 % ps as u64, b.0 % ps as u64), (0, 0), "page aligned");
        let e = dev.alloc_contiguous(2 * ps).unwrap_err();
        assert!(
            matches!(e, Error::DeviceOutOfMemory { wanted, available } if (wanted, available) == (2 * ps, ps)),
            "{e}"
        );
        let c = dev.counters();
        assert_eq!(
            (
                c.pages_allocated,
                c.pages_mapped,
                c.ranges_reserved,
                c.map_calls,
                c.unmap_calls
            ),
            (7, 0, 0, 0, 0),
            "pages behind contiguous allocations, none mapped"
        );
        assert_eq!(
            (
                c.contiguous_allocations,
                c.contiguous_bytes,
                c.contiguous_calls
            ),
            (2, 7 * ps, 2)
        );
        assert_eq!(dev.memory().unwrap().free, ps);
        assert!(dev.mapped_pages().is_empty());
        // Pages and ranges calls refuse contiguous memory.
        assert!(dev.free_page(PhysPage(0)).is_err());
        assert!(dev.unmap(a).is_err());
        assert!(dev
            .release(VirtualRange {
                base: a,
                len: 3 * ps
            })
            .is_err());
        assert!(matches!(
            dev.free_contiguous(a.offset(ps)),
            Err(Error::BadAddress { .. })
        ));
        dev.free_contiguous(a).unwrap();
        assert!(matches!(
            dev.free_contiguous(a),
            Err(Error::BadAddress { .. })
        ));
        dev.free_contiguous(b).unwrap();
        let c = dev.counters();
        assert_eq!(
            (
                c.pages_allocated,
                c.contiguous_allocations,
                c.contiguous_bytes
            ),
            (0, 0, 0)
        );
        assert_eq!(dev.memory().unwrap().free, 8 * ps);
        // A device with the virtual memory API offers contiguous memory too.
        let vmm = small(None);
        let p = vmm.alloc_contiguous(2 * vmm.info().page_size).unwrap();
        assert_eq!(vmm.counters().contiguous_allocations, 1);
        vmm.free_contiguous(p).unwrap();
    }

    #[test]
    fn contiguous_memory_holds_copies_and_kernels_and_is_poisoned_when_freed() {
        let dev = no_vmm(8);
        let ps = dev.info().page_size;
        let s = dev.create_stream().unwrap();
        // Scatter the free list, so the next allocation's pages are not adjacent.
        let a = dev.alloc_contiguous(ps).unwrap();
        let b = dev.alloc_contiguous(ps).unwrap();
        let c = dev.alloc_contiguous(ps).unwrap();
        dev.free_contiguous(a).unwrap();
        dev.free_contiguous(c).unwrap();
        let d = dev.alloc_contiguous(2 * ps).unwrap();
        // Pages 2 then 0: contiguous at `d` although not physically.
        let data: Vec<u8> = (0..2 * ps).map(|i| (i * 7 + i / ps) as u8).collect();
        dev.write_blocking(d, &data, s).unwrap();
        let mut back = vec![0u8; 2 * ps];
        dev.read_blocking(d, &mut back, s).unwrap();
        assert!(back == data);
        let mut raw = vec![0u8; ps];
        // SAFETY: the stream is idle (synchronised by read_blocking).
        unsafe { dev.read_physical(PhysPage(2), 0, &mut raw).unwrap() };
        assert!(raw[..] == data[..ps], "the first page of `d` is page 2");
        // SAFETY: as above.
        unsafe { dev.read_physical(PhysPage(0), 0, &mut raw).unwrap() };
        assert!(raw[..] == data[ps..], "its second page is page 0");
        // Fill across the page boundary.
        dev.launch(
            &Kernel::Fill {
                dst: d.offset(ps - 10),
                len: 20,
                value: 0xcd,
            },
            s,
        )
        .unwrap();
        let mut mid = [0u8; 22];
        dev.read_blocking(d.offset(ps - 11), &mut mid, s).unwrap();
        assert_eq!(mid[0], data[ps - 11]);
        assert!(mid[1..21].iter().all(|&v| v == 0xcd));
        assert_eq!(mid[21], data[ps + 10]);
        // Matmul: X [1, 2] · W [2, 2]ᵀ, all f32, W across the page boundary.
        let f32s = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let (xp, wp, yp) = (b, d.offset(ps - 8), b.offset(256));
        dev.write_blocking(xp, &f32s(&[1.0, 2.0]), s).unwrap();
        dev.write_blocking(wp, &f32s(&[3.0, 4.0, -1.0, 0.5]), s)
            .unwrap();
        dev.launch(
            &Kernel::Matmul {
                x: xp,
                x_dtype: offload_kernels::Dtype::F32,
                tokens: 1,
                w: wp,
                w_dtype: offload_kernels::Dtype::F32,
                n: 2,
                k: 2,
                y: yp,
            },
            s,
        )
        .unwrap();
        let mut yb = [0u8; 8];
        dev.read_blocking(yp, &mut yb, s).unwrap();
        assert_eq!(yb.to_vec(), f32s(&[11.0, 0.0]));
        // Merge: W [2, 2] += up [2, 1] · down [1, 2], in place at `wp`.
        let factor = |ptr: DevicePtr, v: &[f32], rows, cols| super::super::MergeFactor {
            ptr,
            host: f32s(v).into(),
            dtype: offload_kernels::Dtype::F32,
            rows,
            cols,
        };
        let (up, down) = (b.offset(512), b.offset(768));
        dev.write_blocking(up, &f32s(&[1.0, 2.0]), s).unwrap();
        dev.write_blocking(down, &f32s(&[0.5, -1.0]), s).unwrap();
        let op = super::super::MergeOp {
            dtype: offload_kernels::Dtype::F32,
            shape: vec![2, 2],
            rows: None,
            adapters: vec![super::super::MergeAdapter {
                scale: 2.0,
                delta: super::super::MergeDelta::LowRank {
                    up: factor(up, &[1.0, 2.0], 2, 1),
                    down: factor(down, &[0.5, -1.0], 1, 2),
                },
            }],
        };
        dev.launch(
            &Kernel::Merge {
                w: wp,
                op: Arc::new(op),
            },
            s,
        )
        .unwrap();
        let mut wb = [0u8; 16];
        dev.read_blocking(wp, &mut wb, s).unwrap();
        assert_eq!(wb.to_vec(), f32s(&[4.0, 2.0, 1.0, -3.5]));
        // Past the end of an allocation: refused when queued.
        assert!(matches!(
            dev.write_blocking(d.offset(2 * ps - 1), &[0u8; 2], s),
            Err(Error::BadAddress { .. })
        ));
        // Freed: poisoned, and no longer device memory.
        dev.free_contiguous(d).unwrap();
        // SAFETY: as above.
        unsafe { dev.read_physical(PhysPage(2), 0, &mut raw).unwrap() };
        assert!(raw.iter().all(|&v| v == POISON));
        assert!(matches!(
            dev.write_blocking(d, &[1], s),
            Err(Error::BadAddress { .. })
        ));
        dev.free_contiguous(b).unwrap();
        dev.destroy_stream(s).unwrap();
    }
}
