//! The real files in ../shared/data: every one parses with the expected
//! tensor counts and dtypes, every tensor reads back, layouts come out as
//! expected, and corrupted copies give clear errors and never panic.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use offload_loader::dtype::to_f32_vec;
use offload_loader::layout::{ComponentKind, Model};
use offload_loader::safetensors::{parse_file_bytes, SafetensorsFile};
use offload_loader::{Dtype, LoaderError};
use proptest::prelude::*;
use serde_json::Value;

/// (path, tensors, dtypes) as listed in shared/data/README.md.
const FILES: &[(&str, usize, &[Dtype])] = &[
    ("lora/smart_falcon_4_lokr.safetensors", 1750, &[Dtype::F16]),
    ("lora/smart_falcon_8_lokr.safetensors", 1750, &[Dtype::F16]),
    ("lora/smart_falcon_16_lokr.safetensors", 1750, &[Dtype::F16]),
    ("lora/lora_disney.safetensors", 386, &[Dtype::F32]),
    ("lora/analog_svd_rank4.safetensors", 384, &[Dtype::F16]),
    (
        "lora/sd15_diffusers_legacy_catundchat.safetensors",
        256,
        &[Dtype::F32],
    ),
    ("model/taesd_decoder.safetensors", 67, &[Dtype::BF16]),
    ("model/taesdxl_decoder.safetensors", 67, &[Dtype::BF16]),
    ("model/taef1_decoder.safetensors", 67, &[Dtype::BF16]),
    (
        "model/sdxl_ldm_text_projection_slice.safetensors",
        3,
        &[Dtype::F16],
    ),
];

#[test]
fn every_real_file_parses_and_reads() {
    for &(rel, count, dtypes) in FILES {
        let path = common::data(rel);
        let f = SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.tensors().len(), count, "{rel}");
        assert_eq!(f.file_len(), std::fs::metadata(&path).unwrap().len());
        let seen: BTreeSet<Dtype> = f.tensors().iter().map(|t| t.dtype).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), dtypes, "{rel}");
        // Back to back, covering the data section exactly.
        let mut end = f.header().data_start;
        for t in f.tensors() {
            assert_eq!(t.data_offset, end, "{rel}: {}", t.name);
            end += t.len;
            let bytes = f.read_tensor_vec(&t.name).unwrap();
            let vals = to_f32_vec(&bytes, t.dtype).unwrap();
            assert_eq!(vals.len() as u64, t.numel());
            assert!(vals.iter().all(|v| v.is_finite()), "{rel}: {}", t.name);
        }
        assert_eq!(end, f.file_len(), "{rel}");
    }
}

#[test]
fn real_metadata() {
    let f = SafetensorsFile::open(common::data("lora/smart_falcon_8_lokr.safetensors")).unwrap();
    assert_eq!(
        f.metadata().get("ss_network_dim").map(String::as_str),
        Some("8")
    );
    assert_eq!(
        f.metadata().get("ss_network_alpha").map(String::as_str),
        Some("8.0")
    );
    let f = SafetensorsFile::open(common::data(
        "lora/sd15_diffusers_legacy_catundchat.safetensors",
    ))
    .unwrap();
    assert_eq!(f.metadata().get("format").map(String::as_str), Some("pt"));
    let t = f
        .tensor(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight",
        )
        .unwrap();
    assert_eq!(
        (t.dtype, t.shape.as_slice(), t.len),
        (Dtype::F32, &[4u64, 320][..], 5120)
    );
}

#[test]
fn taesd_layers_by_top_level_index() {
    for name in ["taesd_decoder", "taesdxl_decoder", "taef1_decoder"] {
        let m = Model::open(common::data(&format!("model/{name}.safetensors"))).unwrap();
        assert_eq!(m.layout.components.len(), 1);
        let c = &m.layout.components[0];
        assert_eq!((c.name.as_str(), c.kind), (name, ComponentKind::Vae));
        let layers: Vec<&str> = c.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            layers,
            ["1", "3", "4", "5", "7", "8", "9", "10", "12", "13", "14", "15", "17", "18", "19"]
        );
        let l10: Vec<&str> = c
            .layer("10")
            .unwrap()
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(
            l10,
            [
                "10.conv.0.bias",
                "10.conv.0.weight",
                "10.conv.2.bias",
                "10.conv.2.weight",
                "10.conv.4.bias",
                "10.conv.4.weight"
            ]
        );
        assert_eq!(c.tensor_count(), 67);
    }
}

#[test]
fn sdxl_slice_components() {
    let m = Model::open(common::data(
        "model/sdxl_ldm_text_projection_slice.safetensors",
    ))
    .unwrap();
    let got: Vec<(&str, &str, Vec<&str>)> = m
        .layout
        .components
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.prefix.as_str(),
                c.layers.iter().map(|l| l.name.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "text_encoder",
                "conditioner.embedders.0.transformer.",
                vec!["text_model.embeddings"]
            ),
            (
                "text_encoder_2",
                "conditioner.embedders.1.model.",
                vec!["text_projection", "logit_scale"]
            ),
        ]
    );
    let proj = &m.layout.component("text_encoder_2").unwrap().layers[0].tensors[0];
    assert_eq!(proj.shape, [1280, 1280]);
    let mut buf = vec![0u8; proj.len as usize];
    m.read_tensor_into(proj, &mut buf).unwrap();
}

