//! LoRA files against real data: the LyCORIS LoKr and legacy diffusers
//! files map onto the full-size SD 1.5 layout with every adapter resolved,
//! the cloneofsimo files are recognised and refused clearly, every FLUX key
//! list of `lora-keys/` is recognised and maps onto the full-size FLUX
//! layout (or is reported per key), and mutated real headers never panic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use offload_loader::dtype::from_f32_slice;
use offload_loader::layout::{LayoutFile, ModelLayout};
use offload_loader::lora::{
    flux_bfl_to_diffusers, ldm_unet_to_diffusers, Algorithm, Alpha, Delta, KronFactor, LoraFile,
    LoraProblem, Naming, ProblemKind, ResolveOptions, ResolvedLora, TargetIndex,
};
use offload_loader::safetensors::SafetensorsFile;
use offload_loader::synth::{
    header_bytes, preset_specs, write_lora, Preset, PresetOptions, TensorSpec,
};
use offload_loader::{Dtype, LoaderError, TensorRef};
use proptest::prelude::*;
use serde_json::Value;

fn sd15() -> ModelLayout {
    let specs = preset_specs(Preset::Sd15, &PresetOptions::default());
    ModelLayout::from_specs(Path::new("sd15.safetensors"), &specs)
}

fn flux(text_encoders: bool) -> ModelLayout {
    let specs = preset_specs(
        Preset::Flux,
        &PresetOptions {
            text_encoders,
            ..PresetOptions::default()
        },
    );
    ModelLayout::from_specs(Path::new("flux1-dev.safetensors"), &specs)
}

/// The SD 1.5 preset as a diffusers folder: `unet/` with diffusers names,
/// `text_encoder/` with the CLIP names, `vae/` left out.
fn sd15_diffusers() -> ModelLayout {
    let specs = preset_specs(Preset::Sd15, &PresetOptions::default());
    let files = vec![
        LayoutFile {
            path: "sd15/unet/diffusion_pytorch_model.safetensors".into(),
            group: Some("unet".into()),
            unit: None,
            len: 0,
        },
        LayoutFile {
            path: "sd15/text_encoder/model.safetensors".into(),
            group: Some("text_encoder".into()),
            unit: None,
            len: 0,
        },
    ];
    let mut tensors = Vec::new();
    for s in specs {
        let (name, file) = if let Some(rel) = s.name.strip_prefix("model.diffusion_model.") {
            let (m, suffix) = rel.rsplit_once('.').unwrap();
            let d = ldm_unet_to_diffusers(m).unwrap_or_else(|| panic!("{rel}"));
            (format!("{d}.{suffix}"), 0)
        } else if let Some(rel) = s.name.strip_prefix("cond_stage_model.transformer.") {
            (rel.to_owned(), 1)
        } else {
            continue;
        };
        tensors.push(TensorRef {
            name,
            dtype: s.dtype,
            shape: s.shape.clone(),
            data_offset: 0,
            len: s.byte_len().unwrap(),
            file,
        });
    }
    ModelLayout::from_tensors(files, tensors)
}

fn strict() -> ResolveOptions {
    ResolveOptions {
        multiplier: 1.0,
        strict: true,
    }
}

fn lenient() -> ResolveOptions {
    ResolveOptions::default()
}

/// Module keys of a file that carry LoKr factors.
fn lokr_modules(f: &SafetensorsFile) -> BTreeSet<String> {
    f.tensors()
        .iter()
        .filter_map(|t| {
            let (m, s) = t.name.rsplit_once('.')?;
            s.starts_with("lokr_").then(|| m.to_owned())
        })
        .collect()
}

