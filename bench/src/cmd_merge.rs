//! `offload merge`: bake LoRAs into a new checkpoint.
//!
//! `offload merge MODEL --lora FILE[:MULT] [--lora ...] -o OUT` writes
//! `OUT`, a copy of the single-file safetensors checkpoint `MODEL` in which
//! every weight that a LoRA adapts holds `W + Σ sᵢ·Δᵢ` (see
//! `offload_kernels::merge`), computed by the host merge kernel
//! (`merge_cpu`: accumulated in f32, rounded once to the weight's dtype).
//! Tensor names, dtypes, shapes and data order are the input's; every
//! tensor no LoRA adapts is copied byte for byte.
//!
//! # LoRAs
//!
//! `--lora FILE:MULT` takes a LoRA file (or a peft adapter folder holding
//! `adapter_model.safetensors` and `adapter_config.json`) and its
//! multiplier, split at the **last** `:`; `MULT` is optional (default 1).
//! A suffix that is not a number is an error, unless the whole argument
//! names an existing file (a path with a `:` in it). A multiplier that is
//! NaN or infinite is an error. The adapters of every LoRA that target the
//! same weight are applied together in one kernel call (one call per row
//! slice for the slices of a fused weight, such as diffusers `to_q` in a
//! BFL `qkv`); where such slices overlap, the weight is merged in f32 and
//! rounded once at the end.
//!
//! By default modules that cannot be applied (no matching tensor, a shape
//! mismatch, an unsupported algorithm) are skipped with a warning on stderr
//! that lists them; `--strict` makes the first one an error. A LoRA of
//! which no module matches the model is always an error, as is an adapted
//! weight of a dtype other than F32, F16 and BF16.
//!
//! # Output
//!
//! The output's `__metadata__` is the input's plus `offload.merged_loras`:
//! a JSON list of `{"file", "multiplier", "adapters", "skipped"}`, one
//! object per LoRA in the order given (`file` is the base name as given on
//! the command line). When the input already has that key (a merged
//! checkpoint merged again) the new LoRAs are appended to its list.
//!
//! # Streaming
//!
//! The header is written first (offsets follow from the input's dtypes and
//! shapes), then each tensor in turn: read with a checked positional read,
//! merged, written. Memory holds one tensor and the factors of the
//! adapters that target it, never the whole model. The output is written
//! to a temporary file beside `OUT` (`.OUT.offload-merge-PID.tmp`),
//! synced, and renamed over `OUT` at the end, so a failure never leaves a
//! partial `OUT`; the temporary file is removed on error. Every check that
//! needs no tensor data (arguments, headers, LoRA resolution, dtypes) runs
//! before the temporary file is created.
//!
//! Progress goes to stderr (a line per 10% of the bytes), the summary
//! (tensors written and merged, adapters applied, bytes, seconds) to
//! stdout.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use offload_kernels as kernels;
use offload_loader::dtype::{from_f32_slice, to_f32_vec};
use offload_loader::layout::{LayoutFile, ModelLayout};
use offload_loader::lora::{Adapter, Delta, KronFactor, LoraFile, ResolveOptions, TargetIndex};
use offload_loader::synth::{header_bytes, TensorSpec};
use offload_loader::{Dtype, SafetensorsFile, TensorInfo};
use serde_json::{json, Value};

use crate::cmd_synth::human_bytes;

/// The metadata key that records the merged LoRAs.
pub const MERGED_LORAS_KEY: &str = "offload.merged_loras";

/// Arguments of `offload merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The model: a single-file safetensors checkpoint (folders of shards
    /// and diffusers folders are not supported).
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,
    /// A LoRA to bake in: a LoRA file or a peft adapter folder, with an
    /// optional multiplier after the last `:` (default 1). Repeat for
    /// several LoRAs.
    #[arg(long = "lora", value_name = "FILE[:MULT]", required = true)]
    pub loras: Vec<String>,
    /// The checkpoint to write (replaced if it exists; never the model).
    #[arg(short = 'o', long = "out", value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Fail when any module of a LoRA cannot be applied, instead of
    /// skipping it with a warning.
    #[arg(long)]
    pub strict: bool,
    /// Threads of the merge kernel (default: all available).
    #[arg(long, value_name = "N")]
    pub threads: Option<NonZeroUsize>,
}

