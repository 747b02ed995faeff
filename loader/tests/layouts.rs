//! Layouts of synthetic models with real names: presets at full size (from
//! names and shapes only) and small copies written to disk and read back.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use offload_loader::layout::{ComponentKind, Model, ModelLayout, REMAINDER};
use offload_loader::safetensors::{Checkpoint, OpenOptions};
use offload_loader::synth::{
    deterministic_bytes, preset_specs, write_deterministic, Preset, PresetOptions, TensorSpec,
};
use offload_loader::{Dtype, LoaderError};

fn full(preset: Preset) -> ModelLayout {
    let specs = preset_specs(preset, &PresetOptions::default());
    ModelLayout::from_specs(Path::new("full.safetensors"), &specs)
}

fn layer_names(l: &ModelLayout, comp: &str) -> Vec<String> {
    l.component(comp)
        .unwrap_or_else(|| panic!("no component {comp}"))
        .layers
        .iter()
        .map(|l| l.name.clone())
        .collect()
}

/// The expected SDXL UNet layer list, written out by hand from the
/// architecture (2 resnets per level, transformer depth 0/2/10).
fn sdxl_unet_layers() -> Vec<String> {
    let mut v: Vec<String> = vec!["time_embed".into(), "label_emb".into()];
    let attn = |v: &mut Vec<String>, p: &str, depth: usize| {
        v.push(format!("{p}.proj_in"));
        for d in 0..depth {
            v.push(format!("{p}.transformer_blocks.{d}"));
        }
        v.push(format!("{p}.proj_out"));
    };
    for b in [
        "input_blocks.0.0",
        "input_blocks.1.0",
        "input_blocks.2.0",
        "input_blocks.3.0",
    ] {
        v.push(b.into());
    }
    for (b, depth) in [(4, 2), (5, 2)] {
        v.push(format!("input_blocks.{b}.0"));
        attn(&mut v, &format!("input_blocks.{b}.1"), depth);
    }
    v.push("input_blocks.6.0".into());
    for b in [7, 8] {
        v.push(format!("input_blocks.{b}.0"));
        attn(&mut v, &format!("input_blocks.{b}.1"), 10);
    }
    v.push("middle_block.0".into());
    attn(&mut v, "middle_block.1", 10);
    v.push("middle_block.2".into());
    for b in 0..9 {
        v.push(format!("output_blocks.{b}.0"));
        match b {
            0..=2 => attn(&mut v, &format!("output_blocks.{b}.1"), 10),
            3..=5 => attn(&mut v, &format!("output_blocks.{b}.1"), 2),
            _ => {}
        }
        if b == 2 || b == 5 {
            v.push(format!("output_blocks.{b}.2"));
        }
    }
    v.push("out".into());
    v
}

