//! LoRA files: parsing every common convention, resolving each adapter to
//! the model weight it changes, and validating shapes, as plain data the
//! runtime hands to the merge kernels.
//!
//! # What comes out
//!
//! [`LoraFile::resolve`] turns a LoRA file and a model ([`TargetIndex`],
//! built once from a [`ModelLayout`]) into a [`ResolvedLora`]: a list of
//! [`Adapter`]s, each naming its target tensor (and, for a fused weight, the
//! rows it covers), its [`Delta`] (factor tensors by name, dtype, shape and
//! byte range) and its final scale; and a list of [`Skipped`] modules, each
//! with a typed [`LoraProblem`]. In strict mode the first problem is an
//! error ([`LoaderError::Lora`]) instead.
//!
//! Every delta is an `n × cols` matrix added to the target viewed as a
//! row-major `[out, in·kh·kw]` matrix, restricted to its row slice (`n`
//! rows; all `out` without one): `W[r0 + i, j] += scale · Δ[i, j]`.
//!
//! # Factor conventions
//!
//! | delta | tensors | Δ | rank (for alpha / rank) |
//! |---|---|---|---|
//! | [`Delta::LowRank`] | kohya `lora_down`/`lora_up`, peft/diffusers `lora_A`/`lora_B`, legacy `…_lora.down`/`.up`, `.lora.down`, `lora_linear_layer.down`, XLabs `…_lora1.down`; LoCon: 4-D `down` `[r, in, kh, kw]`, `up` `[out, r, 1, 1]` | `up · down` | `down.shape[0]` |
//! | [`Delta::LoHa`] | `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` | `(w1a·w1b) ⊙ (w2a·w2b)` | `hada_w1_b.shape[0]` |
//! | [`Delta::LoKr`] | `lokr_w1` or `lokr_w1_a`/`_b`; `lokr_w2` or `lokr_w2_a`/`_b` | `kron(w1, w2)` | `w2_b.shape[0]` if w2 is low-rank, else `w1_b.shape[0]`; none if both are full |
//!
//! Conv deltas stored flattened (LoKr/LoHa `[out, in·3·3]`, a linear LoRA on
//! a 1x1 conv) fit a 4-D target because the target is viewed as
//! `[out, in·kh·kw]`: an adapter must produce exactly `n` rows and
//! `in·kh·kw` columns, not merely the same element count.
//!
//! # Scale
//!
//! `scale = multiplier × alpha / rank` when the module has an `.alpha`
//! tensor, else `multiplier × 1` (alpha defaults to the rank). An alpha of 0
//! means "the rank", as in kohya's and LyCORIS's training code. LoKr follows
//! LyCORIS: when both Kronecker factors are full matrices the scale is 1
//! whatever alpha says (LyCORIS sets `alpha = lora_dim` in that case, and
//! ComfyUI ignores alpha when neither factor is low-rank); otherwise alpha
//! divides by the rank of the low-rank factor (w2's if both are). For
//! diffusers/peft files without `.alpha` tensors, a peft
//! `adapter_config.json` beside the file supplies `lora_alpha` (and
//! `alpha_pattern`; `use_rslora` divides by √rank instead).
//!
//! # Names
//!
//! See [`Naming`] for the conventions recognised and
//! [`TargetIndex`] for how module names map onto model tensors (kohya
//! flattened names resolved against the model's actual names, diffusers
//! UNet names onto LDM checkpoints and back, diffusers FLUX and SD3 names
//! onto row slices of BFL's and MMDiT's fused `qkv` (and FLUX's `linear1`),
//! BFL FLUX names onto a diffusers-layout FLUX transformer, HF CLIP names
//! onto OpenCLIP).
//!
//! An `.alpha` tensor is one number of any float or integer dtype (ComfyUI
//! reads it with `.item()`).
//!
//! # Recognised, not applied
//!
//! The cloneofsimo positional format (`unet:{i}:up`) is an error for the
//! whole file ([`LoaderError::LoraUnsupported`]): its adapters are numbered
//! by injection order over the model's Linear layers, which depends on the
//! diffusers version that trained it. DoRA (`dora_scale`,
//! `lora_magnitude_vector`), LoRA biases (`lora_B.bias`, control LoRAs),
//! Tucker/CP factors (`lora_mid`, `hada_t1`, `lokr_t2`), LyCORIS full/diff,
//! norm and OFT modules are reported per module as
//! [`LoraProblem::Unsupported`], naming the convention.

mod index;
mod keys;

pub use index::{
    diffusers_unet_to_ldm, flux_bfl_to_diffusers, flux_diffusers_to_bfl, ldm_unet_to_diffusers,
    mmdit_to_diffusers, Alias, Target, TargetIndex,
};
pub use keys::Naming;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::{scalar_to_f64, Dtype};
use crate::error::{LoaderError, Result};
use crate::layout::{ModelLayout, TensorRef};
use crate::safetensors::{parse_file_bytes, Header, SafetensorsFile, TensorInfo};
use crate::synth::TensorSpec;
use index::Entry;
use keys::{is_cloneofsimo, lookup_of, rewrite_dotted, split_key, Part};

/// The kind of delta a LoRA module stores (or the feature that keeps it
/// from being applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Low-rank `up · down` on a linear (or 1x1 conv) weight.
    Lora,
    /// Low-rank on a conv weight with a kernel larger than 1x1 (LoCon).
    LoCon,
    /// LyCORIS LoHa (Hadamard product of two low-rank products).
    LoHa,
    /// LyCORIS LoKr (Kronecker product).
    LoKr,
    /// DoRA weight decomposition (`dora_scale`, `lora_magnitude_vector`).
    Dora,
    /// A bias delta beside the weight delta (`lora_B.bias`).
    Bias,
    /// Tucker / CP decomposed conv factors (`lora_mid`, `hada_t1`,
    /// `lokr_t2`).
    Tucker,
    /// LyCORIS full weight difference (`diff`, `diff_b`, `set_weight`).
    Diff,
    /// LyCORIS norm adapters (`w_norm`, `b_norm`).
    Norm,
    /// LyCORIS OFT / BOFT.
    Oft,
}

