//! The LoRA parser on arbitrary bytes: parse, summarise, resolve against a
//! full-size SD 1.5 layout (the real seed files are SD 1.x LoRAs), and read
//! every factor of every adapter it accepts. Nothing may panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use offload_loader::layout::ModelLayout;
use offload_loader::lora::{LoraFile, ResolveOptions, TargetIndex};
use offload_loader::synth::{preset_specs, Preset, PresetOptions};

fn index() -> &'static TargetIndex {
    static INDEX: OnceLock<TargetIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let specs = preset_specs(Preset::Sd15, &PresetOptions::default());
        TargetIndex::new(&ModelLayout::from_specs(
            Path::new("sd15.safetensors"),
            &specs,
        ))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(lora) = LoraFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let _ = lora.summary();
    for strict in [false, true] {
        let opts = ResolveOptions {
            multiplier: 0.8,
            strict,
        };
        let Ok(resolved) = lora.resolve(index(), &opts) else {
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
    }
});
