//! Tests of `offload merge`, run through the built binary on small
//! synthetic SDXL and FLUX checkpoints and LoRAs (kohya and peft).
//!
//! Every merged weight is checked against a reference computed here in
//! f64 from the bytes of the input files (`W + Σ s·B·A`, decoded by this
//! file's own f16/bf16/f32 decoders), within one unit in the last place of
//! the stored dtype relative to `|W| + Σ |s|·|B|·|A|`. Every other tensor
//! must be byte-identical to the input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use offload_loader::lora::{flux_bfl_to_diffusers, ldm_unet_to_diffusers};
use offload_loader::synth::{
    lora_specs, preset_specs, write_deterministic, write_lora, LoraConvention, LoraOptions, Preset,
    PresetOptions, TensorSpec,
};
use offload_loader::{Dtype, SafetensorsFile};
use serde_json::{json, Value};

fn offload(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_offload"))
        .args(args)
        .output()
        .expect("run the offload binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `offload ARGS`, expects success, returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let o = offload(args);
    assert!(
        o.status.success(),
        "offload {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    (text(&o.stdout), text(&o.stderr))
}

/// Runs `offload ARGS`, expects a clean failure, returns stderr.
fn fails(args: &[&str]) -> String {
    let o = offload(args);
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "offload {} should have failed:\nstdout:\n{}\nstderr:\n{err}",
        args.join(" "),
        text(&o.stdout)
    );
    assert!(
        !err.contains("panicked"),
        "offload {} panicked:\n{err}",
        args.join(" ")
    );
    err
}

/// A fresh temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("offload-merge-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }

    /// The names in the folder, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ------------------------------------------------------------ decoding

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let man = f64::from(h & 0x3ff);
    sign * match exp {
        0 => man * 2f64.powi(-24),
        31 if man == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1024.0 + man) * 2f64.powi(e - 25),
    }
}

/// Decodes little-endian F32/F16/BF16 bytes to f64 (exactly).
fn decode(dtype: Dtype, b: &[u8]) -> Vec<f64> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| {
                f64::from(f32::from_bits(
                    u32::from(u16::from_le_bytes([c[0], c[1]])) << 16,
                ))
            })
            .collect(),
        d => panic!("no decoder for {d}"),
    }
}

#[test]
fn decoders_agree_with_known_values() {
    assert_eq!(f16_to_f64(0x3c00), 1.0);
    assert_eq!(f16_to_f64(0xc000), -2.0);
    assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    assert_eq!(f16_to_f64(0x7bff), 65504.0);
    assert_eq!(decode(Dtype::BF16, &[0x80, 0x3f]), vec![1.0]);
    assert_eq!(decode(Dtype::F32, &1.5f32.to_le_bytes()), vec![1.5]);
}

/// The relative tolerance for a weight of dtype `d` merged with adapters of
/// total rank `k`: one unit in the last place for f16 and bf16 (the f32
/// accumulation's error, at most (k + 2)·2⁻²⁴, is far below it); for f32
/// weights, whose rounding is as fine as the accumulation's, the
/// accumulation bound itself: k products summed, the scale folded in, `W`
/// added, each rounded to f32.
fn tol(d: Dtype, k: usize) -> f64 {
    match d {
        Dtype::F16 => 2f64.powi(-10),
        Dtype::BF16 => 2f64.powi(-7),
        Dtype::F32 => (k as f64 + 2.0) * 2f64.powi(-24),
        d => panic!("{d} is not merged"),
    }
}

/// Half the smallest subnormal: the absolute floor of rounding near 0.
fn floor(d: Dtype) -> f64 {
    match d {
        Dtype::F16 => 2f64.powi(-25),
        Dtype::BF16 => 2f64.powi(-134),
        _ => 2f64.powi(-150),
    }
}

// ------------------------------------------------------------- inputs

/// A LoRA written for a test, and what the reference needs to know.
struct LoraCase {
    /// The weights file.
    file: PathBuf,
    /// The `--lora` argument.
    arg: String,
    /// The name the metadata records.
    recorded_name: String,
    convention: LoraConvention,
    /// multiplier · alpha / rank, with the multiplier rounded to f32 as
    /// the resolver carries it (`ResolveOptions::multiplier`).
    scale: f64,
    multiplier: f64,
    /// Modules written (matching ones only).
    modules: usize,
    /// Modules that match nothing.
    stray: usize,
}

