//! LoRA helpers shared by the fault and thread tests: a model of f16
//! weights, LoRAs of every delta kind over chosen tensors, and the f64
//! reference merge with its error bound (as in `tests/lora.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use half::f16;
use offload_runtime::lora::{
    FactorDesc, LoraBinding, LoraDesc, LoraSource, Patch, PatchDelta, PatchKron,
};
use offload_runtime::model::{
    ComponentDesc, DType, LayerDesc, ModelDesc, Pin, SourceError, TensorDesc,
};

use super::MemSource;

fn rng(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `n` f16 values uniform in `[-amp, amp)`, little-endian bytes.
pub fn f16_bytes(seed: u64, n: usize, amp: f32) -> Vec<u8> {
    let mut r = rng(seed);
    (0..n)
        .flat_map(|_| f16::from_f32(r() * amp).to_le_bytes())
        .collect()
}

/// f16 bytes as f64 values.
pub fn decode(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
        .collect()
}

/// A model of f16 tensors: `comps[c][l]` lists the shapes of layer l's tensors.
pub fn f16_model(
    name: &str,
    seed: u64,
    comps: &[Vec<Vec<Vec<usize>>>],
) -> (ModelDesc, Arc<MemSource>) {
    let mut data = Vec::new();
    let mut components = Vec::new();
    for (ci, c) in comps.iter().enumerate() {
        let mut cd = Vec::new();
        let mut layers = Vec::new();
        for (li, l) in c.iter().enumerate() {
            let mut ld = Vec::new();
            let mut tensors = Vec::new();
            for (ti, shape) in l.iter().enumerate() {
                let n: usize = shape.iter().product();
                let s = seed * 1_000_003 + (ci * 1000 + li * 10 + ti) as u64 + 1;
                ld.push(f16_bytes(s, n, 1.0));
                tensors.push(TensorDesc {
                    name: format!("{name}.c{ci}.l{li}.t{ti}"),
                    dtype: DType::F16,
                    shape: shape.clone(),
                    bytes: n * 2,
                });
            }
            cd.push(ld);
            layers.push(LayerDesc {
                name: format!("layer{li}"),
                tensors,
            });
        }
        data.push(cd);
        components.push(ComponentDesc {
            name: format!("comp{ci}"),
            layers,
            pin: Pin::Auto,
        });
    }
    (
        ModelDesc {
            name: name.into(),
            components,
        },
        Arc::new(MemSource::new(data)),
    )
}

/// A LoRA's factors in memory; `fail` makes every read fail.
pub struct Factors {
    pub data: Vec<Vec<u8>>,
    pub fail: AtomicBool,
}

impl LoraSource for Factors {
    fn read(&self, factor: usize, dst: &mut [u8]) -> Result<(), SourceError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(SourceError {
                what: format!("factor {factor}"),
                message: "the file changed".into(),
            });
        }
        dst.copy_from_slice(&self.data[factor]);
        Ok(())
    }
}

/// Adapter kinds for [`lora`].
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `up · down` of this rank.
    LowRank(usize),
    /// Low-rank over the middle half of the rows only (a slice of a fused weight).
    Slice(usize),
    /// LoHa of this rank.
    LoHa(usize),
    /// LoKr: a full 4×4 left side, a rank-2 right side.
    LoKr,
}

/// (component, layer, tensor).
pub type Target = (usize, usize, usize);

pub type Lora = (Arc<LoraDesc>, Arc<Factors>);

/// A set as the tests keep it: each LoRA with its multiplier.
pub type Set = Vec<(Lora, f32)>;

fn shape_of(desc: &ModelDesc, (c, l, t): Target) -> [usize; 2] {
    let s = &desc.components[c].layers[l].tensors[t].shape;
    assert!(s.len() == 2, "LoRA targets are 2-D");
    [s[0], s[1]]
}