impl Algorithm {
    /// A short human-readable name.
    pub fn label(self) -> &'static str {
        match self {
            Algorithm::Lora => "LoRA",
            Algorithm::LoCon => "LoCon",
            Algorithm::LoHa => "LoHa",
            Algorithm::LoKr => "LoKr",
            Algorithm::Dora => "DoRA",
            Algorithm::Bias => "LoRA bias",
            Algorithm::Tucker => "Tucker/CP",
            Algorithm::Diff => "full diff",
            Algorithm::Norm => "norm",
            Algorithm::Oft => "OFT",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One side of a LoKr Kronecker product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KronFactor {
    /// The matrix itself (`lokr_w1` `[a, b]`, or `lokr_w2` `[c, d]` /
    /// `[c, d, kh, kw]`, viewed as `[c, d·kh·kw]`).
    Full(TensorInfo),
    /// The matrix as `a · b`: `a` `[m, r]`, `b` `[r, n...]` (trailing
    /// dimensions flattened).
    LowRank {
        /// Left factor (`lokr_w1_a` / `lokr_w2_a`).
        a: TensorInfo,
        /// Right factor (`lokr_w1_b` / `lokr_w2_b`).
        b: TensorInfo,
    },
}

impl KronFactor {
    /// `[rows, cols]` of the matrix this side stands for.
    /// (Products that overflow saturate at `u64::MAX`; a resolved
    /// adapter's factors never overflow.)
    pub fn shape(&self) -> [u64; 2] {
        match self {
            KronFactor::Full(t) => matrix_saturating(&t.shape),
            KronFactor::LowRank { a, b } => [
                matrix_saturating(&a.shape)[0],
                matrix_saturating(&b.shape)[1],
            ],
        }
    }

    /// The rank of a low-rank side.
    pub fn rank(&self) -> Option<u64> {
        match self {
            KronFactor::Full(_) => None,
            KronFactor::LowRank { b, .. } => Some(matrix_saturating(&b.shape)[0]),
        }
    }

    fn tensors(&self) -> Vec<&TensorInfo> {
        match self {
            KronFactor::Full(t) => vec![t],
            KronFactor::LowRank { a, b } => vec![a, b],
        }
    }
}

/// The delta of one adapter, as factor tensors of the LoRA file. Every
/// factor is viewed as a matrix `[shape[0], product of the rest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// `Δ = up · down`; `up` `[n, r]` (or `[n, r, 1, 1]`), `down` `[r, cols]`
    /// (or `[r, in, kh, kw]`).
    LowRank {
        /// B / `lora_up`.
        up: TensorInfo,
        /// A / `lora_down`.
        down: TensorInfo,
    },
    /// `Δ = (w1a · w1b) ⊙ (w2a · w2b)`; `w1a` `[n, r1]`, `w1b` `[r1, cols]`,
    /// `w2a` `[n, r2]`, `w2b` `[r2, cols]`.
    LoHa {
        /// `hada_w1_a`.
        w1a: TensorInfo,
        /// `hada_w1_b`.
        w1b: TensorInfo,
        /// `hada_w2_a`.
        w2a: TensorInfo,
        /// `hada_w2_b`.
        w2b: TensorInfo,
    },
    /// `Δ = kron(w1, w2)`, `w1` `[a, b]`, `w2` `[c, d]`, `a·c = n`,
    /// `b·d = cols`.
    LoKr {
        /// Left side.
        w1: KronFactor,
        /// Right side.
        w2: KronFactor,
    },
}

impl Delta {
    /// Every factor tensor of the delta.
    pub fn factors(&self) -> Vec<&TensorInfo> {
        match self {
            Delta::LowRank { up, down } => vec![up, down],
            Delta::LoHa { w1a, w1b, w2a, w2b } => vec![w1a, w1b, w2a, w2b],
            Delta::LoKr { w1, w2 } => {
                let mut v = w1.tensors();
                v.extend(w2.tensors());
                v
            }
        }
    }
}

/// Where an adapter's alpha came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Alpha {
    /// No alpha: the scale is the multiplier alone.
    Absent,
    /// The value of the module's `.alpha` tensor.
    Tensor(f32),
    /// From a peft `adapter_config.json` (`lora_alpha` or `alpha_pattern`).
    Config(f32),
    /// The module has an `.alpha` tensor but the LoRA was described by its
    /// header alone, so its value is unknown; the scale assumes
    /// alpha = rank.
    Unread,
}

/// One adapter, resolved and validated: plain data for the runtime and the
/// merge kernels.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The module key: the LoRA tensor names without their suffix, as in
    /// the file (`lora_unet_down_blocks_0_attentions_0_proj_in`).
    pub key: String,
    /// Naming convention of the key.
    pub naming: Naming,
    /// Kind of delta.
    pub algorithm: Algorithm,
    /// The model tensor the adapter changes.
    pub target: TensorRef,
    /// Rows of the target the delta covers, for a slice of a fused weight
    /// (diffusers `to_q` in BFL's `qkv`); `None`: all rows.
    pub rows: Option<Range<u64>>,
    /// `[n, cols]` of the delta: `n` rows of the slice, `cols` = the
    /// target's `in·kh·kw`.
    pub delta_shape: [u64; 2],
    /// Rank the alpha is divided by (`None` for a LoKr of two full
    /// factors).
    pub rank: Option<u64>,
    /// Where alpha came from.
    pub alpha: Alpha,
    /// The whole factor applied to the delta: multiplier × alpha / rank
    /// (or × 1).
    pub scale: f32,
    /// The factor tensors.
    pub delta: Delta,
}

impl Adapter {
    /// The target rows the delta covers (all rows without a slice).
    pub fn row_range(&self) -> Range<u64> {
        self.rows
            .clone()
            .unwrap_or(0..self.target.shape.first().copied().unwrap_or(0))
    }

    /// Total bytes of the factor tensors.
    pub fn factor_bytes(&self) -> u64 {
        self.delta
            .factors()
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.len))
    }
}

