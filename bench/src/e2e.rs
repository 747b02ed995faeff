//! `offload bench e2e`: one generation per offload mode on a synthetic (or
//! the user's) model, with real compute per layer, and the table users know
//! from the SD.Next offload documentation.
//!
//! A generation runs the text encoders once, the denoiser `--steps` times
//! (one pass per step) and the VAE once. Every layer multiplies each of its
//! 2-D and 4-D weights with an activation batch of `--tokens` rows on the
//! engine's compute stream (`Kernel::Matmul`), so `--tokens` sets compute per
//! byte moved. it/s is denoiser steps per second over the whole generation.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use offload_loader::synth::{preset_specs, write_deterministic, Preset, PresetOptions};
use offload_loader::{Dtype, Model};
use offload_runtime::arena::{Arena, ArenaConfig, Tag};
use offload_runtime::device::{
    self, BackendKind, Device, DevicePtr, HostConfig, HostDevice, Kernel, StreamId,
};
use offload_runtime::model::{DType, ModelDesc};
use offload_runtime::residency::{
    HostPolicy, LayerId, Mode, Policy, Runtime, RuntimeConfig, TimelineEntry,
};
use offload_runtime::Error;

use offload_bench::source::{describe, roles, ModelSource};

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
    /// Host memory policy: pinned or staged.
    #[arg(long, default_value = "pinned")]
    pub host_policy: String,
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
    /// Seed of the synthetic weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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
            prefetch_depth: 2,
            model: None,
            json: None,
            timeline: None,
            link_gbps: None,
            seed: 0,
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
    reference: bool,
    outcome: Result<Measured, String>,
    device_mem: usize,
    high: usize,
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
}

struct Bench {
    dev: Arc<dyn Device>,
    compute: StreamId,
    scratch: Arena<dyn Device>,
    x: DevicePtr,
    y: DevicePtr,
    compute_ok: bool,
    desc: ModelDesc,
    source: Arc<ModelSource>,
    te: Vec<usize>,
    denoiser: Vec<usize>,
    vae: Vec<usize>,
    args: E2eArgs,
    bar: ProgressBar,
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

fn kernel_dtype(d: DType) -> Option<offload_kernels::Dtype> {
    match d {
        DType::F32 => Some(offload_kernels::Dtype::F32),
        DType::F16 => Some(offload_kernels::Dtype::F16),
        DType::BF16 => Some(offload_kernels::Dtype::BF16),
        _ => None,
    }
}

/// The (n, k) of a weight that gets a matrix product, if any.
fn matmul_dims(shape: &[usize], dtype: DType) -> Option<(usize, usize, offload_kernels::Dtype)> {
    let d = kernel_dtype(dtype)?;
    let (n, k) = offload_kernels::weight_matrix_dims(shape).ok()?;
    (n > 0 && k > 0).then_some((n, k, d))
}

impl Bench {
    /// Run `component` once: acquire each layer, queue its products, drop the guard.
    fn run_component(
        &self,
        rt: &Runtime,
        m: offload_runtime::residency::ModelId,
        c: usize,
        compute_log: Option<&Arc<Mutex<Vec<TimelineEntry>>>>,
        epoch: Instant,
    ) -> Result<(), Error> {
        let comp = &self.desc.components[c];
        for (l, layer) in comp.layers.iter().enumerate() {
            let g = rt.acquire(LayerId {
                model: m,
                component: c,
                layer: l,
            })?;
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
                for t in g.tensors() {
                    if let Some((n, k, w_dtype)) = matmul_dims(t.shape, t.dtype) {
                        self.dev.launch(
                            &Kernel::Matmul {
                                x: self.x,
                                tokens: self.args.tokens,
                                w: t.ptr,
                                w_dtype,
                                n,
                                k,
                                y: self.y,
                            },
                            self.compute,
                        )?;
                    }
                }
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
            drop(g);
        }
        Ok(())
    }

