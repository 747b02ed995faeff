//! `offload bench merge`: LoRA merge throughput against a plain copy of W
//! (the memory bound) and the per-adapter gemm a user would otherwise run.
//!
//! For each backend, W dtype, rank and number of stacked adapters the bench
//! measures, in one process and on the same buffers:
//!
//! - **ours**: one merge of all adapters stacked: [`merge_cpu`] on the CPU,
//!   `CudaDevice::merge_lowrank` (one launch) on a GPU;
//! - **copy**: a plain copy of W's bytes (W read once and written once, as
//!   the merge does): `copy_from_slice` on as many threads as ours, or
//!   `cuMemcpyDtoDAsync`;
//! - **baseline**: on the CPU, the `gemm` crate's `W += s · B · A`, one call
//!   per adapter, on the same thread count (`Parallelism::Rayon(threads)`,
//!   on rayon's global pool). A 16-bit W is converted to f32 first and back
//!   after, and the 16-bit factors to f32, as a user of an f32 gemm must
//!   (on the same threads, with `half`'s slice conversions); those
//!   conversions are part of the baseline's time. Its f32 buffers are
//!   allocated once, outside the timing. On a GPU, one cuBLAS
//!   `cublasGemmEx` with beta = 1 per adapter (`CudaDevice::gemm_accumulate`).
//!
//! Rates are GB/s of W traffic: `2 · |W| / t` (bytes of W read plus
//! written). Each time is the median of `--iters` samples after one
//! warm-up. So that W comes from memory and not from a cache, every
//! measurement rotates through distinct copies of W (`--pool-mib` of them in
//! all: 256 MiB by default, beyond the CPU's L3 and the GPU's L2). On the
//! CPU one sample is one call on the next copy; on a GPU one sample is one
//! pass over all copies queued back to back on one stream, timed with CUDA
//! events (`cuEventElapsedTime`, the GPU's clock, not wall time), divided by
//! the number of copies.
//!
//! Once per configuration, ours and the baseline run on fresh copies of the
//! same W and their results are compared: the largest difference must be
//! within a few units in the last place of W's dtype (1e-4 relative for
//! f32) of `max(|W| + |ΔW|)`, or the run fails, so the bench cannot report
//! the speed of a broken kernel.
//!
//! With `--tensors N` (N > 1, GPU only), each GPU configuration is also
//! merged N copies of W at a time with one `CudaDevice::merge_lowrank_batch`
//! call (the batched kernels: one launch for up to 16 tensors of up to 4
//! adapters; more adapters fall back to a launch per tensor), against the
//! same merges one launch per copy ("ours"), on the same pool; its result
//! on fresh copies must equal ours bit for bit or the run fails. The gain
//! shows where launches cost more than the merge itself: small W (e.g.
//! `--rows 320 --cols 320`).
//!
//! Targets (the PASS/FAIL column; never asserted by the tests): on the CPU
//! ours beats the gemm baseline; on a GPU a stacked merge of more than one
//! adapter beats one gemm per adapter, and for rank ≤ 32 ours takes at most
//! 1.5× the time of the copy.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::time::Instant;

use clap::{Args, ValueEnum};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use offload_kernels::{merge_cpu, Adapter, Delta, Dtype, Factor, MergeSpec};

use crate::rng::Rng;

/// Options of `offload bench merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeBenchArgs {
    /// Rows of W (output features). The default W, 1280 × 5120, is SDXL's
    /// `ff.net.2` in the 1280-channel transformer blocks (12.5 MiB in f16).
    #[arg(long, default_value_t = 1280)]
    pub rows: usize,
    /// Columns of W (input features).
    #[arg(long, default_value_t = 5120)]
    pub cols: usize,
    /// Element type of W: f16, bf16, f32, or all three.
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub dtype: DtypeArg,
    /// Ranks of the adapters (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [8, 32, 128])]
    pub ranks: Vec<usize>,
    /// Numbers of adapters stacked in one merge (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    pub adapters: Vec<usize>,
    /// Timed samples per measurement (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// CPU threads for ours, the gemm baseline and the copy (default: all).
    #[arg(long)]
    pub threads: Option<NonZeroUsize>,
    /// Where to run: the CPU (`host`), the GPU (`cuda`), or `auto`: the CPU,
    /// plus the GPU when one answers.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// MiB of distinct copies of W each measurement rotates through (at
    /// least 2 copies, at most 128), so that W is read from memory, not a
    /// cache.
    #[arg(long, default_value_t = 256)]
    pub pool_mib: usize,
    /// Seed of W's and the factors' values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The GPU kernel for low-rank merges: `auto` (the runtime's choice:
    /// the pipelined tensor-core kernel where the factors are 16-bit and
    /// some rank is 16 or more or the ranks add up to more than 16; with
    /// `OFFLOAD_MERGE_KERNEL=tensor-cores`, the unpipelined one from 32;
    /// the streaming kernel for ranks adding up to at most 8 into a 16-bit
    /// W of 2²⁴ elements or more; fp32 FMA otherwise), `fma` (fp32 FMA), `tensor-cores` (the unpipelined tensor-core kernel),
    /// `pipelined` (the tensor-core kernel that streams the factors
    /// through a cp.async pipeline), or `streaming` (fp32 FMA with the down
    /// factors in registers, for ranks adding up to at most 32; fp32 FMA
    /// past that; one launch per tensor, also with `--tensors`).
    /// Only with `--backend cuda` or `auto`.
    #[arg(long, value_enum, default_value_t = KernelArg::Auto)]
    pub kernel: KernelArg,
    /// GPU only: also merge this many copies of W per batched call
    /// (`CudaDevice::merge_lowrank_batch`: one launch per 16 copies when the
    /// adapters are at most 4, else one launch per copy) and compare with one
    /// launch per copy; 1 (the default) measures no batch.
    #[arg(long, default_value_t = 1)]
    pub tensors: usize,
    /// Print one JSON object with every result instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `--kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelArg {
    /// The runtime's own choice.
    Auto,
    /// The fp32 FMA kernel.
    Fma,
    /// The tensor-core kernel.
    TensorCores,
    /// The pipelined tensor-core kernel.
    Pipelined,
    /// The streaming fp32 FMA kernels (ranks adding up to at most 32).
    Streaming,
}

