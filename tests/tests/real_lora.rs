//! The real LyCORIS LoKr files (`../shared/data/lora/smart_falcon_{4,8,16}_lokr.safetensors`,
//! kohya naming, SD 1.x, 3x3 conv deltas stored flattened) through the whole
//! stack: a synthetic SD 1.5 checkpoint with the real names and full-size
//! shapes of the targets of a few of the files' UNet adapters (attention
//! linears, a 1x1 `proj_in` conv and a 3x3 conv) is written to a scratch
//! folder and opened with the loader; each LoRA is resolved against it
//! (lenient: every other module is skipped and listed), bound with
//! `offload_bench::source::lora_binding` and applied in the runtime on the
//! host backend, streaming the checkpoint (sequential mode, staged host
//! policy). Every patched tensor the compute stream sees is checked against
//! an f64 reference computed here from the file's factor bytes
//! (`Δ[i, j] = w1[i / c, j / d] · w2[i % c, j % d]`, each side the product of
//! its low-rank factors, times alpha / rank and the multiplier); removing
//! the set gives the file's bytes back, bit for bit.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use half::f16;
use offload_bench::source::lora_binding;
use offload_loader::layout::ModelLayout;
use offload_loader::lora::{Delta, KronFactor, LoraFile, ProblemKind, ResolveOptions};
use offload_loader::synth::{preset_specs, write_deterministic, Preset, PresetOptions};
use offload_loader::{Adapter, Dtype, Model, TensorInfo};
use offload_runtime::device::{DeviceExt, HostDevice, StreamId};
use offload_runtime::lora::LoraBinding;
use offload_runtime::residency::{LayerId, ModelId, Runtime};
use offload_tests::source::{describe, LoaderSource};
use offload_tests::{shared_data, Scratch};

const FILES: [(&str, u64); 3] = [
    ("lora/smart_falcon_4_lokr.safetensors", 4),
    ("lora/smart_falcon_8_lokr.safetensors", 8),
    ("lora/smart_falcon_16_lokr.safetensors", 16),
];

/// The UNet modules whose targets the checkpoint holds: the attention of
/// the first down block (a 1x1 conv `proj_in`, self- and cross-attention
/// linears, one of them 320×768), the first self-attention of the last up
/// block, and one 3x3 conv (the first downsampler, stored flattened as
/// 320×2880). About 4.5 MB of f16 weights.
const MODULES: [&str; 13] = [
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_k",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_v",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0",
];

const PAGE: usize = 64 << 10;

fn decode(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
        .collect()
}

/// Write the checkpoint: the full-size SD 1.5 specs of the modules' targets.
fn checkpoint(path: &Path) {
    let specs = preset_specs(Preset::Sd15, &PresetOptions::default());
    let full = ModelLayout::from_specs(Path::new("sd15.safetensors"), &specs);
    let lora = LoraFile::open(shared_data(FILES[0].0)).unwrap();
    let r = lora
        .resolve_layout(
            &full,
            &ResolveOptions {
                multiplier: 1.0,
                strict: true,
            },
        )
        .unwrap();
    let targets: BTreeSet<&str> = r
        .adapters
        .iter()
        .filter(|a| MODULES.contains(&a.key.as_str()))
        .map(|a| a.target.name.as_str())
        .collect();
    assert_eq!(
        targets.len(),
        MODULES.len(),
        "every module resolves on full SD 1.5"
    );
    let picked: Vec<_> = specs
        .iter()
        .filter(|s| targets.contains(s.name.as_str()))
        .cloned()
        .collect();
    assert_eq!(picked.len(), MODULES.len());
    assert!(
        picked
            .iter()
            .any(|s| s.shape.len() == 4 && s.shape[2] * s.shape[3] == 9),
        "a 3x3 conv"
    );
    assert!(picked.iter().all(|s| s.dtype == Dtype::F16));
    write_deterministic(path, &picked, &Default::default(), 1234).unwrap();
}

/// A factor of the LoRA file as f64 values and its `[rows, cols]` view.
fn factor(file: &LoraFile, t: &TensorInfo) -> (Vec<f64>, usize, usize) {
    assert_eq!(t.dtype, Dtype::F16, "{}", t.name);
    let mut buf = vec![0u8; t.len as usize];
    file.read_factor_into(t, &mut buf).unwrap();
    let rows = t.shape[0] as usize;
    let cols = t.shape[1..].iter().product::<u64>() as usize;
    (decode(&buf), rows, cols)
}

