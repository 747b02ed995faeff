//! `offload bench e2e`: one generation per offload mode on a synthetic (or
//! the user's) model, with real compute per layer, and the table users know
//! from the SD.Next offload documentation.
//!
//! A generation runs the text encoders once, the denoiser `--steps` times
//! (one pass per step) and the VAE once. Every layer multiplies each of its
//! 2-D and 4-D weights with an activation batch of `--tokens` rows on the
//! engine's compute stream (`Kernel::Matmul`), so `--tokens` sets compute per
//! byte moved. it/s is denoiser steps per second over the whole generation.
//!
//! After each offload mode's plain row come its LoRA rows, one per LoRA mode
//! (`--lora-modes`): a fresh runtime in that mode loads the model, applies
//! the LoRA set with `Runtime::set_loras` (timed), and runs a generation of
//! `--lora-steps` denoiser steps. The LoRA set is `--lora FILE:MULT`, or by
//! default two synthetic LoRAs over the model's denoiser (kohya rank 32
//! × 0.8 and peft rank 64 × 0.6, f16; `--lora-ranks`). The overhead columns
//! compare pass times with the plain row of the same offload mode: first
//! pass = (set_loras + first pass) − first plain pass; later passes = mean
//! later pass − mean of the plain row's same passes (its passes 2 to n for
//! a LoRA row of n steps, so that both means cover the same stretch of a
//! generation; noise can make it negative). In the
//! unfused mode the engine adds the low-rank path itself, as an engine
//! would: two more products per adapter (see `Bench::run_component`).
//! Every LoRA row reads patched weights back from the device and compares
//! them with a merge computed here on the host from the file bytes; a
//! mismatch fails the benchmark (after the table is printed).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use offload_kernels::{Adapter, Delta, Factor, KronFactor, MergeSpec};
use offload_loader::lora::{LoraFile, ResolveOptions};
use offload_loader::synth::{
    lora_specs, preset_specs, write_deterministic, write_lora, LoraConvention, LoraOptions, Preset,
    PresetOptions, TensorSpec,
};
use offload_loader::{Dtype, Model};
use offload_runtime::arena::{pack, Arena, ArenaConfig, Tag};
use offload_runtime::device::{
    self, BackendKind, Device, DeviceExt, DevicePtr, HostConfig, HostDevice, Kernel, KernelFamily,
    MergeDelta, StreamId, StreamPriority,
};
use offload_runtime::lora::{LoraBinding, LoraMode, PatchDelta, PatchKron};
use offload_runtime::model::{DType, ModelDesc, WeightSource};
use offload_runtime::residency::{
    HostPolicy, LayerId, Mode, ModelId, Policy, Runtime, RuntimeConfig, StallCheckpoint,
    TimelineEntry,
};
use offload_runtime::Error;

use offload_bench::source::{describe, lora_binding, roles, ModelSource};

/// `offload bench e2e --backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The GPU when one answers, else the host backend.
    Auto,
    /// The host backend, even where a GPU answers.
    Host,
    /// The GPU; an error without one.
    Cuda,
}

/// `offload bench e2e --compute-priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    /// The device's greatest stream priority.
    High,
    /// The default priority, that of the runtime's own streams.
    Normal,
}

impl From<PriorityArg> for StreamPriority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::High => StreamPriority::High,
            PriorityArg::Normal => StreamPriority::Normal,
        }
    }
}

/// `offload bench e2e --activations`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActivationsArg {
    /// Activations of each weight's own type (f16 with an f16 weight), as
    /// an engine running the model in that type keeps them: one launch a
    /// product on CUDA.
    Weights,
    /// f32 activations, rounded to a 16-bit weight's type by the device
    /// before each product (on CUDA a second launch a product).
    F32,
}

/// `offload bench e2e --source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceArg {
    /// Read from the checkpoint file with positional reads on every upload
    /// (staged) or at load (pinned).
    File,
    /// Read the whole checkpoint into memory first, as an engine that keeps
    /// its weights in host RAM, and offer it to the runtime, which fills
    /// its host buffers from it with streaming stores.
    Memory,
}

/// `offload bench e2e --uploads`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UploadsArg {
    /// The runtime's default (`RuntimeConfig::upload_thread` unset).
    Auto,
    /// The runtime's uploader thread.
    Thread,
    /// The thread that acquires the layers.
    Inline,
}

impl UploadsArg {
    /// The `RuntimeConfig::upload_thread` this stands for.
    pub fn upload_thread(self) -> Option<bool> {
        match self {
            UploadsArg::Auto => None,
            UploadsArg::Thread => Some(true),
            UploadsArg::Inline => Some(false),
        }
    }
}