/// `--dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE binary32.
    F32,
    /// f16, bf16 and f32.
    All,
}

impl DtypeArg {
    fn dtypes(self) -> Vec<Dtype> {
        match self {
            DtypeArg::F16 => vec![Dtype::F16],
            DtypeArg::Bf16 => vec![Dtype::BF16],
            DtypeArg::F32 => vec![Dtype::F32],
            DtypeArg::All => vec![Dtype::F16, Dtype::BF16, Dtype::F32],
        }
    }
}

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The CPU only.
    Host,
    /// The GPU only (fails without one).
    Cuda,
    /// The CPU, plus the GPU when one answers.
    Auto,
}

/// The factors' dtype for a W of `dtype`: bf16 for bf16, else f16 (the
/// dtypes LoRA files ship in; cuBLAS takes f16 factors into an f32 W).
fn factor_dtype(dtype: Dtype) -> Dtype {
    match dtype {
        Dtype::BF16 => Dtype::BF16,
        Dtype::F16 | Dtype::F32 => Dtype::F16,
    }
}

/// One configuration's figures.
#[derive(Clone, Debug)]
struct Row {
    backend: &'static str,
    /// Which merge kernel ran: "cpu", "fp32 FMA", "tensor cores" or "pipelined tensor cores".
    kernel: &'static str,
    dtype: Dtype,
    factor_dtype: Dtype,
    rank: usize,
    adapters: usize,
    /// Bytes of W.
    w_bytes: usize,
    /// Copies of W each measurement rotated through.
    copies: usize,
    /// Median seconds per merge of one W: ours, the copy, the baseline.
    ours: f64,
    copy: f64,
    baseline: f64,
    baseline_name: &'static str,
    /// Largest |ours − baseline| over W, the bound it was held to, and
    /// whether it held.
    max_diff: f64,
    tolerance: f64,
    agree: bool,
    /// With `--tensors` N > 1 (GPU): N, the median seconds per W of the
    /// batched merges, and whether their result equalled ours bit for bit.
    batched: Option<Batched>,
}

/// The batched measurement of a GPU row (`--tensors`).
#[derive(Clone, Debug)]
struct Batched {
    tensors: usize,
    seconds: f64,
    identical: bool,
}

impl Row {
    fn gbps(&self, t: f64) -> f64 {
        2.0 * self.w_bytes as f64 / t / 1e9
    }

    /// Time of ours over time of the copy (1 = at the memory bound).
    fn ratio_to_copy(&self) -> f64 {
        self.ours / self.copy
    }

    /// Time of the baseline over time of ours.
    fn speedup(&self) -> f64 {
        self.baseline / self.ours
    }

    /// The targets for this row, each with whether it is met.
    fn targets(&self) -> Vec<(String, bool)> {
        let mut t = Vec::new();
        if self.backend == "cpu" {
            t.push(("beats the gemm baseline".to_string(), self.speedup() > 1.0));
        } else {
            if self.adapters > 1 {
                t.push((
                    "beats one gemm per adapter".to_string(),
                    self.speedup() > 1.0,
                ));
            }
            if self.rank <= 32 {
                t.push((
                    "within 1.5x of the copy".to_string(),
                    self.ratio_to_copy() <= 1.5,
                ));
            }
        }
        t
    }

    /// PASS, FAIL, or "-" when no target applies; a disagreement with the
    /// baseline is always FAIL.
    fn verdict(&self) -> &'static str {
        let t = self.targets();
        if !self.agree || t.iter().any(|(_, ok)| !ok) {
            "FAIL"
        } else if t.is_empty() {
            "-"
        } else {
            "PASS"
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend,
            "kernel": self.kernel,
            "dtype": self.dtype.name(),
            "factor_dtype": self.factor_dtype.name(),
            "rank": self.rank,
            "adapters": self.adapters,
            "w_bytes": self.w_bytes,
            "copies": self.copies,
            "ours_ms": self.ours * 1e3,
            "copy_ms": self.copy * 1e3,
            "baseline_ms": self.baseline * 1e3,
            "ours_gbps": self.gbps(self.ours),
            "copy_gbps": self.gbps(self.copy),
            "baseline_gbps": self.gbps(self.baseline),
            "ratio_to_copy": self.ratio_to_copy(),
            "speedup": self.speedup(),
            "baseline": self.baseline_name,
            "max_abs_diff": self.max_diff,
            "tolerance": self.tolerance,
            "agree": self.agree,
            "tensors": self.batched.as_ref().map(|b| b.tensors),
            "batched_ms": self.batched.as_ref().map(|b| b.seconds * 1e3),
            "batched_gbps": self.batched.as_ref().map(|b| self.gbps(b.seconds)),
            "batched_speedup": self.batched.as_ref().map(|b| self.ours / b.seconds),
            "batched_identical": self.batched.as_ref().map(|b| b.identical),
            "targets": self.targets().iter().map(|(name, ok)| serde_json::json!({"target": name, "met": ok})).collect::<Vec<_>>(),
            "verdict": self.verdict(),
        })
    }
}

/// What one backend's run was on, for the header.
#[derive(Clone, Debug)]
struct Setup {
    backend: &'static str,
    /// CPU model or GPU name, with details.
    device: String,
    threads: Option<usize>,
}