/// The module key of a LoRA tensor name.
fn module_key(name: &str) -> &str {
    for suf in [
        ".alpha",
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_A.weight",
        ".lora_B.weight",
    ] {
        if let Some(k) = name.strip_suffix(suf) {
            return k;
        }
    }
    panic!("not a LoRA tensor: {name}")
}

/// LoRA specs over `model`, keeping the modules `keep` accepts.
fn lora_subset(
    model: &[TensorSpec],
    convention: LoraConvention,
    rank: u64,
    dtype: Dtype,
    keep: impl Fn(usize) -> bool,
) -> (Vec<TensorSpec>, usize) {
    let all = lora_specs(
        model,
        &LoraOptions {
            convention,
            rank,
            dtype,
        },
    );
    let mut keys: Vec<&str> = all.iter().map(|t| module_key(&t.name)).collect();
    keys.dedup();
    let kept: HashSet<&str> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| keep(*i))
        .map(|(_, k)| *k)
        .collect();
    let specs: Vec<TensorSpec> = all
        .iter()
        .filter(|t| kept.contains(module_key(&t.name)))
        .cloned()
        .collect();
    (specs, kept.len())
}

/// The LoRA module keys (and row slices) a model weight is adapted
/// through: SDXL kohya keys flatten the LDM path, peft keys are diffusers
/// paths (for FLUX, row slices of BFL's fused weights).
fn lora_keys(name: &str, shape: &[u64], conv: LoraConvention) -> Vec<(String, Option<Range<u64>>)> {
    let Some(m) = name.strip_suffix(".weight") else {
        return Vec::new();
    };
    match (m.strip_prefix("model.diffusion_model."), conv) {
        (Some(u), LoraConvention::Kohya) => {
            vec![(format!("lora_unet_{}", u.replace('.', "_")), None)]
        }
        (Some(u), LoraConvention::Peft) => ldm_unet_to_diffusers(u)
            .map(|d| (format!("unet.{d}"), None))
            .into_iter()
            .collect(),
        (None, LoraConvention::Kohya) => vec![(format!("lora_unet_{}", m.replace('.', "_")), None)],
        (None, LoraConvention::Peft) => flux_bfl_to_diffusers(m, shape)
            .into_iter()
            .map(|(d, r)| (format!("transformer.{d}"), r))
            .collect(),
    }
}

/// One term `s · B · A` of the reference, on rows `rows` of its target.
struct Term {
    rows: Range<usize>,
    scale: f64,
    rank: usize,
    up: Vec<f64>,
    down: Vec<f64>,
}

/// What the merge must do: the terms per target tensor.
fn expected_terms(model: &[TensorSpec], loras: &[LoraCase]) -> HashMap<String, Vec<Term>> {
    let mut out: HashMap<String, Vec<Term>> = HashMap::new();
    for l in loras {
        let f = SafetensorsFile::open(&l.file).unwrap();
        let (down_suf, up_suf) = match l.convention {
            LoraConvention::Kohya => ("lora_down.weight", "lora_up.weight"),
            LoraConvention::Peft => ("lora_A.weight", "lora_B.weight"),
        };
        let mut found = 0;
        for spec in model {
            for (key, rows) in lora_keys(&spec.name, &spec.shape, l.convention) {
                let Some(down) = f.get(&format!("{key}.{down_suf}")) else {
                    continue;
                };
                let up = f.tensor(&format!("{key}.{up_suf}")).unwrap();
                let rows = rows.unwrap_or(0..spec.shape[0]);
                let rank = down.shape[0] as usize;
                let up_v = decode(up.dtype, &f.read_tensor_vec(&up.name).unwrap());
                let down_v = decode(down.dtype, &f.read_tensor_vec(&down.name).unwrap());
                assert_eq!(up_v.len(), (rows.end - rows.start) as usize * rank);
                found += 1;
                out.entry(spec.name.clone()).or_default().push(Term {
                    rows: rows.start as usize..rows.end as usize,
                    scale: l.scale,
                    rank,
                    up: up_v,
                    down: down_v,
                });
            }
        }
        assert_eq!(found, l.modules, "{}: modules found by the test", l.arg);
    }
    out
}

