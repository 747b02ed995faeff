//! Model layouts: the description of a model the runtime consumes.
//!
//! A [`ModelLayout`] lists the files once and the model's components (text
//! encoders, denoiser, VAE, ...), each an ordered list of layers, each a
//! list of tensor references (name, dtype, shape, byte range, file index).
//! It is built from tensor names alone (headers, no tensor data).
//!
//! # Components
//!
//! Files from a diffusers folder belong to the component named after their
//! subfolder (`unet`, `transformer`, `text_encoder_2`, `vae`, ...). In a
//! single file (or a folder of shards) components are found by prefix:
//! `model.diffusion_model.` (denoiser: `unet`, or `transformer` for a DiT),
//! `first_stage_model.` (`vae`), `cond_stage_model.` (`text_encoder`),
//! `conditioner.embedders.N.` (`text_encoder`, `text_encoder_2`, ...),
//! `text_encoders.NAME.` (`clip_l`, `t5xxl`, ...), `model_ema.`. A file with
//! none of these prefixes is one component, classified by its names (FLUX
//! BFL `double_blocks`, SD3 `joint_blocks`, diffusers blocks, VAE
//! `encoder`/`decoder`, CLIP/T5 text encoders, LMs with `model.layers.N`);
//! nameless `nn.Sequential` files (TAESD) are named after the file. Tensors
//! without a known prefix in a file that has prefixed ones go to `other`.
//!
//! A folder may hold several top-level models ([`LayoutFile::unit`]: a
//! FLUX repository's `flux1-dev.safetensors` beside `ae.safetensors`):
//! each model's components are found as above, on its own files. When two
//! models would have components of the same name (an SDXL base beside its
//! refiner), every component is named `MODEL/COMPONENT`
//! (`sd_xl_base_1.0/unet`).
//!
//! # Layers
//!
//! A layer is the finest unit that runs as one piece: each resnet, each
//! transformer block, each up/downsampler, each DiT block, each LM layer.
//! Inside a UNet attention block (LDM `SpatialTransformer`, diffusers
//! `Transformer2DModel`), `norm` and `proj_in` form a layer
//! `<block>.proj_in` that runs before the transformer blocks, and
//! `proj_out` a layer `<block>.proj_out` that runs after them, so a
//! streamed block never keeps its input projection resident while its
//! transformer blocks run. Embeddings, input and output heads are layers of
//! their own. Names that match no rule go to the component's
//! [`REMAINDER`] layer, which comes first.
//!
//! Layers are in execution order, comparing numbers numerically: LDM input,
//! middle, output blocks; diffusers down, mid, up blocks with each level's
//! resnets and attentions interleaved (`resnets.0`, `attentions.0`,
//! `resnets.1`, ...) and samplers last; the LDM VAE decoder's `up.N` in
//! descending N (the order the LDM code runs them).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::safetensors::{Checkpoint, OpenOptions, TensorInfo};
use crate::synth::TensorSpec;

/// A tensor of a layout: name (as in its file), dtype, shape, absolute byte
/// range and file index into [`ModelLayout::files`].
pub type TensorRef = TensorInfo;

/// Name of the per-component layer that holds tensors no rule recognises.
pub const REMAINDER: &str = "remainder";

/// What a component does in a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    /// Turns prompts into embeddings (CLIP, OpenCLIP, T5, ...).
    TextEncoder,
    /// The denoising network (UNet or diffusion transformer).
    Denoiser,
    /// The autoencoder between pixels and latents.
    Vae,
    /// Anything else (LMs, EMA copies, buffers, ...).
    Other,
}

/// One file of a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutFile {
    /// Where the file is.
    pub path: PathBuf,
    /// Diffusers subfolder the file came from (`None` for a single file or
    /// top-level shards); it names the file's component.
    pub group: Option<String>,
    /// For a folder that holds several top-level models (a FLUX
    /// repository's `flux1-dev.safetensors` beside `ae.safetensors`), the
    /// model this file belongs to ([`Checkpoint::file_units`]); `None`
    /// otherwise. Each model's files get components of their own.
    pub unit: Option<String>,
    /// File length when the layout was made.
    pub len: u64,
}

