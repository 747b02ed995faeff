//! Crafted shapes and names: dimensions whose product overflows 64 bits
//! (also beside a zero dimension, so the tensor has no elements), and
//! block indices near `u64::MAX` in model and LoRA names. Parsing, layouts,
//! model indexes, LoRA summaries and resolution return Ok or Err on all of
//! them and never panic (the test profile checks overflow).

use std::path::Path;

use offload_loader::layout::ModelLayout;
use offload_loader::lora::{LoraFile, LoraProblem, ResolveOptions, TargetIndex};
use offload_loader::safetensors::parse_file_bytes;
use offload_loader::synth::{preset_specs, Preset, PresetOptions, TensorSpec};
use offload_loader::{Dtype, LoaderError};
use proptest::prelude::*;

const BIG: u64 = 1 << 40;

fn spec(name: &str, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, Dtype::F16, shape)
}

/// A safetensors file whose header is written by hand (the writer refuses
/// such shapes): F16 tensors of `len` bytes each, back to back, in an
/// all-zero data section.
fn raw_file(tensors: &[(&str, &[u64], u64)]) -> Vec<u8> {
    let mut offset = 0u64;
    let entries: Vec<String> = tensors
        .iter()
        .map(|(n, shape, len)| {
            let e = format!(
                r#""{n}":{{"dtype":"F16","shape":{shape:?},"data_offsets":[{offset},{}]}}"#,
                offset + len
            );
            offset += len;
            e
        })
        .collect();
    let json = format!("{{{}}}", entries.join(","));
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json.as_bytes());
    b.resize(b.len() + offset as usize, 0);
    b
}

fn small_sd15() -> ModelLayout {
    let specs = preset_specs(
        Preset::Sd15,
        &PresetOptions {
            scale: 8,
            ..PresetOptions::default()
        },
    );
    ModelLayout::from_specs(Path::new("sd15.safetensors"), &specs)
}

