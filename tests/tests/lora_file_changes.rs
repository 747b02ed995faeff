//! A LoRA file that changes on disk while in use. A synthetic kohya LoRA
//! (`offload_loader::synth::{lora_specs, write_lora}`) over a small SD 1.5
//! checkpoint is opened, resolved and bound (`lora_binding`); then its file
//! is truncated or rewritten in place, and `set_loras` must fail with
//! `Error::Lora` naming the file, change nothing (`loras()` and every
//! tensor stay as they were, bit for bit), and leave the runtime working.
//! Factor bytes are read with checked positional reads, so a cut file is an
//! error, never a SIGBUS. A LoRA already in the set keeps the factors it
//! read while it stays there (a multiplier change reads nothing); one
//! replaced by rename keeps the bytes of the file that was opened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use half::f16;
use offload_bench::source::lora_binding;
use offload_loader::lora::{Delta, LoraFile, ResolveOptions};
use offload_loader::synth::{
    lora_specs, preset_specs, write_deterministic, write_lora, LoraConvention, LoraOptions, Preset,
    PresetOptions,
};
use offload_loader::{Adapter, Dtype, Model, ModelLayout};
use offload_runtime::device::{DeviceExt, HostDevice, StreamId};
use offload_runtime::lora::LoraBinding;
use offload_runtime::residency::{LayerId, ModelId, Runtime};
use offload_runtime::Error;
use offload_tests::source::{describe, LoaderSource};
use offload_tests::Scratch;

const PAGE: usize = 64 << 10;

fn decode(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
        .collect()
}

/// A LoRA file as resolved and bound, with its factor bytes as read when
/// it was opened (for the reference).
struct Bound {
    path: PathBuf,
    adapters: Vec<Adapter>,
    factors: HashMap<String, Vec<u8>>,
    binding: LoraBinding,
}

impl Bound {
    fn with(&self, multiplier: f32) -> LoraBinding {
        LoraBinding {
            multiplier,
            ..self.binding.clone()
        }
    }
}

struct Run {
    dev: Arc<HostDevice>,
    compute: StreamId,
    rt: Runtime,
    m: ModelId,
    layout: ModelLayout,
    specs: Vec<offload_loader::synth::TensorSpec>,
    file_bytes: Vec<Vec<Vec<Vec<u8>>>>,
}

/// A scaled-down SD 1.5 UNet (widths / 16), streamed: sequential mode, staged host policy.
fn start(scratch: &Scratch) -> Run {
    let specs = preset_specs(
        Preset::Sd15,
        &PresetOptions {
            scale: 16,
            dtype: Dtype::F16,
            text_encoders: false,
            vae: false,
        },
    );
    let path = scratch.join("sd15_small.safetensors");
    write_deterministic(&path, &specs, &Default::default(), 99).unwrap();
    let raw = std::fs::read(&path).unwrap();
    let model = Arc::new(Model::open(&path).unwrap());
    let layout = model.layout.clone();
    let file_bytes = offload_tests::tensor_bytes(&layout, &raw);
    let (dev, compute, rt) = offload_tests::streaming_runtime(PAGE, 2, 2 * PAGE, 2);
    let m = rt
        .load(
            describe("sd15-small", &layout),
            Arc::new(LoaderSource::new(model)),
        )
        .unwrap();
    Run {
        dev,
        compute,
        rt,
        m,
        layout,
        specs,
        file_bytes,
    }
}

impl Run {
    /// Write a kohya LoRA over the UNet (rank 4, alpha 2), open, resolve and bind it.
    fn lora(&self, scratch: &Scratch, name: &str, seed: u64) -> Bound {
        let path = scratch.join(name);
        let specs = lora_specs(
            &self.specs,
            &LoraOptions {
                convention: LoraConvention::Kohya,
                rank: 4,
                dtype: Dtype::F16,
            },
        );
        assert!(!specs.is_empty());
        write_lora(&path, &specs, 2.0, seed).unwrap();
        let file = Arc::new(LoraFile::open(&path).unwrap());
        let r = file
            .resolve_layout(&self.layout, &ResolveOptions::default())
            .unwrap();
        assert!(r.skipped.is_empty(), "{:?}", r.warning());
        assert!(!r.adapters.is_empty());
        let mut factors = HashMap::new();
        for a in &r.adapters {
            assert_eq!(a.scale, 0.5, "alpha 2 / rank 4");
            for t in a.delta.factors() {
                let mut buf = vec![0u8; t.len as usize];
                file.read_factor_into(t, &mut buf).unwrap();
                factors.insert(t.name.clone(), buf);
            }
        }
        let binding = lora_binding(&self.layout, file, &r, 1.0).unwrap();
        Bound {
            path,
            adapters: r.adapters,
            factors,
            binding,
        }
    }