    fn row(
        &self,
        mode: Mode,
        policy: Policy,
        device_mem: usize,
        reference: bool,
        timeline: bool,
    ) -> Row {
        let info_total = self.dev.info().total_memory;
        let cfg = RuntimeConfig {
            mode: Some(mode),
            policy,
            prefetch_depth: self.args.prefetch_depth,
            device_memory: Some(device_mem),
            high_watermark: None,
            low_watermark: None,
            host_policy: match self.args.host_policy.as_str() {
                "staged" => HostPolicy::STAGED_DEFAULT,
                _ => HostPolicy::Pinned,
            },
            timeline,
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
        let outcome = self.generation(cfg, timeline).map_err(|e| match e {
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
            reference,
            outcome,
            device_mem,
            high,
        }
    }

    fn generation(&self, cfg: RuntimeConfig, timeline: bool) -> Result<Measured, Error> {
        let rt = Runtime::new(self.dev.clone(), self.compute, cfg)?;
        let m = rt.load(self.desc.clone(), self.source.clone())?;
        rt.synchronize()?;
        self.dev.stream_synchronize(self.compute)?;
        rt.reset_peaks();
        let epoch = rt.epoch();
        let compute_log = timeline.then(|| Arc::new(Mutex::new(Vec::new())));
        // Pass boundaries in compute-stream order: the time and the stall so far.
        let passes: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::new(Mutex::new(Vec::new()));
        let stall = rt.stall_counter();
        let mark = |p: &Arc<Mutex<Vec<(Instant, u64)>>>| -> Result<(), Error> {
            let (p, stall) = (p.clone(), stall.clone());
            self.dev.launch_host_fn(
                self.compute,
                Box::new(move || p.lock().unwrap().push((Instant::now(), stall.ns()))),
            )
        };
        let s0 = rt.stats();
        let t0 = Instant::now();
        for &c in &self.te {
            self.run_component(&rt, m, c, compute_log.as_ref(), epoch)?;
        }
        let mut pass_bytes = Vec::with_capacity(self.args.steps);
        for _ in 0..self.args.steps {
            let before = rt.stats();
            mark(&passes)?;
            for &c in &self.denoiser {
                self.run_component(&rt, m, c, compute_log.as_ref(), epoch)?;
            }
            let after = rt.stats();
            pass_bytes.push(after.bytes_h2d - before.bytes_h2d);
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
        let marks = passes.lock().unwrap().clone();
        let (denoise_s, stall_in_denoiser) = match (marks.first(), marks.last()) {
            (Some(a), Some(b)) => (b.0.saturating_duration_since(a.0).as_secs_f64(), b.1 - a.1),
            _ => (0.0, 0),
        };
        let steps = self.args.steps.max(1) as f64;
        let rest: Vec<u64> = pass_bytes.iter().skip(1).copied().collect();
        let per_pass = if rest.is_empty() {
            pass_bytes.first().copied().unwrap_or(0)
        } else {
            rest.iter().sum::<u64>() / rest.len() as u64
        };
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
        Ok(Measured {
            it_per_s: self.args.steps as f64 / generation_s,
            generation_s,
            first_pass: pass_bytes.first().copied().unwrap_or(0),
            per_pass,
            per_generation: st.bytes_h2d,
            peak_device: st.peak_device_bytes,
            peak_host: st.peak_host_bytes,
            page_waste: denoiser_waste,
            stall_fraction: st.stall_ns as f64 * 1e-9 / generation_s,
            compute_s_per_pass: ((denoise_s - stall_in_denoiser as f64 * 1e-9) / steps).max(0.0),
            pass_s: denoise_s / steps,
            rss: rss_bytes(),
        })
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

fn open_model(args: &E2eArgs) -> Result<(Model, String, Option<TempDir>), String> {
    if let Some(p) = &args.model {
        let m = Model::open(p).map_err(|e| e.to_string())?;
        return Ok((m, p.display().to_string(), None));
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
    ))
}

/// Run the benchmark and print the table.
pub fn run(args: &E2eArgs) -> Result<(), String> {
    if args.tokens == 0 || args.steps == 0 {
        return Err("--tokens and --steps must be at least 1".into());
    }
    let host_policy = args.host_policy.as_str();
    if host_policy != "pinned" && host_policy != "staged" {
        return Err(format!(
            "unknown host policy `{host_policy}` (pinned, staged)"
        ));
    }
    let (model, model_name, _tmp) = open_model(args)?;
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
    let host_capacity =
        (model_pages.max(pages(device_mem)) + pages(x_bytes) + pages(y_bytes) + 8) * page;

    let selected = device::auto(&HostConfig {
        capacity: host_capacity,
        page_size: page,
        link_gbps: args.link_gbps,
    })
    .map_err(|e| e.to_string())?;
    let dev = selected.device.clone();
    if dev.info().kind == BackendKind::Host {
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
        return run_on(
            args,
            host,
            selected.reason,
            model,
            model_name,
            desc,
            te,
            denoiser,
            vae,
            (
                model_bytes,
                denoiser_bytes,
                largest_layer,
                device_mem,
                x_bytes,
                y_bytes,
            ),
        );
    }
    run_on(
        args,
        dev,
        selected.reason,
        model,
        model_name,
        desc,
        te,
        denoiser,
        vae,
        (
            model_bytes,
            denoiser_bytes,
            largest_layer,
            device_mem,
            x_bytes,
            y_bytes,
        ),
    )
}

#[allow(clippy::too_many_arguments)]
fn run_on(
    args: &E2eArgs,
    dev: Arc<dyn Device>,
    reason: String,
    model: Model,
    model_name: String,
    desc: ModelDesc,
    te: Vec<usize>,
    denoiser: Vec<usize>,
    vae: Vec<usize>,
    sizes: (usize, usize, usize, usize, usize, usize),
) -> Result<(), String> {
    let (model_bytes, denoiser_bytes, largest_layer, device_mem, x_bytes, y_bytes) = sizes;
    let e = |e: Error| e.to_string();
    let compute = dev.create_stream().map_err(e)?;
    let scratch = Arena::new(dev.clone(), ArenaConfig::default()).map_err(e)?;
    let xa = scratch.alloc(x_bytes, Tag(0)).map_err(e)?;
    let ya = scratch.alloc(y_bytes, Tag(0)).map_err(e)?;
    let (x, y) = (scratch.ptr(xa).map_err(e)?, scratch.ptr(ya).map_err(e)?);
    let xs: Vec<u8> = (0..x_bytes / 4)
        .flat_map(|i| (((i % 97) as f32 - 48.0) * 1e-3).to_le_bytes())
        .collect();
    scratch.write(xa, 0, &xs).map_err(e)?;
    // The product kernel exists on the host backend; on CUDA it comes with the cuBLAS work.
    let compute_ok = dev
        .launch(
            &Kernel::Matmul {
                x,
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
    warm_up(&dev, &scratch).map_err(e)?;

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
    let total_steps = (rows.len() + 1) as u64 * args.steps as u64;
    let bar = if std::io::stderr().is_terminal() {
        let b = ProgressBar::new(total_steps);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:28} [{bar:30}] {pos}/{len} steps {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let bench = Bench {
        dev: dev.clone(),
        compute,
        scratch,
        x,
        y,
        compute_ok,
        desc,
        source: Arc::new(ModelSource::new(Arc::new(model))),
        te,
        denoiser,
        vae,
        args: args.clone(),
        bar,
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
    let full = bench.dev.info().total_memory.min(
        // the whole model in whole pages per layer, and a little room
        model_bytes
            + bench
                .desc
                .components
                .iter()
                .map(|c| c.layers.len())
                .sum::<usize>()
                * bench.dev.info().page_size,
    );
    bench.bar.set_message("none (reference)");
    let n_rows = rows.len();
    let mut results = vec![bench.row(
        Mode::None,
        Policy::Planned,
        full,
        true,
        args.timeline.is_some() && n_rows == 0,
    )];
    for (i, (m, p)) in rows.into_iter().enumerate() {
        bench.bar.set_message(format!("{m} {p}"));
        results.push(bench.row(
            m,
            p,
            device_mem,
            false,
            args.timeline.is_some() && i + 1 == n_rows,
        ));
    }
    bench.bar.finish_and_clear();
    let _ = &bench.scratch;
    print_table(&results);
    print_overlap(&results, link);
    if let Some(path) = &args.json {
        let reference = results
            .first()
            .and_then(|r| r.outcome.as_ref().ok())
            .map(|m| m.it_per_s);
        let reference_pass = results
            .first()
            .and_then(|r| r.outcome.as_ref().ok())
            .map(|m| m.pass_s);
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for r in &results {
            let mut line = json_row(
                r,
                args,
                model_bytes,
                denoiser_bytes,
                largest_layer,
                link,
                dev.info(),
                reference,
            );
            // The overlap figures: this pass against max(compute of a pass
            // without transfers, its bytes / link rate).
            if let Some((_, bound, ratio)) = reference_pass.and_then(|rp| overlap(r, rp, link)) {
                if let Ok(serde_json::Value::Object(mut o)) =
                    serde_json::from_str::<serde_json::Value>(&line)
                {
                    o.insert("overlap_bound_s".into(), bound.into());
                    o.insert("pass_over_bound".into(), ratio.into());
                    line = serde_json::Value::Object(o).to_string();
                }
            }
            writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Touch all free device memory once, so that no row pays the first-touch
/// cost of the host backend's memory (or of a GPU's fresh pages) for the others.
fn warm_up(dev: &Arc<dyn Device>, scratch: &Arena<dyn Device>) -> Result<(), Error> {
    let free = scratch.pages_free();
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
/// with compute taken from the reference row (no transfers at all).
fn overlap(r: &Row, reference_pass_s: f64, link_gbps: f64) -> Option<(f64, f64, f64)> {
    let m = r.outcome.as_ref().ok()?;
    if r.reference || link_gbps <= 0.0 {
        return None;
    }
    let transfer = m.per_pass as f64 / (link_gbps * 1e9);
    let bound = reference_pass_s.max(transfer);
    Some((m.pass_s, bound, m.pass_s / bound))
}

fn print_overlap(rows: &[Row], link_gbps: f64) {
    let Some(reference) = rows
        .first()
        .and_then(|r| r.outcome.as_ref().ok())
        .map(|m| m.pass_s)
    else {
        return;
    };
    println!(
        "overlap (a pass against max(compute of a pass without transfers, its bytes / link rate)):"
    );
    for r in rows {
        if let Some((pass, bound, ratio)) = overlap(r, reference, link_gbps) {
            println!(
                "  {:<10} {:<7}: pass {:.3} s, bound {:.3} s (compute {:.3} s, transfer {:.3} s): {:.2}x",
                r.mode.to_string(),
                r.policy.to_string(),
                pass,
                bound,
                reference,
                r.outcome.as_ref().map(|m| m.per_pass as f64 / (link_gbps * 1e9)).unwrap_or(0.0),
                ratio
            );
        }
    }
}

fn print_table(rows: &[Row]) {
    let reference = rows
        .first()
        .and_then(|r| r.outcome.as_ref().ok())
        .map(|m| m.it_per_s);
    println!();
    println!(
        "{:<12} {:<8} {:<5} {:>7} {:>8} {:>10} {:>10} {:>13} {:>14} {:>7}",
        "mode",
        "policy",
        "lora",
        "it/s",
        "vs none",
        "MB/pass",
        "MB/gen",
        "peak dev MiB",
        "peak host MiB",
        "stall %"
    );
    for r in rows {
        let name = if r.reference {
            format!("{}*", r.mode)
        } else {
            r.mode.to_string()
        };
        match &r.outcome {
            Ok(m) => println!(
                "{:<12} {:<8} {:<5} {:>7.2} {:>8} {:>10.1} {:>10.1} {:>13.1} {:>14.1} {:>7.1}",
                name,
                r.policy.to_string(),
                "none",
                m.it_per_s,
                reference.map_or("-".into(), |x| format!("{:.2}x", m.it_per_s / x)),
                m.per_pass as f64 / 1e6,
                m.per_generation as f64 / 1e6,
                mib(m.peak_device as f64),
                mib(m.peak_host as f64),
                m.stall_fraction * 100.0
            ),
            Err(msg) => println!(
                "{:<12} {:<8} {:<5} {msg}",
                name,
                r.policy.to_string(),
                "none"
            ),
        }
    }
    println!("* reference: runs on a device that holds the whole model");
}

#[allow(clippy::too_many_arguments)]
fn json_row(
    r: &Row,
    args: &E2eArgs,
    model_bytes: usize,
    denoiser_bytes: usize,
    largest_layer: usize,
    link: f64,
    info: &offload_runtime::device::DeviceInfo,
    reference: Option<f64>,
) -> String {
    let mut o = serde_json::json!({
        "mode": r.mode.to_string(),
        "lora_mode": "none",
        "policy": r.policy.to_string(),
        "prefetch_depth": args.prefetch_depth,
        "host_policy": args.host_policy,
        "reference": r.reference,
        "model_bytes": model_bytes,
        "denoiser_bytes": denoiser_bytes,
        "device_mem_bytes": r.device_mem,
        "high_watermark_bytes": r.high,
        "largest_layer_bytes": largest_layer,
        "link_gbps": link,
        "device": format!("{:?}: {}", info.kind, info.name),
        "tokens": args.tokens,
        "steps": args.steps,
    });
    match &r.outcome {
        Ok(m) => {
            let extra = serde_json::json!({
                "fits": true,
                "it_per_s": m.it_per_s,
                "relative_to_none": reference.map(|x| m.it_per_s / x),
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
                ] {
                    a.insert(k.into(), serde_json::Value::Null);
                }
            }
        }
    }
    o.to_string()
}