/// An ordered group of tensors that runs as one piece.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Layer name, relative to the component prefix
    /// (`input_blocks.4.1.transformer_blocks.3`).
    pub name: String,
    /// Its tensors, in file order.
    pub tensors: Vec<TensorRef>,
}

impl Layer {
    /// Total bytes of the layer's tensors.
    pub fn bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.len))
    }
}

/// A model component: text encoder, denoiser, VAE, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Component name (`unet`, `vae`, `text_encoder_2`, `clip_l`, ...).
    pub name: String,
    /// What it does.
    pub kind: ComponentKind,
    /// Prefix stripped from tensor names to get component-relative names
    /// (`model.diffusion_model.`; empty for diffusers subfolders).
    pub prefix: String,
    /// Layers in execution order.
    pub layers: Vec<Layer>,
}

impl Component {
    /// Total bytes of the component's tensors.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .fold(0u64, |a, l| a.saturating_add(l.bytes()))
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.layers.iter().map(|l| l.tensors.len()).sum()
    }

    /// The layer with this name.
    pub fn layer(&self, name: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// The largest layer (the first one if several tie).
    pub fn largest_layer(&self) -> Option<&Layer> {
        self.layers
            .iter()
            .fold(None, |best: Option<&Layer>, l| match best {
                Some(b) if b.bytes() >= l.bytes() => Some(b),
                _ => Some(l),
            })
    }

    /// Names of the component's tensors relative to its prefix, with each
    /// tensor.
    pub fn relative_tensors(&self) -> impl Iterator<Item = (&str, &TensorRef)> {
        self.layers.iter().flat_map(move |l| {
            l.tensors.iter().map(move |t| {
                let rel = t.name.strip_prefix(self.prefix.as_str()).unwrap_or(&t.name);
                (rel, t)
            })
        })
    }
}

/// The model description the runtime consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLayout {
    /// Files, listed once; [`TensorRef::file`] indexes this.
    pub files: Vec<LayoutFile>,
    /// Components: text encoders, then denoisers, VAEs, others (each kind
    /// in name order).
    pub components: Vec<Component>,
}

/// Prefixes of single-file checkpoints: (prefix, component name, kind).
/// Longest match wins.
const PREFIXES: &[(&str, &str, ComponentKind)] = &[
    ("model.diffusion_model.", "", ComponentKind::Denoiser),
    ("first_stage_model.", "vae", ComponentKind::Vae),
    (
        "cond_stage_model.transformer.",
        "text_encoder",
        ComponentKind::TextEncoder,
    ),
    (
        "cond_stage_model.model.",
        "text_encoder",
        ComponentKind::TextEncoder,
    ),
    (
        "cond_stage_model.",
        "text_encoder",
        ComponentKind::TextEncoder,
    ),
    ("model_ema.", "model_ema", ComponentKind::Other),
];

/// Splits a single-file tensor name into (prefix, component name, kind).
fn prefixed_component(name: &str) -> Option<(String, String, ComponentKind)> {
    // conditioner.embedders.N.{transformer,model}.
    if let Some(rest) = name.strip_prefix("conditioner.embedders.") {
        let (n, rest) = rest.split_once('.')?;
        let idx: u64 = n.parse().ok()?;
        let comp = if idx == 0 {
            "text_encoder".to_owned()
        } else {
            format!("text_encoder_{}", u128::from(idx) + 1)
        };
        let inner = ["transformer.", "model."]
            .into_iter()
            .find(|p| rest.starts_with(p))
            .unwrap_or("");
        return Some((
            format!("conditioner.embedders.{n}.{inner}"),
            comp,
            ComponentKind::TextEncoder,
        ));
    }
    // text_encoders.NAME.{transformer.}
    if let Some(rest) = name.strip_prefix("text_encoders.") {
        let (n, rest) = rest.split_once('.')?;
        let inner = if rest.starts_with("transformer.") {
            "transformer."
        } else {
            ""
        };
        return Some((
            format!("text_encoders.{n}.{inner}"),
            n.to_owned(),
            ComponentKind::TextEncoder,
        ));
    }
    PREFIXES
        .iter()
        .find(|(p, _, _)| name.starts_with(p))
        .map(|(p, c, k)| ((*p).to_owned(), (*c).to_owned(), *k))
}

