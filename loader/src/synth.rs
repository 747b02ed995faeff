//! Writing synthetic safetensors files: a writer for any list of tensors,
//! a deterministic content generator, and presets that reproduce the real
//! tensor names and shapes of SD 1.5, SDXL and FLUX.1 checkpoints, with a
//! width divisor (`scale`) for small copies of the same structure, and
//! LoRA files in kohya and peft conventions for them ([`lora_specs`]).
//!
//! Tests across the project build their models here.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::dtype::{from_f32_slice, Dtype};
use crate::error::{LoaderError, Result};

/// Name, dtype and shape of a tensor to write (or to lay out without
/// writing).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// A spec from its parts.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[u64]) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Byte length (element count × dtype size), `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |a, d| a.checked_mul(*d))?
            .checked_mul(self.dtype.size_in_bytes() as u64)
    }
}

/// SplitMix64: a tiny, fast, deterministic 64-bit generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform `f32` in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        // 24 random bits → [0, 1) exactly representable, then to [-1, 1).
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// FNV-1a hash of a string, used to derive per-tensor seeds.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Amplitude of generated float values: uniform in `[-AMPLITUDE, AMPLITUDE)`.
pub const AMPLITUDE: f32 = 0.1;

/// Deterministic contents for a tensor: a function of `seed` and the
/// tensor's name only (so a tensor's bytes do not depend on what else is in
/// the file). Floats are uniform in `[-AMPLITUDE, AMPLITUDE)`, rounded to
/// the dtype; BOOL is 0 or 1; other dtypes are random bytes.
/// `dst.len()` must be the tensor's byte length (whole elements).
pub fn fill_deterministic(seed: u64, spec: &TensorSpec, dst: &mut [u8]) {
    let mut rng = SplitMix64(seed ^ fnv1a(&spec.name));
    let size = spec.dtype.size_in_bytes();
    match spec.dtype {
        d if d.is_float() => {
            let mut vals = [0f32; 1024];
            for chunk in dst.chunks_mut(1024 * size) {
                let n = chunk.len() / size;
                for v in vals.iter_mut().take(n) {
                    *v = rng.next_f32() * AMPLITUDE;
                }
                // Cannot fail: d is a float dtype.
                if let Ok(bytes) = from_f32_slice(&vals[..n], d) {
                    chunk[..bytes.len()].copy_from_slice(&bytes);
                }
            }
        }
        Dtype::Bool => dst.iter_mut().for_each(|b| *b = (rng.next_u64() & 1) as u8),
        _ => {
            for chunk in dst.chunks_mut(8) {
                let r = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
        }
    }
}

/// The deterministic contents of one tensor as a new buffer (see
/// [`fill_deterministic`]), or [`LoaderError::Write`] if the spec's size
/// overflows 64 bits or `usize`, or exceeds `limit` bytes (a guard against
/// allocating what a crafted shape asks for).
pub fn try_deterministic_bytes(seed: u64, spec: &TensorSpec, limit: u64) -> Result<Vec<u8>> {
    let err = |problem: String| LoaderError::Write {
        path: "(memory)".into(),
        tensor: spec.name.clone(),
        problem,
    };
    let len = spec.byte_len().ok_or_else(|| {
        err(format!(
            "shape {:?} of {} overflows",
            spec.shape, spec.dtype
        ))
    })?;
    if len > limit {
        return Err(err(format!(
            "shape {:?} of {} is {len} bytes, over the limit of {limit}",
            spec.shape, spec.dtype
        )));
    }
    let len = usize::try_from(len).map_err(|_| err(format!("{len} bytes do not fit in memory")))?;
    let mut buf = vec![0u8; len];
    fill_deterministic(seed, spec, &mut buf);
    Ok(buf)
}

/// [`try_deterministic_bytes`] without a size limit, for specs a test
/// built.
///
/// # Panics
///
/// If the spec's size overflows `usize` (use [`try_deterministic_bytes`]
/// for specs that come from outside).
pub fn deterministic_bytes(seed: u64, spec: &TensorSpec) -> Vec<u8> {
    match try_deterministic_bytes(seed, spec, u64::MAX) {
        Ok(b) => b,
        Err(e) => panic!("{e}"),
    }
}

/// Builds the header JSON (without the 8-byte length) for tensors laid out
/// back to back in the given order, padded with spaces to a multiple of 8
/// bytes as the reference writer does. Errors on a duplicate name, the
/// reserved name `__metadata__`, or a size overflow.
pub fn header_bytes(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut obj = Map::new();
    if !metadata.is_empty() {
        let md: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("__metadata__".into(), Value::Object(md));
    }
    let mut offset = 0u64;
    let mut seen = HashSet::new();
    for s in specs {
        let err = |problem: String| LoaderError::Write {
            path: path.to_owned(),
            tensor: s.name.clone(),
            problem,
        };
        if s.name == "__metadata__" {
            return Err(err("`__metadata__` is reserved".into()));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(err("duplicate tensor name".into()));
        }
        let len = s
            .byte_len()
            .ok_or_else(|| err(format!("shape {:?} of {} overflows", s.shape, s.dtype)))?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| err(format!("data offset {offset} + {len} overflows")))?;
        obj.insert(
            s.name.clone(),
            json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    // Serialising a Value of strings and integers cannot fail.
    let mut bytes = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok(bytes)
}

/// Writes a safetensors file whose tensors' bytes come from `fill`, called
/// once per tensor in order with a buffer of the tensor's byte length.
/// Only one tensor's bytes are in memory at a time.
pub fn write_with(
    path: impl AsRef<Path>,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(&TensorSpec, &mut [u8]),
) -> Result<()> {
    let path = path.as_ref();
    let header = header_bytes(path, specs, metadata)?;
    let io = |source| LoaderError::WriteIo {
        path: path.to_owned(),
        source,
    };
    let mut w = BufWriter::new(File::create(path).map_err(io)?);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    let mut buf = Vec::new();
    for s in specs {
        // Sizes were checked by header_bytes; usize is 64-bit on our targets.
        let len = s.byte_len().unwrap_or(0) as usize;
        buf.clear();
        buf.resize(len, 0);
        fill(s, &mut buf);
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(())
}

/// Writes a safetensors file from tensors with their bytes. Each byte
/// buffer must be exactly the spec's byte length.
pub fn write_tensors(
    path: impl AsRef<Path>,
    tensors: &[(TensorSpec, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    for (s, data) in tensors {
        if s.byte_len() != Some(data.len() as u64) {
            return Err(LoaderError::Write {
                path: path.to_owned(),
                tensor: s.name.clone(),
                problem: format!(
                    "shape {:?} of {} needs {:?} bytes, {} given",
                    s.shape,
                    s.dtype,
                    s.byte_len(),
                    data.len()
                ),
            });
        }
    }
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut it = tensors.iter();
    write_with(path, &specs, metadata, |_, dst| {
        if let Some((_, data)) = it.next() {
            dst.copy_from_slice(data);
        }
    })
}

/// Writes a safetensors file with deterministic contents from `seed` (see
/// [`fill_deterministic`]).
pub fn write_deterministic(
    path: impl AsRef<Path>,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    seed: u64,
) -> Result<()> {
    write_with(path, specs, metadata, |s, dst| {
        fill_deterministic(seed, s, dst)
    })
}

/// Architectures the presets reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Stable Diffusion 1.5 single-file checkpoint: UNet
    /// (`model.diffusion_model.`), CLIP-L (`cond_stage_model.transformer.`),
    /// VAE (`first_stage_model.`).
    Sd15,
    /// SDXL base single-file checkpoint: UNet, CLIP-L
    /// (`conditioner.embedders.0.transformer.`), OpenCLIP bigG
    /// (`conditioner.embedders.1.model.`), VAE.
    Sdxl,
    /// FLUX.1-dev transformer in BFL naming (`double_blocks.N`,
    /// `single_blocks.N`), optionally with CLIP-L and T5-XXL encoders under
    /// `text_encoders.clip_l.transformer.` and `text_encoders.t5xxl.transformer.`.
    Flux,
}

impl Preset {
    /// Parses `sd15`, `sdxl` or `flux`.
    pub fn from_name(name: &str) -> Option<Preset> {
        match name {
            "sd15" => Some(Preset::Sd15),
            "sdxl" => Some(Preset::Sdxl),
            "flux" => Some(Preset::Flux),
            _ => None,
        }
    }
}

/// Options for [`preset_specs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetOptions {
    /// Width divisor: every channel/hidden width is divided by it (at least
    /// 1 remains); 1 gives the full-size shapes. Block counts never change.
    pub scale: u64,
    /// Dtype of every tensor.
    pub dtype: Dtype,
    /// Include the text encoders (always part of `sd15`/`sdxl`
    /// checkpoints; for `flux`, adds CLIP-L and T5-XXL).
    pub text_encoders: bool,
    /// Include the VAE (`sd15`/`sdxl` only).
    pub vae: bool,
}

impl Default for PresetOptions {
    fn default() -> Self {
        PresetOptions {
            scale: 1,
            dtype: Dtype::F16,
            text_encoders: true,
            vae: true,
        }
    }
}

struct Builder {
    dtype: Dtype,
    scale: u64,
    out: Vec<TensorSpec>,
}

impl Builder {
    /// Scales a width.
    fn w(&self, full: u64) -> u64 {
        (full / self.scale.max(1)).max(1)
    }
    fn t(&mut self, name: String, shape: &[u64]) {
        self.out.push(TensorSpec::new(name, self.dtype, shape));
    }
    fn wb(&mut self, p: &str, shape: &[u64]) {
        self.t(format!("{p}.weight"), shape);
        self.t(format!("{p}.bias"), &shape[..1]);
    }
    fn norm(&mut self, p: &str, c: u64) {
        self.wb(p, &[c]);
    }
}

struct UnetConfig {
    mc: u64,
    mult: &'static [u64],
    nres: usize,
    /// Transformer depth per level (0: no attention).
    depth: &'static [usize],
    depth_mid: usize,
    ctx: u64,
    linear_proj: bool,
    adm: Option<u64>,
}

fn unet_res(b: &mut Builder, p: &str, cin: u64, cout: u64, temb: u64) {
    b.norm(&format!("{p}.in_layers.0"), cin);
    b.wb(&format!("{p}.in_layers.2"), &[cout, cin, 3, 3]);
    b.wb(&format!("{p}.emb_layers.1"), &[cout, temb]);
    b.norm(&format!("{p}.out_layers.0"), cout);
    b.wb(&format!("{p}.out_layers.3"), &[cout, cout, 3, 3]);
    if cin != cout {
        b.wb(&format!("{p}.skip_connection"), &[cout, cin, 1, 1]);
    }
}

fn unet_attn(b: &mut Builder, p: &str, c: u64, depth: usize, ctx: u64, linear: bool) {
    let proj: Vec<u64> = if linear { vec![c, c] } else { vec![c, c, 1, 1] };
    b.norm(&format!("{p}.norm"), c);
    b.wb(&format!("{p}.proj_in"), &proj);
    for d in 0..depth {
        let q = format!("{p}.transformer_blocks.{d}");
        for (a, kv) in [("attn1", c), ("attn2", ctx)] {
            b.t(format!("{q}.{a}.to_q.weight"), &[c, c]);
            b.t(format!("{q}.{a}.to_k.weight"), &[c, kv]);
            b.t(format!("{q}.{a}.to_v.weight"), &[c, kv]);
            b.wb(&format!("{q}.{a}.to_out.0"), &[c, c]);
        }
        b.wb(&format!("{q}.ff.net.0.proj"), &[8 * c, c]);
        b.wb(&format!("{q}.ff.net.2"), &[c, 4 * c]);
        for n in ["norm1", "norm2", "norm3"] {
            b.norm(&format!("{q}.{n}"), c);
        }
    }
    b.wb(&format!("{p}.proj_out"), &proj);
}

/// The LDM (`openaimodel.py`) UNet: the same construction as the original
/// code, so block indices and channel counts match real checkpoints.
fn ldm_unet(b: &mut Builder, prefix: &str, cfg: &UnetConfig) {
    let mc = cfg.mc;
    let temb = 4 * mc;
    b.wb(&format!("{prefix}time_embed.0"), &[temb, mc]);
    b.wb(&format!("{prefix}time_embed.2"), &[temb, temb]);
    if let Some(adm) = cfg.adm {
        b.wb(&format!("{prefix}label_emb.0.0"), &[temb, adm]);
        b.wb(&format!("{prefix}label_emb.0.2"), &[temb, temb]);
    }
    b.wb(&format!("{prefix}input_blocks.0.0"), &[mc, 4, 3, 3]);
    let mut chans = vec![mc];
    let mut ch = mc;
    let mut block = 1;
    let levels = cfg.mult.len();
    for (level, &m) in cfg.mult.iter().enumerate() {
        for _ in 0..cfg.nres {
            let p = format!("{prefix}input_blocks.{block}");
            unet_res(b, &format!("{p}.0"), ch, m * mc, temb);
            ch = m * mc;
            if cfg.depth[level] > 0 {
                unet_attn(
                    b,
                    &format!("{p}.1"),
                    ch,
                    cfg.depth[level],
                    cfg.ctx,
                    cfg.linear_proj,
                );
            }
            chans.push(ch);
            block += 1;
        }
        if level + 1 != levels {
            b.wb(
                &format!("{prefix}input_blocks.{block}.0.op"),
                &[ch, ch, 3, 3],
            );
            chans.push(ch);
            block += 1;
        }
    }
    unet_res(b, &format!("{prefix}middle_block.0"), ch, ch, temb);
    unet_attn(
        b,
        &format!("{prefix}middle_block.1"),
        ch,
        cfg.depth_mid,
        cfg.ctx,
        cfg.linear_proj,
    );
    unet_res(b, &format!("{prefix}middle_block.2"), ch, ch, temb);
    let mut block = 0;
    for level in (0..levels).rev() {
        let m = cfg.mult[level];
        for i in 0..=cfg.nres {
            let ich = chans.pop().unwrap_or(mc);
            let p = format!("{prefix}output_blocks.{block}");
            unet_res(b, &format!("{p}.0"), ch + ich, m * mc, temb);
            ch = m * mc;
            let mut idx = 1;
            if cfg.depth[level] > 0 {
                unet_attn(
                    b,
                    &format!("{p}.1"),
                    ch,
                    cfg.depth[level],
                    cfg.ctx,
                    cfg.linear_proj,
                );
                idx += 1;
            }
            if level > 0 && i == cfg.nres {
                b.wb(&format!("{p}.{idx}.conv"), &[ch, ch, 3, 3]);
            }
            block += 1;
        }
    }
    b.norm(&format!("{prefix}out.0"), mc);
    b.wb(&format!("{prefix}out.2"), &[4, mc, 3, 3]);
}

fn vae_res(b: &mut Builder, p: &str, cin: u64, cout: u64) {
    b.norm(&format!("{p}.norm1"), cin);
    b.wb(&format!("{p}.conv1"), &[cout, cin, 3, 3]);
    b.norm(&format!("{p}.norm2"), cout);
    b.wb(&format!("{p}.conv2"), &[cout, cout, 3, 3]);
    if cin != cout {
        b.wb(&format!("{p}.nin_shortcut"), &[cout, cin, 1, 1]);
    }
}

fn vae_mid(b: &mut Builder, p: &str, c: u64) {
    vae_res(b, &format!("{p}.block_1"), c, c);
    b.norm(&format!("{p}.attn_1.norm"), c);
    for n in ["q", "k", "v", "proj_out"] {
        b.wb(&format!("{p}.attn_1.{n}"), &[c, c, 1, 1]);
    }
    vae_res(b, &format!("{p}.block_2"), c, c);
}

/// The LDM autoencoder (`first_stage_model.`) of SD 1.5 / SDXL.
fn ldm_vae(b: &mut Builder, prefix: &str) {
    let ch = b.w(128);
    let mult = [1u64, 2, 4, 4];
    let z = 4;
    b.wb(&format!("{prefix}encoder.conv_in"), &[ch, 3, 3, 3]);
    let mut cin = ch;
    for (i, &m) in mult.iter().enumerate() {
        let cout = ch * m;
        for j in 0..2 {
            vae_res(b, &format!("{prefix}encoder.down.{i}.block.{j}"), cin, cout);
            cin = cout;
        }
        if i + 1 != mult.len() {
            b.wb(
                &format!("{prefix}encoder.down.{i}.downsample.conv"),
                &[cin, cin, 3, 3],
            );
        }
    }
    vae_mid(b, &format!("{prefix}encoder.mid"), cin);
    b.norm(&format!("{prefix}encoder.norm_out"), cin);
    b.wb(&format!("{prefix}encoder.conv_out"), &[2 * z, cin, 3, 3]);
    b.wb(&format!("{prefix}quant_conv"), &[2 * z, 2 * z, 1, 1]);
    b.wb(&format!("{prefix}post_quant_conv"), &[z, z, 1, 1]);
    let mut cin = ch * mult[mult.len() - 1];
    b.wb(&format!("{prefix}decoder.conv_in"), &[cin, z, 3, 3]);
    vae_mid(b, &format!("{prefix}decoder.mid"), cin);
    for i in (0..mult.len()).rev() {
        let cout = ch * mult[i];
        for j in 0..3 {
            vae_res(b, &format!("{prefix}decoder.up.{i}.block.{j}"), cin, cout);
            cin = cout;
        }
        if i != 0 {
            b.wb(
                &format!("{prefix}decoder.up.{i}.upsample.conv"),
                &[cin, cin, 3, 3],
            );
        }
    }
    b.norm(&format!("{prefix}decoder.norm_out"), cin);
    b.wb(&format!("{prefix}decoder.conv_out"), &[3, cin, 3, 3]);
}

/// A Hugging Face `CLIPTextModel` (`text_model.`), as CLIP-L (d = 768,
/// 12 layers) or with projection.
fn hf_clip(b: &mut Builder, prefix: &str, d_full: u64, layers: usize, mlp_full: u64) {
    let d = b.w(d_full);
    let mlp = b.w(mlp_full);
    let vocab = b.w(49408);
    let p = format!("{prefix}text_model");
    b.t(
        format!("{p}.embeddings.token_embedding.weight"),
        &[vocab, d],
    );
    b.t(
        format!("{p}.embeddings.position_embedding.weight"),
        &[77, d],
    );
    for i in 0..layers {
        let l = format!("{p}.encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            b.wb(&format!("{l}.self_attn.{n}"), &[d, d]);
        }
        b.norm(&format!("{l}.layer_norm1"), d);
        b.wb(&format!("{l}.mlp.fc1"), &[mlp, d]);
        b.wb(&format!("{l}.mlp.fc2"), &[d, mlp]);
        b.norm(&format!("{l}.layer_norm2"), d);
    }
    b.norm(&format!("{p}.final_layer_norm"), d);
}

/// OpenCLIP ViT-bigG text tower as stored in SDXL checkpoints.
fn open_clip_big_g(b: &mut Builder, prefix: &str) {
    let d = b.w(1280);
    let mlp = b.w(5120);
    let vocab = b.w(49408);
    b.t(format!("{prefix}token_embedding.weight"), &[vocab, d]);
    b.t(format!("{prefix}positional_embedding"), &[77, d]);
    for i in 0..32 {
        let l = format!("{prefix}transformer.resblocks.{i}");
        b.t(format!("{l}.attn.in_proj_weight"), &[3 * d, d]);
        b.t(format!("{l}.attn.in_proj_bias"), &[3 * d]);
        b.wb(&format!("{l}.attn.out_proj"), &[d, d]);
        b.norm(&format!("{l}.ln_1"), d);
        b.wb(&format!("{l}.mlp.c_fc"), &[mlp, d]);
        b.wb(&format!("{l}.mlp.c_proj"), &[d, mlp]);
        b.norm(&format!("{l}.ln_2"), d);
    }
    b.norm(&format!("{prefix}ln_final"), d);
    b.t(format!("{prefix}text_projection"), &[d, d]);
    b.t(format!("{prefix}logit_scale"), &[]);
}

/// T5 v1.1 XXL encoder (`encoder.block.N`).
fn t5_xxl(b: &mut Builder, prefix: &str) {
    let d = b.w(4096);
    let ff = b.w(10240);
    let vocab = b.w(32128);
    b.t(format!("{prefix}shared.weight"), &[vocab, d]);
    for i in 0..24 {
        let l = format!("{prefix}encoder.block.{i}");
        for n in ["q", "k", "v", "o"] {
            b.t(format!("{l}.layer.0.SelfAttention.{n}.weight"), &[d, d]);
        }
        if i == 0 {
            b.t(
                format!("{l}.layer.0.SelfAttention.relative_attention_bias.weight"),
                &[32, 64],
            );
        }
        b.t(format!("{l}.layer.0.layer_norm.weight"), &[d]);
        b.t(format!("{l}.layer.1.DenseReluDense.wi_0.weight"), &[ff, d]);
        b.t(format!("{l}.layer.1.DenseReluDense.wi_1.weight"), &[ff, d]);
        b.t(format!("{l}.layer.1.DenseReluDense.wo.weight"), &[d, ff]);
        b.t(format!("{l}.layer.1.layer_norm.weight"), &[d]);
    }
    b.t(format!("{prefix}encoder.final_layer_norm.weight"), &[d]);
}

/// FLUX.1-dev transformer in BFL naming.
fn flux_bfl(b: &mut Builder, prefix: &str) {
    let h = b.w(3072);
    let mlp = 4 * h;
    let head = b.w(128);
    let ctx = b.w(4096);
    let vec_in = b.w(768);
    b.wb(&format!("{prefix}img_in"), &[h, 64]);
    b.wb(&format!("{prefix}time_in.in_layer"), &[h, 256]);
    b.wb(&format!("{prefix}time_in.out_layer"), &[h, h]);
    b.wb(&format!("{prefix}vector_in.in_layer"), &[h, vec_in]);
    b.wb(&format!("{prefix}vector_in.out_layer"), &[h, h]);
    b.wb(&format!("{prefix}guidance_in.in_layer"), &[h, 256]);
    b.wb(&format!("{prefix}guidance_in.out_layer"), &[h, h]);
    b.wb(&format!("{prefix}txt_in"), &[h, ctx]);
    for i in 0..19 {
        let p = format!("{prefix}double_blocks.{i}");
        for s in ["img", "txt"] {
            b.wb(&format!("{p}.{s}_mod.lin"), &[6 * h, h]);
            b.wb(&format!("{p}.{s}_attn.qkv"), &[3 * h, h]);
            b.t(format!("{p}.{s}_attn.norm.query_norm.scale"), &[head]);
            b.t(format!("{p}.{s}_attn.norm.key_norm.scale"), &[head]);
            b.wb(&format!("{p}.{s}_attn.proj"), &[h, h]);
            b.wb(&format!("{p}.{s}_mlp.0"), &[mlp, h]);
            b.wb(&format!("{p}.{s}_mlp.2"), &[h, mlp]);
        }
    }
    for i in 0..38 {
        let p = format!("{prefix}single_blocks.{i}");
        b.wb(&format!("{p}.linear1"), &[3 * h + mlp, h]);
        b.wb(&format!("{p}.linear2"), &[h, h + mlp]);
        b.t(format!("{p}.norm.query_norm.scale"), &[head]);
        b.t(format!("{p}.norm.key_norm.scale"), &[head]);
        b.wb(&format!("{p}.modulation.lin"), &[3 * h, h]);
    }
    b.wb(
        &format!("{prefix}final_layer.adaLN_modulation.1"),
        &[2 * h, h],
    );
    b.wb(&format!("{prefix}final_layer.linear"), &[64, h]);
}

/// Names, dtypes and shapes of a preset's checkpoint, in the order they
/// would be written. Full size (`scale` 1) reproduces the real shapes.
pub fn preset_specs(preset: Preset, opts: &PresetOptions) -> Vec<TensorSpec> {
    let mut b = Builder {
        dtype: opts.dtype,
        scale: opts.scale.max(1),
        out: Vec::new(),
    };
    match preset {
        Preset::Sd15 => {
            let cfg = UnetConfig {
                mc: b.w(320),
                mult: &[1, 2, 4, 4],
                nres: 2,
                depth: &[1, 1, 1, 0],
                depth_mid: 1,
                ctx: b.w(768),
                linear_proj: false,
                adm: None,
            };
            ldm_unet(&mut b, "model.diffusion_model.", &cfg);
            if opts.text_encoders {
                hf_clip(&mut b, "cond_stage_model.transformer.", 768, 12, 3072);
            }
            if opts.vae {
                ldm_vae(&mut b, "first_stage_model.");
            }
        }
        Preset::Sdxl => {
            let cfg = UnetConfig {
                mc: b.w(320),
                mult: &[1, 2, 4],
                nres: 2,
                depth: &[0, 2, 10],
                depth_mid: 10,
                ctx: b.w(2048),
                linear_proj: true,
                adm: Some(b.w(2816)),
            };
            ldm_unet(&mut b, "model.diffusion_model.", &cfg);
            if opts.text_encoders {
                hf_clip(
                    &mut b,
                    "conditioner.embedders.0.transformer.",
                    768,
                    12,
                    3072,
                );
                open_clip_big_g(&mut b, "conditioner.embedders.1.model.");
            }
            if opts.vae {
                ldm_vae(&mut b, "first_stage_model.");
            }
        }
        Preset::Flux => {
            flux_bfl(&mut b, "");
            if opts.text_encoders {
                hf_clip(&mut b, "text_encoders.clip_l.transformer.", 768, 12, 3072);
                t5_xxl(&mut b, "text_encoders.t5xxl.transformer.");
            }
        }
    }
    b.out
}

/// LoRA naming conventions [`lora_specs`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraConvention {
    /// kohya-ss: `lora_unet_<flattened path>.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`. SD 1.x paths are diffusers paths (as
    /// sd-scripts names them), SDXL paths LDM paths, FLUX paths BFL paths.
    Kohya,
    /// diffusers/peft: `unet.<diffusers path>.lora_A.weight` /
    /// `.lora_B.weight` for UNets, `transformer.<diffusers path>...` for
    /// FLUX (whose `to_q`/`to_k`/`to_v`/`proj_mlp` are row slices of BFL's
    /// fused weights). No alpha tensors (scale 1).
    Peft,
}

impl LoraConvention {
    /// Parses `kohya` or `peft`.
    pub fn from_name(name: &str) -> Option<LoraConvention> {
        match name {
            "kohya" => Some(LoraConvention::Kohya),
            "peft" => Some(LoraConvention::Peft),
            _ => None,
        }
    }
}

/// Options for [`lora_specs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraOptions {
    /// Naming convention.
    pub convention: LoraConvention,
    /// Rank of every adapter.
    pub rank: u64,
    /// Dtype of the factors (and alphas).
    pub dtype: Dtype,
}

/// Modules of a UNet attention block that LoRA trainers adapt.
fn unet_lora_module(m: &str) -> bool {
    let leaf = [
        ".attn1.to_q",
        ".attn1.to_k",
        ".attn1.to_v",
        ".attn1.to_out.0",
        ".attn2.to_q",
        ".attn2.to_k",
        ".attn2.to_v",
        ".attn2.to_out.0",
        ".ff.net.0.proj",
        ".ff.net.2",
        ".proj_in",
        ".proj_out",
    ];
    leaf.iter().any(|l| m.ends_with(l))
        && (m.contains(".transformer_blocks.")
            || m.ends_with(".proj_in")
            || m.ends_with(".proj_out"))
}

/// Modules of a BFL FLUX transformer that LoRA trainers adapt.
fn flux_lora_module(m: &str) -> bool {
    let s: Vec<&str> = m.split('.').collect();
    matches!(
        s.as_slice(),
        ["double_blocks", _, "img_attn" | "txt_attn", "qkv" | "proj"]
            | ["double_blocks", _, "img_mlp" | "txt_mlp", "0" | "2"]
            | ["double_blocks", _, "img_mod" | "txt_mod", "lin"]
            | ["single_blocks", _, "linear1" | "linear2"]
            | ["single_blocks", _, "modulation", "lin"]
    )
}

/// Names, dtypes and shapes of a synthetic LoRA over the denoiser of a
/// model (the specs of a preset, or any LDM UNet / BFL FLUX checkpoint):
/// every attention and feed-forward projection of a UNet's transformer
/// blocks and its `proj_in`/`proj_out`, or every linear of FLUX's double
/// and single blocks. Kohya files get an `.alpha` per module (its value is
/// [`write_lora`]'s); peft files have none. Empty if the model has no
/// denoiser of those kinds.
pub fn lora_specs(model: &[TensorSpec], opts: &LoraOptions) -> Vec<TensorSpec> {
    use crate::lora::{flux_bfl_to_diffusers, ldm_unet_to_diffusers};
    let r = opts.rank.max(1);
    let sdxl = model.iter().any(|s| s.name.contains("label_emb."));
    let mut out = Vec::new();
    let mut push = |key: String, rows: u64, shape: &[u64]| {
        // down [r, in, kh, kw] / up [rows, r, 1, 1] for convs, 2-D otherwise.
        let (down, up): (Vec<u64>, Vec<u64>) = if shape.len() == 4 {
            (vec![r, shape[1], shape[2], shape[3]], vec![rows, r, 1, 1])
        } else {
            let cols = shape[1..]
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .unwrap_or(u64::MAX);
            (vec![r, cols], vec![rows, r])
        };
        match opts.convention {
            LoraConvention::Kohya => {
                out.push(TensorSpec::new(format!("{key}.alpha"), opts.dtype, &[]));
                out.push(TensorSpec::new(
                    format!("{key}.lora_down.weight"),
                    opts.dtype,
                    &down,
                ));
                out.push(TensorSpec::new(
                    format!("{key}.lora_up.weight"),
                    opts.dtype,
                    &up,
                ));
            }
            LoraConvention::Peft => {
                out.push(TensorSpec::new(
                    format!("{key}.lora_A.weight"),
                    opts.dtype,
                    &down,
                ));
                out.push(TensorSpec::new(
                    format!("{key}.lora_B.weight"),
                    opts.dtype,
                    &up,
                ));
            }
        }
    };
    for s in model {
        let Some(m) = s.name.strip_suffix(".weight") else {
            continue;
        };
        if s.shape.len() < 2 {
            continue;
        }
        if let Some(m) = m.strip_prefix("model.diffusion_model.") {
            if !unet_lora_module(m) {
                continue;
            }
            let Some(d) = ldm_unet_to_diffusers(m) else {
                continue;
            };
            let key = match (opts.convention, sdxl) {
                (LoraConvention::Kohya, true) => format!("lora_unet_{}", m.replace('.', "_")),
                (LoraConvention::Kohya, false) => format!("lora_unet_{}", d.replace('.', "_")),
                (LoraConvention::Peft, _) => format!("unet.{d}"),
            };
            push(key, s.shape[0], &s.shape);
        } else if flux_lora_module(m) {
            match opts.convention {
                LoraConvention::Kohya => push(
                    format!("lora_unet_{}", m.replace('.', "_")),
                    s.shape[0],
                    &s.shape,
                ),
                LoraConvention::Peft => {
                    for (d, rows) in flux_bfl_to_diffusers(m, &s.shape) {
                        let n = rows.map_or(s.shape[0], |r| r.end - r.start);
                        push(format!("transformer.{d}"), n, &s.shape);
                    }
                }
            }
        }
    }
    out
}

/// Writes a LoRA file from specs (such as [`lora_specs`]'): every `.alpha`
/// tensor holds `alpha`, every other tensor deterministic values from
/// `seed` ([`fill_deterministic`]).
pub fn write_lora(
    path: impl AsRef<Path>,
    specs: &[TensorSpec],
    alpha: f32,
    seed: u64,
) -> Result<()> {
    write_with(path, specs, &BTreeMap::new(), |s, dst| {
        if s.name.ends_with(".alpha") && s.dtype.is_float() {
            let n = dst.len() / s.dtype.size_in_bytes().max(1);
            if let Ok(bytes) = from_f32_slice(&vec![alpha; n], s.dtype) {
                dst.copy_from_slice(&bytes);
            }
        } else {
            fill_deterministic(seed, s, dst);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::SafetensorsFile;

    #[test]
    fn splitmix_known_values() {
        // Reference values of SplitMix64 seeded with 0.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut r = SplitMix64(7);
        for _ in 0..1000 {
            let v = r.next_f32();
            assert!((-1.0..1.0).contains(&v));
        }
    }

    /// A folder of one test's own, removed with what is in it when dropped
    /// (the tests of this module used to leave one folder a run behind).
    struct TmpDir(std::path::PathBuf);

    impl TmpDir {
        fn new(test: &str) -> TmpDir {
            let dir = std::env::temp_dir().join(format!(
                "offload-loader-synth-{}-{test}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TmpDir(dir)
        }

        fn join(&self, name: &str) -> std::path::PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn write_and_read_back() {
        let dir = TmpDir::new("write_and_read_back");
        let path = dir.join("rt.safetensors");
        let specs = vec![
            TensorSpec::new("a.weight", Dtype::F16, &[3, 5]),
            TensorSpec::new("b", Dtype::F32, &[]),
            TensorSpec::new("c", Dtype::BF16, &[7]),
            TensorSpec::new("empty", Dtype::U8, &[0, 4]),
            TensorSpec::new("flag", Dtype::Bool, &[3]),
        ];
        let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_deterministic(&path, &specs, &md, 42).unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.metadata(), &md);
        assert_eq!(f.header().header_len % 8, 0);
        assert_eq!(f.tensors().len(), 5);
        for s in &specs {
            let t = f.tensor(&s.name).unwrap();
            assert_eq!((t.dtype, &t.shape), (s.dtype, &s.shape));
            assert_eq!(
                f.read_tensor_vec(&s.name).unwrap(),
                deterministic_bytes(42, s)
            );
        }
        // 30 + 4 + 14 + 0 + 3 data bytes, back to back.
        assert_eq!(f.file_len(), 8 + f.header().header_len + 51);
        let vals =
            crate::dtype::to_f32_vec(&f.read_tensor_vec("a.weight").unwrap(), Dtype::F16).unwrap();
        assert_eq!(vals.len(), 15);
        assert!(vals.iter().all(|v| v.abs() <= AMPLITUDE));
        // Same seed, same name → same bytes; different seed → different.
        assert_ne!(
            deterministic_bytes(43, &specs[0]),
            deterministic_bytes(42, &specs[0])
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn writer_rejects_bad_input() {
        let dir = TmpDir::new("writer_rejects_bad_input");
        let path = dir.join("bad.safetensors");
        let dup = vec![
            TensorSpec::new("a", Dtype::F16, &[1]),
            TensorSpec::new("a", Dtype::F16, &[1]),
        ];
        assert!(matches!(
            write_deterministic(&path, &dup, &BTreeMap::new(), 0),
            Err(LoaderError::Write { tensor, .. }) if tensor == "a"
        ));
        let wrong_len = vec![(TensorSpec::new("x", Dtype::F32, &[2]), vec![0u8; 7])];
        assert!(matches!(
            write_tensors(&path, &wrong_len, &BTreeMap::new()),
            Err(LoaderError::Write { tensor, .. }) if tensor == "x"
        ));
    }

    fn total(specs: &[TensorSpec], prefix: &str) -> (usize, u64) {
        let sel: Vec<&TensorSpec> = specs
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect();
        (
            sel.len(),
            sel.iter().map(|s| s.byte_len().unwrap() / 2).sum(),
        )
    }

    #[test]
    fn full_size_presets_match_published_counts() {
        let opts = PresetOptions::default();
        let sd15 = preset_specs(Preset::Sd15, &opts);
        // Published parameter counts: SD 1.5 UNet 859,520,964; CLIP-L text
        // 123,060,480 (without position_ids); VAE 83,653,863.
        assert_eq!(total(&sd15, "model.diffusion_model."), (686, 859_520_964));
        assert_eq!(total(&sd15, "cond_stage_model.").1, 123_060_480);
        assert_eq!(total(&sd15, "first_stage_model."), (248, 83_653_863));
        let sdxl = preset_specs(Preset::Sdxl, &opts);
        // SDXL base UNet: 2,567,463,684 parameters in 1680 tensors.
        assert_eq!(
            total(&sdxl, "model.diffusion_model."),
            (1680, 2_567_463_684)
        );
        // OpenCLIP bigG text tower: 694,659,841 parameters.
        assert_eq!(total(&sdxl, "conditioner.embedders.1.").1, 694_659_841);
        let flux = preset_specs(
            Preset::Flux,
            &PresetOptions {
                text_encoders: false,
                ..opts
            },
        );
        // FLUX.1-dev transformer: 11,901,408,320 parameters, 780 tensors.
        assert_eq!(total(&flux, ""), (780, 11_901_408_320));
    }
}
