//! What the parser tests check on any input, the same checks as the fuzz
//! targets in `fuzz/fuzz_targets/`: the safetensors header parser and the
//! LoRA parser never panic, and what they accept is self-consistent.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use offload_loader::layout::ModelLayout;
use offload_loader::lora::{LoraFile, ResolveOptions, TargetIndex};
use offload_loader::safetensors::parse_file_bytes;
use offload_loader::synth::{preset_specs, Preset, PresetOptions};

/// What a check saw: accepted by the header parser, by the LoRA parser, adapters resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    pub header_ok: bool,
    pub lora_ok: bool,
    pub adapters: usize,
}

/// The header parser on `data`; panics if an accepted header is inconsistent.
pub fn check_header(data: &[u8]) -> bool {
    let Ok(h) = parse_file_bytes(Path::new("input.safetensors"), data, 0) else {
        return false;
    };
    let file_len = data.len() as u64;
    assert_eq!(h.data_start, 8 + h.header_len);
    assert_eq!(h.data_start + h.data_len, file_len);
    for t in &h.tensors {
        assert!(
            t.data_offset >= h.data_start,
            "{} starts in the header",
            t.name
        );
        assert!(
            t.data_offset
                .checked_add(t.len)
                .is_some_and(|e| e <= file_len),
            "{} runs past the file",
            t.name
        );
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .expect("an accepted shape does not overflow");
        assert_eq!(numel * t.dtype.size_in_bytes() as u64, t.len, "{}", t.name);
    }
    for w in h.tensors.windows(2) {
        assert!(
            w[0].data_offset <= w[1].data_offset,
            "tensors in offset order"
        );
    }
    true
}

/// A full-size SD 1.5 layout's target index (the real LoRA files are SD 1.x).
pub fn sd15() -> &'static TargetIndex {
    static INDEX: OnceLock<TargetIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let specs = preset_specs(Preset::Sd15, &PresetOptions::default());
        TargetIndex::new(&ModelLayout::from_specs(
            Path::new("sd15.safetensors"),
            &specs,
        ))
    })
}

/// The LoRA parser on `data`: parse, summarise, resolve (lenient and
/// strict) against SD 1.5, and read every factor of every adapter.
pub fn check_lora(data: &[u8]) -> (bool, usize) {
    let Ok(lora) = LoraFile::from_bytes("input.safetensors", data.to_vec()) else {
        return (false, 0);
    };
    let _ = lora.summary();
    let mut adapters = 0;
    for strict in [false, true] {
        let opts = ResolveOptions {
            multiplier: 0.8,
            strict,
        };
        let Ok(resolved) = lora.resolve(sd15(), &opts) else {
            continue;
        };
        let _ = resolved.report();
        for a in &resolved.adapters {
            assert!(a.scale.is_finite(), "{}: scale {}", a.key, a.scale);
            for t in a.delta.factors() {
                let mut buf = vec![0u8; t.len as usize];
                lora.read_factor_into(t, &mut buf)
                    .expect("a factor of an accepted adapter reads");
            }
        }
        adapters = adapters.max(resolved.adapters.len());
    }
    (true, adapters)
}

/// Both parsers on `data`.
pub fn check(data: &[u8]) -> Seen {
    let header_ok = check_header(data);
    let (lora_ok, adapters) = check_lora(data);
    assert!(
        header_ok || !lora_ok,
        "the LoRA parser accepted what the header parser refused"
    );
    Seen {
        header_ok,
        lora_ok,
        adapters,
    }
}
