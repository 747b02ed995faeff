//! `offload synth`: synthetic checkpoints and LoRA files.
//!
//! `offload synth PRESET -o DIR` writes `DIR/PRESET.safetensors`, a
//! single-file checkpoint with the real tensor names and shapes of the
//! preset (widths divided by `--scale`) and deterministic values from
//! `--seed`. With `--lora-rank R` it also writes a LoRA over every
//! attention and feed-forward projection of the denoiser: a kohya LoRA as
//! `DIR/PRESET-lora-kohya-rR.safetensors` (alpha in its `.alpha` tensors),
//! a peft LoRA as a peft adapter folder `DIR/PRESET-lora-peft-rR/` holding
//! `adapter_model.safetensors` and `adapter_config.json` (peft LoRA files
//! carry no alpha tensors; the config gives `r` and `lora_alpha`, so each
//! LoRA has its own config and several can share `DIR`). `offload inspect`
//! takes either the folder or the file in it. Existing files of those
//! names are replaced.
//!
//! The checkpoint's `__metadata__` records how it was made
//! (`offload.synth.preset`, `.scale`, `.dtype`, `.seed`, and for a LoRA
//! `.lora_convention`, `.lora_rank`, `.lora_alpha`).
//!
//! Writes of more than [`PROGRESS_MIN_BYTES`] show a progress bar on stderr
//! when stderr is a terminal, and nothing otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use offload_loader::dtype::from_f32_slice;
use offload_loader::synth::{
    fill_deterministic, lora_specs, preset_specs, write_with, LoraConvention, LoraOptions, Preset,
    PresetOptions, TensorSpec,
};
use offload_loader::Dtype;

/// Writes at least this large show a progress bar (on a terminal).
pub const PROGRESS_MIN_BYTES: u64 = 256 << 20;

/// Architectures `synth` writes (and `inspect --model-preset` lays out).
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetArg {
    /// Stable Diffusion 1.5: UNet, CLIP-L, VAE.
    Sd15,
    /// SDXL base: UNet, CLIP-L, OpenCLIP bigG, VAE.
    Sdxl,
    /// FLUX.1-dev transformer in BFL naming (text encoders with
    /// `--text-encoders`).
    Flux,
}

impl PresetArg {
    /// The loader's preset.
    pub fn preset(self) -> Preset {
        match self {
            PresetArg::Sd15 => Preset::Sd15,
            PresetArg::Sdxl => Preset::Sdxl,
            PresetArg::Flux => Preset::Flux,
        }
    }

    /// The name on the command line (`sd15`, `sdxl`, `flux`).
    pub fn name(self) -> &'static str {
        match self {
            PresetArg::Sd15 => "sd15",
            PresetArg::Sdxl => "sdxl",
            PresetArg::Flux => "flux",
        }
    }
}

/// Element types `synth` writes.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtypeArg {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// IEEE binary32.
    F32,
}

impl DtypeArg {
    /// The loader's dtype.
    pub fn dtype(self) -> Dtype {
        match self {
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::BF16,
            DtypeArg::F32 => Dtype::F32,
        }
    }
}

/// LoRA naming conventions `synth` writes.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConventionArg {
    /// kohya-ss: `lora_unet_….lora_down.weight` / `.lora_up.weight` /
    /// `.alpha`.
    Kohya,
    /// diffusers/peft: `unet.….lora_A.weight` / `.lora_B.weight`, no alpha
    /// tensors.
    Peft,
}

impl ConventionArg {
    fn convention(self) -> LoraConvention {
        match self {
            ConventionArg::Kohya => LoraConvention::Kohya,
            ConventionArg::Peft => LoraConvention::Peft,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ConventionArg::Kohya => "kohya",
            ConventionArg::Peft => "peft",
        }
    }
}

