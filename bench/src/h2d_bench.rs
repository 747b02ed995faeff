//! `offload bench h2d`: host-to-device upload rates against their ceiling,
//! the device-to-device rate, and what mapping pages costs.
//!
//! The device is the one [`device::auto`] picks (a GPU when one answers,
//! else the host backend; `--link-gbps` throttles the host backend's copies
//! like a bus). For each `--sizes` entry S the bench makes a one-component
//! model of `n = max(4, prefetch_depth + 2, ⌈pass / S⌉)` layers of one
//! S-byte tensor each (more layers than the runtime's ring has slots), with
//! distinct bytes per layer in ordinary (pageable) `Vec` memory, and
//! measures, one sample being n copies of S bytes (one pass over the model):
//!
//! - **ceiling**: n pinned buffers of S (`Device::alloc_pinned`), each
//!   copied with `copy_h2d_async` into one of `prefetch_depth + 1` device
//!   buffers in turn (as the runtime's ring), then `stream_synchronize`: on
//!   a GPU that is `cuMemcpyHtoDAsync` from `cuMemHostAlloc` memory, the
//!   plain pinned cudaMemcpy, the ceiling for uploads.
//! - **runtime pinned**: the runtime's own upload path. A
//!   [`Runtime`] in sequential mode (planned policy, so every layer streams
//!   through a ring of `prefetch_depth + 1` slots that stay mapped) with the
//!   pinned host policy loads the model, and a sample is one pass: acquire
//!   and drop every layer in order, then wait for every upload
//!   ([`Runtime::synchronize`]) and the compute stream. Bytes are the
//!   runtime's own `bytes_h2d` counter; two untimed passes come first, so
//!   the timed ones are in the steady state (the last layers of a pass
//!   prefetch the first ones of the next: a pass still moves n layers).
//! - **pageable**: the same copies as the ceiling from the model's `Vec`
//!   memory (`copy_h2d_async` on pageable memory: the CUDA driver's own
//!   staged copy). Not `DeviceExt::write_blocking`: that allocates a pinned
//!   buffer per call.
//! - **runtime staged**: as runtime pinned with the staged host policy
//!   (`--staging-buffers` × `--staging-buffer-mib` pinned staging buffers
//!   filled from the pageable source by `--staging-threads` reader threads,
//!   each buffer's fill split across them in parts of at least
//!   `--staging-part-kib`). The source offers its memory
//!   (`WeightSource::in_memory`), so the runtime fills the buffers with
//!   streaming stores; with `--source-memcpy` it only answers reads, each
//!   its own memcpy into the buffer.
//! - **device to device**: n copies of S through a pool of n device
//!   buffers (copy i: buffer i → buffer i + 1), so that the bytes come from
//!   memory, not a cache, as `offload bench merge` measures its copy; GB/s
//!   count bytes read plus written (2 · S per copy). On a GPU,
//!   `cuMemcpyDtoDAsync` timed with CUDA events behind a gate (a host
//!   function that holds the stream until all copies are queued); on the
//!   host backend, a memcpy split over every CPU thread between the
//!   emulated device buffers. The ceiling for the merge kernel.
//!
//! Every copy row reads back the head and tail of its last destination and
//! compares them with the source, so a broken path cannot report a rate.
//!
//! Then, once: **host fill** (`h2d_fill`): the staging ring filled from
//! pageable memory by the reader threads with memcpy and with streaming
//! stores, no device copy involved, GB/s of each (the staged policy's
//! host-side ceiling). And **map+unmap**: `--map-pages` pages allocated into one
//! reserved range (untimed), then `map` of every page and `unmap` of every
//! page, each timed: µs per page. On a device without the virtual memory
//! API (a GPU where a trial of it fails, or `--no-vmm`) there is nothing to
//! map: device buffers and the runtime's arena are plain allocations, and
//! the row says it is not applicable, and why.
//!
//! Rates are 10⁹ bytes per second of wall-clock time (device to device on a
//! GPU: GPU time), best and median over `--iters` samples after a warm-up.
//! Targets (the issue's, for a GPU; the PASS/FAIL column, never asserted by
//! the tests): runtime pinned ≥ 0.90 × the ceiling, runtime staged ≥ 0.50 ×
//! the ceiling, medians of the same size.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use offload_runtime::device::{
    self, BackendKind, Device, DeviceExt, DevicePtr, HostConfig, HostDevice, PhysPage, StreamId,
    VirtualRange,
};
use offload_runtime::model::{
    ComponentDesc, DType, LayerDesc, ModelDesc, Pin, SourceError, TensorDesc, WeightSource,
};
use offload_runtime::residency::{
    HostPolicy, LayerId, Mode, Policy, Runtime, RuntimeConfig, RuntimeStats,
};

use crate::h2d_fill::Fill;