/// One `--lora` argument, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraArg {
    /// The path as given (a file or a peft adapter folder).
    pub path: PathBuf,
    /// The multiplier (finite, and finite as an `f32`).
    pub multiplier: f64,
}

/// Parses `FILE[:MULT]`, splitting at the last `:`. A suffix that is not a
/// number is an error unless the whole argument names an existing path.
pub fn parse_lora_arg(arg: &str) -> Result<LoraArg, String> {
    let Some((file, mult)) = arg.rsplit_once(':') else {
        return Ok(LoraArg {
            path: PathBuf::from(arg),
            multiplier: 1.0,
        });
    };
    let m = match mult.trim().parse::<f64>() {
        Ok(m) => m,
        Err(_) if Path::new(arg).exists() => {
            return Ok(LoraArg {
                path: PathBuf::from(arg),
                multiplier: 1.0,
            })
        }
        Err(_) if mult.trim().is_empty() => {
            return Err(format!(
                "--lora {arg}: the multiplier after the last `:` is empty (write FILE or FILE:MULT, e.g. {file}:0.8)"
            ))
        }
        Err(_) => {
            return Err(format!(
                "--lora {arg}: multiplier `{mult}` is not a number (write FILE or FILE:MULT, e.g. {file}:0.8)"
            ))
        }
    };
    if !m.is_finite() || !(m as f32).is_finite() {
        return Err(format!(
            "--lora {arg}: multiplier `{mult}` is not a finite number"
        ));
    }
    if file.is_empty() {
        return Err(format!("--lora {arg}: no file before the `:`"));
    }
    Ok(LoraArg {
        path: PathBuf::from(file),
        multiplier: m,
    })
}

/// The kernels' dtype for a weight or factor dtype, if it can be merged.
fn kernel_dtype(d: Dtype) -> Option<kernels::Dtype> {
    match d {
        Dtype::F32 => Some(kernels::Dtype::F32),
        Dtype::F16 => Some(kernels::Dtype::F16),
        Dtype::BF16 => Some(kernels::Dtype::BF16),
        _ => None,
    }
}

/// The LoRA weights file of a path: the file itself, or for a folder (a
/// peft adapter folder) its `adapter_model.safetensors` or its only
/// `.safetensors` file.
fn lora_file_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_dir() {
        return Ok(path.to_owned());
    }
    let adapter = path.join("adapter_model.safetensors");
    if adapter.is_file() {
        return Ok(adapter);
    }
    let rd = fs::read_dir(path).map_err(|e| format!("{}: cannot list: {e}", path.display()))?;
    let files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    match &files[..] {
        [one] => Ok(one.clone()),
        [] => Err(format!(
            "{}: a folder with no .safetensors file (a LoRA is a file, or a peft adapter folder with adapter_model.safetensors)",
            path.display()
        )),
        _ => Err(format!(
            "{}: a folder with {} .safetensors files and no adapter_model.safetensors; name the LoRA file",
            path.display(),
            files.len()
        )),
    }
}

/// Whether two paths name the same existing file (same device and inode,
/// so hard and symbolic links count).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// A resolved LoRA with what the report needs.
struct Loaded {
    arg: LoraArg,
    file: LoraFile,
    adapters: Vec<Adapter>,
    skipped: usize,
}

/// A temporary output file, removed on drop unless [`TempOut::keep`] was
/// called.
struct TempOut {
    path: PathBuf,
    armed: bool,
}