fn kind_of_group(group: &str) -> ComponentKind {
    match group {
        "unet" | "transformer" | "prior" => ComponentKind::Denoiser,
        "vae" => ComponentKind::Vae,
        g if g.starts_with("text_encoder") => ComponentKind::TextEncoder,
        _ => ComponentKind::Other,
    }
}

/// Names and kind for a component with no prefix, from its tensor names.
fn classify_unprefixed<'a>(
    names: impl Iterator<Item = &'a str> + Clone,
    file_stem: &str,
) -> (String, ComponentKind, bool) {
    let any = |pred: &dyn Fn(&str) -> bool| names.clone().any(pred);
    let denoiser_dit = [
        "double_blocks.",
        "single_blocks.",
        "joint_blocks.",
        "transformer_blocks.",
        "single_transformer_blocks.",
    ];
    if any(&|n| denoiser_dit.iter().any(|p| n.starts_with(p))) {
        return ("transformer".into(), ComponentKind::Denoiser, true);
    }
    if any(&|n| n.starts_with("input_blocks.") || n.starts_with("down_blocks.")) {
        return ("unet".into(), ComponentKind::Denoiser, true);
    }
    if any(&|n| n.starts_with("decoder.") || n.starts_with("encoder.down")) {
        return ("vae".into(), ComponentKind::Vae, true);
    }
    if any(&|n| {
        n.starts_with("text_model.") || n.starts_with("encoder.block.") || n == "shared.weight"
    }) {
        return ("text_encoder".into(), ComponentKind::TextEncoder, true);
    }
    if any(&|n| n.starts_with("model.layers.") || n.starts_with("layers.")) {
        return ("model".into(), ComponentKind::Other, true);
    }
    let stem = file_stem.to_ascii_lowercase();
    let kind = if ["vae", "taesd", "taef"].iter().any(|k| stem.contains(k)) {
        ComponentKind::Vae
    } else {
        ComponentKind::Other
    };
    let name = if file_stem.is_empty() {
        "model"
    } else {
        file_stem
    };
    (name.to_owned(), kind, false)
}

/// Containers followed by one index whose entries are layers.
const INDEXED: &[&str] = &[
    "output_blocks",
    "input_blocks",
    "middle_block",
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "single_transformer_blocks",
    "double_blocks",
    "single_blocks",
    "joint_blocks",
    "layers",
    "resblocks",
    "block",
    "blocks",
    "h",
    "down",
    "up",
];

/// Containers whose named children are layers (LDM VAE `mid.block_1`).
const NAMED_CONTAINERS: &[&str] = &["mid"];

/// Children of an indexed container that are layers of their own
/// (LDM VAE `down.N.downsample`).
const SUBLAYERS: &[&str] = &["downsample", "upsample"];

/// Modules that are layers on their own wherever they appear, in the order
/// they run before the blocks...
const PRE: &[&str] = &[
    "embeddings",
    "embed_tokens",
    "shared",
    "token_embedding",
    "positional_embedding",
    "wte",
    "wpe",
    "time_proj",
    "time_embed",
    "time_embedding",
    "label_emb",
    "add_embedding",
    "class_embedding",
    "encoder_hid_proj",
    "conv_in",
    "img_in",
    "time_in",
    "guidance_in",
    "vector_in",
    "txt_in",
    "pos_embed",
    "x_embedder",
    "t_embedder",
    "y_embedder",
    "time_text_embed",
    "context_embedder",
    "proj_in",
];

