//! `offload inspect`: layouts of model files, conventions and matches of LoRA files.
//!
//! Reads headers only: no tensor data is read (except the one-element
//! `.alpha` tensors of a LoRA).
//!
//! # Model or LoRA
//!
//! Each PATH is opened as a checkpoint (a file, a folder of shards or a
//! diffusers folder), which validates every header. It is a LoRA when it
//! is one file and either holds cloneofsimo positional keys
//! (`unet:{i}:up`) or more than half of its tensors carry a LoRA factor
//! suffix (`.lora_down.weight`, `.lora_A.weight`, `.lokr_w1`, `.hada_w1_a`,
//! `.alpha`, ...; see `LoraFile::summary`); otherwise it is a model. The
//! majority rule keeps a model with a few stray `.alpha` or `.up.weight`
//! tensors a model, and a LoRA that bundles a few embeddings a LoRA. A
//! folder with a single LoRA file (a peft adapter folder, as
//! `offload synth --lora-convention peft` writes) is that LoRA.
//!
//! A folder may hold several top-level models (a FLUX repository's
//! `flux1-dev.safetensors` and `ae.safetensors`): only shard sets
//! (`NAME-NNNNN-of-NNNNN`, or the files a `*.safetensors.index.json` names)
//! are merged into one model, and when the models' component names
//! collide each component is named `MODEL/COMPONENT`. Where a folder holds
//! variants of the weights (`model.fp16.safetensors`), `--variant TAG`
//! picks one (default: the files without a tag, or the only variant).
//!
//! # Output
//!
//! Text by default; with `--json`, one JSON object per PATH per line (JSON
//! Lines), in the order given. A model's object:
//!
//! | field | value |
//! |---|---|
//! | `path` | the PATH as given |
//! | `kind` | `"model"` |
//! | `files` | `[{"path", "bytes", "model"}]`, each file of the checkpoint; `model` names the model a file belongs to when a folder holds several, else `null` |
//! | `tensors`, `bytes`, `layers` | totals over all components |
//! | `dtypes` | `{"F16": {"tensors", "bytes"}, ...}` |
//! | `largest_layer` | `{"component", "name", "bytes"}` or `null` |
//! | `components` | `[{"name", "kind", "prefix", "layers", "tensors", "bytes", "largest_layer": {"name", "bytes"} or null, "dtypes"}]` in layout order; `kind` is `text_encoder`, `denoiser`, `vae` or `other` |
//!
//! A LoRA's object:
//!
//! | field | value |
//! |---|---|
//! | `path` | the PATH as given |
//! | `kind` | `"lora"` |
//! | `bytes`, `tensors` | file size, tensor count |
//! | `convention` | the most common naming: `kohya`, `diffusers`, `peft`, `checkpoint`, `diffusers_legacy`, `xlabs`, `cloneofsimo` or `unknown` |
//! | `convention_label` | the same, for people |
//! | `conventions` | `{convention: modules}` |
//! | `algorithms` | `{algorithm: modules}`; `lora`, `locon`, `loha`, `lokr`, `dora`, `bias`, `tucker`, `diff`, `norm`, `oft` |
//! | `modules` | modules (tensors grouped by module key) |
//! | `ranks` | every rank, ascending (for a cloneofsimo file, from its `:down` tensors) |
//! | `alphas` | every `.alpha` value, ascending, without repeats |
//! | `peft_alpha` | `lora_alpha` of an `adapter_config.json` beside the file, or `null` |
//! | `unknown_keys`, `cloneofsimo_keys` | tensor counts |
//! | `supported` | `false` when the file holds something that is recognised but not applied |
//! | `unsupported` | why, one string per reason |
//! | `match` | `null` without `--model`/`--model-preset`, else `{"model", "modules", "matched", "skipped", "problems": {kind: count}, "skipped_keys": [{"key", "problem", "detail"}], "error"}`; problem kinds are `unmatched`, `shape_mismatch`, `malformed`, `unsupported`, `unknown_key`; `error` is `null`, or why the whole file could not be resolved (cloneofsimo) |
//!
//! A PATH that cannot be inspected gives `{"path", "kind": "error",
//! "error"}` on stdout, the message on stderr, and a non-zero exit status
//! after the other paths.
//!
//! With the hidden `--bench N`, each PATH is opened N times and the output
//! is the time of header parsing and layout building per 1,000 tensors
//! (`{"path", "bench": {"runs", "tensors", "parse_us_per_1000_tensors",
//! "layout_us_per_1000_tensors", "total_us_per_1000_tensors",
//! "ms_per_open", "best_parse_us_per_1000_tensors",
//! "best_layout_us_per_1000_tensors", "best_ms_per_open"}}` with `--json`):
//! means over the runs, and the fastest run (the least disturbed by other
//! work on the machine).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use offload_loader::layout::{LayoutFile, ModelLayout};
use offload_loader::lora::{
    Algorithm, LoraFile, LoraSummary, Naming, ProblemKind, ResolveOptions, ResolvedLora,
    TargetIndex,
};
use offload_loader::safetensors::OpenOptions;
use offload_loader::synth::{preset_specs, PresetOptions};
use offload_loader::{Checkpoint, ComponentKind, Dtype, LoaderError};
use serde_json::{json, Value};