/// Runs `offload bench merge`.
pub fn run(args: &MergeBenchArgs) -> Result<(), String> {
    check_args(args)?;
    let threads = args
        .threads
        .unwrap_or_else(offload_kernels::default_threads);
    let mut rows = Vec::new();
    let mut setups = Vec::new();
    let mut notes = Vec::new();
    if args.backend != BackendArg::Host {
        match gpu::open() {
            Ok(dev) => {
                let (setup, r) = gpu::bench(&dev, args)?;
                setups.push(setup);
                rows.extend(r);
            }
            Err(e) if args.backend == BackendArg::Cuda => {
                return Err(format!("--backend cuda: {e}"))
            }
            Err(e) => notes.push(format!("no GPU rows: {e}")),
        }
    }
    if args.backend != BackendArg::Cuda {
        let (setup, r) = cpu_bench(args, threads)?;
        setups.push(setup);
        rows.extend(r);
    }
    if args.json {
        let doc = serde_json::json!({
            "bench": "merge",
            "rows": args.rows,
            "cols": args.cols,
            "iters": args.iters,
            "pool_mib": args.pool_mib,
            "seed": args.seed,
            "setups": setups.iter().map(|s| serde_json::json!({
                "backend": s.backend,
                "device": s.device,
                "threads": s.threads,
            })).collect::<Vec<_>>(),
            "notes": notes,
            "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        println!("{doc}");
    } else {
        print!("{}", table(args, &setups, &notes, &rows));
    }
    let mut bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.agree)
        .map(|r| {
            format!(
                "{} {} rank {} x{}: max |ours - baseline| = {:.3e} > {:.3e}",
                r.backend, r.dtype, r.rank, r.adapters, r.max_diff, r.tolerance
            )
        })
        .collect();
    bad.extend(
        rows.iter()
            .filter(|r| r.batched.as_ref().is_some_and(|b| !b.identical))
            .map(|r| {
                format!(
                    "{} {} rank {} x{}: the batched merges differ from one launch per tensor",
                    r.backend, r.dtype, r.rank, r.adapters
                )
            }),
    );
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "our merge and the baseline disagree, the figures measure a broken kernel: {}",
            bad.join("; ")
        ))
    }
}

fn check_args(args: &MergeBenchArgs) -> Result<(), String> {
    if args.rows == 0 || args.cols == 0 {
        return Err("--rows and --cols must be positive".into());
    }
    if args.iters == 0 {
        return Err("--iters must be positive".into());
    }
    if args.ranks.is_empty() || args.ranks.contains(&0) {
        return Err("--ranks must be positive".into());
    }
    if args.adapters.is_empty() || args.adapters.contains(&0) {
        return Err("--adapters must be positive".into());
    }
    if args.kernel != KernelArg::Auto && args.backend == BackendArg::Host {
        return Err("--kernel chooses a GPU kernel: use it with --backend cuda or auto".into());
    }
    if args.tensors == 0 {
        return Err("--tensors must be positive".into());
    }
    if args.tensors > 1 && args.backend == BackendArg::Host {
        return Err("--tensors batches GPU launches: use it with --backend cuda or auto".into());
    }
    if let Some(&n) = args.adapters.iter().find(|&&n| n > MAX_GPU_ADAPTERS) {
        return Err(format!(
            "--adapters {n}: at most {MAX_GPU_ADAPTERS} adapters in one merge"
        ));
    }
    args.rows
        .checked_mul(args.cols)
        .and_then(|e| e.checked_mul(4))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or("--rows × --cols is too large")?;
    Ok(())
}

/// The most adapters one merge takes (one launch of the CUDA kernel).
#[cfg(feature = "cuda")]
const MAX_GPU_ADAPTERS: usize = offload_kernels::cuda::MAX_ADAPTERS;
#[cfg(not(feature = "cuda"))]
const MAX_GPU_ADAPTERS: usize = 8;