fn assert_lokr_file(rel: &str, dim: u64, layout: &ModelLayout) -> ResolvedLora {
    let path = common::data(rel);
    let raw = SafetensorsFile::open(&path).unwrap();
    let lora = LoraFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let s = lora.summary();
    assert_eq!(s.naming, Naming::Kohya, "{rel}");
    let expected = lokr_modules(&raw);
    assert_eq!(s.modules, expected.len(), "{rel}");
    assert_eq!(
        s.algorithms,
        BTreeMap::from([(Algorithm::LoKr, expected.len())]),
        "{rel}"
    );
    assert_eq!(s.alphas, vec![dim as f32], "{rel}");
    let r = lora
        .resolve(&TargetIndex::new(layout), &strict())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(r.skipped.is_empty());
    assert_eq!(r.adapters.len(), expected.len(), "{rel}");
    let keys: BTreeSet<String> = r.adapters.iter().map(|a| a.key.clone()).collect();
    assert_eq!(keys, expected);
    let mut conv3 = 0;
    for a in &r.adapters {
        assert_eq!(a.algorithm, Algorithm::LoKr);
        assert_eq!(a.rows, None);
        // dim = alpha, so alpha / rank = 1.
        assert_eq!(a.alpha, Alpha::Tensor(dim as f32), "{}", a.key);
        assert_eq!(a.rank, Some(dim), "{}", a.key);
        assert_eq!(a.scale, 1.0, "{}", a.key);
        let t = &a.target.shape;
        assert_eq!(a.delta_shape[0], t[0], "{}", a.key);
        assert_eq!(
            a.delta_shape[0] * a.delta_shape[1],
            t.iter().product::<u64>(),
            "{}",
            a.key
        );
        let Delta::LoKr { w1, w2 } = &a.delta else {
            panic!("{}", a.key)
        };
        assert!(matches!(w1, KronFactor::LowRank { .. }));
        assert!(matches!(w2, KronFactor::LowRank { .. }));
        let ([p, q], [u, v]) = (w1.shape(), w2.shape());
        assert_eq!([p * u, q * v], a.delta_shape);
        if t.len() == 4 && t[2] * t[3] == 9 {
            // Stored flattened: [out, in·3·3] for a [out, in, 3, 3] conv.
            conv3 += 1;
            assert_eq!(a.delta_shape, [t[0], t[1] * 9], "{}", a.key);
        }
    }
    assert!(conv3 > 0, "{rel}: no 3x3 conv adapters");
    r
}

#[test]
fn real_lokr_files_map_onto_full_sd15() {
    let layout = sd15();
    for (rel, dim) in [
        ("lora/smart_falcon_4_lokr.safetensors", 4),
        ("lora/smart_falcon_8_lokr.safetensors", 8),
        ("lora/smart_falcon_16_lokr.safetensors", 16),
    ] {
        let r = assert_lokr_file(rel, dim, &layout);
        // 350 modules: 72 in the text encoder, 278 in the UNet.
        assert_eq!(r.adapters.len(), 350, "{rel}");
        let te = r
            .adapters
            .iter()
            .filter(|a| {
                a.target
                    .name
                    .starts_with("cond_stage_model.transformer.text_model.")
            })
            .count();
        assert_eq!(te, 72, "{rel}");
        let unet = r
            .adapters
            .iter()
            .filter(|a| a.target.name.starts_with("model.diffusion_model."))
            .count();
        assert_eq!(unet, 278, "{rel}");
        // Spot checks of the diffusers → LDM mapping.
        let find = |k: &str| {
            r.adapters
                .iter()
                .find(|a| a.key == k)
                .unwrap_or_else(|| panic!("{k}"))
        };
        assert_eq!(
            find("lora_unet_down_blocks_0_resnets_0_conv1").target.name,
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        );
        assert_eq!(
            find("lora_unet_down_blocks_0_downsamplers_0_conv")
                .target
                .name,
            "model.diffusion_model.input_blocks.3.0.op.weight"
        );
        assert_eq!(
            find("lora_unet_up_blocks_0_upsamplers_0_conv").target.name,
            "model.diffusion_model.output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            find("lora_unet_up_blocks_1_upsamplers_0_conv").target.name,
            "model.diffusion_model.output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            find("lora_unet_mid_block_resnets_1_time_emb_proj")
                .target
                .name,
            "model.diffusion_model.middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            find("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0")
                .target
                .name,
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"
        );
        assert_eq!(
            find("lora_te_text_model_encoder_layers_11_mlp_fc2")
                .target
                .name,
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"
        );
        println!("{rel}: {} adapters, all mapped", r.adapters.len());
    }
}

#[test]
fn real_lokr_file_maps_onto_a_diffusers_folder_too() {
    let layout = sd15_diffusers();
    let r = assert_lokr_file("lora/smart_falcon_8_lokr.safetensors", 8, &layout);
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "lora_unet_up_blocks_1_upsamplers_0_conv")
        .unwrap();
    assert_eq!(a.target.name, "up_blocks.1.upsamplers.0.conv.weight");
    assert_eq!(a.target.file, 0);
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
        .unwrap();
    assert_eq!(
        a.target.name,
        "text_model.encoder.layers.0.self_attn.q_proj.weight"
    );
    assert_eq!(a.target.file, 1);
}