    /// Every tensor as the compute stream sees it, by (component, layer, tensor).
    fn snapshot(&self) -> Vec<Vec<Vec<Vec<u8>>>> {
        self.layout
            .components
            .iter()
            .enumerate()
            .map(|(c, comp)| {
                (0..comp.layers.len())
                    .map(|l| {
                        let g = self
                            .rt
                            .acquire(LayerId {
                                model: self.m,
                                component: c,
                                layer: l,
                            })
                            .unwrap();
                        g.tensors()
                            .map(|v| {
                                let mut back = vec![0u8; v.bytes];
                                self.dev
                                    .read_blocking(v.ptr, &mut back, self.compute)
                                    .unwrap();
                                back
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// A snapshot checked against `set`: the file's bytes where nothing is
    /// set, else W + Σ s·up·down (f64, from the factor bytes read at open)
    /// within 2⁻¹⁰·(|W| + Σ|s|·|up|·|down|).
    fn checked(&self, set: &[(&Bound, f32)]) -> Vec<Vec<Vec<Vec<u8>>>> {
        let snap = self.snapshot();
        let mut patched = 0;
        for (c, comp) in self.layout.components.iter().enumerate() {
            for (l, layer) in comp.layers.iter().enumerate() {
                for (t, tr) in layer.tensors.iter().enumerate() {
                    let got = &snap[c][l][t];
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
                        assert!(got == w, "{}: not the file's bytes", tr.name);
                        continue;
                    }
                    patched += 1;
                    let cols = tr.shape[1..].iter().product::<u64>() as usize;
                    let mut exact = decode(w);
                    let mut bound: Vec<f64> = exact.iter().map(|x| x.abs()).collect();
                    for (b, a, m) in adapters {
                        let Delta::LowRank { up, down } = &a.delta else {
                            panic!("{}: not low-rank", a.key)
                        };
                        let (u, d) = (decode(&b.factors[&up.name]), decode(&b.factors[&down.name]));
                        let r = down.shape[0] as usize;
                        let s = f64::from(a.scale) * f64::from(m);
                        for i in 0..up.shape[0] as usize {
                            for j in 0..cols {
                                let (mut v, mut n) = (0.0, 0.0);
                                for q in 0..r {
                                    let x = u[i * r + q] * d[q * cols + j];
                                    v += x;
                                    n += x.abs();
                                }
                                exact[i * cols + j] += s * v;
                                bound[i * cols + j] += s.abs() * n;
                            }
                        }
                    }
                    for (i, ((&g, &e), &b)) in
                        decode(got).iter().zip(&exact).zip(&bound).enumerate()
                    {
                        assert!(
                            !g.is_nan() && (g - e).abs() <= b * 2f64.powi(-10),
                            "{} element {i}: {g} vs reference {e} (bound {b})",
                            tr.name
                        );
                    }
                }
            }
        }
        if !set.is_empty() {
            assert!(patched > 0);
        }
        snap
    }

    /// `set_loras` must fail with `Error::Lora` naming `path`, and leave
    /// `loras()` at `before` and every tensor at `snap`.
    fn refused(
        &self,
        set: &[LoraBinding],
        path: &Path,
        before: &[LoraBinding],
        snap: &[Vec<Vec<Vec<u8>>>],
    ) -> String {
        let e = self.rt.set_loras(self.m, set).unwrap_err();
        let msg = e.to_string();
        eprintln!("refused: {msg}");
        match &e {
            Error::Lora { lora, .. } => assert_eq!(lora, &path.display().to_string(), "{msg}"),
            other => panic!("not a LoRA error: {other:?}"),
        }
        assert!(
            msg.contains(&path.display().to_string()),
            "the error names the file: {msg}"
        );
        let now = self.rt.loras(self.m).unwrap();
        assert_eq!(now.len(), before.len(), "{msg}");
        for (a, b) in now.iter().zip(before) {
            assert!(
                Arc::ptr_eq(&a.desc, &b.desc) && a.multiplier == b.multiplier,
                "the set changed: {msg}"
            );
        }
        assert!(
            self.snapshot() == snap,
            "a tensor changed after a refused set: {msg}"
        );
        msg
    }

    fn finish(self) {
        self.rt.unload(self.m).unwrap();
        assert_eq!(self.rt.arena().pages_used(), 0);
        assert_eq!(self.rt.stats().lora_device_bytes, 0);
        let dev = self.dev.clone();
        drop(self);
        let c = dev.counters();
        assert_eq!(
            (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
            (0, 0, 0)
        );
    }
}

/// Rewrite `path` in place with `bytes` (as `cp other path` does), and make
/// sure its modification time moves even on a coarse clock.
fn rewrite(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
}

#[test]
fn a_lora_file_changed_after_it_was_bound_is_an_error_at_set_loras_that_changes_nothing() {
    let scratch = Scratch::new("lora-file-changes");
    let run = start(&scratch);
    let a = run.lora(&scratch, "a.safetensors", 1);
    run.rt.set_loras(run.m, &[a.with(1.0)]).unwrap();
    let snap = run.checked(&[(&a, 1.0)]);
    let before = run.rt.loras(run.m).unwrap();
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();

    // Truncated to half its length.
    let b = run.lora(&scratch, "b.safetensors", 2);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b.path)
        .unwrap()
        .set_len(len(&b.path) / 2)
        .unwrap();
    let msg = run.refused(&[a.with(1.0), b.with(0.5)], &b.path, &before, &snap);
    assert!(
        msg.contains("truncated") || msg.contains("changed"),
        "says what happened: {msg}"
    );

    // Rewritten in place, same length, other values.
    let c = run.lora(&scratch, "c.safetensors", 3);
    let other = scratch.join("other.safetensors");
    write_lora(
        &other,
        &lora_specs(
            &run.specs,
            &LoraOptions {
                convention: LoraConvention::Kohya,
                rank: 4,
                dtype: Dtype::F16,
            },
        ),
        2.0,
        77,
    )
    .unwrap();
    let other_bytes = std::fs::read(&other).unwrap();
    assert_eq!(other_bytes.len() as u64, len(&c.path));
    rewrite(&c.path, &other_bytes);
    let msg = run.refused(&[c.with(1.0)], &c.path, &before, &snap);
    assert!(msg.contains("changed"), "says what happened: {msg}");

    // Rewritten shorter and longer.
    let d = run.lora(&scratch, "d.safetensors", 4);
    rewrite(&d.path, &other_bytes[..other_bytes.len() / 3]);
    run.refused(&[d.with(1.0), a.with(1.0)], &d.path, &before, &snap);
    let e = run.lora(&scratch, "e.safetensors", 5);
    let mut longer = other_bytes.clone();
    longer.extend_from_slice(&other_bytes);
    rewrite(&e.path, &longer);
    run.refused(&[e.with(-1.0)], &e.path, &before, &snap);

    // Replaced by rename: the open file keeps its bytes, so the LoRA applies as opened.
    let f = run.lora(&scratch, "f.safetensors", 6);
    std::fs::rename(&other, &f.path).unwrap();
    run.rt
        .set_loras(run.m, &[a.with(1.0), f.with(0.25)])
        .unwrap();
    run.checked(&[(&a, 1.0), (&f, 0.25)]);

    // The runtime goes on: back to `a` alone, then to nothing.
    run.rt.set_loras(run.m, &[a.with(1.0)]).unwrap();
    assert!(run.checked(&[(&a, 1.0)]) == snap);
    run.rt.set_loras(run.m, &[]).unwrap();
    run.checked(&[]);
    run.finish();
}

#[test]
fn a_lora_in_the_set_keeps_the_factors_it_read_and_is_refused_once_it_leaves_and_comes_back() {
    let scratch = Scratch::new("lora-file-in-use");
    let run = start(&scratch);
    let a = run.lora(&scratch, "a.safetensors", 11);
    run.rt.set_loras(run.m, &[a.with(1.0)]).unwrap();
    run.checked(&[(&a, 1.0)]);
    // Cut while in the set: its factors are on the device already, and a
    // new multiplier reads nothing.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a.path)
        .unwrap()
        .set_len(100)
        .unwrap();
    run.rt.set_loras(run.m, &[a.with(-0.5)]).unwrap();
    run.checked(&[(&a, -0.5)]);
    // Out of the set, the factors are gone; coming back reads the file: refused.
    run.rt.set_loras(run.m, &[]).unwrap();
    let snap = run.checked(&[]);
    run.refused(&[a.with(1.0)], &a.path, &[], &snap);
    run.finish();
}