fn table(args: &MergeBenchArgs, setups: &[Setup], notes: &[String], rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "LoRA merge throughput: W [{}, {}], GB/s = (bytes of W read + written) / time, median of {} after a warm-up",
        args.rows, args.cols, args.iters
    );
    for s in setups {
        let threads = s
            .threads
            .map_or(String::new(), |t| format!(", {t} thread(s)"));
        let _ = writeln!(
            out,
            "{}: {}{threads}; each measurement rotates through {} MiB of copies of W",
            s.backend, s.device, args.pool_mib
        );
    }
    for n in notes {
        let _ = writeln!(out, "{n}");
    }
    let _ = writeln!(
        out,
        "baselines: cpu = gemm crate, W += s·B·A per adapter in f32 (16-bit W and factors converted, conversions timed); cuda = cublasGemmEx, beta = 1, per adapter"
    );
    let _ = writeln!(
        out,
        "\n| backend | kernel | W | rank | adapters | ours GB/s | ours ÷ copy | copy GB/s | baseline GB/s | speed-up | max abs diff | target |"
    );
    let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2}× | {:.1e} | {} |",
            r.backend,
            r.kernel,
            r.dtype.name(),
            r.rank,
            r.adapters,
            rate(r.gbps(r.ours)),
            r.ratio_to_copy(),
            rate(r.gbps(r.copy)),
            rate(r.gbps(r.baseline)),
            r.speedup(),
            r.max_diff,
            r.verdict()
        );
    }
    if rows.iter().any(|r| r.batched.is_some()) {
        let _ = writeln!(
            out,
            "\n| backend | kernel | W | rank | adapters | tensors per launch | ours µs per W | batched µs per W | batched GB/s | speed-up | bit-identical |"
        );
        let _ = writeln!(out, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|");
        for r in rows {
            if let Some(b) = &r.batched {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {:.2}× | {} |",
                    r.backend,
                    r.kernel,
                    r.dtype.name(),
                    r.rank,
                    r.adapters,
                    b.tensors,
                    r.ours * 1e6,
                    b.seconds * 1e6,
                    rate(r.gbps(b.seconds)),
                    r.ours / b.seconds,
                    if b.identical { "yes" } else { "NO" }
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nours ÷ copy: time of our merge over that of a plain copy of W (1 = the memory bound). speed-up: baseline time over ours. max abs diff: largest |ours - baseline| over W (checked against a few ulps of max |W| + |ΔW|).\ntargets: cpu: beats the gemm baseline; cuda: more than one adapter beats one gemm per adapter, and ours ÷ copy <= 1.5 for rank <= 32."
    );
    out
}

/// A rate with three significant digits or one decimal, whichever is more.
fn rate(gbps: f64) -> String {
    if gbps < 10.0 {
        format!("{gbps:.2}")
    } else {
        format!("{gbps:.1}")
    }
}

// ---------------------------------------------------------------------------
// Data

/// Uniform values in [-1, 1).
fn uniform(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

/// `v` encoded as little-endian `dtype` elements, in 4-byte-aligned storage
/// (`u32` words, the last possibly half used).
fn encode(dtype: Dtype, v: &[f32]) -> Vec<u32> {
    let mut words = vec![0u32; (v.len() * dtype.size_in_bytes()).div_ceil(4)];
    match dtype {
        Dtype::F32 => bytemuck::cast_slice_mut::<u32, f32>(&mut words).copy_from_slice(v),
        Dtype::F16 => {
            bytemuck::cast_slice_mut::<u32, f16>(&mut words)[..v.len()].convert_from_f32_slice(v)
        }
        Dtype::BF16 => {
            bytemuck::cast_slice_mut::<u32, bf16>(&mut words)[..v.len()].convert_from_f32_slice(v)
        }
    }
    words
}

/// `n` elements of `dtype` in `bytes`, as f64.
fn decode(dtype: Dtype, bytes: &[u8], n: usize) -> Vec<f64> {
    let b = &bytes[..n * dtype.size_in_bytes()];
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
    }
}

/// One adapter's factors, encoded in the factor dtype.
struct HostAdapter {
    scale: f32,
    rank: usize,
    /// B, `[rows, rank]`.
    up: Vec<u32>,
    /// A, `[rank, cols]`.
    down: Vec<u32>,
}

/// The adapters of one configuration: factors uniform in [-0.5, 0.5),
/// scale `2 / √rank`, so each adapter's ΔW has a standard deviation of
/// about 1/6 whatever the rank (W is uniform in [-1, 1)).
fn make_adapters(
    rng: &mut Rng,
    fdtype: Dtype,
    rows: usize,
    cols: usize,
    rank: usize,
    count: usize,
) -> Vec<HostAdapter> {
    let half_range = |v: Vec<f32>| v.into_iter().map(|x| 0.5 * x).collect::<Vec<_>>();
    (0..count)
        .map(|_| HostAdapter {
            scale: 2.0 / (rank as f32).sqrt(),
            rank,
            up: encode(fdtype, &half_range(uniform(rng, rows * rank))),
            down: encode(fdtype, &half_range(uniform(rng, rank * cols))),
        })
        .collect()
}

/// The first `len` bytes of 4-byte-aligned storage.
fn bytes(words: &[u32], len: usize) -> &[u8] {
    &bytemuck::cast_slice(words)[..len]
}

fn bytes_mut(words: &mut [u32], len: usize) -> &mut [u8] {
    &mut bytemuck::cast_slice_mut(words)[..len]
}

/// Merge adapters over `adapters`' factors for a `[rows, cols]` W, with the
/// up factors restricted to rows `r0..r0 + rows` (a block of a larger W).
fn merge_adapters(
    adapters: &[HostAdapter],
    fdtype: Dtype,
    rows: usize,
    cols: usize,
) -> Vec<Adapter<'_>> {
    let fs = fdtype.size_in_bytes();
    adapters
        .iter()
        .map(|a| {
            let up_all: &[u8] = bytemuck::cast_slice(&a.up);
            Adapter {
                scale: a.scale,
                delta: Delta::LowRank {
                    up: Factor::new(&up_all[..rows * a.rank * fs], fdtype, rows, a.rank),
                    down: Factor::new(bytes(&a.down, a.rank * cols * fs), fdtype, a.rank, cols),
                },
            }
        })
        .collect()
}

/// The agreement check: the largest |ours − baseline| over W, and the bound
/// it must stay within: a few units in the last place of `dtype` (1e-4
/// relative for f32, whose results differ only in summation order) at the
/// magnitude `max(|W| + |ΔW|)`, ΔW taken from our result.
fn agreement(dtype: Dtype, w0: &[f64], ours: &[f64], base: &[f64]) -> (f64, f64) {
    let mut max_diff = 0f64;
    let mut scale = 0f64;
    for ((&w, &o), &b) in w0.iter().zip(ours).zip(base) {
        let d = (o - b).abs();
        // NaN anywhere must fail the check, not vanish in `max`.
        max_diff = if d.is_nan() {
            f64::NAN
        } else {
            max_diff.max(d)
        };
        scale = scale.max(w.abs() + (o - w).abs());
    }
    let rel = match dtype {
        Dtype::F16 => 2f64.powi(-8),
        Dtype::BF16 => 2f64.powi(-5),
        Dtype::F32 => 1e-4,
    };
    (max_diff, rel * scale)
}

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// How many copies of a `w_bytes` W make `pool_mib` MiB: at least 2.
fn pool_copies(pool_mib: usize, w_bytes: usize) -> usize {
    (pool_mib << 20).div_ceil(w_bytes).clamp(2, MAX_COPIES)
}

/// The most copies of W a pool holds (for a tiny W).
const MAX_COPIES: usize = 128;

// ---------------------------------------------------------------------------
// CPU

/// The CPU's model name, from /proc/cpuinfo where there is one.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs `f` on matching chunks of `src` and `dst` on `threads` threads (the
/// calling thread takes the first chunk).
fn par_zip<A: Sync, B: Send>(
    threads: usize,
    src: &[A],
    dst: &mut [B],
    f: impl Fn(&[A], &mut [B]) + Sync,
) {
    assert_eq!(src.len(), dst.len());
    let chunk = src
        .len()
        .div_ceil(threads.max(1))
        .next_multiple_of(64)
        .max(64);
    let f = &f;
    std::thread::scope(|s| {
        let mut pairs = src.chunks(chunk).zip(dst.chunks_mut(chunk));
        let first = pairs.next();
        for (a, b) in pairs {
            s.spawn(move || f(a, b));
        }
        if let Some((a, b)) = first {
            f(a, b);
        }
    });
}

/// The plain copy: `copy_from_slice` on `threads` threads.
fn copy_par(threads: usize, src: &[u32], dst: &mut [u32]) {
    par_zip(threads, src, dst, |a, b| b.copy_from_slice(a));
}

/// `(&v[a], &mut v[b])` for `a != b`.
fn pair_mut<T>(v: &mut [T], a: usize, b: usize) -> (&T, &mut T) {
    assert_ne!(a, b);
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&hi[0], &mut lo[b])
    }
}

