//! LoRA tensor names: which factor a tensor is (its suffix), which module it
//! belongs to, which naming convention that module name follows, and how
//! the module name is looked up in a model.

use std::fmt;

/// The naming convention of a LoRA module key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Naming {
    /// kohya-ss sd-scripts (and LyCORIS, OneTrainer): a model path with
    /// `.` replaced by `_` behind `lora_unet_`, `lora_transformer_`,
    /// `lora_te_`, `lora_te1_`, `lora_te2_`, `lora_te3_`.
    Kohya,
    /// diffusers module paths (`down_blocks.0...`, `transformer_blocks.0...`),
    /// optionally behind `unet.`, `transformer.`, `text_encoder.`,
    /// `text_encoder_2.`.
    Diffusers,
    /// peft's `base_model.model.` prefix in front of diffusers module paths.
    Peft,
    /// The checkpoint's own (LDM / BFL) module paths, optionally behind
    /// `diffusion_model.` or `model.diffusion_model.` (ai-toolkit, ComfyUI,
    /// BFL control LoRAs).
    Checkpoint,
    /// diffusers attention processors before peft
    /// (`...attn1.processor.to_k_lora.down.weight`, `...to_q.lora.down.weight`,
    /// `...q_proj.lora_linear_layer.down.weight`).
    DiffusersLegacy,
    /// XLabs FLUX LoRAs (`double_blocks.N.processor.qkv_lora1.down.weight`).
    XLabs,
    /// cloneofsimo/lora's positional format (`unet:{i}:up`): adapters are
    /// numbered in injection order, not named.
    Cloneofsimo,
    /// None of the above.
    Unknown,
}

impl Naming {
    /// A short human-readable name.
    pub fn label(self) -> &'static str {
        match self {
            Naming::Kohya => "kohya",
            Naming::Diffusers => "diffusers",
            Naming::Peft => "peft",
            Naming::Checkpoint => "checkpoint (LDM/BFL names)",
            Naming::DiffusersLegacy => "legacy diffusers attention processors",
            Naming::XLabs => "XLabs",
            Naming::Cloneofsimo => "cloneofsimo positional",
            Naming::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Naming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What one tensor of a LoRA file is to its module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Part {
    Down,
    Up,
    Mid,
    UpBias,
    DownBias,
    Alpha,
    Dora,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT1,
    LokrT2,
    Diff,
    Norm,
    Oft,
}

impl Part {
    /// The suffix the part is written with in messages.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Part::Down => "down (lora_down / lora_A)",
            Part::Up => "up (lora_up / lora_B)",
            Part::Mid => "lora_mid",
            Part::UpBias => "lora_B.bias",
            Part::DownBias => "lora_A.bias",
            Part::Alpha => "alpha",
            Part::Dora => "dora_scale",
            Part::HadaW1A => "hada_w1_a",
            Part::HadaW1B => "hada_w1_b",
            Part::HadaW2A => "hada_w2_a",
            Part::HadaW2B => "hada_w2_b",
            Part::HadaT1 => "hada_t1",
            Part::HadaT2 => "hada_t2",
            Part::LokrW1 => "lokr_w1",
            Part::LokrW1A => "lokr_w1_a",
            Part::LokrW1B => "lokr_w1_b",
            Part::LokrW2 => "lokr_w2",
            Part::LokrW2A => "lokr_w2_a",
            Part::LokrW2B => "lokr_w2_b",
            Part::LokrT1 => "lokr_t1",
            Part::LokrT2 => "lokr_t2",
            Part::Diff => "diff",
            Part::Norm => "w_norm / b_norm",
            Part::Oft => "oft",
        }
    }
}

/// Known suffixes. The longest one that matches wins, so `.lora_up.weight`
/// beats `.up.weight`.
const SUFFIXES: &[(&str, Part)] = &[
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_mid.weight", Part::Mid),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_A.bias", Part::DownBias),
    (".lora_B.bias", Part::UpBias),
    (".down.weight", Part::Down),
    (".up.weight", Part::Up),
    (".alpha", Part::Alpha),
    (".dora_scale", Part::Dora),
    (".lora_magnitude_vector", Part::Dora),
    (".lora_magnitude_vector.weight", Part::Dora),
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".hada_t1", Part::HadaT1),
    (".hada_t2", Part::HadaT2),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2", Part::LokrW2),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_t1", Part::LokrT1),
    (".lokr_t2", Part::LokrT2),
    (".diff", Part::Diff),
    (".diff_b", Part::Diff),
    (".set_weight", Part::Diff),
    (".w_norm", Part::Norm),
    (".b_norm", Part::Norm),
    (".oft_blocks", Part::Oft),
    (".oft_diag", Part::Oft),
];