/// ...and after them.
const POST: &[&str] = &[
    "norm_out",
    "conv_norm_out",
    "out",
    "conv_out",
    "final_layer",
    "final_layer_norm",
    "norm",
    "ln_f",
    "ln_final",
    "proj_out",
    "text_projection",
    "logit_scale",
    "lm_head",
];

/// Named stages in execution order (for sorting only).
const MID: &[&str] = &[
    "encoder",
    "quant_conv",
    "post_quant_conv",
    "decoder",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "down",
    "mid",
    "up",
    "joint_blocks",
    "double_blocks",
    "single_blocks",
    "transformer_blocks",
    "single_transformer_blocks",
    "block_1",
    "attn_1",
    "block_2",
];

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Number of leading segments of a component-relative name that name its
/// layer, before the attention-block split; `None`: remainder.
fn raw_layer_len(segs: &[&str]) -> Option<usize> {
    if segs.first().is_some_and(|s| is_index(s)) {
        return Some(1);
    }
    let mut end = None;
    let mut i = 0;
    while i < segs.len() {
        let s = segs[i];
        let next_is_index = segs.get(i + 1).is_some_and(|n| is_index(n));
        if INDEXED.contains(&s) && next_is_index {
            let mut e = i + 2;
            // LDM input_blocks.N.M / output_blocks.N.M: M is the module.
            if (s == "input_blocks" || s == "output_blocks")
                && segs.get(e).is_some_and(|n| is_index(n))
            {
                e += 1;
            }
            if segs.get(e).is_some_and(|n| SUBLAYERS.contains(n)) {
                e += 1;
            }
            end = Some(e);
            i = e;
            continue;
        }
        if NAMED_CONTAINERS.contains(&s) && i + 2 < segs.len() && !next_is_index {
            end = Some(i + 2);
            i += 2;
            continue;
        }
        i += 1;
    }
    if end.is_some() {
        return end;
    }
    segs.iter()
        .position(|s| PRE.contains(s) || POST.contains(s) || MID[1..3].contains(s))
        .map(|p| p + 1)
}

/// Sort key of one layer-name position.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// The remainder layer: before everything.
    First,
    /// A named module: (tier, index in tier, name).
    Name(u8, usize, String),
    /// An index.
    Num(u64),
}

fn name_key(s: &str) -> Key {
    if let Some(i) = PRE.iter().position(|p| *p == s) {
        Key::Name(0, i, String::new())
    } else if let Some(i) = MID.iter().position(|p| *p == s) {
        Key::Name(1, i, String::new())
    } else if let Some(i) = POST.iter().position(|p| *p == s) {
        Key::Name(3, i, String::new())
    } else {
        Key::Name(2, 0, s.to_owned())
    }
}

/// Key of the interleaved stage of resnets, attentions and samplers.
fn stage() -> Key {
    Key::Name(1, usize::MAX, String::new())
}

fn layer_key(name: &str) -> Vec<Key> {
    if name == REMAINDER {
        return vec![Key::First];
    }
    let segs: Vec<&str> = name.split('.').collect();
    let mut key = Vec::with_capacity(segs.len() + 2);
    let mut i = 0;
    while i < segs.len() {
        let s = segs[i];
        let idx = segs.get(i + 1).and_then(|n| n.parse::<u64>().ok());
        match (s, idx) {
            // Interleave a level's resnets and attentions by index
            // (resnets.0, attentions.0, resnets.1, ...), samplers last. All
            // share one stage key so they sort among named siblings as a
            // middle stage.
            ("resnets" | "block", Some(n)) => {
                key.extend([stage(), Key::Num(n), Key::Num(0)]);
                i += 2;
            }
            ("attentions" | "attn", Some(n)) => {
                key.extend([stage(), Key::Num(n), Key::Num(1)]);
                i += 2;
            }
            ("downsamplers" | "upsamplers", Some(n)) => {
                key.extend([stage(), Key::Num(u64::MAX), Key::Num(n)]);
                i += 2;
            }
            ("downsample" | "upsample", _) => {
                key.extend([stage(), Key::Num(u64::MAX)]);
                i += 1;
            }
            // The LDM VAE decoder runs up.N from the highest N down.
            ("up", Some(n)) if segs[..i].contains(&"decoder") => {
                key.extend([name_key(s), Key::Num((u64::MAX - 1).saturating_sub(n))]);
                i += 2;
            }
            _ => {
                key.push(match s.parse::<u64>() {
                    Ok(n) => Key::Num(n),
                    Err(_) => name_key(s),
                });
                i += 1;
            }
        }
    }
    key
}