/// What [`check_output`] found.
#[derive(Debug, Default)]
struct Checked {
    tensors: usize,
    merged: usize,
    terms: usize,
    /// Largest |error| / allowed, per dtype.
    worst: BTreeMap<String, f64>,
}

/// Checks OUT against MODEL and the LoRAs: same tensors in the same order,
/// metadata, untouched tensors byte-identical, merged tensors within
/// tolerance of the f64 reference.
fn check_output(
    model_path: &Path,
    out_path: &Path,
    model: &[TensorSpec],
    loras: &[LoraCase],
) -> Checked {
    let inp = SafetensorsFile::open(model_path).unwrap();
    let out = SafetensorsFile::open(out_path).unwrap();
    let shape_of = |f: &SafetensorsFile| -> Vec<(String, Dtype, Vec<u64>)> {
        f.tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dtype, t.shape.clone()))
            .collect()
    };
    assert_eq!(
        shape_of(&inp),
        shape_of(&out),
        "names, dtypes, shapes, order"
    );
    // Written back to back in the input's order.
    assert_eq!(
        out.file_len(),
        out.header().data_start + inp.tensors().iter().map(|t| t.len).sum::<u64>()
    );

    // Metadata: the input's, plus the record.
    let mut md = out.metadata().clone();
    let rec = md
        .remove("offload.merged_loras")
        .expect("offload.merged_loras");
    assert_eq!(&md, inp.metadata());
    let rec: Value = serde_json::from_str(&rec).unwrap();
    let want: Vec<Value> = loras
        .iter()
        .map(|l| {
            json!({
                "file": l.recorded_name,
                "multiplier": l.multiplier,
                "adapters": l.modules,
                "skipped": l.stray,
            })
        })
        .collect();
    assert_eq!(rec, Value::Array(want));

    let terms = expected_terms(model, loras);
    let mut c = Checked::default();
    for t in inp.tensors() {
        c.tensors += 1;
        let before = inp.read_tensor_vec(&t.name).unwrap();
        let after = out.read_tensor_vec(&t.name).unwrap();
        let Some(ts) = terms.get(&t.name) else {
            assert!(before == after, "`{}` is not adapted but changed", t.name);
            continue;
        };
        c.merged += 1;
        c.terms += ts.len();
        let rows = t.shape[0] as usize;
        let cols = (t.numel() / t.shape[0]) as usize;
        let w = decode(t.dtype, &before);
        let got = decode(t.dtype, &after);
        let mut exact = w.clone();
        let mut bound: Vec<f64> = w.iter().map(|x| x.abs()).collect();
        let mut touched = vec![false; rows];
        let k: usize = ts.iter().map(|t| t.rank).sum();
        for term in ts {
            for (i, r) in term.rows.clone().enumerate() {
                touched[r] = true;
                for j in 0..cols {
                    let (mut d, mut a) = (0.0, 0.0);
                    for k in 0..term.rank {
                        let p = term.up[i * term.rank + k] * term.down[k * cols + j];
                        d += p;
                        a += p.abs();
                    }
                    exact[r * cols + j] += term.scale * d;
                    bound[r * cols + j] += term.scale.abs() * a;
                }
            }
        }
        let size = t.dtype.size_in_bytes();
        let worst = c.worst.entry(t.dtype.to_string()).or_insert(0.0);
        for (r, &touched) in touched.iter().enumerate() {
            if !touched {
                let span = r * cols * size..(r + 1) * cols * size;
                assert!(
                    before[span.clone()] == after[span],
                    "`{}` row {r} is outside every slice but changed",
                    t.name
                );
                continue;
            }
            for j in 0..cols {
                let at = r * cols + j;
                let allowed = tol(t.dtype, k) * bound[at] + floor(t.dtype);
                let err = (got[at] - exact[at]).abs();
                assert!(
                    err <= allowed,
                    "`{}` {:?} [{r}, {j}] ({}): got {:e}, reference {:e}, error {err:e} > allowed {allowed:e}",
                    t.name,
                    t.shape,
                    t.dtype,
                    got[at],
                    exact[at]
                );
                *worst = worst.max(err / allowed);
            }
        }
    }
    c
}