/// The CPU baseline's state: f32 buffers allocated once.
struct GemmBaseline<'a> {
    dtype: Dtype,
    fdtype: Dtype,
    rows: usize,
    cols: usize,
    threads: usize,
    adapters: &'a [HostAdapter],
    w32: Vec<f32>,
    factors32: Vec<(Vec<f32>, Vec<f32>)>,
}

impl<'a> GemmBaseline<'a> {
    fn new(
        dtype: Dtype,
        fdtype: Dtype,
        rows: usize,
        cols: usize,
        threads: usize,
        adapters: &'a [HostAdapter],
    ) -> Self {
        let w32 = if dtype == Dtype::F32 {
            Vec::new()
        } else {
            vec![0f32; rows * cols]
        };
        let factors32 = adapters
            .iter()
            .map(|a| (vec![0f32; rows * a.rank], vec![0f32; a.rank * cols]))
            .collect();
        GemmBaseline {
            dtype,
            fdtype,
            rows,
            cols,
            threads,
            adapters,
            w32,
            factors32,
        }
    }

    /// `src` (16-bit `dtype` elements in words) to f32, on the threads.
    fn to_f32(threads: usize, dtype: Dtype, src: &[u32], dst: &mut [f32]) {
        let n = dst.len();
        match dtype {
            Dtype::F16 => par_zip(
                threads,
                &bytemuck::cast_slice::<u32, f16>(src)[..n],
                dst,
                |a, b| a.convert_to_f32_slice(b),
            ),
            Dtype::BF16 => par_zip(
                threads,
                &bytemuck::cast_slice::<u32, bf16>(src)[..n],
                dst,
                |a, b| a.convert_to_f32_slice(b),
            ),
            Dtype::F32 => par_zip(
                threads,
                &bytemuck::cast_slice::<u32, f32>(src)[..n],
                dst,
                |a, b| b.copy_from_slice(a),
            ),
        }
    }

