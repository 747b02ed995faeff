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
    let lora = LoraFile::from_specs("sdxl_lora.safetensors", &specs);
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
    }
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
    let mut lora = LoraFile::from_specs("lycoris.safetensors", &specs);
    lora.set_alpha(&format!("{lin}.alpha"), 6.0);
    lora.set_alpha(&format!("{full_full}.alpha"), 123.0);
    lora.set_alpha(&format!("{full_low}.alpha"), 10.0);
    lora.set_alpha(&format!("{low_full}.alpha"), 0.0);
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