#[test]
fn real_legacy_diffusers_file_maps_onto_full_sd15() {
    let path = common::data("lora/sd15_diffusers_legacy_catundchat.safetensors");
    let lora = LoraFile::open(&path).unwrap();
    let s = lora.summary();
    assert_eq!(s.naming, Naming::DiffusersLegacy);
    assert_eq!(s.modules, 128);
    assert_eq!(s.algorithms, BTreeMap::from([(Algorithm::Lora, 128)]));
    assert_eq!(s.ranks, BTreeSet::from([4]));
    let r = lora.resolve_layout(&sd15(), &strict()).unwrap();
    assert_eq!(r.naming, Naming::DiffusersLegacy);
    assert_eq!(r.adapters.len(), 128);
    for a in &r.adapters {
        assert_eq!((a.alpha, a.scale, a.rank), (Alpha::Absent, 1.0, Some(4)));
        let Delta::LowRank { up, down } = &a.delta else {
            panic!()
        };
        assert_eq!((up.dtype, down.dtype), (Dtype::F32, Dtype::F32));
        assert_eq!(a.delta_shape, [a.target.shape[0], a.target.shape[1]]);
    }
    let a = r
        .adapters
        .iter()
        .find(|a| {
            a.key == "up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_out_lora"
        })
        .unwrap();
    assert_eq!(
        a.target.name,
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"
    );
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora")
        .unwrap();
    assert_eq!(
        a.target.name,
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    );
    assert_eq!(a.target.shape, vec![1280, 768]);
    // The factor bytes read back through the LoRA file.
    let Delta::LowRank { up, .. } = &a.delta else {
        panic!()
    };
    let mut buf = vec![0u8; up.len as usize];
    lora.read_factor_into(up, &mut buf).unwrap();
    let raw = SafetensorsFile::open(&path).unwrap();
    assert_eq!(buf, raw.read_tensor_vec(&up.name).unwrap());
    println!(
        "legacy diffusers: {} adapters, all mapped",
        r.adapters.len()
    );
}

#[test]
fn real_cloneofsimo_files_are_recognised_and_refused() {
    for (rel, n) in [
        ("lora/lora_disney.safetensors", 384),
        ("lora/analog_svd_rank4.safetensors", 384),
    ] {
        let path = common::data(rel);
        let lora = LoraFile::open(&path).unwrap();
        let s = lora.summary();
        assert_eq!(s.naming, Naming::Cloneofsimo, "{rel}");
        assert_eq!(s.cloneofsimo_keys, n, "{rel}");
        for opts in [strict(), lenient()] {
            let e = lora.resolve_layout(&sd15(), &opts).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, LoaderError::LoraUnsupported { convention, .. } if convention.contains("cloneofsimo")),
                "{msg}"
            );
            assert!(msg.contains(&format!("its {n} tensors")), "{msg}");
            assert!(msg.contains(rel.rsplit('/').next().unwrap()), "{msg}");
            assert!(msg.contains("CrossAttention"), "{msg}");
        }
    }
}