/// Arguments of `offload synth`.
#[derive(Args, Debug, Clone)]
pub struct SynthArgs {
    /// Architecture to reproduce.
    #[arg(value_enum)]
    pub preset: PresetArg,
    /// Width divisor: every channel and hidden width is divided by it
    /// (block counts and names stay); 1 writes the full-size model.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub scale: u64,
    /// Seed of the deterministic tensor values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Element type of every tensor (LoRA factors included).
    #[arg(long, value_enum, default_value_t = DtypeArg::F16)]
    pub dtype: DtypeArg,
    /// flux: include the CLIP-L and T5-XXL text encoders
    /// (`text_encoders.clip_l.`, `text_encoders.t5xxl.`). sd15 and sdxl
    /// checkpoints always include theirs.
    #[arg(long)]
    pub text_encoders: bool,
    /// Also write a LoRA of this rank over the denoiser's attention and
    /// feed-forward projections.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub lora_rank: Option<u64>,
    /// Naming convention of the LoRA (default: kohya).
    #[arg(long, value_enum, value_name = "CONVENTION", requires = "lora_rank")]
    pub lora_convention: Option<ConventionArg>,
    /// LoRA alpha (default: the rank, so the scale is 1). kohya: the value
    /// of every `.alpha` tensor; peft: `lora_alpha` in the
    /// `adapter_config.json` of the LoRA's adapter folder.
    #[arg(long, value_name = "A", requires = "lora_rank")]
    pub lora_alpha: Option<f32>,
    /// Output folder (created if missing): gets `PRESET.safetensors` and,
    /// with `--lora-rank`, `PRESET-lora-kohya-rR.safetensors` or the peft
    /// adapter folder `PRESET-lora-peft-rR/`.
    #[arg(short = 'o', long = "out", value_name = "DIR")]
    pub out: PathBuf,
}

/// Run `offload synth`.
pub fn run(args: &SynthArgs) -> Result<(), String> {
    if let Some(a) = args.lora_alpha {
        if !a.is_finite() {
            return Err(format!("--lora-alpha {a} is not a finite number"));
        }
    }
    std::fs::create_dir_all(&args.out).map_err(|e| {
        format!(
            "{}: cannot create the output folder: {e}",
            args.out.display()
        )
    })?;
    let dtype = args.dtype.dtype();
    let opts = PresetOptions {
        scale: args.scale,
        dtype,
        text_encoders: args.preset != PresetArg::Flux || args.text_encoders,
        vae: true,
    };
    let specs = preset_specs(args.preset.preset(), &opts);
    let mut meta = BTreeMap::new();
    meta.insert(
        "offload.synth.preset".to_owned(),
        args.preset.name().to_owned(),
    );
    meta.insert("offload.synth.scale".to_owned(), args.scale.to_string());
    meta.insert("offload.synth.dtype".to_owned(), dtype.name().to_owned());
    meta.insert("offload.synth.seed".to_owned(), args.seed.to_string());
    if args.preset == PresetArg::Flux {
        meta.insert(
            "offload.synth.text_encoders".to_owned(),
            opts.text_encoders.to_string(),
        );
    }

    let model_path = args.out.join(format!("{}.safetensors", args.preset.name()));
    let seed = args.seed;
    write_file(&model_path, &specs, &meta, |s, dst| {
        fill_deterministic(seed, s, dst)
    })?;
    println!(
        "wrote {}: {} {dtype} scale {} seed {}, {} tensors, {}",
        model_path.display(),
        args.preset.name(),
        args.scale,
        args.seed,
        specs.len(),
        file_size(&model_path)?,
    );

    let Some(rank) = args.lora_rank else {
        return Ok(());
    };
    let conv = args.lora_convention.unwrap_or(ConventionArg::Kohya);
    let alpha = args.lora_alpha.unwrap_or(rank as f32);
    let lspecs = lora_specs(
        &specs,
        &LoraOptions {
            convention: conv.convention(),
            rank,
            dtype,
        },
    );
    if lspecs.is_empty() {
        return Err(format!(
            "preset {} has no denoiser modules a LoRA adapts",
            args.preset.name()
        ));
    }
    let stem = format!("{}-lora-{}-r{rank}", args.preset.name(), conv.name());
    let lora_path = match conv {
        ConventionArg::Kohya => args.out.join(format!("{stem}.safetensors")),
        ConventionArg::Peft => {
            // peft's layout: one folder per adapter, the weights beside
            // the config that gives their alpha.
            let dir = args.out.join(&stem);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("{}: cannot create the adapter folder: {e}", dir.display()))?;
            dir.join("adapter_model.safetensors")
        }
    };
    meta.insert(
        "offload.synth.lora_convention".to_owned(),
        conv.name().to_owned(),
    );
    meta.insert("offload.synth.lora_rank".to_owned(), rank.to_string());
    meta.insert("offload.synth.lora_alpha".to_owned(), alpha.to_string());
    // The contents `synth::write_lora` gives (every `.alpha` tensor holds
    // alpha, every factor deterministic values), written here with the
    // metadata and the progress bar.
    let mut alpha_err = None;
    write_file(&lora_path, &lspecs, &meta, |s, dst| {
        if s.name.ends_with(".alpha") && s.dtype.is_float() {
            let n = dst.len() / s.dtype.size_in_bytes().max(1);
            match from_f32_slice(&vec![alpha; n], s.dtype) {
                Ok(b) if b.len() == dst.len() => dst.copy_from_slice(&b),
                Ok(_) => alpha_err = Some(format!("`{}`: alpha encodes to a wrong size", s.name)),
                Err(e) => alpha_err = Some(e.to_string()),
            }
        } else {
            fill_deterministic(seed, s, dst);
        }
    })?;
    if let Some(e) = alpha_err {
        return Err(format!("{}: {e}", lora_path.display()));
    }
    let modules = lspecs
        .iter()
        .filter(|s| s.name.ends_with(".lora_down.weight") || s.name.ends_with(".lora_A.weight"))
        .count();
    println!(
        "wrote {}: {} LoRA rank {rank} alpha {alpha} {dtype}, {modules} modules, {} tensors, {}",
        lora_path.display(),
        conv.name(),
        lspecs.len(),
        file_size(&lora_path)?,
    );
    if conv == ConventionArg::Peft {
        let cfg_path = lora_path.with_file_name("adapter_config.json");
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha,
            "use_rslora": false,
        });
        std::fs::write(&cfg_path, format!("{cfg:#}\n"))
            .map_err(|e| format!("{}: cannot write: {e}", cfg_path.display()))?;
        println!(
            "wrote {}: peft config (r {rank}, lora_alpha {alpha})",
            cfg_path.display()
        );
    }
    Ok(())
}

