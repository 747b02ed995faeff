//! The model side of LoRA resolution: every name a LoRA may use for a model
//! weight, mapped to that weight (and, for fused weights, the rows).
//!
//! For each component of a [`ModelLayout`], every tensor named `M.weight`
//! (and OpenCLIP's `M.in_proj_weight`) is indexed under its
//! component-relative module path `M` and under the other names the same
//! weight has in other conventions:
//!
//! - an LDM UNet (`input_blocks.N.M...`, single-file SD 1.x/2.x/SDXL) also
//!   under its diffusers path ([`ldm_unet_to_diffusers`]), and a diffusers
//!   UNet (`down_blocks.N...`) under its LDM path ([`diffusers_unet_to_ldm`]);
//! - a BFL FLUX transformer (`double_blocks.N`, `single_blocks.N`) under its
//!   diffusers paths ([`flux_bfl_to_diffusers`]), where the separate
//!   `to_q`/`to_k`/`to_v` (and `proj_mlp`) of diffusers are row slices of
//!   BFL's fused `qkv` and `linear1`;
//! - a diffusers FLUX transformer (`single_transformer_blocks.N`) under its
//!   BFL paths ([`flux_diffusers_to_bfl`]) for whole weights; BFL's fused
//!   `qkv`/`linear1` are names of several diffusers weights at once, so a
//!   LoRA on them is reported as unsupported, with the reason;
//! - an SD3 (MMDiT) transformer (`joint_blocks.N`) under its diffusers paths
//!   ([`mmdit_to_diffusers`]): `to_q`/`to_k`/`to_v` and
//!   `add_q_proj`/`add_k_proj`/`add_v_proj` are row slices of the x and
//!   context blocks' fused `qkv`;
//! - an OpenCLIP text tower (`transformer.resblocks.N`, SD 2.x and SDXL's
//!   second encoder) under the Hugging Face CLIP paths kohya uses
//!   (`text_model.encoder.layers.N.self_attn.q_proj` = rows of
//!   `attn.in_proj_weight`, `mlp.fc1` = `mlp.c_fc`, ...).
//!
//! Every path is also indexed flattened (`.` → `_`) for kohya names; two
//! paths that flatten alike are ambiguous and reported as such, never
//! guessed.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use super::keys::{flatten, Lookup, Scope};
use crate::layout::{ComponentKind, ModelLayout, TensorRef};

/// A model weight a LoRA module resolves to: the tensor and, for a slice of
/// a fused weight, the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// The model tensor.
    pub tensor: &'a TensorRef,
    /// The rows of the tensor the module stands for (`None`: all of them).
    pub rows: Option<Range<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Tensor index into [`TargetIndex::tensors`] and row slice.
    Tensor(usize, Option<Range<u64>>),
    /// A name the model has, but that cannot be targeted (why).
    Unsupported(&'static str),
}

#[derive(Debug, Clone)]
enum Slot {
    One(Entry),
    /// Several dotted paths flatten to this kohya name.
    Ambiguous(Vec<String>),
}

/// What a component is to LoRA scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Denoiser,
    TextEncoder(Option<u32>),
    Other,
}

#[derive(Debug)]
struct CompIndex {
    name: String,
    role: Role,
    dotted: HashMap<String, Entry>,
    /// Flattened path → entry, with the dotted path it came from.
    flat: HashMap<String, (Slot, String)>,
}

impl CompIndex {
    fn insert(&mut self, path: String, entry: Entry) {
        let flat = flatten(&path);
        match self.flat.get_mut(&flat) {
            None => {
                self.flat
                    .insert(flat, (Slot::One(entry.clone()), path.clone()));
            }
            Some((slot, first)) => match slot {
                Slot::One(e) if *e == entry => {}
                Slot::One(_) => *slot = Slot::Ambiguous(vec![first.clone(), path.clone()]),
                Slot::Ambiguous(names) => names.push(path.clone()),
            },
        }
        self.dotted.entry(path).or_insert(entry);
    }
}

/// Why a lookup found nothing.
pub(crate) type Miss = String;

/// Every name a LoRA may use for the weights of one model, built once per
/// model from its [`ModelLayout`] and shared by every LoRA resolved
/// against it.
#[derive(Debug)]
pub struct TargetIndex {
    tensors: Vec<TensorRef>,
    /// Every tensor name of the layout (weights or not).
    all_names: HashSet<String>,
    comps: Vec<CompIndex>,
    /// Full module names (component prefix included) of every weight.
    full: HashMap<String, Entry>,
}

/// 1-based text encoder numbers as LoRA files count them: `text_encoder`
/// and `clip_l` are 1, `text_encoder_N` is N, `clip_g` is 2, `t5xxl` is 2
/// beside CLIP-L alone (FLUX) and 3 beside CLIP-G (SD3).
fn te_number(name: &str, has_clip_g: bool) -> Option<u32> {
    // A model of a folder that holds several: `sd_xl_base_1.0/text_encoder`.
    let name = name.rsplit('/').next().unwrap_or(name);
    match name {
        "text_encoder" | "clip_l" => Some(1),
        "clip_g" => Some(2),
        "t5xxl" | "t5" => Some(if has_clip_g { 3 } else { 2 }),
        n => n.strip_prefix("text_encoder_").and_then(|k| k.parse().ok()),
    }
}