/// Arguments of `offload bench e2e` (and of the main job).
#[derive(Args, Debug, Clone)]
pub struct E2eArgs {
    /// Synthetic model preset: sd15, sdxl or flux.
    #[arg(long, default_value = "sdxl")]
    pub preset: String,
    /// Width divisor of the synthetic model (1 is full size).
    #[arg(long, default_value_t = 4)]
    pub scale: u64,
    /// Rows of the activation batch each weight is multiplied with (compute per byte).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Denoiser steps per generation.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Device memory the offload modes get: a fraction of the model's bytes
    /// (a number below 16, e.g. 0.5) or a size (e.g. 1.5GiB, 800MiB, 123456789).
    #[arg(long, default_value = "0.5")]
    pub device_mem: String,
    /// High watermark: a fraction of the device memory (e.g. 0.7) or a size.
    #[arg(long)]
    pub high: Option<String>,
    /// Low watermark: a fraction of the device memory (e.g. 0.2) or a size.
    #[arg(long)]
    pub low: Option<String>,
    /// Run only this mode (none, model, balanced, sequential) beside the none reference.
    #[arg(long)]
    pub mode: Option<String>,
    /// Eviction policy for --mode: planned or lru (default planned).
    #[arg(long)]
    pub policy: Option<String>,
    /// Shorthand for --mode sequential.
    #[arg(long)]
    pub lowvram: bool,
    /// Host memory policy: pinned, or staged (a reader thread per CPU, at
    /// most 8, and twice as many 64 MiB staging buffers, at least 4).
    #[arg(long, default_value = "pinned")]
    pub host_policy: String,
    /// With --host-policy staged: staging buffers in write-combined pinned
    /// memory (cuMemHostAlloc with CU_MEMHOSTALLOC_WRITECOMBINED on CUDA;
    /// the host backend has none and gives plain pinned memory).
    #[arg(long)]
    pub staging_write_combined: bool,
    /// Layers uploaded ahead of the one in use.
    #[arg(long, default_value_t = 2)]
    pub prefetch_depth: usize,
    /// Benchmark this checkpoint file or folder instead of a synthetic model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Write one JSON object per row to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a per-layer copy/compute timeline (SVG) of the last mode run.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// Host backend only: throttle host-to-device copies to this many GB/s (emulates a bus).
    #[arg(long)]
    pub link_gbps: Option<f64>,
    /// Where to run: `auto` (the GPU when one answers, else the host
    /// backend), `host` (the host backend even where a GPU answers) or
    /// `cuda` (the GPU, an error without one).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub backend: DeviceArg,
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A LoRA for the LoRA rows, as FILE:MULTIPLIER (repeatable; without
    /// `:MULTIPLIER` the multiplier is 1). Without any, the rows apply the
    /// synthetic default set (see --lora-ranks).
    #[arg(long = "lora", value_name = "FILE:MULT")]
    pub lora: Vec<String>,
    /// LoRA modes of the rows after each offload mode's plain row,
    /// comma-separated: none, fuse-on-upload, backup, fuse, unfused. The
    /// plain (none) row always runs: it is the baseline of the overhead columns.
    #[arg(long, default_value = "none,fuse-on-upload,backup,fuse,unfused")]
    pub lora_modes: String,
    /// Only the plain rows, no LoRA rows.
    #[arg(long)]
    pub no_lora: bool,
    /// Ranks of the synthetic default LoRAs (written next to the synthetic
    /// model, f16): kohya × 0.8 and peft × 0.6, alternating.
    #[arg(long, default_value = "32,64")]
    pub lora_ranks: String,
    /// Denoiser steps of the LoRA rows (at most --steps): fewer than the
    /// plain rows keep the main job short; the overhead columns are per pass.
    #[arg(long, default_value_t = 5)]
    pub lora_steps: usize,
    /// Who queues the pinned policy's uploads (copies and fuse-on-upload
    /// merges): `thread` (the runtime's uploader thread), `inline` (the
    /// thread that acquires the layers, the engine's) or `auto` (the
    /// runtime's default: the uploader on a GPU, inline on the host backend).
    #[arg(long, value_enum, default_value_t = UploadsArg::Auto)]
    pub uploads: UploadsArg,
    /// Priority of the engine's compute stream: `high`, as an engine should
    /// make it, so that when the layers' products and the runtime's merges
    /// (queued ahead of use on its normal-priority merge stream) both have
    /// blocks waiting for SMs, the products' start first (merge blocks
    /// already running finish); `normal` to compare. The host backend runs
    /// every stream alike.
    #[arg(long, value_enum, default_value_t = PriorityArg::High)]
    pub compute_priority: PriorityArg,
    /// Where the runtime reads the weights from: `file` (positional reads
    /// of the checkpoint) or `memory` (the checkpoint read into memory
    /// first and offered to the runtime; its bytes are the engine's and not
    /// in the peak host column).
    #[arg(long, value_enum, default_value_t = SourceArg::File)]
    pub source: SourceArg,
    /// Do not time the compute stream's waits for weights
    /// (`RuntimeConfig::measure_stall` off): an acquire that waits then
    /// queues its wait without the two timing events around it, and
    /// without the query that spares a wait for a completed upload (a copy
    /// an earlier acquire saw ready is neither queried nor waited for,
    /// either way); the stall column reads 0. To measure what the timing
    /// costs the engine's thread.
    #[arg(long)]
    pub no_stall_timing: bool,
    /// Run the none row and the plain offload rows this many times, in
    /// turn (none, then each offload row, then again), and print each
    /// plain row's pass against its bound per round and their median: a
    /// pass bound by the CPU's queueing drifts with the machine's state
    /// over seconds, which one pair of rows cannot tell from the runtime's
    /// cost. The table and the JSON rows are the first round's; the JSON
    /// adds `pass_over_bound_rounds` to each plain offload row.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Type of the activations the layer products take: `weights` (each
    /// weight's own: f16 with f16 weights, as an engine running in f16) or
    /// `f32` (rounded to the weight's type by the device before every
    /// product: on CUDA one more kernel launch a product for the engine's
    /// thread to queue).
    #[arg(long, value_enum, default_value_t = ActivationsArg::Weights)]
    pub activations: ActivationsArg,
}

impl Default for E2eArgs {
    fn default() -> Self {
        E2eArgs {
            preset: "sdxl".into(),
            scale: 4,
            tokens: 16,
            steps: 20,
            device_mem: "0.5".into(),
            high: None,
            low: None,
            mode: None,
            policy: None,
            lowvram: false,
            host_policy: "pinned".into(),
            staging_write_combined: false,
            prefetch_depth: 2,
            model: None,
            json: None,
            timeline: None,
            link_gbps: None,
            backend: DeviceArg::Auto,
            seed: 0,
            lora: Vec::new(),
            lora_modes: "none,fuse-on-upload,backup,fuse,unfused".into(),
            no_lora: false,
            lora_ranks: "32,64".into(),
            lora_steps: 5,
            uploads: UploadsArg::Auto,
            compute_priority: PriorityArg::High,
            source: SourceArg::File,
            no_stall_timing: false,
            rounds: 1,
            activations: ActivationsArg::Weights,
        }
    }
}

/// A size given as a fraction of `whole` or as bytes with an optional unit.
pub fn parse_size(s: &str, whole: usize) -> Result<usize, String> {
    let t = s.trim();
    let units: [(&str, f64); 8] = [
        ("GiB", (1u64 << 30) as f64),
        ("MiB", (1u64 << 20) as f64),
        ("KiB", 1024.0),
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("G", (1u64 << 30) as f64),
        ("M", (1u64 << 20) as f64),
    ];
    for (u, mult) in units {
        if let Some(num) = t.strip_suffix(u) {
            let v: f64 = num
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a size"))?;
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("`{s}` must be positive"));
            }
            return Ok((v * mult) as usize);
        }
    }
    let v: f64 = t
        .parse()
        .map_err(|_| format!("`{s}` is neither a fraction nor a size"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}` must be positive"));
    }
    Ok(if v < 16.0 {
        (v * whole as f64) as usize
    } else {
        v as usize
    })
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    mode: Mode,
    policy: Policy,
    /// The LoRA mode of the row; `None`: the plain row (no LoRA).
    lora: Option<LoraMode>,
    reference: bool,
    outcome: Result<Measured, String>,
    device_mem: usize,
    high: usize,
    /// Denoiser steps of the row's generation.
    steps: usize,
    /// What the device counted of its work during the row
    /// ([`Device::launch_counts`], the row's share; empty on the host backend).
    device_counts: Vec<(&'static str, u64)>,
}

/// What one generation measured.
#[derive(Clone, Debug)]
struct Measured {
    it_per_s: f64,
    generation_s: f64,
    first_pass: u64,
    per_pass: u64,
    per_generation: u64,
    peak_device: usize,
    peak_host: usize,
    page_waste: usize,
    stall_fraction: f64,
    compute_s_per_pass: f64,
    /// Wall time of a denoiser pass on the compute stream.
    pass_s: f64,
    rss: usize,
    /// Wall time of each denoiser pass on the compute stream.
    passes: Vec<f64>,
    /// Per pass, the engine thread's time queueing it (wall) and the CPU
    /// time it ran meanwhile (empty where the thread's CPU time cannot be
    /// read): what bounds a pass whose kernels are short.
    engine_queue: Vec<f64>,
    engine_cpu: Vec<f64>,
    /// Per pass, the engine thread's wall time inside the runtime's calls:
    /// `Runtime::acquire`, and dropping the guards it gave (the release).
    engine_acquire: Vec<f64>,
    engine_release: Vec<f64>,
    /// The generation's time outside the denoiser passes (text encoders, VAE).
    other_s: f64,
    /// Merges the runtime queued: in the first pass, and per later pass (mean).
    merges_first: u64,
    merges_per_pass: f64,
    /// Weight bytes those merges read and wrote, per later pass (mean).
    merged_bytes_per_pass: f64,
    /// Flops of the unfused low-rank path the engine queued, per later pass (mean).
    lora_path_flops_per_pass: f64,
    /// What the LoRA rows add.
    lora: Option<LoraMeasured>,
}

/// What a LoRA row measured besides the generation.
#[derive(Clone, Debug)]
struct LoraMeasured {
    /// Wall time of `set_loras`.
    set_s: f64,
    /// Tensors `set_loras` changed and re-derived on the device.
    tensors_changed: usize,
    tensors_rederived: usize,
    /// Bytes of LoRA factors on the device.
    factor_device_bytes: usize,
    /// The read-back check: what was checked, or what differed.
    check: Result<String, String>,
}

impl Measured {
    /// Mean of the passes after the first (the first when there is only one).
    fn later_pass_s(&self) -> Option<f64> {
        later_mean(&self.passes, self.passes.len())
    }

    /// A steady pass for the overlap ratio: [`Self::later_pass_s`], or the
    /// generation's mean when no pass was timed. The first pass of a row
    /// pays for warm-ups (on the H200 the none row's first pass took 19.5
    /// ms against a later mean of 10.0), which a mean over every pass
    /// spreads unevenly over the rows it compares.
    fn steady_pass_s(&self) -> f64 {
        self.later_pass_s().unwrap_or(self.pass_s)
    }

    /// it/s of the same generation cut to its first `steps` passes.
    fn it_per_s_at(&self, steps: usize) -> f64 {
        if steps >= self.passes.len() || steps == 0 {
            return self.it_per_s;
        }
        steps as f64 / (self.other_s + self.passes[..steps].iter().sum::<f64>()).max(1e-9)
    }
}

/// What one denoiser pass queued.
struct PassCount {
    /// Bytes uploaded.
    bytes: u64,
    /// LoRA merges, and the weight bytes they read and wrote.
    merges: u64,
    merged_bytes: u64,
    /// Flops of the unfused low-rank path.
    lora_flops: u64,
}

/// (component, layer, tensor) of a model tensor.
type TensorKey = (usize, usize, usize);

/// The adapters of one merge: its row slice and its adapters as (binding, patch).
type Group = (Option<Range<usize>>, Vec<(usize, usize)>);

/// The LoRA set the LoRA rows apply, and what the benchmark knows about it.
struct LoraSet {
    bindings: Vec<LoraBinding>,
    /// One line per LoRA for the header.
    descriptions: Vec<String>,
    /// Bytes of the LoRA files.
    file_bytes: u64,
    /// Bytes of the factors the model uses (what the runtime reads).
    factor_bytes: usize,
    /// Per LoRA: bytes of its factors packed as the runtime packs them on the device.
    packed: Vec<usize>,
    /// Largest rank and largest `up` row count of a low-rank adapter (unfused scratch).
    max_rank: usize,
    max_rows: usize,
    /// Per patched tensor: its adapters as (binding, patch), in the runtime's order.
    patched: BTreeMap<TensorKey, Vec<(usize, usize)>>,
    /// Multiply-adds of merging every patched tensor once, and the weight bytes it touches.
    macs: u64,
    touched_bytes: u64,
    /// Tensors read back after the passes.
    checks: Vec<TensorKey>,
    /// The LoRA modes of the rows.
    modes: Vec<LoraMode>,
    /// Denoiser steps of a LoRA row.
    steps: usize,
}

impl LoraSet {
    /// The adapters of a tensor grouped as the runtime groups them into
    /// merges: one group per distinct row slice, in first-use order.
    fn groups(&self, key: TensorKey) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for &(bi, pi) in self.patched.get(&key).map_or(&[][..], |v| v) {
            let rows = self.bindings[bi].desc.patches[pi].rows.clone();
            match groups.iter_mut().find(|g| g.0 == rows) {
                Some(g) => g.1.push((bi, pi)),
                None => groups.push((rows, vec![(bi, pi)])),
            }
        }
        groups
    }

    /// The kernels' view of a group's adapters, each factor's bytes from `data(binding, factor)`.
    fn adapters<'a>(
        &'a self,
        group: &[(usize, usize)],
        data: &mut dyn FnMut(usize, usize) -> &'a [u8],
    ) -> Vec<Adapter<'a>> {
        group
            .iter()
            .map(|&(bi, pi)| {
                let b = &self.bindings[bi];
                let p = &b.desc.patches[pi];
                let mut f = |i: usize| -> Factor<'a> {
                    let fd = &b.desc.factors[i];
                    let (rows, cols) = fd.matrix().unwrap_or((0, 0));
                    let dtype = fd.dtype.kernel().unwrap_or(offload_kernels::Dtype::F32);
                    Factor::new(data(bi, i), dtype, rows, cols)
                };
                let kron = |k: PatchKron, f: &mut dyn FnMut(usize) -> Factor<'a>| match k {
                    PatchKron::Full(m) => KronFactor::Full(f(m)),
                    PatchKron::LowRank { a, b } => KronFactor::LowRank { a: f(a), b: f(b) },
                };
                let delta = match p.delta {
                    PatchDelta::LowRank { up, down } => Delta::LowRank {
                        up: f(up),
                        down: f(down),
                    },
                    PatchDelta::LoHa { w1a, w1b, w2a, w2b } => Delta::LoHa {
                        w1a: f(w1a),
                        w1b: f(w1b),
                        w2a: f(w2a),
                        w2b: f(w2b),
                    },
                    PatchDelta::LoKr { w1, w2 } => Delta::LoKr {
                        w1: kron(w1, &mut f),
                        w2: kron(w2, &mut f),
                    },
                };
                Adapter {
                    // As the runtime scales it: the file's scale × the multiplier, in f32.
                    scale: p.scale * b.multiplier,
                    delta,
                }
            })
            .collect()
    }

    /// Multiply-adds per weight byte merged: what turns the runtime's
    /// `merged_bytes` counter into flops. Exact when every patched tensor
    /// has the same total rank per element (the default set: both LoRAs
    /// adapt the same modules); otherwise a bytes-weighted mean.
    fn macs_per_byte(&self) -> f64 {
        if self.touched_bytes == 0 {
            0.0
        } else {
            self.macs as f64 / self.touched_bytes as f64
        }
    }
}

struct Bench {
    dev: Arc<dyn Device>,
    compute: StreamId,
    scratch: Arena<dyn Device>,
    x: DevicePtr,
    /// X rounded to f16 and to bf16 (`--activations weights`).
    x_f16: DevicePtr,
    x_bf16: DevicePtr,
    y: DevicePtr,
    compute_ok: bool,
    desc: ModelDesc,
    source: Arc<ModelSource>,
    te: Vec<usize>,
    denoiser: Vec<usize>,
    vae: Vec<usize>,
    args: E2eArgs,
    bar: ProgressBar,
    /// The LoRA set of the LoRA rows (`None` with `--no-lora`).
    lora: Option<LoraSet>,
    /// Unfused mode: scratch for `x · downᵀ` (`[tokens, max rank]`) and for
    /// its product with `upᵀ` (`[tokens, max up rows]`).
    lora_scratch: Option<(DevicePtr, DevicePtr)>,
    /// Columns of X (the largest k of a weight).
    max_k: usize,
    /// Flops of the unfused low-rank path queued so far.
    lora_flops: AtomicU64,
    /// Nanoseconds the engine thread has spent so far in `Runtime::acquire`
    /// and in dropping the guards (wall time of each call).
    acquire_ns: AtomicU64,
    release_ns: AtomicU64,
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds the calling thread has run (`CLOCK_THREAD_CPUTIME_ID`,
/// which counts up to the moment of the call).
fn thread_cpu_s() -> Option<f64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
}

/// The (n, k) of a weight that gets a matrix product, if any.
fn matmul_dims(shape: &[usize], dtype: DType) -> Option<(usize, usize, offload_kernels::Dtype)> {
    let d = dtype.kernel()?;
    let (n, k) = offload_kernels::weight_matrix_dims(shape).ok()?;
    (n > 0 && k > 0).then_some((n, k, d))
}

/// Element `i` of little-endian `dtype` bytes, as f32.
fn element(bytes: &[u8], dtype: offload_kernels::Dtype, i: usize) -> f32 {
    match dtype {
        offload_kernels::Dtype::F32 => {
            f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]))
        }
        offload_kernels::Dtype::F16 => {
            half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
        offload_kernels::Dtype::BF16 => {
            half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
        }
    }
}

/// Whether a device value and the host's differ by more than the backends
/// may: nothing on the host backend (the same CPU kernel), one unit in the
/// last place of a 16-bit weight elsewhere (an fp32 sum in another order
/// may round the other way).
fn differs(got: f32, want: f32, dtype: offload_kernels::Dtype, exact: bool) -> bool {
    if got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()) {
        return false;
    }
    if exact || !(got.is_finite() && want.is_finite()) {
        return true;
    }
    let ulp = match dtype {
        offload_kernels::Dtype::F16 => {
            let h = half::f16::from_f32(want.abs());
            half::f16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()
        }
        offload_kernels::Dtype::BF16 => {
            let h = half::bf16::from_f32(want.abs());
            half::bf16::from_bits(h.to_bits() + 1).to_f32() - h.to_f32()
        }
        offload_kernels::Dtype::F32 => 1e-5 * (1.0 + want.abs()),
    };
    let d = (got - want).abs();
    d.is_nan() || d > ulp
}

impl Bench {
    /// The activations of a product with a weight of `w_dtype`, and their
    /// type: of the weight's own 16-bit type with `--activations weights`,
    /// else f32.
    fn activations(&self, w_dtype: offload_kernels::Dtype) -> (DevicePtr, offload_kernels::Dtype) {
        use offload_kernels::Dtype;
        match (self.args.activations, w_dtype) {
            (ActivationsArg::Weights, Dtype::F16) => (self.x_f16, Dtype::F16),
            (ActivationsArg::Weights, Dtype::BF16) => (self.x_bf16, Dtype::BF16),
            _ => (self.x, Dtype::F32),
        }
    }

    /// Run `component` once: acquire each layer, queue its products, drop the guard.
    ///
    /// In the unfused LoRA mode the guard hands out each patched tensor's
    /// adapters, and the engine computes their low-rank path beside the
    /// weight's product: per adapter `t = x · downᵀ` (`[tokens, rank]`),
    /// then `t · upᵀ` (`[tokens, n]`). The scaled add of that into the
    /// weight's output is left out: it is `tokens · n` multiply-adds, noise
    /// beside the two products, and the timing does not need its result
    /// (the outputs go to scratch buffers).
    fn run_component(
        &self,
        rt: &Runtime,
        m: ModelId,
        c: usize,
        compute_log: Option<&Arc<Mutex<Vec<TimelineEntry>>>>,
        epoch: Instant,
    ) -> Result<(), Error> {
        let comp = &self.desc.components[c];
        for (l, layer) in comp.layers.iter().enumerate() {
            let t = Instant::now();
            let g = rt.acquire(LayerId {
                model: m,
                component: c,
                layer: l,
            })?;
            self.acquire_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let start: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
            if let Some(log) = compute_log {
                // Device memory in use for weights as of this acquire, drawn at
                // the time the compute stream reaches the layer.
                let bytes = rt.arena().pages_used() * rt.arena().page_size();
                let (s2, log) = (start.clone(), log.clone());
                self.dev.launch_host_fn(
                    self.compute,
                    Box::new(move || {
                        let now = Instant::now();
                        *s2.lock().unwrap() = Some(now);
                        let t = now.saturating_duration_since(epoch).as_secs_f64();
                        log.lock().unwrap().push(TimelineEntry {
                            layer: "device memory".into(),
                            kind: "mem",
                            start_s: t,
                            end_s: t,
                            bytes,
                        });
                    }),
                )?;
            }
            if self.compute_ok {
                // The layer's products, handed to the device at once (on
                // CUDA with OFFLOAD_GRAPHS=on: one graph a layer).
                let mut products = Vec::with_capacity(g.len());
                for i in 0..g.len() {
                    let Some(t) = g.tensor(i) else { continue };
                    if let Some((n, k, w_dtype)) = matmul_dims(t.shape, t.dtype) {
                        let (x, x_dtype) = self.activations(w_dtype);
                        products.push(Kernel::Matmul {
                            x,
                            x_dtype,
                            tokens: self.args.tokens,
                            w: t.ptr,
                            w_dtype,
                            n,
                            k,
                            y: self.y,
                        });
                    }
                    self.low_rank_path(&g, i, &mut products)?;
                }
                self.dev.launch_all(&products, self.compute)?;
            }
            if let Some(log) = compute_log {
                let (log, name) = (log.clone(), format!("{}/{}", comp.name, layer.name));
                self.dev.launch_host_fn(
                    self.compute,
                    Box::new(move || {
                        let end = Instant::now();
                        if let Some(t0) = *start.lock().unwrap() {
                            log.lock().unwrap().push(TimelineEntry {
                                layer: name,
                                kind: "compute",
                                start_s: t0.saturating_duration_since(epoch).as_secs_f64(),
                                end_s: end.saturating_duration_since(epoch).as_secs_f64(),
                                bytes: 0,
                            });
                        }
                    }),
                )?;
            }
            let t = Instant::now();
            drop(g);
            self.release_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The unfused mode's low-rank path of tensor `i`, added to `products`
    /// (nothing in the other modes).
    fn low_rank_path(
        &self,
        g: &offload_runtime::residency::LayerGuard,
        i: usize,
        products: &mut Vec<Kernel>,
    ) -> Result<(), Error> {
        let Some((t, out)) = self.lora_scratch else {
            return Ok(());
        };
        let set = self.lora.as_ref();
        let (max_rank, max_rows) = set.map_or((0, 0), |s| (s.max_rank, s.max_rows));
        let tokens = self.args.tokens;
        for op in g.lora(i) {
            for a in &op.adapters {
                let MergeDelta::LowRank { up, down } = &a.delta else {
                    continue;
                };
                // down: [rank, k], up: [n, rank] (n: the row slice's length).
                if down.rows > max_rank || down.cols > self.max_k || up.rows > max_rows {
                    return Err(Error::Config(format!(
                        "an unfused adapter of {} × {} / {} × {} is larger than the scratch the benchmark sized",
                        up.rows, up.cols, down.rows, down.cols
                    )));
                }
                let (x, x_dtype) = self.activations(down.dtype);
                products.push(Kernel::Matmul {
                    x,
                    x_dtype,
                    tokens,
                    w: down.ptr,
                    w_dtype: down.dtype,
                    n: down.rows,
                    k: down.cols,
                    y: t,
                });
                products.push(Kernel::Matmul {
                    x: t,
                    x_dtype: offload_kernels::Dtype::F32,
                    tokens,
                    w: up.ptr,
                    w_dtype: up.dtype,
                    n: up.rows,
                    k: up.cols,
                    y: out,
                });
                let flops = offload_kernels::matmul_flops(tokens, down.rows, down.cols)
                    + offload_kernels::matmul_flops(tokens, up.rows, up.cols);
                self.lora_flops.fetch_add(flops, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        mode: Mode,
        policy: Policy,
        device_mem: usize,
        reference: bool,
        timeline: bool,
        lora: Option<LoraMode>,
    ) -> Row {
        let info_total = self.dev.info().total_memory;
        let cfg = RuntimeConfig {
            mode: Some(mode),
            policy,
            prefetch_depth: self.args.prefetch_depth,
            device_memory: Some(device_mem),
            high_watermark: None,
            low_watermark: None,
            host_policy: host_policy(&self.args),
            timeline,
            lora_mode: lora.unwrap_or_default(),
            upload_thread: self.args.uploads.upload_thread(),
            measure_stall: !self.args.no_stall_timing,
            ..RuntimeConfig::default()
        };
        let mut cfg = cfg;
        let resolved = cfg.resolve(info_total);
        if let Some(h) = &self.args.high {
            cfg.high_watermark = parse_size(h, resolved.device_memory).ok();
        }
        if let Some(l) = &self.args.low {
            cfg.low_watermark = parse_size(l, resolved.device_memory).ok();
        }
        // (Both were validated in `run`; a bad value never gets here.)
        let high = cfg.resolve(info_total).high;
        let steps = match (lora, &self.lora) {
            (Some(_), Some(set)) => set.steps,
            _ => self.args.steps,
        };
        let counts_before = self.dev.launch_counts();
        let outcome = self
            .generation(cfg, timeline, lora, steps)
            .map_err(|e| match e {
                Error::DoesNotFit {
                    needed, available, ..
                } => format!(
                    "does not fit: needs {:.1} MiB, has {:.1} MiB",
                    mib(needed as f64),
                    mib(available as f64)
                ),
                Error::BudgetTooSmall {
                    budget,
                    largest_layer,
                } => format!(
                    "does not fit: a {:.1} MiB layer, a {:.1} MiB budget (high watermark)",
                    mib(largest_layer as f64),
                    mib(budget as f64)
                ),
                other => other.to_string(),
            });
        Row {
            mode,
            policy,
            lora,
            reference,
            outcome,
            device_mem,
            high,
            steps,
            device_counts: counts_since(&counts_before, self.dev.launch_counts()),
        }
    }

    fn generation(
        &self,
        cfg: RuntimeConfig,
        timeline: bool,
        lora: Option<LoraMode>,
        steps: usize,
    ) -> Result<Measured, Error> {
        let rt = Runtime::new(self.dev.clone(), self.compute, cfg)?;
        let m = rt.load(self.desc.clone(), self.source.clone())?;
        rt.synchronize()?;
        self.dev.stream_synchronize(self.compute)?;
        // Peaks from here: they include what applying the LoRA set holds.
        rt.reset_peaks();
        let mut lora_done = None;
        if let (Some(_), Some(set)) = (lora, &self.lora) {
            let t = Instant::now();
            let report = rt.set_loras(m, &set.bindings)?;
            lora_done = Some((t.elapsed().as_secs_f64(), report));
        }
        let epoch = rt.epoch();
        let compute_log = timeline.then(|| Arc::new(Mutex::new(Vec::new())));
        // Pass boundaries in compute-stream order: the time (set by a host
        // function, one a pass) and the stall queued before it (read after the end).
        let passes: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
        let mut stall_marks: Vec<StallCheckpoint> = Vec::with_capacity(steps + 1);
        let mut mark = |p: &Arc<Mutex<Vec<Instant>>>| -> Result<(), Error> {
            let p = p.clone();
            stall_marks.push(rt.stall_checkpoint());
            self.dev.launch_host_fn(
                self.compute,
                Box::new(move || p.lock().unwrap().push(Instant::now())),
            )
        };
        let s0 = rt.stats();
        let t0 = Instant::now();
        for &c in &self.te {
            self.run_component(&rt, m, c, compute_log.as_ref(), epoch)?;
        }
        // Per pass, as queued: bytes uploaded, merges and merged bytes, low-rank flops.
        let mut pass_counts: Vec<PassCount> = Vec::with_capacity(steps);
        let (mut engine_queue, mut engine_cpu) = (Vec::new(), Vec::new());
        let (mut engine_acquire, mut engine_release) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let before = rt.stats();
            let f0 = self.lora_flops.load(Ordering::Relaxed);
            let (a0, r0) = (
                self.acquire_ns.load(Ordering::Relaxed),
                self.release_ns.load(Ordering::Relaxed),
            );
            let (q0, c0) = (Instant::now(), thread_cpu_s());
            mark(&passes)?;
            for &c in &self.denoiser {
                self.run_component(&rt, m, c, compute_log.as_ref(), epoch)?;
            }
            // The CPU interval inside the wall one: CPU <= wall.
            let c1 = thread_cpu_s();
            engine_queue.push(q0.elapsed().as_secs_f64());
            if let (Some(c0), Some(c1)) = (c0, c1) {
                engine_cpu.push(c1 - c0);
            }
            engine_acquire.push((self.acquire_ns.load(Ordering::Relaxed) - a0) as f64 * 1e-9);
            engine_release.push((self.release_ns.load(Ordering::Relaxed) - r0) as f64 * 1e-9);
            let after = rt.stats();
            pass_counts.push(PassCount {
                bytes: after.bytes_h2d - before.bytes_h2d,
                merges: after.merges - before.merges,
                merged_bytes: after.merged_bytes - before.merged_bytes,
                lora_flops: self.lora_flops.load(Ordering::Relaxed) - f0,
            });
            self.bar.inc(1);
        }
        mark(&passes)?;
        // Page-tail waste of what the denoiser keeps resident, before the VAE may offload it.
        let denoiser_waste = rt.stats().page_waste_bytes;
        for &c in &self.vae {
            self.run_component(&rt, m, c, compute_log.as_ref(), epoch)?;
        }
        self.dev.stream_synchronize(self.compute)?;
        rt.synchronize()?;
        let generation_s = t0.elapsed().as_secs_f64();
        let st = rt.stats().since(&s0);
        if st.stall_unmeasured > 0 {
            self.bar.println(format!(
                "warning: the device could not time {} of the waits for weights; the stall column leaves them out",
                st.stall_unmeasured
            ));
        }
        let marks = passes.lock().unwrap().clone();
        // The streams are synchronised and `stats` above read every wait.
        let stall_at = |c: Option<&StallCheckpoint>| {
            c.map_or(0, |c| {
                c.ns()
                    .expect("a stall checkpoint is known once the streams are synchronised")
            })
        };
        let stall_in_denoiser =
            stall_at(stall_marks.last()).saturating_sub(stall_at(stall_marks.first()));
        let denoise_s = match (marks.first(), marks.last()) {
            (Some(a), Some(b)) => b.saturating_duration_since(*a).as_secs_f64(),
            _ => 0.0,
        };
        let pass_times: Vec<f64> = marks
            .windows(2)
            .map(|w| w[1].saturating_duration_since(w[0]).as_secs_f64())
            .collect();
        let n_steps = steps.max(1) as f64;
        // Later passes: the mean after the first (the first alone if there is one).
        let later = |f: fn(&PassCount) -> u64| -> f64 {
            let rest = if pass_counts.len() > 1 {
                &pass_counts[1..]
            } else {
                &pass_counts[..]
            };
            if rest.is_empty() {
                0.0
            } else {
                rest.iter().map(f).sum::<u64>() as f64 / rest.len() as f64
            }
        };
        let per_pass = later(|c| c.bytes) as u64;
        if let (Some(path), Some(log)) = (&self.args.timeline, &compute_log) {
            let mut entries = rt.take_timeline();
            entries.extend(log.lock().unwrap().drain(..));
            let r = rt.resolved();
            write_timeline(
                path,
                &entries,
                &[
                    ("device memory", r.device_memory),
                    ("high", r.high),
                    ("low", r.low),
                ],
            )
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        }
        let lora_measured = match (lora, &self.lora, lora_done) {
            (Some(mode), Some(set), Some((set_s, report))) => Some(LoraMeasured {
                set_s,
                tensors_changed: report.tensors_changed,
                tensors_rederived: report.tensors_rederived,
                factor_device_bytes: report.factor_bytes,
                check: self.check_lora(&rt, m, mode, set),
            }),
            _ => None,
        };
        Ok(Measured {
            it_per_s: steps as f64 / generation_s,
            generation_s,
            first_pass: pass_counts.first().map_or(0, |c| c.bytes),
            per_pass,
            per_generation: st.bytes_h2d,
            peak_device: st.peak_device_bytes,
            peak_host: st.peak_host_bytes,
            page_waste: denoiser_waste,
            stall_fraction: st.stall_ns as f64 * 1e-9 / generation_s,
            compute_s_per_pass: ((denoise_s - stall_in_denoiser as f64 * 1e-9) / n_steps).max(0.0),
            pass_s: denoise_s / n_steps,
            rss: rss_bytes(),
            other_s: (generation_s - denoise_s).max(0.0),
            passes: pass_times,
            engine_cpu: if engine_cpu.len() == engine_queue.len() {
                engine_cpu
            } else {
                Vec::new()
            },
            engine_queue,
            engine_acquire,
            engine_release,
            merges_first: pass_counts.first().map_or(0, |c| c.merges),
            merges_per_pass: later(|c| c.merges),
            merged_bytes_per_pass: later(|c| c.merged_bytes),
            lora_path_flops_per_pass: later(|c| c.lora_flops),
            lora: lora_measured,
        })
    }

    /// Read the patched tensors of `set.checks` back from the device (each
    /// acquired as the engine would, so a streamed one is uploaded and
    /// merged again) and compare them with what they must hold: in the
    /// fusing modes the pristine file bytes merged here on the CPU with
    /// `merge_cpu` and the file's factor bytes (bit for bit on the host
    /// backend, which runs the same kernel; within one unit in the last
    /// place elsewhere), in the unfused mode the pristine bytes themselves,
    /// with the adapters handed out in the guard.
    fn check_lora(
        &self,
        rt: &Runtime,
        m: ModelId,
        mode: LoraMode,
        set: &LoraSet,
    ) -> Result<String, String> {
        let exact = self.dev.info().kind == BackendKind::Host;
        let mut checked = Vec::new();
        for &key in &set.checks {
            let (c, l, t) = key;
            let td = &self.desc.components[c].layers[l].tensors[t];
            let dtype = td
                .dtype
                .kernel()
                .ok_or_else(|| format!("{}: a LoRA on a {} weight", td.name, td.dtype))?;
            let mut want = vec![0u8; td.bytes];
            self.source
                .read(c, l, t, 0, &mut want)
                .map_err(|e| format!("reading {} from the file: {e}", td.name))?;
            let groups = set.groups(key);
            let adapters_total: usize = groups.iter().map(|g| g.1.len()).sum();
            if mode != LoraMode::Unfused {
                // Every factor these adapters use, read from the LoRA files.
                let mut bytes: BTreeMap<(usize, usize), Vec<u8>> = BTreeMap::new();
                for (_, group) in &groups {
                    for &(bi, pi) in group {
                        let b = &set.bindings[bi];
                        for f in b.desc.patches[pi].delta.factors() {
                            if let std::collections::btree_map::Entry::Vacant(e) =
                                bytes.entry((bi, f))
                            {
                                let mut buf = vec![0u8; b.desc.factors[f].bytes().unwrap_or(0)];
                                b.source.read(f, &mut buf).map_err(|e| e.to_string())?;
                                e.insert(buf);
                            }
                        }
                    }
                }
                for (rows, group) in &groups {
                    let adapters = set.adapters(group, &mut |bi, f| {
                        bytes.get(&(bi, f)).map_or(&[][..], |v| v)
                    });
                    let spec = MergeSpec::new(dtype, &td.shape, rows.clone(), &adapters)
                        .map_err(|e| format!("{}: {e}", td.name))?;
                    offload_kernels::merge_cpu(&mut want, &spec, None)
                        .map_err(|e| format!("{}: {e}", td.name))?;
                }
            }
            let g = rt
                .acquire(LayerId {
                    model: m,
                    component: c,
                    layer: l,
                })
                .map_err(|e| format!("acquiring {}: {e}", td.name))?;
            let view = g
                .tensor(t)
                .ok_or_else(|| format!("{}: not in its layer", td.name))?;
            let mut got = vec![0u8; td.bytes];
            let read = self.dev.read_blocking(view.ptr, &mut got, self.compute);
            let handed: usize = g.lora(t).map(|op| op.adapters.len()).sum();
            drop(g);
            read.map_err(|e| format!("reading {} back: {e}", td.name))?;
            let handed_want = if mode == LoraMode::Unfused {
                adapters_total
            } else {
                0
            };
            if handed != handed_want {
                return Err(format!(
                    "{mode}: the guard of {} hands out {handed} adapters, expected {handed_want}",
                    td.name
                ));
            }
            if got != want {
                let n = td.bytes / dtype.size_in_bytes();
                let bad: Vec<usize> = (0..n)
                    .filter(|&i| {
                        differs(
                            element(&got, dtype, i),
                            element(&want, dtype, i),
                            dtype,
                            exact,
                        )
                    })
                    .collect();
                if let Some(&i) = bad.first() {
                    return Err(format!(
                        "{mode}: {} on the device differs from {} in {} of {n} elements; element {i} is {} on the device, {} expected",
                        td.name,
                        if mode == LoraMode::Unfused {
                            "its file bytes"
                        } else {
                            "the host merge of its file bytes"
                        },
                        bad.len(),
                        element(&got, dtype, i),
                        element(&want, dtype, i)
                    ));
                }
            }
            checked.push(format!("{} ({adapters_total} adapters)", td.name));
        }
        Ok(format!(
            "{} {}: {}",
            if mode == LoraMode::Unfused {
                "pristine on the device, adapters handed out"
            } else if exact {
                "equal to the host merge, bit for bit"
            } else {
                "equal to the host merge within 1 ulp"
            },
            if exact { "(host backend)" } else { "(GPU)" },
            checked.join(", ")
        ))
    }
}

/// Write a timeline as SVG: one lane per kind of work, time left to right,
/// and below them the device memory in use with the watermarks.
fn write_timeline(
    path: &Path,
    entries: &[TimelineEntry],
    marks: &[(&str, usize)],
) -> std::io::Result<()> {
    let end = entries
        .iter()
        .map(|e| e.end_s)
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let start = entries
        .iter()
        .map(|e| e.start_s)
        .fold(f64::INFINITY, f64::min)
        .min(end);
    let span = (end - start).max(1e-9);
    let (w, lane_h, left, mem_h) = (1600.0, 40.0, 110.0, 160.0);
    let lanes = [
        ("upload", "#3b78c4"),
        ("stage", "#7b5cc4"),
        ("merge", "#c48a3b"),
        ("compute", "#3a9a4a"),
        ("wait", "#c43b3b"),
    ];
    let x_of = |t: f64| left + (t - start) / span * w;
    let mem_top = 30.0 + lanes.len() as f64 * lane_h + 20.0;
    let mut out = String::new();
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        w + left + 20.0,
        mem_top + mem_h + 30.0
    ));
    out.push_str(&format!(
        "<text x=\"{left}\" y=\"16\">offload timeline: {span:.3} s, {} entries (hover for layer names)</text>\n",
        entries.len()
    ));
    for (i, (kind, color)) in lanes.iter().enumerate() {
        let y = 30.0 + i as f64 * lane_h;
        out.push_str(&format!(
            "<text x=\"4\" y=\"{}\">{kind}</text>\n",
            y + lane_h / 2.0
        ));
        for e in entries.iter().filter(|e| e.kind == *kind) {
            let (x0, x1) = (x_of(e.start_s), x_of(e.end_s));
            out.push_str(&format!(
                "<rect x=\"{x0:.2}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"{color}\"><title>{} {:.4}–{:.4} s {} bytes</title></rect>\n",
                (x1 - x0).max(0.3),
                lane_h - 8.0,
                e.layer.replace('&', "&amp;").replace('<', "&lt;"),
                e.start_s,
                e.end_s,
                e.bytes
            ));
        }
    }
    let top = marks
        .iter()
        .map(|m| m.1)
        .chain(entries.iter().filter(|e| e.kind == "mem").map(|e| e.bytes))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let y_of = |b: f64| mem_top + mem_h - b / top * mem_h;
    out.push_str(&format!(
        "<text x=\"4\" y=\"{}\">device MiB</text>\n",
        mem_top + mem_h / 2.0
    ));
    for (name, bytes) in marks {
        let y = y_of(*bytes as f64);
        out.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/><text x=\"{}\" y=\"{:.1}\" fill=\"#555\">{name} {:.1} MiB</text>\n",
            left + w,
            left + 4.0,
            y - 2.0,
            *bytes as f64 / (1u64 << 20) as f64
        ));
    }
    let mut samples: Vec<&TimelineEntry> = entries.iter().filter(|e| e.kind == "mem").collect();
    samples.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    // A step curve: each value holds until the next sample.
    let mut points: Vec<String> = Vec::new();
    for (i, e) in samples.iter().enumerate() {
        let y = y_of(e.bytes as f64);
        points.push(format!("{:.2},{:.2}", x_of(e.start_s), y));
        let next = samples.get(i + 1).map_or(end, |n| n.start_s);
        points.push(format!("{:.2},{:.2}", x_of(next), y));
    }
    if !points.is_empty() {
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#d08020\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            points.join(" ")
        ));
    }
    out.push_str("</svg>\n");
    std::fs::write(path, out)
}

/// Removes a directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The model, its name, the folder it was written to (a synthetic model),
/// and the tensor specs synthetic LoRAs are written from.
type Opened = (Model, String, Option<TempDir>, Vec<TensorSpec>);

fn open_model(args: &E2eArgs) -> Result<Opened, String> {
    if let Some(p) = &args.model {
        let m = Model::open(p).map_err(|e| e.to_string())?;
        let specs = m
            .layout
            .components
            .iter()
            .flat_map(|c| c.layers.iter().flat_map(|l| l.tensors.iter()))
            .map(|t| TensorSpec::new(t.name.clone(), t.dtype, &t.shape))
            .collect();
        return Ok((m, p.display().to_string(), None, specs));
    }
    let preset = Preset::from_name(&args.preset)
        .ok_or_else(|| format!("unknown preset `{}` (sd15, sdxl, flux)", args.preset))?;
    if args.scale == 0 {
        return Err("--scale must be at least 1".into());
    }
    let dir = std::env::temp_dir().join(format!("offload-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = TempDir(dir.clone());
    let path = dir.join(format!("{}-s{}.safetensors", args.preset, args.scale));
    let opts = PresetOptions {
        scale: args.scale,
        dtype: Dtype::F16,
        text_encoders: true,
        vae: true,
    };
    let specs = preset_specs(preset, &opts);
    write_deterministic(&path, &specs, &Default::default(), args.seed)
        .map_err(|e| e.to_string())?;
    let m = Model::open(&path).map_err(|e| e.to_string())?;
    Ok((
        m,
        format!("synthetic {} at scale {}", args.preset, args.scale),
        Some(tmp),
        specs,
    ))
}

/// The LoRA options, checked before anything runs: (modes, ranks, files with multipliers).
type LoraOpts = (Vec<LoraMode>, Vec<u64>, Vec<(PathBuf, f32)>);

fn parse_lora_options(args: &E2eArgs) -> Result<LoraOpts, String> {
    let mut modes = Vec::new();
    for s in args
        .lora_modes
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if s == "none" {
            continue;
        }
        let m: LoraMode = s
            .parse()
            .map_err(|e: String| format!("--lora-modes: {e} (or none)"))?;
        if !modes.contains(&m) {
            modes.push(m);
        }
    }
    let mut ranks = Vec::new();
    for s in args
        .lora_ranks
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let r: u64 = s
            .parse()
            .ok()
            .filter(|&r| r >= 1)
            .ok_or_else(|| format!("--lora-ranks: `{s}` is not a rank (a whole number ≥ 1)"))?;
        ranks.push(r);
    }
    let mut files = Vec::new();
    for s in &args.lora {
        let (file, mult) = match s.rsplit_once(':') {
            Some((f, m)) if !f.is_empty() => match m.trim().parse::<f32>() {
                Ok(v) => (f, v),
                Err(_) => return Err(format!("--lora {s}: `{m}` is not a multiplier (FILE:MULT)")),
            },
            _ => (s.as_str(), 1.0),
        };
        if !mult.is_finite() {
            return Err(format!("--lora {s}: the multiplier must be finite"));
        }
        files.push((PathBuf::from(file), mult));
    }
    if !args.no_lora && args.lora.is_empty() && ranks.is_empty() {
        return Err("--lora-ranks: give at least one rank (or --no-lora)".into());
    }
    if !args.no_lora && args.lora_steps == 0 {
        return Err("--lora-steps must be at least 1".into());
    }
    Ok((modes, ranks, files))
}

/// The LoRA set of the LoRA rows: the user's files, or synthetic LoRAs
/// written into `dir` from the model's specs.
fn prepare_loras(
    args: &E2eArgs,
    opts: LoraOpts,
    model: &Model,
    specs: &[TensorSpec],
    dir: &Path,
) -> Result<LoraSet, String> {
    let (modes, ranks, files) = opts;
    // (path, multiplier, strict, description)
    let mut list: Vec<(PathBuf, f32, bool, String)> = Vec::new();
    if files.is_empty() {
        for (i, &rank) in ranks.iter().enumerate() {
            let (convention, name, mult) = if i % 2 == 0 {
                (LoraConvention::Kohya, "kohya", 0.8)
            } else {
                (LoraConvention::Peft, "peft", 0.6)
            };
            let lspecs = lora_specs(
                specs,
                &LoraOptions {
                    convention,
                    rank,
                    dtype: Dtype::F16,
                },
            );
            if lspecs.is_empty() {
                return Err(
                    "the model's denoiser has no module a synthetic LoRA adapts: pass --lora FILE:MULT or --no-lora"
                        .into(),
                );
            }
            let stem = match &args.model {
                Some(_) => "model".to_string(),
                None => format!("{}-s{}", args.preset, args.scale),
            };
            let path = dir.join(format!("{stem}-lora-{name}-r{rank}.safetensors"));
            // kohya: alpha = rank / 2 (scale 0.5, a common choice); peft files carry no alpha (scale 1).
            write_lora(&path, &lspecs, rank as f32 / 2.0, args.seed + 1 + i as u64)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let modules = lspecs
                .iter()
                .filter(|s| {
                    s.name.ends_with(".lora_down.weight") || s.name.ends_with(".lora_A.weight")
                })
                .count();
            list.push((
                path,
                mult,
                true,
                format!("synthetic {name} rank {rank} f16 × {mult} ({modules} modules)"),
            ));
        }
    } else {
        for (path, mult) in files {
            let d = format!("{} × {mult}", path.display());
            list.push((path, mult, false, d));
        }
    }
    let mut bindings = Vec::new();
    let mut descriptions = Vec::new();
    let mut file_bytes = 0u64;
    for (path, mult, strict, description) in list {
        let file = Arc::new(LoraFile::open(&path).map_err(|e| e.to_string())?);
        file_bytes += lora_file_bytes(&path);
        let resolved = file
            .resolve_layout(
                &model.layout,
                &ResolveOptions {
                    // The runtime applies the multiplier.
                    multiplier: 1.0,
                    strict,
                },
            )
            .map_err(|e| e.to_string())?;
        if let Some(w) = resolved.warning() {
            eprintln!("{w}");
        }
        if resolved.adapters.is_empty() {
            return Err(format!(
                "{}: no module of this LoRA applies to the model",
                path.display()
            ));
        }
        descriptions.push(format!(
            "{description}: {} adapters",
            resolved.adapters.len()
        ));
        bindings.push(lora_binding(&model.layout, file, &resolved, mult)?);
    }
    let mut patched: BTreeMap<TensorKey, Vec<(usize, usize)>> = BTreeMap::new();
    let (mut max_rank, mut max_rows, mut factor_bytes) = (1usize, 1usize, 0usize);
    let mut packed = Vec::new();
    for (bi, b) in bindings.iter().enumerate() {
        let mut used = vec![false; b.desc.factors.len()];
        for (pi, p) in b.desc.patches.iter().enumerate() {
            patched
                .entry((p.component, p.layer, p.tensor))
                .or_default()
                .push((bi, pi));
            for f in p.delta.factors() {
                if let Some(u) = used.get_mut(f) {
                    *u = true;
                }
            }
            if let PatchDelta::LowRank { up, down } = p.delta {
                let up = b.desc.factors.get(up).and_then(|f| f.matrix());
                let down = b.desc.factors.get(down).and_then(|f| f.matrix());
                if let (Some(u), Some(d)) = (up, down) {
                    max_rows = max_rows.max(u.0);
                    max_rank = max_rank.max(d.0);
                }
            }
        }
        // As the runtime lays a LoRA's factors out on the device.
        let sizes: Vec<usize> = b
            .desc
            .factors
            .iter()
            .zip(&used)
            .map(|(f, &u)| if u { f.bytes().unwrap_or(0) } else { 0 })
            .collect();
        factor_bytes += sizes.iter().sum::<usize>();
        packed.push(pack(&sizes).map_or(0, |p| p.total));
    }
    let mut set = LoraSet {
        bindings,
        descriptions,
        file_bytes,
        factor_bytes,
        packed,
        max_rank,
        max_rows,
        patched,
        macs: 0,
        touched_bytes: 0,
        checks: Vec::new(),
        modes,
        steps: args.lora_steps.min(args.steps),
    };
    // Multiply-adds of one merge of every patched tensor, as the kernels
    // count them (the shapes are what matters: zero bytes stand in for the factors).
    let largest = set
        .bindings
        .iter()
        .flat_map(|b| b.desc.factors.iter().filter_map(|f| f.bytes()))
        .max()
        .unwrap_or(0);
    let zeros = vec![0u8; largest];
    let desc = describe("", &model.layout);
    let (mut macs, mut touched) = (0u64, 0u64);
    for &key in set.patched.keys() {
        let td = &desc.components[key.0].layers[key.1].tensors[key.2];
        let Some(dtype) = td.dtype.kernel() else {
            continue;
        };
        for (rows, group) in set.groups(key) {
            let adapters = set.adapters(&group, &mut |bi, f| {
                let n = set.bindings[bi].desc.factors[f].bytes().unwrap_or(0);
                &zeros[..n.min(zeros.len())]
            });
            let spec = MergeSpec::new(dtype, &td.shape, rows.clone(), &adapters)
                .map_err(|e| format!("{}: {e}", td.name))?;
            macs += spec.multiply_adds();
            touched += spec.touched_bytes() as u64;
        }
    }
    set.macs = macs;
    set.touched_bytes = touched;
    // Read back the first and the last patched tensor.
    let keys: Vec<TensorKey> = set.patched.keys().copied().collect();
    set.checks = match (keys.first(), keys.last()) {
        (Some(&a), Some(&b)) if a != b => vec![a, b],
        (Some(&a), _) => vec![a],
        _ => Vec::new(),
    };
    Ok(set)
}

/// Bytes of a LoRA on disk (a peft adapter folder: its weights file).
fn lora_file_bytes(path: &Path) -> u64 {
    let p = if path.is_dir() {
        path.join("adapter_model.safetensors")
    } else {
        path.to_path_buf()
    };
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The host policy `--host-policy` and `--staging-write-combined` ask for.
fn host_policy(args: &E2eArgs) -> HostPolicy {
    match (args.host_policy.as_str(), HostPolicy::staged_default()) {
        (
            "staged",
            HostPolicy::Staged {
                buffers,
                buffer_bytes,
                threads,
                fill_part_bytes,
                ..
            },
        ) => HostPolicy::Staged {
            buffers,
            buffer_bytes,
            threads,
            fill_part_bytes,
            write_combined: args.staging_write_combined,
        },
        _ => HostPolicy::Pinned,
    }
}

/// Run the benchmark and print the table.
pub fn run(args: &E2eArgs) -> Result<(), String> {
    if args.tokens == 0 || args.steps == 0 {
        return Err("--tokens and --steps must be at least 1".into());
    }
    if args.rounds == 0 || args.rounds > 100 {
        return Err(format!(
            "--rounds {} is out of range (1 to 100)",
            args.rounds
        ));
    }
    let host_policy = args.host_policy.as_str();
    if host_policy != "pinned" && host_policy != "staged" {
        return Err(format!(
            "unknown host policy `{host_policy}` (pinned, staged)"
        ));
    }
    if args.staging_write_combined && host_policy != "staged" {
        return Err("--staging-write-combined needs --host-policy staged".into());
    }
    let lora_opts = parse_lora_options(args)?;
    let (model, model_name, tmp, specs) = open_model(args)?;
    let desc = describe(&model_name, &model.layout);
    let (te, denoiser, vae, _other) = roles(&model.layout);
    if denoiser.is_empty() {
        return Err(format!(
            "{model_name}: no denoiser component found in its layout"
        ));
    }
    let model_bytes = desc.bytes();
    let denoiser_bytes: usize = denoiser.iter().map(|&c| desc.components[c].bytes()).sum();
    let largest_layer = desc
        .components
        .iter()
        .flat_map(|c| c.layers.iter().map(|l| l.bytes()))
        .max()
        .unwrap_or(0);
    let device_mem =
        parse_size(&args.device_mem, model_bytes).map_err(|e| format!("--device-mem: {e}"))?;
    for (flag, v) in [("--high", &args.high), ("--low", &args.low)] {
        if let Some(v) = v {
            parse_size(v, device_mem).map_err(|e| format!("{flag}: {e}"))?;
        }
    }
    // Synthetic LoRAs go next to the synthetic model (and go with it).
    let mut lora_tmp = None;
    // `--lora-modes none` asks for the plain rows only, as `--no-lora` does.
    let lora = if args.no_lora || lora_opts.0.is_empty() {
        None
    } else {
        let dir = match &tmp {
            Some(t) => t.0.clone(),
            None => {
                let d =
                    std::env::temp_dir().join(format!("offload-e2e-lora-{}", std::process::id()));
                std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
                lora_tmp = Some(TempDir(d.clone()));
                d
            }
        };
        Some(prepare_loras(args, lora_opts, &model, &specs, &dir)?)
    };
    drop(specs);

    // Activation scratch: X [tokens, max k], Y [tokens, max n].
    let (mut max_n, mut max_k) = (1usize, 1usize);
    for c in &desc.components {
        for l in &c.layers {
            for t in &l.tensors {
                if let Some((n, k, _)) = matmul_dims(&t.shape, t.dtype) {
                    max_n = max_n.max(n);
                    max_k = max_k.max(k);
                }
            }
        }
    }
    let x_bytes = args.tokens * max_k * 4;
    let y_bytes = args.tokens * max_n * 4;
    // Unfused scratch: [tokens, max rank] and [tokens, max up rows].
    let (t_bytes, ly_bytes) = lora.as_ref().map_or((0, 0), |s| {
        (args.tokens * s.max_rank * 4, args.tokens * s.max_rows * 4)
    });
    // GPU pages are 2 MiB. A synthetic model scaled down by `s` in width has
    // layers s² times smaller, so the host backend scales its pages the same
    // way (64 KiB at least) to keep page-tail waste as large, relatively, as
    // on the full-size model; a user's model gets 2 MiB pages.
    let page = if args.model.is_some() {
        2usize << 20
    } else {
        ((2usize << 20)
            / (args.scale as usize)
                .saturating_mul(args.scale as usize)
                .max(1))
        .max(64 << 10)
    };
    let pages = |b: usize| b.div_ceil(page) + 1;
    // The whole model in layers of whole pages, generously: each layer may waste a page.
    let layers: usize = desc.components.iter().map(|c| c.layers.len()).sum();
    let model_pages = pages(model_bytes) + layers;
    // The LoRA factors beside it on the device (the none row's LoRA rows hold both).
    let lora_pages: usize = lora
        .as_ref()
        .map_or(0, |s| s.packed.iter().map(|&b| pages(b)).sum());
    let scratch_pages = pages(x_bytes)
        + 2 * pages(x_bytes / 2)
        + pages(y_bytes)
        + if lora.is_some() {
            pages(t_bytes) + pages(ly_bytes)
        } else {
            0
        };
    let host_capacity =
        ((model_pages + lora_pages).max(pages(device_mem)) + scratch_pages + 8) * page;
    let sizes = Sizes {
        model_bytes,
        denoiser_bytes,
        largest_layer,
        device_mem,
        x_bytes,
        y_bytes,
        t_bytes,
        ly_bytes,
        max_k,
    };

    let selected = if args.backend == DeviceArg::Host {
        let host = HostConfig {
            capacity: host_capacity,
            page_size: page,
            link_gbps: args.link_gbps,
        };
        let dev = HostDevice::new(host).map_err(|e| e.to_string())?;
        let reason = format!(
            "using the host backend ({} MiB emulated device memory, {} KiB pages): --backend host",
            dev.info().total_memory >> 20,
            dev.info().page_size >> 10
        );
        device::Selected {
            device: Arc::new(dev),
            reason,
        }
    } else {
        device::auto(&HostConfig {
            capacity: host_capacity,
            page_size: page,
            link_gbps: args.link_gbps,
        })
        .map_err(|e| e.to_string())?
    };
    if args.backend == DeviceArg::Cuda && selected.device.info().kind != BackendKind::Cuda {
        return Err(format!(
            "--backend cuda: no CUDA device: {}",
            selected.reason
        ));
    }
    let dev = selected.device.clone();
    let result = if dev.info().kind == BackendKind::Host {
        // A fresh host device we can configure: no poisoning for a benchmark.
        let host = Arc::new(
            HostDevice::new(HostConfig {
                capacity: host_capacity,
                page_size: page,
                link_gbps: args.link_gbps,
            })
            .map_err(|e| e.to_string())?,
        );
        host.set_poison(false);
        run_on(
            args,
            host,
            selected.reason,
            model,
            model_name,
            (desc, te, denoiser, vae),
            lora,
            sizes,
        )
    } else {
        run_on(
            args,
            dev,
            selected.reason,
            model,
            model_name,
            (desc, te, denoiser, vae),
            lora,
            sizes,
        )
    };
    drop(lora_tmp);
    result
}

/// Sizes `run` worked out for `run_on`.
struct Sizes {
    model_bytes: usize,
    denoiser_bytes: usize,
    largest_layer: usize,
    device_mem: usize,
    x_bytes: usize,
    y_bytes: usize,
    t_bytes: usize,
    ly_bytes: usize,
    max_k: usize,
}

#[allow(clippy::too_many_arguments)]
fn run_on(
    args: &E2eArgs,
    dev: Arc<dyn Device>,
    reason: String,
    model: Model,
    model_name: String,
    (desc, te, denoiser, vae): (ModelDesc, Vec<usize>, Vec<usize>, Vec<usize>),
    lora: Option<LoraSet>,
    sizes: Sizes,
) -> Result<(), String> {
    let Sizes {
        model_bytes,
        denoiser_bytes,
        largest_layer,
        device_mem,
        x_bytes,
        y_bytes,
        t_bytes,
        ly_bytes,
        max_k,
    } = sizes;
    // The LoRA factors in whole pages of this device (one allocation per file).
    let dev_page = dev.info().page_size;
    let lora_bytes: usize = lora.as_ref().map_or(0, |s| {
        s.packed.iter().map(|&b| b.next_multiple_of(dev_page)).sum()
    });
    let e = |e: Error| e.to_string();
    let compute = dev
        .create_stream_with_priority(args.compute_priority.into())
        .map_err(e)?;
    let scratch = Arena::new(dev.clone(), ArenaConfig::default()).map_err(e)?;
    let xa = scratch.alloc(x_bytes, Tag(0)).map_err(e)?;
    let ya = scratch.alloc(y_bytes, Tag(0)).map_err(e)?;
    let (x, y) = (scratch.ptr(xa).map_err(e)?, scratch.ptr(ya).map_err(e)?);
    let xa16 = scratch.alloc(x_bytes / 2, Tag(0)).map_err(e)?;
    let xab16 = scratch.alloc(x_bytes / 2, Tag(0)).map_err(e)?;
    let (x_f16, x_bf16) = (
        scratch.ptr(xa16).map_err(e)?,
        scratch.ptr(xab16).map_err(e)?,
    );
    let lora_scratch = match &lora {
        Some(_) => {
            let ta = scratch.alloc(t_bytes, Tag(0)).map_err(e)?;
            let la = scratch.alloc(ly_bytes, Tag(0)).map_err(e)?;
            Some((scratch.ptr(ta).map_err(e)?, scratch.ptr(la).map_err(e)?))
        }
        None => None,
    };
    let xv: Vec<f32> = (0..x_bytes / 4)
        .map(|i| ((i % 97) as f32 - 48.0) * 1e-3)
        .collect();
    let xs: Vec<u8> = xv.iter().flat_map(|v| v.to_le_bytes()).collect();
    scratch.write(xa, 0, &xs).map_err(e)?;
    let xs: Vec<u8> = xv
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    scratch.write(xa16, 0, &xs).map_err(e)?;
    let xs: Vec<u8> = xv
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    scratch.write(xab16, 0, &xs).map_err(e)?;
    // The product kernel exists on the host backend; on CUDA it comes with the cuBLAS work.
    let compute_ok = dev
        .launch(
            &Kernel::Matmul {
                x,
                x_dtype: offload_kernels::Dtype::F32,
                tokens: 1,
                w: x,
                w_dtype: offload_kernels::Dtype::F32,
                n: 1,
                k: 1,
                y,
            },
            compute,
        )
        .is_ok();
    dev.stream_synchronize(compute).map_err(e)?;
    let link = measure_link(&dev, &scratch).map_err(e)?;
    // Warm up as much as the largest row holds: the whole model in whole
    // pages per layer with the LoRA factors, or the offload rows' budget (a
    // GPU's whole memory is far more, and not all of it can be had).
    let layer_count: usize = desc.components.iter().map(|c| c.layers.len()).sum();
    let most_held = (model_bytes + layer_count * dev_page + lora_bytes).max(device_mem);
    warm_up(&dev, &scratch, most_held).map_err(e)?;

    let mut rows: Vec<(Mode, Policy)> = Vec::new();
    let chosen = if args.lowvram {
        Some(Mode::Sequential)
    } else {
        args.mode.as_deref().map(str::parse::<Mode>).transpose()?
    };
    let policy: Policy = args.policy.as_deref().unwrap_or("planned").parse()?;
    match chosen {
        Some(m) => {
            if m != Mode::None {
                rows.push((m, policy));
            }
        }
        None => {
            rows.push((Mode::Model, Policy::Planned));
            rows.push((Mode::Balanced, Policy::Planned));
            rows.push((Mode::Balanced, Policy::Lru));
            rows.push((Mode::Sequential, Policy::Planned));
        }
    }
    let lora_modes: Vec<LoraMode> = lora.as_ref().map_or(Vec::new(), |s| s.modes.clone());
    let lora_steps = lora.as_ref().map_or(0, |s| s.steps);
    let total_steps =
        (rows.len() + 1) as u64 * (args.steps as u64 + lora_modes.len() as u64 * lora_steps as u64);
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total_steps);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:36} [{bar:30}] {pos}/{len} steps {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let matmul_flops_per_pass: u64 = denoiser
        .iter()
        .flat_map(|&c| {
            desc.components[c]
                .layers
                .iter()
                .flat_map(|l| l.tensors.iter())
        })
        .filter_map(|t| matmul_dims(&t.shape, t.dtype))
        .map(|(n, k, _)| offload_kernels::matmul_flops(args.tokens, n, k))
        .sum();
    let bench = Bench {
        dev: dev.clone(),
        compute,
        scratch,
        x,
        x_f16,
        x_bf16,
        y,
        compute_ok,
        desc,
        source: Arc::new(match args.source {
            SourceArg::File => ModelSource::new(Arc::new(model)),
            SourceArg::Memory => ModelSource::held(Arc::new(model))
                .map_err(|e| format!("holding the model in memory (--source memory): {e}"))?,
        }),
        te,
        denoiser,
        vae,
        args: args.clone(),
        bar,
        lora,
        lora_scratch,
        max_k,
        lora_flops: AtomicU64::new(0),
        acquire_ns: AtomicU64::new(0),
        release_ns: AtomicU64::new(0),
    };
    println!("device: {reason}");
    if !compute_ok {
        println!("note: no matrix-product kernel on this device yet: the layers do no compute, the table measures transfers only");
    }
    println!(
        "model: {model_name}: {:.1} MiB ({:.1} MiB denoiser), largest layer {:.1} MiB; {} steps, {} tokens; link {:.2} GB/s measured{}",
        mib(model_bytes as f64),
        mib(denoiser_bytes as f64),
        mib(largest_layer as f64),
        args.steps,
        args.tokens,
        link,
        args.link_gbps.map_or(String::new(), |r| format!(" (throttled to {r} GB/s)"))
    );
    println!(
        "offload modes get {:.1} MiB of device memory ({:.2} of the model); the none row runs on a device that holds the whole model",
        mib(device_mem as f64),
        device_mem as f64 / model_bytes as f64
    );
    if let Some(set) = &bench.lora {
        println!("LoRA set: {}", set.descriptions.join("; "));
        println!(
            "  {:.1} MiB of factors ({:.1} MiB of files) on {} tensors; merging them all once: {:.2} GFLOP ({:.1} MiB of weights); a denoiser pass's products: {:.2} GFLOP",
            mib(set.factor_bytes as f64),
            mib(set.file_bytes as f64),
            set.patched.len(),
            2.0 * set.macs as f64 / 1e9,
            mib(set.touched_bytes as f64),
            matmul_flops_per_pass as f64 / 1e9
        );
    }
    if let HostPolicy::Staged {
        buffers,
        buffer_bytes,
        threads,
        write_combined,
        ..
    } = host_policy(args)
    {
        println!(
            "host policy staged: {threads} reader thread(s), {buffers} × {} MiB {} staging buffers",
            buffer_bytes >> 20,
            crate::h2d_bench::staging_memory(write_combined, &*bench.dev)
        );
    }
    println!(
        "compute stream: {} priority (--compute-priority); the runtime's copy and merge streams: normal; {}",
        StreamPriority::from(args.compute_priority),
        match bench.dev.stream_priority_range() {
            Ok(Some((least, greatest))) if least == greatest =>
                format!("the device has one priority ({least}): every stream runs alike"),
            Ok(Some((least, greatest))) =>
                format!("the device's priorities: {least} (normal) to {greatest} (high)"),
            Ok(None) => "the host backend runs every stream alike".to_string(),
            Err(e) => format!("the device's priorities could not be read: {e}"),
        }
    );
    println!(
        "layer products: {}; a layer's products handed to the device at once (one CUDA graph a layer with OFFLOAD_GRAPHS=on)",
        match args.activations {
            ActivationsArg::Weights =>
                "activations of each weight's own type (f16 with f16 weights; --activations), one launch a product on CUDA",
            ActivationsArg::F32 =>
                "f32 activations rounded to each 16-bit weight's type by the device first (--activations f32), two launches a product on CUDA",
        }
    );
    if args.source == SourceArg::Memory {
        println!(
            "weights: held in memory by the engine ({:.1} MiB, not in the peak host column; --source memory), filled into the runtime's host buffers with streaming stores",
            mib(bench.source.held_bytes() as f64)
        );
    }
    if args.no_stall_timing {
        println!("waits for weights not timed (--no-stall-timing): the stall column reads 0");
    }
    if args.uploads != UploadsArg::Auto && args.host_policy != "staged" {
        let who = match args.uploads {
            UploadsArg::Inline => "the engine's thread",
            _ => "the runtime's uploader thread",
        };
        println!("pinned uploads and their merges are queued by {who} (--uploads)");
    }
    if lora_modes.contains(&LoraMode::FuseOnUpload) {
        // Build the merge kernels before the rows (on CUDA: NVRTC, seconds
        // unless the kernel disk cache holds them), so that no row's first
        // pass includes it; set_loras would build them otherwise.
        match bench.dev.prepare(KernelFamily::Merge) {
            Ok(Some(line)) => println!("{line}"),
            Ok(None) => {}
            Err(e) => println!("note: the merge kernels do not build on this device: {e}"),
        }
    }
    let info_total = bench.dev.info().total_memory;
    let page = bench.dev.info().page_size;
    let full = info_total.min(
        // the whole model in whole pages per layer, and a little room
        model_bytes
            + bench
                .desc
                .components
                .iter()
                .map(|c| c.layers.len())
                .sum::<usize>()
                * page,
    );
    // The none row's LoRA rows hold the factors beside the whole model.
    let full_lora = info_total.min(full + lora_bytes);
    let n_rows = rows.len();
    let mut offload_rows = vec![(Mode::None, Policy::Planned)];
    offload_rows.extend(rows);
    let plain_rows = offload_rows.clone();
    let mut results = Vec::new();
    for (i, (m, p)) in offload_rows.into_iter().enumerate() {
        let reference = i == 0;
        let mem = if reference { full } else { device_mem };
        bench.bar.set_message(if reference {
            "none (reference)".to_string()
        } else {
            format!("{m} {p}")
        });
        results.push(bench.row(
            m,
            p,
            mem,
            reference,
            args.timeline.is_some() && i == n_rows,
            None,
        ));
        for &lm in &lora_modes {
            bench.bar.set_message(format!("{m} {p}, LoRA {lm}"));
            let mem = if reference { full_lora } else { device_mem };
            results.push(bench.row(m, p, mem, false, false, Some(lm)));
        }
    }
    // Later rounds: the none row and the plain offload rows again, in turn.
    let mut rounds: Vec<Vec<Row>> = Vec::new();
    for round in 1..args.rounds {
        let mut this = Vec::new();
        for (i, &(m, p)) in plain_rows.iter().enumerate() {
            let reference = i == 0;
            bench
                .bar
                .set_message(format!("round {}: {m} {p}", round + 1));
            let mem = if reference { full } else { device_mem };
            this.push(bench.row(m, p, mem, reference, false, None));
        }
        rounds.push(this);
    }
    bench.bar.finish_and_clear();
    let _ = &bench.scratch;
    print_table(&results, args.steps, lora_steps);
    print_device_counts(&results);
    for w in bench.dev.warnings() {
        println!("device warning: {w}");
    }
    print_overlap(&results, link);
    let round_ratios = ratios_by_round(&results, &rounds, link);
    print_rounds(&round_ratios);
    if let Some(set) = &bench.lora {
        print_lora_work(&results, set, matmul_flops_per_pass);
    }
    if let Some(path) = &args.json {
        let reference = results
            .first()
            .and_then(|r| r.outcome.as_ref().ok())
            .map(|m| m.it_per_s);
        let reference_pass = results
            .first()
            .and_then(|r| r.outcome.as_ref().ok())
            .map(Measured::steady_pass_s);
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for r in &results {
            let ctx = JsonCtx {
                args,
                model_bytes,
                denoiser_bytes,
                largest_layer,
                link,
                info: dev.info(),
                reference,
                rows: &results,
                lora: bench.lora.as_ref(),
                matmul_flops_per_pass,
            };
            let mut line = json_row(r, &ctx);
            // The overlap figures: this pass against max(compute of a pass
            // without transfers, its bytes / link rate).
            if let Some((_, bound, ratio)) = reference_pass.and_then(|rp| overlap(r, rp, link)) {
                if let Ok(serde_json::Value::Object(mut o)) =
                    serde_json::from_str::<serde_json::Value>(&line)
                {
                    o.insert("overlap_bound_s".into(), bound.into());
                    o.insert("pass_over_bound".into(), ratio.into());
                    if args.rounds > 1 {
                        let per_round = round_ratios
                            .iter()
                            .find(|(m, p, _)| *m == r.mode && *p == r.policy)
                            .map(|(_, _, v)| v.clone())
                            .unwrap_or_default();
                        o.insert("pass_over_bound_rounds".into(), per_round.into());
                    }
                    line = serde_json::Value::Object(o).to_string();
                }
            }
            writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    // A LoRA path that computes wrong weights fails the benchmark.
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| {
            let lm = r.outcome.as_ref().ok()?.lora.as_ref()?;
            lm.check
                .as_ref()
                .err()
                .map(|msg| format!("{} {}: {msg}", r.mode, r.policy))
        })
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "LoRA read-back check failed:\n  {}",
            failed.join("\n  ")
        ));
    }
    Ok(())
}

/// Touch up to `most` bytes of free device memory once, so that no row pays
/// the first-touch cost of the host backend's memory (or of a GPU's fresh
/// pages) for the others.
fn warm_up(dev: &Arc<dyn Device>, scratch: &Arena<dyn Device>, most: usize) -> Result<(), Error> {
    let free = scratch.pages_free().min(most.div_ceil(scratch.page_size()));
    if free == 0 {
        return Ok(());
    }
    let a = scratch.alloc(free * scratch.page_size(), Tag(2))?;
    let s = dev.create_stream()?;
    dev.launch(
        &Kernel::Fill {
            dst: scratch.ptr(a)?,
            len: free * scratch.page_size(),
            value: 0,
        },
        s,
    )?;
    dev.stream_synchronize(s)?;
    dev.destroy_stream(s)?;
    scratch.free(a)?;
    scratch.trim();
    Ok(())
}

/// Best of three 64 MiB host-to-device copies, in GB/s.
fn measure_link(dev: &Arc<dyn Device>, scratch: &Arena<dyn Device>) -> Result<f64, Error> {
    let bytes = (64usize << 20).min(scratch.pages_free().saturating_sub(1) * scratch.page_size());
    if bytes == 0 {
        return Ok(0.0);
    }
    let a = scratch.alloc(bytes, Tag(1))?;
    let dst = scratch.ptr(a)?;
    let src = dev.alloc_pinned(bytes)?;
    let s = dev.create_stream()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: `src` outlives the copy: the stream is synchronised right after.
        unsafe { dev.copy_h2d_async(dst, src.as_ptr(), bytes, s)? };
        dev.stream_synchronize(s)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    dev.destroy_stream(s)?;
    scratch.free(a)?;
    scratch.trim();
    Ok(bytes as f64 / best.max(1e-9) / 1e9)
}

/// A pass's time against the ideal overlap bound: max(compute, bytes moved / link rate),
/// with compute taken from the reference row (no transfers at all). Plain rows only.
/// A row's steady pass against its overlap bound: (pass s, bound s, ratio),
/// where the pass is the mean of the later passes and the bound is
/// max(`reference_pass_s`, the later passes' bytes / link rate).
fn overlap(r: &Row, reference_pass_s: f64, link_gbps: f64) -> Option<(f64, f64, f64)> {
    let m = r.outcome.as_ref().ok()?;
    if r.reference || r.lora.is_some() || link_gbps <= 0.0 {
        return None;
    }
    let transfer = m.per_pass as f64 / (link_gbps * 1e9);
    let bound = reference_pass_s.max(transfer);
    let pass = m.steady_pass_s();
    Some((pass, bound, pass / bound))
}

fn print_overlap(rows: &[Row], link_gbps: f64) {
    let Some(reference) = rows
        .first()
        .and_then(|r| r.outcome.as_ref().ok())
        .map(Measured::steady_pass_s)
    else {
        return;
    };
    println!(
        "overlap (a later pass against max(compute of a later pass without transfers, its bytes / link rate); \
         later passes: the mean after the first):"
    );
    // The reference's own pass and engine thread: a pass about as long as
    // its queueing is bound by the thread that queues it, not the device.
    if let Some((r, m)) = rows
        .first()
        .filter(|r| r.reference)
        .and_then(|r| Some((r, r.outcome.as_ref().ok()?)))
    {
        println!(
            "  {:<18}: pass {:.3} s (the reference){}",
            format!("{}*", r.mode),
            reference,
            engine_note(m)
        );
    }
    for r in rows {
        if let Some((pass, bound, ratio)) = overlap(r, reference, link_gbps) {
            println!(
                "  {:<10} {:<7}: pass {:.3} s, bound {:.3} s (compute {:.3} s, transfer {:.3} s): {:.2}x{}",
                r.mode.to_string(),
                r.policy.to_string(),
                pass,
                bound,
                reference,
                r.outcome.as_ref().map(|m| m.per_pass as f64 / (link_gbps * 1e9)).unwrap_or(0.0),
                ratio,
                r.outcome.as_ref().map(engine_note).unwrap_or_default()
            );
        }
    }
}

/// Each plain offload row's pass against its bound in every round (the
/// first round's rows are `first`), each against its own round's none
/// row; a round whose none row or offload row failed gives no figure.
fn ratios_by_round(
    first: &[Row],
    later: &[Vec<Row>],
    link_gbps: f64,
) -> Vec<(Mode, Policy, Vec<f64>)> {
    let mut out: Vec<(Mode, Policy, Vec<f64>)> = Vec::new();
    let plain_first: Vec<Row> = first.iter().filter(|r| r.lora.is_none()).cloned().collect();
    for round in std::iter::once(&plain_first).chain(later) {
        let Some(reference) = round
            .first()
            .filter(|r| r.reference)
            .and_then(|r| r.outcome.as_ref().ok())
            .map(Measured::steady_pass_s)
        else {
            continue;
        };
        for r in round {
            if let Some((_, _, ratio)) = overlap(r, reference, link_gbps) {
                match out
                    .iter_mut()
                    .find(|(m, p, _)| *m == r.mode && *p == r.policy)
                {
                    Some((_, _, v)) => v.push(ratio),
                    None => out.push((r.mode, r.policy, vec![ratio])),
                }
            }
        }
    }
    out
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// With more than one round: each plain row's ratios and their median.
fn print_rounds(ratios: &[(Mode, Policy, Vec<f64>)]) {
    if ratios.iter().all(|(_, _, v)| v.len() < 2) {
        return;
    }
    println!("rounds (--rounds; each round's pass against the bound from its own none row):");
    for (m, p, v) in ratios {
        let list: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "  {:<10} {:<7}: {}; median {:.2}x",
            m.to_string(),
            p.to_string(),
            list.join(", "),
            median(v).unwrap_or(f64::NAN)
        );
    }
}

/// "; engine thread X ms queueing a pass (Y ms CPU; A ms of it in
/// acquire, R ms in release)", later passes' means; A and R are wall time.
fn engine_note(m: &Measured) -> String {
    let queue = later_mean(&m.engine_queue, m.engine_queue.len());
    let cpu = later_mean(&m.engine_cpu, m.engine_cpu.len());
    let calls = match (
        later_mean(&m.engine_acquire, m.engine_acquire.len()),
        later_mean(&m.engine_release, m.engine_release.len()),
    ) {
        (Some(a), Some(r)) => format!(
            "; {:.2} ms of it in acquire, {:.2} ms in release",
            a * 1e3,
            r * 1e3
        ),
        _ => String::new(),
    };
    match (queue, cpu) {
        (Some(q), Some(c)) => format!(
            "; engine thread {:.2} ms queueing a pass ({:.2} ms CPU{calls})",
            q * 1e3,
            c * 1e3
        ),
        (Some(q), None) => format!("; engine thread {:.2} ms queueing a pass{calls}", q * 1e3),
        _ => String::new(),
    }
}

/// The plain row of `r`'s offload mode (`r` itself for a plain row).
fn plain_of<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Measured> {
    rows.iter()
        .find(|p| p.lora.is_none() && p.mode == r.mode && p.policy == r.policy)
        .and_then(|p| p.outcome.as_ref().ok())
}

/// The LoRA overheads of a row against its plain row: (first pass incl.
/// `set_loras`, per later pass, per later pass as a fraction of the plain one).
fn overheads(rows: &[Row], r: &Row) -> Option<(f64, Option<f64>, Option<f64>)> {
    let m = r.outcome.as_ref().ok()?;
    let Some(lm) = &m.lora else {
        return Some((0.0, Some(0.0), Some(0.0)));
    };
    let p = plain_of(rows, r)?;
    let first = lm.set_s + m.passes.first()? - p.passes.first()?;
    // The plain row's passes with the same indices as the LoRA row's.
    let base = later_mean(&p.passes, m.passes.len());
    let later = if m.passes.len() > 1 && p.passes.len() > 1 {
        Some(m.later_pass_s()? - base?)
    } else {
        None
    };
    let fraction = later.and_then(|l| base.map(|b| l / b.max(1e-12)));
    Some((first, later, fraction))
}

/// Mean of `passes[1..n]` (`n` cut to the passes there are); the first pass
/// when that is the only one; `None` without passes.
fn later_mean(passes: &[f64], n: usize) -> Option<f64> {
    match n.min(passes.len()) {
        0 => None,
        1 => Some(passes[0]),
        n => Some(passes[1..n].iter().sum::<f64>() / (n - 1) as f64),
    }
}

/// it/s of the none reference at `steps` steps (its generation cut short when a LoRA row runs fewer).
fn reference_at(rows: &[Row], steps: usize) -> Option<f64> {
    rows.first()
        .and_then(|r| r.outcome.as_ref().ok())
        .map(|m| m.it_per_s_at(steps))
}

fn print_table(rows: &[Row], steps: usize, lora_steps: usize) {
    println!();
    if rows.iter().any(|r| r.lora.is_some()) {
        println!(
            "LoRA rows: {lora_steps} denoiser steps each (--lora-steps{}); set_loras is timed apart and counted in \"LoRA +1st s\"; \"vs none\" compares with the none* row's first {lora_steps} steps",
            if lora_steps < steps {
                format!("; the plain rows run {steps}, so a LoRA row's it/s and MB/gen are over a shorter generation")
            } else {
                String::new()
            }
        );
        println!(
            "LoRA +1st s = (set_loras + first pass) - first plain pass; LoRA +s/pass = mean later pass - mean of the plain row's same passes (+% of it; noise can make it negative)"
        );
    }
    println!(
        "{:<12} {:<8} {:<14} {:>7} {:>8} {:>10} {:>10} {:>13} {:>14} {:>7} {:>11} {:>12} {:>7} {:>11}",
        "mode",
        "policy",
        "lora",
        "it/s",
        "vs none",
        "MB/pass",
        "MB/gen",
        "peak dev MiB",
        "peak host MiB",
        "stall %",
        "LoRA +1st s",
        "LoRA +s/pass",
        "+%",
        "merges/pass"
    );
    for r in rows {
        let name = if r.reference {
            format!("{}*", r.mode)
        } else {
            r.mode.to_string()
        };
        let lora = r.lora.map_or("none", |m| m.name());
        match &r.outcome {
            Ok(m) => {
                let reference = reference_at(rows, r.steps);
                let (first, later, frac) = overheads(rows, r).unwrap_or((f64::NAN, None, None));
                let opt =
                    |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:+.*}", p));
                println!(
                    "{:<12} {:<8} {:<14} {:>7.2} {:>8} {:>10.1} {:>10.1} {:>13.1} {:>14.1} {:>7.1} {:>11} {:>12} {:>7} {:>11.0}",
                    name,
                    r.policy.to_string(),
                    lora,
                    m.it_per_s,
                    reference.map_or("-".into(), |x| format!("{:.2}x", m.it_per_s / x)),
                    m.per_pass as f64 / 1e6,
                    m.per_generation as f64 / 1e6,
                    mib(m.peak_device as f64),
                    mib(m.peak_host as f64),
                    m.stall_fraction * 100.0,
                    if r.lora.is_some() { format!("{first:+.3}") } else { "-".into() },
                    if r.lora.is_some() { opt(later, 3) } else { "-".into() },
                    if r.lora.is_some() { opt(frac.map(|f| f * 100.0), 0) } else { "-".into() },
                    m.merges_per_pass
                )
            }
            Err(msg) => println!(
                "{:<12} {:<8} {:<14} {msg}",
                name,
                r.policy.to_string(),
                lora
            ),
        }
    }
    println!("* reference: runs on a device that holds the whole model");
}

/// `after` less `before`, by name (the counts only grow).
fn counts_since(
    before: &[(&'static str, u64)],
    after: Vec<(&'static str, u64)>,
) -> Vec<(&'static str, u64)> {
    after
        .into_iter()
        .map(|(name, n)| {
            let was = before.iter().find(|(b, _)| *b == name).map_or(0, |b| b.1);
            (name, n.saturating_sub(was))
        })
        .collect()
}

/// The device's counts of the rows' work (products by cuBLAS interface,
/// merges by kernel), those not zero, one line a row; nothing on a device
/// that counts nothing.
fn print_device_counts(rows: &[Row]) {
    if rows.iter().all(|r| r.device_counts.is_empty()) {
        return;
    }
    println!("device counts (each row's generation):");
    for r in rows {
        let counts: Vec<String> = r
            .device_counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        println!(
            "  {:<10} {:<7} {:<15}: {}",
            format!("{}{}", r.mode, if r.reference { "*" } else { "" }),
            r.policy.to_string(),
            r.lora.map_or("none", |m| m.name()),
            if counts.is_empty() {
                "nothing counted".to_string()
            } else {
                counts.join(", ")
            }
        );
    }
}

/// What the LoRA rows' passes computed besides the plain ones: the merges
/// (fuse-on-upload) and the low-rank products (unfused), in flops beside
/// the pass's own products, and the read-back checks.
fn print_lora_work(rows: &[Row], set: &LoraSet, matmul_flops_per_pass: u64) {
    println!(
        "LoRA work per later pass (products of a plain pass: {:.2} GFLOP):",
        matmul_flops_per_pass as f64 / 1e9
    );
    for r in rows {
        let (Some(lm), Ok(m)) = (r.lora, &r.outcome) else {
            continue;
        };
        let merge_flops = 2.0 * m.merged_bytes_per_pass * set.macs_per_byte();
        let later = overheads(rows, r).and_then(|o| o.1);
        let work = if m.merges_per_pass > 0.0 {
            format!(
                "{:.0} merges of {:.1} MiB of weights, {:.2} GFLOP ({:.1}x the products)",
                m.merges_per_pass,
                mib(m.merged_bytes_per_pass),
                merge_flops / 1e9,
                merge_flops / (matmul_flops_per_pass as f64).max(1.0)
            )
        } else if m.lora_path_flops_per_pass > 0.0 {
            format!(
                "low-rank path {:.3} GFLOP ({:.2}x the products)",
                m.lora_path_flops_per_pass / 1e9,
                m.lora_path_flops_per_pass / (matmul_flops_per_pass as f64).max(1.0)
            )
        } else {
            "no LoRA work".into()
        };
        let rate = match later {
            Some(l) if l > 0.0 && merge_flops > 0.0 => {
                format!(
                    "; +{l:.3} s/pass = {:.1} GFLOP/s of merging",
                    merge_flops / l / 1e9
                )
            }
            _ => String::new(),
        };
        // The engine thread's extra CPU a later pass, against the plain
        // row's passes of the same indices.
        let engine = plain_of(rows, r).and_then(|p| {
            let own = later_mean(&m.engine_cpu, m.engine_cpu.len())?;
            Some(own - later_mean(&p.engine_cpu, m.engine_cpu.len())?)
        });
        let engine = engine.map_or(String::new(), |e| {
            format!("; engine thread {:+.2} ms CPU a pass", e * 1e3)
        });
        println!(
            "  {:<10} {:<7} {:<14}: {work}{rate}{engine}",
            r.mode.to_string(),
            r.policy.to_string(),
            lm.name()
        );
    }
    let checks: Vec<String> = rows
        .iter()
        .filter_map(|r| {
            let l = r.outcome.as_ref().ok()?.lora.as_ref()?;
            Some(match &l.check {
                Ok(_) => format!(
                    "{} {} {}: ok",
                    r.mode,
                    r.policy,
                    r.lora.map_or("", |m| m.name())
                ),
                Err(e) => format!("{} {}: FAILED: {e}", r.mode, r.policy),
            })
        })
        .collect();
    if let Some(first) = rows
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok()?.lora.as_ref()?.check.as_ref().ok())
        .next()
    {
        println!("LoRA read-back check (per LoRA row; e.g. {first}):");
        println!("  {}", checks.join("; "));
    }
}

/// What every JSON row shares.
struct JsonCtx<'a> {
    args: &'a E2eArgs,
    model_bytes: usize,
    denoiser_bytes: usize,
    largest_layer: usize,
    link: f64,
    info: &'a offload_runtime::device::DeviceInfo,
    reference: Option<f64>,
    rows: &'a [Row],
    lora: Option<&'a LoraSet>,
    matmul_flops_per_pass: u64,
}

fn json_row(r: &Row, ctx: &JsonCtx<'_>) -> String {
    let args = ctx.args;
    let mut o = serde_json::json!({
        "mode": r.mode.to_string(),
        "lora_mode": r.lora.map_or("none", |m| m.name()),
        "policy": r.policy.to_string(),
        "prefetch_depth": args.prefetch_depth,
        "host_policy": args.host_policy,
        "staging_write_combined": args.staging_write_combined,
        "uploads": format!("{:?}", args.uploads).to_lowercase(),
        "compute_priority": StreamPriority::from(args.compute_priority).to_string(),
        "source": format!("{:?}", args.source).to_lowercase(),
        "stall_timing": !args.no_stall_timing,
        "activations": format!("{:?}", args.activations).to_lowercase(),
        "reference": r.reference,
        "model_bytes": ctx.model_bytes,
        "denoiser_bytes": ctx.denoiser_bytes,
        "device_mem_bytes": r.device_mem,
        "high_watermark_bytes": r.high,
        "largest_layer_bytes": ctx.largest_layer,
        "link_gbps": ctx.link,
        "device": format!("{:?}: {}", ctx.info.kind, ctx.info.name),
        "tokens": args.tokens,
        "steps": r.steps,
        "matmul_flops_per_pass": ctx.matmul_flops_per_pass,
        "lora_file_bytes": ctx.lora.map(|s| s.file_bytes),
        "lora_factor_bytes": ctx.lora.map(|s| s.factor_bytes),
        "lora_count": ctx.lora.map(|s| s.bindings.len()),
        "device_counts": r
            .device_counts
            .iter()
            .map(|&(name, n)| (name.to_string(), serde_json::Value::from(n)))
            .collect::<serde_json::Map<_, _>>(),
    });
    match &r.outcome {
        Ok(m) => {
            let (first, later, frac) = overheads(ctx.rows, r).unwrap_or((0.0, None, None));
            // Merge flops: the merged weight bytes of a pass (the runtime's
            // counter) × the set's multiply-adds per merged byte × 2.
            let macs_per_byte = ctx.lora.map_or(0.0, |s| s.macs_per_byte());
            let relative = if r.lora.is_some() {
                reference_at(ctx.rows, r.steps)
            } else {
                ctx.reference
            };
            let extra = serde_json::json!({
                "fits": true,
                "it_per_s": m.it_per_s,
                "relative_to_none": relative.map(|x| m.it_per_s / x),
                "generation_s": m.generation_s,
                "page_waste_bytes": m.page_waste,
                "bytes_h2d_per_pass": m.per_pass,
                "bytes_h2d_first_pass": m.first_pass,
                "bytes_h2d_per_generation": m.per_generation,
                "peak_device_bytes": m.peak_device,
                "peak_host_bytes": m.peak_host,
                "rss_bytes": m.rss,
                "stall_fraction": m.stall_fraction,
                "compute_s_per_pass": m.compute_s_per_pass,
                "pass_s": m.pass_s,
                "first_pass_s": m.passes.first(),
                "later_pass_s": m.later_pass_s(),
                "passes_s": m.passes,
                "engine_queue_s_per_pass": later_mean(&m.engine_queue, m.engine_queue.len()),
                "engine_cpu_s_per_pass": later_mean(&m.engine_cpu, m.engine_cpu.len()),
                "engine_acquire_s_per_pass": later_mean(&m.engine_acquire, m.engine_acquire.len()),
                "engine_release_s_per_pass": later_mean(&m.engine_release, m.engine_release.len()),
                "lora_overhead_first_s": first,
                "lora_overhead_later_s": later,
                "lora_overhead_later_fraction": frac,
                "lora_set_s": m.lora.as_ref().map(|l| l.set_s),
                "lora_tensors_changed": m.lora.as_ref().map(|l| l.tensors_changed),
                "lora_tensors_rederived": m.lora.as_ref().map(|l| l.tensors_rederived),
                "lora_factor_device_bytes": m.lora.as_ref().map(|l| l.factor_device_bytes),
                "merges_first_pass": m.merges_first,
                "merges_per_pass": m.merges_per_pass,
                "merged_bytes_per_pass": m.merged_bytes_per_pass,
                "merge_flops_per_pass": 2.0 * m.merged_bytes_per_pass * macs_per_byte,
                "lora_path_flops_per_pass": m.lora_path_flops_per_pass,
                "lora_check": m.lora.as_ref().map(|l| match &l.check {
                    Ok(s) => serde_json::json!({ "passed": true, "what": s }),
                    Err(e) => serde_json::json!({ "passed": false, "what": e }),
                }),
            });
            if let (Some(a), Some(b)) = (o.as_object_mut(), extra.as_object()) {
                a.extend(b.clone());
            }
        }
        Err(msg) => {
            if let Some(a) = o.as_object_mut() {
                a.insert("fits".into(), serde_json::Value::Bool(false));
                a.insert("error".into(), serde_json::Value::String(msg.clone()));
                for k in [
                    "it_per_s",
                    "relative_to_none",
                    "generation_s",
                    "page_waste_bytes",
                    "bytes_h2d_per_pass",
                    "bytes_h2d_first_pass",
                    "bytes_h2d_per_generation",
                    "peak_device_bytes",
                    "peak_host_bytes",
                    "rss_bytes",
                    "stall_fraction",
                    "compute_s_per_pass",
                    "pass_s",
                    "first_pass_s",
                    "later_pass_s",
                    "passes_s",
                    "engine_queue_s_per_pass",
                    "engine_cpu_s_per_pass",
                    "engine_acquire_s_per_pass",
                    "engine_release_s_per_pass",
                    "lora_overhead_first_s",
                    "lora_overhead_later_s",
                    "lora_overhead_later_fraction",
                    "lora_set_s",
                    "lora_tensors_changed",
                    "lora_tensors_rederived",
                    "lora_factor_device_bytes",
                    "merges_first_pass",
                    "merges_per_pass",
                    "merged_bytes_per_pass",
                    "merge_flops_per_pass",
                    "lora_path_flops_per_pass",
                    "lora_check",
                ] {
                    a.insert(k.into(), serde_json::Value::Null);
                }
            }
        }
    }
    o.to_string()
}

#[cfg(test)]
mod tests {
    use super::{
        counts_since, later_mean, median, overlap, ratios_by_round, Measured, Mode, Policy, Row,
    };

    #[test]
    fn a_rows_counts_are_what_it_added() {
        let before = [("products_lt", 10), ("lt_plans", 3)];
        let after = vec![("products_lt", 25), ("lt_plans", 3), ("merges_fma", 4)];
        assert_eq!(
            counts_since(&before, after),
            [("products_lt", 15), ("lt_plans", 0), ("merges_fma", 4)]
        );
        assert!(counts_since(&[], Vec::new()).is_empty());
    }

    /// A plain row whose passes took `passes` seconds and moved `per_pass`
    /// bytes each after the first.
    fn row(reference: bool, mode: Mode, passes: &[f64], per_pass: u64) -> Row {
        let n = passes.len() as f64;
        let sum: f64 = passes.iter().sum();
        Row {
            mode,
            policy: Policy::Planned,
            lora: None,
            reference,
            outcome: Ok(Measured {
                it_per_s: n / sum,
                generation_s: sum,
                first_pass: per_pass,
                per_pass,
                per_generation: per_pass * passes.len() as u64,
                peak_device: 0,
                peak_host: 0,
                page_waste: 0,
                stall_fraction: 0.0,
                compute_s_per_pass: 0.0,
                pass_s: sum / n,
                rss: 0,
                passes: passes.to_vec(),
                engine_queue: Vec::new(),
                engine_cpu: Vec::new(),
                engine_acquire: Vec::new(),
                engine_release: Vec::new(),
                other_s: 0.0,
                merges_first: 0,
                merges_per_pass: 0.0,
                merged_bytes_per_pass: 0.0,
                lora_path_flops_per_pass: 0.0,
                lora: None,
            }),
            device_mem: 0,
            high: 0,
            steps: passes.len(),
            device_counts: Vec::new(),
        }
    }

    /// Each round's ratio is against its own round's none row, and the
    /// median of an even count is the mean of the middle two.
    #[test]
    fn each_round_is_against_its_own_reference() {
        let first = vec![
            row(true, Mode::None, &[0.02, 0.010, 0.010], 0),
            row(false, Mode::Sequential, &[0.02, 0.011, 0.011], 1),
        ];
        let later = vec![
            vec![
                row(true, Mode::None, &[0.02, 0.020, 0.020], 0),
                row(false, Mode::Sequential, &[0.02, 0.022, 0.022], 1),
            ],
            vec![
                row(true, Mode::None, &[0.02, 0.010, 0.010], 0),
                row(false, Mode::Sequential, &[0.02, 0.013, 0.013], 1),
            ],
        ];
        let r = ratios_by_round(&first, &later, 1.0);
        assert_eq!(r.len(), 1);
        let (m, p, v) = &r[0];
        assert_eq!((*m, *p), (Mode::Sequential, Policy::Planned));
        let want = [1.1, 1.1, 1.3];
        assert!(
            v.len() == 3 && v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9),
            "{v:?}"
        );
        assert!((median(v).unwrap() - 1.1).abs() < 1e-9);
        assert_eq!(median(&[1.0, 3.0, 2.0, 4.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    /// The overlap ratio compares later passes with later passes: a slow
    /// first pass of the reference (a warm-up) does not widen the bound,
    /// and the row's own first pass does not count against it.
    #[test]
    fn the_overlap_ratio_compares_the_passes_after_the_first() {
        let reference = row(true, Mode::None, &[0.020, 0.010, 0.010, 0.010], 0);
        let r = reference.outcome.as_ref().unwrap();
        assert_eq!(r.steady_pass_s(), 0.010);
        // The mean of every pass would have been 0.0125.
        assert_eq!(r.pass_s, 0.0125);
        // 2 MB a later pass over a 1 GB/s link: 2 ms, under the 10 ms compute.
        let seq = row(
            false,
            Mode::Sequential,
            &[0.030, 0.011, 0.012, 0.013],
            2_000_000,
        );
        let (pass, bound, ratio) = overlap(&seq, r.steady_pass_s(), 1.0).unwrap();
        assert!((pass - 0.012).abs() < 1e-12, "{pass}");
        assert_eq!(bound, 0.010);
        assert!((ratio - 1.2).abs() < 1e-9, "{ratio}");
        // Transfer-bound: 20 MB a pass at 1 GB/s is 20 ms.
        let (_, bound, _) = overlap(
            &row(false, Mode::Sequential, &[0.03; 3], 20_000_000),
            0.010,
            1.0,
        )
        .unwrap();
        assert!((bound - 0.020).abs() < 1e-12, "{bound}");
        // The reference itself has no ratio, nor has a row without a link rate.
        assert!(overlap(&reference, 0.010, 1.0).is_none());
        assert!(overlap(&seq, 0.010, 0.0).is_none());
        // One pass: that pass.
        let one = row(false, Mode::Sequential, &[0.015], 0);
        assert_eq!(one.outcome.as_ref().unwrap().steady_pass_s(), 0.015);
    }

    /// A LoRA row of n steps is compared with the plain row's passes 2 to n.
    #[test]
    fn later_means_cover_the_passes_after_the_first_up_to_n() {
        let passes = [9.0, 4.0, 2.0, 1.0, 1.0];
        assert_eq!(later_mean(&passes, 3), Some(3.0));
        assert_eq!(later_mean(&passes, 5), Some(2.0));
        assert_eq!(later_mean(&passes, 50), Some(2.0));
        assert_eq!(later_mean(&passes, 1), Some(9.0));
        assert_eq!(later_mean(&passes[..1], 5), Some(9.0));
        assert_eq!(later_mean(&[], 5), None);
    }
}