/// Options of `offload bench h2d`.
#[derive(Args, Debug, Clone)]
pub struct H2dBenchArgs {
    /// Copy sizes in MiB (comma-separated): the size of one copy, and of one
    /// layer of the runtime's model.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 64, 256])]
    pub sizes: Vec<usize>,
    /// MiB one sample moves at least: a sample is max(4, prefetch depth + 2,
    /// ⌈pass / size⌉) copies of one size (a pass over a model of that many
    /// layers).
    #[arg(long, default_value_t = 256)]
    pub pass_mib: usize,
    /// Timed samples per row (best and median reported), after a warm-up
    /// (default: 5 on a GPU, 3 on the host backend).
    #[arg(long)]
    pub iters: Option<usize>,
    /// Pages the map+unmap row maps and unmaps per sample (0: skip the row).
    #[arg(long, default_value_t = 256)]
    pub map_pages: usize,
    /// Layers the runtime uploads ahead of the one in use; its ring, and the
    /// device buffers the ceiling and pageable copies go to, have this + 1 slots.
    #[arg(long, default_value_t = 2)]
    pub prefetch_depth: usize,
    /// Reader threads of the staged host policy (default: the CPUs, at most 8).
    #[arg(long)]
    pub staging_threads: Option<NonZeroUsize>,
    /// Pinned staging buffers of the staged host policy (default: twice the
    /// reader threads, at least 4).
    #[arg(long)]
    pub staging_buffers: Option<NonZeroUsize>,
    /// MiB per staging buffer.
    #[arg(long, default_value_t = 64)]
    pub staging_buffer_mib: usize,
    /// Least KiB one thread fills of a staging buffer: a buffer's fill is
    /// split across up to the reader threads in parts of at least this (the
    /// policy's default).
    #[arg(long, default_value_t = HostPolicy::DEFAULT_FILL_PART_BYTES >> 10)]
    pub staging_part_kib: usize,
    /// Staging buffers in write-combined pinned memory (cuMemHostAlloc with
    /// CU_MEMHOSTALLOC_WRITECOMBINED on CUDA; the host backend has none and
    /// gives plain pinned memory).
    #[arg(long)]
    pub staging_write_combined: bool,
    /// The model's source copies every read into a staging buffer itself
    /// (`WeightSource::read`, a memcpy) instead of offering its memory
    /// (`WeightSource::in_memory`), from which the runtime fills the
    /// buffers with streaming stores.
    #[arg(long)]
    pub source_memcpy: bool,
    /// Throttle the host backend's host↔device copies to this many GB/s
    /// (ignored on a GPU).
    #[arg(long)]
    pub link_gbps: Option<f64>,
    /// Open the device without the virtual memory API, as on a GPU where it
    /// is unavailable: device buffers and the runtime's arena are plain
    /// allocations (cuMemAlloc on a GPU), and the map+unmap row does not apply.
    #[arg(long)]
    pub no_vmm: bool,
    /// Print one JSON document with every result instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The largest copy size accepted, in MiB (1 TiB).
const MAX_SIZE_MIB: usize = 1 << 20;

/// Bytes read back at each end of a destination to check a copy landed.
const CHECK_BYTES: usize = 4096;

/// The settings of one run, validated and resolved.
#[derive(Clone, Debug)]
struct Plan {
    /// Copy sizes in bytes, in the order asked.
    sizes: Vec<usize>,
    pass_bytes: usize,
    iters: usize,
    map_pages: usize,
    prefetch_depth: usize,
    /// Device buffers the ceiling and pageable copies rotate through.
    slots: usize,
    staging_threads: usize,
    staging_buffers: usize,
    staging_buffer_bytes: usize,
    /// Least bytes one thread fills of a staging buffer.
    staging_part_bytes: usize,
    /// Ask for write-combined staging buffers.
    staging_write_combined: bool,
    /// The source copies its reads itself (it does not offer its memory).
    source_memcpy: bool,
    link_gbps: Option<f64>,
    /// Open the device without the virtual memory API.
    no_vmm: bool,
    /// CPU threads of the host backend's device-to-device copy.
    cpu_threads: usize,
}

impl Plan {
    fn new(args: &H2dBenchArgs) -> Result<Plan, String> {
        if args.sizes.is_empty() {
            return Err("--sizes needs at least one size".into());
        }
        if let Some(&s) = args.sizes.iter().find(|&&s| s == 0 || s > MAX_SIZE_MIB) {
            return Err(format!(
                "--sizes {s}: a size must be between 1 and {MAX_SIZE_MIB} MiB"
            ));
        }
        if args.pass_mib == 0 || args.pass_mib > MAX_SIZE_MIB {
            return Err(format!(
                "--pass-mib {} must be between 1 and {MAX_SIZE_MIB}",
                args.pass_mib
            ));
        }
        if args.iters == Some(0) {
            return Err("--iters must be positive".into());
        }
        if args.map_pages > 1 << 20 {
            return Err(format!(
                "--map-pages {} is too many (at most {})",
                args.map_pages,
                1 << 20
            ));
        }
        if args.prefetch_depth > 64 {
            return Err(format!(
                "--prefetch-depth {} is too deep (at most 64)",
                args.prefetch_depth
            ));
        }
        if args.staging_buffer_mib == 0 || args.staging_buffer_mib > 4096 {
            return Err(format!(
                "--staging-buffer-mib {} must be between 1 and 4096",
                args.staging_buffer_mib
            ));
        }
        if args.staging_part_kib == 0 || args.staging_part_kib > 4 << 20 {
            return Err(format!(
                "--staging-part-kib {} must be between 1 and {} (4 GiB)",
                args.staging_part_kib,
                4 << 20
            ));
        }
        if let Some(r) = args.link_gbps {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("--link-gbps {r} must be a positive rate"));
            }
        }
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let staging_threads = args
            .staging_threads
            .map_or(HostPolicy::default_staging_threads(), NonZeroUsize::get);
        if staging_threads > 256 {
            return Err(format!(
                "--staging-threads {staging_threads} is too many (at most 256)"
            ));
        }
        let staging_buffers = args.staging_buffers.map_or(
            HostPolicy::staging_buffers_for(staging_threads),
            NonZeroUsize::get,
        );
        if staging_buffers > 1024 {
            return Err(format!(
                "--staging-buffers {staging_buffers} is too many (at most 1024)"
            ));
        }
        Ok(Plan {
            sizes: args.sizes.iter().map(|&s| s << 20).collect(),
            pass_bytes: args.pass_mib << 20,
            iters: args.iters.unwrap_or(5),
            map_pages: args.map_pages,
            prefetch_depth: args.prefetch_depth,
            slots: args.prefetch_depth + 1,
            staging_threads,
            staging_buffers,
            staging_buffer_bytes: args.staging_buffer_mib << 20,
            staging_part_bytes: args.staging_part_kib << 10,
            staging_write_combined: args.staging_write_combined,
            source_memcpy: args.source_memcpy,
            link_gbps: args.link_gbps,
            no_vmm: args.no_vmm,
            cpu_threads: cpus,
        })
    }

    /// Copies (layers) per sample for copies of `size` bytes: at least one
    /// more than the ring has slots, or the whole model would stay in the
    /// ring and a pass would upload nothing.
    fn layers(&self, size: usize) -> usize {
        self.pass_bytes.div_ceil(size).max(4).max(self.slots + 1)
    }

    /// Host bytes the run holds at once, at most: for one size, the layers'
    /// own bytes and one pinned copy of them (the ceiling's buffers or the
    /// runtime's host copy), plus the staging ring; on the host backend
    /// also its emulated device memory (`device`).
    fn host_bytes(&self, device: usize) -> usize {
        let per_size = self.sizes.iter().map(|&s| {
            self.layers(s)
                .saturating_mul(s)
                .saturating_mul(2)
                .saturating_add(self.staging_buffers * self.staging_buffer_bytes)
        });
        per_size.max().unwrap_or(0).saturating_add(device)
    }

    /// Device bytes the host backend must be able to hold at once, in
    /// pages of `page`: the largest of what each measurement maps.
    fn device_bytes(&self, page: usize) -> usize {
        let round = |b: usize| b.div_ceil(page) * page;
        let per_size = self.sizes.iter().map(|&s| {
            let n = self.layers(s);
            // Ring or slots (twice: the runtime's arena may keep freed
            // slots until their events fire), and the device-to-device pool.
            (2 * self.slots * round(s)).max(n * round(s))
        });
        per_size
            .chain(std::iter::once(self.map_pages * page))
            .max()
            .unwrap_or(0)
    }
}

/// What a row measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ceiling,
    RuntimePinned,
    Pageable,
    Staged,
    DeviceToDevice,
}