impl TargetIndex {
    /// Indexes every weight of `layout` under all the names LoRA files use
    /// for it (see the module documentation).
    pub fn new(layout: &ModelLayout) -> TargetIndex {
        let has_clip_g = layout
            .components
            .iter()
            .any(|c| c.name == "clip_g" || c.name.ends_with("/clip_g"));
        let mut tensors = Vec::new();
        let mut comps = Vec::new();
        let mut full = HashMap::new();
        for c in &layout.components {
            let role = match c.kind {
                ComponentKind::Denoiser => Role::Denoiser,
                ComponentKind::TextEncoder => Role::TextEncoder(te_number(&c.name, has_clip_g)),
                _ => Role::Other,
            };
            let mut ci = CompIndex {
                name: c.name.clone(),
                role,
                dotted: HashMap::new(),
                flat: HashMap::new(),
            };
            let mut native: Vec<(String, usize)> = Vec::new();
            for (rel, t) in c.relative_tensors() {
                let module = rel.strip_suffix(".weight").or_else(|| {
                    rel.strip_suffix("_weight")
                        .filter(|m| m.ends_with("in_proj"))
                });
                let Some(module) = module else { continue };
                let idx = tensors.len();
                tensors.push(t.clone());
                if let Some(m) = t.name.strip_suffix(".weight") {
                    full.insert(m.to_owned(), Entry::Tensor(idx, None));
                }
                native.push((module.to_owned(), idx));
            }
            let is_ldm_unet = native.iter().any(|(m, _)| m.starts_with("input_blocks."));
            let is_diffusers_unet =
                role == Role::Denoiser && native.iter().any(|(m, _)| m.starts_with("down_blocks."));
            let is_bfl = native
                .iter()
                .any(|(m, _)| m.starts_with("double_blocks.") || m.starts_with("single_blocks."));
            let is_mmdit = native.iter().any(|(m, _)| m.starts_with("joint_blocks."));
            let is_diffusers_flux = role == Role::Denoiser
                && native
                    .iter()
                    .any(|(m, _)| m.starts_with("single_transformer_blocks."));
            let up_attn: Vec<u64> = native
                .iter()
                .filter_map(|(m, _)| {
                    let rest = m.strip_prefix("up_blocks.")?;
                    let (i, rest) = rest.split_once('.')?;
                    rest.starts_with("attentions.").then(|| i.parse().ok())?
                })
                .collect();
            for (m, idx) in &native {
                ci.insert(m.clone(), Entry::Tensor(*idx, None));
            }
            for (m, idx) in &native {
                let shape = &tensors[*idx].shape;
                if is_ldm_unet {
                    if let Some(d) = ldm_unet_to_diffusers(m) {
                        ci.insert(d, Entry::Tensor(*idx, None));
                    }
                }
                if is_diffusers_unet {
                    if let Some(l) = diffusers_unet_to_ldm(m, |i| up_attn.contains(&i)) {
                        ci.insert(l, Entry::Tensor(*idx, None));
                    }
                }
                if is_bfl {
                    for (d, rows) in flux_bfl_to_diffusers(m, shape) {
                        ci.insert(d, Entry::Tensor(*idx, rows));
                    }
                    if let Some(rest) = m.strip_prefix("final_layer.adaLN_modulation.1") {
                        ci.insert(
                            format!("norm_out.linear{rest}"),
                            Entry::Unsupported(
                                "diffusers' norm_out.linear is BFL's final_layer.adaLN_modulation.1 \
                                 with its shift and scale halves swapped",
                            ),
                        );
                    }
                }
                if is_mmdit {
                    for (d, alias) in mmdit_to_diffusers(m, shape) {
                        ci.insert(d, alias.entry(*idx));
                    }
                }
                if is_diffusers_flux {
                    if let Some((b, alias)) = flux_diffusers_to_bfl(m) {
                        ci.insert(b, alias.entry(*idx));
                    }
                }
                for (d, rows) in open_clip_to_hf(m, shape) {
                    ci.insert(d, Entry::Tensor(*idx, rows));
                }
            }
            comps.push(ci);
        }
        let all_names = layout
            .components
            .iter()
            .flat_map(|c| c.layers.iter().flat_map(|l| l.tensors.iter()))
            .map(|t| t.name.clone())
            .collect();
        TargetIndex {
            tensors,
            all_names,
            comps,
            full,
        }
    }