/// SDXL at 1/32 width, its UNet weights cycling through F16, BF16 and F32,
/// with an I64 tensor first and an FP8 tensor in the middle (neither
/// adapted).
fn sdxl_model(scale: u64) -> Vec<TensorSpec> {
    let mut specs = preset_specs(
        Preset::Sdxl,
        &PresetOptions {
            scale,
            dtype: Dtype::F16,
            text_encoders: true,
            vae: true,
        },
    );
    let mut i = 0;
    for t in specs.iter_mut() {
        if t.name.starts_with("model.diffusion_model.") {
            t.dtype = [Dtype::F16, Dtype::BF16, Dtype::F32][i % 3];
            i += 1;
        }
    }
    specs.insert(
        0,
        TensorSpec::new("extra.position_ids", Dtype::I64, &[1, 77]),
    );
    let mid = specs.len() / 2;
    specs.insert(
        mid,
        TensorSpec::new("extra.fp8_scale", Dtype::F8E4M3, &[4, 8]),
    );
    specs
}

fn model_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("modelspec.title".to_owned(), "merge test".to_owned()),
    ])
}

/// A kohya LoRA (rank 4, BF16 factors, alpha 2) over two thirds of the
/// modules plus one module that matches nothing, used with multiplier 0.7.
fn kohya_lora(dir: &TempDir, model: &[TensorSpec]) -> LoraCase {
    let (mut specs, modules) =
        lora_subset(model, LoraConvention::Kohya, 4, Dtype::BF16, |i| i % 3 != 0);
    specs.push(TensorSpec::new(
        "lora_unet_no_such_block.alpha",
        Dtype::BF16,
        &[],
    ));
    specs.push(TensorSpec::new(
        "lora_unet_no_such_block.lora_down.weight",
        Dtype::BF16,
        &[4, 8],
    ));
    specs.push(TensorSpec::new(
        "lora_unet_no_such_block.lora_up.weight",
        Dtype::BF16,
        &[8, 4],
    ));
    let file = dir.join("kohya-r4.safetensors");
    write_lora(&file, &specs, 2.0, 11).unwrap();
    LoraCase {
        arg: format!("{}:0.7", file.display()),
        recorded_name: "kohya-r4.safetensors".into(),
        file,
        convention: LoraConvention::Kohya,
        scale: f64::from(0.7f32) * 2.0 / 4.0,
        multiplier: 0.7,
        modules,
        stray: 1,
    }
}

/// A peft adapter folder (rank 8, F32 factors, `lora_alpha` 16 in its
/// config) over every other module, used with multiplier −0.5.
fn peft_lora(dir: &TempDir, model: &[TensorSpec]) -> LoraCase {
    let (specs, modules) = lora_subset(model, LoraConvention::Peft, 8, Dtype::F32, |i| i % 2 == 0);
    let folder = dir.join("peft-r8");
    fs::create_dir_all(&folder).unwrap();
    let file = folder.join("adapter_model.safetensors");
    write_lora(&file, &specs, 0.0, 12).unwrap();
    fs::write(
        folder.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#,
    )
    .unwrap();
    LoraCase {
        arg: format!("{}:-0.5", folder.display()),
        recorded_name: "peft-r8".into(),
        file,
        convention: LoraConvention::Peft,
        scale: -0.5 * 16.0 / 8.0,
        multiplier: -0.5,
        modules,
        stray: 0,
    }
}

/// Parses the summary line's counts.
fn summary_counts(stdout: &str) -> (usize, usize, usize) {
    let line = stdout.lines().last().unwrap_or_default();
    let num = |after: &str| -> usize {
        let i = line
            .find(after)
            .unwrap_or_else(|| panic!("no `{after}` in: {line}"));
        line[..i]
            .rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .unwrap()
            .parse()
            .unwrap()
    };
    (
        num(" tensors written"),
        num(" merged"),
        num(" adapters applied"),
    )
}