    /// `W += Σ sᵢ · Bᵢ · Aᵢ` on `w` (W's elements in words), as a user of
    /// an f32 gemm does it.
    fn run(&mut self, w: &mut [u32]) {
        let (rows, cols, t) = (self.rows, self.cols, self.threads);
        for (a, (up, down)) in self.adapters.iter().zip(&mut self.factors32) {
            Self::to_f32(t, self.fdtype, &a.up, up);
            Self::to_f32(t, self.fdtype, &a.down, down);
        }
        let n = rows * cols;
        let dst: &mut [f32] = match self.dtype {
            Dtype::F32 => &mut bytemuck::cast_slice_mut::<u32, f32>(w)[..n],
            d => {
                Self::to_f32(t, d, w, &mut self.w32);
                &mut self.w32
            }
        };
        let par = if t > 1 {
            gemm::Parallelism::Rayon(t)
        } else {
            gemm::Parallelism::None
        };
        for (a, (up, down)) in self.adapters.iter().zip(&self.factors32) {
            assert!(dst.len() == rows * cols && up.len() == rows * a.rank);
            assert!(down.len() == a.rank * cols);
            // SAFETY: dst is a row-major rows × cols f32 matrix (column
            // stride 1, row stride cols), up rows × rank (strides 1, rank),
            // down rank × cols (strides 1, cols), all in bounds (asserted
            // above); dst is a unique borrow, so it aliases neither input;
            // read_dst = true reads dst, which is initialised.
            // `dst := 1 · dst + s · up · down`.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    a.rank,
                    dst.as_mut_ptr(),
                    1,
                    cols as isize,
                    true,
                    up.as_ptr(),
                    1,
                    a.rank as isize,
                    down.as_ptr(),
                    1,
                    cols as isize,
                    1.0f32,
                    a.scale,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        match self.dtype {
            Dtype::F32 => {}
            Dtype::F16 => par_zip(
                t,
                &self.w32,
                &mut bytemuck::cast_slice_mut::<u32, f16>(w)[..n],
                |a, b| b.convert_from_f32_slice(a),
            ),
            Dtype::BF16 => par_zip(
                t,
                &self.w32,
                &mut bytemuck::cast_slice_mut::<u32, bf16>(w)[..n],
                |a, b| b.convert_from_f32_slice(a),
            ),
        }
    }
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

fn cpu_bench(args: &MergeBenchArgs, threads: NonZeroUsize) -> Result<(Setup, Vec<Row>), String> {
    let (rows, cols) = (args.rows, args.cols);
    let t = threads.get();
    let mut rng = Rng::new(args.seed);
    let w0 = uniform(&mut rng, rows * cols);
    let mut out = Vec::new();
    for dtype in args.dtype.dtypes() {
        let fdtype = factor_dtype(dtype);
        let w_bytes = rows * cols * dtype.size_in_bytes();
        let w0_enc = encode(dtype, &w0);
        let w0_dec = decode(dtype, bytes(&w0_enc, w_bytes), rows * cols);
        let copies = pool_copies(args.pool_mib, w_bytes);
        let mut pool: Vec<Vec<u32>> = vec![w0_enc.clone(); copies];
        let mut next = 0usize;
        for &rank in &args.ranks {
            for &count in &args.adapters {
                let host = make_adapters(&mut rng, fdtype, rows, cols, rank, count);
                let adapters = merge_adapters(&host, fdtype, rows, cols);
                let spec = MergeSpec::new(dtype, &[rows, cols], None, &adapters)
                    .map_err(|e| format!("merge spec: {e}"))?;
                let mut base = GemmBaseline::new(dtype, fdtype, rows, cols, t, &host);

                // Agreement, on fresh copies of W.
                let mut ours_w = w0_enc.clone();
                merge_cpu(bytes_mut(&mut ours_w, w_bytes), &spec, Some(threads))
                    .map_err(|e| format!("merge_cpu: {e}"))?;
                let mut base_w = w0_enc.clone();
                base.run(&mut base_w);
                let (max_diff, tolerance) = agreement(
                    dtype,
                    &w0_dec,
                    &decode(dtype, bytes(&ours_w, w_bytes), rows * cols),
                    &decode(dtype, bytes(&base_w, w_bytes), rows * cols),
                );

                let mut ours = Vec::new();
                let mut copy = Vec::new();
                let mut baseline = Vec::new();
                for i in 0..=args.iters {
                    let mut pick = || {
                        next = (next + 1) % copies;
                        next
                    };
                    let k = pick();
                    let to = time(|| {
                        merge_cpu(bytes_mut(&mut pool[k], w_bytes), &spec, Some(threads))
                            .expect("validated above")
                    });
                    let k = pick();
                    let tb = time(|| base.run(&mut pool[k]));
                    let k = pick();
                    let (src, dst) = pair_mut(&mut pool, k, (k + 1) % copies);
                    let tc = time(|| copy_par(t, src, dst));
                    if i > 0 {
                        ours.push(to);
                        baseline.push(tb);
                        copy.push(tc);
                    }
                }
                out.push(Row {
                    backend: "cpu",
                    kernel: "cpu",
                    dtype,
                    factor_dtype: fdtype,
                    rank,
                    adapters: count,
                    w_bytes,
                    copies,
                    ours: median(ours),
                    copy: median(copy),
                    baseline: median(baseline),
                    baseline_name: if dtype == Dtype::F32 {
                        "gemm crate (f32), one call per adapter; factors converted to f32"
                    } else {
                        "gemm crate (f32), one call per adapter; W and factors converted to f32 and W back"
                    },
                    max_diff,
                    tolerance,
                    agree: max_diff <= tolerance,
                    batched: None,
                });
            }
        }
    }
    Ok((
        Setup {
            backend: "cpu",
            device: cpu_name(),
            threads: Some(t),
        },
        out,
    ))
}

// ---------------------------------------------------------------------------
// GPU

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::{MergeBenchArgs, Row, Setup};

    /// No GPU device without the `cuda` feature.
    pub(super) enum NoDevice {}

    pub(super) fn open() -> Result<NoDevice, String> {
        Err("built without the `cuda` feature".into())
    }

    pub(super) fn bench(
        dev: &NoDevice,
        _args: &MergeBenchArgs,
    ) -> Result<(Setup, Vec<Row>), String> {
        match *dev {}
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use offload_kernels::MergeSpec;
    use offload_runtime::device::cuda::cublas::GemmAccumulate;
    use offload_runtime::device::cuda::{probe, CudaDevice, LowRankKernel, LowRankMerge};
    use offload_runtime::device::{Device, DeviceExt, DevicePtr, PhysPage, StreamId, VirtualRange};

    use super::{
        agreement, decode, encode, factor_dtype, make_adapters, median, merge_adapters,
        pool_copies, uniform, Batched, KernelArg, MergeBenchArgs, Row, Setup,
    };
    use crate::cuda_timing::{copy_d2d, Timer};
    use crate::rng::Rng;

    /// Opens the GPU `device::auto` would pick: the one `probe` finds.
    pub(super) fn open() -> Result<CudaDevice, String> {
        let p = probe().map_err(|e| e.to_string())?;
        CudaDevice::new(p.ordinal).map_err(|e| format!("a GPU answered but did not open: {e}"))
    }

    /// Device buffers: one mapped range per buffer with the virtual memory
    /// API, one contiguous allocation per buffer in fallback mode. Freed on
    /// drop, after the stream that uses them has finished (also on an error path).
    struct Mem<'a> {
        d: &'a CudaDevice,
        stream: StreamId,
        ranges: Vec<(VirtualRange, Vec<PhysPage>)>,
        blocks: Vec<DevicePtr>,
    }

    impl<'a> Mem<'a> {
        fn new(d: &'a CudaDevice, stream: StreamId) -> Self {
            Mem {
                d,
                stream,
                ranges: Vec::new(),
                blocks: Vec::new(),
            }
        }

        fn alloc(&mut self, len: usize) -> Result<DevicePtr, String> {
            let ps = self.d.info().page_size;
            let e = |e: offload_runtime::Error| format!("allocating {len} bytes on the GPU: {e}");
            let n = len.div_ceil(ps).max(1);
            if !self.d.maps_pages() {
                let p = self.d.alloc_contiguous(n * ps).map_err(e)?;
                self.blocks.push(p);
                return Ok(p);
            }
            let range = self.d.reserve(n * ps).map_err(e)?;
            let mut pages = Vec::with_capacity(n);
            for i in 0..n {
                let mapped = self
                    .d
                    .alloc_page()
                    .and_then(|p| {
                        pages.push(p);
                        self.d.map(range.base.offset(i * ps), p)
                    })
                    .map_err(e);
                if let Err(err) = mapped {
                    self.ranges.push((range, pages));
                    return Err(err);
                }
            }
            self.ranges.push((range, pages));
            Ok(range.base)
        }
    }

    impl Drop for Mem<'_> {
        fn drop(&mut self) {
            let _ = self.d.stream_synchronize(self.stream);
            let ps = self.d.info().page_size;
            for (range, pages) in self.ranges.drain(..) {
                for i in 0..pages.len() {
                    let _ = self.d.unmap(range.base.offset(i * ps));
                }
                let _ = self.d.release(range);
                for p in pages {
                    let _ = self.d.free_page(p);
                }
            }
            for p in self.blocks.drain(..) {
                let _ = self.d.free_contiguous(p);
            }
        }
    }