fn compare_layers(a: &str, b: &str) -> Ordering {
    layer_key(a).cmp(&layer_key(b)).then_with(|| a.cmp(b))
}

/// Assigns each component-relative name its layer name.
fn assign_layers(rel_names: &[&str]) -> Vec<String> {
    let raw: Vec<Option<String>> = rel_names
        .iter()
        .map(|n| {
            let segs: Vec<&str> = n.split('.').collect();
            raw_layer_len(&segs).map(|l| segs[..l].join("."))
        })
        .collect();
    // Attention blocks: raw layers that have transformer_blocks below them.
    let mut wrappers = HashSet::new();
    for l in raw.iter().flatten() {
        if let Some(i) = l.rfind(".transformer_blocks.") {
            wrappers.insert(&l[..i]);
        }
    }
    raw.iter()
        .zip(rel_names)
        .map(|(l, n)| match l {
            None => REMAINDER.to_owned(),
            Some(l) if wrappers.contains(l.as_str()) => {
                let rest = n.get(l.len() + 1..).unwrap_or("");
                if rest.starts_with("proj_out.") || rest == "proj_out" {
                    format!("{l}.proj_out")
                } else {
                    format!("{l}.proj_in")
                }
            }
            Some(l) => l.clone(),
        })
        .collect()
}

fn build_component(
    name: String,
    kind: ComponentKind,
    prefix: String,
    tensors: Vec<TensorRef>,
) -> Component {
    let rel: Vec<&str> = tensors
        .iter()
        .map(|t| t.name.strip_prefix(prefix.as_str()).unwrap_or(&t.name))
        .collect();
    let names = assign_layers(&rel);
    let mut layers: HashMap<String, Vec<TensorRef>> = HashMap::new();
    for (t, l) in tensors.iter().zip(names) {
        layers.entry(l).or_default().push(t.clone());
    }
    let mut layers: Vec<Layer> = layers
        .into_iter()
        .map(|(name, mut tensors)| {
            tensors.sort_by(|a, b| {
                (a.file, a.data_offset, &a.name).cmp(&(b.file, b.data_offset, &b.name))
            });
            Layer { name, tensors }
        })
        .collect();
    layers.sort_by(|a, b| compare_layers(&a.name, &b.name));
    Component {
        name,
        kind,
        prefix,
        layers,
    }
}

/// Components by name: (kind, prefix, tensors).
type Comps = BTreeMap<String, (ComponentKind, String, Vec<TensorRef>)>;