/// Why a LoRA module cannot be applied.
#[derive(Debug, Clone, PartialEq)]
pub enum LoraProblem {
    /// No tensor of the model has this name.
    NoTarget {
        /// What was looked up where.
        detail: String,
    },
    /// The delta's shape is not the target's (or its row slice's).
    ShapeMismatch(Box<ShapeMismatch>),
    /// The factors do not fit together (ranks differ, a factor has the
    /// wrong number of dimensions, two conventions mixed, ...).
    InconsistentFactors {
        /// What does not agree.
        detail: String,
        /// Every factor with its shape.
        factors: Vec<(String, Vec<u64>)>,
    },
    /// A factor the module needs is absent (an up without its down).
    MissingFactor {
        /// The missing part.
        missing: String,
        /// The tensors the module has.
        present: Vec<String>,
    },
    /// A factor has rank 0.
    ZeroRank {
        /// The factor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// The `.alpha` tensor is not one finite float.
    BadAlpha {
        /// The alpha tensor.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// A factor is not F32, F16 or BF16.
    BadDtype {
        /// The factor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// Recognised but not supported.
    Unsupported {
        /// The convention or feature.
        feature: Algorithm,
        /// Why, with names.
        detail: String,
        /// The model tensor it would have changed, if it resolved.
        target: Option<String>,
    },
    /// A tensor whose name is no LoRA factor.
    UnknownKey {
        /// What the name looks like.
        detail: String,
    },
}

/// The details of [`LoraProblem::ShapeMismatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    /// The target tensor.
    pub target: String,
    /// Its shape.
    pub target_shape: Vec<u64>,
    /// The row slice, if any.
    pub rows: Option<Range<u64>>,
    /// `[n, cols]` the target needs.
    pub expected: [u64; 2],
    /// `[n, cols]` the factors make.
    pub delta: [u64; 2],
    /// Every factor with its shape.
    pub factors: Vec<(String, Vec<u64>)>,
}

/// Coarse classes of [`LoraProblem`], for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    /// [`LoraProblem::NoTarget`]: keys that map to no tensor of the model.
    Unmatched,
    /// [`LoraProblem::ShapeMismatch`].
    ShapeMismatch,
    /// Structural problems of the file: inconsistent or missing factors,
    /// zero rank, bad alpha, bad dtype.
    Malformed,
    /// [`LoraProblem::Unsupported`].
    Unsupported,
    /// [`LoraProblem::UnknownKey`].
    UnknownKey,
}

impl LoraProblem {
    /// The class of the problem.
    pub fn kind(&self) -> ProblemKind {
        match self {
            LoraProblem::NoTarget { .. } => ProblemKind::Unmatched,
            LoraProblem::ShapeMismatch(_) => ProblemKind::ShapeMismatch,
            LoraProblem::InconsistentFactors { .. }
            | LoraProblem::MissingFactor { .. }
            | LoraProblem::ZeroRank { .. }
            | LoraProblem::BadAlpha { .. }
            | LoraProblem::BadDtype { .. } => ProblemKind::Malformed,
            LoraProblem::Unsupported { .. } => ProblemKind::Unsupported,
            LoraProblem::UnknownKey { .. } => ProblemKind::UnknownKey,
        }
    }
}

fn fmt_factors(f: &[(String, Vec<u64>)]) -> String {
    f.iter()
        .map(|(n, s)| format!("`{n}` {s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for LoraProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoraProblem::NoTarget { detail } => {
                write!(f, "no tensor of the model matches: {detail}")
            }
            LoraProblem::ShapeMismatch(m) => {
                let ShapeMismatch {
                    target,
                    target_shape,
                    rows,
                    expected,
                    delta,
                    factors,
                } = &**m;
                write!(
                    f,
                    "shape mismatch: the factors ({}) make a {}×{} delta, but target `{target}` {target_shape:?}",
                    fmt_factors(factors),
                    delta[0],
                    delta[1]
                )?;
                if let Some(r) = rows {
                    write!(f, " rows {}..{}", r.start, r.end)?;
                }
                write!(f, " needs {}×{}", expected[0], expected[1])
            }
            LoraProblem::InconsistentFactors { detail, factors } => {
                write!(
                    f,
                    "factors do not fit together: {detail} ({})",
                    fmt_factors(factors)
                )
            }
            LoraProblem::MissingFactor { missing, present } => write!(
                f,
                "{missing} is missing (the module has {})",
                present
                    .iter()
                    .map(|p| format!("`{p}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            LoraProblem::ZeroRank { tensor, shape } => {
                write!(f, "rank 0: `{tensor}` has shape {shape:?}")
            }
            LoraProblem::BadAlpha { tensor, detail } => write!(f, "bad alpha `{tensor}`: {detail}"),
            LoraProblem::BadDtype { tensor, dtype } => write!(
                f,
                "factor `{tensor}` is {dtype}; LoRA factors must be F32, F16 or BF16"
            ),
            LoraProblem::Unsupported {
                feature,
                detail,
                target,
            } => {
                write!(f, "{feature} is not supported: {detail}")?;
                if let Some(t) = target {
                    write!(f, " (target `{t}`)")?;
                }
                Ok(())
            }
            LoraProblem::UnknownKey { detail } => write!(f, "not a LoRA tensor: {detail}"),
        }
    }
}

/// A module (or stray tensor) of a LoRA file that is not applied, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Skipped {
    /// The module key (or the tensor name for an unknown key).
    pub key: String,
    /// The file's tensors that belong to it.
    pub tensors: Vec<String>,
    /// What is wrong.
    pub problem: LoraProblem,
}

/// How to resolve a LoRA against a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResolveOptions {
    /// The user's strength; multiplies every adapter's scale. Must be
    /// finite.
    pub multiplier: f32,
    /// Strict: any module that cannot be applied is an error. Lenient: it
    /// is skipped and listed in [`ResolvedLora::skipped`].
    pub strict: bool,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            multiplier: 1.0,
            strict: false,
        }
    }
}

/// A LoRA file resolved against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedLora {
    /// The LoRA file.
    pub path: PathBuf,
    /// Its naming convention (the most common among its modules).
    pub naming: Naming,
    /// The adapters to apply, in key order.
    pub adapters: Vec<Adapter>,
    /// The modules and tensors not applied, in key order (empty in strict
    /// mode, which errors instead).
    pub skipped: Vec<Skipped>,
}

impl ResolvedLora {
    /// Number of skipped entries per problem class.
    pub fn counts(&self) -> BTreeMap<ProblemKind, usize> {
        let mut m = BTreeMap::new();
        for s in &self.skipped {
            *m.entry(s.problem.kind()).or_insert(0) += 1;
        }
        m
    }

    /// The skipped modules whose keys map to no tensor of the model.
    pub fn unmatched(&self) -> impl Iterator<Item = &Skipped> {
        self.skipped
            .iter()
            .filter(|s| s.problem.kind() == ProblemKind::Unmatched)
    }

    /// The lenient-mode warning: every skipped key with its problem, one
    /// per line after a count; `None` when nothing was skipped.
    pub fn warning(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let mut s = format!(
            "{}: {} LoRA modules skipped ({} applied):",
            self.path.display(),
            self.skipped.len(),
            self.adapters.len()
        );
        for k in &self.skipped {
            s.push_str(&format!("\n  `{}`: {}", k.key, k.problem));
        }
        Some(s)
    }

    /// A one-line summary: adapters applied and skipped, by class.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{}: {} adapters resolved",
            self.path.display(),
            self.adapters.len()
        );
        for (k, n) in self.counts() {
            s.push_str(&format!(", {n} {k:?}"));
        }
        s
    }
}

/// What a LoRA file holds, independent of any model (for `inspect`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSummary {
    /// The most common naming convention among its modules.
    pub naming: Naming,
    /// Modules per naming convention.
    pub namings: BTreeMap<Naming, usize>,
    /// Modules per algorithm (a DoRA LoRA counts as LoRA and DoRA).
    pub algorithms: BTreeMap<Algorithm, usize>,
    /// Number of modules (tensors grouped by module key).
    pub modules: usize,
    /// Every rank seen.
    pub ranks: BTreeSet<u64>,
    /// Every alpha value read, ascending, without repeats.
    pub alphas: Vec<f32>,
    /// Tensors with no known LoRA suffix.
    pub unknown_keys: usize,
    /// Tensors in cloneofsimo's positional format.
    pub cloneofsimo_keys: usize,
}