impl Kind {
    /// The row's name in the JSON document.
    fn key(self) -> &'static str {
        match self {
            Kind::Ceiling => "ceiling",
            Kind::RuntimePinned => "runtime_pinned",
            Kind::Pageable => "pageable",
            Kind::Staged => "runtime_staged",
            Kind::DeviceToDevice => "d2d",
        }
    }

    /// The row's name in the table.
    fn label(self) -> &'static str {
        match self {
            Kind::Ceiling => "ceiling: pinned copy",
            Kind::RuntimePinned => "runtime, pinned policy",
            Kind::Pageable => "pageable copy",
            Kind::Staged => "runtime, staged policy",
            Kind::DeviceToDevice => "device to device (r+w)",
        }
    }

    /// The target as a fraction of the ceiling, if the row has one.
    fn target(self) -> Option<f64> {
        match self {
            Kind::RuntimePinned => Some(0.90),
            Kind::Staged => Some(0.50),
            _ => None,
        }
    }
}

/// One measured row.
#[derive(Clone, Debug)]
struct Row {
    size: usize,
    kind: Kind,
    /// How it was measured, on this backend.
    method: String,
    /// Copies (layers) per sample.
    copies: usize,
    /// Per timed sample: seconds and bytes copied (each byte once).
    secs: Vec<f64>,
    bytes: Vec<u64>,
    /// Bytes of traffic per byte copied: 2 for device to device (read and
    /// written), 1 for uploads.
    traffic: f64,
    /// Runtime rows: uploads the runtime counted in the timed samples.
    uploads: Option<u64>,
}

impl Row {
    /// GB/s of each sample.
    fn rates(&self) -> Vec<f64> {
        self.secs
            .iter()
            .zip(&self.bytes)
            .map(|(&t, &b)| b as f64 * self.traffic / t / 1e9)
            .collect()
    }

    fn best(&self) -> f64 {
        self.rates().into_iter().fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        median(self.rates())
    }

    fn bytes_moved(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// The ratio of a row's median to its size's ceiling median.
fn ratio(rows: &[Row], r: &Row) -> Option<f64> {
    if r.kind == Kind::DeviceToDevice {
        return None;
    }
    rows.iter()
        .find(|c| c.kind == Kind::Ceiling && c.size == r.size)
        .map(|c| r.median() / c.median())
}

/// PASS or FAIL against the row's target, "-" when it has none.
fn verdict(rows: &[Row], r: &Row) -> &'static str {
    match (r.kind.target(), ratio(rows, r)) {
        (Some(t), Some(x)) if x >= t => "PASS",
        (Some(_), _) => "FAIL",
        (None, _) => "-",
    }
}

/// The map+unmap row, or why it does not apply.
#[derive(Clone, Debug)]
enum MapOutcome {
    Measured(MapRow),
    /// The device maps no pages: why.
    NotApplicable(String),
}

/// What the table and the JSON say when the device maps no pages.
const MAP_NOT_APPLICABLE: &str = "not applicable (no VMM: plain allocations)";

/// The map+unmap row.
#[derive(Clone, Debug)]
struct MapRow {
    pages: usize,
    page_size: usize,
    /// Seconds per sample to map, and to unmap, every page.
    map: Vec<f64>,
    unmap: Vec<f64>,
}

impl MapRow {
    fn us_per_page(&self, v: &[f64]) -> (f64, f64) {
        let per: Vec<f64> = v.iter().map(|t| t * 1e6 / self.pages as f64).collect();
        let best = per.iter().copied().fold(f64::INFINITY, f64::min);
        (best, median(per))
    }
}

/// The least and the median of `v` (NaN when empty).
fn best_median(v: &[f64]) -> (f64, f64) {
    let best = v.iter().copied().fold(f64::NAN, f64::min);
    (best, median(v.to_vec()))
}

/// The median of `v` (NaN when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// Host data

/// The model's bytes in ordinary (pageable) memory: one `Vec` per layer,
/// offered to the runtime as memory ([`WeightSource::in_memory`]) unless
/// `memcpy`, when every read is the source's own copy.
struct MemSource {
    layers: Vec<Vec<u8>>,
    memcpy: bool,
}

impl MemSource {
    /// `n` layers of `size` bytes, layer `i` filled with its own byte, in
    /// memory that has been written (so no read hits a shared zero page).
    fn new(n: usize, size: usize, memcpy: bool) -> Result<MemSource, String> {
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let mut v = Vec::new();
            v.try_reserve_exact(size).map_err(|e| {
                format!("allocating {n} layers of {size} bytes of host memory: {e}")
            })?;
            v.resize(size, layer_byte(i));
            layers.push(v);
        }
        Ok(MemSource { layers, memcpy })
    }

    fn desc(&self, size: usize) -> ModelDesc {
        ModelDesc {
            name: format!("h2d bench, {} layers of {size} bytes", self.layers.len()),
            components: vec![ComponentDesc {
                name: "h2d".into(),
                layers: (0..self.layers.len())
                    .map(|i| LayerDesc {
                        name: format!("layer{i}"),
                        tensors: vec![TensorDesc {
                            name: format!("layer{i}.weight"),
                            dtype: DType::U8,
                            shape: vec![size],
                            bytes: size,
                        }],
                    })
                    .collect(),
                pin: Pin::Auto,
            }],
        }
    }
}

impl WeightSource for MemSource {
    fn read(
        &self,
        component: usize,
        layer: usize,
        tensor: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), SourceError> {
        let what = || format!("h2d bench tensor {component}/{layer}/{tensor}");
        let src = self
            .layers
            .get(layer)
            .filter(|_| component == 0 && tensor == 0)
            .ok_or_else(|| SourceError {
                what: what(),
                message: "no such tensor".into(),
            })?;
        let end = offset.checked_add(dst.len()).filter(|&e| e <= src.len());
        let Some(end) = end else {
            return Err(SourceError {
                what: what(),
                message: format!(
                    "read of {} bytes at {offset} past its {} bytes",
                    dst.len(),
                    src.len()
                ),
            });
        };
        dst.copy_from_slice(&src[offset..end]);
        Ok(())
    }

    fn in_memory(&self, component: usize, layer: usize, tensor: usize) -> Option<&[u8]> {
        if self.memcpy || component != 0 || tensor != 0 {
            return None;
        }
        self.layers.get(layer).map(Vec::as_slice)
    }
}

/// How the staged rows' buffers are filled from the source, for the notes.
fn source_fill(plan: &Plan) -> &'static str {
    if plan.source_memcpy {
        "source in Vec memory, copied by its own reads (memcpy)"
    } else {
        "source in Vec memory, copied by the runtime with streaming stores"
    }
}

/// The byte layer `i` is filled with (never 0).
fn layer_byte(i: usize) -> u8 {
    (i.wrapping_mul(37) % 255 + 1) as u8
}

// ---------------------------------------------------------------------------
// Device memory