/// The components of one model's tensors (no diffusers subfolder): by
/// single-file prefix, the rest classified by its names.
fn unit_components(files: &[LayoutFile], tensors: Vec<TensorRef>) -> Comps {
    let mut comps: Comps = BTreeMap::new();
    let mut plain = Vec::new();
    for t in tensors {
        if let Some((prefix, name, kind)) = prefixed_component(&t.name) {
            let name = if name.is_empty() {
                // The denoiser: named after what it holds, decided below.
                "\0denoiser".to_owned()
            } else {
                name
            };
            comps
                .entry(name)
                .or_insert_with(|| (kind, prefix.clone(), Vec::new()))
                .2
                .push(t);
        } else {
            plain.push(t);
        }
    }
    if let Some(d) = comps.remove("\0denoiser") {
        let is_unet = d.2.iter().any(|t| {
            let rel = t.name.strip_prefix(d.1.as_str()).unwrap_or(&t.name);
            rel.starts_with("input_blocks.") || rel.starts_with("down_blocks.")
        });
        let name = if is_unet { "unet" } else { "transformer" };
        comps.insert(name.to_owned(), d);
    }
    if !plain.is_empty() {
        let stem = plain
            .first()
            .and_then(|t| files.get(t.file))
            .and_then(|f| f.path.file_stem())
            .and_then(|s| s.to_str())
            .unwrap_or("");
        let (name, kind, recognised) =
            classify_unprefixed(plain.iter().map(|t| t.name.as_str()), stem);
        // Unrecognised leftovers beside prefixed components (schedule
        // buffers in SD checkpoints) are `other`.
        let name = if recognised || comps.is_empty() {
            name
        } else {
            "other".to_owned()
        };
        let kind = if name == "other" {
            ComponentKind::Other
        } else {
            kind
        };
        match comps.get_mut(&name) {
            Some(c) => c.2.extend(plain),
            None => {
                comps.insert(name, (kind, String::new(), plain));
            }
        }
    }
    comps
}

impl ModelLayout {
    /// Builds the layout from header information alone. `tensors[i].file`
    /// must index `files`; a file's [`LayoutFile::group`] names the
    /// component of its tensors (diffusers subfolders), else components are
    /// found by name prefix.
    pub fn from_tensors(files: Vec<LayoutFile>, tensors: Vec<TensorRef>) -> ModelLayout {
        // (component name) -> (kind, prefix, tensors), per model of the
        // folder (`None`: the only one, or diffusers subfolders).
        let mut grouped: Comps = BTreeMap::new();
        let mut by_unit: BTreeMap<Option<String>, Vec<TensorRef>> = BTreeMap::new();
        for t in tensors {
            let f = files.get(t.file);
            if let Some(g) = f.and_then(|f| f.group.clone()) {
                grouped
                    .entry(g.clone())
                    .or_insert_with(|| (kind_of_group(&g), String::new(), Vec::new()))
                    .2
                    .push(t);
            } else {
                by_unit
                    .entry(f.and_then(|f| f.unit.clone()))
                    .or_default()
                    .push(t);
            }
        }
        let mut units: Vec<(Option<String>, Comps)> = Vec::new();
        if !grouped.is_empty() {
            units.push((None, grouped));
        }
        for (unit, ts) in by_unit {
            units.push((unit, unit_components(&files, ts)));
        }
        // Several models whose component names collide: every component
        // is named after its model (`sd_xl_base_1.0/unet`).
        let mut seen = HashSet::new();
        let collide = units.len() > 1
            && units
                .iter()
                .flat_map(|(_, c)| c.keys())
                .any(|n| !seen.insert(n.clone()));
        let mut components: Vec<Component> = Vec::new();
        for (unit, comps) in units {
            for (name, (kind, prefix, ts)) in comps {
                let name = match (&unit, collide) {
                    (Some(u), true) => format!("{u}/{name}"),
                    _ => name,
                };
                components.push(build_component(name, kind, prefix, ts));
            }
        }
        components.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        ModelLayout { files, components }
    }

    /// The layout of an open checkpoint.
    pub fn from_checkpoint(ckpt: &Checkpoint) -> ModelLayout {
        let files = ckpt
            .files()
            .iter()
            .zip(ckpt.file_groups())
            .zip(ckpt.file_units())
            .map(|((f, g), u)| LayoutFile {
                path: f.path().to_owned(),
                group: g.clone(),
                unit: u.clone(),
                len: f.file_len(),
            })
            .collect();
        ModelLayout::from_tensors(files, ckpt.tensors().cloned().collect())
    }