/// A peft `adapter_config.json`: the alpha for LoRAs whose files have no
/// `.alpha` tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct PeftConfig {
    /// `lora_alpha`.
    pub lora_alpha: f64,
    /// `r`, if given (the scale uses each adapter's actual rank).
    pub r: Option<u64>,
    /// `use_rslora`: scale by alpha / √rank.
    pub use_rslora: bool,
    /// `alpha_pattern`: per-module alphas. Keys match a module path equal
    /// to them or ending in `.` + key (literally; peft's regular
    /// expressions are not evaluated).
    pub alpha_pattern: Vec<(String, f64)>,
}

impl PeftConfig {
    /// Parses the text of an `adapter_config.json` (`path` for messages).
    pub fn parse(path: &Path, text: &str) -> Result<PeftConfig> {
        let err = |problem: String| LoaderError::LoraConfig {
            path: path.to_owned(),
            problem,
        };
        let v: Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let lora_alpha = obj
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .filter(|a| a.is_finite())
            .ok_or_else(|| err("`lora_alpha` is missing or not a finite number".into()))?;
        let r = match obj.get("r") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .ok_or_else(|| err(format!("`r` is {x}, expected a non-negative integer")))?,
            ),
        };
        let use_rslora = match obj.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(x) => x
                .as_bool()
                .ok_or_else(|| err(format!("`use_rslora` is {x}, expected true or false")))?,
        };
        let mut alpha_pattern = Vec::new();
        if let Some(p) = obj.get("alpha_pattern").filter(|p| !p.is_null()) {
            let p = p
                .as_object()
                .ok_or_else(|| err("`alpha_pattern` is not an object".into()))?;
            for (k, x) in p {
                let a = x.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                    err(format!(
                        "`alpha_pattern` entry `{k}` is {x}, expected a number"
                    ))
                })?;
                alpha_pattern.push((k.clone(), a));
            }
        }
        Ok(PeftConfig {
            lora_alpha,
            r,
            use_rslora,
            alpha_pattern,
        })
    }

    /// Reads `adapter_config.json` from the folder of `lora_path`, if there
    /// is one.
    pub fn beside(lora_path: &Path) -> Result<Option<PeftConfig>> {
        let Some(dir) = lora_path.parent() else {
            return Ok(None);
        };
        let p = dir.join("adapter_config.json");
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|source| LoaderError::Open {
            path: p.clone(),
            source,
        })?;
        PeftConfig::parse(&p, &text).map(Some)
    }

    /// The alpha for a module path.
    pub fn alpha_for(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|(k, _)| {
                module == k
                    || module
                        .strip_suffix(k.as_str())
                        .is_some_and(|h| h.ends_with('.'))
            })
            .map_or(self.lora_alpha, |(_, a)| *a)
    }
}

#[derive(Debug)]
enum Source {
    File(SafetensorsFile),
    Bytes(Vec<u8>),
    None,
}

/// A LoRA file: its tensors, its metadata, its alpha values, and (unless it
/// was described by a header alone) access to its bytes.
#[derive(Debug)]
pub struct LoraFile {
    path: PathBuf,
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorInfo>,
    scalars: HashMap<String, f32>,
    peft: Option<PeftConfig>,
    source: Source,
}

/// A module of a LoRA file: tensors grouped by module key.
#[derive(Debug)]
struct Module<'a> {
    key: &'a str,
    lookup: String,
    naming: Naming,
    parts: BTreeMap<Part, &'a TensorInfo>,
    /// Parts given twice (by two suffixes of the same meaning).
    duplicates: Vec<&'a str>,
}

/// Whether a dtype can hold an alpha: a float or an integer (ComfyUI reads
/// alpha with `.item()`, so an integer scalar is as good as a float one).
fn alpha_dtype(d: Dtype) -> bool {
    d.is_float()
        || matches!(
            d,
            Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8
        )
}

/// Whether a tensor can hold an alpha: one number.
fn alpha_candidate(t: &TensorInfo) -> bool {
    t.name.ends_with(".alpha") && t.numel() == 1 && alpha_dtype(t.dtype)
}

fn read_scalars(
    path: &Path,
    tensors: &[TensorInfo],
    mut read: impl FnMut(&TensorInfo, &mut [u8]) -> Result<()>,
) -> Result<HashMap<String, f32>> {
    let mut out = HashMap::new();
    for t in tensors.iter().filter(|t| alpha_candidate(t)) {
        let mut buf = vec![0u8; t.len as usize];
        read(t, &mut buf)?;
        let v = scalar_to_f64(&buf, t.dtype).map_err(|e| e.in_tensor(path, &t.name))?;
        out.insert(t.name.clone(), v as f32);
    }
    Ok(out)
}

/// The product of `dims`: 0 if any is 0 (whatever the others are), `None`
/// if it overflows 64 bits.
pub(crate) fn dims_product(dims: &[u64]) -> Option<u64> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d))
}

/// `[shape[0], product of the rest]` (a scalar is `[1, 1]`); `None` if the
/// product overflows.
fn matrix(shape: &[u64]) -> Option<[u64; 2]> {
    match shape.split_first() {
        Some((r, rest)) => Some([*r, dims_product(rest)?]),
        None => Some([1, 1]),
    }
}

/// [`matrix`], saturating at `u64::MAX` instead of overflowing.
fn matrix_saturating(shape: &[u64]) -> [u64; 2] {
    match shape.split_first() {
        Some((r, rest)) => [*r, dims_product(rest).unwrap_or(u64::MAX)],
        None => [1, 1],
    }
}

impl LoraFile {
    /// Opens a LoRA file: validates its header (as [`SafetensorsFile`]
    /// does), reads its `.alpha` values, and reads a peft
    /// `adapter_config.json` beside it if there is one.
    pub fn open(path: impl AsRef<Path>) -> Result<LoraFile> {
        let path = path.as_ref();
        let f = SafetensorsFile::open(path)?;
        let scalars = read_scalars(path, f.tensors(), |t, buf| {
            f.read_info_range_into(t, 0, buf)
        })?;
        Ok(LoraFile {
            path: path.to_owned(),
            metadata: f.metadata().clone(),
            tensors: f.tensors().to_vec(),
            scalars,
            peft: PeftConfig::beside(path)?,
            source: Source::File(f),
        })
    }

    /// A LoRA file held in memory (`path` names it in messages).
    pub fn from_bytes(path: impl AsRef<Path>, bytes: Vec<u8>) -> Result<LoraFile> {
        let path = path.as_ref();
        let header = parse_file_bytes(path, &bytes, 0)?;
        let scalars = read_scalars(path, &header.tensors, |t, buf| {
            // In range: validated by parse_file_bytes.
            let start = t.data_offset as usize;
            buf.copy_from_slice(&bytes[start..start + buf.len()]);
            Ok(())
        })?;
        Ok(LoraFile {
            path: path.to_owned(),
            metadata: header.metadata,
            tensors: header.tensors,
            scalars,
            peft: None,
            source: Source::Bytes(bytes),
        })
    }