impl TempOut {
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Time spent per phase.
#[derive(Default)]
struct Times {
    read: Duration,
    merge: Duration,
    write: Duration,
    /// Of `write`: flushing the output to disk (`fsync`) and renaming it.
    sync: Duration,
}

/// Run `offload merge`.
pub fn run(args: &MergeArgs) -> Result<(), String> {
    let start = Instant::now();
    let lora_args = args
        .loras
        .iter()
        .map(|a| parse_lora_arg(a))
        .collect::<Result<Vec<_>, _>>()?;

    // The model: one file.
    let model_path = &args.model;
    let meta = fs::metadata(model_path)
        .map_err(|e| format!("{}: cannot open: {e}", model_path.display()))?;
    if meta.is_dir() {
        return Err(format!(
            "{}: is a folder; merge needs a single-file .safetensors checkpoint (folders of shards and diffusers folders are not supported)",
            model_path.display()
        ));
    }

    // The output: never the model or a LoRA, never a folder.
    let out = &args.out;
    if same_file(out, model_path) {
        return Err(format!(
            "-o {}: is the model itself ({}); write the merged checkpoint to another file",
            out.display(),
            model_path.display()
        ));
    }
    if out.is_dir() {
        return Err(format!(
            "-o {}: is a folder; give the path of the file to write",
            out.display()
        ));
    }
    let out_name = out
        .file_name()
        .ok_or_else(|| format!("-o {}: names no file", out.display()))?
        .to_string_lossy()
        .into_owned();
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !out_dir.is_dir() {
        return Err(format!(
            "-o {}: folder {} does not exist",
            out.display(),
            out_dir.display()
        ));
    }

    let src = SafetensorsFile::open(model_path).map_err(|e| e.to_string())?;
    let layout = ModelLayout::from_tensors(
        vec![LayoutFile {
            path: model_path.clone(),
            group: None,
            unit: None,
            len: src.file_len(),
        }],
        src.tensors().to_vec(),
    );
    let index = TargetIndex::new(&layout);

    // Resolve every LoRA before anything is written.
    let mut loaded = Vec::new();
    for arg in lora_args {
        let file_path = lora_file_path(&arg.path)?;
        if same_file(out, &file_path) {
            return Err(format!(
                "-o {}: is the LoRA {}; write the merged checkpoint to another file",
                out.display(),
                file_path.display()
            ));
        }
        let file = LoraFile::open(&file_path).map_err(|e| e.to_string())?;
        let opts = ResolveOptions {
            multiplier: arg.multiplier as f32,
            strict: args.strict,
        };
        let resolved = file.resolve(&index, &opts).map_err(|e| e.to_string())?;
        if resolved.adapters.is_empty() {
            let counts = resolved
                .counts()
                .iter()
                .map(|(k, n)| format!("{n} {k:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            let first = resolved
                .skipped
                .first()
                .map(|s| format!("; first: `{}`: {}", s.key, s.problem))
                .unwrap_or_default();
            return Err(format!(
                "{}: no module of this LoRA matches the model {} ({} modules skipped: {counts}{first})",
                file_path.display(),
                model_path.display(),
                resolved.skipped.len(),
            ));
        }
        if let Some(w) = resolved.warning() {
            eprintln!("offload: warning: {w}");
        }
        for a in &resolved.adapters {
            if kernel_dtype(a.target.dtype).is_none() {
                return Err(format!(
                    "{}: module `{}` targets tensor `{}` of {}, which is {}; only F32, F16 and BF16 weights can be merged",
                    file_path.display(),
                    a.key,
                    a.target.name,
                    model_path.display(),
                    a.target.dtype
                ));
            }
            if a.target.shape.is_empty() || a.target.numel() == 0 {
                return Err(format!(
                    "{}: module `{}` targets tensor `{}` of {} with shape {:?}, which has no rows to merge into",
                    file_path.display(),
                    a.key,
                    a.target.name,
                    model_path.display(),
                    a.target.shape
                ));
            }
        }
        eprintln!(
            "{}: multiplier {}, {} adapters, {} modules skipped",
            arg.path.display(),
            arg.multiplier,
            resolved.adapters.len(),
            resolved.skipped.len()
        );
        loaded.push(Loaded {
            arg,
            skipped: resolved.skipped.len(),
            adapters: resolved.adapters,
            file,
        });
    }

    // Adapters by target tensor, in the order of the LoRAs.
    let mut by_target: HashMap<&str, Vec<(usize, &Adapter)>> = HashMap::new();
    for (li, l) in loaded.iter().enumerate() {
        for a in &l.adapters {
            let Some(own) = src.get(&a.target.name).filter(|t| **t == a.target) else {
                return Err(format!(
                    "{}: module `{}` targets `{}`, which is not a tensor of {}",
                    l.file.path().display(),
                    a.key,
                    a.target.name,
                    model_path.display()
                ));
            };
            by_target.entry(&own.name).or_default().push((li, a));
        }
    }

    // The header: the input's tensors in data order, its metadata plus
    // the record of this merge.
    let mut metadata = src.metadata().clone();
    let mut record = match metadata.get(MERGED_LORAS_KEY) {
        Some(v) => match serde_json::from_str::<Value>(v) {
            Ok(Value::Array(a)) => a,
            _ => {
                eprintln!(
                    "offload: warning: {}: `{MERGED_LORAS_KEY}` is not a JSON list; it is replaced",
                    model_path.display()
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    for l in &loaded {
        let name = l.arg.path.file_name().map_or_else(
            || l.arg.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        record.push(json!({
            "file": name,
            "multiplier": l.arg.multiplier,
            "adapters": l.adapters.len(),
            "skipped": l.skipped,
        }));
    }
    metadata.insert(
        MERGED_LORAS_KEY.to_owned(),
        Value::Array(record).to_string(),
    );
    let specs: Vec<TensorSpec> = src
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.dtype, &t.shape))
        .collect();
    let header = header_bytes(out, &specs, &metadata).map_err(|e| e.to_string())?;
    let data_bytes: u64 = src.tensors().iter().map(|t| t.len).sum();
    let largest = src.tensors().iter().map(|t| t.len).max().unwrap_or(0);
    let largest = usize::try_from(largest).map_err(|_| {
        format!(
            "{}: a tensor of {largest} bytes does not fit in memory",
            model_path.display()
        )
    })?;
    eprintln!(
        "merging {} LoRA{} into {} ({} tensors, {}, {} adapted) -> {}",
        loaded.len(),
        if loaded.len() == 1 { "" } else { "s" },
        model_path.display(),
        src.tensors().len(),
        human_bytes(data_bytes),
        by_target.len(),
        out.display()
    );

    // Write to a temporary file beside OUT, then rename.
    let tmp_path = out_dir.join(format!(
        ".{out_name}.offload-merge-{}.tmp",
        std::process::id()
    ));
    let tmp_file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(|e| {
            format!(
                "{}: cannot create the temporary output: {e}",
                tmp_path.display()
            )
        })?;
    let tmp = TempOut {
        path: tmp_path,
        armed: true,
    };
    let io = |e: std::io::Error| format!("{}: cannot write: {e}", tmp.path.display());
    let mut times = Times::default();
    let mut w = BufWriter::with_capacity(1 << 20, tmp_file);
    let t0 = Instant::now();
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    times.write += t0.elapsed();

    let mut buf: Vec<u8> = Vec::new();
    if buf.try_reserve_exact(largest).is_err() {
        return Err(format!(
            "cannot allocate {} for the largest tensor of {}",
            human_bytes(largest as u64),
            model_path.display()
        ));
    }
    buf.resize(largest, 0);
    let mut progress = Progress::new(data_bytes, src.tensors().len(), start);
    let mut merged_tensors = 0usize;
    let mut applied = 0usize;
    for t in src.tensors() {
        let n = t.len as usize;
        let dst = &mut buf[..n];
        let t0 = Instant::now();
        src.read_info_range_into(t, 0, dst)
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        times.read += t1 - t0;
        if let Some(ads) = by_target.get(t.name.as_str()) {
            applied += merge_tensor(t, dst, ads, &loaded, args.threads, &mut times)?;
            merged_tensors += 1;
        }
        let t2 = Instant::now();
        w.write_all(dst).map_err(io)?;
        times.write += t2.elapsed();
        progress.tensor_done(t.len);
    }
    let t0 = Instant::now();
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    let t1 = Instant::now();
    file.sync_all().map_err(io)?;
    drop(file);
    fs::rename(&tmp.path, out).map_err(|e| {
        format!(
            "cannot rename {} to {}: {e}",
            tmp.path.display(),
            out.display()
        )
    })?;
    tmp.keep();
    times.write += t0.elapsed();
    times.sync += t1.elapsed();

    let bytes = fs::metadata(out)
        .map_err(|e| format!("{}: cannot stat the written file: {e}", out.display()))?
        .len();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {}: {} tensors written, {} merged, {} adapters applied from {} LoRA{}, {} ({bytes} bytes) in {secs:.2} s (read {:.2} s, merge {:.2} s, write {:.2} s of which fsync {:.2} s; {:.0} MiB/s)",
        out.display(),
        src.tensors().len(),
        merged_tensors,
        applied,
        loaded.len(),
        if loaded.len() == 1 { "" } else { "s" },
        human_bytes(bytes),
        times.read.as_secs_f64(),
        times.merge.as_secs_f64(),
        times.write.as_secs_f64(),
        times.sync.as_secs_f64(),
        bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-9),
    );
    Ok(())
}

/// Progress lines on stderr, one per 10% of the bytes.
struct Progress {
    total_bytes: u64,
    total_tensors: usize,
    bytes: u64,
    tensors: usize,
    next_decile: u64,
    start: Instant,
}

impl Progress {
    fn new(total_bytes: u64, total_tensors: usize, start: Instant) -> Progress {
        Progress {
            total_bytes,
            total_tensors,
            bytes: 0,
            tensors: 0,
            next_decile: 1,
            start,
        }
    }

    fn tensor_done(&mut self, len: u64) {
        self.bytes += len;
        self.tensors += 1;
        let pct = if self.total_bytes == 0 {
            100
        } else {
            (u128::from(self.bytes) * 100 / u128::from(self.total_bytes)) as u64
        };
        if pct >= self.next_decile * 10 {
            self.next_decile = pct / 10 + 1;
            eprintln!(
                "merge: {pct:>3}% ({} of {} tensors, {} of {}, {:.1} s)",
                self.tensors,
                self.total_tensors,
                human_bytes(self.bytes),
                human_bytes(self.total_bytes),
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// `usize` dimensions of a shape.
fn dims(t: &TensorInfo) -> Result<Vec<usize>, String> {
    t.shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "tensor `{}`: shape {:?} does not fit in memory",
                t.name, t.shape
            )
        })
}

/// A factor of `adapter` (read into `bufs`, in `Delta::factors` order) as
/// the kernels' matrix.
fn factor<'a>(
    adapter: &Adapter,
    bufs: &'a [(TensorInfo, Vec<u8>)],
    t: &TensorInfo,
) -> Result<kernels::Factor<'a>, String> {
    let dtype = kernel_dtype(t.dtype).ok_or_else(|| {
        format!(
            "module `{}`: factor `{}` is {}; LoRA factors must be F32, F16 or BF16",
            adapter.key, t.name, t.dtype
        )
    })?;
    let data = bufs
        .iter()
        .find(|(f, _)| f.name == t.name)
        .map(|(_, b)| b.as_slice())
        .ok_or_else(|| format!("module `{}`: factor `{}` was not read", adapter.key, t.name))?;
    kernels::Factor::from_shape(data, dtype, &dims(t)?)
        .map_err(|e| format!("module `{}`: factor `{}`: {e}", adapter.key, t.name))
}

/// The kernels' delta of a loader adapter whose factors are in `bufs`.
fn kernel_delta<'a>(
    a: &Adapter,
    bufs: &'a [(TensorInfo, Vec<u8>)],
) -> Result<kernels::Delta<'a>, String> {
    let kron = |k: &KronFactor| -> Result<kernels::KronFactor<'a>, String> {
        Ok(match k {
            KronFactor::Full(t) => kernels::KronFactor::Full(factor(a, bufs, t)?),
            KronFactor::LowRank { a: fa, b: fb } => kernels::KronFactor::LowRank {
                a: factor(a, bufs, fa)?,
                b: factor(a, bufs, fb)?,
            },
        })
    };
    Ok(match &a.delta {
        Delta::LowRank { up, down } => kernels::Delta::LowRank {
            up: factor(a, bufs, up)?,
            down: factor(a, bufs, down)?,
        },
        Delta::LoHa { w1a, w1b, w2a, w2b } => kernels::Delta::LoHa {
            w1a: factor(a, bufs, w1a)?,
            w1b: factor(a, bufs, w1b)?,
            w2a: factor(a, bufs, w2a)?,
            w2b: factor(a, bufs, w2b)?,
        },
        Delta::LoKr { w1, w2 } => kernels::Delta::LoKr {
            w1: kron(w1)?,
            w2: kron(w2)?,
        },
    })
}