fn resolve_both(lora: &LoraFile, index: &TargetIndex) {
    for strict in [false, true] {
        let opts = ResolveOptions {
            multiplier: 1.0,
            strict,
        };
        match lora.resolve(index, &opts) {
            Ok(r) => {
                for s in &r.skipped {
                    let _ = s.problem.to_string();
                }
                let _ = r.warning();
                for a in &r.adapters {
                    let _ = (a.row_range(), a.factor_bytes());
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}

/// `offload inspect zero_lora.safetensors` used to panic: a zero-element
/// factor whose other dimensions multiply past 2^64 passed validation, and
/// the LoRA summary multiplied them.
#[test]
fn zero_element_factor_with_overflowing_dimensions() {
    let bytes = raw_file(&[("m.lora_down.weight", &[0, 1, BIG, BIG], 0)]);
    match LoraFile::from_bytes("zero_lora.safetensors", bytes) {
        Err(e @ LoaderError::ShapeOverflow { .. }) => {
            let msg = e.to_string();
            for want in [
                "zero_lora.safetensors",
                "m.lora_down.weight",
                "[0, 1, 1099511627776, 1099511627776]",
            ] {
                assert!(msg.contains(want), "{want}: {msg}");
            }
        }
        other => panic!("expected ShapeOverflow, got {other:?}"),
    }
    // Described without validation, the summary and resolution still
    // cannot overflow.
    let key = "lora_unet_mid_block_attentions_0_proj_in";
    let lora = LoraFile::from_specs(
        "zero_lora.safetensors",
        &[
            spec(&format!("{key}.lora_down.weight"), &[0, 1, BIG, BIG]),
            spec(&format!("{key}.lora_up.weight"), &[BIG, BIG, BIG, 0]),
            spec("lora_unet_x.lora_down.weight", &[4, BIG, BIG, BIG]),
            spec("lora_unet_x.lora_up.weight", &[BIG, 4, BIG, BIG]),
            spec("lora_unet_y.hada_w1_a", &[BIG, BIG, BIG]),
            spec("lora_unet_y.hada_w1_b", &[BIG, BIG, BIG]),
            spec("lora_unet_y.hada_w2_a", &[BIG, BIG, BIG]),
            spec("lora_unet_y.hada_w2_b", &[BIG, BIG, BIG]),
            spec("lora_unet_z.lokr_w1", &[BIG, BIG]),
            spec("lora_unet_z.lokr_w2", &[BIG, BIG, BIG, BIG]),
            spec("lora_unet_z.alpha", &[BIG, 0]),
        ],
    );
    let s = lora.summary();
    assert_eq!(s.modules, 4);
    let index = TargetIndex::new(&small_sd15());
    let r = lora.resolve(&index, &ResolveOptions::default()).unwrap();
    assert!(r.adapters.is_empty());
    let p = &r.skipped.iter().find(|s| s.key == key).unwrap().problem;
    assert!(
        matches!(
            p,
            LoraProblem::InconsistentFactors { .. } | LoraProblem::ZeroRank { .. }
        ),
        "{p}"
    );
    resolve_both(&lora, &index);
}

/// Model tensors with huge shapes and block numbers: the name maps of the
/// model index (`3 * h` of a FLUX `linear1`, `3 * i + j` of a diffusers
/// UNet block) used to overflow.
#[test]
fn huge_model_shapes_and_block_indices() {
    let max = u64::MAX;
    let specs = vec![
        spec("single_blocks.0.linear1.weight", &[0, (1 << 63) - 1]),
        spec("single_blocks.1.linear1.weight", &[max, max / 2]),
        spec("double_blocks.0.img_attn.qkv.weight", &[0, max]),
        spec(
            "down_blocks.9999999999999999999.resnets.0.conv1.weight",
            &[4, 4, 3, 3],
        ),
        spec(
            "down_blocks.6148914691236517205.attentions.1.proj_in.weight",
            &[4, 4],
        ),
        spec(
            "down_blocks.18446744073709551615.downsamplers.0.conv.weight",
            &[4, 4, 3, 3],
        ),
        spec(
            "up_blocks.6148914691236517205.upsamplers.0.conv.weight",
            &[4, 4, 3, 3],
        ),
        spec(
            "up_blocks.18446744073709551615.attentions.2.proj_out.weight",
            &[4, 4],
        ),
        spec(
            "joint_blocks.18446744073709551615.context_block.adaLN_modulation.1.weight",
            &[max, max],
        ),
        spec("joint_blocks.0.x_block.attn.qkv.weight", &[BIG, BIG, BIG]),
        spec(
            "transformer_blocks.18446744073709551615.attn.to_q.weight",
            &[4, 4],
        ),
        spec("single_transformer_blocks.3.proj_mlp.weight", &[0, max]),
    ];
    let layout = ModelLayout::from_specs(Path::new("crafted.safetensors"), &specs);
    assert_eq!(layout.tensor_count(), specs.len());
    let _ = (layout.bytes(), layout.largest_layer());
    let index = TargetIndex::new(&layout);
    let lora = LoraFile::from_specs(
        "l.safetensors",
        &[
            spec(
                "lora_unet_down_blocks_9999999999999999999_resnets_0_conv1.lora_down.weight",
                &[2, 4, 3, 3],
            ),
            spec(
                "lora_unet_down_blocks_9999999999999999999_resnets_0_conv1.lora_up.weight",
                &[4, 2, 1, 1],
            ),
            spec(
                "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
                &[2, BIG],
            ),
            spec(
                "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight",
                &[BIG, 2],
            ),
            spec(
                "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight",
                &[2, BIG],
            ),
            spec(
                "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight",
                &[BIG, 2],
            ),
        ],
    );
    let r = lora.resolve(&index, &ResolveOptions::default()).unwrap();
    // The UNet block resolves by its own (diffusers) name.
    assert_eq!(r.adapters.len(), 1, "{:?}", r.skipped);
    resolve_both(&lora, &index);

    // Single-file prefixes and VAE order with huge indices.
    let specs = vec![
        spec(
            "conditioner.embedders.18446744073709551615.model.transformer.resblocks.0.attn.in_proj_weight",
            &[max, 3],
        ),
        spec("first_stage_model.decoder.up.18446744073709551615.block.0.conv1.weight", &[4]),
        spec("first_stage_model.decoder.up.18446744073709551614.block.0.conv1.weight", &[4]),
        spec("model.diffusion_model.input_blocks.18446744073709551615.0.in_layers.2.weight", &[4]),
        spec("model.diffusion_model.output_blocks.18446744073709551615.1.conv.weight", &[4]),
    ];
    let layout = ModelLayout::from_specs(Path::new("sd.safetensors"), &specs);
    assert!(layout
        .components
        .iter()
        .any(|c| c.name == "text_encoder_18446744073709551616"));
    resolve_both(&lora, &TargetIndex::new(&layout));
}

const MODEL_NAMES: &[&str] = &[
    "down_blocks.{i}.resnets.{j}.conv1.weight",
    "down_blocks.{i}.attentions.{j}.proj_in.weight",
    "down_blocks.{i}.downsamplers.0.conv.weight",
    "up_blocks.{i}.resnets.{j}.conv1.weight",
    "up_blocks.{i}.attentions.{j}.proj_out.weight",
    "up_blocks.{i}.upsamplers.0.conv.weight",
    "mid_block.resnets.{j}.conv1.weight",
    "input_blocks.{i}.{j}.in_layers.2.weight",
    "output_blocks.{i}.{j}.conv.weight",
    "double_blocks.{i}.img_attn.qkv.weight",
    "double_blocks.{i}.txt_mlp.{j}.weight",
    "single_blocks.{i}.linear1.weight",
    "joint_blocks.{i}.x_block.attn.qkv.weight",
    "joint_blocks.{i}.context_block.adaLN_modulation.1.weight",
    "transformer_blocks.{i}.attn.to_q.weight",
    "single_transformer_blocks.{i}.proj_mlp.weight",
    "transformer.resblocks.{i}.attn.in_proj_weight",
    "conditioner.embedders.{i}.model.transformer.resblocks.{j}.attn.in_proj_weight",
    "first_stage_model.decoder.up.{i}.block.{j}.conv1.weight",
    "model.diffusion_model.input_blocks.{i}.{j}.proj_in.weight",
    "text_encoders.clip_l.transformer.text_model.encoder.layers.{i}.mlp.fc1.weight",
    "layers.{i}.w",
];

const LORA_MODULES: &[&str] = &[
    "lora_unet_down_blocks_{i}_resnets_{j}_conv1",
    "lora_unet_up_blocks_{i}_upsamplers_0_conv",
    "lora_unet_input_blocks_{i}_{j}_in_layers_2",
    "lora_unet_double_blocks_{i}_img_attn_qkv",
    "lora_unet_single_blocks_{i}_linear1",
    "lora_te_text_model_encoder_layers_{i}_mlp_fc1",
    "lora_te{j}_text_model_encoder_layers_{i}_self_attn_q_proj",
    "transformer.transformer_blocks.{i}.attn.to_q",
    "transformer.transformer_blocks.{i}.attn.add_k_proj",
    "transformer.single_transformer_blocks.{i}.proj_mlp",
    "unet.down_blocks.{i}.attentions.{j}.proj_in",
    "diffusion_model.joint_blocks.{i}.x_block.attn.qkv",
    "double_blocks.{i}.processor.qkv_lora{j}",
    "down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.processor.to_k_lora",
];

const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".down.weight",
    ".up.weight",
    ".alpha",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".dora_scale",
    ".lora_mid.weight",
];

fn index_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..24,
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::MAX / 3),
        Just(6_148_914_691_236_517_205),
        Just(9_999_999_999_999_999_999),
        any::<u64>(),
    ]
}

fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1u64..9,
        Just(1 << 32),
        Just(BIG),
        Just((1 << 63) - 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn fill(template: &str, i: u64, j: u64) -> String {
    template
        .replace("{i}", &i.to_string())
        .replace("{j}", &j.to_string())
}

type Named = (usize, u64, u64, Vec<u64>);

fn named() -> impl Strategy<Value = Named> {
    (
        any::<usize>(),
        index_value(),
        prop_oneof![0u64..4, index_value()],
        prop::collection::vec(dim(), 0..5),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Crafted model and LoRA names and shapes, resolved against each
    /// other: Ok or Err, never a panic.
    #[test]
    fn crafted_shapes_and_indices_never_panic(
        model in prop::collection::vec(named(), 1..14),
        lora in prop::collection::vec((named(), any::<usize>()), 1..14),
    ) {
        let model: Vec<TensorSpec> = model
            .iter()
            .map(|(t, i, j, shape)| spec(&fill(MODEL_NAMES[t % MODEL_NAMES.len()], *i, *j), shape))
            .collect();
        let layout = ModelLayout::from_specs(Path::new("m.safetensors"), &model);
        let _ = (layout.bytes(), layout.tensor_count(), layout.largest_layer());
        let index = TargetIndex::new(&layout);

        let mut seen = std::collections::HashSet::new();
        let specs: Vec<TensorSpec> = lora
            .iter()
            .map(|((t, i, j, shape), s)| {
                let m = fill(LORA_MODULES[t % LORA_MODULES.len()], *i, *j);
                spec(&format!("{m}{}", SUFFIXES[s % SUFFIXES.len()]), shape)
            })
            .filter(|s| seen.insert(s.name.clone()))
            .collect();
        let lora_file = LoraFile::from_specs("l.safetensors", &specs);
        let _ = lora_file.summary();
        resolve_both(&lora_file, &index);

        // The same tensors as a file's header: validation refuses what
        // overflows; what it accepts goes through the same steps.
        let tensors: Vec<(&str, &[u64], u64)> = specs
            .iter()
            .map(|s| {
                let len = s.byte_len().filter(|n| *n <= 64).unwrap_or(0);
                (s.name.as_str(), &s.shape[..], len)
            })
            .collect();
        let bytes = raw_file(&tensors);
        if parse_file_bytes(Path::new("l.safetensors"), &bytes, 0).is_ok() {
            if let Ok(lora_file) = LoraFile::from_bytes("l.safetensors", bytes) {
                let _ = lora_file.summary();
                resolve_both(&lora_file, &index);
            }
        }
    }
}