    /// A LoRA described by a validated header alone: everything but the
    /// values of its `.alpha` tensors ([`Alpha::Unread`]) and its bytes.
    /// For tests and tools that work from names and shapes.
    pub fn from_header(path: impl AsRef<Path>, header: Header) -> LoraFile {
        LoraFile {
            path: path.as_ref().to_owned(),
            metadata: header.metadata,
            tensors: header.tensors,
            scalars: HashMap::new(),
            peft: None,
            source: Source::None,
        }
    }

    /// A LoRA described by tensor names, dtypes and shapes alone, laid out
    /// back to back as [`crate::synth::write_tensors`] would write them
    /// (see [`LoraFile::from_header`]).
    pub fn from_specs(path: impl AsRef<Path>, specs: &[TensorSpec]) -> LoraFile {
        let mut offset = 0u64;
        let tensors = specs
            .iter()
            .map(|s| {
                let len = s.byte_len().unwrap_or(0);
                let t = TensorInfo {
                    name: s.name.clone(),
                    dtype: s.dtype,
                    shape: s.shape.clone(),
                    data_offset: offset,
                    len,
                    file: 0,
                };
                offset = offset.saturating_add(len);
                t
            })
            .collect();
        LoraFile {
            path: path.as_ref().to_owned(),
            metadata: BTreeMap::new(),
            tensors,
            scalars: HashMap::new(),
            peft: None,
            source: Source::None,
        }
    }

    /// Replaces the peft config (alpha for files without `.alpha` tensors).
    pub fn with_peft_config(mut self, config: Option<PeftConfig>) -> LoraFile {
        self.peft = config;
        self
    }

    /// Sets the value of an `.alpha` tensor (for LoRAs described by a
    /// header alone).
    pub fn set_alpha(&mut self, tensor: &str, value: f32) {
        self.scalars.insert(tensor.to_owned(), value);
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file's tensors, in data-offset order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The peft config in use, if any.
    pub fn peft_config(&self) -> Option<&PeftConfig> {
        self.peft.as_ref()
    }

    /// Reads the whole factor tensor `t` (from an [`Adapter`] of this file)
    /// into `dst`, whose length must be `t.len`. Checked positional reads:
    /// a file truncated after opening is an error, never a SIGBUS.
    pub fn read_factor_into(&self, t: &TensorInfo, dst: &mut [u8]) -> Result<()> {
        let own = self
            .tensors
            .iter()
            .find(|x| x.name == t.name)
            .filter(|x| *x == t)
            .ok_or_else(|| LoaderError::TensorNotFound {
                path: self.path.clone(),
                tensor: t.name.clone(),
            })?;
        if dst.len() as u64 != own.len {
            return Err(LoaderError::BufferSize {
                path: self.path.clone(),
                tensor: t.name.clone(),
                len: own.len,
                dst_len: dst.len() as u64,
            });
        }
        match &self.source {
            Source::File(f) => f.read_info_range_into(own, 0, dst),
            Source::Bytes(b) => {
                let s = own.data_offset as usize;
                dst.copy_from_slice(&b[s..s + dst.len()]);
                Ok(())
            }
            Source::None => Err(LoaderError::LoraNoData {
                path: self.path.clone(),
                tensor: t.name.clone(),
            }),
        }
    }

    fn cloneofsimo_keys(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| is_cloneofsimo(&t.name))
            .count()
    }