#[test]
fn merges_two_loras_into_sdxl() {
    let dir = TempDir::new("sdxl");
    let model = sdxl_model(32);
    let model_path = dir.join("sdxl.safetensors");
    write_deterministic(&model_path, &model, &model_metadata(), 5).unwrap();
    let kohya = kohya_lora(&dir, &model);
    let peft = peft_lora(&dir, &model);
    assert!(
        kohya.modules > 100 && peft.modules > 100,
        "{} {}",
        kohya.modules,
        peft.modules
    );
    let out = dir.join("merged.safetensors");
    let (stdout, stderr) = ok(&[
        "merge",
        s(&model_path),
        "--lora",
        &kohya.arg,
        "--lora",
        &peft.arg,
        "-o",
        s(&out),
    ]);
    let loras = [kohya, peft];
    let c = check_output(&model_path, &out, &model, &loras);
    eprintln!("{c:?}");
    assert_eq!(c.tensors, model.len());
    // Some weights get both LoRAs, some one, some none.
    assert!(c.terms > c.merged && c.merged < model.len());
    assert_eq!(c.terms, loras[0].modules + loras[1].modules);
    assert!(
        c.worst.contains_key("F16") && c.worst.contains_key("BF16") && c.worst.contains_key("F32")
    );
    assert_eq!(
        summary_counts(&stdout),
        (c.tensors, c.merged, c.terms),
        "{stdout}"
    );
    // Lenient: the stray module is a warning that names it and its file.
    assert!(
        stderr.contains("warning") && stderr.contains("lora_unet_no_such_block"),
        "{stderr}"
    );
    assert!(stderr.contains("kohya-r4.safetensors"), "{stderr}");
    assert!(stderr.contains("100%"), "progress: {stderr}");
    // Nothing but the inputs and OUT is left in the folder.
    assert_eq!(
        dir.names(),
        [
            "kohya-r4.safetensors",
            "merged.safetensors",
            "peft-r8",
            "sdxl.safetensors"
        ]
    );

    // Merging the merged checkpoint again appends to the record, and one
    // thread gives the same bytes as many.
    let again = dir.join("again.safetensors");
    ok(&[
        "merge",
        s(&out),
        "--lora",
        &loras[1].arg,
        "-o",
        s(&again),
        "--threads",
        "1",
    ]);
    let f = SafetensorsFile::open(&again).unwrap();
    let rec: Value = serde_json::from_str(&f.metadata()["offload.merged_loras"]).unwrap();
    assert_eq!(rec.as_array().unwrap().len(), 3, "{rec}");
    assert_eq!(rec[2]["file"], "peft-r8");
}