    /// Number of weights indexed.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no weight is indexed.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether the model has a tensor with exactly this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.all_names.contains(name)
    }

    /// Resolves a LoRA module key (a LoRA tensor name without its suffix,
    /// such as `lora_unet_down_blocks_0_attentions_0_proj_in` or
    /// `transformer.transformer_blocks.0.attn.to_q`) to the model weight it
    /// adapts. The error says what was looked up where.
    pub fn resolve(&self, module_key: &str) -> Result<Target<'_>, String> {
        let lookup = super::keys::lookup_of(module_key);
        match self.find(&lookup)? {
            Entry::Tensor(i, rows) => Ok(Target {
                tensor: &self.tensors[i],
                rows,
            }),
            Entry::Unsupported(why) => Err(why.to_owned()),
        }
    }

    /// The entry for a lookup, or why there is none.
    pub(crate) fn find(&self, l: &Lookup<'_>) -> Result<Entry, Miss> {
        let in_scope: Vec<&CompIndex> = match l.scope {
            Scope::Denoiser => self
                .comps
                .iter()
                .filter(|c| c.role == Role::Denoiser)
                .collect(),
            Scope::TextEncoder(n) => self
                .comps
                .iter()
                .filter(|c| c.role == Role::TextEncoder(Some(n)))
                .collect(),
            Scope::Any => {
                let mut v: Vec<&CompIndex> = self.comps.iter().collect();
                v.sort_by_key(|c| match c.role {
                    Role::Denoiser => (0, 0),
                    Role::TextEncoder(n) => (1, n.unwrap_or(u32::MAX)),
                    Role::Other => (2, 0),
                });
                v
            }
        };
        if in_scope.is_empty() {
            let names: Vec<&str> = self.comps.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "the model has no {} (its components: {})",
                l.scope,
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ));
        }
        for c in &in_scope {
            let hit = if l.flat {
                match c.flat.get(l.path) {
                    Some((Slot::One(e), _)) => Some(e.clone()),
                    Some((Slot::Ambiguous(names), _)) => {
                        return Err(format!(
                            "kohya name `{}` is ambiguous in component `{}`: it flattens {}",
                            l.path,
                            c.name,
                            names
                                .iter()
                                .map(|n| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    }
                    None => None,
                }
            } else {
                c.dotted.get(l.path).cloned()
            };
            if let Some(e) = hit {
                return Ok(e);
            }
        }
        if l.scope == Scope::Any && !l.flat {
            if let Some(e) = self.full.get(l.path) {
                return Ok(e.clone());
            }
        }
        let names: Vec<&str> = in_scope.iter().map(|c| c.name.as_str()).collect();
        Err(format!(
            "looked up {}`{}` in {} (component{} {})",
            if l.flat { "kohya name " } else { "" },
            l.path,
            l.scope,
            if names.len() == 1 { "" } else { "s" },
            names.join(", ")
        ))
    }

    pub(crate) fn tensor_at(&self, i: usize) -> &TensorRef {
        &self.tensors[i]
    }
}

fn join(head: String, rest: &[&str]) -> String {
    if rest.is_empty() {
        head
    } else {
        format!("{head}.{}", rest.join("."))
    }
}

/// LDM resnet module names → diffusers (`in_layers.2` → `conv1`, ...).
fn resnet_to_diffusers(rest: &[&str]) -> Option<(&'static str, usize)> {
    Some(match rest {
        ["in_layers", "0", ..] => ("norm1", 2),
        ["in_layers", "2", ..] => ("conv1", 2),
        ["emb_layers", "1", ..] => ("time_emb_proj", 2),
        ["out_layers", "0", ..] => ("norm2", 2),
        ["out_layers", "3", ..] => ("conv2", 2),
        ["skip_connection", ..] => ("conv_shortcut", 1),
        _ => return None,
    })
}

/// diffusers resnet module names → LDM (`conv1` → `in_layers.2`, ...).
fn resnet_to_ldm(rest: &[&str]) -> Option<(&'static str, usize)> {
    Some(match *rest.first()? {
        "norm1" => ("in_layers.0", 1),
        "conv1" => ("in_layers.2", 1),
        "time_emb_proj" => ("emb_layers.1", 1),
        "norm2" => ("out_layers.0", 1),
        "conv2" => ("out_layers.3", 1),
        "conv_shortcut" => ("skip_connection", 1),
        _ => return None,
    })
}

/// `3i + j`, the LDM block number of diffusers level `i`, position `j`;
/// `None` when it does not fit in 64 bits (a crafted name).
fn level(i: u64, j: u64) -> Option<u64> {
    i.checked_mul(3)?.checked_add(j)
}

fn num(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The diffusers module path of an LDM UNet module path (SD 1.x, 2.x, SDXL:
/// two resnets per level), or `None` if it has none.
///
/// `input_blocks.0.0` ↔ `conv_in`; `input_blocks.(3i+j+1).0` ↔
/// `down_blocks.i.resnets.j`; `input_blocks.(3i+j+1).1` ↔
/// `down_blocks.i.attentions.j`; `input_blocks.3(i+1).0.op` ↔
/// `down_blocks.i.downsamplers.0.conv`; `middle_block.0/1/2` ↔
/// `mid_block.resnets.0` / `attentions.0` / `resnets.1`;
/// `output_blocks.(3i+j).0` ↔ `up_blocks.i.resnets.j`;
/// `output_blocks.(3i+j).1` ↔ `up_blocks.i.attentions.j`;
/// `output_blocks.(3i+2).{1,2}.conv` ↔ `up_blocks.i.upsamplers.0.conv`;
/// `time_embed.0/2` ↔ `time_embedding.linear_1/2`; `label_emb.0.0/0.2` ↔
/// `add_embedding.linear_1/2`; `out.0/2` ↔ `conv_norm_out` / `conv_out`.
/// Inside resnets `in_layers.0/2` ↔ `norm1`/`conv1`, `emb_layers.1` ↔
/// `time_emb_proj`, `out_layers.0/3` ↔ `norm2`/`conv2`, `skip_connection`
/// ↔ `conv_shortcut`; attention blocks keep their inner names.
pub fn ldm_unet_to_diffusers(path: &str) -> Option<String> {
    let s: Vec<&str> = path.split('.').collect();
    let resnet = |head: String, rest: &[&str]| {
        let (name, used) = resnet_to_diffusers(rest)?;
        Some(join(format!("{head}.{name}"), &rest[used..]))
    };
    match s.as_slice() {
        ["time_embed", "0", rest @ ..] => Some(join("time_embedding.linear_1".into(), rest)),
        ["time_embed", "2", rest @ ..] => Some(join("time_embedding.linear_2".into(), rest)),
        ["label_emb", "0", "0", rest @ ..] => Some(join("add_embedding.linear_1".into(), rest)),
        ["label_emb", "0", "2", rest @ ..] => Some(join("add_embedding.linear_2".into(), rest)),
        ["out", "0", rest @ ..] => Some(join("conv_norm_out".into(), rest)),
        ["out", "2", rest @ ..] => Some(join("conv_out".into(), rest)),
        ["input_blocks", "0", "0", rest @ ..] => Some(join("conv_in".into(), rest)),
        ["input_blocks", n, m, rest @ ..] => {
            let n = num(n)?.checked_sub(1)?;
            let (i, j) = (n / 3, n % 3);
            match (j, *m, rest) {
                (2, "0", ["op", r @ ..]) => {
                    Some(join(format!("down_blocks.{i}.downsamplers.0.conv"), r))
                }
                (0 | 1, "0", r) => resnet(format!("down_blocks.{i}.resnets.{j}"), r),
                (0 | 1, "1", r) => Some(join(format!("down_blocks.{i}.attentions.{j}"), r)),
                _ => None,
            }
        }
        ["middle_block", "0", rest @ ..] => resnet("mid_block.resnets.0".into(), rest),
        ["middle_block", "1", rest @ ..] => Some(join("mid_block.attentions.0".into(), rest)),
        ["middle_block", "2", rest @ ..] => resnet("mid_block.resnets.1".into(), rest),
        ["output_blocks", n, m, rest @ ..] => {
            let n = num(n)?;
            let (i, j) = (n / 3, n % 3);
            match (*m, rest) {
                ("0", r) => resnet(format!("up_blocks.{i}.resnets.{j}"), r),
                ("1" | "2", ["conv", r @ ..]) if j == 2 => {
                    Some(join(format!("up_blocks.{i}.upsamplers.0.conv"), r))
                }
                ("1", r) => Some(join(format!("up_blocks.{i}.attentions.{j}"), r)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The LDM module path of a diffusers UNet module path: the inverse of
/// [`ldm_unet_to_diffusers`]. `up_has_attention(i)` says whether
/// `up_blocks.i` has attention blocks, which decides whether its upsampler
/// is `output_blocks.(3i+2).2` or `.1`.
pub fn diffusers_unet_to_ldm(path: &str, up_has_attention: impl Fn(u64) -> bool) -> Option<String> {
    let s: Vec<&str> = path.split('.').collect();
    let resnet = |head: String, rest: &[&str]| {
        let (name, used) = resnet_to_ldm(rest)?;
        Some(join(format!("{head}.{name}"), &rest[used..]))
    };
    match s.as_slice() {
        ["time_embedding", "linear_1", rest @ ..] => Some(join("time_embed.0".into(), rest)),
        ["time_embedding", "linear_2", rest @ ..] => Some(join("time_embed.2".into(), rest)),
        ["add_embedding", "linear_1", rest @ ..] => Some(join("label_emb.0.0".into(), rest)),
        ["add_embedding", "linear_2", rest @ ..] => Some(join("label_emb.0.2".into(), rest)),
        ["conv_norm_out", rest @ ..] => Some(join("out.0".into(), rest)),
        ["conv_out", rest @ ..] => Some(join("out.2".into(), rest)),
        ["conv_in", rest @ ..] => Some(join("input_blocks.0.0".into(), rest)),
        ["down_blocks", i, kind, j, rest @ ..] => {
            let (i, j) = (num(i)?, num(j)?);
            match *kind {
                "resnets" if j < 2 => resnet(format!("input_blocks.{}.0", level(i, j + 1)?), rest),
                "attentions" if j < 2 => {
                    Some(join(format!("input_blocks.{}.1", level(i, j + 1)?), rest))
                }
                "downsamplers" if j == 0 => match rest {
                    ["conv", r @ ..] => {
                        Some(join(format!("input_blocks.{}.0.op", level(i, 3)?), r))
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        ["mid_block", "resnets", "0", rest @ ..] => resnet("middle_block.0".into(), rest),
        ["mid_block", "attentions", "0", rest @ ..] => Some(join("middle_block.1".into(), rest)),
        ["mid_block", "resnets", "1", rest @ ..] => resnet("middle_block.2".into(), rest),
        ["up_blocks", i, kind, j, rest @ ..] => {
            let (i, j) = (num(i)?, num(j)?);
            match *kind {
                "resnets" if j < 3 => resnet(format!("output_blocks.{}.0", level(i, j)?), rest),
                "attentions" if j < 3 => {
                    Some(join(format!("output_blocks.{}.1", level(i, j)?), rest))
                }
                "upsamplers" if j == 0 => match rest {
                    ["conv", r @ ..] => {
                        let m = if up_has_attention(i) { 2 } else { 1 };
                        Some(join(format!("output_blocks.{}.{m}.conv", level(i, 2)?), r))
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// The diffusers module paths of a BFL FLUX module path, each with the rows
/// of the BFL weight it stands for (`None`: the whole weight). `shape` is
/// the BFL weight's shape: `qkv` is `[3h, h]`, `linear1` `[3h + mlp, h]`.
///
/// `double_blocks.N` is `transformer_blocks.N`: `img_attn.qkv` rows
/// `[0,h)`, `[h,2h)`, `[2h,3h)` are `attn.to_q`, `attn.to_k`, `attn.to_v`;
/// `txt_attn.qkv` rows are `attn.add_q_proj`, `add_k_proj`, `add_v_proj`;
/// `img_attn.proj` is `attn.to_out.0`, `txt_attn.proj` `attn.to_add_out`;
/// `img_mlp.0/2` are `ff.net.0.proj` / `ff.net.2`, `txt_mlp.0/2`
/// `ff_context.net.0.proj` / `ff_context.net.2`; `img_mod.lin` /
/// `txt_mod.lin` are `norm1.linear` / `norm1_context.linear`.
/// `single_blocks.N` is `single_transformer_blocks.N`: `linear1` rows are
/// `attn.to_q`, `attn.to_k`, `attn.to_v`, then `proj_mlp` `[3h, 3h+mlp)`;
/// `linear2` is `proj_out`; `modulation.lin` is `norm.linear`. At the top:
/// `img_in` = `x_embedder`, `txt_in` = `context_embedder`,
/// `final_layer.linear` = `proj_out`, `time_in`, `guidance_in`, `vector_in`
/// `.in_layer/.out_layer` = `time_text_embed.timestep_embedder`,
/// `guidance_embedder`, `text_embedder` `.linear_1/.linear_2`.
pub fn flux_bfl_to_diffusers(path: &str, shape: &[u64]) -> Vec<(String, Option<Range<u64>>)> {
    let s: Vec<&str> = path.split('.').collect();
    let whole = |p: String| vec![(p, None)];
    let thirds = |head: String, names: [&str; 3]| -> Vec<(String, Option<Range<u64>>)> {
        match shape {
            [rows, _] if rows % 3 == 0 && *rows > 0 => {
                let h = rows / 3;
                names
                    .iter()
                    .enumerate()
                    .map(|(k, n)| {
                        (
                            format!("{head}.{n}"),
                            Some(k as u64 * h..(k as u64 + 1) * h),
                        )
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    };
    match s.as_slice() {
        ["double_blocks", n, stream, module @ ..] => {
            let b = format!("transformer_blocks.{n}");
            let img = *stream == "img_attn" || *stream == "img_mlp" || *stream == "img_mod";
            match (*stream, module) {
                ("img_attn" | "txt_attn", ["qkv"]) => {
                    let names = if img {
                        ["to_q", "to_k", "to_v"]
                    } else {
                        ["add_q_proj", "add_k_proj", "add_v_proj"]
                    };
                    thirds(format!("{b}.attn"), names)
                }
                ("img_attn", ["proj"]) => whole(format!("{b}.attn.to_out.0")),
                ("txt_attn", ["proj"]) => whole(format!("{b}.attn.to_add_out")),
                ("img_mlp", ["0"]) => whole(format!("{b}.ff.net.0.proj")),
                ("img_mlp", ["2"]) => whole(format!("{b}.ff.net.2")),
                ("txt_mlp", ["0"]) => whole(format!("{b}.ff_context.net.0.proj")),
                ("txt_mlp", ["2"]) => whole(format!("{b}.ff_context.net.2")),
                ("img_mod", ["lin"]) => whole(format!("{b}.norm1.linear")),
                ("txt_mod", ["lin"]) => whole(format!("{b}.norm1_context.linear")),
                _ => Vec::new(),
            }
        }
        ["single_blocks", n, module @ ..] => {
            let b = format!("single_transformer_blocks.{n}");
            match module {
                ["linear1"] => match shape {
                    [rows, h] if *h > 0 && h.checked_mul(3).is_some_and(|t| *rows > t) => {
                        let mut v = Vec::new();
                        for (k, name) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                            let k = k as u64;
                            v.push((format!("{b}.attn.{name}"), Some(k * h..(k + 1) * h)));
                        }
                        v.push((format!("{b}.proj_mlp"), Some(3 * h..*rows)));
                        v
                    }
                    _ => Vec::new(),
                },
                ["linear2"] => whole(format!("{b}.proj_out")),
                ["modulation", "lin"] => whole(format!("{b}.norm.linear")),
                _ => Vec::new(),
            }
        }
        ["img_in"] => whole("x_embedder".into()),
        ["txt_in"] => whole("context_embedder".into()),
        ["final_layer", "linear"] => whole("proj_out".into()),
        [emb @ ("time_in" | "guidance_in" | "vector_in"), layer @ ("in_layer" | "out_layer")] => {
            let e = match *emb {
                "time_in" => "timestep_embedder",
                "guidance_in" => "guidance_embedder",
                _ => "text_embedder",
            };
            let l = if *layer == "in_layer" {
                "linear_1"
            } else {
                "linear_2"
            };
            whole(format!("time_text_embed.{e}.{l}"))
        }
        _ => Vec::new(),
    }
}

/// What another convention's name for a model weight stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alias {
    /// The weight, or the given rows of it.
    Rows(Option<Range<u64>>),
    /// A name of the same weight that cannot be targeted, and why.
    Unsupported(&'static str),
}

impl Alias {
    fn entry(self, idx: usize) -> Entry {
        match self {
            Alias::Rows(r) => Entry::Tensor(idx, r),
            Alias::Unsupported(why) => Entry::Unsupported(why),
        }
    }
}

const SD3_SWAPPED_CONTEXT: &str = "diffusers' norm1_context.linear of the last SD3 joint block is \
     context_block.adaLN_modulation.1 with its shift and scale halves swapped";
const SD3_SWAPPED_OUT: &str = "diffusers' norm_out.linear is SD3's final_layer.adaLN_modulation.1 \
     with its shift and scale halves swapped";

/// `[3h, _]` rows of `head.{names}` as thirds of a fused weight.
fn thirds(head: &str, names: [&str; 3], shape: &[u64]) -> Vec<(String, Alias)> {
    match shape {
        [rows, _] if rows % 3 == 0 && *rows > 0 => {
            let h = rows / 3;
            names
                .iter()
                .enumerate()
                .map(|(k, n)| {
                    let k = k as u64;
                    (format!("{head}.{n}"), Alias::Rows(Some(k * h..(k + 1) * h)))
                })
                .collect()
        }
        _ => Vec::new(),
    }
}

/// The diffusers module paths of an SD3 (MMDiT) single-file module path,
/// as ComfyUI's MMDiT key map gives them. `shape` is the SD3 weight's.
///
/// `joint_blocks.N` is `transformer_blocks.N`: `x_block.attn.qkv` rows
/// `[0,h)`, `[h,2h)`, `[2h,3h)` are `attn.to_q`/`to_k`/`to_v`;
/// `context_block.attn.qkv` rows are `attn.add_q_proj`/`add_k_proj`/
/// `add_v_proj`; `x_block.attn2.qkv` (SD3.5 Medium) rows are
/// `attn2.to_q`/`to_k`/`to_v`; `x_block.attn.proj` is `attn.to_out.0`,
/// `x_block.attn2.proj` `attn2.to_out.0`, `context_block.attn.proj`
/// `attn.to_add_out`; `x_block.mlp.fc1/fc2` are `ff.net.0.proj` /
/// `ff.net.2`, `context_block.mlp.fc1/fc2` `ff_context.net.0.proj` /
/// `ff_context.net.2`; `x_block.adaLN_modulation.1` is `norm1.linear` and
/// `context_block.adaLN_modulation.1` `norm1_context.linear` (except in the
/// last block, whose context block only modulates its input `[2h, h]`:
/// there diffusers swaps the shift and scale halves, so it cannot be
/// targeted). At the top: `x_embedder.proj` = `pos_embed.proj`,
/// `t_embedder.mlp.0/2` = `time_text_embed.timestep_embedder.linear_1/2`,
/// `y_embedder.mlp.0/2` = `time_text_embed.text_embedder.linear_1/2`,
/// `final_layer.linear` = `proj_out`; `norm_out.linear` is
/// `final_layer.adaLN_modulation.1` with swapped halves (not targeted).
pub fn mmdit_to_diffusers(path: &str, shape: &[u64]) -> Vec<(String, Alias)> {
    let s: Vec<&str> = path.split('.').collect();
    let whole = |p: String| vec![(p, Alias::Rows(None))];
    match s.as_slice() {
        ["joint_blocks", n, block, module @ ..] => {
            let b = format!("transformer_blocks.{n}");
            match (*block, module) {
                ("x_block", ["attn", "qkv"]) => {
                    thirds(&format!("{b}.attn"), ["to_q", "to_k", "to_v"], shape)
                }
                ("x_block", ["attn2", "qkv"]) => {
                    thirds(&format!("{b}.attn2"), ["to_q", "to_k", "to_v"], shape)
                }
                ("context_block", ["attn", "qkv"]) => thirds(
                    &format!("{b}.attn"),
                    ["add_q_proj", "add_k_proj", "add_v_proj"],
                    shape,
                ),
                ("x_block", ["attn", "proj"]) => whole(format!("{b}.attn.to_out.0")),
                ("x_block", ["attn2", "proj"]) => whole(format!("{b}.attn2.to_out.0")),
                ("context_block", ["attn", "proj"]) => whole(format!("{b}.attn.to_add_out")),
                ("x_block", ["mlp", "fc1"]) => whole(format!("{b}.ff.net.0.proj")),
                ("x_block", ["mlp", "fc2"]) => whole(format!("{b}.ff.net.2")),
                ("context_block", ["mlp", "fc1"]) => whole(format!("{b}.ff_context.net.0.proj")),
                ("context_block", ["mlp", "fc2"]) => whole(format!("{b}.ff_context.net.2")),
                ("x_block", ["adaLN_modulation", "1"]) => whole(format!("{b}.norm1.linear")),
                ("context_block", ["adaLN_modulation", "1"]) => {
                    let pre_only =
                        matches!(shape, [rows, cols] if cols.checked_mul(2) == Some(*rows));
                    let alias = if pre_only {
                        Alias::Unsupported(SD3_SWAPPED_CONTEXT)
                    } else {
                        Alias::Rows(None)
                    };
                    vec![(format!("{b}.norm1_context.linear"), alias)]
                }
                _ => Vec::new(),
            }
        }
        ["x_embedder", "proj"] => whole("pos_embed.proj".into()),
        [emb @ ("t_embedder" | "y_embedder"), "mlp", layer @ ("0" | "2")] => {
            let e = if *emb == "t_embedder" {
                "timestep_embedder"
            } else {
                "text_embedder"
            };
            let l = if *layer == "0" {
                "linear_1"
            } else {
                "linear_2"
            };
            whole(format!("time_text_embed.{e}.{l}"))
        }
        ["final_layer", "linear"] => whole("proj_out".into()),
        ["final_layer", "adaLN_modulation", "1"] => {
            vec![(
                "norm_out.linear".into(),
                Alias::Unsupported(SD3_SWAPPED_OUT),
            )]
        }
        _ => Vec::new(),
    }
}

const FUSED_IMG_QKV: &str = "a LoRA on BFL's fused img_attn.qkv cannot be applied to this \
     diffusers-layout model, which stores attn.to_q, attn.to_k and attn.to_v as separate weights: \
     it would need splitting the LoRA's up factor into three row blocks, one per weight";
const FUSED_TXT_QKV: &str = "a LoRA on BFL's fused txt_attn.qkv cannot be applied to this \
     diffusers-layout model, which stores attn.add_q_proj, add_k_proj and add_v_proj as separate \
     weights: it would need splitting the LoRA's up factor into three row blocks, one per weight";
const FUSED_LINEAR1: &str = "a LoRA on BFL's fused single-block linear1 cannot be applied to this \
     diffusers-layout model, which stores attn.to_q, attn.to_k, attn.to_v and proj_mlp as separate \
     weights: it would need splitting the LoRA's up factor into four row blocks, one per weight";
const FLUX_SWAPPED_OUT: &str = "BFL's final_layer.adaLN_modulation.1 is diffusers' \
     norm_out.linear with its shift and scale halves swapped";

/// The BFL module path of a diffusers FLUX transformer module path (the
/// inverse of [`flux_bfl_to_diffusers`], for BFL-named LoRAs on a
/// diffusers-layout model), or `None`. Whole weights map one to one
/// (`transformer_blocks.N.attn.to_out.0` → `double_blocks.N.img_attn.proj`,
/// `attn.to_add_out` → `txt_attn.proj`, `ff.net.0.proj`/`ff.net.2` →
/// `img_mlp.0`/`img_mlp.2`, `ff_context` → `txt_mlp`, `norm1.linear` →
/// `img_mod.lin`, `norm1_context.linear` → `txt_mod.lin`;
/// `single_transformer_blocks.N.proj_out` → `single_blocks.N.linear2`,
/// `norm.linear` → `modulation.lin`; `x_embedder` → `img_in`,
/// `context_embedder` → `txt_in`, `proj_out` → `final_layer.linear`, the
/// `time_text_embed` embedders → `time_in`/`guidance_in`/`vector_in`).
/// BFL's fused `qkv` and `linear1`, whose parts are separate diffusers
/// weights, and `final_layer.adaLN_modulation.1` (halves swapped) are
/// [`Alias::Unsupported`], with the reason.
pub fn flux_diffusers_to_bfl(path: &str) -> Option<(String, Alias)> {
    let s: Vec<&str> = path.split('.').collect();
    let whole = |p: String| Some((p, Alias::Rows(None)));
    match s.as_slice() {
        ["transformer_blocks", n, module @ ..] => {
            let b = format!("double_blocks.{n}");
            match module {
                ["attn", "to_out", "0"] => whole(format!("{b}.img_attn.proj")),
                ["attn", "to_add_out"] => whole(format!("{b}.txt_attn.proj")),
                ["ff", "net", "0", "proj"] => whole(format!("{b}.img_mlp.0")),
                ["ff", "net", "2"] => whole(format!("{b}.img_mlp.2")),
                ["ff_context", "net", "0", "proj"] => whole(format!("{b}.txt_mlp.0")),
                ["ff_context", "net", "2"] => whole(format!("{b}.txt_mlp.2")),
                ["norm1", "linear"] => whole(format!("{b}.img_mod.lin")),
                ["norm1_context", "linear"] => whole(format!("{b}.txt_mod.lin")),
                ["attn", "to_q" | "to_k" | "to_v"] => Some((
                    format!("{b}.img_attn.qkv"),
                    Alias::Unsupported(FUSED_IMG_QKV),
                )),
                ["attn", "add_q_proj" | "add_k_proj" | "add_v_proj"] => Some((
                    format!("{b}.txt_attn.qkv"),
                    Alias::Unsupported(FUSED_TXT_QKV),
                )),
                _ => None,
            }
        }
        ["single_transformer_blocks", n, module @ ..] => {
            let b = format!("single_blocks.{n}");
            match module {
                ["proj_out"] => whole(format!("{b}.linear2")),
                ["norm", "linear"] => whole(format!("{b}.modulation.lin")),
                ["attn", "to_q" | "to_k" | "to_v"] | ["proj_mlp"] => {
                    Some((format!("{b}.linear1"), Alias::Unsupported(FUSED_LINEAR1)))
                }
                _ => None,
            }
        }
        ["x_embedder"] => whole("img_in".into()),
        ["context_embedder"] => whole("txt_in".into()),
        ["proj_out"] => whole("final_layer.linear".into()),
        ["norm_out", "linear"] => Some((
            "final_layer.adaLN_modulation.1".into(),
            Alias::Unsupported(FLUX_SWAPPED_OUT),
        )),
        ["time_text_embed", emb, layer @ ("linear_1" | "linear_2")] => {
            let e = match *emb {
                "timestep_embedder" => "time_in",
                "guidance_embedder" => "guidance_in",
                "text_embedder" => "vector_in",
                _ => return None,
            };
            let l = if *layer == "linear_1" {
                "in_layer"
            } else {
                "out_layer"
            };
            whole(format!("{e}.{l}"))
        }
        _ => None,
    }
}

/// The Hugging Face CLIP paths of an OpenCLIP text tower module path
/// (`transformer.resblocks.N.attn.in_proj` `[3d, d]` → rows of
/// `text_model.encoder.layers.N.self_attn.q_proj`/`k_proj`/`v_proj`,
/// `attn.out_proj` → `self_attn.out_proj`, `mlp.c_fc` → `mlp.fc1`,
/// `mlp.c_proj` → `mlp.fc2`).
fn open_clip_to_hf(path: &str, shape: &[u64]) -> Vec<(String, Option<Range<u64>>)> {
    let s: Vec<&str> = path.split('.').collect();
    let ["transformer", "resblocks", n, module @ ..] = s.as_slice() else {
        return Vec::new();
    };
    let l = format!("text_model.encoder.layers.{n}");
    match module {
        ["attn", "in_proj"] => match shape {
            [rows, _] if rows % 3 == 0 && *rows > 0 => {
                let d = rows / 3;
                ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let k = k as u64;
                        (format!("{l}.self_attn.{p}"), Some(k * d..(k + 1) * d))
                    })
                    .collect()
            }
            _ => Vec::new(),
        },
        ["attn", "out_proj"] => vec![(format!("{l}.self_attn.out_proj"), None)],
        ["mlp", "c_fc"] => vec![(format!("{l}.mlp.fc1"), None)],
        ["mlp", "c_proj"] => vec![(format!("{l}.mlp.fc2"), None)],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{preset_specs, Preset, PresetOptions};

    #[test]
    fn ldm_diffusers_known_pairs() {
        for (ldm, diff) in [
            ("input_blocks.0.0", "conv_in"),
            (
                "input_blocks.1.0.in_layers.2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "input_blocks.2.1.proj_in",
                "down_blocks.0.attentions.1.proj_in",
            ),
            ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
            (
                "input_blocks.4.0.skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
            (
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            ("input_blocks.9.0.op", "down_blocks.2.downsamplers.0.conv"),
            (
                "input_blocks.11.0.emb_layers.1",
                "down_blocks.3.resnets.1.time_emb_proj",
            ),
            ("middle_block.0.out_layers.3", "mid_block.resnets.0.conv2"),
            (
                "middle_block.1.transformer_blocks.0.ff.net.2",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            ),
            ("middle_block.2.in_layers.0", "mid_block.resnets.1.norm1"),
            (
                "output_blocks.0.0.in_layers.2",
                "up_blocks.0.resnets.0.conv1",
            ),
            ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
            ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
            (
                "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0",
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
            ),
            ("time_embed.2", "time_embedding.linear_2"),
            ("label_emb.0.0", "add_embedding.linear_1"),
            ("out.2", "conv_out"),
        ] {
            assert_eq!(ldm_unet_to_diffusers(ldm).as_deref(), Some(diff), "{ldm}");
        }
    }

    /// Every module of the full-size SD 1.5 and SDXL UNets maps to a
    /// diffusers path and back, and no two modules share a diffusers path.
    #[test]
    fn ldm_diffusers_round_trip() {
        for preset in [Preset::Sd15, Preset::Sdxl] {
            let specs = preset_specs(preset, &PresetOptions::default());
            let p = "model.diffusion_model.";
            let modules: Vec<&str> = specs
                .iter()
                .filter_map(|s| s.name.strip_prefix(p)?.strip_suffix(".weight"))
                .collect();
            let up_attn = |i: u64| {
                modules.iter().any(|m| {
                    ldm_unet_to_diffusers(m)
                        .is_some_and(|d| d.starts_with(&format!("up_blocks.{i}.attentions.")))
                })
            };
            let mut seen = std::collections::HashSet::new();
            for m in &modules {
                let d = ldm_unet_to_diffusers(m).unwrap_or_else(|| panic!("{preset:?}: {m}"));
                assert!(seen.insert(d.clone()), "{preset:?}: {d} twice");
                let back = diffusers_unet_to_ldm(&d, up_attn);
                assert_eq!(back.as_deref(), Some(*m), "{preset:?}: {m} -> {d}");
            }
        }
    }

    #[test]
    fn flux_rows() {
        let v = flux_bfl_to_diffusers("double_blocks.3.img_attn.qkv", &[9216, 3072]);
        assert_eq!(
            v,
            vec![
                ("transformer_blocks.3.attn.to_q".to_owned(), Some(0..3072)),
                (
                    "transformer_blocks.3.attn.to_k".to_owned(),
                    Some(3072..6144)
                ),
                (
                    "transformer_blocks.3.attn.to_v".to_owned(),
                    Some(6144..9216)
                ),
            ]
        );
        let v = flux_bfl_to_diffusers("single_blocks.0.linear1", &[21504, 3072]);
        assert_eq!(v.len(), 4);
        assert_eq!(
            v[3],
            (
                "single_transformer_blocks.0.proj_mlp".to_owned(),
                Some(9216..21504)
            )
        );
        assert_eq!(
            flux_bfl_to_diffusers("guidance_in.out_layer", &[3072, 3072]),
            vec![(
                "time_text_embed.guidance_embedder.linear_2".to_owned(),
                None
            )]
        );
        assert!(flux_bfl_to_diffusers("double_blocks.3.img_attn.norm.key_norm", &[128]).is_empty());
    }
}