/// Writes a safetensors file, with a progress bar on a terminal for large
/// writes.
fn write_file(
    path: &Path,
    specs: &[TensorSpec],
    meta: &BTreeMap<String, String>,
    mut fill: impl FnMut(&TensorSpec, &mut [u8]),
) -> Result<(), String> {
    let total: u64 = specs.iter().filter_map(TensorSpec::byte_len).sum();
    let bar = progress_bar(path, total);
    let start = Instant::now();
    let res = write_with(path, specs, meta, |s, dst| {
        fill(s, dst);
        bar.inc(dst.len() as u64);
    });
    bar.finish_and_clear();
    res.map_err(|e| e.to_string())?;
    if total >= PROGRESS_MIN_BYTES && std::io::stderr().is_terminal() {
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "{}: {} in {secs:.1} s ({:.0} MiB/s)",
            path.display(),
            human_bytes(total),
            total as f64 / (1u64 << 20) as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

/// A byte progress bar on stderr, hidden for small writes and when stderr
/// is not a terminal.
fn progress_bar(path: &Path, total: u64) -> ProgressBar {
    if total < PROGRESS_MIN_BYTES || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:32}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    bar.set_message(format!("writing {name}"));
    bar
}

/// The size of a written file, as `1.23 GiB (1,318,000,000 bytes)`.
fn file_size(path: &Path) -> Result<String, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: cannot stat the written file: {e}", path.display()))?
        .len();
    Ok(format!("{} ({len} bytes)", human_bytes(len)))
}

/// Bytes in binary units with three significant digits (`512 B`,
/// `2.34 MiB`, `6.46 GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(2_450_590), "2.34 MiB");
        assert_eq!(human_bytes(150 << 20), "150 MiB");
        assert_eq!(human_bytes(u64::MAX), "16777216 TiB");
    }
}
