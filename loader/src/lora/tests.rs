//! Unit tests of LoRA parsing and resolution on small synthetic files and
//! header-only descriptions: every factorisation (including LoHa and LoCon,
//! which have no real file in ../shared/data), the name mappings, scales,
//! and every kind of malformed module.

use std::path::{Path, PathBuf};

use super::*;
use crate::layout::LayoutFile;
use crate::synth::{
    deterministic_bytes, lora_specs, preset_specs, write_lora, LoraConvention, LoraOptions, Preset,
    PresetOptions,
};

fn tmpdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("offload-loader-lora-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(preset: Preset) -> Vec<TensorSpec> {
    preset_specs(
        preset,
        &PresetOptions {
            scale: 8,
            ..PresetOptions::default()
        },
    )
}

fn layout(specs: &[TensorSpec]) -> ModelLayout {
    ModelLayout::from_specs(Path::new("model.safetensors"), specs)
}

fn spec(name: &str, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, Dtype::F16, shape)
}

fn lenient() -> ResolveOptions {
    ResolveOptions::default()
}

fn strict() -> ResolveOptions {
    ResolveOptions {
        multiplier: 1.0,
        strict: true,
    }
}

fn shape_of(specs: &[TensorSpec], name: &str) -> Vec<u64> {
    specs
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name}"))
        .shape
        .clone()
}

fn adapter<'a>(r: &'a ResolvedLora, key: &str) -> &'a Adapter {
    r.adapters
        .iter()
        .find(|a| a.key == key)
        .unwrap_or_else(|| panic!("{key}: {:?}", r.skipped))
}

fn skipped<'a>(r: &'a ResolvedLora, key: &str) -> &'a LoraProblem {
    &r.skipped
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("{key} not skipped"))
        .problem
}