/// A LoRA named `lora{seed}` over each of `targets` (2-D f16 tensors of `desc`).
/// LoKr needs rows and columns that are multiples of 4; a slice, rows that are multiples of 4.
pub fn lora(seed: u64, desc: &ModelDesc, targets: &[Target], kind: Kind) -> Lora {
    let mut factors = Vec::new();
    let mut data = Vec::new();
    let mut patches = Vec::new();
    let add = |shape: [usize; 2], factors: &mut Vec<FactorDesc>, data: &mut Vec<Vec<u8>>| {
        let i = factors.len();
        factors.push(FactorDesc {
            name: format!("f{i}"),
            dtype: DType::F16,
            shape: shape.to_vec(),
        });
        data.push(f16_bytes(seed * 1000 + i as u64, shape[0] * shape[1], 0.25));
        i
    };
    for &target in targets {
        let [rows, cols] = shape_of(desc, target);
        let (r, delta, slice) = match kind {
            Kind::LowRank(r) => (
                r,
                PatchDelta::LowRank {
                    up: add([rows, r], &mut factors, &mut data),
                    down: add([r, cols], &mut factors, &mut data),
                },
                None,
            ),
            Kind::Slice(r) => (
                r,
                PatchDelta::LowRank {
                    up: add([rows / 2, r], &mut factors, &mut data),
                    down: add([r, cols], &mut factors, &mut data),
                },
                Some(rows / 4..rows / 4 + rows / 2),
            ),
            Kind::LoHa(r) => (
                r,
                PatchDelta::LoHa {
                    w1a: add([rows, r], &mut factors, &mut data),
                    w1b: add([r, cols], &mut factors, &mut data),
                    w2a: add([rows, r], &mut factors, &mut data),
                    w2b: add([r, cols], &mut factors, &mut data),
                },
                None,
            ),
            Kind::LoKr => (
                2,
                PatchDelta::LoKr {
                    w1: PatchKron::Full(add([4, 4], &mut factors, &mut data)),
                    w2: PatchKron::LowRank {
                        a: add([rows / 4, 2], &mut factors, &mut data),
                        b: add([2, cols / 4], &mut factors, &mut data),
                    },
                },
                None,
            ),
        };
        let (c, l, t) = target;
        patches.push(Patch {
            key: format!("lora{seed}_c{c}_l{l}_t{t}"),
            component: c,
            layer: l,
            tensor: t,
            rows: slice,
            scale: 1.0 / r as f32,
            delta,
        });
    }
    (
        Arc::new(LoraDesc {
            name: format!("lora{seed}.safetensors"),
            factors,
            patches,
        }),
        Arc::new(Factors {
            data,
            fail: AtomicBool::new(false),
        }),
    )
}

pub fn bindings(set: &Set) -> Vec<LoraBinding> {
    set.iter()
        .map(|((desc, src), m)| LoraBinding {
            desc: desc.clone(),
            source: src.clone(),
            multiplier: *m,
        })
        .collect()
}

/// Whether two bindings lists are the same set (same LoRAs, same multipliers, same order).
pub fn same_set(a: &[LoraBinding], b: &[LoraBinding]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Arc::ptr_eq(&x.desc, &y.desc)
                && Arc::ptr_eq(&x.source, &y.source)
                && x.multiplier.to_bits() == y.multiplier.to_bits()
        })
}

/// Whether `set` patches tensor `k`.
pub fn patched(set: &Set, (c, l, t): Target) -> bool {
    set.iter().any(|((d, _), _)| {
        d.patches
            .iter()
            .any(|p| p.component == c && p.layer == l && p.tensor == t)
    })
}

/// The f64 reference: W + Σ s·Δ for tensor `k`, and the error bound per
/// element |W| + Σ|s|·|B|·|A| (each product of factors taken in absolute value).
pub fn reference(desc: &ModelDesc, src: &MemSource, set: &Set, k: Target) -> (Vec<f64>, Vec<f64>) {
    let (c, l, t) = k;
    let shape = &desc.components[c].layers[l].tensors[t].shape;
    let cols: usize = shape[1..].iter().product();
    let mut exact = decode(&src.data[c][l][t]);
    let mut bound: Vec<f64> = exact.iter().map(|x| x.abs()).collect();
    for ((ld, ls), mult) in set {
        let f = |i: usize| (decode(&ls.data[i]), ld.factors[i].shape.clone());
        for p in ld
            .patches
            .iter()
            .filter(|p| p.component == c && p.layer == l && p.tensor == t)
        {
            let s = f64::from(p.scale * mult);
            let r0 = p.rows.as_ref().map_or(0, |r| r.start);
            let n = p.rows.as_ref().map_or(shape[0], |r| r.end - r.start);
            add_delta(&mut exact, &mut bound, cols, r0, n, s, &p.delta, &f);
        }
    }
    (exact, bound)
}