/// One side of the Kronecker product as a dense matrix, and the same with
/// each product term in absolute value (for the error bound).
fn side(file: &LoraFile, k: &KronFactor) -> (Vec<f64>, Vec<f64>, usize, usize) {
    match k {
        KronFactor::Full(t) => {
            let (v, r, c) = factor(file, t);
            let abs = v.iter().map(|x| x.abs()).collect();
            (v, abs, r, c)
        }
        KronFactor::LowRank { a, b } => {
            let (av, m, r) = factor(file, a);
            let (bv, r2, n) = factor(file, b);
            assert_eq!(r, r2);
            let mut v = vec![0.0; m * n];
            let mut abs = vec![0.0; m * n];
            for i in 0..m {
                for j in 0..n {
                    for q in 0..r {
                        let x = av[i * r + q] * bv[q * n + j];
                        v[i * n + j] += x;
                        abs[i * n + j] += x.abs();
                    }
                }
            }
            (v, abs, m, n)
        }
    }
}

/// Add `s · kron(w1, w2)` of a LoKr adapter to `exact` (a `[rows, cols]`
/// matrix), and `|s| · |w1| ⊗ |w2|` to `bound`.
fn add_lokr(
    file: &LoraFile,
    a: &Adapter,
    s: f64,
    cols: usize,
    exact: &mut [f64],
    bound: &mut [f64],
) {
    let Delta::LoKr { w1, w2 } = &a.delta else {
        panic!("{}: not LoKr", a.key)
    };
    let (v1, b1, p, q) = side(file, w1);
    let (v2, b2, c, d) = side(file, w2);
    assert_eq!(p * c * q * d, exact.len(), "{}", a.key);
    assert_eq!(q * d, cols, "{}", a.key);
    for i in 0..p * c {
        for j in 0..cols {
            let (x, y) = ((i / c) * q + j / d, (i % c) * d + j % d);
            exact[i * cols + j] += s * v1[x] * v2[y];
            bound[i * cols + j] += s.abs() * b1[x] * b2[y];
        }
    }
}

/// A LoRA file resolved against the checkpoint, with its binding.
struct Bound {
    file: Arc<LoraFile>,
    adapters: Vec<Adapter>,
    binding: LoraBinding,
}

struct Run {
    dev: Arc<HostDevice>,
    compute: StreamId,
    rt: Runtime,
    m: ModelId,
    layout: ModelLayout,
    /// Each tensor's bytes in the file, by (component, layer, tensor).
    file_bytes: Vec<Vec<Vec<Vec<u8>>>>,
}

impl Run {
    /// Acquire every layer; hand each tensor's bytes (as the compute stream
    /// sees them) to `check` with its component, layer and tensor indices.
    fn pass(&self, mut check: impl FnMut((usize, usize, usize), &str, &[u8])) {
        for (c, comp) in self.layout.components.iter().enumerate() {
            for l in 0..comp.layers.len() {
                let g = self
                    .rt
                    .acquire(LayerId {
                        model: self.m,
                        component: c,
                        layer: l,
                    })
                    .unwrap();
                for (t, v) in g.tensors().enumerate() {
                    let mut back = vec![0u8; v.bytes];
                    self.dev
                        .read_blocking(v.ptr, &mut back, self.compute)
                        .unwrap();
                    check((c, l, t), v.name, &back);
                }
            }
        }
        self.rt.synchronize().unwrap();
    }

    /// A pass in which every tensor must be W + Σ s·Δ of `set` within
    /// 2⁻¹⁰·(|W| + Σ|s|·|w1|⊗|w2|), or the file's bytes where nothing is set.
    fn check(&self, set: &[(&Bound, f32)]) -> usize {
        let mut patched = 0;
        self.pass(|(c, l, t), name, got| {
            let tr = &self.layout.components[c].layers[l].tensors[t];
            let w = &self.file_bytes[c][l][t];
            let adapters: Vec<(&Bound, &Adapter, f32)> = set
                .iter()
                .flat_map(|&(b, m)| {
                    b.adapters
                        .iter()
                        .filter(|a| a.target.name == tr.name)
                        .map(move |a| (b, a, m))
                })
                .collect();
            if adapters.is_empty() {
                assert!(got == &w[..], "{name}: not the file's bytes");
                return;
            }
            patched += 1;
            let cols = tr.shape[1..].iter().product::<u64>() as usize;
            let mut exact = decode(w);
            let mut bound: Vec<f64> = exact.iter().map(|x| x.abs()).collect();
            for (b, a, m) in adapters {
                add_lokr(
                    &b.file,
                    a,
                    f64::from(a.scale) * f64::from(m),
                    cols,
                    &mut exact,
                    &mut bound,
                );
            }
            let got = decode(got);
            for (i, ((&g, &e), &b)) in got.iter().zip(&exact).zip(&bound).enumerate() {
                assert!(
                    !g.is_nan() && (g - e).abs() <= b * 2f64.powi(-10),
                    "{name} element {i}: {g} vs reference {e} (bound {b})"
                );
            }
            assert!(
                got.iter().zip(&decode(w)).any(|(g, w)| g != w),
                "{name}: the delta changed nothing"
            );
        });
        patched
    }
}