#[test]
fn full_size_sdxl_layout() {
    let l = full(Preset::Sdxl);
    let comps: Vec<(&str, ComponentKind, &str)> = l
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.kind, c.prefix.as_str()))
        .collect();
    assert_eq!(
        comps,
        [
            (
                "text_encoder",
                ComponentKind::TextEncoder,
                "conditioner.embedders.0.transformer."
            ),
            (
                "text_encoder_2",
                ComponentKind::TextEncoder,
                "conditioner.embedders.1.model."
            ),
            ("unet", ComponentKind::Denoiser, "model.diffusion_model."),
            ("vae", ComponentKind::Vae, "first_stage_model."),
        ]
    );
    let unet = l.component("unet").unwrap();
    assert_eq!(layer_names(&l, "unet"), sdxl_unet_layers());
    assert_eq!(unet.layers.len(), 117);
    assert_eq!(unet.bytes(), 2 * 2_567_463_684);
    assert!(unet.layer(REMAINDER).is_none());

    // The UNet's largest layer: the first up resnet (2560 -> 1280 channels).
    let big = unet.largest_layer().unwrap();
    assert_eq!(big.name, "output_blocks.0.0");
    assert_eq!(big.bytes(), 98_329_600);
    assert!(big.bytes() < 100_000_000);
    // The model's largest layer is one tensor: bigG's token embedding.
    let (c, big) = l.largest_layer().unwrap();
    assert_eq!(
        (c.name.as_str(), big.name.as_str()),
        ("text_encoder_2", "token_embedding")
    );
    assert_eq!(big.bytes(), 49408 * 1280 * 2);
    // A whole stage would be far too big to stream.
    let stage: u64 = unet
        .layers
        .iter()
        .filter(|x| x.name.starts_with("input_blocks.8."))
        .map(|x| x.bytes())
        .sum();
    assert_eq!(stage, 763_957_760);
    // Each 1280-wide transformer block is one layer of ~69 MB.
    let tb = unet.layer("input_blocks.8.1.transformer_blocks.3").unwrap();
    assert_eq!(tb.tensors.len(), 20);
    assert_eq!(tb.bytes(), 69_511_680);
    let proj_in = unet.layer("input_blocks.8.1.proj_in").unwrap();
    let names: Vec<&str> = proj_in.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.diffusion_model.input_blocks.8.1.norm.weight",
            "model.diffusion_model.input_blocks.8.1.norm.bias",
            "model.diffusion_model.input_blocks.8.1.proj_in.weight",
            "model.diffusion_model.input_blocks.8.1.proj_in.bias",
        ]
    );

    // Text encoders: embeddings, 12 / 32 layers, heads.
    let te = layer_names(&l, "text_encoder");
    assert_eq!(te.len(), 14);
    assert_eq!(te[0], "text_model.embeddings");
    assert_eq!(te[12], "text_model.encoder.layers.11");
    assert_eq!(te[13], "text_model.final_layer_norm");
    let te2 = layer_names(&l, "text_encoder_2");
    assert_eq!(te2.len(), 37);
    assert_eq!(
        te2[..3],
        [
            "token_embedding",
            "positional_embedding",
            "transformer.resblocks.0"
        ]
    );
    assert_eq!(
        te2[33..],
        [
            "transformer.resblocks.31",
            "ln_final",
            "text_projection",
            "logit_scale"
        ]
    );
}