/// Add `s·Δ` of `delta` (factors from `f`: values and stored shape) to rows
/// `r0..r0+n` of a `cols`-column matrix, and `|s|·|Δ|` (products in absolute value) to `bound`.
#[allow(clippy::too_many_arguments)]
pub fn add_delta(
    exact: &mut [f64],
    bound: &mut [f64],
    cols: usize,
    r0: usize,
    n: usize,
    s: f64,
    delta: &PatchDelta,
    f: &dyn Fn(usize) -> (Vec<f64>, Vec<usize>),
) {
    let width = |shape: &[usize]| shape[1..].iter().product::<usize>();
    let prod = |a: &(Vec<f64>, Vec<usize>), b: &(Vec<f64>, Vec<usize>), i: usize, j: usize| {
        let k = width(&a.1);
        let bw = width(&b.1);
        let mut v = 0.0;
        let mut m = 0.0;
        for q in 0..k {
            let x = a.0[i * k + q] * b.0[q * bw + j];
            v += x;
            m += x.abs();
        }
        (v, m)
    };
    // Factors decoded once.
    let ids = match *delta {
        PatchDelta::LowRank { up, down } => vec![up, down],
        PatchDelta::LoHa { w1a, w1b, w2a, w2b } => vec![w1a, w1b, w2a, w2b],
        PatchDelta::LoKr { w1, w2 } => {
            let mut v = Vec::new();
            for k in [w1, w2] {
                match k {
                    PatchKron::Full(m) => v.push(m),
                    PatchKron::LowRank { a, b } => v.extend([a, b]),
                }
            }
            v
        }
    };
    let fs: std::collections::BTreeMap<usize, (Vec<f64>, Vec<usize>)> =
        ids.iter().map(|&i| (i, f(i))).collect();
    let side = |k: PatchKron, i: usize, j: usize| match k {
        PatchKron::Full(m) => {
            let (v, sh) = &fs[&m];
            let x = v[i * width(sh) + j];
            (x, x.abs())
        }
        PatchKron::LowRank { a, b } => prod(&fs[&a], &fs[&b], i, j),
    };
    let side_shape = |k: PatchKron| match k {
        PatchKron::Full(m) => [fs[&m].1[0], width(&fs[&m].1)],
        PatchKron::LowRank { a, b } => [fs[&a].1[0], width(&fs[&b].1)],
    };
    for i in 0..n {
        for j in 0..cols {
            let (d, m) = match *delta {
                PatchDelta::LowRank { up, down } => prod(&fs[&up], &fs[&down], i, j),
                PatchDelta::LoHa { w1a, w1b, w2a, w2b } => {
                    let (x, mx) = prod(&fs[&w1a], &fs[&w1b], i, j);
                    let (y, my) = prod(&fs[&w2a], &fs[&w2b], i, j);
                    (x * y, mx * my)
                }
                PatchDelta::LoKr { w1, w2 } => {
                    let [c2, d2] = side_shape(w2);
                    let (x, mx) = side(w1, i / c2, j / d2);
                    let (y, my) = side(w2, i % c2, j % d2);
                    (x * y, mx * my)
                }
            };
            exact[(r0 + i) * cols + j] += s * d;
            bound[(r0 + i) * cols + j] += s.abs() * m;
        }
    }
}

/// Check f16 bytes `got` against `(exact, bound)`: |got − exact| ≤ 2⁻¹⁰·bound, never NaN.
pub fn within(got: &[u8], exact: &[f64], bound: &[f64]) -> Result<(), String> {
    let got = decode(got);
    if got.len() != exact.len() {
        return Err(format!(
            "{} elements, the reference has {}",
            got.len(),
            exact.len()
        ));
    }
    for (i, ((&g, &e), &b)) in got.iter().zip(exact).zip(bound).enumerate() {
        if g.is_nan() || (g - e).abs() > b * 2f64.powi(-10) {
            return Err(format!("element {i}: {g} vs reference {e} (bound {b})"));
        }
    }
    Ok(())
}

/// Check the bytes of tensor `k` against `set`: the file's bytes where the
/// set patches nothing, else within the tolerance of the f64 reference.
pub fn check(
    desc: &ModelDesc,
    src: &MemSource,
    set: &Set,
    k: Target,
    got: &[u8],
) -> Result<(), String> {
    let (c, l, t) = k;
    if !patched(set, k) {
        return if got == src.data[c][l][t] {
            Ok(())
        } else {
            Err("not the file's bytes".into())
        };
    }
    let (exact, bound) = reference(desc, src, set, k);
    within(got, &exact, &bound)
}

/// Every (component, layer, tensor) of a model.
pub fn targets(desc: &ModelDesc) -> Vec<Target> {
    let mut v = Vec::new();
    for (c, comp) in desc.components.iter().enumerate() {
        for (l, layer) in comp.layers.iter().enumerate() {
            for t in 0..layer.tensors.len() {
                v.push((c, l, t));
            }
        }
    }
    v
}