/// Device buffers: each a reserved range with its own pages mapped, or, on
/// a device that maps no pages, one plain allocation. On drop the stream
/// that uses them is synchronised first, then everything is unmapped,
/// released and freed (also on an error path).
struct DevMem {
    dev: Arc<dyn Device>,
    stream: StreamId,
    bufs: Vec<(VirtualRange, Vec<PhysPage>)>,
    blocks: Vec<DevicePtr>,
}

impl DevMem {
    fn new(dev: &Arc<dyn Device>, stream: StreamId) -> DevMem {
        DevMem {
            dev: dev.clone(),
            stream,
            bufs: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// A buffer of at least `len` bytes (whole pages).
    fn alloc(&mut self, len: usize) -> Result<DevicePtr, String> {
        let ps = self.dev.info().page_size;
        let n = len.div_ceil(ps).max(1);
        let fail =
            |e: offload_runtime::Error| format!("allocating {len} bytes of device memory: {e}");
        if !self.dev.maps_pages() {
            let p = self.dev.alloc_contiguous(n * ps).map_err(fail)?;
            self.blocks.push(p);
            return Ok(p);
        }
        let range = self.dev.reserve(n * ps).map_err(fail)?;
        let mut pages = Vec::with_capacity(n);
        for i in 0..n {
            let r = self.dev.alloc_page().and_then(|p| {
                let mapped = self.dev.map(range.base.offset(i * ps), p);
                if mapped.is_err() {
                    let _ = self.dev.free_page(p);
                } else {
                    pages.push(p);
                }
                mapped
            });
            if let Err(e) = r {
                self.bufs.push((range, pages));
                return Err(fail(e));
            }
        }
        self.bufs.push((range, pages));
        Ok(range.base)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        let _ = self.dev.stream_synchronize(self.stream);
        let ps = self.dev.info().page_size;
        for (range, pages) in self.bufs.drain(..) {
            for i in 0..pages.len() {
                let _ = self.dev.unmap(range.base.offset(i * ps));
            }
            let _ = self.dev.release(range);
            for p in pages {
                let _ = self.dev.free_page(p);
            }
        }
        for p in self.blocks.drain(..) {
            let _ = self.dev.free_contiguous(p);
        }
    }
}

/// Reads back the head and tail of `len` bytes at `dst` and compares them
/// with `want` (the bytes that were copied there).
fn check_landed(
    dev: &dyn Device,
    stream: StreamId,
    dst: DevicePtr,
    want: &[u8],
    what: &str,
) -> Result<(), String> {
    let len = want.len();
    let n = CHECK_BYTES.min(len);
    let mut got = vec![0u8; n];
    for off in [0, len - n] {
        dev.read_blocking(dst.offset(off), &mut got, stream)
            .map_err(|e| format!("{what}: reading the copy back: {e}"))?;
        if got[..] != want[off..off + n] {
            return Err(format!(
                "{what}: the bytes at offset {off} of the destination are not the source's: the path is broken and its rate meaningless"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The backend

/// Device-to-device copies: CPU threads on the host backend, the driver on a GPU.
enum D2d {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(Arc<offload_runtime::device::cuda::CudaDevice>),
}

/// The device and how it was chosen.
struct Opened {
    dev: Arc<dyn Device>,
    d2d: D2d,
    reason: String,
    notes: Vec<String>,
    /// Why the device maps no pages, if it maps none.
    no_vmm: Option<String>,
}

fn open(plan: &Plan) -> Result<Opened, String> {
    let defaults = HostConfig::default();
    let page = defaults.page_size;
    let capacity = (plan.device_bytes(page) * 2 + (64 << 20)).max(defaults.capacity);
    let capacity = capacity.div_ceil(page) * page;
    let host_cfg = HostConfig {
        capacity,
        page_size: page,
        link_gbps: plan.link_gbps,
    };
    let selected = device::auto(&host_cfg).map_err(|e| format!("opening a device: {e}"))?;
    let mut reason = selected.reason;
    if plan.no_vmm {
        reason.push_str("; --no-vmm: opened without the virtual memory API (plain allocations)");
    }
    let kind = selected.device.info().kind;
    let mut notes = Vec::new();
    if kind == BackendKind::Cuda && plan.link_gbps.is_some() {
        notes.push("--link-gbps applies to the host backend only: ignored".to_string());
    }
    match kind {
        BackendKind::Host => {
            drop(selected.device);
            // A fresh host device we can configure: no poisoning of freed
            // pages, which would touch every page a measurement frees.
            let host = if plan.no_vmm {
                HostDevice::without_vmm(host_cfg)
            } else {
                HostDevice::new(host_cfg)
            }
            .map_err(|e| format!("opening the host backend: {e}"))?;
            host.set_poison(false);
            Ok(Opened {
                dev: Arc::new(host),
                d2d: D2d::Host,
                reason,
                notes,
                no_vmm: plan
                    .no_vmm
                    .then(|| "the host backend opened with --no-vmm".to_string()),
            })
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                drop(selected.device);
                let d = Arc::new(gpu::open(plan.no_vmm)?);
                let no_vmm = match d.vmm_unavailable_reason() {
                    None => None,
                    Some(_) if plan.no_vmm => Some("the GPU opened with --no-vmm".to_string()),
                    Some(why) => Some(format!("the CUDA virtual memory API is unavailable: {why}")),
                };
                Ok(Opened {
                    dev: d.clone(),
                    d2d: D2d::Cuda(d),
                    reason,
                    notes,
                    no_vmm,
                })
            }
            #[cfg(not(feature = "cuda"))]
            {
                Err("a CUDA device without the `cuda` feature".into())
            }
        }
    }
}

/// How the staging buffers' memory is described in the method notes (of
/// this benchmark and of `bench e2e`).
pub(crate) fn staging_memory(write_combined: bool, dev: &dyn Device) -> &'static str {
    match (write_combined, dev.info().kind) {
        (false, _) => "pinned",
        (true, BackendKind::Host) => "pinned (write-combined asked for; the host backend has none)",
        (true, _) => "write-combined pinned",
    }
}

fn backend_name(dev: &dyn Device) -> &'static str {
    match dev.info().kind {
        BackendKind::Host => "host",
        BackendKind::Cuda => "cuda",
    }
}

// ---------------------------------------------------------------------------
// Measurements

/// Runs `sample` once untimed, then `iters` times timed; each call returns
/// the bytes it copied.
fn samples(
    iters: usize,
    mut sample: impl FnMut() -> Result<u64, String>,
) -> Result<(Vec<f64>, Vec<u64>), String> {
    sample()?;
    let mut secs = Vec::with_capacity(iters);
    let mut bytes = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let b = sample()?;
        secs.push(t.elapsed().as_secs_f64());
        bytes.push(b);
    }
    Ok((secs, bytes))
}

/// The ceiling and pageable rows: every layer's `size` bytes, from its own
/// pinned buffer and then from its `Vec`, into `plan.slots` device buffers
/// in turn, synchronised once per sample.
fn plain_copies(
    o: &Opened,
    plan: &Plan,
    stream: StreamId,
    size: usize,
    src: &MemSource,
) -> Result<(Row, Row), String> {
    let dev = &*o.dev;
    let n = src.layers.len();
    let fail = |what: &'static str| move |e: offload_runtime::Error| format!("{what}: {e}");
    let mut pinned = Vec::with_capacity(n);
    for layer in &src.layers {
        let mut b = dev
            .alloc_pinned(size)
            .map_err(fail("allocating pinned host memory"))?;
        b.as_mut_slice()[..size].copy_from_slice(layer);
        pinned.push(b);
    }
    // Declared after the host buffers, so dropped (and the stream
    // synchronised) before them.
    let mut mem = DevMem::new(&o.dev, stream);
    let slots: Vec<DevicePtr> = (0..plan.slots)
        .map(|_| mem.alloc(size))
        .collect::<Result<_, _>>()?;
    let run = |ptrs: &[*const u8]| -> Result<u64, String> {
        for (i, &p) in ptrs.iter().enumerate() {
            // SAFETY: `p` points to `size` readable bytes (a pinned buffer
            // or a layer `Vec`, both alive until after this function's last
            // synchronisation, and not written meanwhile); the stream is
            // synchronised below, before anything can change them.
            unsafe { dev.copy_h2d_async(slots[i % slots.len()], p, size, stream) }
                .map_err(fail("queueing a host-to-device copy"))?;
        }
        dev.stream_synchronize(stream)
            .map_err(fail("a host-to-device copy"))?;
        Ok((ptrs.len() * size) as u64)
    };
    let last = slots[(n - 1) % slots.len()];
    let backend = backend_name(dev);

    let pinned_ptrs: Vec<*const u8> = pinned.iter().map(|b| b.as_ptr()).collect();
    let (secs, bytes) = samples(plan.iters, || run(&pinned_ptrs))?;
    check_landed(dev, stream, last, &src.layers[n - 1], "ceiling")?;
    let ceiling = Row {
        size,
        kind: Kind::Ceiling,
        method: if backend == "cuda" {
            "copy_h2d_async (cuMemcpyHtoDAsync) from alloc_pinned (cuMemHostAlloc) memory, one stream, synchronised per sample".into()
        } else {
            "copy_h2d_async from alloc_pinned memory (the stream's worker thread copies), synchronised per sample".into()
        },
        copies: n,
        secs,
        bytes,
        traffic: 1.0,
        uploads: None,
    };

    let pageable_ptrs: Vec<*const u8> = src.layers.iter().map(|v| v.as_ptr()).collect();
    let (secs, bytes) = samples(plan.iters, || run(&pageable_ptrs))?;
    check_landed(dev, stream, last, &src.layers[n - 1], "pageable")?;
    let pageable = Row {
        size,
        kind: Kind::Pageable,
        method: if backend == "cuda" {
            "copy_h2d_async (cuMemcpyHtoDAsync) from Vec memory: the driver's pageable copy".into()
        } else {
            "copy_h2d_async from Vec memory (the same as pinned on the host backend)".into()
        },
        copies: n,
        secs,
        bytes,
        traffic: 1.0,
        uploads: None,
    };
    drop(mem);
    Ok((ceiling, pageable))
}

/// A runtime row: passes over the model with `policy`.
fn runtime_row(
    o: &Opened,
    plan: &Plan,
    compute: StreamId,
    size: usize,
    src: &Arc<MemSource>,
    staged: bool,
) -> Result<Row, String> {
    let kind = if staged {
        Kind::Staged
    } else {
        Kind::RuntimePinned
    };
    let what = kind.label();
    let fail = |e: offload_runtime::Error| format!("{what}, {size} bytes: {e}");
    let host_policy = if staged {
        HostPolicy::Staged {
            buffers: plan.staging_buffers,
            buffer_bytes: plan.staging_buffer_bytes,
            threads: plan.staging_threads,
            fill_part_bytes: plan.staging_part_bytes,
            write_combined: plan.staging_write_combined,
        }
    } else {
        HostPolicy::Pinned
    };
    let cfg = RuntimeConfig {
        mode: Some(Mode::Sequential),
        policy: Policy::Planned,
        prefetch_depth: plan.prefetch_depth,
        host_policy,
        ..RuntimeConfig::default()
    };
    let n = src.layers.len();
    let rt = Runtime::new(o.dev.clone(), compute, cfg).map_err(fail)?;
    let source: Arc<dyn WeightSource> = src.clone();
    let model = rt.load(src.desc(size), source).map_err(fail)?;
    let id = |layer| LayerId {
        model,
        component: 0,
        layer,
    };
    let pass = || -> Result<(), String> {
        for l in 0..n {
            drop(rt.acquire(id(l)).map_err(fail)?);
        }
        rt.synchronize().map_err(fail)?;
        o.dev.stream_synchronize(compute).map_err(fail)
    };
    // Two passes reach the steady state: the second is the first in which
    // the end of a pass prefetches the start of the next.
    pass()?;
    let mut before: RuntimeStats = rt.stats();
    let mut uploads = 0u64;
    let mut warm = true;
    let (secs, bytes) = samples(plan.iters, || {
        pass()?;
        let after = rt.stats();
        let done = after.since(&before);
        before = after;
        // `samples` runs one untimed pass first: count the timed ones only.
        if !std::mem::take(&mut warm) {
            uploads += done.uploads;
        }
        if done.bytes_h2d == 0 {
            return Err(format!(
                "{what}, {size} bytes: a pass over {n} layers uploaded nothing (the ring holds them all)"
            ));
        }
        Ok(done.bytes_h2d)
    })?;
    // The last layer of the model, as the engine sees it.
    let g = rt.acquire(id(n - 1)).map_err(fail)?;
    let ptr = g
        .tensor(0)
        .ok_or_else(|| format!("{what}: the layer has no tensor"))?
        .ptr;
    let checked = check_landed(&*o.dev, compute, ptr, &src.layers[n - 1], what);
    drop(g);
    checked?;
    rt.synchronize().map_err(fail)?;
    rt.unload(model).map_err(fail)?;
    drop(rt);
    let method = if staged {
        format!(
            "Runtime, sequential mode, staged host policy ({} × {} MiB {} staging buffers, {} reader thread(s), fill parts of at least {} KiB, {}), ring of {} slots: one pass (acquire and drop every layer, then Runtime::synchronize); bytes from the runtime's bytes_h2d",
            plan.staging_buffers,
            plan.staging_buffer_bytes >> 20,
            staging_memory(plan.staging_write_combined, &*o.dev),
            plan.staging_threads,
            plan.staging_part_bytes >> 10,
            source_fill(plan),
            plan.slots
        )
    } else {
        format!(
            "Runtime, sequential mode, pinned host policy (one copy_h2d_async per layer from its pinned host copy), ring of {} slots: one pass (acquire and drop every layer, then Runtime::synchronize); bytes from the runtime's bytes_h2d",
            plan.slots
        )
    };
    Ok(Row {
        size,
        kind,
        method,
        copies: n,
        secs,
        bytes,
        traffic: 1.0,
        uploads: Some(uploads),
    })
}

/// The device-to-device row: `n` copies of `size` through a pool of `n` buffers.
fn d2d_row(
    o: &Opened,
    plan: &Plan,
    stream: StreamId,
    size: usize,
    n: usize,
) -> Result<Row, String> {
    let dev = &*o.dev;
    let mut mem = DevMem::new(&o.dev, stream);
    let pool: Vec<DevicePtr> = (0..n).map(|_| mem.alloc(size)).collect::<Result<_, _>>()?;
    // Distinct bytes in the first buffer; the copies carry them round.
    let first: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    dev.write_blocking(pool[0], &first, stream)
        .map_err(|e| format!("filling a device buffer: {e}"))?;
    let pairs: Vec<(DevicePtr, DevicePtr)> = (0..n).map(|i| (pool[i], pool[(i + 1) % n])).collect();
    let bytes = (n * size) as u64;
    let (secs, bytes, method) = match &o.d2d {
        D2d::Host => {
            let (secs, bytes) = samples(plan.iters, || {
                // SAFETY: on the host backend a device address is the host
                // address of a mapping; every buffer is `size` bytes (whole
                // pages) of a range `mem` reserved and fully mapped
                // read-write; a pair's buffers are distinct (no overlap);
                // no stream work is queued on them (the stream was
                // synchronised) and `mem` keeps them mapped until it drops
                // after this row.
                unsafe { host_copies(plan.cpu_threads, &pairs, size) };
                Ok(bytes)
            })?;
            (
                secs,
                bytes,
                format!(
                    "memcpy split over {} CPU thread(s) between emulated device buffers, a pool of {n} (copy i: buffer i -> i + 1)",
                    plan.cpu_threads
                ),
            )
        }
        #[cfg(feature = "cuda")]
        D2d::Cuda(d) => {
            let timer = crate::cuda_timing::Timer::new(d)?;
            let mut secs = Vec::with_capacity(plan.iters);
            for i in 0..=plan.iters {
                let t = timer.time(d, stream, true, || {
                    for &(src, dst) in &pairs {
                        crate::cuda_timing::copy_d2d(d, dst, src, size, stream)?;
                    }
                    Ok(())
                })?;
                if i > 0 {
                    secs.push(t);
                }
            }
            let method = format!(
                "cuMemcpyDtoDAsync, a pool of {n} buffers (copy i: buffer i -> i + 1) queued behind a gate, GPU time from CUDA events"
            );
            drop(timer);
            (secs, vec![bytes; plan.iters], method)
        }
    };
    // After the samples the pool holds `first` everywhere (every copy
    // carried it on): the last destination must.
    check_landed(dev, stream, pairs[n - 1].1, &first, "device to device")?;
    drop(mem);
    Ok(Row {
        size,
        kind: Kind::DeviceToDevice,
        method,
        copies: n,
        secs,
        bytes,
        traffic: 2.0,
        uploads: None,
    })
}

/// Runs the copies `(src, dst)` of `len` bytes each, in order, on
/// `threads` CPU threads: thread t copies the t-th slice of every copy, and
/// all threads finish a copy before any starts the next (a copy may read
/// what the previous one wrote).
///
/// # Safety
/// Every address must be the host address of `len` bytes, readable at a
/// source and writable at a destination; a copy's source and destination
/// must not overlap; nobody else may touch them during the call.
unsafe fn host_copies(threads: usize, pairs: &[(DevicePtr, DevicePtr)], len: usize) {
    let threads = threads.max(1);
    let chunk = len.div_ceil(threads).next_multiple_of(4096).max(4096);
    let parts = len.div_ceil(chunk);
    let barrier = std::sync::Barrier::new(parts);
    let copy_part = |t: usize| {
        let off = t * chunk;
        let n = chunk.min(len - off);
        for &(src, dst) in pairs {
            // SAFETY: the caller's contract: `off + n <= len` bytes of a
            // readable source and a writable, non-overlapping destination,
            // which no other thread writes in this part (the parts are
            // disjoint) and the barrier orders across copies.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (src.0 as usize + off) as *const u8,
                    (dst.0 as usize + off) as *mut u8,
                    n,
                );
            }
            barrier.wait();
        }
    };
    std::thread::scope(|scope| {
        for t in 1..parts {
            let copy_part = &copy_part;
            scope.spawn(move || copy_part(t));
        }
        copy_part(0);
    });
}

/// The map+unmap row: `pages` pages mapped into one range and unmapped, per
/// sample; not applicable on a device that maps no pages.
fn map_row(o: &Opened, plan: &Plan) -> Result<MapOutcome, String> {
    if let Some(why) = &o.no_vmm {
        return Ok(MapOutcome::NotApplicable(why.clone()));
    }
    measure_map(&*o.dev, plan).map(MapOutcome::Measured)
}

/// Times `map` and `unmap` of `plan.map_pages` pages.
fn measure_map(dev: &dyn Device, plan: &Plan) -> Result<MapRow, String> {
    let ps = dev.info().page_size;
    let pages = plan.map_pages;
    let fail =
        |what: &'static str| move |e: offload_runtime::Error| format!("map+unmap row, {what}: {e}");
    let range = dev.reserve(pages * ps).map_err(fail("reserving a range"))?;
    let mut phys = Vec::with_capacity(pages);
    let mut mapped = 0usize;
    let result = (|| -> Result<MapRow, String> {
        for _ in 0..pages {
            phys.push(dev.alloc_page().map_err(fail("allocating a page"))?);
        }
        let mut map = Vec::with_capacity(plan.iters);
        let mut unmap = Vec::with_capacity(plan.iters);
        for i in 0..=plan.iters {
            let t = Instant::now();
            for (k, &p) in phys.iter().enumerate() {
                dev.map(range.base.offset(k * ps), p)
                    .map_err(fail("mapping a page"))?;
                mapped = k + 1;
            }
            let tm = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for k in 0..pages {
                dev.unmap(range.base.offset(k * ps))
                    .map_err(fail("unmapping a page"))?;
                mapped = pages - k - 1;
            }
            let tu = t.elapsed().as_secs_f64();
            if i > 0 {
                map.push(tm);
                unmap.push(tu);
            }
        }
        Ok(MapRow {
            pages,
            page_size: ps,
            map,
            unmap,
        })
    })();
    // Mapped pages are always a prefix (mapping goes up) or a suffix
    // (unmapping goes up too); undo whichever is left.
    if mapped > 0 {
        for k in 0..pages {
            let _ = dev.unmap(range.base.offset(k * ps));
        }
    }
    for p in phys {
        let _ = dev.free_page(p);
    }
    let _ = dev.release(range);
    result
}

/// Runs `offload bench h2d`.
pub fn run(args: &H2dBenchArgs) -> Result<(), String> {
    let mut plan = Plan::new(args)?;
    let o = open(&plan)?;
    let emulated = match o.dev.info().kind {
        BackendKind::Host => plan.device_bytes(o.dev.info().page_size),
        BackendKind::Cuda => 0,
    };
    let need = plan.host_bytes(emulated);
    if let Some(available) = host_available_bytes() {
        if need > available {
            return Err(format!(
                "--pass-mib {} with --sizes {:?} MiB and {} staging buffers of {} MiB would hold up to \
                 {:.1} GiB of host memory at once (the layers, a pinned copy of them, the staging ring{}), \
                 and the machine has {:.1} GiB available (MemAvailable in /proc/meminfo): lower \
                 --pass-mib, the sizes or the staging ring",
                args.pass_mib,
                args.sizes,
                plan.staging_buffers,
                args.staging_buffer_mib,
                need as f64 / (1u64 << 30) as f64,
                if emulated > 0 { ", the emulated device" } else { "" },
                available as f64 / (1u64 << 30) as f64,
            ));
        }
    }
    if args.iters.is_none() && o.dev.info().kind == BackendKind::Host {
        // Fewer samples on the CPU: a sample of the largest default size
        // takes a quarter of a second there.
        plan.iters = 3;
    }
    let fail = |what: &'static str| move |e: offload_runtime::Error| format!("{what}: {e}");
    let stream = o.dev.create_stream().map_err(fail("creating a stream"))?;
    let compute = match o.dev.create_stream() {
        Ok(s) => s,
        Err(e) => {
            let _ = o.dev.destroy_stream(stream);
            return Err(format!("creating a stream: {e}"));
        }
    };
    let started = Instant::now();
    let measured = measure(&o, &plan, stream, compute);
    let _ = o.dev.stream_synchronize(stream);
    let _ = o.dev.stream_synchronize(compute);
    let _ = o.dev.destroy_stream(stream);
    let _ = o.dev.destroy_stream(compute);
    let (rows, map) = measured?;
    let fill = crate::h2d_fill::measure(
        &*o.dev,
        plan.staging_threads,
        plan.staging_part_bytes,
        plan.staging_buffers * plan.staging_buffer_bytes,
        plan.pass_bytes,
        plan.iters,
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", json(&o, &plan, &rows, map.as_ref(), &fill, elapsed));
    } else {
        print!("{}", table(&o, &plan, &rows, map.as_ref(), &fill, elapsed));
    }
    Ok(())
}

fn measure(
    o: &Opened,
    plan: &Plan,
    stream: StreamId,
    compute: StreamId,
) -> Result<(Vec<Row>, Option<MapOutcome>), String> {
    let mut rows = Vec::new();
    for &size in &plan.sizes {
        let n = plan.layers(size);
        let src = Arc::new(MemSource::new(n, size, plan.source_memcpy)?);
        let (ceiling, pageable) = plain_copies(o, plan, stream, size, &src)?;
        rows.push(ceiling);
        rows.push(runtime_row(o, plan, compute, size, &src, false)?);
        rows.push(pageable);
        rows.push(runtime_row(o, plan, compute, size, &src, true)?);
        drop(src);
        rows.push(d2d_row(o, plan, stream, size, n)?);
    }
    let map = if plan.map_pages > 0 {
        Some(map_row(o, plan)?)
    } else {
        None
    };
    Ok((rows, map))
}

/// Host memory available to a new allocation, where the OS says
/// (`MemAvailable` in `/proc/meminfo`, Linux); `None` elsewhere.
fn host_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// A size in MiB or KiB.
fn size_name(bytes: usize) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// A rate with three significant digits or one decimal, whichever is more.
fn rate(gbps: f64) -> String {
    if gbps < 10.0 {
        format!("{gbps:.2}")
    } else {
        format!("{gbps:.1}")
    }
}

/// Map+unmap of one page as a fraction of uploading it at the ceiling rate
/// of the largest size.
fn map_share(rows: &[Row], m: &MapRow) -> Option<f64> {
    let ceiling = rows
        .iter()
        .filter(|r| r.kind == Kind::Ceiling)
        .max_by_key(|r| r.size)?;
    let upload_us = m.page_size as f64 / (ceiling.median() * 1e9) * 1e6;
    let per_page = m.us_per_page(&m.map).1 + m.us_per_page(&m.unmap).1;
    Some(per_page / upload_us)
}

fn table(
    o: &Opened,
    plan: &Plan,
    rows: &[Row],
    map: Option<&MapOutcome>,
    fill: &Fill,
    elapsed: f64,
) -> String {
    let mut out = String::new();
    let dev = &*o.dev;
    let _ = writeln!(out, "device: {}", o.reason);
    for n in &o.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(
        out,
        "offload bench h2d: GB/s = 10^9 bytes / s; a sample is one pass of max({}, {} MiB / size) copies of one size; best and median of {} samples after a warm-up ({elapsed:.1} s in all)",
        (plan.slots + 1).max(4),
        plan.pass_bytes >> 20,
        plan.iters
    );
    let _ = writeln!(
        out,
        "runtime rows: offload_runtime::Runtime, sequential mode, planned policy, prefetch depth {} (ring of {} slots), a one-component model of one-tensor layers of the row's size; bytes from the runtime's bytes_h2d counter. staged: {} x {} MiB {} staging buffers, {} reader thread(s), fill parts of at least {} KiB, {}",
        plan.prefetch_depth,
        plan.slots,
        plan.staging_buffers,
        plan.staging_buffer_bytes >> 20,
        staging_memory(plan.staging_write_combined, &*o.dev),
        plan.staging_threads,
        plan.staging_part_bytes >> 10,
        source_fill(plan)
    );
    let _ = writeln!(
        out,
        "\n| size | row | copies/sample | GB/s best | GB/s median | ÷ ceiling | target | verdict |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|---|---|");
    for r in rows {
        let ratio = ratio(rows, r).map_or("".to_string(), |x| format!("{x:.2}"));
        let target = r
            .kind
            .target()
            .map_or(String::new(), |t| format!("≥ {t:.2}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            size_name(r.size),
            r.kind.label(),
            r.copies,
            rate(r.best()),
            rate(r.median()),
            ratio,
            target,
            verdict(rows, r)
        );
    }
    if let Some(MapOutcome::NotApplicable(why)) = map {
        let _ = writeln!(out, "\nmap+unmap: {MAP_NOT_APPLICABLE}: {why}");
    }
    if let Some(MapOutcome::Measured(m)) = map {
        let (mb, mm) = m.us_per_page(&m.map);
        let (ub, um) = m.us_per_page(&m.unmap);
        let share = map_share(rows, m).map_or(String::new(), |s| {
            format!(
                "; map+unmap of one page = {:.2}% of uploading it at the largest size's ceiling rate",
                s * 100.0
            )
        });
        let _ = writeln!(
            out,
            "\nmap+unmap: {} pages of {}, median (best) of {}: map {:.2} ({:.2}) µs/page, unmap {:.2} ({:.2}) µs/page{share}",
            m.pages,
            size_name(m.page_size),
            m.map.len(),
            mm,
            mb,
            um,
            ub
        );
    }
    let _ = writeln!(
        out,
        "\nhost fill of the staging ring ({} MiB of pageable memory into {} MiB of plain pinned memory, {} thread(s), {} KiB parts, no device copy), median (best) of {}: {}",
        fill.bytes >> 20,
        fill.ring_bytes >> 20,
        fill.threads,
        fill.part_bytes >> 10,
        plan.iters,
        fill.rows
            .iter()
            .map(|r| {
                let (best, median) = r.gbps(fill.bytes);
                format!("{} {} ({}) GB/s", r.method(), rate(median), rate(best))
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (spawn_best, spawn_median) = best_median(&fill.spawn_us);
    let _ = writeln!(
        out,
        "thread start + join (what a fill split across threads started for it pays per extra part), median (best) of {}: {spawn_median:.0} ({spawn_best:.0}) µs",
        fill.spawn_us.len()
    );
    let backend = backend_name(dev);
    let _ = writeln!(
        out,
        "\nceiling: pinned memory -> device with copy_h2d_async ({}). runtime: what the runtime's own upload path moves per second in steady-state passes. pageable: copy_h2d_async from Vec memory ({}). device to device: bytes read + written per second ({}).\ntargets (the issue's, for a GPU): runtime pinned ≥ 0.90 × ceiling, runtime staged ≥ 0.50 × ceiling (medians).",
        if backend == "cuda" { "cuMemcpyHtoDAsync" } else { "the host backend's stream worker" },
        if backend == "cuda" { "the driver's pageable copy" } else { "no different from pinned on the host backend" },
        if backend == "cuda" { "cuMemcpyDtoDAsync, CUDA events" } else { "a memcpy split over every CPU thread" },
    );
    out
}

fn json(
    o: &Opened,
    plan: &Plan,
    rows: &[Row],
    map: Option<&MapOutcome>,
    fill: &Fill,
    elapsed: f64,
) -> serde_json::Value {
    let info = o.dev.info();
    let row_json = |r: &Row| {
        serde_json::json!({
            "size_bytes": r.size,
            "row": r.kind.key(),
            "method": r.method,
            "samples": r.secs.len(),
            "copies_per_sample": r.copies,
            "bytes_per_sample": r.bytes,
            "bytes_moved": r.bytes_moved(),
            "traffic_per_byte": r.traffic,
            "uploads": r.uploads,
            "seconds": r.secs,
            "best_gbps": r.best(),
            "median_gbps": r.median(),
            "ratio_to_ceiling": ratio(rows, r),
            "target_ratio": r.kind.target(),
            "verdict": verdict(rows, r),
        })
    };
    let map_json = map.map(|m| {
        let m = match m {
            MapOutcome::Measured(m) => m,
            MapOutcome::NotApplicable(why) => {
                return serde_json::json!({
                    "applicable": false,
                    "reason": format!("{MAP_NOT_APPLICABLE}: {why}"),
                })
            }
        };
        let (mb, mm) = m.us_per_page(&m.map);
        let (ub, um) = m.us_per_page(&m.unmap);
        serde_json::json!({
            "applicable": true,
            "pages": m.pages,
            "page_size": m.page_size,
            "samples": m.map.len(),
            "map_seconds": m.map,
            "unmap_seconds": m.unmap,
            "map_us_per_page_best": mb,
            "map_us_per_page_median": mm,
            "unmap_us_per_page_best": ub,
            "unmap_us_per_page_median": um,
            "share_of_page_upload": map_share(rows, m),
        })
    });
    serde_json::json!({
        "bench": "h2d",
        "device": {
            "backend": backend_name(&*o.dev),
            "name": info.name,
            "reason": o.reason,
            "page_size": info.page_size,
            "total_memory": info.total_memory,
            "maps_pages": o.dev.maps_pages(),
            "link_gbps": if info.kind == BackendKind::Host { plan.link_gbps } else { None },
        },
        "notes": o.notes,
        "config": {
            "sizes": plan.sizes,
            "pass_bytes": plan.pass_bytes,
            "iters": plan.iters,
            "prefetch_depth": plan.prefetch_depth,
            "slots": plan.slots,
            "staging_threads": plan.staging_threads,
            "staging_buffers": plan.staging_buffers,
            "staging_buffer_bytes": plan.staging_buffer_bytes,
            "staging_part_bytes": plan.staging_part_bytes,
            "staging_write_combined": plan.staging_write_combined,
            "source_memcpy": plan.source_memcpy,
            "map_pages": plan.map_pages,
            "no_vmm": plan.no_vmm,
        },
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
        "map_unmap": map_json,
        "host_fill": {
            "threads": fill.threads,
            "part_bytes": fill.part_bytes,
            "ring_bytes": fill.ring_bytes,
            "bytes_per_sample": fill.bytes,
            "thread_start_join_us": fill.spawn_us,
            "thread_start_join_us_median": best_median(&fill.spawn_us).1,
            "rows": fill.rows.iter().map(|r| {
                let (best, median) = r.gbps(fill.bytes);
                serde_json::json!({
                    "method": r.method(),
                    "seconds": r.secs,
                    "best_gbps": best,
                    "median_gbps": median,
                })
            }).collect::<Vec<_>>(),
        },
        "all_targets_met": rows.iter().all(|r| verdict(rows, r) != "FAIL"),
        "elapsed_s": elapsed,
    })
}

// ---------------------------------------------------------------------------
// GPU

#[cfg(feature = "cuda")]
mod gpu {
    use offload_runtime::device::cuda::{probe, CudaConfig, CudaDevice};

    /// Opens the GPU `device::auto` picked: the one `probe` finds; without
    /// the virtual memory API when `no_vmm`.
    pub(super) fn open(no_vmm: bool) -> Result<CudaDevice, String> {
        let p = probe().map_err(|e| e.to_string())?;
        let config = CudaConfig {
            use_vmm: !no_vmm,
            ..CudaConfig::from_env().map_err(|e| e.to_string())?
        };
        CudaDevice::with_config(p.ordinal, &config)
            .map_err(|e| format!("a GPU answered but did not open: {e}"))
    }
}