/// Tensor specs of a `lora-keys/*.json` list: factors in F16 (alpha F16 too).
fn key_list(name: &str) -> Vec<TensorSpec> {
    let path = common::data(&format!("lora-keys/{name}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys = v["keys"].as_object().unwrap();
    keys.iter()
        .map(|(k, s)| {
            let shape: Vec<u64> = s
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            TensorSpec::new(k.clone(), Dtype::F16, &shape)
        })
        .collect()
}

/// Lists whose F16 factors exceed this many bytes are written sparse.
const FULL_WRITE_LIMIT: u64 = 100_000_000;

/// The value of every `.alpha` tensor of the key-list files.
const LIST_ALPHA: f32 = 8.0;

/// A key list written as a real LoRA file in its own temporary folder,
/// removed on drop.
struct ListFile {
    dir: PathBuf,
    path: PathBuf,
    /// Whether the factors were written (else the data section is a hole
    /// of zeros, see [`ListFile::write`]).
    full: bool,
}

impl ListFile {
    /// Writes `lora-keys/NAME.json` as `NAME.safetensors`: F16 factors with
    /// the list's names and shapes, every `.alpha` = [`LIST_ALPHA`]. Lists
    /// up to [`FULL_WRITE_LIMIT`] bytes (all but four) are written by the
    /// synth writer with deterministic values. The four bigger ones (control
    /// LoRA 1.24 GB, diffusers 344 MB, kohya 153 MB, ai-toolkit 112 MB in
    /// F16) get the writer's exact header, their alpha values written in
    /// place, and a data section left as a hole of the right length (a
    /// sparse file: no test needs their factor values, and writing 1.8 GB
    /// per test run would be slow and fill small CI disks). Either way the
    /// loader opens a real file of the right size.
    fn write(name: &str) -> ListFile {
        let specs = key_list(name);
        let dir = std::env::temp_dir().join(format!(
            "offload-loader-keylist-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        let bytes: u64 = specs.iter().map(|s| s.byte_len().unwrap()).sum();
        let full = bytes <= FULL_WRITE_LIMIT;
        if full {
            write_lora(&path, &specs, LIST_ALPHA, 1).unwrap();
        } else {
            let header = header_bytes(&path, &specs, &BTreeMap::new()).unwrap();
            let f = std::fs::File::create(&path).unwrap();
            f.write_all_at(&(header.len() as u64).to_le_bytes(), 0)
                .unwrap();
            f.write_all_at(&header, 8).unwrap();
            let start = 8 + header.len() as u64;
            f.set_len(start + bytes).unwrap();
            let mut offset = start;
            for s in &specs {
                if s.name.ends_with(".alpha") {
                    let v = from_f32_slice(&[LIST_ALPHA], s.dtype).unwrap();
                    f.write_all_at(&v, offset).unwrap();
                }
                offset += s.byte_len().unwrap();
            }
        }
        ListFile { dir, path, full }
    }

    fn open(&self) -> LoraFile {
        LoraFile::open(&self.path).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for ListFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Expect {
    name: &'static str,
    naming: Naming,
    algorithms: &'static [(Algorithm, usize)],
    /// Adapters resolved without / with text encoders in the layout.
    adapters: [usize; 2],
    /// Skipped per class without / with text encoders.
    skipped: [&'static [(ProblemKind, usize)]; 2],
}

const EXPECT: &[Expect] = &[
    Expect {
        name: "flux_lora_kohya_format",
        naming: Naming::Kohya,
        algorithms: &[(Algorithm::Lora, 304)],
        adapters: [304, 304],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_lora_kohya_with_te1_format",
        naming: Naming::Kohya,
        algorithms: &[(Algorithm::Lora, 376)],
        adapters: [304, 376],
        skipped: [&[(ProblemKind::Unmatched, 72)], &[]],
    },
    Expect {
        name: "flux_lora_diffusers_format",
        naming: Naming::Diffusers,
        algorithms: &[(Algorithm::Lora, 494)],
        adapters: [494, 494],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_lora_diffusers_no_proj_mlp_format",
        naming: Naming::Diffusers,
        algorithms: &[(Algorithm::Lora, 342)],
        adapters: [342, 342],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_lora_diffusers_base_model_format",
        naming: Naming::Peft,
        algorithms: &[(Algorithm::Lora, 381)],
        adapters: [381, 381],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_lora_aitoolkit_format",
        naming: Naming::Checkpoint,
        algorithms: &[(Algorithm::Lora, 228)],
        adapters: [228, 228],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_lora_xlabs_format",
        naming: Naming::XLabs,
        algorithms: &[(Algorithm::Lora, 12)],
        adapters: [12, 12],
        skipped: [&[], &[]],
    },
    Expect {
        name: "flux_dora_onetrainer_format",
        naming: Naming::Kohya,
        algorithms: &[(Algorithm::Lora, 506), (Algorithm::Dora, 506)],
        adapters: [0, 0],
        skipped: [
            &[
                (ProblemKind::Unmatched, 240),
                (ProblemKind::Unsupported, 266),
            ],
            &[(ProblemKind::Unsupported, 506)],
        ],
    },
    Expect {
        name: "flux_lokr_bfl_format",
        naming: Naming::Checkpoint,
        algorithms: &[(Algorithm::LoKr, 6)],
        adapters: [0, 0],
        skipped: [
            &[(ProblemKind::ShapeMismatch, 6)],
            &[(ProblemKind::ShapeMismatch, 6)],
        ],
    },
    Expect {
        name: "flux_control_lora_format",
        naming: Naming::Checkpoint,
        algorithms: &[(Algorithm::Lora, 314), (Algorithm::Bias, 314)],
        adapters: [0, 0],
        skipped: [
            &[
                (ProblemKind::ShapeMismatch, 1),
                (ProblemKind::Unsupported, 313),
                (ProblemKind::UnknownKey, 152),
            ],
            &[
                (ProblemKind::ShapeMismatch, 1),
                (ProblemKind::Unsupported, 313),
                (ProblemKind::UnknownKey, 152),
            ],
        ],
    },
];

#[test]
fn flux_key_lists_map_onto_full_flux() {
    let layouts = [flux(false), flux(true)];
    let indexes = [TargetIndex::new(&layouts[0]), TargetIndex::new(&layouts[1])];
    for e in EXPECT {
        let specs = key_list(e.name);
        let bytes: u64 = specs.iter().map(|s| s.byte_len().unwrap()).sum();
        let file = ListFile::write(e.name);
        let lora = file.open();
        assert_eq!(lora.tensors().len(), specs.len(), "{}", e.name);
        assert_eq!(
            std::fs::metadata(&file.path).unwrap().len(),
            8 + lora_header_len(&file.path) + bytes,
            "{}",
            e.name
        );
        let s = lora.summary();
        let alphas = specs.iter().any(|s| s.name.ends_with(".alpha"));
        assert_eq!(
            s.alphas,
            if alphas { vec![LIST_ALPHA] } else { vec![] },
            "{}",
            e.name
        );
        assert_eq!(s.naming, e.naming, "{}", e.name);
        assert_eq!(
            s.algorithms,
            e.algorithms.iter().copied().collect::<BTreeMap<_, _>>(),
            "{}",
            e.name
        );
        for (k, index) in indexes.iter().enumerate() {
            let r = lora.resolve(index, &lenient()).unwrap();
            let counts: Vec<(ProblemKind, usize)> = r.counts().into_iter().collect();
            assert_eq!(
                counts,
                e.skipped[k],
                "{} (text encoders: {})",
                e.name,
                k == 1
            );
            assert_eq!(r.adapters.len(), e.adapters[k], "{}", e.name);
            for a in &r.adapters {
                let n = a
                    .rows
                    .as_ref()
                    .map_or(a.target.shape[0], |r| r.end - r.start);
                assert_eq!(
                    a.delta_shape,
                    [n, a.target.shape[1..].iter().product::<u64>()],
                    "{}: {}",
                    e.name,
                    a.key
                );
                // Read from the file: alpha / rank, or 1 without alpha.
                match a.alpha {
                    Alpha::Tensor(v) => {
                        assert_eq!(v, LIST_ALPHA);
                        let r = a.rank.unwrap() as f64;
                        assert_eq!(a.scale, (f64::from(LIST_ALPHA) / r) as f32, "{}", a.key);
                    }
                    Alpha::Absent => assert_eq!(a.scale, 1.0),
                    other => panic!("{}: {other:?}", a.key),
                }
            }
            // Strict mode refuses exactly when something was skipped.
            let strict_result = lora.resolve(index, &strict());
            assert_eq!(strict_result.is_ok(), r.skipped.is_empty(), "{}", e.name);
            if let Err(err) = strict_result {
                assert!(matches!(err, LoaderError::Lora { .. }), "{err}");
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("{}: LoRA adapter `", file.path.display())),
                    "{msg}"
                );
            }
            println!(
                "{} ({} MB in F16{}; text encoders: {}): {}",
                e.name,
                bytes / 1_000_000,
                if file.full { "" } else { ", written sparse" },
                k == 1,
                r.report()
            );
        }
    }
}

fn lora_header_len(path: &Path) -> u64 {
    SafetensorsFile::open(path).unwrap().header().header_len
}

/// A key list written as a real file, opened and resolved against the
/// full-size FLUX layout.
fn resolve_list(name: &str, with_te: bool) -> ResolvedLora {
    let file = ListFile::write(name);
    file.open()
        .resolve_layout(&flux(with_te), &lenient())
        .unwrap()
}

#[test]
fn diffusers_flux_targets_row_slices_of_fused_weights() {
    let r = resolve_list("flux_lora_diffusers_format", false);
    let get = |k: &str| {
        r.adapters
            .iter()
            .find(|a| a.key == k)
            .unwrap_or_else(|| panic!("{k}"))
    };
    for (k, target, rows) in [
        (
            "transformer.transformer_blocks.0.attn.to_q",
            "double_blocks.0.img_attn.qkv.weight",
            Some(0..3072),
        ),
        (
            "transformer.transformer_blocks.7.attn.to_v",
            "double_blocks.7.img_attn.qkv.weight",
            Some(6144..9216),
        ),
        (
            "transformer.transformer_blocks.3.attn.add_k_proj",
            "double_blocks.3.txt_attn.qkv.weight",
            Some(3072..6144),
        ),
        (
            "transformer.single_transformer_blocks.37.attn.to_k",
            "single_blocks.37.linear1.weight",
            Some(3072..6144),
        ),
        (
            "transformer.single_transformer_blocks.0.proj_mlp",
            "single_blocks.0.linear1.weight",
            Some(9216..21504),
        ),
        (
            "transformer.single_transformer_blocks.0.proj_out",
            "single_blocks.0.linear2.weight",
            None,
        ),
        (
            "transformer.single_transformer_blocks.0.norm.linear",
            "single_blocks.0.modulation.lin.weight",
            None,
        ),
        (
            "transformer.transformer_blocks.0.norm1_context.linear",
            "double_blocks.0.txt_mod.lin.weight",
            None,
        ),
        (
            "transformer.transformer_blocks.18.ff_context.net.2",
            "double_blocks.18.txt_mlp.2.weight",
            None,
        ),
        (
            "transformer.transformer_blocks.0.attn.to_add_out",
            "double_blocks.0.txt_attn.proj.weight",
            None,
        ),
    ] {
        let a = get(k);
        assert_eq!((a.target.name.as_str(), &a.rows), (target, &rows), "{k}");
    }
    // Every q/k/v row slice of every fused weight is covered exactly once.
    let mut cover: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for a in &r.adapters {
        if let Some(rows) = &a.rows {
            cover
                .entry(a.target.name.as_str())
                .or_default()
                .push((rows.start, rows.end));
        }
    }
    assert_eq!(cover.len(), 19 * 2 + 38);
    for (t, mut v) in cover {
        v.sort();
        let end = if t.contains("linear1") { 21504 } else { 9216 };
        let mut at = 0;
        for (s, e) in v {
            assert_eq!(s, at, "{t}");
            at = e;
        }
        assert_eq!(at, end, "{t}");
    }

    let r = resolve_list("flux_lora_diffusers_base_model_format", false);
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "base_model.model.proj_out")
        .unwrap();
    assert_eq!(a.target.name, "final_layer.linear.weight");
    let r = resolve_list("flux_lora_xlabs_format", false);
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "double_blocks.10.processor.qkv_lora2")
        .unwrap();
    assert_eq!(a.target.name, "double_blocks.10.txt_attn.qkv.weight");
    assert_eq!(a.alpha, Alpha::Absent);
}

/// The full-size FLUX transformer as a diffusers `transformer/` folder:
/// BFL's fused `qkv` and `linear1` split into diffusers' separate weights.
fn flux_diffusers() -> ModelLayout {
    let files = vec![LayoutFile {
        path: "FLUX.1-dev/transformer/diffusion_pytorch_model.safetensors".into(),
        group: Some("transformer".into()),
        unit: None,
        len: 0,
    }];
    let mut tensors = Vec::new();
    for s in preset_specs(
        Preset::Flux,
        &PresetOptions {
            text_encoders: false,
            ..PresetOptions::default()
        },
    ) {
        let Some(m) = s.name.strip_suffix(".weight") else {
            continue;
        };
        for (d, rows) in flux_bfl_to_diffusers(m, &s.shape) {
            let mut shape = s.shape.clone();
            if let Some(r) = rows {
                shape[0] = r.end - r.start;
            }
            let spec = TensorSpec::new(format!("{d}.weight"), s.dtype, &shape);
            tensors.push(TensorRef {
                name: spec.name.clone(),
                dtype: spec.dtype,
                len: spec.byte_len().unwrap(),
                shape,
                data_offset: 0,
                file: 0,
            });
        }
    }
    ModelLayout::from_tensors(files, tensors)
}

/// BFL-named FLUX LoRAs (the real kohya and ai-toolkit key lists) on a
/// diffusers-layout FLUX: every whole weight maps; each LoRA on a fused
/// `qkv` or `linear1` is reported, per key, as unsupported with the reason.
#[test]
fn bfl_named_key_lists_on_a_diffusers_flux() {
    let index = TargetIndex::new(&flux_diffusers());
    for (name, adapters, fused) in [
        ("flux_lora_kohya_format", 19 * 8 + 38 * 2, 19 * 2 + 38),
        ("flux_lora_aitoolkit_format", 228 - 19 * 2 - 38, 19 * 2 + 38),
    ] {
        let file = ListFile::write(name);
        let r = file.open().resolve(&index, &lenient()).unwrap();
        assert_eq!(r.adapters.len(), adapters, "{name}: {}", r.report());
        assert_eq!(r.skipped.len(), fused, "{name}: {}", r.report());
        for s in &r.skipped {
            let msg = s.problem.to_string();
            assert!(
                matches!(s.problem, LoraProblem::Unsupported { .. })
                    && msg.contains("separate weights")
                    && msg.contains("splitting the LoRA's up factor"),
                "{name}: {}: {msg}",
                s.key
            );
        }
        for a in &r.adapters {
            assert_eq!(a.rows, None);
            assert!(!a.target.name.contains("to_q"), "{}", a.key);
        }
    }
    let r = ListFile::write("flux_lora_kohya_format")
        .open()
        .resolve(&index, &lenient())
        .unwrap();
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "lora_unet_double_blocks_7_txt_attn_proj")
        .unwrap();
    assert_eq!(a.target.name, "transformer_blocks.7.attn.to_add_out.weight");
}

#[test]
fn kohya_flux_text_encoder_keys_need_clip_l() {
    let r = resolve_list("flux_lora_kohya_with_te1_format", false);
    let s = r.unmatched().next().unwrap();
    assert!(s.key.starts_with("lora_te1_"), "{}", s.key);
    let msg = s.problem.to_string();
    assert!(msg.contains("the model has no text encoder 1"), "{msg}");
    assert!(msg.contains("transformer"), "{msg}");
    let w = r.warning().unwrap();
    assert!(w.contains("72 LoRA modules skipped (304 applied)"), "{w}");
    assert_eq!(w.lines().count(), 73);
    let r = resolve_list("flux_lora_kohya_with_te1_format", true);
    assert_eq!(r.warning(), None);
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "lora_te1_text_model_encoder_layers_11_self_attn_out_proj")
        .unwrap();
    assert_eq!(
        a.target.name,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight"
    );
    let a = r
        .adapters
        .iter()
        .find(|a| a.key == "lora_unet_single_blocks_37_linear1")
        .unwrap();
    assert_eq!(
        (a.target.name.as_str(), a.rows.clone()),
        ("single_blocks.37.linear1.weight", None)
    );
}

#[test]
fn per_key_reports_for_lists_that_cannot_fit_flux() {
    // DoRA: recognised, targets resolved (T5 and CLIP-L too), not applied.
    let r = resolve_list("flux_dora_onetrainer_format", true);
    for s in &r.skipped {
        match &s.problem {
            LoraProblem::Unsupported {
                feature: Algorithm::Dora,
                target: Some(t),
                detail,
            } => {
                assert!(detail.contains(".dora_scale"), "{detail}");
                assert!(!t.is_empty());
            }
            p => panic!("{}: {p}", s.key),
        }
        assert_eq!(s.tensors.len(), 4, "{}", s.key);
    }
    let t5 = r
        .skipped
        .iter()
        .find(|s| s.key == "lora_te2_encoder_block_23_layer_1_DenseReluDense_wi_1")
        .unwrap();
    assert!(
        t5.problem.to_string().contains(
            "text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
        ),
        "{}",
        t5.problem
    );
    let q = r
        .skipped
        .iter()
        .find(|s| s.key == "lora_transformer_single_transformer_blocks_5_attn_to_q")
        .unwrap();
    assert!(q
        .problem
        .to_string()
        .contains("single_blocks.5.linear1.weight"));

    // BFL LoKr: Kronecker products of 1024 rows against 3072+ row weights.
    let r = resolve_list("flux_lokr_bfl_format", false);
    let proj = r
        .skipped
        .iter()
        .find(|s| s.key == "diffusion_model.double_blocks.0.img_attn.proj")
        .unwrap();
    match &proj.problem {
        LoraProblem::ShapeMismatch(m) => {
            assert_eq!(m.target, "double_blocks.0.img_attn.proj.weight");
            assert_eq!((m.expected, m.delta), ([3072, 3072], [1024, 3072]));
        }
        p => panic!("{p}"),
    }
    // Same element count as qkv, but not the same rows: still a mismatch.
    let qkv = r
        .skipped
        .iter()
        .find(|s| s.key == "diffusion_model.double_blocks.0.img_attn.qkv")
        .unwrap();
    let msg = qkv.problem.to_string();
    assert!(msg.contains("1024×27648"), "{msg}");
    assert!(msg.contains("[9216, 3072]"), "{msg}");
    assert!(
        msg.contains("`diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2` [32, 288]"),
        "{msg}"
    );

    // Control LoRA: widened input, bias deltas, replaced norm scales.
    let r = resolve_list("flux_control_lora_format", false);
    let img_in = r.skipped.iter().find(|s| s.key == "img_in").unwrap();
    match &img_in.problem {
        LoraProblem::ShapeMismatch(m) => {
            assert_eq!((m.expected, m.delta), ([3072, 64], [3072, 128]))
        }
        p => panic!("{p}"),
    }
    let lin = r
        .skipped
        .iter()
        .find(|s| s.key == "single_blocks.3.linear1")
        .unwrap();
    assert!(
        matches!(&lin.problem, LoraProblem::Unsupported { feature: Algorithm::Bias, target: Some(t), .. } if t == "single_blocks.3.linear1.weight"),
        "{}",
        lin.problem
    );
    let norm = r
        .skipped
        .iter()
        .find(|s| s.key == "double_blocks.4.txt_attn.norm.key_norm.scale")
        .unwrap();
    let msg = norm.problem.to_string();
    assert!(msg.contains("control LoRA"), "{msg}");
}

/// Mutations of a real header: the LoRA layer must return Ok or Err on
/// whatever a valid safetensors header can say, never panic.
fn real_header() -> (Vec<u8>, serde_json::Map<String, Value>) {
    let bytes = std::fs::read(common::data("lora/smart_falcon_4_lokr.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let map: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (bytes[8 + n..].to_vec(), map)
}

fn assemble(map: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(map).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

fn exercise(bytes: Vec<u8>, index: &TargetIndex) {
    if let Ok(lora) = LoraFile::from_bytes("mutated.safetensors", bytes) {
        let _ = lora.summary();
        for opts in [strict(), lenient()] {
            match lora.resolve(index, &opts) {
                Ok(r) => {
                    for a in &r.adapters {
                        assert!(a.scale.is_finite());
                        for f in a.delta.factors() {
                            let mut buf = vec![0u8; f.len as usize];
                            lora.read_factor_into(f, &mut buf).unwrap();
                        }
                    }
                    for s in &r.skipped {
                        let _ = s.problem.to_string();
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
}

fn sd15_index() -> &'static TargetIndex {
    use std::sync::OnceLock;
    static INDEX: OnceLock<TargetIndex> = OnceLock::new();
    INDEX.get_or_init(|| TargetIndex::new(&sd15()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Structural edits that keep the safetensors header valid: drop
    /// entries, rename suffixes, reshape keeping the element count, change
    /// a dtype to another of the same size, rewrite an alpha's shape.
    #[test]
    fn mutated_real_lora_headers_never_panic(
        edits in proptest::collection::vec((0usize..1750, 0u8..7, 0u64..64), 1..24),
    ) {
        let (data, mut map) = real_header();
        let names: Vec<String> = map.keys().filter(|k| *k != "__metadata__").cloned().collect();
        for (i, op, x) in edits {
            let name = &names[i % names.len()];
            let Some(entry) = map.get(name).cloned() else { continue };
            let mut e = entry.as_object().unwrap().clone();
            let numel: u64 = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
            match op {
                0 => { map.remove(name); }
                1 => {
                    let suffixes = ["lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_b", "alpha", "lora_down.weight", "lora_up.weight", "hada_w1_a", "dora_scale", "lokr_t2", "nonsense"];
                    let (m, _) = name.rsplit_once('.').unwrap();
                    let new = format!("{m}.{}", suffixes[x as usize % suffixes.len()]);
                    map.remove(name);
                    map.insert(new, Value::Object(e));
                }
                2 => {
                    // Same element count, other factorisation.
                    let d = (x % 4) + 1;
                    let shape: Vec<u64> = if numel % d == 0 { vec![d, numel / d] } else { vec![numel] };
                    e.insert("shape".into(), serde_json::json!(shape));
                    map.insert(name.clone(), Value::Object(e));
                }
                3 => {
                    e.insert("dtype".into(), Value::String(["BF16", "I16", "F16"][x as usize % 3].into()));
                    map.insert(name.clone(), Value::Object(e));
                }
                4 => {
                    let shape: Vec<u64> = match x % 3 { 0 => vec![numel], 1 => vec![1, numel], _ => vec![numel, 1, 1] };
                    e.insert("shape".into(), serde_json::json!(shape));
                    map.insert(name.clone(), Value::Object(e));
                }
                5 => {
                    // A zero-sized factor: rank 0.
                    let b = e["data_offsets"][0].clone();
                    e.insert("data_offsets".into(), serde_json::json!([b, b]));
                    e.insert("shape".into(), serde_json::json!([0, x]));
                    map.insert(name.clone(), Value::Object(e));
                }
                _ => {
                    let (m, _) = name.rsplit_once('.').unwrap();
                    map.remove(name);
                    map.insert(format!("{}{}", ["lora_te2_", "unet.", "", "lora_unet_x"][x as usize % 4], m), Value::Object(e));
                }
            }
        }
        exercise(assemble(&map, &data), sd15_index());
    }

    /// Random byte flips anywhere in the header (mostly invalid headers).
    #[test]
    fn flipped_real_lora_headers_never_panic(
        flips in proptest::collection::vec((0usize..200_000, any::<u8>()), 1..8),
    ) {
        let (data, map) = real_header();
        let mut bytes = assemble(&map, &data);
        let hl = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for (at, v) in flips {
            let i = 8 + at % hl;
            bytes[i] ^= v;
        }
        exercise(bytes, sd15_index());
    }
}