#[test]
fn full_size_sd15_vae_runs_decoder_up_blocks_downward() {
    let l = full(Preset::Sd15);
    let comps: Vec<&str> = l.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(comps, ["text_encoder", "unet", "vae"]);
    assert_eq!(
        l.component("text_encoder").unwrap().prefix,
        "cond_stage_model.transformer."
    );
    let vae = layer_names(&l, "vae");
    let mut expect: Vec<String> = vec!["encoder.conv_in".into()];
    for i in 0..4 {
        expect.push(format!("encoder.down.{i}.block.0"));
        expect.push(format!("encoder.down.{i}.block.1"));
        if i < 3 {
            expect.push(format!("encoder.down.{i}.downsample"));
        }
    }
    for m in ["block_1", "attn_1", "block_2"] {
        expect.push(format!("encoder.mid.{m}"));
    }
    expect.extend(
        [
            "encoder.norm_out",
            "encoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        ]
        .map(String::from),
    );
    expect.push("decoder.conv_in".into());
    for m in ["block_1", "attn_1", "block_2"] {
        expect.push(format!("decoder.mid.{m}"));
    }
    for i in (0..4).rev() {
        for j in 0..3 {
            expect.push(format!("decoder.up.{i}.block.{j}"));
        }
        if i > 0 {
            expect.push(format!("decoder.up.{i}.upsample"));
        }
    }
    expect.extend(["decoder.norm_out", "decoder.conv_out"].map(String::from));
    assert_eq!(vae, expect);

    let unet = layer_names(&l, "unet");
    // SD 1.5: attention depth 1 at three levels, conv proj_in/out.
    assert_eq!(unet.len(), 79);
    assert_eq!(
        unet[..8],
        [
            "time_embed",
            "input_blocks.0.0",
            "input_blocks.1.0",
            "input_blocks.1.1.proj_in",
            "input_blocks.1.1.transformer_blocks.0",
            "input_blocks.1.1.proj_out",
            "input_blocks.2.0",
            "input_blocks.2.1.proj_in",
        ]
    );
    // input_blocks 10 and 11 come after 9, not after 1.
    let pos = |n: &str| unet.iter().position(|x| x == n).unwrap();
    assert!(pos("input_blocks.9.0") < pos("input_blocks.10.0"));
    assert!(pos("input_blocks.11.0") < pos("middle_block.0"));
    assert!(pos("output_blocks.2.1") < pos("output_blocks.3.0"));
    assert_eq!(unet.last().unwrap(), "out");
}

#[test]
fn full_size_flux_layout() {
    let l = full(Preset::Flux);
    let comps: Vec<&str> = l.components.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(comps, ["clip_l", "t5xxl", "transformer"]);
    let t = layer_names(&l, "transformer");
    assert_eq!(t.len(), 5 + 19 + 38 + 1);
    assert_eq!(
        t[..6],
        [
            "img_in",
            "time_in",
            "guidance_in",
            "vector_in",
            "txt_in",
            "double_blocks.0"
        ]
    );
    assert_eq!(t[23], "double_blocks.18");
    assert_eq!(t[24], "single_blocks.0");
    assert_eq!(t[62], "final_layer");
    let t5 = layer_names(&l, "t5xxl");
    assert_eq!(t5.len(), 26);
    assert_eq!(t5[0], "shared");
    assert_eq!(t5[25], "encoder.final_layer_norm");
}

/// A small SDXL copy written to disk: the layout is the same as full size,
/// and every tensor reads back with its deterministic bytes, whole and in
/// chunks through a small staging buffer.
#[test]
fn small_sdxl_file_reads_back() {
    let dir = common::tmpdir("small-sdxl");
    let path = dir.join("sdxl_small.safetensors");
    let opts = PresetOptions {
        scale: 32,
        dtype: Dtype::F16,
        ..PresetOptions::default()
    };
    let specs = preset_specs(Preset::Sdxl, &opts);
    let md = BTreeMap::from([(
        "modelspec.architecture".to_string(),
        "stable-diffusion-xl-v1-base".to_string(),
    )]);
    write_deterministic(&path, &specs, &md, 1234).unwrap();
    let model = Model::open(&path).unwrap();
    assert_eq!(model.checkpoint.files()[0].metadata(), &md);
    assert_eq!(layer_names(&model.layout, "unet"), sdxl_unet_layers());
    assert_eq!(model.layout.tensor_count(), specs.len());
    assert_eq!(model.layout.files.len(), 1);

    let by_name: BTreeMap<&str, &TensorSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut stage = [0u8; 1000];
    for c in &model.layout.components {
        for layer in &c.layers {
            for t in &layer.tensors {
                let expect = deterministic_bytes(1234, by_name[t.name.as_str()]);
                let mut whole = vec![0u8; t.len as usize];
                model.read_tensor_into(t, &mut whole).unwrap();
                assert_eq!(whole, expect, "{}", t.name);
                let mut chunked = Vec::with_capacity(t.len as usize);
                let mut off = 0u64;
                while off < t.len {
                    let n = stage.len().min((t.len - off) as usize);
                    model
                        .read_tensor_range_into(t, off, &mut stage[..n])
                        .unwrap();
                    chunked.extend_from_slice(&stage[..n]);
                    off += n as u64;
                }
                assert_eq!(chunked, expect, "{}", t.name);
            }
        }
    }
    // Out-of-range and wrong-size reads are errors, not panics.
    let t = &model.layout.component("unet").unwrap().layers[0].tensors[0];
    let mut buf = vec![0u8; t.len as usize + 1];
    assert!(matches!(
        model.read_tensor_into(t, &mut buf),
        Err(LoaderError::BufferSize { .. })
    ));
    assert!(matches!(
        model.read_tensor_range_into(t, t.len, &mut buf[..1]),
        Err(LoaderError::ReadOutOfRange { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_after_open_is_an_error() {
    let dir = common::tmpdir("truncate");
    let path = dir.join("m.safetensors");
    let specs = vec![
        TensorSpec::new("a", Dtype::F32, &[256]),
        TensorSpec::new("b", Dtype::F32, &[256]),
    ];
    write_deterministic(&path, &specs, &BTreeMap::new(), 1).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    let f = &ckpt.files()[0];
    let full_len = f.file_len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(full_len - 100)
        .unwrap();
    let mut buf = vec![0u8; 1024];
    // `a` is still all there, but the file is not the one opened any more.
    match f.read_tensor_into("a", &mut buf) {
        Err(LoaderError::Changed {
            file_len_at_open,
            file_len_now,
            ..
        }) => assert_eq!((file_len_at_open, file_len_now), (full_len, full_len - 100)),
        other => panic!("expected Changed, got {other:?}"),
    }
    match f.read_tensor_into("b", &mut buf) {
        Err(LoaderError::Truncated {
            what,
            len,
            file_len_at_open,
            file_len_now,
            ..
        }) => {
            assert_eq!(what, "tensor `b`");
            assert_eq!(
                (len, file_len_at_open, file_len_now),
                (1024, full_len, full_len - 100)
            );
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    let msg = f.read_tensor_into("b", &mut buf).unwrap_err().to_string();
    assert!(
        msg.contains("m.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn write_small(path: &Path, names: &[&str], seed: u64) {
    let specs: Vec<TensorSpec> = names
        .iter()
        .map(|n| TensorSpec::new(*n, Dtype::F16, &[4]))
        .collect();
    write_deterministic(path, &specs, &BTreeMap::new(), seed).unwrap();
}

fn weight_map(path: &Path, map: &[(&str, &str)]) {
    let m: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(t, f)| ((*t).to_owned(), serde_json::Value::String((*f).to_owned())))
        .collect();
    let v = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": m });
    std::fs::write(path, v.to_string()).unwrap();
}

fn file_names(l: &ModelLayout) -> Vec<(String, Option<String>)> {
    l.files
        .iter()
        .map(|f| {
            (
                f.path.file_name().unwrap().to_string_lossy().into_owned(),
                f.unit.clone(),
            )
        })
        .collect()
}

fn components(l: &ModelLayout) -> Vec<(&str, ComponentKind)> {
    l.components
        .iter()
        .map(|c| (c.name.as_str(), c.kind))
        .collect()
}

#[test]
fn shard_folder_and_duplicates() {
    let dir = common::tmpdir("shards");
    write_small(
        &dir.join("model-00002-of-00002.safetensors"),
        &["model.layers.1.w", "model.norm.weight"],
        2,
    );
    write_small(
        &dir.join("model-00001-of-00002.safetensors"),
        &["model.embed_tokens.weight", "model.layers.0.w"],
        1,
    );
    let m = Model::open(&dir).unwrap();
    assert_eq!(
        file_names(&m.layout),
        [
            ("model-00001-of-00002.safetensors".into(), None),
            ("model-00002-of-00002.safetensors".into(), None)
        ]
    );
    assert_eq!(
        layer_names(&m.layout, "model"),
        [
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.norm"
        ]
    );
    let l1 = &m.layout.component("model").unwrap().layers[2].tensors[0];
    assert_eq!(l1.file, 1);

    // A file that is not a shard of the set is a model of its own, not
    // merged into the shards (and its names may repeat theirs).
    write_small(
        &dir.join("model-extra.safetensors"),
        &["model.norm.weight"],
        3,
    );
    let m = Model::open(&dir).unwrap();
    assert_eq!(
        file_names(&m.layout),
        [
            (
                "model-00001-of-00002.safetensors".into(),
                Some("model".into())
            ),
            (
                "model-00002-of-00002.safetensors".into(),
                Some("model".into())
            ),
            ("model-extra.safetensors".into(), Some("model-extra".into())),
        ]
    );
    assert_eq!(
        components(&m.layout),
        [
            ("model", ComponentKind::Other),
            ("model-extra", ComponentKind::Other)
        ]
    );
    assert_eq!(m.layout.component("model").unwrap().tensor_count(), 4);
    assert!(m
        .checkpoint
        .get_in(Some("model-extra"), "model.norm.weight")
        .is_some());
    std::fs::remove_file(dir.join("model-extra.safetensors")).unwrap();

    // Two shards of one set naming the same tensor.
    write_small(
        &dir.join("model-00001-of-00002.safetensors"),
        &["model.embed_tokens.weight", "model.norm.weight"],
        1,
    );
    match Checkpoint::open(&dir) {
        Err(LoaderError::DuplicateTensor { tensor, .. }) => assert_eq!(tensor, "model.norm.weight"),
        other => panic!("expected DuplicateTensor, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `*.safetensors.index.json` decides which files are the shards of its
/// model (whatever their names), and only those.
#[test]
fn shard_index_names_the_shards() {
    let dir = common::tmpdir("shard-index");
    write_small(&dir.join("part-a.safetensors"), &["layers.0.w"], 1);
    write_small(
        &dir.join("part-b.safetensors"),
        &["layers.1.w", "norm.w"],
        2,
    );
    write_small(
        &dir.join("stray.safetensors"),
        &["decoder.conv_in.weight"],
        3,
    );
    weight_map(
        &dir.join("model.safetensors.index.json"),
        &[
            ("layers.0.w", "part-a.safetensors"),
            ("layers.1.w", "part-b.safetensors"),
            ("norm.w", "part-b.safetensors"),
        ],
    );
    let m = Model::open(&dir).unwrap();
    assert_eq!(
        file_names(&m.layout),
        [
            ("part-a.safetensors".into(), Some("model".into())),
            ("part-b.safetensors".into(), Some("model".into())),
            ("stray.safetensors".into(), Some("stray".into())),
        ]
    );
    assert_eq!(
        components(&m.layout),
        [("vae", ComponentKind::Vae), ("model", ComponentKind::Other)]
    );
    assert_eq!(
        layer_names(&m.layout, "model"),
        ["layers.0", "layers.1", "norm"]
    );

    // In a diffusers component folder, only the files the index names.
    let diff = common::tmpdir("shard-index-diffusers");
    std::fs::create_dir_all(diff.join("transformer")).unwrap();
    let t = diff.join("transformer");
    write_small(
        &t.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
        &["transformer_blocks.0.attn.to_q.weight"],
        1,
    );
    write_small(
        &t.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
        &["proj_out.weight"],
        2,
    );
    write_small(&t.join("leftover.safetensors"), &["proj_out.weight"], 3);
    weight_map(
        &t.join("diffusion_pytorch_model.safetensors.index.json"),
        &[
            (
                "transformer_blocks.0.attn.to_q.weight",
                "diffusion_pytorch_model-00001-of-00002.safetensors",
            ),
            (
                "proj_out.weight",
                "diffusion_pytorch_model-00002-of-00002.safetensors",
            ),
        ],
    );
    let m = Model::open(&diff).unwrap();
    assert_eq!(m.layout.files.len(), 2);
    assert_eq!(
        components(&m.layout),
        [("transformer", ComponentKind::Denoiser)]
    );

    // A broken index is an error naming it.
    std::fs::write(dir.join("model.safetensors.index.json"), "{}").unwrap();
    match Checkpoint::open(&dir) {
        Err(e @ LoaderError::ShardIndex { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("model.safetensors.index.json") && msg.contains("weight_map"),
                "{msg}"
            )
        }
        other => panic!("expected ShardIndex, got {other:?}"),
    }
    weight_map(
        &dir.join("model.safetensors.index.json"),
        &[("layers.0.w", "part-c.safetensors")],
    );
    let msg = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(msg.contains("`part-c.safetensors`"), "{msg}");
    weight_map(
        &dir.join("model.safetensors.index.json"),
        &[("layers.0.w", "../part-a.safetensors")],
    );
    assert!(matches!(
        Checkpoint::open(&dir),
        Err(LoaderError::ShardIndex { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&diff).unwrap();
}

/// A FLUX repository's root: the transformer and the autoencoder are two
/// models, not one component.
#[test]
fn top_level_files_of_different_models_stay_apart() {
    let dir = common::tmpdir("flux-root");
    write_small(
        &dir.join("flux1-dev.safetensors"),
        &[
            "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight",
            "img_in.weight",
            "final_layer.linear.weight",
        ],
        1,
    );
    write_small(
        &dir.join("ae.safetensors"),
        &[
            "decoder.conv_in.weight",
            "decoder.up.0.block.0.conv1.weight",
            "encoder.down.0.block.0.conv1.weight",
        ],
        2,
    );
    let m = Model::open(&dir).unwrap();
    assert_eq!(
        components(&m.layout),
        [
            ("transformer", ComponentKind::Denoiser),
            ("vae", ComponentKind::Vae)
        ]
    );
    assert_eq!(m.layout.component("transformer").unwrap().tensor_count(), 4);
    assert_eq!(m.layout.component("vae").unwrap().tensor_count(), 3);
    assert_eq!(
        file_names(&m.layout),
        [
            ("ae.safetensors".into(), Some("ae".into())),
            ("flux1-dev.safetensors".into(), Some("flux1-dev".into()))
        ]
    );
    let t = m
        .checkpoint
        .get_in(Some("ae"), "decoder.conv_in.weight")
        .unwrap();
    assert_eq!(t.file, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SDXL base and refiner side by side: dotted names are no variants, each
/// file is its own model, and colliding component names get the model's
/// name; `model.fp16.safetensors` is still a variant of `model`.
#[test]
fn dotted_model_names_and_variants() {
    let dir = common::tmpdir("sdxl-pair");
    let names = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
        "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
    ];
    write_small(&dir.join("sd_xl_base_1.0.safetensors"), &names, 1);
    write_small(&dir.join("sd_xl_refiner_1.0.safetensors"), &names, 2);
    let m = Model::open(&dir).unwrap();
    assert_eq!(
        components(&m.layout),
        [
            ("sd_xl_base_1.0/text_encoder", ComponentKind::TextEncoder),
            ("sd_xl_refiner_1.0/text_encoder", ComponentKind::TextEncoder),
            ("sd_xl_base_1.0/unet", ComponentKind::Denoiser),
            ("sd_xl_refiner_1.0/unet", ComponentKind::Denoiser),
            ("sd_xl_base_1.0/vae", ComponentKind::Vae),
            ("sd_xl_refiner_1.0/vae", ComponentKind::Vae),
        ]
    );
    // Each component reads its own file's bytes.
    let spec = TensorSpec::new(names[0], Dtype::F16, &[4]);
    for (c, seed) in [("sd_xl_base_1.0/unet", 1), ("sd_xl_refiner_1.0/unet", 2)] {
        let t = &m.layout.component(c).unwrap().layers[0].tensors[0];
        let mut buf = vec![0u8; 8];
        m.read_tensor_into(t, &mut buf).unwrap();
        assert_eq!(buf, deterministic_bytes(seed, &spec), "{c}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let dir = common::tmpdir("variant-pair");
    write_small(&dir.join("model.safetensors"), &["layers.0.w"], 1);
    write_small(&dir.join("model.fp16.safetensors"), &["layers.0.w"], 2);
    let m = Model::open(&dir).unwrap();
    assert_eq!(file_names(&m.layout), [("model.safetensors".into(), None)]);
    let opts = OpenOptions {
        variant: Some("fp16".into()),
    };
    let m = Model::open_with(&dir, &opts).unwrap();
    assert_eq!(
        file_names(&m.layout),
        [("model.fp16.safetensors".into(), None)]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn diffusers_folder_with_variants() {
    let dir = common::tmpdir("diffusers");
    for sub in ["unet", "text_encoder", "text_encoder_2", "vae", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::write(dir.join("model_index.json"), "{}").unwrap();
    let unet = [
        "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "mid_block.resnets.0.conv1.weight",
    ];
    write_small(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &unet,
        1,
    );
    write_small(
        &dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
        &unet,
        2,
    );
    let te = [
        "text_model.embeddings.token_embedding.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
    ];
    write_small(&dir.join("text_encoder/model.safetensors"), &te, 3);
    write_small(&dir.join("text_encoder_2/model.safetensors"), &te, 4);
    write_small(
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
        &["decoder.conv_in.weight"],
        5,
    );

    let m = Model::open(&dir).unwrap();
    let comps: Vec<(&str, ComponentKind, usize)> = m
        .layout
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.kind, c.tensor_count()))
        .collect();
    assert_eq!(
        comps,
        [
            ("text_encoder", ComponentKind::TextEncoder, 2),
            ("text_encoder_2", ComponentKind::TextEncoder, 2),
            ("unet", ComponentKind::Denoiser, 3),
            ("vae", ComponentKind::Vae, 1),
        ]
    );
    // The plain variant is chosen by default.
    let unet_file = &m.layout.files[m.layout.component("unet").unwrap().layers[0].tensors[0].file];
    assert!(unet_file
        .path
        .ends_with("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(
        layer_names(&m.layout, "unet"),
        ["conv_in", "down_blocks.0.resnets.0", "mid_block.resnets.0"]
    );
    // Same names in two text encoders resolve per group.
    let a = m.checkpoint.get_in(Some("text_encoder"), te[0]).unwrap();
    let b = m.checkpoint.get_in(Some("text_encoder_2"), te[0]).unwrap();
    assert_ne!(a.file, b.file);

    // Choosing the fp16 variant.
    let opts = OpenOptions {
        variant: Some("fp16".into()),
    };
    let m16 = Model::open_with(&dir, &opts).unwrap();
    let t = &m16.layout.component("unet").unwrap().layers[0].tensors[0];
    assert!(m16.layout.files[t.file]
        .path
        .ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    let spec = TensorSpec::new("conv_in.weight", Dtype::F16, &[4]);
    let mut buf = vec![0u8; 8];
    m16.read_tensor_into(t, &mut buf).unwrap();
    assert_eq!(buf, deterministic_bytes(2, &spec));

    // Two variants and no plain one: ambiguous.
    std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    write_small(
        &dir.join("unet/diffusion_pytorch_model.bf16.safetensors"),
        &unet,
        6,
    );
    assert!(matches!(
        Model::open(&dir),
        Err(LoaderError::AmbiguousVariant { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_prefixes_go_to_other_and_empty_folder_errors() {
    let specs = [
        TensorSpec::new(
            "model.diffusion_model.input_blocks.0.0.weight",
            Dtype::F16,
            &[2],
        ),
        TensorSpec::new("model.diffusion_model.strange.weight", Dtype::F16, &[2]),
        TensorSpec::new("alphas_cumprod", Dtype::F32, &[1000]),
        TensorSpec::new("model_ema.decay", Dtype::F32, &[]),
    ];
    let l = ModelLayout::from_specs(Path::new("sd.safetensors"), &specs);
    let comps: Vec<(&str, Vec<String>)> = l
        .components
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.layers.iter().map(|l| l.name.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        comps,
        [
            (
                "unet",
                vec![REMAINDER.to_string(), "input_blocks.0.0".to_string()]
            ),
            ("model_ema", vec![REMAINDER.to_string()]),
            ("other", vec![REMAINDER.to_string()]),
        ]
    );
    let dir = common::tmpdir("empty");
    assert!(matches!(
        Model::open(&dir),
        Err(LoaderError::NoFiles { .. })
    ));
    assert!(matches!(
        Model::open(dir.join("nope")),
        Err(LoaderError::Open { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