use crate::cmd_synth::{human_bytes, PresetArg};

/// Arguments of `offload inspect`.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// Model files or folders (single files, folders of shards, diffusers
    /// folders) and LoRA files; each is detected as one or the other.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Resolve each LoRA against this model (file or folder) and report
    /// how many of its modules match.
    #[arg(long, value_name = "PATH", conflicts_with = "model_preset")]
    pub model: Option<PathBuf>,
    /// Resolve each LoRA against the full-size layout of a preset, built in
    /// memory from its tensor names and shapes (no files needed). flux
    /// includes CLIP-L and T5-XXL.
    #[arg(long, value_enum, value_name = "PRESET")]
    pub model_preset: Option<PresetArg>,
    /// Which variant of the weights to open where a folder holds several
    /// (`fp16` for `diffusion_pytorch_model.fp16.safetensors`; also `bf16`,
    /// `fp32`, `fp8`, `ema`, `non_ema`, ...). Default: the files without a
    /// variant tag, or the only variant present (also where a folder lacks
    /// TAG). Applies to --model too.
    #[arg(long, value_name = "TAG")]
    pub variant: Option<String>,
    /// Print one JSON object per PATH per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Time header parsing and layout building over N repetitions and print
    /// microseconds per 1,000 tensors instead of the report.
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub bench: Option<u32>,
}