/// Splits a LoRA tensor name into its module key and part, or `None` if no
/// known suffix matches (or nothing is left of the module name).
pub(crate) fn split_key(key: &str) -> Option<(&str, Part)> {
    SUFFIXES
        .iter()
        .filter(|(s, _)| key.len() > s.len() && key.ends_with(s))
        .max_by_key(|(s, _)| s.len())
        .map(|(s, p)| (&key[..key.len() - s.len()], *p))
}

/// Whether a tensor name is one of cloneofsimo/lora's positional keys
/// (`unet:12:up`, `text_encoder:3:down`).
pub(crate) fn is_cloneofsimo(key: &str) -> bool {
    let mut it = key.split(':');
    matches!(
        (it.next(), it.next(), it.next(), it.next()),
        (Some("unet" | "text_encoder"), Some(n), Some("up" | "down"), None)
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    )
}

const KOHYA_PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_transformer_",
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
];

const CHECKPOINT_FIRST: &[&str] = &[
    "model",
    "diffusion_model",
    "double_blocks",
    "single_blocks",
    "input_blocks",
    "middle_block",
    "output_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    "cond_stage_model",
    "conditioner",
    "text_encoders",
    "joint_blocks",
];

const DIFFUSERS_FIRST: &[&str] = &[
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "down_blocks",
    "mid_block",
    "up_blocks",
    "transformer_blocks",
    "single_transformer_blocks",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "proj_out",
    "norm_out",
    "text_model",
    "conv_in",
    "conv_out",
    "time_embedding",
];

/// The naming convention of a module key (after any rewriting of legacy
/// forms).
pub(crate) fn naming_of(module: &str) -> Naming {
    if KOHYA_PREFIXES.iter().any(|p| module.starts_with(p)) {
        return Naming::Kohya;
    }
    if module.starts_with("base_model.model.") {
        return Naming::Peft;
    }
    let first = module.split('.').next().unwrap_or("");
    if CHECKPOINT_FIRST.contains(&first) {
        Naming::Checkpoint
    } else if DIFFUSERS_FIRST.contains(&first) {
        Naming::Diffusers
    } else {
        Naming::Unknown
    }
}

/// The module key of a `.down.weight` / `.up.weight` tensor rewritten to
/// the model path it adapts, with its naming: legacy diffusers attention
/// processors (`X.processor.to_k_lora` → `X.to_k`, `to_out_lora` →
/// `to_out.0`), `X.lora` and `X.lora_linear_layer` → `X`, XLabs
/// (`double_blocks.N.processor.qkv_lora1` → `double_blocks.N.img_attn.qkv`,
/// `qkv_lora2` → `txt_attn.qkv`, `proj_lora1`/`proj_lora2` → `img_attn.proj`
/// / `txt_attn.proj`).
pub(crate) fn rewrite_dotted(module: &str) -> (String, Naming) {
    if let Some(m) = module.strip_suffix(".lora") {
        return (m.to_owned(), Naming::DiffusersLegacy);
    }
    if let Some(m) = module.strip_suffix(".lora_linear_layer") {
        return (m.to_owned(), Naming::DiffusersLegacy);
    }
    if let Some((p, x)) = module.rsplit_once(".processor.") {
        let xlabs = match x {
            "qkv_lora1" => Some("img_attn.qkv"),
            "qkv_lora2" => Some("txt_attn.qkv"),
            "proj_lora1" => Some("img_attn.proj"),
            "proj_lora2" => Some("txt_attn.proj"),
            _ => None,
        };
        if let Some(t) = xlabs {
            return (format!("{p}.{t}"), Naming::XLabs);
        }
        if let Some(base) = x.strip_suffix("_lora") {
            let base = if base == "to_out" { "to_out.0" } else { base };
            return (format!("{p}.{base}"), Naming::DiffusersLegacy);
        }
    }
    (module.to_owned(), naming_of(module))
}

/// Where in the model a module key is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The denoiser (UNet or transformer).
    Denoiser,
    /// Text encoder number N (1-based: `lora_te1_`, `text_encoder_2.`).
    TextEncoder(u32),
    /// Any component, the denoiser first.
    Any,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Denoiser => f.write_str("the denoiser"),
            Scope::TextEncoder(n) => write!(f, "text encoder {n}"),
            Scope::Any => f.write_str("any component"),
        }
    }
}

/// A module key reduced to what the model index is asked: the scope, the
/// path inside it, and whether the path is kohya-flattened (`_` for `.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lookup<'a> {
    pub scope: Scope,
    pub path: &'a str,
    pub flat: bool,
}