    /// Groups tensors into modules; returns the modules (in key order) and
    /// the tensors with no known suffix.
    fn modules(&self) -> (Vec<Module<'_>>, Vec<&TensorInfo>) {
        let mut map: BTreeMap<&str, Module<'_>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for t in &self.tensors {
            let Some((key, part)) = split_key(&t.name) else {
                unknown.push(t);
                continue;
            };
            let m = map.entry(key).or_insert_with(|| {
                let (lookup, naming) = rewrite_dotted(key);
                Module {
                    key,
                    lookup,
                    naming,
                    parts: BTreeMap::new(),
                    duplicates: Vec::new(),
                }
            });
            match m.parts.entry(part) {
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(t);
                }
                std::collections::btree_map::Entry::Occupied(_) => m.duplicates.push(&t.name),
            }
        }
        unknown.sort_by(|a, b| a.name.cmp(&b.name));
        (map.into_values().collect(), unknown)
    }

    /// What the file holds, without a model: conventions, algorithms,
    /// ranks and alphas.
    pub fn summary(&self) -> LoraSummary {
        let (modules, unknown) = self.modules();
        let cloneofsimo_keys = self.cloneofsimo_keys();
        let mut namings = BTreeMap::new();
        let mut algorithms = BTreeMap::new();
        let mut ranks = BTreeSet::new();
        for m in &modules {
            *namings.entry(m.naming).or_insert(0) += 1;
            for a in module_algorithms(m) {
                *algorithms.entry(a).or_insert(0) += 1;
            }
            for p in [Part::Down, Part::HadaW1B, Part::LokrW1B, Part::LokrW2B] {
                if let Some(r) = m.parts.get(&p).and_then(|t| t.shape.first()) {
                    ranks.insert(*r);
                }
            }
        }
        let mut alphas: Vec<f32> = self.scalars.values().copied().collect();
        alphas.sort_by(f32::total_cmp);
        alphas.dedup();
        let naming = if cloneofsimo_keys > 0 {
            Naming::Cloneofsimo
        } else {
            majority(&namings)
        };
        LoraSummary {
            naming,
            namings,
            algorithms,
            modules: modules.len(),
            ranks,
            alphas,
            unknown_keys: unknown.len() - cloneofsimo_keys.min(unknown.len()),
            cloneofsimo_keys,
        }
    }

    /// Resolves every module against the model layout (builds a
    /// [`TargetIndex`]; to resolve several LoRAs against one model, build
    /// the index once and call [`LoraFile::resolve`]).
    pub fn resolve_layout(
        &self,
        layout: &ModelLayout,
        opts: &ResolveOptions,
    ) -> Result<ResolvedLora> {
        self.resolve(&TargetIndex::new(layout), opts)
    }

    /// Resolves every module of the file against a model: maps its key to
    /// the target tensor, checks the factors against each other and against
    /// the target, and computes the scale. Modules that cannot be applied
    /// are an error in strict mode, else listed in
    /// [`ResolvedLora::skipped`]. A cloneofsimo file is always an error
    /// ([`LoaderError::LoraUnsupported`]), as is a multiplier that is not
    /// finite.
    pub fn resolve(&self, index: &TargetIndex, opts: &ResolveOptions) -> Result<ResolvedLora> {
        if !opts.multiplier.is_finite() {
            return Err(LoaderError::LoraMultiplier {
                path: self.path.clone(),
                multiplier: opts.multiplier,
            });
        }
        let clone_keys = self.cloneofsimo_keys();
        if clone_keys > 0 {
            let classes: Vec<String> = ["unet", "text_encoder"]
                .iter()
                .filter_map(|k| self.metadata.get(*k).map(|v| format!("{k}: {v}")))
                .collect();
            return Err(LoaderError::LoraUnsupported {
                path: self.path.clone(),
                convention: "cloneofsimo positional (`unet:{i}:up`)",
                detail: format!(
                    "its {} tensors name adapters by their injection order over the Linear \
                     layers of the model's attention modules{}, not by module name; that order \
                     depends on the diffusers version it was trained with, so no target can be \
                     named with certainty",
                    clone_keys,
                    if classes.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", classes.join("; "))
                    }
                ),
            });
        }
        let (modules, unknown) = self.modules();
        let mut namings = BTreeMap::new();
        let mut adapters = Vec::new();
        let mut skipped = Vec::new();
        for m in &modules {
            *namings.entry(m.naming).or_insert(0) += 1;
            match self.resolve_module(m, index, opts.multiplier) {
                Ok(a) => adapters.push(a),
                Err(problem) => skipped.push(Skipped {
                    key: m.key.to_owned(),
                    tensors: m.parts.values().map(|t| t.name.clone()).collect(),
                    problem,
                }),
            }
        }
        for t in unknown {
            let path = lookup_of(&t.name).path;
            let detail = if index.has_tensor(&t.name) || index.has_tensor(path) {
                format!(
                    "a whole {:?} tensor with the name of a model tensor (control LoRAs \
                     replace such tensors outright), not a LoRA factor",
                    t.shape
                )
            } else {
                "no known LoRA factor suffix (lora_down/lora_up/lora_A/lora_B/alpha/hada_*/lokr_*...)"
                    .to_owned()
            };
            skipped.push(Skipped {
                key: t.name.clone(),
                tensors: vec![t.name.clone()],
                problem: LoraProblem::UnknownKey { detail },
            });
        }
        skipped.sort_by(|a, b| a.key.cmp(&b.key));
        if opts.strict {
            if let Some(first) = skipped.first() {
                return Err(LoaderError::Lora {
                    path: self.path.clone(),
                    key: first.key.clone(),
                    problem: Box::new(first.problem.clone()),
                    more: skipped.len() - 1,
                });
            }
        }
        Ok(ResolvedLora {
            path: self.path.clone(),
            naming: majority(&namings),
            adapters,
            skipped,
        })
    }

    fn resolve_module(
        &self,
        m: &Module<'_>,
        index: &TargetIndex,
        multiplier: f32,
    ) -> Result<Adapter, LoraProblem> {
        let lookup = lookup_of(&m.lookup);
        let entry = index.find(&lookup);
        let target_name = match &entry {
            Ok(Entry::Tensor(i, _)) => Some(index.tensor_at(*i).name.clone()),
            _ => None,
        };
        let factors_of = |m: &Module<'_>| -> Vec<(String, Vec<u64>)> {
            m.parts
                .iter()
                .filter(|(p, _)| **p != Part::Alpha)
                .map(|(_, t)| (t.name.clone(), t.shape.clone()))
                .collect()
        };
        let unsupported = |feature: Algorithm, detail: String| LoraProblem::Unsupported {
            feature,
            detail,
            target: target_name.clone(),
        };

        if let Some(d) = m.duplicates.first() {
            return Err(LoraProblem::InconsistentFactors {
                detail: format!("`{d}` gives a factor the module already has"),
                factors: factors_of(m),
            });
        }
        let has = |ps: &[Part]| ps.iter().any(|p| m.parts.contains_key(p));
        let families = [
            (has(&[Part::Down, Part::Up, Part::Mid]), "LoRA"),
            (
                has(&[
                    Part::HadaW1A,
                    Part::HadaW1B,
                    Part::HadaW2A,
                    Part::HadaW2B,
                    Part::HadaT1,
                    Part::HadaT2,
                ]),
                "LoHa",
            ),
            (
                has(&[
                    Part::LokrW1,
                    Part::LokrW1A,
                    Part::LokrW1B,
                    Part::LokrW2,
                    Part::LokrW2A,
                    Part::LokrW2B,
                    Part::LokrT1,
                    Part::LokrT2,
                ]),
                "LoKr",
            ),
            (has(&[Part::Diff]), "full diff"),
            (has(&[Part::Norm]), "norm"),
            (has(&[Part::Oft]), "OFT"),
        ];
        let present: Vec<&str> = families.iter().filter(|f| f.0).map(|f| f.1).collect();
        if present.len() > 1 {
            return Err(LoraProblem::InconsistentFactors {
                detail: format!("mixes {} factors in one module", present.join(" and ")),
                factors: factors_of(m),
            });
        }
        let names = || m.parts.values().map(|t| t.name.clone()).collect::<Vec<_>>();
        match present.first() {
            None => {
                return Err(LoraProblem::MissingFactor {
                    missing: "every factor".into(),
                    present: names(),
                })
            }
            Some(&"full diff") => {
                return Err(unsupported(
                    Algorithm::Diff,
                    "LyCORIS full weight differences (diff / set_weight)".into(),
                ))
            }
            Some(&"norm") => {
                return Err(unsupported(
                    Algorithm::Norm,
                    "LyCORIS norm-layer adapters (w_norm / b_norm)".into(),
                ))
            }
            Some(&"OFT") => {
                return Err(unsupported(
                    Algorithm::Oft,
                    "LyCORIS OFT / BOFT rotations".into(),
                ))
            }
            _ => {}
        }
        if let Some(p) = [
            Part::Mid,
            Part::HadaT1,
            Part::HadaT2,
            Part::LokrT1,
            Part::LokrT2,
        ]
        .into_iter()
        .find(|p| m.parts.contains_key(p))
        {
            return Err(unsupported(
                Algorithm::Tucker,
                format!("Tucker/CP-decomposed conv factors (`{}`)", m.parts[&p].name),
            ));
        }
        for (p, t) in &m.parts {
            if matches!(p, Part::Alpha | Part::Dora) {
                continue;
            }
            if !matches!(t.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(LoraProblem::BadDtype {
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                });
            }
        }

        let (delta, delta_shape, rank, algorithm) = structure(m, &factors_of(m))?;

        let alpha_t = m.parts.get(&Part::Alpha);
        let alpha = match alpha_t {
            None => None,
            Some(t) => {
                if t.numel() != 1 || !alpha_dtype(t.dtype) {
                    return Err(LoraProblem::BadAlpha {
                        tensor: t.name.clone(),
                        detail: format!(
                            "shape {:?} of {}; expected one number (shape [] or [1], a float \
                             or integer dtype)",
                            t.shape, t.dtype
                        ),
                    });
                }
                match self.scalars.get(&t.name) {
                    Some(v) if !v.is_finite() => {
                        return Err(LoraProblem::BadAlpha {
                            tensor: t.name.clone(),
                            detail: format!("value {v} is not finite"),
                        })
                    }
                    Some(v) => Some(Alpha::Tensor(*v)),
                    None => Some(Alpha::Unread),
                }
            }
        };

        let (tensor_i, rows) = match entry {
            Ok(Entry::Tensor(i, rows)) => (i, rows),
            Ok(Entry::Unsupported(why)) => {
                return Err(LoraProblem::Unsupported {
                    feature: algorithm,
                    detail: format!("target `{}`: {why}", lookup.path),
                    target: None,
                })
            }
            Err(detail) => return Err(LoraProblem::NoTarget { detail }),
        };
        let target = index.tensor_at(tensor_i);
        let Some([out, cols]) = matrix(&target.shape) else {
            return Err(unsupported(
                algorithm,
                format!(
                    "the target's shape {:?} overflows 64-bit arithmetic",
                    target.shape
                ),
            ));
        };
        let n = rows.as_ref().map_or(out, |r| r.end.saturating_sub(r.start));
        if delta_shape != [n, cols] || target.shape.is_empty() {
            return Err(LoraProblem::ShapeMismatch(Box::new(ShapeMismatch {
                target: target.name.clone(),
                target_shape: target.shape.clone(),
                rows,
                expected: [n, cols],
                delta: delta_shape,
                factors: factors_of(m),
            })));
        }
        if !matches!(target.shape.len(), 2 | 4) {
            return Err(unsupported(
                algorithm,
                format!(
                    "the target is {}-D {:?}; only 2-D linear and 4-D conv weights are merged",
                    target.shape.len(),
                    target.shape
                ),
            ));
        }
        if let Some(t) = m.parts.get(&Part::Dora) {
            return Err(unsupported(
                Algorithm::Dora,
                format!(
                    "DoRA (`{}`) rescales each column of the merged weight by a learned \
                     magnitude; applying only the low-rank delta would be wrong",
                    t.name
                ),
            ));
        }
        if let Some(t) = m
            .parts
            .get(&Part::UpBias)
            .or_else(|| m.parts.get(&Part::DownBias))
        {
            return Err(unsupported(
                Algorithm::Bias,
                format!(
                    "the module also changes the layer's bias (`{}`), as FLUX control LoRAs do; \
                     only weight deltas are merged",
                    t.name
                ),
            ));
        }

        // Scale: alpha / rank (alpha 0 means the rank); LoKr with two full
        // factors: 1.
        let peft_alpha = || -> Option<f32> {
            let cfg = self.peft.as_ref()?;
            if !matches!(
                m.naming,
                Naming::Diffusers | Naming::Peft | Naming::Checkpoint
            ) || !matches!(delta, Delta::LowRank { .. })
            {
                return None;
            }
            Some(cfg.alpha_for(lookup.path) as f32)
        };
        let alpha = match alpha {
            Some(a) => a,
            None => peft_alpha().map_or(Alpha::Absent, Alpha::Config),
        };
        let base = match (rank, alpha) {
            (None, _) => 1.0f64,
            (Some(r), Alpha::Tensor(a)) if a != 0.0 => f64::from(a) / r as f64,
            (Some(r), Alpha::Config(a)) if a != 0.0 => {
                let rslora = self.peft.as_ref().is_some_and(|c| c.use_rslora);
                let d = if rslora { (r as f64).sqrt() } else { r as f64 };
                f64::from(a) / d
            }
            _ => 1.0,
        };
        let scale = (base * f64::from(multiplier)) as f32;
        if !scale.is_finite() {
            return Err(LoraProblem::BadAlpha {
                tensor: alpha_t.map_or_else(|| m.key.to_owned(), |t| t.name.clone()),
                detail: format!(
                    "alpha / rank × multiplier {multiplier} = {scale}, not a finite f32"
                ),
            });
        }
        Ok(Adapter {
            key: m.key.to_owned(),
            naming: m.naming,
            algorithm,
            target: target.clone(),
            rows,
            delta_shape,
            rank,
            alpha,
            scale,
            delta,
        })
    }
}