    /// The layout a file written from `specs` (back to back, in order)
    /// would have, without writing it: for layout-only tests of full-size
    /// models. Offsets are relative to the data section; the one file is
    /// `path`.
    pub fn from_specs(path: &Path, specs: &[TensorSpec]) -> ModelLayout {
        let mut offset = 0u64;
        let tensors = specs
            .iter()
            .map(|s| {
                let len = s.byte_len().unwrap_or(0);
                let t = TensorRef {
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
        let files = vec![LayoutFile {
            path: path.to_owned(),
            group: None,
            unit: None,
            len: offset,
        }];
        ModelLayout::from_tensors(files, tensors)
    }

    /// The component with this name.
    pub fn component(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Total bytes of all tensors.
    pub fn bytes(&self) -> u64 {
        self.components
            .iter()
            .fold(0u64, |a, c| a.saturating_add(c.bytes()))
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.components.iter().map(Component::tensor_count).sum()
    }

    /// The largest layer of the model, with its component.
    pub fn largest_layer(&self) -> Option<(&Component, &Layer)> {
        self.components
            .iter()
            .filter_map(|c| c.largest_layer().map(|l| (c, l)))
            .fold(None, |best: Option<(&Component, &Layer)>, x| match best {
                Some(b) if b.1.bytes() >= x.1.bytes() => Some(b),
                _ => Some(x),
            })
    }
}

/// An open model: its files and its layout.
#[derive(Debug)]
pub struct Model {
    /// The open files (read tensor bytes through this).
    pub checkpoint: Checkpoint,
    /// The layout built from their headers.
    pub layout: ModelLayout,
}

impl Model {
    /// Opens a file, a folder of shards or a diffusers folder (see
    /// [`Checkpoint::open`]) and builds its layout. Reads headers only.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// As [`Model::open`], with options.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Model> {
        let checkpoint = Checkpoint::open_with(path, opts)?;
        let layout = ModelLayout::from_checkpoint(&checkpoint);
        Ok(Model { checkpoint, layout })
    }

    /// Reads the whole tensor `t` of the layout into `dst`, whose length
    /// must be `t.len`.
    pub fn read_tensor_into(&self, t: &TensorRef, dst: &mut [u8]) -> Result<()> {
        self.checkpoint.read_tensor_into(t, dst)
    }

    /// Reads `dst.len()` bytes of tensor `t` starting `offset` bytes into it
    /// (chunked reads through a staging buffer).
    pub fn read_tensor_range_into(&self, t: &TensorRef, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.checkpoint.read_tensor_range_into(t, offset, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers_of(names: &[&str]) -> Vec<String> {
        let specs: Vec<TensorSpec> = names
            .iter()
            .map(|n| TensorSpec::new(*n, crate::Dtype::F16, &[1]))
            .collect();
        let l = ModelLayout::from_specs(Path::new("m.safetensors"), &specs);
        assert_eq!(l.components.len(), 1, "{:?}", l.components);
        l.components[0]
            .layers
            .iter()
            .map(|l| l.name.clone())
            .collect()
    }

    #[test]
    fn numeric_order_and_remainder() {
        let got = layers_of(&[
            "layers.10.w",
            "layers.9.w",
            "layers.2.w",
            "norm.weight",
            "embed_tokens.weight",
            "mystery.weight",
            "lm_head.weight",
        ]);
        assert_eq!(
            got,
            [
                REMAINDER,
                "embed_tokens",
                "layers.2",
                "layers.9",
                "layers.10",
                "norm",
                "lm_head"
            ]
        );
    }

    #[test]
    fn diffusers_unet_interleaves_resnets_and_attentions() {
        let got = layers_of(&[
            "up_blocks.0.resnets.0.conv1.weight",
            "down_blocks.1.downsamplers.0.conv.weight",
            "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            "down_blocks.1.attentions.1.proj_out.weight",
            "down_blocks.1.attentions.1.norm.weight",
            "down_blocks.1.attentions.1.proj_in.weight",
            "down_blocks.1.resnets.1.conv1.weight",
            "down_blocks.1.attentions.0.transformer_blocks.1.ff.net.2.weight",
            "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
            "down_blocks.1.resnets.0.conv1.weight",
            "mid_block.resnets.1.conv1.weight",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.resnets.0.conv1.weight",
            "conv_in.weight",
            "time_embedding.linear_1.weight",
            "conv_out.weight",
            "conv_norm_out.weight",
        ]);
        assert_eq!(
            got,
            [
                "time_embedding",
                "conv_in",
                "down_blocks.1.resnets.0",
                "down_blocks.1.attentions.0.transformer_blocks.0",
                "down_blocks.1.attentions.0.transformer_blocks.1",
                "down_blocks.1.resnets.1",
                "down_blocks.1.attentions.1.proj_in",
                "down_blocks.1.attentions.1.transformer_blocks.0",
                "down_blocks.1.attentions.1.proj_out",
                "down_blocks.1.downsamplers.0",
                "mid_block.resnets.0",
                "mid_block.attentions.0.transformer_blocks.0",
                "mid_block.resnets.1",
                "up_blocks.0.resnets.0",
                "conv_norm_out",
                "conv_out",
            ]
        );
    }

    #[test]
    fn dit_layouts() {
        // FLUX BFL.
        let got = layers_of(&[
            "single_blocks.0.linear1.weight",
            "double_blocks.10.img_attn.qkv.weight",
            "double_blocks.2.txt_mlp.0.weight",
            "final_layer.linear.weight",
            "txt_in.weight",
            "img_in.weight",
            "time_in.in_layer.weight",
        ]);
        assert_eq!(
            got,
            [
                "img_in",
                "time_in",
                "txt_in",
                "double_blocks.2",
                "double_blocks.10",
                "single_blocks.0",
                "final_layer"
            ]
        );
        // diffusers FLUX transformer.
        let got = layers_of(&[
            "single_transformer_blocks.0.proj_mlp.weight",
            "transformer_blocks.1.attn.to_q.weight",
            "proj_out.weight",
            "norm_out.linear.weight",
            "x_embedder.weight",
            "context_embedder.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
        ]);
        assert_eq!(
            got,
            [
                "x_embedder",
                "time_text_embed",
                "context_embedder",
                "transformer_blocks.1",
                "single_transformer_blocks.0",
                "norm_out",
                "proj_out"
            ]
        );
        // SD3 (MMDiT) in single-file naming.
        let got = layers_of(&[
            "joint_blocks.1.x_block.attn.qkv.weight",
            "joint_blocks.0.context_block.mlp.fc1.weight",
            "final_layer.linear.weight",
            "x_embedder.proj.weight",
            "pos_embed",
            "t_embedder.mlp.0.weight",
        ]);
        assert_eq!(
            got,
            [
                "pos_embed",
                "x_embedder",
                "t_embedder",
                "joint_blocks.0",
                "joint_blocks.1",
                "final_layer"
            ]
        );
    }

    #[test]
    fn text_encoders() {
        let got = layers_of(&[
            "text_model.final_layer_norm.weight",
            "text_model.encoder.layers.11.mlp.fc1.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight",
            "text_model.embeddings.position_ids",
            "text_projection.weight",
        ]);
        assert_eq!(
            got,
            [
                "text_model.embeddings",
                "text_model.encoder.layers.0",
                "text_model.encoder.layers.11",
                "text_model.final_layer_norm",
                "text_projection"
            ]
        );
        let got = layers_of(&[
            "encoder.final_layer_norm.weight",
            "encoder.block.1.layer.1.DenseReluDense.wo.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "shared.weight",
        ]);
        assert_eq!(
            got,
            [
                "shared",
                "encoder.block.0",
                "encoder.block.1",
                "encoder.final_layer_norm"
            ]
        );
    }
}