/// Strips the prefixes LoRA files put in front of model paths.
pub(crate) fn lookup_of(module: &str) -> Lookup<'_> {
    const KOHYA: &[(&str, Scope)] = &[
        ("lora_unet_", Scope::Denoiser),
        ("lora_transformer_", Scope::Denoiser),
        ("lora_te1_", Scope::TextEncoder(1)),
        ("lora_te2_", Scope::TextEncoder(2)),
        ("lora_te3_", Scope::TextEncoder(3)),
        ("lora_te_", Scope::TextEncoder(1)),
    ];
    for (p, scope) in KOHYA {
        if let Some(rest) = module.strip_prefix(p) {
            return Lookup {
                scope: *scope,
                path: rest,
                flat: true,
            };
        }
    }
    let mut path = module;
    while let Some(rest) = path.strip_prefix("base_model.model.") {
        path = rest;
    }
    const DOTTED: &[(&str, Scope)] = &[
        ("model.diffusion_model.", Scope::Denoiser),
        ("diffusion_model.", Scope::Denoiser),
        ("unet.", Scope::Denoiser),
        ("transformer.", Scope::Denoiser),
        ("text_encoder.", Scope::TextEncoder(1)),
        ("text_encoder_2.", Scope::TextEncoder(2)),
        ("text_encoder_3.", Scope::TextEncoder(3)),
    ];
    for (p, scope) in DOTTED {
        if let Some(rest) = path.strip_prefix(p) {
            return Lookup {
                scope: *scope,
                path: rest,
                flat: false,
            };
        }
    }
    Lookup {
        scope: Scope::Any,
        path,
        flat: false,
    }
}

/// kohya's flattening of a module path: every `.` becomes `_`.
pub(crate) fn flatten(path: &str) -> String {
    path.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(
            split_key("lora_unet_x_to_q.lora_up.weight"),
            Some(("lora_unet_x_to_q", Part::Up))
        );
        assert_eq!(
            split_key("a.b.processor.to_k_lora.down.weight"),
            Some(("a.b.processor.to_k_lora", Part::Down))
        );
        assert_eq!(split_key("m.lokr_w1"), Some(("m", Part::LokrW1)));
        assert_eq!(split_key("m.lokr_w1_b"), Some(("m", Part::LokrW1B)));
        assert_eq!(split_key("m.diff_b"), Some(("m", Part::Diff)));
        assert_eq!(split_key(".alpha"), None);
        assert_eq!(split_key("norm.key_norm.scale"), None);
        assert!(is_cloneofsimo("unet:12:up"));
        assert!(is_cloneofsimo("text_encoder:0:down"));
        assert!(!is_cloneofsimo("unet:x:up"));
        assert!(!is_cloneofsimo("<s1>"));
    }

    #[test]
    fn rewrites() {
        assert_eq!(
            rewrite_dotted(
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
            ),
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0".into(),
                Naming::DiffusersLegacy
            )
        );
        assert_eq!(
            rewrite_dotted("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora"),
            (
                "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k".into(),
                Naming::DiffusersLegacy
            )
        );
        assert_eq!(
            rewrite_dotted(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
            ),
            (
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj".into(),
                Naming::DiffusersLegacy
            )
        );
        assert_eq!(
            rewrite_dotted("double_blocks.3.processor.qkv_lora2"),
            ("double_blocks.3.txt_attn.qkv".into(), Naming::XLabs)
        );
    }

    #[test]
    fn lookups() {
        let l = lookup_of("lora_te2_text_model_encoder_layers_0_mlp_fc1");
        assert_eq!(
            l,
            Lookup {
                scope: Scope::TextEncoder(2),
                path: "text_model_encoder_layers_0_mlp_fc1",
                flat: true
            }
        );
        let l = lookup_of("base_model.model.transformer_blocks.0.attn.to_q");
        assert_eq!(
            (l.scope, l.path),
            (Scope::Any, "transformer_blocks.0.attn.to_q")
        );
        let l = lookup_of("diffusion_model.double_blocks.0.img_attn.qkv");
        assert_eq!(
            (l.scope, l.path),
            (Scope::Denoiser, "double_blocks.0.img_attn.qkv")
        );
        assert_eq!(
            naming_of("lora_transformer_transformer_blocks_0_attn_to_k"),
            Naming::Kohya
        );
        assert_eq!(
            naming_of("transformer.transformer_blocks.0.attn.to_k"),
            Naming::Diffusers
        );
        assert_eq!(
            naming_of("diffusion_model.double_blocks.0.img_attn.qkv"),
            Naming::Checkpoint
        );
        assert_eq!(naming_of("base_model.model.proj_out"), Naming::Peft);
        assert_eq!(naming_of("final_layer.linear"), Naming::Checkpoint);
    }
}