    /// Launches per timed pass up to which the pass is gated (see
    /// [`Timer::time`]); cuBLAS may launch two kernels per product.
    const MAX_GATED_LAUNCHES: usize = 512;

    pub(super) fn bench(
        d: &CudaDevice,
        args: &MergeBenchArgs,
    ) -> Result<(Setup, Vec<Row>), String> {
        let fail = |what: &'static str| move |e: offload_runtime::Error| format!("{what}: {e}");
        let merge_info = d
            .prepare_merge()
            .map_err(fail("building the merge kernels"))?;
        d.prepare_matmul().map_err(fail("loading cuBLAS"))?;
        let stream = d.create_stream().map_err(fail("creating a stream"))?;
        let result = bench_on(d, args, stream);
        let _ = d.stream_synchronize(stream);
        let _ = d.destroy_stream(stream);
        let out = result?;
        let info = d.info();
        Ok((
            Setup {
                backend: "cuda",
                device: format!(
                    "{} (compute capability {}.{}, merge kernels {:?}, {} memory mode), CUDA events",
                    info.name,
                    info.compute_capability.map_or(0, |c| c.0),
                    info.compute_capability.map_or(0, |c| c.1),
                    merge_info.target,
                    if d.vmm_supported() { "VMM" } else { "fallback" },
                ),
                threads: None,
            },
            out,
        ))
    }