#[test]
fn merges_fused_slices_of_flux() {
    // FLUX in BFL naming: the peft LoRA adapts row slices of the fused
    // `qkv` and `linear1` (diffusers to_q/to_k/to_v/proj_mlp), the kohya
    // LoRA the whole weights, so slices overlap whole-weight adapters.
    let dir = TempDir::new("flux");
    let model = preset_specs(
        Preset::Flux,
        &PresetOptions {
            scale: 64,
            dtype: Dtype::BF16,
            text_encoders: false,
            vae: false,
        },
    );
    // Weights cycle through BF16, F16 and F32: slices overlapping
    // whole-weight adapters are merged in f32 and rounded once.
    let model: Vec<TensorSpec> = model
        .into_iter()
        .enumerate()
        .map(|(i, mut t)| {
            t.dtype = [Dtype::BF16, Dtype::F16, Dtype::F32][i % 3];
            t
        })
        .collect();
    let model_path = dir.join("flux.safetensors");
    write_deterministic(&model_path, &model, &BTreeMap::new(), 9).unwrap();
    let (kspecs, kmodules) = lora_subset(&model, LoraConvention::Kohya, 4, Dtype::F16, |_| true);
    let kfile = dir.join("flux-kohya.safetensors");
    write_lora(&kfile, &kspecs, 4.0, 21).unwrap();
    let (pspecs, pmodules) =
        lora_subset(&model, LoraConvention::Peft, 8, Dtype::BF16, |i| i % 4 != 1);
    let pfile = dir.join("flux-peft.safetensors");
    write_lora(&pfile, &pspecs, 0.0, 22).unwrap();
    let loras = [
        LoraCase {
            arg: s(&kfile).to_owned(),
            recorded_name: "flux-kohya.safetensors".into(),
            file: kfile.clone(),
            convention: LoraConvention::Kohya,
            scale: 1.0,
            multiplier: 1.0,
            modules: kmodules,
            stray: 0,
        },
        LoraCase {
            arg: format!("{}:1.5", pfile.display()),
            recorded_name: "flux-peft.safetensors".into(),
            file: pfile.clone(),
            convention: LoraConvention::Peft,
            scale: 1.5,
            multiplier: 1.5,
            modules: pmodules,
            stray: 0,
        },
    ];
    let out = dir.join("merged.safetensors");
    let (stdout, _) = ok(&[
        "merge",
        s(&model_path),
        "--lora",
        &loras[0].arg,
        "--lora",
        &loras[1].arg,
        "-o",
        s(&out),
        "--strict",
    ]);
    let c = check_output(&model_path, &out, &model, &loras);
    eprintln!("{c:?}");
    assert_eq!(c.worst.len(), 3, "{c:?}");
    assert_eq!(
        summary_counts(&stdout),
        (c.tensors, c.merged, c.terms),
        "{stdout}"
    );

    // The peft LoRA alone: slices without overlap; rows outside every
    // slice stay bit-identical (checked by check_output).
    let out2 = dir.join("peft-only.safetensors");
    ok(&[
        "merge",
        s(&model_path),
        "--lora",
        &loras[1].arg,
        "-o",
        s(&out2),
    ]);
    let c = check_output(&model_path, &out2, &model, &loras[1..]);
    assert!(c.merged > 0);
}