/// The algorithms a module uses (for summaries).
fn module_algorithms(m: &Module<'_>) -> Vec<Algorithm> {
    let mut v = Vec::new();
    let has = |p: Part| m.parts.contains_key(&p);
    if has(Part::Down) || has(Part::Up) {
        let conv = m.parts.get(&Part::Down).is_some_and(|t| {
            t.shape.len() == 4 && dims_product(&t.shape[2..]).is_none_or(|k| k > 1)
        });
        v.push(if conv {
            Algorithm::LoCon
        } else {
            Algorithm::Lora
        });
    }
    if m.parts.keys().any(|p| {
        matches!(
            p,
            Part::HadaW1A | Part::HadaW1B | Part::HadaW2A | Part::HadaW2B
        )
    }) {
        v.push(Algorithm::LoHa);
    }
    if m.parts.keys().any(|p| {
        matches!(
            p,
            Part::LokrW1
                | Part::LokrW1A
                | Part::LokrW1B
                | Part::LokrW2
                | Part::LokrW2A
                | Part::LokrW2B
        )
    }) {
        v.push(Algorithm::LoKr);
    }
    for (p, a) in [
        (Part::Dora, Algorithm::Dora),
        (Part::UpBias, Algorithm::Bias),
        (Part::Diff, Algorithm::Diff),
        (Part::Norm, Algorithm::Norm),
        (Part::Oft, Algorithm::Oft),
    ] {
        if has(p) && !v.contains(&a) {
            v.push(a);
        }
    }
    if [
        Part::Mid,
        Part::HadaT1,
        Part::HadaT2,
        Part::LokrT1,
        Part::LokrT2,
    ]
    .into_iter()
    .any(has)
    {
        v.push(Algorithm::Tucker);
    }
    v
}

fn majority(namings: &BTreeMap<Naming, usize>) -> Naming {
    namings
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map_or(Naming::Unknown, |(n, _)| *n)
}

type Structure = (Delta, [u64; 2], Option<u64>, Algorithm);