/// A synthetic kohya LoRA over a small SD 1.5, written to disk: every
/// adapter resolves, the scale is multiplier × alpha / rank, and the factor
/// bytes read back.
#[test]
fn kohya_sd15_written_resolved_and_read() {
    let model = small(Preset::Sd15);
    let specs = lora_specs(
        &model,
        &LoraOptions {
            convention: LoraConvention::Kohya,
            rank: 4,
            dtype: Dtype::BF16,
        },
    );
    // 16 transformer blocks × 10 projections + 16 × proj_in/proj_out.
    assert_eq!(specs.len(), 3 * (16 * 10 + 16 * 2));
    let dir = tmpdir("kohya-sd15");
    let path = dir.join("lora.safetensors");
    write_lora(&path, &specs, 2.0, 7).unwrap();
    let lora = LoraFile::open(&path).unwrap();
    let s = lora.summary();
    assert_eq!(s.naming, Naming::Kohya);
    assert_eq!(s.ranks, BTreeSet::from([4]));
    assert_eq!(s.alphas, vec![2.0]);
    let opts = ResolveOptions {
        multiplier: 0.75,
        strict: true,
    };
    let r = lora.resolve_layout(&layout(&model), &opts).unwrap();
    assert_eq!(r.adapters.len(), 16 * 12);
    for a in &r.adapters {
        assert_eq!(a.alpha, Alpha::Tensor(2.0));
        assert_eq!(a.scale, 0.375);
        assert_eq!(a.algorithm, Algorithm::Lora);
        for f in a.delta.factors() {
            let mut buf = vec![0u8; f.len as usize];
            lora.read_factor_into(f, &mut buf).unwrap();
            assert_eq!(buf, deterministic_bytes(7, &spec_of(f)));
        }
    }
    // SD 1.5 proj_in is a 1x1 conv: the 4-D factors fit it.
    let a = adapter(&r, "lora_unet_down_blocks_1_attentions_0_proj_in");
    assert_eq!(
        a.target.name,
        "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    );
    assert_eq!(a.target.shape, vec![80, 80, 1, 1]);
    assert_eq!(a.delta_shape, [80, 80]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn spec_of(t: &TensorInfo) -> TensorSpec {
    TensorSpec::new(t.name.clone(), t.dtype, &t.shape)
}

/// peft FLUX LoRAs land in row slices; `adapter_config.json` gives alpha.
#[test]
fn peft_flux_rows_and_adapter_config() {
    let model = small(Preset::Flux);
    let specs = lora_specs(
        &model,
        &LoraOptions {
            convention: LoraConvention::Peft,
            rank: 4,
            dtype: Dtype::F16,
        },
    );
    let dir = tmpdir("peft-flux");
    let path = dir.join("adapter_model.safetensors");
    write_lora(&path, &specs, 0.0, 3).unwrap();
    let index = TargetIndex::new(&layout(&model));
    let h = 3072 / 8;

    let r = LoraFile::open(&path)
        .unwrap()
        .resolve(&index, &strict())
        .unwrap();
    // 19 × (6 + 6 + 2) double-block modules + 38 × (4 + 1 + 1) single.
    assert_eq!(r.adapters.len(), 19 * 14 + 38 * 6);
    let a = adapter(&r, "transformer.single_transformer_blocks.4.attn.to_v");
    assert_eq!(a.target.name, "single_blocks.4.linear1.weight");
    assert_eq!(a.rows, Some(2 * h..3 * h));
    assert_eq!((a.alpha, a.scale), (Alpha::Absent, 1.0));

    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn.to_v": 2}, "target_modules": ["to_q"]}"#,
    )
    .unwrap();
    let lora = LoraFile::open(&path).unwrap();
    assert_eq!(lora.peft_config().unwrap().lora_alpha, 8.0);
    let r = lora.resolve(&index, &strict()).unwrap();
    let a = adapter(&r, "transformer.transformer_blocks.0.attn.to_q");
    assert_eq!((a.alpha, a.scale), (Alpha::Config(8.0), 2.0));
    let a = adapter(&r, "transformer.transformer_blocks.0.attn.to_v");
    assert_eq!((a.alpha, a.scale), (Alpha::Config(2.0), 0.5));

    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "use_rslora": true}"#,
    )
    .unwrap();
    let r = LoraFile::open(&path)
        .unwrap()
        .resolve(&index, &strict())
        .unwrap();
    assert_eq!(
        adapter(&r, "transformer.single_transformer_blocks.0.proj_out").scale,
        4.0
    );

    std::fs::write(dir.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    let e = LoraFile::open(&path).unwrap_err();
    assert!(
        matches!(&e, LoaderError::LoraConfig { problem, .. } if problem.contains("lora_alpha")),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A diffusers-folder SDXL UNet (diffusers names) with kohya SDXL keys in
/// LDM naming, including samplers and a LoCon on a 3x3 conv.
#[test]
fn kohya_ldm_names_on_a_diffusers_folder() {
    let model = small(Preset::Sdxl);
    let files = vec![LayoutFile {
        path: "sdxl/unet/diffusion_pytorch_model.safetensors".into(),
        group: Some("unet".into()),
        unit: None,
        len: 0,
    }];
    let tensors: Vec<TensorRef> = model
        .iter()
        .filter_map(|s| {
            let rel = s.name.strip_prefix("model.diffusion_model.")?;
            let (m, suffix) = rel.rsplit_once('.')?;
            Some(TensorRef {
                name: format!("{}.{suffix}", ldm_unet_to_diffusers(m)?),
                dtype: s.dtype,
                shape: s.shape.clone(),
                data_offset: 0,
                len: s.byte_len()?,
                file: 0,
            })
        })
        .collect();
    let diffusers = ModelLayout::from_tensors(files, tensors);
    let r = 2;
    let mut specs = lora_specs(
        &model,
        &LoraOptions {
            convention: LoraConvention::Kohya,
            rank: r,
            dtype: Dtype::F16,
        },
    );
    let n_linear = specs.len() / 3;
    let mut locon = |key: &str, ldm: &str| {
        let t = shape_of(&model, &format!("model.diffusion_model.{ldm}.weight"));
        specs.push(spec(
            &format!("{key}.lora_down.weight"),
            &[r, t[1], t[2], t[3]],
        ));
        specs.push(spec(&format!("{key}.lora_up.weight"), &[t[0], r, 1, 1]));
    };
    locon("lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv");
    locon("lora_unet_output_blocks_5_2_conv", "output_blocks.5.2.conv");
    locon("lora_unet_input_blocks_6_0_op", "input_blocks.6.0.op");
    locon(
        "lora_unet_output_blocks_8_0_skip_connection",
        "output_blocks.8.0.skip_connection",
    );
    locon(
        "lora_unet_middle_block_2_in_layers_2",
        "middle_block.2.in_layers.2",
    );
    // A real file (alpha = rank), read back through LoraFile::open.
    let dir = tmpdir("sdxl-locon");
    let path = dir.join("sdxl_lora.safetensors");
    write_lora(&path, &specs, r as f32, 5).unwrap();
    let lora = LoraFile::open(&path).unwrap();
    assert_eq!(
        lora.summary().algorithms,
        BTreeMap::from([(Algorithm::Lora, n_linear + 1), (Algorithm::LoCon, 4)])
    );
    for (l, prefix) in [(layout(&model), "model.diffusion_model."), (diffusers, "")] {
        let res = lora.resolve_layout(&l, &strict()).unwrap();
        assert_eq!(res.adapters.len(), n_linear + 5);
        let a = adapter(&res, "lora_unet_output_blocks_2_2_conv");
        let want = if prefix.is_empty() {
            "up_blocks.0.upsamplers.0.conv.weight".to_owned()
        } else {
            format!("{prefix}output_blocks.2.2.conv.weight")
        };
        assert_eq!(a.target.name, want);
        assert_eq!(a.algorithm, Algorithm::LoCon);
        let t = &a.target.shape;
        assert_eq!(a.delta_shape, [t[0], t[1] * 9]);
        let a = adapter(&res, "lora_unet_input_blocks_6_0_op");
        assert!(
            a.target.name.ends_with("input_blocks.6.0.op.weight")
                || a.target.name == "down_blocks.1.downsamplers.0.conv.weight",
            "{}",
            a.target.name
        );
        let a = adapter(&res, "lora_unet_output_blocks_8_0_skip_connection");
        assert_eq!(a.algorithm, Algorithm::Lora, "1x1 conv");
        let a = adapter(&res, "lora_unet_middle_block_2_in_layers_2");
        assert!(
            a.target.name.ends_with("middle_block.2.in_layers.2.weight")
                || a.target.name == "mid_block.resnets.1.conv1.weight"
        );
        // The linear modules carry alpha = rank; the LoCons none.
        let with_alpha: Vec<&Adapter> = res
            .adapters
            .iter()
            .filter(|a| a.alpha != Alpha::Absent)
            .collect();
        assert_eq!(with_alpha.len(), n_linear);
        assert!(with_alpha
            .iter()
            .all(|a| (a.alpha, a.scale) == (Alpha::Tensor(r as f32), 1.0)));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Writes `specs` as a real LoRA file (factors with deterministic values
/// from seed 11; each `.alpha` the value `alphas` gives it, else 0) and
/// opens it with [`LoraFile::open`].
fn write_and_open(path: &Path, specs: &[TensorSpec], alphas: &[(String, f32)]) -> LoraFile {
    let tensors: Vec<(TensorSpec, Vec<u8>)> = specs
        .iter()
        .map(|s| {
            let bytes = if s.name.ends_with(".alpha") {
                let v = alphas
                    .iter()
                    .find(|(n, _)| *n == s.name)
                    .map_or(0.0, |a| a.1);
                crate::dtype::from_f32_slice(&[v], s.dtype).unwrap()
            } else {
                deterministic_bytes(11, s)
            };
            (s.clone(), bytes)
        })
        .collect();
    crate::synth::write_tensors(path, &tensors, &BTreeMap::new()).unwrap();
    LoraFile::open(path).unwrap()
}

/// kohya `lora_te2_` names are Hugging Face CLIP names; SDXL stores its
/// second encoder in OpenCLIP naming with a fused `in_proj_weight`.
#[test]
fn sdxl_text_encoders_including_open_clip_rows() {
    let model = small(Preset::Sdxl);
    let d = 1280 / 8;
    let specs = vec![
        spec(
            "lora_te2_text_model_encoder_layers_3_self_attn_k_proj.lora_down.weight",
            &[2, d],
        ),
        spec(
            "lora_te2_text_model_encoder_layers_3_self_attn_k_proj.lora_up.weight",
            &[d, 2],
        ),
        spec(
            "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_down.weight",
            &[2, 4 * d],
        ),
        spec(
            "lora_te2_text_model_encoder_layers_31_mlp_fc2.lora_up.weight",
            &[d, 2],
        ),
        spec(
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            &[2, 96],
        ),
        spec(
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
            &[96, 2],
        ),
    ];
    let r = LoraFile::from_specs("te.safetensors", &specs)
        .resolve_layout(&layout(&model), &strict())
        .unwrap();
    let a = adapter(&r, "lora_te2_text_model_encoder_layers_3_self_attn_k_proj");
    assert_eq!(
        a.target.name,
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    );
    assert_eq!(a.rows, Some(d..2 * d));
    let a = adapter(&r, "lora_te2_text_model_encoder_layers_31_mlp_fc2");
    assert_eq!(
        a.target.name,
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.weight"
    );
    let a = adapter(&r, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj");
    assert_eq!(
        a.target.name,
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    );
}

/// LoHa and LoKr in every arrangement of factors, with LyCORIS's scale
/// rules.
#[test]
fn loha_and_lokr_factorisations_and_scales() {
    let model = small(Preset::Sd15);
    let conv = "lora_unet_down_blocks_1_resnets_0_conv1"; // [80, 40, 3, 3]
    let lin = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"; // [1280, 160]
    assert_eq!(
        shape_of(
            &model,
            "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
        ),
        vec![80, 40, 3, 3]
    );
    assert_eq!(
        shape_of(
            &model,
            "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"
        ),
        vec![1280, 160]
    );
    let mut specs = vec![
        // LoHa on a linear, rank 3, alpha 6 → scale 2.
        spec(&format!("{lin}.hada_w1_a"), &[1280, 3]),
        spec(&format!("{lin}.hada_w1_b"), &[3, 160]),
        spec(&format!("{lin}.hada_w2_a"), &[1280, 3]),
        spec(&format!("{lin}.hada_w2_b"), &[3, 160]),
        spec(&format!("{lin}.alpha"), &[]),
        // LoHa on a 3x3 conv, stored flattened.
        spec(&format!("{conv}.hada_w1_a"), &[80, 2]),
        spec(&format!("{conv}.hada_w1_b"), &[2, 360]),
        spec(&format!("{conv}.hada_w2_a"), &[80, 2]),
        spec(&format!("{conv}.hada_w2_b"), &[2, 360]),
    ];
    // LoKr variants on the to_q of four transformer blocks ([40, 40] or
    // [80, 80]).
    let q = |blk: &str| format!("lora_unet_{blk}_transformer_blocks_0_attn1_to_q");
    let full_full = q("down_blocks_0_attentions_0"); // [40, 40]
    specs.push(spec(&format!("{full_full}.lokr_w1"), &[4, 5]));
    specs.push(spec(&format!("{full_full}.lokr_w2"), &[10, 8]));
    specs.push(spec(&format!("{full_full}.alpha"), &[]));
    let full_low = q("down_blocks_0_attentions_1"); // [40, 40]
    specs.push(spec(&format!("{full_low}.lokr_w1"), &[4, 4]));
    specs.push(spec(&format!("{full_low}.lokr_w2_a"), &[10, 5]));
    specs.push(spec(&format!("{full_low}.lokr_w2_b"), &[5, 10]));
    specs.push(spec(&format!("{full_low}.alpha"), &[]));
    let low_full = q("down_blocks_1_attentions_0"); // [80, 80]
    specs.push(spec(&format!("{low_full}.lokr_w1_a"), &[8, 2]));
    specs.push(spec(&format!("{low_full}.lokr_w1_b"), &[2, 8]));
    specs.push(spec(&format!("{low_full}.lokr_w2"), &[10, 10]));
    specs.push(spec(&format!("{low_full}.alpha"), &[]));
    // LoKr with a 4-D full w2 on a 3x3 conv ([80, 40, 3, 3]).
    let conv4 = "lora_unet_down_blocks_1_resnets_1_conv2"; // [80, 80, 3, 3]
    specs.push(spec(&format!("{conv4}.lokr_w1"), &[8, 8]));
    specs.push(spec(&format!("{conv4}.lokr_w2"), &[10, 10, 3, 3]));
    // A real file, read back through LoraFile::open.
    let dir = tmpdir("lycoris");
    let lora = write_and_open(
        &dir.join("lycoris.safetensors"),
        &specs,
        &[
            (format!("{lin}.alpha"), 6.0),
            (format!("{full_full}.alpha"), 123.0),
            (format!("{full_low}.alpha"), 10.0),
            (format!("{low_full}.alpha"), 0.0),
        ],
    );
    let s = lora.summary();
    assert_eq!(
        s.algorithms,
        BTreeMap::from([(Algorithm::LoHa, 2), (Algorithm::LoKr, 4)])
    );
    let r = lora.resolve_layout(&layout(&model), &strict()).unwrap();
    let a = adapter(&r, lin);
    assert_eq!(
        (a.algorithm, a.rank, a.scale),
        (Algorithm::LoHa, Some(3), 2.0)
    );
    assert_eq!(a.delta_shape, [1280, 160]);
    let a = adapter(&r, conv);
    assert_eq!((a.rank, a.scale, a.delta_shape), (Some(2), 1.0, [80, 360]));
    assert_eq!(a.target.shape, vec![80, 40, 3, 3]);
    // Both factors full: scale 1 whatever alpha says.
    let a = adapter(&r, &full_full);
    assert_eq!(
        (a.rank, a.alpha, a.scale),
        (None, Alpha::Tensor(123.0), 1.0)
    );
    assert_eq!(a.delta_shape, [40, 40]);
    // w2 low-rank: alpha / rank of w2.
    let a = adapter(&r, &full_low);
    assert_eq!((a.rank, a.scale), (Some(5), 2.0));
    // w1 low-rank, alpha 0 → alpha = rank.
    let a = adapter(&r, &low_full);
    assert_eq!((a.rank, a.scale), (Some(2), 1.0));
    let a = adapter(&r, conv4);
    assert_eq!(a.delta_shape, [80, 720]);
    let Delta::LoKr { w1, w2 } = &a.delta else {
        panic!()
    };
    assert_eq!((w1.shape(), w2.shape()), ([8, 8], [10, 90]));
    // The factor bytes read back from the file.
    let a = adapter(&r, conv);
    for f in a.delta.factors() {
        let mut buf = vec![0u8; f.len as usize];
        lora.read_factor_into(f, &mut buf).unwrap();
        assert_eq!(buf, deterministic_bytes(11, &spec_of(f)));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every kind of malformed module is a typed problem naming the key (and,
/// where it resolved, the target and the shapes); never a panic.
#[test]
fn malformed_modules_are_typed_problems() {
    let model = small(Preset::Sd15);
    let k = |s: &str| format!("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_{s}"); // [160, 160]
    let specs = vec![
        spec(&format!("{}.lora_up.weight", k("to_q")), &[160, 4]),
        spec(&format!("{}.lora_down.weight", k("to_k")), &[0, 160]),
        spec(&format!("{}.lora_up.weight", k("to_k")), &[160, 0]),
        spec(&format!("{}.lora_down.weight", k("to_v")), &[4, 160]),
        spec(&format!("{}.lora_up.weight", k("to_v")), &[160, 4]),
        spec(&format!("{}.alpha", k("to_v")), &[2]),
        spec(&format!("{}.lora_down.weight", k("to_out_0")), &[4, 160]),
        spec(&format!("{}.lora_up.weight", k("to_out_0")), &[160, 3]),
        TensorSpec::new(
            format!("{}.lora_down.weight", k("to_x")),
            Dtype::I8,
            &[4, 160],
        ),
        spec(
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
            &[4, 160],
        ),
        spec("lora_unet_mid_block_attentions_0_proj_in.lokr_w1", &[4, 4]),
        spec(
            "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight",
            &[4, 160],
        ),
        spec(
            "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight",
            &[160, 4],
        ),
        spec(
            "lora_unet_mid_block_attentions_0_proj_out.lora_A.weight",
            &[4, 160],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_conv1.lora_down.weight",
            &[4, 160, 3, 3],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_conv1.lora_mid.weight",
            &[4, 4, 3, 3],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_conv1.lora_up.weight",
            &[160, 4, 1, 1],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_conv2.lora_down.weight",
            &[4, 160],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_conv2.lora_up.weight",
            &[160, 4],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_time_emb_proj.lora_down.weight",
            &[4, 160],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_time_emb_proj.lora_up.weight",
            &[160, 4],
        ),
        spec(
            "lora_unet_mid_block_resnets_0_time_emb_proj.dora_scale",
            &[160, 1],
        ),
        spec("lora_unet_no_such_module.lora_down.weight", &[4, 160]),
        spec("lora_unet_no_such_module.lora_up.weight", &[160, 4]),
        spec("lora_unet_mid_block_attentions_0_norm.hada_w1_a", &[160, 2]),
        spec("lora_unet_mid_block_attentions_0_norm.hada_w1_b", &[2, 1]),
        spec("stray_tensor", &[3]),
        spec(&format!("{}.lora_down.weight", k("to_q_2")), &[4, 160, 1]),
        spec(&format!("{}.alpha", k("to_q_3")), &[]),
    ];
    let lora = LoraFile::from_specs("bad.safetensors", &specs);
    let index = TargetIndex::new(&layout(&model));
    let r = lora.resolve(&index, &lenient()).unwrap();
    assert!(r.adapters.is_empty(), "{:?}", r.adapters);
    let p = skipped(&r, &k("to_q"));
    assert!(
        matches!(p, LoraProblem::MissingFactor { missing, .. } if missing.contains("lora_down")),
        "{p}"
    );
    assert!(matches!(
        skipped(&r, &k("to_k")),
        LoraProblem::ZeroRank { .. }
    ));
    let p = skipped(&r, &k("to_v"));
    assert!(matches!(p, LoraProblem::BadAlpha { .. }), "{p}");
    assert!(p.to_string().contains("[2]"), "{p}");
    let p = skipped(&r, &k("to_out_0"));
    assert!(p.to_string().contains("up has rank 3"), "{p}");
    assert!(matches!(
        skipped(&r, &k("to_x")),
        LoraProblem::BadDtype {
            dtype: Dtype::I8,
            ..
        }
    ));
    let p = skipped(&r, "lora_unet_mid_block_attentions_0_proj_in");
    assert!(p.to_string().contains("mixes LoRA and LoKr"), "{p}");
    let p = skipped(&r, "lora_unet_mid_block_attentions_0_proj_out");
    assert!(p.to_string().contains("already has"), "{p}");
    let p = skipped(&r, "lora_unet_mid_block_resnets_0_conv1");
    assert!(
        matches!(p, LoraProblem::Unsupported { feature: Algorithm::Tucker, target: Some(t), .. }
            if t == "model.diffusion_model.middle_block.0.in_layers.2.weight"),
        "{p}"
    );
    // A linear LoRA on a 3x3 conv: 160 columns where 1440 are needed.
    let p = skipped(&r, "lora_unet_mid_block_resnets_0_conv2");
    match p {
        LoraProblem::ShapeMismatch(m) => {
            assert_eq!(
                m.target,
                "model.diffusion_model.middle_block.0.out_layers.3.weight"
            );
            assert_eq!(m.target_shape, vec![160, 160, 3, 3]);
            assert_eq!((m.expected, m.delta), ([160, 1440], [160, 160]));
        }
        p => panic!("{p}"),
    }
    let p = skipped(&r, "lora_unet_mid_block_resnets_0_time_emb_proj");
    assert!(
        matches!(
            p,
            LoraProblem::Unsupported {
                feature: Algorithm::Dora,
                ..
            }
        ),
        "{p}"
    );
    let p = skipped(&r, "lora_unet_no_such_module");
    assert_eq!(p.kind(), ProblemKind::Unmatched);
    assert!(p.to_string().contains("kohya name `no_such_module`"), "{p}");
    let p = skipped(&r, "lora_unet_mid_block_attentions_0_norm");
    assert!(matches!(p, LoraProblem::MissingFactor { .. }), "{p}");
    assert_eq!(skipped(&r, "stray_tensor").kind(), ProblemKind::UnknownKey);
    let p = skipped(&r, &k("to_q_2"));
    assert!(matches!(p, LoraProblem::MissingFactor { .. }), "{p}");
    let p = skipped(&r, &k("to_q_3"));
    assert!(
        matches!(p, LoraProblem::MissingFactor { missing, .. } if missing == "every factor"),
        "{p}"
    );
    assert_eq!(r.skipped.len(), 15);

    // Strict: the first problem, naming the file, the key and the count.
    let e = lora.resolve(&index, &strict()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, LoaderError::Lora { more: 14, .. }), "{msg}");
    assert!(msg.starts_with("bad.safetensors: LoRA adapter `"), "{msg}");
    assert!(msg.contains("14 more adapters"), "{msg}");

    // A shape mismatch as a strict error names file, key, target, shapes.
    let only = LoraFile::from_specs("mismatch.safetensors", &specs[17..19]);
    let msg = only.resolve(&index, &strict()).unwrap_err().to_string();
    for want in [
        "mismatch.safetensors",
        "lora_unet_mid_block_resnets_0_conv2",
        "model.diffusion_model.middle_block.0.out_layers.3.weight",
        "[160, 160, 3, 3]",
        "`lora_unet_mid_block_resnets_0_conv2.lora_down.weight` [4, 160]",
        "160×160 delta",
        "needs 160×1440",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
}

#[test]
fn alpha_values_multiplier_and_header_only_reads() {
    let model = small(Preset::Sd15);
    let key = "lora_te_text_model_encoder_layers_0_mlp_fc1"; // [384, 96]
    let specs = vec![
        spec(&format!("{key}.alpha"), &[]),
        spec(&format!("{key}.lora_down.weight"), &[8, 96]),
        spec(&format!("{key}.lora_up.weight"), &[384, 8]),
    ];
    let index = TargetIndex::new(&layout(&model));
    let mut lora = LoraFile::from_specs("h.safetensors", &specs);
    let r = lora.resolve(&index, &strict()).unwrap();
    assert_eq!(
        (r.adapters[0].alpha, r.adapters[0].scale),
        (Alpha::Unread, 1.0)
    );
    let f = r.adapters[0].delta.factors()[0].clone();
    let mut buf = vec![0u8; f.len as usize];
    assert!(matches!(
        lora.read_factor_into(&f, &mut buf),
        Err(LoaderError::LoraNoData { .. })
    ));
    lora.set_alpha(&format!("{key}.alpha"), 4.0);
    let opts = ResolveOptions {
        multiplier: -1.5,
        strict: true,
    };
    let r = lora.resolve(&index, &opts).unwrap();
    assert_eq!(r.adapters[0].scale, -0.75);
    lora.set_alpha(&format!("{key}.alpha"), f32::NAN);
    let r = lora.resolve(&index, &lenient()).unwrap();
    assert!(matches!(r.skipped[0].problem, LoraProblem::BadAlpha { .. }));
    for m in [f32::NAN, f32::INFINITY] {
        let opts = ResolveOptions {
            multiplier: m,
            strict: false,
        };
        assert!(matches!(
            lora.resolve(&index, &opts),
            Err(LoaderError::LoraMultiplier { .. })
        ));
    }
}

#[test]
fn truncated_lora_file_is_an_error_on_read() {
    let dir = tmpdir("truncated");
    let path = dir.join("t.safetensors");
    let key = "lora_te_text_model_encoder_layers_0_mlp_fc1";
    let specs = vec![
        spec(&format!("{key}.alpha"), &[]),
        spec(&format!("{key}.lora_down.weight"), &[8, 96]),
        spec(&format!("{key}.lora_up.weight"), &[384, 8]),
    ];
    write_lora(&path, &specs, 8.0, 1).unwrap();
    let lora = LoraFile::open(&path).unwrap();
    let r = lora
        .resolve_layout(&layout(&small(Preset::Sd15)), &strict())
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(std::fs::metadata(&path).unwrap().len() - 10)
        .unwrap();
    let up = match &r.adapters[0].delta {
        Delta::LowRank { up, .. } => up.clone(),
        d => panic!("{d:?}"),
    };
    let mut buf = vec![0u8; up.len as usize];
    assert!(matches!(
        lora.read_factor_into(&up, &mut buf),
        Err(LoaderError::Truncated { .. })
    ));
    // Opening the truncated file fails cleanly.
    assert!(LoraFile::open(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flux_names_that_cannot_be_targeted() {
    let model = small(Preset::Flux);
    let specs = vec![
        spec("transformer.norm_out.linear.lora_A.weight", &[4, 384]),
        spec("transformer.norm_out.linear.lora_B.weight", &[768, 4]),
        // kohya names are resolved against the model, so a diffusers-style
        // kohya FLUX key maps too (OneTrainer uses lora_transformer_).
        spec(
            "lora_transformer_transformer_blocks_0_attn_to_k.lora_down.weight",
            &[4, 384],
        ),
        spec(
            "lora_transformer_transformer_blocks_0_attn_to_k.lora_up.weight",
            &[384, 4],
        ),
    ];
    let r = LoraFile::from_specs("f.safetensors", &specs)
        .resolve_layout(&layout(&model), &lenient())
        .unwrap();
    let p = skipped(&r, "transformer.norm_out.linear");
    assert!(p.to_string().contains("swapped"), "{p}");
    let a = adapter(&r, "lora_transformer_transformer_blocks_0_attn_to_k");
    assert_eq!(a.target.name, "double_blocks.0.img_attn.qkv.weight");
    assert_eq!(a.rows, Some(384..768));
}

/// A model whose names flatten alike for kohya (`proj_in` and `proj.in`):
/// a kohya key is reported ambiguous, naming both, and never guessed.
#[test]
fn kohya_names_that_flatten_alike_are_ambiguous() {
    let model = vec![
        spec("transformer_blocks.0.proj_in.weight", &[8, 8]),
        spec("transformer_blocks.0.proj.in.weight", &[8, 8]),
    ];
    let index = TargetIndex::new(&layout(&model));
    let key = "lora_unet_transformer_blocks_0_proj_in";
    let specs = vec![
        spec(&format!("{key}.lora_down.weight"), &[2, 8]),
        spec(&format!("{key}.lora_up.weight"), &[8, 2]),
        // Dotted names are not ambiguous.
        spec(
            "transformer.transformer_blocks.0.proj.in.lora_A.weight",
            &[2, 8],
        ),
        spec(
            "transformer.transformer_blocks.0.proj.in.lora_B.weight",
            &[8, 2],
        ),
    ];
    let lora = LoraFile::from_specs("amb.safetensors", &specs);
    let r = lora.resolve(&index, &lenient()).unwrap();
    let p = skipped(&r, key);
    assert_eq!(p.kind(), ProblemKind::Unmatched);
    let msg = p.to_string();
    for want in [
        "ambiguous",
        "`transformer_blocks_0_proj_in`",
        "`transformer_blocks.0.proj_in`",
        "`transformer_blocks.0.proj.in`",
    ] {
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let a = adapter(&r, "transformer.transformer_blocks.0.proj.in");
    assert_eq!(a.target.name, "transformer_blocks.0.proj.in.weight");
    let e = lora.resolve(&index, &strict()).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("ambiguous"), "{e}");
}

/// ComfyUI reads alpha with `.item()`: an integer scalar is an alpha too.
#[test]
fn integer_alpha_tensors() {
    let model = small(Preset::Sd15);
    let key = |i: u32| format!("lora_te_text_model_encoder_layers_{i}_mlp_fc1"); // [384, 96]
    let mut tensors = Vec::new();
    for (i, (dtype, bytes)) in [
        (Dtype::I64, 8i64.to_le_bytes().to_vec()),
        (Dtype::I32, 2i32.to_le_bytes().to_vec()),
        (Dtype::U8, vec![12u8]),
        (Dtype::Bool, vec![1u8]),
    ]
    .into_iter()
    .enumerate()
    {
        let k = key(i as u32);
        let down = spec(&format!("{k}.lora_down.weight"), &[4, 96]);
        let up = spec(&format!("{k}.lora_up.weight"), &[384, 4]);
        tensors.push((TensorSpec::new(format!("{k}.alpha"), dtype, &[]), bytes));
        tensors.push((down.clone(), deterministic_bytes(1, &down)));
        tensors.push((up.clone(), deterministic_bytes(1, &up)));
    }
    let dir = tmpdir("int-alpha");
    let path = dir.join("int_alpha.safetensors");
    crate::synth::write_tensors(&path, &tensors, &BTreeMap::new()).unwrap();
    let lora = LoraFile::open(&path).unwrap();
    assert_eq!(lora.summary().alphas, vec![2.0, 8.0, 12.0]);
    let r = lora.resolve_layout(&layout(&model), &lenient()).unwrap();
    for (i, alpha, scale) in [(0, 8.0, 2.0), (1, 2.0, 0.5), (2, 12.0, 3.0)] {
        let a = adapter(&r, &key(i));
        assert_eq!(
            (a.alpha, a.scale),
            (Alpha::Tensor(alpha), scale),
            "{}",
            a.key
        );
    }
    let p = skipped(&r, &key(3));
    assert!(
        matches!(p, LoraProblem::BadAlpha { detail, .. } if detail.contains("BOOL")),
        "{p}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A small SD3 (MMDiT) single-file transformer: `depth` joint blocks of
/// width `h`, the last one's context block pre-only (it modulates its
/// input, `[2h, h]`, and has no output projection or MLP), named as in
/// `sd3_medium.safetensors`.
fn sd3_specs(h: u64, depth: u64) -> Vec<TensorSpec> {
    let p = "model.diffusion_model.";
    let mut v = vec![
        spec(&format!("{p}pos_embed"), &[1, 16, h]),
        spec(&format!("{p}x_embedder.proj.weight"), &[h, 16, 2, 2]),
        spec(&format!("{p}context_embedder.weight"), &[h, 64]),
        spec(&format!("{p}t_embedder.mlp.0.weight"), &[h, 32]),
        spec(&format!("{p}t_embedder.mlp.2.weight"), &[h, h]),
        spec(&format!("{p}y_embedder.mlp.0.weight"), &[h, 48]),
        spec(&format!("{p}y_embedder.mlp.2.weight"), &[h, h]),
        spec(&format!("{p}final_layer.linear.weight"), &[64, h]),
        spec(
            &format!("{p}final_layer.adaLN_modulation.1.weight"),
            &[2 * h, h],
        ),
    ];
    for i in 0..depth {
        let b = format!("{p}joint_blocks.{i}");
        let last = i + 1 == depth;
        for (m, shape) in [
            ("x_block.attn.qkv", [3 * h, h]),
            ("x_block.attn.proj", [h, h]),
            ("x_block.mlp.fc1", [4 * h, h]),
            ("x_block.mlp.fc2", [h, 4 * h]),
            ("x_block.adaLN_modulation.1", [6 * h, h]),
            ("context_block.attn.qkv", [3 * h, h]),
            (
                "context_block.adaLN_modulation.1",
                [if last { 2 } else { 6 } * h, h],
            ),
        ] {
            v.push(spec(&format!("{b}.{m}.weight"), &shape));
        }
        if !last {
            for (m, shape) in [
                ("context_block.attn.proj", [h, h]),
                ("context_block.mlp.fc1", [4 * h, h]),
                ("context_block.mlp.fc2", [h, 4 * h]),
            ] {
                v.push(spec(&format!("{b}.{m}.weight"), &shape));
            }
        }
    }
    v
}

/// A diffusers-format SD3 LoRA (`transformer.transformer_blocks.N.attn.to_q`
/// ...) on an SD3 single-file checkpoint: q/k/v are row slices of the fused
/// `qkv`, the rest whole weights, as ComfyUI's MMDiT key map has it.
#[test]
fn diffusers_sd3_lora_on_single_file_mmdit() {
    let (h, depth, r) = (32u64, 3u64, 2u64);
    let model = sd3_specs(h, depth);
    let index = TargetIndex::new(&layout(&model));
    let mut specs = Vec::new();
    let mut lo = |key: String, rows: u64, cols: u64| {
        specs.push(spec(&format!("{key}.lora_A.weight"), &[r, cols]));
        specs.push(spec(&format!("{key}.lora_B.weight"), &[rows, r]));
    };
    for i in 0..depth {
        let b = format!("transformer.transformer_blocks.{i}");
        let last = i + 1 == depth;
        for m in [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_out.0",
        ] {
            lo(format!("{b}.{m}"), h, h);
        }
        lo(format!("{b}.ff.net.0.proj"), 4 * h, h);
        lo(format!("{b}.ff.net.2"), h, 4 * h);
        lo(format!("{b}.norm1.linear"), 6 * h, h);
        lo(
            format!("{b}.norm1_context.linear"),
            if last { 2 } else { 6 } * h,
            h,
        );
        if !last {
            lo(format!("{b}.attn.to_add_out"), h, h);
            lo(format!("{b}.ff_context.net.0.proj"), 4 * h, h);
            lo(format!("{b}.ff_context.net.2"), h, 4 * h);
        }
    }
    lo("transformer.context_embedder".into(), h, 64);
    lo(
        "transformer.time_text_embed.timestep_embedder.linear_1".into(),
        h,
        32,
    );
    lo(
        "transformer.time_text_embed.text_embedder.linear_2".into(),
        h,
        h,
    );
    lo("transformer.proj_out".into(), 64, h);
    lo("transformer.norm_out.linear".into(), 2 * h, h);
    // The patch embedding is a 2x2 conv: a LoCon.
    specs.push(spec(
        "transformer.pos_embed.proj.lora_A.weight",
        &[r, 16, 2, 2],
    ));
    specs.push(spec(
        "transformer.pos_embed.proj.lora_B.weight",
        &[h, r, 1, 1],
    ));
    // kohya names of diffusers paths resolve too.
    let k = "lora_transformer_transformer_blocks_1_attn_add_v_proj";
    specs.push(spec(&format!("{k}.lora_down.weight"), &[r, h]));
    specs.push(spec(&format!("{k}.lora_up.weight"), &[h, r]));

    let lora = LoraFile::from_specs("sd3_lora.safetensors", &specs);
    assert_eq!(lora.summary().naming, Naming::Diffusers);
    let res = lora.resolve(&index, &lenient()).unwrap();
    let p = "model.diffusion_model.";
    for (key, target, rows) in [
        (
            "transformer.transformer_blocks.0.attn.to_q",
            "joint_blocks.0.x_block.attn.qkv",
            Some(0..h),
        ),
        (
            "transformer.transformer_blocks.2.attn.to_v",
            "joint_blocks.2.x_block.attn.qkv",
            Some(2 * h..3 * h),
        ),
        (
            "transformer.transformer_blocks.1.attn.add_k_proj",
            "joint_blocks.1.context_block.attn.qkv",
            Some(h..2 * h),
        ),
        (
            "transformer.transformer_blocks.2.attn.add_q_proj",
            "joint_blocks.2.context_block.attn.qkv",
            Some(0..h),
        ),
        (
            k,
            "joint_blocks.1.context_block.attn.qkv",
            Some(2 * h..3 * h),
        ),
        (
            "transformer.transformer_blocks.0.attn.to_out.0",
            "joint_blocks.0.x_block.attn.proj",
            None,
        ),
        (
            "transformer.transformer_blocks.0.attn.to_add_out",
            "joint_blocks.0.context_block.attn.proj",
            None,
        ),
        (
            "transformer.transformer_blocks.1.ff.net.0.proj",
            "joint_blocks.1.x_block.mlp.fc1",
            None,
        ),
        (
            "transformer.transformer_blocks.1.ff.net.2",
            "joint_blocks.1.x_block.mlp.fc2",
            None,
        ),
        (
            "transformer.transformer_blocks.0.ff_context.net.0.proj",
            "joint_blocks.0.context_block.mlp.fc1",
            None,
        ),
        (
            "transformer.transformer_blocks.1.ff_context.net.2",
            "joint_blocks.1.context_block.mlp.fc2",
            None,
        ),
        (
            "transformer.transformer_blocks.2.norm1.linear",
            "joint_blocks.2.x_block.adaLN_modulation.1",
            None,
        ),
        (
            "transformer.transformer_blocks.1.norm1_context.linear",
            "joint_blocks.1.context_block.adaLN_modulation.1",
            None,
        ),
        ("transformer.context_embedder", "context_embedder", None),
        (
            "transformer.time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.0",
            None,
        ),
        (
            "transformer.time_text_embed.text_embedder.linear_2",
            "y_embedder.mlp.2",
            None,
        ),
        ("transformer.proj_out", "final_layer.linear", None),
        ("transformer.pos_embed.proj", "x_embedder.proj", None),
    ] {
        let a = adapter(&res, key);
        assert_eq!(
            (a.target.name.as_str(), a.rows.clone()),
            (format!("{p}{target}.weight").as_str(), rows),
            "{key}"
        );
    }
    assert_eq!(
        adapter(&res, "transformer.pos_embed.proj").algorithm,
        Algorithm::LoCon
    );
    // The halves diffusers swaps cannot be targeted: reported per key.
    for key in [
        "transformer.transformer_blocks.2.norm1_context.linear",
        "transformer.norm_out.linear",
    ] {
        let p = skipped(&res, key);
        assert!(
            matches!(p, LoraProblem::Unsupported { .. }) && p.to_string().contains("swapped"),
            "{key}: {p}"
        );
    }
    assert_eq!(res.skipped.len(), 2, "{:?}", res.skipped);
    // 2 blocks × 14 modules, the last block's 10 (its context block has
    // no output projection or MLP, and norm1_context is skipped), 4
    // top-level modules, the patch embedding, the kohya key.
    assert_eq!(res.adapters.len(), 2 * 14 + 10 + 4 + 1 + 1);
}

/// The FLUX preset (BFL names) as a diffusers `transformer/` folder: the
/// fused BFL weights split into diffusers' separate ones.
fn flux_diffusers_layout(model: &[TensorSpec]) -> ModelLayout {
    let files = vec![LayoutFile {
        path: "flux/transformer/diffusion_pytorch_model.safetensors".into(),
        group: Some("transformer".into()),
        unit: None,
        len: 0,
    }];
    let mut tensors = Vec::new();
    for s in model {
        let Some(m) = s.name.strip_suffix(".weight") else {
            continue;
        };
        let mut names = crate::lora::flux_bfl_to_diffusers(m, &s.shape);
        if m == "final_layer.adaLN_modulation.1" {
            names.push(("norm_out.linear".into(), None));
        }
        for (d, rows) in names {
            let mut shape = s.shape.clone();
            if let Some(r) = rows {
                shape[0] = r.end - r.start;
            }
            let t = TensorSpec::new(format!("{d}.weight"), s.dtype, &shape);
            tensors.push(TensorRef {
                name: t.name.clone(),
                dtype: t.dtype,
                len: t.byte_len().unwrap(),
                shape,
                data_offset: 0,
                file: 0,
            });
        }
    }
    ModelLayout::from_tensors(files, tensors)
}

/// BFL-named FLUX LoRAs (kohya `lora_unet_double_blocks_…`, ai-toolkit
/// `diffusion_model.…`, XLabs) on a diffusers-layout FLUX folder: whole
/// weights map one to one; a LoRA on BFL's fused qkv or linear1 is reported
/// per key, with the reason.
#[test]
fn bfl_flux_lora_on_a_diffusers_folder() {
    let model = small(Preset::Flux);
    let diffusers = flux_diffusers_layout(&model);
    assert!(diffusers.component("transformer").is_some_and(|c| c
        .relative_tensors()
        .any(|(n, _)| n == "transformer_blocks.0.attn.to_q.weight")));
    let index = TargetIndex::new(&diffusers);
    let h = 3072 / 8;
    let mut specs = lora_specs(
        &model,
        &LoraOptions {
            convention: LoraConvention::Kohya,
            rank: 2,
            dtype: Dtype::F16,
        },
    );
    for (key, rows, cols) in [
        ("diffusion_model.double_blocks.0.img_mlp.0", 4 * h, h),
        ("double_blocks.1.processor.proj_lora2", h, h),
        ("final_layer.linear", 64, h),
        ("diffusion_model.time_in.in_layer", h, 256),
    ] {
        specs.push(spec(&format!("{key}.lora_down.weight"), &[2, cols]));
        specs.push(spec(&format!("{key}.lora_up.weight"), &[rows, 2]));
    }
    let lora = LoraFile::from_specs("bfl.safetensors", &specs);
    let r = lora.resolve(&index, &lenient()).unwrap();
    for (key, target) in [
        (
            "lora_unet_double_blocks_0_img_attn_proj",
            "transformer_blocks.0.attn.to_out.0",
        ),
        (
            "lora_unet_double_blocks_3_txt_attn_proj",
            "transformer_blocks.3.attn.to_add_out",
        ),
        (
            "lora_unet_double_blocks_4_img_mlp_2",
            "transformer_blocks.4.ff.net.2",
        ),
        (
            "lora_unet_double_blocks_5_txt_mlp_0",
            "transformer_blocks.5.ff_context.net.0.proj",
        ),
        (
            "lora_unet_double_blocks_2_img_mod_lin",
            "transformer_blocks.2.norm1.linear",
        ),
        (
            "lora_unet_double_blocks_2_txt_mod_lin",
            "transformer_blocks.2.norm1_context.linear",
        ),
        (
            "lora_unet_single_blocks_3_linear2",
            "single_transformer_blocks.3.proj_out",
        ),
        (
            "lora_unet_single_blocks_37_modulation_lin",
            "single_transformer_blocks.37.norm.linear",
        ),
        (
            "diffusion_model.double_blocks.0.img_mlp.0",
            "transformer_blocks.0.ff.net.0.proj",
        ),
        (
            "double_blocks.1.processor.proj_lora2",
            "transformer_blocks.1.attn.to_add_out",
        ),
        ("final_layer.linear", "proj_out"),
        (
            "diffusion_model.time_in.in_layer",
            "time_text_embed.timestep_embedder.linear_1",
        ),
    ] {
        let a = adapter(&r, key);
        assert_eq!(
            (a.target.name.as_str(), a.rows.clone()),
            (format!("{target}.weight").as_str(), None),
            "{key}"
        );
    }
    // Whole weights: 19 × 8 double-block and 38 × 2 single-block modules,
    // and the four above.
    assert_eq!(r.adapters.len(), 19 * 8 + 38 * 2 + 4);
    // Fused weights: one report per key, naming why.
    assert_eq!(r.skipped.len(), 19 * 2 + 38, "{:?}", r.skipped);
    for s in &r.skipped {
        let msg = s.problem.to_string();
        assert!(
            matches!(s.problem, LoraProblem::Unsupported { .. })
                && msg.contains("splitting the LoRA's up factor"),
            "{}: {msg}",
            s.key
        );
    }
    let msg = skipped(&r, "lora_unet_single_blocks_0_linear1").to_string();
    assert!(
        msg.contains("proj_mlp") && msg.contains("four row blocks"),
        "{msg}"
    );
    let msg = skipped(&r, "lora_unet_double_blocks_0_txt_attn_qkv").to_string();
    assert!(msg.contains("add_q_proj"), "{msg}");
}