    fn bench_on(d: &CudaDevice, args: &MergeBenchArgs, s: StreamId) -> Result<Vec<Row>, String> {
        let (rows, cols) = (args.rows, args.cols);
        let fail = |what: &'static str| move |e: offload_runtime::Error| format!("{what}: {e}");
        let mut mem = Mem::new(d, s);
        let timer = {
            d.bind().map_err(fail("binding the context"))?;
            Timer::new(d)?
        };
        let mut rng = Rng::new(args.seed);
        let w0 = uniform(&mut rng, rows * cols);
        let mut out = Vec::new();
        for dtype in args.dtype.dtypes() {
            let fdtype = factor_dtype(dtype);
            let ws = dtype.size_in_bytes();
            let fs = fdtype.size_in_bytes();
            let w_bytes = rows * cols * ws;
            let w0_enc = encode(dtype, &w0);
            let w0_bytes: &[u8] = &bytemuck::cast_slice(&w0_enc)[..w_bytes];
            let w0_dec = decode(dtype, w0_bytes, rows * cols);
            let upload_w = |mem: &mut Mem<'_>| -> Result<DevicePtr, String> {
                let p = mem.alloc(w_bytes)?;
                d.write_blocking(p, w0_bytes, s)
                    .map_err(fail("uploading W"))?;
                Ok(p)
            };
            let copies = pool_copies(args.pool_mib, w_bytes);
            let first = upload_w(&mut mem)?;
            let mut pool = vec![first];
            for _ in 1..copies {
                let p = mem.alloc(w_bytes)?;
                copy_d2d(d, p, first, w_bytes, s)?;
                pool.push(p);
            }
            d.stream_synchronize(s).map_err(fail("filling the pool"))?;

            for &rank in &args.ranks {
                for &count in &args.adapters {
                    let host = make_adapters(&mut rng, fdtype, rows, cols, rank, count);
                    // Device factors: each adapter's down and up.
                    let mut downs = Vec::new();
                    let mut ups = Vec::new();
                    for a in &host {
                        let down = &bytemuck::cast_slice::<u32, u8>(&a.down)[..rank * cols * fs];
                        let p = mem.alloc(down.len())?;
                        d.write_blocking(p, down, s)
                            .map_err(fail("uploading a factor"))?;
                        downs.push(p);
                        let up = &bytemuck::cast_slice::<u32, u8>(&a.up)[..rows * rank * fs];
                        let p = mem.alloc(up.len())?;
                        d.write_blocking(p, up, s)
                            .map_err(fail("uploading a factor"))?;
                        ups.push(p);
                    }
                    let adapters = merge_adapters(&host, fdtype, rows, cols);
                    let spec = MergeSpec::new(dtype, &[rows, cols], None, &adapters)
                        .map_err(|e| format!("merge spec: {e}"))?;
                    let factor_ptrs: Vec<_> = (0..count).map(|a| (ups[a], downs[a])).collect();

                    let kernel = match args.kernel {
                        KernelArg::Auto => LowRankKernel::Auto,
                        KernelArg::Fma => LowRankKernel::Fma,
                        KernelArg::TensorCores => LowRankKernel::TensorCores,
                        KernelArg::Pipelined => LowRankKernel::Pipelined,
                        KernelArg::Streaming => LowRankKernel::Streaming,
                    };
                    let ran_on = match kernel {
                        LowRankKernel::Auto => d.auto_lowrank_kernel(&spec),
                        // The streaming kernels hold at most 32 ranks.
                        LowRankKernel::Streaming if rank * count > 32 => LowRankKernel::Fma,
                        k => k,
                    };
                    let kernel_name = match ran_on {
                        LowRankKernel::Auto | LowRankKernel::Fma => "fp32 FMA",
                        LowRankKernel::TensorCores => "tensor cores",
                        LowRankKernel::Pipelined if d.pipe_tall() => {
                            "pipelined tensor cores, 128-row tiles"
                        }
                        LowRankKernel::Pipelined => "pipelined tensor cores",
                        LowRankKernel::Streaming if d.stream8_shared() && rank * count <= 8 => {
                            "streaming fp32 FMA, shared down factors"
                        }
                        LowRankKernel::Streaming => "streaming fp32 FMA",
                    };
                    let ours_on = |w: DevicePtr| -> Result<(), String> {
                        d.merge_lowrank_with(&spec, w, &factor_ptrs, s, kernel)
                            .map_err(fail("merge_lowrank"))
                    };
                    // `--tensors`: several copies of W, one tensor each, in
                    // as few batched launches as they take.
                    let batched_on = |ws: &[DevicePtr]| -> Result<(), String> {
                        let merges: Vec<LowRankMerge<'_, '_>> = ws
                            .iter()
                            .map(|&w| LowRankMerge {
                                spec: &spec,
                                w,
                                factors: &factor_ptrs,
                            })
                            .collect();
                        d.merge_lowrank_batch(&merges, s, kernel)
                            .map(|_| ())
                            .map_err(fail("merge_lowrank_batch"))
                    };
                    let base_on = |w: DevicePtr| -> Result<(), String> {
                        for (a, ha) in host.iter().enumerate() {
                            let op = GemmAccumulate {
                                w,
                                w_dtype: dtype,
                                rows,
                                cols,
                                up: ups[a],
                                down: downs[a],
                                factor_dtype: fdtype,
                                rank,
                                scale: ha.scale,
                            };
                            d.gemm_accumulate(&op, s).map_err(fail("gemm_accumulate"))?;
                        }
                        Ok(())
                    };

                    // Agreement, on fresh copies of W.
                    let check_ours = upload_w(&mut mem)?;
                    let check_base = upload_w(&mut mem)?;
                    ours_on(check_ours)?;
                    base_on(check_base)?;
                    let read_raw = |w: DevicePtr| -> Result<Vec<u8>, String> {
                        let mut host_w = vec![0u8; w_bytes];
                        d.read_blocking(w, &mut host_w, s)
                            .map_err(fail("reading W back"))?;
                        Ok(host_w)
                    };
                    let read = |w: DevicePtr| -> Result<Vec<f64>, String> {
                        Ok(decode(dtype, &read_raw(w)?, rows * cols))
                    };
                    let (max_diff, tolerance) =
                        agreement(dtype, &w0_dec, &read(check_ours)?, &read(check_base)?);
                    // The batched merges: bit for bit ours, on fresh copies
                    // merged `--tensors` at a time.
                    let batch = args.tensors.min(copies);
                    let identical = if args.tensors > 1 {
                        let fresh = (0..batch)
                            .map(|_| upload_w(&mut mem))
                            .collect::<Result<Vec<_>, _>>()?;
                        batched_on(&fresh)?;
                        let want = read_raw(check_ours)?;
                        let mut same = true;
                        for &w in &fresh {
                            same &= read_raw(w)? == want;
                        }
                        same
                    } else {
                        true
                    };

                    // One sample: one pass over the pool.
                    let per_w = |t: f64| t / copies as f64;
                    let gate = copies * count * 2 <= MAX_GATED_LAUNCHES;
                    let mut ours = Vec::new();
                    let mut base = Vec::new();
                    let mut copy = Vec::new();
                    let mut batched = Vec::new();
                    for i in 0..=args.iters {
                        let to =
                            timer.time(d, s, gate, || pool.iter().try_for_each(|&w| ours_on(w)))?;
                        if args.tensors > 1 {
                            let tt = timer.time(d, s, gate, || {
                                pool.chunks(batch).try_for_each(&batched_on)
                            })?;
                            if i > 0 {
                                batched.push(per_w(tt));
                            }
                        }
                        let tb =
                            timer.time(d, s, gate, || pool.iter().try_for_each(|&w| base_on(w)))?;
                        let tc = timer.time(d, s, gate, || {
                            for (c, &w) in pool.iter().enumerate() {
                                copy_d2d(d, pool[(c + 1) % copies], w, w_bytes, s)?;
                            }
                            Ok(())
                        })?;
                        if i > 0 {
                            ours.push(per_w(to));
                            base.push(per_w(tb));
                            copy.push(per_w(tc));
                        }
                    }
                    out.push(Row {
                        backend: "cuda",
                        kernel: kernel_name,
                        dtype,
                        factor_dtype: fdtype,
                        rank,
                        adapters: count,
                        w_bytes,
                        copies,
                        ours: median(ours),
                        copy: median(copy),
                        baseline: median(base),
                        baseline_name: "cublasGemmEx (compute 32F, beta = 1), one call per adapter",
                        max_diff,
                        tolerance,
                        agree: max_diff <= tolerance,
                        batched: (args.tensors > 1).then(|| Batched {
                            tensors: batch,
                            seconds: median(batched),
                            identical,
                        }),
                    });
                }
            }
        }
        d.stream_synchronize(s).map_err(fail("finishing"))?;
        drop(timer);
        drop(mem);
        Ok(out)
    }
}