/// Rebuilds a file from `bytes` with its header JSON edited by `edit`.
fn with_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut v: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(v.as_object_mut().unwrap());
    let h = serde_json::to_vec(&v).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn set_offsets(m: &mut serde_json::Map<String, Value>, name: &str, b: u64, e: u64) {
    m[name]["data_offsets"] = serde_json::json!([b, e]);
}

#[test]
fn corrupted_real_file_errors() {
    let path = common::data("model/taesd_decoder.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let p = Path::new("taesd_decoder.safetensors");
    let parse = |b: &[u8]| parse_file_bytes(p, b, 0).unwrap_err();

    // Truncated: the last tensor ends past the data section.
    let cut = bytes.len() - 1000;
    match parse(&bytes[..cut]) {
        LoaderError::OffsetsOutOfRange {
            tensor,
            end,
            data_len,
            ..
        } => {
            assert_eq!(tensor, "9.conv.4.weight"); // last in file order
            assert_eq!(data_len, cut as u64 - 5528);
            assert_eq!(end, bytes.len() as u64 - 5528);
        }
        e => panic!("{e}"),
    }
    // Absurd header length.
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = parse(&b);
    assert!(
        matches!(
            e,
            LoaderError::HeaderLenOutOfRange {
                header_len: 1_099_511_627_776,
                ..
            }
        ),
        "{e}"
    );
    assert!(e
        .to_string()
        .starts_with("taesd_decoder.safetensors: header length 1099511627776"));
    // Header bytes flipped: not JSON any more.
    let mut b = bytes.clone();
    b[8] = b'[';
    b[9] = b'!';
    assert!(matches!(
        parse(&b),
        LoaderError::HeaderJson {
            header_len: 5520,
            ..
        }
    ));
    // Offsets past the end.
    let b = with_header(&bytes, |m| set_offsets(m, "1.bias", 10_000_000, 10_000_128));
    match parse(&b) {
        LoaderError::OffsetsOutOfRange {
            tensor, begin, end, ..
        } => {
            assert_eq!(
                (tensor.as_str(), begin, end),
                ("1.bias", 10_000_000, 10_000_128)
            )
        }
        e => panic!("{e}"),
    }
    // Overlapping ranges: 1.bias moved into the middle of 1.weight.
    let b = with_header(&bytes, |m| set_offsets(m, "1.bias", 256, 384));
    match parse(&b) {
        LoaderError::Overlap {
            first,
            second,
            first_begin,
            first_end,
            second_begin,
            second_end,
            ..
        } => {
            assert_eq!((first.as_str(), second.as_str()), ("1.weight", "1.bias"));
            assert_eq!(
                (first_begin, first_end, second_begin, second_end),
                (128, 4736, 256, 384)
            );
        }
        e => panic!("{e}"),
    }
    // Unknown dtype.
    let b = with_header(&bytes, |m| m["7.weight"]["dtype"] = "BF17".into());
    let e = parse(&b);
    assert_eq!(
        e.to_string(),
        "taesd_decoder.safetensors: tensor `7.weight`: unknown dtype `BF17` (known: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2)"
    );
    // Shape that does not match the range.
    let b = with_header(&bytes, |m| m["1.bias"]["shape"] = serde_json::json!([65]));
    match parse(&b) {
        LoaderError::SizeMismatch {
            tensor,
            expected,
            actual,
            ..
        } => {
            assert_eq!((tensor.as_str(), expected, actual), ("1.bias", 130, 128))
        }
        e => panic!("{e}"),
    }
}

/// Checks what a successful parse promises: every range inside the data
/// section, sizes consistent, no overlaps.
fn assert_invariants(bytes: &[u8]) {
    if let Ok(h) = parse_file_bytes(Path::new("m"), bytes, 0) {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for t in &h.tensors {
            let n: u64 = t.shape.iter().product();
            assert_eq!(n * t.dtype.size_in_bytes() as u64, t.len);
            assert!(t.data_offset >= h.data_start);
            assert!(t.data_offset + t.len <= bytes.len() as u64);
            if t.len > 0 {
                ranges.push((t.data_offset, t.data_offset + t.len));
            }
        }
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    }
}

fn real_bytes() -> Vec<(Vec<u8>, usize)> {
    [
        "model/taesd_decoder.safetensors",
        "lora/lora_disney.safetensors",
    ]
    .iter()
    .map(|rel| {
        let b = std::fs::read(common::data(rel)).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        (b, 8 + n)
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random byte changes anywhere in the length field or header.
    #[test]
    fn mutated_headers_never_panic(
        file in 0usize..2,
        muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let files = real_bytes();
        let (mut b, header_end) = files[file].clone();
        for (i, v) in muts {
            let at = i.index(header_end);
            b[at] = v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        assert_invariants(&b);
    }

    /// Digit changes inside the header: the JSON stays well-formed, so
    /// offsets, shapes and lengths are what gets corrupted.
    #[test]
    fn mutated_numbers_never_panic(
        file in 0usize..2,
        muts in prop::collection::vec((any::<prop::sample::Index>(), 0u8..10), 1..6),
    ) {
        let files = real_bytes();
        let (mut b, header_end) = files[file].clone();
        let digits: Vec<usize> = (8..header_end).filter(|&i| b[i].is_ascii_digit()).collect();
        for (i, d) in muts {
            b[digits[i.index(digits.len())]] = b'0' + d;
        }
        assert_invariants(&b);
    }
}