/// Applies every adapter of `ads` to the weight `t` held in `w`: one
/// `merge_cpu` call per distinct row range, through an f32 copy of the
/// weight when row ranges overlap (so each element is rounded once).
/// Returns the number of adapters applied.
fn merge_tensor(
    t: &TensorInfo,
    w: &mut [u8],
    ads: &[(usize, &Adapter)],
    loaded: &[Loaded],
    threads: Option<NonZeroUsize>,
    times: &mut Times,
) -> Result<usize, String> {
    let t0 = Instant::now();
    // Read every factor (checked positional reads).
    let mut bufs: Vec<Vec<(TensorInfo, Vec<u8>)>> = Vec::with_capacity(ads.len());
    for (li, a) in ads {
        let lora = &loaded[*li].file;
        let mut v = Vec::new();
        for f in a.delta.factors() {
            let mut b = vec![0u8; f.len as usize];
            lora.read_factor_into(f, &mut b)
                .map_err(|e| e.to_string())?;
            v.push((f.clone(), b));
        }
        bufs.push(v);
    }
    let t1 = Instant::now();
    times.read += t1 - t0;

    let wdtype = kernel_dtype(t.dtype)
        .ok_or_else(|| format!("tensor `{}` is {}, not F32, F16 or BF16", t.name, t.dtype))?;
    let shape = dims(t)?;
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let matrix = [rows, cols];

    // Kernel adapters grouped by row range, each checked on its own first
    // so an error names its LoRA file and module.
    let mut groups: BTreeMap<(usize, usize), Vec<kernels::Adapter<'_>>> = BTreeMap::new();
    for ((li, a), bufs) in ads.iter().zip(&bufs) {
        let lora = loaded[*li].file.path();
        let ctx = |e: String| {
            format!(
                "{}: {e} (target `{}` {:?})",
                lora.display(),
                t.name,
                t.shape
            )
        };
        let delta = kernel_delta(a, bufs).map_err(ctx)?;
        let r = a.row_range();
        let range: Range<usize> = usize::try_from(r.start).unwrap_or(usize::MAX)
            ..usize::try_from(r.end).unwrap_or(usize::MAX);
        let ka = kernels::Adapter {
            scale: a.scale,
            delta,
        };
        kernels::MergeSpec::new(
            wdtype,
            &matrix,
            Some(range.clone()),
            std::slice::from_ref(&ka),
        )
        .map_err(|e| ctx(format!("module `{}`: {e}", a.key)))?;
        groups.entry((range.start, range.end)).or_default().push(ka);
    }
    let keys: Vec<(usize, usize)> = groups.keys().copied().collect();
    let overlap = keys.windows(2).any(|p| p[1].0 < p[0].1);
    let fail = |e: kernels::KernelError| format!("merging into `{}` {:?}: {e}", t.name, t.shape);

    if overlap && wdtype != kernels::Dtype::F32 {
        // Merge in f32, round once.
        let vals = to_f32_vec(w, t.dtype).map_err(|e| e.to_string())?;
        let mut w32: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for ((s, e), ka) in &groups {
            let spec = kernels::MergeSpec::new(kernels::Dtype::F32, &matrix, Some(*s..*e), ka)
                .map_err(fail)?;
            kernels::merge_cpu(&mut w32, &spec, threads).map_err(fail)?;
        }
        let vals: Vec<f32> = w32
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let back = from_f32_slice(&vals, t.dtype).map_err(|e| e.to_string())?;
        w.copy_from_slice(&back);
    } else {
        for ((s, e), ka) in &groups {
            let spec = kernels::MergeSpec::new(wdtype, &matrix, Some(*s..*e), ka).map_err(fail)?;
            kernels::merge_cpu(w, &spec, threads).map_err(fail)?;
        }
    }
    times.merge += t1.elapsed();
    Ok(ads.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_args() {
        let p = |s: &str| parse_lora_arg(s);
        assert_eq!(
            p("a.safetensors").unwrap(),
            LoraArg {
                path: "a.safetensors".into(),
                multiplier: 1.0
            }
        );
        assert_eq!(p("a.safetensors:0.5").unwrap().multiplier, 0.5);
        assert_eq!(p("a.safetensors:-1.25").unwrap().multiplier, -1.25);
        // The last `:` splits.
        let a = p("dir:x/a.safetensors:2").unwrap();
        assert_eq!((a.path, a.multiplier), ("dir:x/a.safetensors".into(), 2.0));
        for bad in ["a:nan", "a:inf", "a:-inf", "a:1e40", "a:", "a:x", ":1"] {
            assert!(p(bad).is_err(), "{bad}");
        }
        assert!(p("a:abc").unwrap_err().contains("`abc` is not a number"));
        assert!(p("a:NaN").unwrap_err().contains("not a finite number"));
    }

    #[test]
    fn dtypes() {
        assert_eq!(kernel_dtype(Dtype::BF16), Some(kernels::Dtype::BF16));
        assert_eq!(kernel_dtype(Dtype::F8E4M3), None);
        assert_eq!(kernel_dtype(Dtype::F64), None);
    }
}