#[test]
fn real_lokr_files_merge_on_upload_to_the_f64_reference_and_come_off_bit_exact() {
    let scratch = Scratch::new("real-lokr");
    let ckpt = scratch.join("sd15_lokr_targets.safetensors");
    checkpoint(&ckpt);
    let len = std::fs::metadata(&ckpt).unwrap().len();
    assert!((2 << 20..8 << 20).contains(&len), "a few MB: {len}");
    let model = Arc::new(Model::open(&ckpt).unwrap());
    let layout = model.layout.clone();
    let raw = std::fs::read(&ckpt).unwrap();
    let file_bytes = offload_tests::tensor_bytes(&layout, &raw);
    // Resolve each file against the checkpoint: the modules above apply,
    // every other one (the rest of the UNet, the text encoder) is skipped
    // and named in the warning.
    let bound: Vec<Bound> = FILES
        .iter()
        .map(|&(rel, dim)| {
            let path = shared_data(rel);
            let file = Arc::new(LoraFile::open(&path).unwrap());
            let r = file
                .resolve_layout(&layout, &ResolveOptions::default())
                .unwrap();
            let keys: BTreeSet<&str> = r.adapters.iter().map(|a| a.key.as_str()).collect();
            assert_eq!(keys, MODULES.iter().copied().collect(), "{rel}");
            assert_eq!(r.skipped.len(), 350 - MODULES.len(), "{rel}");
            assert!(
                r.skipped
                    .iter()
                    .all(|s| s.problem.kind() == ProblemKind::Unmatched),
                "{rel}: {:?}",
                r.counts()
            );
            let warning = r.warning().expect("a warning");
            assert!(
                warning.contains(&format!("{} LoRA modules skipped", 350 - MODULES.len())),
                "{warning}"
            );
            for s in &r.skipped {
                assert!(
                    warning.contains(&format!("`{}`", s.key)),
                    "{rel}: the warning misses {}",
                    s.key
                );
            }
            for a in &r.adapters {
                // dim = alpha: alpha / rank = 1, both sides low-rank.
                assert_eq!((a.rank, a.scale), (Some(dim), 1.0), "{}", a.key);
                assert!(matches!(
                    &a.delta,
                    Delta::LoKr {
                        w1: KronFactor::LowRank { .. },
                        w2: KronFactor::LowRank { .. }
                    }
                ));
            }
            let binding = lora_binding(&layout, file.clone(), &r, 1.0).unwrap();
            assert_eq!(binding.desc.patches.len(), MODULES.len());
            Bound {
                file,
                adapters: r.adapters,
                binding,
            }
        })
        .collect();
    let conv = bound[0]
        .adapters
        .iter()
        .find(|a| a.key == "lora_unet_down_blocks_0_downsamplers_0_conv")
        .unwrap();
    assert_eq!(conv.target.shape, vec![320, 320, 3, 3]);
    assert_eq!(conv.delta_shape, [320, 2880], "stored flattened");

    let (dev, compute, rt) = offload_tests::streaming_runtime(PAGE, 2, 4 * PAGE, 2);
    let m = rt
        .load(
            describe("sd15-lokr-targets", &layout),
            Arc::new(LoaderSource::new(model)),
        )
        .unwrap();
    let run = Run {
        dev: dev.clone(),
        compute,
        rt,
        m,
        layout,
        file_bytes,
    };
    let with = |set: &[(&Bound, f32)]| -> Vec<LoraBinding> {
        set.iter()
            .map(|&(b, m)| LoraBinding {
                multiplier: m,
                ..b.binding.clone()
            })
            .collect()
    };
    assert_eq!(run.check(&[]), 0);
    // One file, then a hot swap to two others stacked on the same tensors.
    let one = [(&bound[0], 1.0f32)];
    let r = run.rt.set_loras(m, &with(&one)).unwrap();
    assert_eq!(
        (r.tensors_patched, r.tensors_changed),
        (MODULES.len(), MODULES.len())
    );
    for _ in 0..2 {
        assert_eq!(run.check(&one), MODULES.len());
    }
    let two = [(&bound[1], 0.5f32), (&bound[2], -0.75f32)];
    run.rt.set_loras(m, &with(&two)).unwrap();
    for _ in 0..2 {
        assert_eq!(run.check(&two), MODULES.len());
    }
    assert!(run.rt.stats().merges >= 4 * MODULES.len() as u64);
    // Off: the file's bytes, bit for bit.
    run.rt.set_loras(m, &[]).unwrap();
    assert_eq!(run.check(&[]), 0);
    assert_eq!(run.rt.stats().lora_device_bytes, 0);
    run.rt.unload(m).unwrap();
    drop(run);
    let c = dev.counters();
    assert_eq!(
        (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
        (0, 0, 0)
    );
}