/// The delta of a module whose factors are all of one family, with its
/// `[n, cols]` shape and rank, after checking that the factors fit.
fn structure(m: &Module<'_>, factors: &[(String, Vec<u64>)]) -> Result<Structure, LoraProblem> {
    let names = || m.parts.values().map(|t| t.name.clone()).collect::<Vec<_>>();
    let get = |p: Part| m.parts.get(&p).map(|t| (*t).clone());
    let need = |p: Part| {
        get(p).ok_or_else(|| LoraProblem::MissingFactor {
            missing: format!("`{}`", p.label()),
            present: names(),
        })
    };
    let bad = |detail: String| LoraProblem::InconsistentFactors {
        detail,
        factors: factors.to_vec(),
    };
    // A factor as a matrix: at least 2-D; rows of `r` must be nonzero for
    // rank factors.
    let mat = |t: &TensorInfo, what: &str| -> Result<[u64; 2], LoraProblem> {
        if t.shape.len() < 2 {
            return Err(bad(format!(
                "{what} `{}` is {}-D {:?}; expected at least 2 dimensions",
                t.name,
                t.shape.len(),
                t.shape
            )));
        }
        matrix(&t.shape).ok_or_else(|| {
            bad(format!(
                "{what} `{}` {:?}: the product of its dimensions overflows 64 bits",
                t.name, t.shape
            ))
        })
    };
    let zero = |t: &TensorInfo| LoraProblem::ZeroRank {
        tensor: t.name.clone(),
        shape: t.shape.clone(),
    };

    if m.parts.contains_key(&Part::Down) || m.parts.contains_key(&Part::Up) {
        let down = need(Part::Down)?;
        let up = need(Part::Up)?;
        let [r, cols] = mat(&down, "down")?;
        if r == 0 {
            return Err(zero(&down));
        }
        if up.shape.len() < 2 {
            return Err(bad(format!(
                "up `{}` is {}-D {:?}; expected at least 2 dimensions",
                up.name,
                up.shape.len(),
                up.shape
            )));
        }
        let (n, ur, kernel) = (up.shape[0], up.shape[1], dims_product(&up.shape[2..]));
        if ur == 0 {
            return Err(zero(&up));
        }
        if ur != r {
            return Err(bad(format!(
                "up has rank {ur} (dimension 1), down has rank {r} (dimension 0)"
            )));
        }
        if kernel != Some(1) {
            return Err(bad(format!(
                "up `{}` {:?} has a kernel larger than 1x1; LoCon up factors are 1x1",
                up.name, up.shape
            )));
        }
        let conv = down.shape.len() == 4 && dims_product(&down.shape[2..]).is_none_or(|k| k > 1);
        let algorithm = if conv {
            Algorithm::LoCon
        } else {
            Algorithm::Lora
        };
        return Ok((Delta::LowRank { up, down }, [n, cols], Some(r), algorithm));
    }

    if m.parts.keys().any(|p| {
        matches!(
            p,
            Part::HadaW1A | Part::HadaW1B | Part::HadaW2A | Part::HadaW2B
        )
    }) {
        let (w1a, w1b, w2a, w2b) = (
            need(Part::HadaW1A)?,
            need(Part::HadaW1B)?,
            need(Part::HadaW2A)?,
            need(Part::HadaW2B)?,
        );
        let (a1, b1, a2, b2) = (
            mat(&w1a, "hada_w1_a")?,
            mat(&w1b, "hada_w1_b")?,
            mat(&w2a, "hada_w2_a")?,
            mat(&w2b, "hada_w2_b")?,
        );
        for (t, r) in [(&w1b, b1[0]), (&w2b, b2[0]), (&w1a, a1[1]), (&w2a, a2[1])] {
            if r == 0 {
                return Err(zero(t));
            }
        }
        if a1[1] != b1[0] || a2[1] != b2[0] {
            return Err(bad(format!(
                "ranks differ inside a product: w1 {}·{}, w2 {}·{}",
                a1[1], b1[0], a2[1], b2[0]
            )));
        }
        if a1[0] != a2[0] || b1[1] != b2[1] {
            return Err(bad(format!(
                "the two products differ: w1 is {}×{}, w2 is {}×{}",
                a1[0], b1[1], a2[0], b2[1]
            )));
        }
        let shape = [a1[0], b1[1]];
        let rank = b1[0];
        return Ok((
            Delta::LoHa { w1a, w1b, w2a, w2b },
            shape,
            Some(rank),
            Algorithm::LoHa,
        ));
    }

    // LoKr.
    let side = |full: Part, a: Part, b: Part, name: &str| -> Result<KronFactor, LoraProblem> {
        match (get(full), get(a), get(b)) {
            (Some(f), None, None) => {
                let is_w1 = full == Part::LokrW1;
                if is_w1 && f.shape.len() != 2 {
                    return Err(bad(format!(
                        "`{}` is {:?}; lokr_w1 must be 2-D",
                        f.name, f.shape
                    )));
                }
                mat(&f, name)?;
                Ok(KronFactor::Full(f))
            }
            (None, Some(fa), Some(fb)) => {
                let [_, ra] = mat(&fa, name)?;
                let [rb, _] = mat(&fb, name)?;
                if fa.shape.len() != 2 {
                    return Err(bad(format!(
                        "`{}` is {:?}; it must be 2-D",
                        fa.name, fa.shape
                    )));
                }
                if full == Part::LokrW1 && fb.shape.len() != 2 {
                    return Err(bad(format!(
                        "`{}` is {:?}; it must be 2-D",
                        fb.name, fb.shape
                    )));
                }
                if ra == 0 {
                    return Err(zero(&fa));
                }
                if rb == 0 {
                    return Err(zero(&fb));
                }
                if ra != rb {
                    return Err(bad(format!(
                        "{name}: `{}` has rank {ra}, `{}` has rank {rb}",
                        fa.name, fb.name
                    )));
                }
                Ok(KronFactor::LowRank { a: fa, b: fb })
            }
            (Some(f), _, _) => Err(bad(format!(
                "{name} is given both whole (`{}`) and as low-rank factors",
                f.name
            ))),
            (None, None, None) => Err(LoraProblem::MissingFactor {
                missing: format!(
                    "`{}` (or `{}` and `{}`)",
                    full.label(),
                    a.label(),
                    b.label()
                ),
                present: names(),
            }),
            (None, _, _) => Err(LoraProblem::MissingFactor {
                missing: format!("one of `{}` / `{}`", a.label(), b.label()),
                present: names(),
            }),
        }
    };
    let w1 = side(Part::LokrW1, Part::LokrW1A, Part::LokrW1B, "w1")?;
    let w2 = side(Part::LokrW2, Part::LokrW2A, Part::LokrW2B, "w2")?;
    let ([a, b], [c, d]) = (w1.shape(), w2.shape());
    let shape = match (a.checked_mul(c), b.checked_mul(d)) {
        (Some(n), Some(cols)) => [n, cols],
        _ => {
            return Err(bad(format!(
                "the Kronecker product of {a}×{b} and {c}×{d} overflows"
            )))
        }
    };
    if shape.contains(&0) {
        return Err(bad(format!(
            "the Kronecker product of {a}×{b} and {c}×{d} is empty"
        )));
    }
    let rank = w2.rank().or(w1.rank());
    Ok((Delta::LoKr { w1, w2 }, shape, rank, Algorithm::LoKr))
}

#[cfg(test)]
mod tests;