#[test]
fn refuses_bad_input_without_writing() {
    let dir = TempDir::new("errors");
    let model = sdxl_model(64);
    let model_path = dir.join("sdxl.safetensors");
    write_deterministic(&model_path, &model, &model_metadata(), 5).unwrap();
    let model_bytes = fs::read(&model_path).unwrap();
    let kohya = kohya_lora(&dir, &model);
    let k = s(&kohya.file);
    let m = s(&model_path);
    let out = dir.join("out.safetensors");
    let o = s(&out);
    let inputs = dir.names();

    // A LoRA for another architecture: no module matches.
    let flux = preset_specs(
        Preset::Flux,
        &PresetOptions {
            scale: 64,
            dtype: Dtype::F16,
            text_encoders: false,
            vae: false,
        },
    );
    let flux_lora = dir.join("flux-lora.safetensors");
    let (fspecs, _) = lora_subset(&flux, LoraConvention::Kohya, 4, Dtype::F16, |_| true);
    write_lora(&flux_lora, &fspecs, 4.0, 1).unwrap();
    // The SDXL LoRA with every down factor one column wider.
    let edited = dir.join("edited.safetensors");
    let (mut especs, _) = lora_subset(&model, LoraConvention::Kohya, 4, Dtype::F16, |_| true);
    for t in especs
        .iter_mut()
        .filter(|t| t.name.ends_with(".lora_down.weight"))
    {
        t.shape[1] += 1;
    }
    write_lora(&edited, &especs, 4.0, 1).unwrap();
    // The model with one adapted weight stored as FP8.
    let fp8_model = dir.join("fp8.safetensors");
    let fp8_target =
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight";
    let mut fspecs = model.clone();
    fspecs
        .iter_mut()
        .find(|t| t.name == fp8_target)
        .unwrap()
        .dtype = Dtype::F8E4M3;
    write_deterministic(&fp8_model, &fspecs, &BTreeMap::new(), 5).unwrap();
    let inputs_all = dir.names();
    assert_eq!(inputs_all.len(), inputs.len() + 3);

    let missing = dir.join("missing.safetensors");
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        // Multipliers.
        (
            vec![m.into(), "--lora".into(), format!("{k}:abc")],
            vec![
                "kohya-r4.safetensors".into(),
                "`abc` is not a number".into(),
            ],
        ),
        (
            vec![m.into(), "--lora".into(), format!("{k}:nan")],
            vec!["kohya-r4.safetensors".into(), "not a finite number".into()],
        ),
        (
            vec![m.into(), "--lora".into(), format!("{k}:inf")],
            vec!["kohya-r4.safetensors".into(), "not a finite number".into()],
        ),
        (
            vec![m.into(), "--lora".into(), format!("{k}:")],
            vec!["kohya-r4.safetensors".into(), "empty".into()],
        ),
        // Mismatching LoRAs.
        (
            vec![m.into(), "--lora".into(), s(&flux_lora).into()],
            vec![
                "flux-lora.safetensors".into(),
                "no module of this LoRA matches".into(),
            ],
        ),
        (
            vec![m.into(), "--lora".into(), s(&edited).into()],
            vec![
                "edited.safetensors".into(),
                "no module of this LoRA matches".into(),
                "ShapeMismatch".into(),
            ],
        ),
        // One good LoRA and one bad: nothing is written.
        (
            vec![
                m.into(),
                "--lora".into(),
                k.into(),
                "--lora".into(),
                s(&flux_lora).into(),
            ],
            vec!["flux-lora.safetensors".into()],
        ),
        // Strict: the stray module is an error.
        (
            vec![m.into(), "--lora".into(), k.into(), "--strict".into()],
            vec![
                "kohya-r4.safetensors".into(),
                "lora_unet_no_such_block".into(),
            ],
        ),
        // Missing files.
        (
            vec![s(&missing).into(), "--lora".into(), k.into()],
            vec!["missing.safetensors".into()],
        ),
        (
            vec![
                m.into(),
                "--lora".into(),
                format!("{}:0.5", missing.display()),
            ],
            vec!["missing.safetensors".into()],
        ),
        // A weight that cannot be merged.
        (
            vec![s(&fp8_model).into(), "--lora".into(), k.into()],
            vec![
                "kohya-r4.safetensors".into(),
                fp8_target.into(),
                "F8_E4M3".into(),
            ],
        ),
        // A folder as the model.
        (
            vec![s(&dir.0).into(), "--lora".into(), k.into()],
            vec!["single-file".into()],
        ),
    ];
    for (args, wants) in &cases {
        let mut full: Vec<&str> = vec!["merge"];
        full.extend(args.iter().map(String::as_str));
        full.extend(["-o", o]);
        let err = fails(&full);
        for w in wants {
            assert!(
                err.contains(w.as_str()),
                "offload {}: `{w}` not in:\n{err}",
                full.join(" ")
            );
        }
        assert!(!out.exists(), "offload {} created OUT", full.join(" "));
        assert_eq!(
            dir.names(),
            inputs_all,
            "offload {} left files",
            full.join(" ")
        );
    }

    // OUT is the model: refused however it is spelled, the model intact.
    let dotted = dir.0.join(".").join("sdxl.safetensors");
    for spelled in [m, s(&dotted)] {
        let err = fails(&["merge", m, "--lora", k, "-o", spelled]);
        assert!(
            err.contains("is the model itself") && err.contains("sdxl.safetensors"),
            "{err}"
        );
    }
    let err = fails(&["merge", m, "--lora", k, "-o", k]);
    assert!(err.contains("is the LoRA"), "{err}");
    assert_eq!(fs::read(&model_path).unwrap(), model_bytes);
    assert_eq!(dir.names(), inputs_all);

    // An existing OUT survives a failed merge untouched, and is replaced
    // by a successful one.
    fs::write(&out, b"previous contents").unwrap();
    fails(&["merge", m, "--lora", &format!("{k}:x"), "-o", o]);
    fails(&["merge", m, "--lora", s(&flux_lora), "-o", o]);
    assert_eq!(fs::read(&out).unwrap(), b"previous contents");
    ok(&["merge", m, "--lora", k, "-o", o]);
    assert!(SafetensorsFile::open(&out).is_ok());
}