/// Run `offload inspect`.
pub fn run(args: &InspectArgs) -> Result<(), String> {
    let open = OpenOptions {
        variant: args.variant.clone(),
    };
    let target = match (&args.model, args.model_preset) {
        (Some(p), _) => Some(ModelTarget::open(p, &open)?),
        (None, Some(p)) => Some(ModelTarget::preset(p)),
        (None, None) => None,
    };
    let mut failed = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for path in &args.paths {
        let res = match args.bench {
            Some(n) => bench(path, n, &open).map(|b| b.render(path, args.json)),
            None => inspect(path, target.as_ref(), &open).map(|r| r.render(path, args.json)),
        };
        let text = match res {
            Ok(text) => text,
            Err(e) => {
                if args.paths.len() > 1 {
                    eprintln!("offload: error: {e}");
                }
                failed.push((path, e.clone()));
                if !args.json {
                    continue;
                }
                let v = json!({ "path": path.display().to_string(), "kind": "error", "error": e });
                format!("{v}\n")
            }
        };
        match stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
        {
            Ok(()) => {}
            // The reader went away (`| head`): stop quietly.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(format!("cannot write to stdout: {e}")),
        }
    }
    if let [(_, e)] = &failed[..] {
        if args.paths.len() == 1 {
            return Err(e.clone());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {} paths could not be inspected: {}",
            failed.len(),
            args.paths.len(),
            failed
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// The model LoRAs are resolved against.
struct ModelTarget {
    /// How it is named in reports.
    name: String,
    index: TargetIndex,
}

impl ModelTarget {
    fn open(path: &Path, open: &OpenOptions) -> Result<ModelTarget, String> {
        let ckpt = Checkpoint::open_with(path, open).map_err(|e| format!("--model: {e}"))?;
        if lora_file_of(&ckpt).is_some() {
            return Err(format!(
                "--model: {}: this is a LoRA file, not a model",
                path.display()
            ));
        }
        let layout = ModelLayout::from_checkpoint(&ckpt);
        Ok(ModelTarget {
            name: path.display().to_string(),
            index: TargetIndex::new(&layout),
        })
    }

    fn preset(p: PresetArg) -> ModelTarget {
        let opts = PresetOptions {
            scale: 1,
            dtype: Dtype::F16,
            text_encoders: true,
            vae: true,
        };
        let name = format!("preset {} (full size, in memory)", p.name());
        let layout = ModelLayout::from_specs(Path::new(&name), &preset_specs(p.preset(), &opts));
        ModelTarget {
            name,
            index: TargetIndex::new(&layout),
        }
    }
}

/// When `ckpt` is a LoRA (see the module documentation), its file.
fn lora_file_of(ckpt: &Checkpoint) -> Option<&Path> {
    let [f] = ckpt.files() else {
        return None;
    };
    let s = LoraFile::from_header(f.path(), f.header().clone()).summary();
    let total = f.tensors().len();
    let in_modules = total.saturating_sub(s.unknown_keys + s.cloneofsimo_keys);
    (s.cloneofsimo_keys > 0 || (s.modules > 0 && 2 * in_modules > total)).then(|| f.path())
}

enum Report {
    Model(ModelReport),
    Lora(Box<LoraReport>),
}

fn inspect(
    path: &Path,
    target: Option<&ModelTarget>,
    open: &OpenOptions,
) -> Result<Report, String> {
    let ckpt = Checkpoint::open_with(path, open).map_err(|e| e.to_string())?;
    if let Some(file) = lora_file_of(&ckpt) {
        let lora = LoraFile::open(file).map_err(|e| e.to_string())?;
        let bytes = ckpt.files()[0].file_len();
        drop(ckpt);
        return lora_report(&lora, bytes, target).map(|r| Report::Lora(Box::new(r)));
    }
    Ok(Report::Model(model_report(&ModelLayout::from_checkpoint(
        &ckpt,
    ))))
}

impl Report {
    /// The report as text, or as one JSON line.
    fn render(&self, path: &Path, json: bool) -> String {
        match (self, json) {
            (Report::Model(m), false) => m.text(path),
            (Report::Model(m), true) => format!("{}\n", m.json(path)),
            (Report::Lora(l), false) => l.text(path),
            (Report::Lora(l), true) => format!("{}\n", l.json(path)),
        }
    }
}

// ---------------------------------------------------------------- models

/// Tensors and bytes of one dtype.
#[derive(Default, Clone, Copy)]
struct DtypeUse {
    tensors: usize,
    bytes: u64,
}

struct ComponentReport {
    name: String,
    kind: ComponentKind,
    prefix: String,
    layers: usize,
    tensors: usize,
    bytes: u64,
    largest: Option<(String, u64)>,
    dtypes: BTreeMap<&'static str, DtypeUse>,
}

struct ModelReport {
    files: Vec<LayoutFile>,
    tensors: usize,
    bytes: u64,
    layers: usize,
    dtypes: BTreeMap<&'static str, DtypeUse>,
    largest: Option<(String, String, u64)>,
    components: Vec<ComponentReport>,
}

fn model_report(layout: &ModelLayout) -> ModelReport {
    let mut dtypes: BTreeMap<&'static str, DtypeUse> = BTreeMap::new();
    let components: Vec<ComponentReport> = layout
        .components
        .iter()
        .map(|c| {
            let mut cd: BTreeMap<&'static str, DtypeUse> = BTreeMap::new();
            for t in c.layers.iter().flat_map(|l| &l.tensors) {
                for m in [&mut cd, &mut dtypes] {
                    let u = m.entry(t.dtype.name()).or_default();
                    u.tensors += 1;
                    u.bytes += t.len;
                }
            }
            ComponentReport {
                name: c.name.clone(),
                kind: c.kind,
                prefix: c.prefix.clone(),
                layers: c.layers.len(),
                tensors: c.tensor_count(),
                bytes: c.bytes(),
                largest: c.largest_layer().map(|l| (l.name.clone(), l.bytes())),
                dtypes: cd,
            }
        })
        .collect();
    ModelReport {
        files: layout.files.clone(),
        tensors: layout.tensor_count(),
        bytes: layout.bytes(),
        layers: components.iter().map(|c| c.layers).sum(),
        dtypes,
        largest: layout
            .largest_layer()
            .map(|(c, l)| (c.name.clone(), l.name.clone(), l.bytes())),
        components,
    }
}

fn kind_id(k: ComponentKind) -> &'static str {
    match k {
        ComponentKind::TextEncoder => "text_encoder",
        ComponentKind::Denoiser => "denoiser",
        ComponentKind::Vae => "vae",
        ComponentKind::Other => "other",
    }
}

fn dtypes_json(d: &BTreeMap<&'static str, DtypeUse>) -> Value {
    Value::Object(
        d.iter()
            .map(|(k, u)| {
                (
                    (*k).to_owned(),
                    json!({ "tensors": u.tensors, "bytes": u.bytes }),
                )
            })
            .collect(),
    )
}

fn dtypes_text(d: &BTreeMap<&'static str, DtypeUse>) -> String {
    d.iter()
        .map(|(k, u)| format!("{k} {} tensors {}", u.tensors, human_bytes(u.bytes)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ModelReport {
    fn json(&self, path: &Path) -> Value {
        json!({
            "path": path.display().to_string(),
            "kind": "model",
            "files": self.files.iter().map(|f| json!({
                "path": f.path.display().to_string(),
                "bytes": f.len,
                "model": f.unit,
            })).collect::<Vec<_>>(),
            "tensors": self.tensors,
            "bytes": self.bytes,
            "layers": self.layers,
            "dtypes": dtypes_json(&self.dtypes),
            "largest_layer": self.largest.as_ref().map(|(c, l, b)| json!({
                "component": c, "name": l, "bytes": b,
            })),
            "components": self.components.iter().map(|c| json!({
                "name": c.name,
                "kind": kind_id(c.kind),
                "prefix": c.prefix,
                "layers": c.layers,
                "tensors": c.tensors,
                "bytes": c.bytes,
                "largest_layer": c.largest.as_ref().map(|(l, b)| json!({ "name": l, "bytes": b })),
                "dtypes": dtypes_json(&c.dtypes),
            })).collect::<Vec<_>>(),
        })
    }

    fn text(&self, path: &Path) -> String {
        let mut s = format!(
            "{}: model, {} file{}, {} tensors, {} ({} bytes), {} layers in {} component{}\n",
            path.display(),
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" },
            self.tensors,
            human_bytes(self.bytes),
            self.bytes,
            self.layers,
            self.components.len(),
            if self.components.len() == 1 { "" } else { "s" },
        );
        s += &format!("  dtypes: {}\n", dtypes_text(&self.dtypes));
        if let Some((c, l, b)) = &self.largest {
            s += &format!(
                "  largest layer: {c} `{l}` {} ({b} bytes)\n",
                human_bytes(*b)
            );
        }
        if self.components.is_empty() {
            return s;
        }
        let w = self
            .components
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0)
            .max("component".len());
        s += &format!(
            "  {:<w$}  {:<12}  {:>6}  {:>7}  {:>10}  largest layer\n",
            "component", "kind", "layers", "tensors", "bytes"
        );
        for c in &self.components {
            let largest = c
                .largest
                .as_ref()
                .map_or_else(String::new, |(l, b)| format!("`{l}` {}", human_bytes(*b)));
            s += &format!(
                "  {:<w$}  {:<12}  {:>6}  {:>7}  {:>10}  {largest}\n",
                c.name,
                kind_id(c.kind),
                c.layers,
                c.tensors,
                human_bytes(c.bytes),
            );
        }
        if self.files.len() > 1 {
            for f in &self.files {
                match &f.unit {
                    Some(u) => {
                        s += &format!(
                            "  file {} ({}), model {u}\n",
                            f.path.display(),
                            human_bytes(f.len)
                        )
                    }
                    None => s += &format!("  file {} ({})\n", f.path.display(), human_bytes(f.len)),
                }
            }
        }
        s
    }
}

// ----------------------------------------------------------------- LoRAs

struct MatchReport {
    model: String,
    modules: usize,
    resolved: Option<ResolvedLora>,
    error: Option<String>,
}

struct LoraReport {
    /// Ranks: the summary's, or for a cloneofsimo file the first dimension
    /// of its `:down` tensors.
    ranks: BTreeSet<u64>,
    /// Positional adapters (`:down` tensors) of a cloneofsimo file.
    positional: usize,
    bytes: u64,
    tensors: usize,
    summary: LoraSummary,
    peft_alpha: Option<f64>,
    unsupported: Vec<String>,
    matched: Option<MatchReport>,
}

/// Machine name of a naming convention.
fn naming_id(n: Naming) -> &'static str {
    match n {
        Naming::Kohya => "kohya",
        Naming::Diffusers => "diffusers",
        Naming::Peft => "peft",
        Naming::Checkpoint => "checkpoint",
        Naming::DiffusersLegacy => "diffusers_legacy",
        Naming::XLabs => "xlabs",
        Naming::Cloneofsimo => "cloneofsimo",
        Naming::Unknown => "unknown",
    }
}

/// Machine name of an algorithm.
fn algorithm_id(a: Algorithm) -> &'static str {
    match a {
        Algorithm::Lora => "lora",
        Algorithm::LoCon => "locon",
        Algorithm::LoHa => "loha",
        Algorithm::LoKr => "lokr",
        Algorithm::Dora => "dora",
        Algorithm::Bias => "bias",
        Algorithm::Tucker => "tucker",
        Algorithm::Diff => "diff",
        Algorithm::Norm => "norm",
        Algorithm::Oft => "oft",
    }
}

/// Machine name of a problem class.
fn problem_id(k: ProblemKind) -> &'static str {
    match k {
        ProblemKind::Unmatched => "unmatched",
        ProblemKind::ShapeMismatch => "shape_mismatch",
        ProblemKind::Malformed => "malformed",
        ProblemKind::Unsupported => "unsupported",
        ProblemKind::UnknownKey => "unknown_key",
    }
}

fn lora_report(
    lora: &LoraFile,
    bytes: u64,
    target: Option<&ModelTarget>,
) -> Result<LoraReport, String> {
    let summary = lora.summary();
    let mut ranks = summary.ranks.clone();
    let mut positional = 0;
    if summary.cloneofsimo_keys > 0 {
        for t in lora.tensors() {
            let mut parts = t.name.split(':');
            if let (Some("unet" | "text_encoder"), Some(_), Some("down"), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            {
                positional += 1;
                ranks.extend(t.shape.first());
            }
        }
    }
    let mut unsupported = Vec::new();
    if summary.cloneofsimo_keys > 0 {
        unsupported.push(format!(
            "cloneofsimo positional format ({} `unet:{{i}}:up`-style tensors): adapters are numbered by injection order, not named, so they cannot be mapped onto model tensors",
            summary.cloneofsimo_keys
        ));
    }
    for (a, n) in &summary.algorithms {
        if !matches!(
            a,
            Algorithm::Lora | Algorithm::LoCon | Algorithm::LoHa | Algorithm::LoKr
        ) {
            unsupported.push(format!(
                "{} ({n} modules) is recognised, not applied",
                a.label()
            ));
        }
    }
    let matched = match target {
        None => None,
        Some(t) => Some(match lora.resolve(&t.index, &ResolveOptions::default()) {
            Ok(r) => MatchReport {
                model: t.name.clone(),
                modules: summary.modules,
                resolved: Some(r),
                error: None,
            },
            Err(e @ LoaderError::LoraUnsupported { .. }) => MatchReport {
                model: t.name.clone(),
                modules: summary.modules,
                resolved: None,
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e.to_string()),
        }),
    };
    Ok(LoraReport {
        ranks,
        positional,
        bytes,
        tensors: lora.tensors().len(),
        peft_alpha: lora.peft_config().map(|c| c.lora_alpha),
        summary,
        unsupported,
        matched,
    })
}

impl MatchReport {
    fn matched(&self) -> usize {
        self.resolved.as_ref().map_or(0, |r| r.adapters.len())
    }

    fn problems(&self) -> BTreeMap<ProblemKind, usize> {
        self.resolved
            .as_ref()
            .map(ResolvedLora::counts)
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        let skipped = self.resolved.as_ref().map_or(&[][..], |r| &r.skipped[..]);
        json!({
            "model": self.model,
            "modules": self.modules,
            "matched": self.matched(),
            "skipped": skipped.len(),
            "problems": Value::Object(self.problems().into_iter()
                .map(|(k, n)| (problem_id(k).to_owned(), json!(n))).collect()),
            "skipped_keys": skipped.iter().map(|s| json!({
                "key": s.key,
                "problem": problem_id(s.problem.kind()),
                "detail": s.problem.to_string(),
            })).collect::<Vec<_>>(),
            "error": self.error,
        })
    }

    fn text(&self) -> String {
        if let Some(e) = &self.error {
            return format!("  against {}: not resolved: {e}\n", self.model);
        }
        let mut s = format!(
            "  against {}: {} of {} modules matched",
            self.model,
            self.matched(),
            self.modules
        );
        let problems = self.problems();
        if !problems.is_empty() {
            s += &format!(
                "; skipped: {}",
                problems
                    .iter()
                    .map(|(k, n)| format!("{n} {}", problem_id(*k)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s.push('\n');
        if let Some(r) = &self.resolved {
            for k in &r.skipped {
                s += &format!(
                    "    `{}` [{}]: {}\n",
                    k.key,
                    problem_id(k.problem.kind()),
                    k.problem
                );
            }
        }
        s
    }
}

fn join<T: ToString>(it: impl IntoIterator<Item = T>) -> String {
    it.into_iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl LoraReport {
    fn json(&self, path: &Path) -> Value {
        let s = &self.summary;
        json!({
            "path": path.display().to_string(),
            "kind": "lora",
            "bytes": self.bytes,
            "tensors": self.tensors,
            "convention": naming_id(s.naming),
            "convention_label": s.naming.label(),
            "conventions": Value::Object(s.namings.iter()
                .map(|(n, c)| (naming_id(*n).to_owned(), json!(c))).collect()),
            "algorithms": Value::Object(s.algorithms.iter()
                .map(|(a, c)| (algorithm_id(*a).to_owned(), json!(c))).collect()),
            "modules": s.modules,
            "ranks": self.ranks.iter().collect::<Vec<_>>(),
            "alphas": s.alphas,
            "peft_alpha": self.peft_alpha,
            "unknown_keys": s.unknown_keys,
            "cloneofsimo_keys": s.cloneofsimo_keys,
            "supported": self.unsupported.is_empty(),
            "unsupported": self.unsupported,
            "match": self.matched.as_ref().map(MatchReport::json),
        })
    }

    fn text(&self, path: &Path) -> String {
        let s = &self.summary;
        let mut out = format!(
            "{}: LoRA, {} tensors, {} ({} bytes), {} modules\n",
            path.display(),
            self.tensors,
            human_bytes(self.bytes),
            self.bytes,
            s.modules
        );
        out += &format!("  convention: {}", s.naming.label());
        if s.namings.len() > 1 {
            out += &format!(
                " (modules by convention: {})",
                join(s.namings.iter().map(|(n, c)| format!("{} {c}", n.label())))
            );
        }
        out.push('\n');
        if !s.algorithms.is_empty() {
            out += &format!(
                "  algorithms: {}\n",
                join(
                    s.algorithms
                        .iter()
                        .map(|(a, c)| format!("{} {c}", a.label()))
                )
            );
        }
        if !self.ranks.is_empty() {
            out += &format!("  ranks: {}\n", join(&self.ranks));
        }
        match (s.alphas.is_empty(), self.peft_alpha) {
            (false, _) => out += &format!("  alphas: {}\n", join(&s.alphas)),
            (true, Some(a)) => out += &format!("  alpha: {a} (adapter_config.json)\n"),
            (true, None) => out += "  alpha: none (scale = multiplier)\n",
        }
        if s.cloneofsimo_keys > 0 {
            out += &format!(
                "  cloneofsimo keys: {} ({} positional adapters)\n",
                s.cloneofsimo_keys, self.positional
            );
        }
        if s.unknown_keys > 0 {
            out += &format!("  unknown keys: {}\n", s.unknown_keys);
        }
        for u in &self.unsupported {
            out += &format!("  unsupported: {u}\n");
        }
        if let Some(m) = &self.matched {
            out += &m.text();
        }
        out
    }
}

// ----------------------------------------------------------------- bench

/// Timings of `--bench`: totals over all runs, and the fastest run's
/// (the least disturbed by other work on the machine).
struct Bench {
    runs: u32,
    tensors: usize,
    parse: Duration,
    layout: Duration,
    best_parse: Duration,
    best_layout: Duration,
}

fn bench(path: &Path, runs: u32, open: &OpenOptions) -> Result<Bench, String> {
    let mut b = Bench {
        runs,
        tensors: 0,
        parse: Duration::ZERO,
        layout: Duration::ZERO,
        best_parse: Duration::MAX,
        best_layout: Duration::MAX,
    };
    for _ in 0..runs {
        let t0 = Instant::now();
        let ckpt = Checkpoint::open_with(path, open).map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let layout = ModelLayout::from_checkpoint(&ckpt);
        let t2 = Instant::now();
        std::hint::black_box(&layout);
        b.tensors = ckpt.tensor_count();
        b.parse += t1 - t0;
        b.layout += t2 - t1;
        b.best_parse = b.best_parse.min(t1 - t0);
        b.best_layout = b.best_layout.min(t2 - t1);
    }
    Ok(b)
}

impl Bench {
    /// Microseconds per 1,000 tensors of `d`, spent over `runs` runs.
    fn per_1000(&self, d: Duration, runs: u32) -> f64 {
        d.as_secs_f64() * 1e6 / f64::from(runs) * 1000.0 / self.tensors.max(1) as f64
    }

    /// The timings as text, or as one JSON line.
    fn render(&self, path: &Path, json: bool) -> String {
        let parse = self.per_1000(self.parse, self.runs);
        let layout = self.per_1000(self.layout, self.runs);
        let ms = (self.parse + self.layout).as_secs_f64() * 1e3 / f64::from(self.runs);
        let best_parse = self.per_1000(self.best_parse, 1);
        let best_layout = self.per_1000(self.best_layout, 1);
        let best_ms = (self.best_parse + self.best_layout).as_secs_f64() * 1e3;
        if json {
            let v = json!({
                "path": path.display().to_string(),
                "bench": {
                    "runs": self.runs,
                    "tensors": self.tensors,
                    "parse_us_per_1000_tensors": parse,
                    "layout_us_per_1000_tensors": layout,
                    "total_us_per_1000_tensors": parse + layout,
                    "ms_per_open": ms,
                    "best_parse_us_per_1000_tensors": best_parse,
                    "best_layout_us_per_1000_tensors": best_layout,
                    "best_ms_per_open": best_ms,
                }
            });
            format!("{v}\n")
        } else {
            format!(
                "{}: {} runs, {} tensors, per 1,000 tensors: mean header parse {parse:.1} µs + layout {layout:.1} µs = {:.1} µs ({ms:.3} ms per open); best {best_parse:.1} + {best_layout:.1} = {:.1} µs ({best_ms:.3} ms per open)\n",
                path.display(),
                self.runs,
                self.tensors,
                parse + layout,
                best_parse + best_layout,
            )
        }
    }
}
