//! The runtime's view of a loader model: a [`ModelDesc`] and a
//! [`WeightSource`]; and of a resolved LoRA: a [`LoraBinding`].

use std::collections::HashMap;
use std::sync::Arc;

use offload_loader::lora::{Delta, KronFactor, LoraFile, ResolvedLora};
use offload_loader::{ComponentKind, Dtype, Model, ModelLayout, TensorInfo};
use offload_runtime::lora::{
    FactorDesc, LoraBinding, LoraDesc, LoraSource, Patch, PatchDelta, PatchKron,
};
use offload_runtime::model::{
    ComponentDesc, DType, LayerDesc, ModelDesc, Pin, SourceError, TensorDesc, WeightSource,
};

/// Reads tensor bytes of a loader [`Model`] with checked positional reads,
/// or, made with [`ModelSource::held`], holds them all in memory (as an
/// engine that keeps its weights in host RAM) and offers them to the
/// runtime ([`WeightSource::in_memory`]).
pub struct ModelSource {
    model: Arc<Model>,
    /// component → layer → tensor bytes, when held.
    held: Option<Vec<Vec<Vec<Vec<u8>>>>>,
}

impl ModelSource {
    /// Wrap an open model; every read goes to its files.
    pub fn new(model: Arc<Model>) -> Self {
        ModelSource { model, held: None }
    }

    /// Read every tensor of `model` into memory once; the runtime then
    /// copies from that memory itself.
    pub fn held(model: Arc<Model>) -> Result<Self, SourceError> {
        let mut held = Vec::with_capacity(model.layout.components.len());
        for c in &model.layout.components {
            let mut layers = Vec::with_capacity(c.layers.len());
            for l in &c.layers {
                let mut tensors = Vec::with_capacity(l.tensors.len());
                for t in &l.tensors {
                    let what = || format!("tensor {}", t.name);
                    let len = usize::try_from(t.len).map_err(|_| SourceError {
                        what: what(),
                        message: format!("{} bytes do not fit this machine's memory", t.len),
                    })?;
                    let mut bytes = Vec::new();
                    bytes.try_reserve_exact(len).map_err(|e| SourceError {
                        what: what(),
                        message: format!("holding its {len} bytes in memory: {e}"),
                    })?;
                    bytes.resize(len, 0);
                    model
                        .read_tensor_range_into(t, 0, &mut bytes)
                        .map_err(|e| SourceError {
                            what: what(),
                            message: e.to_string(),
                        })?;
                    tensors.push(bytes);
                }
                layers.push(tensors);
            }
            held.push(layers);
        }
        Ok(ModelSource {
            model,
            held: Some(held),
        })
    }

    /// Bytes held in memory (0 when reads go to the files).
    pub fn held_bytes(&self) -> usize {
        self.held
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .map(Vec::len)
            .sum()
    }
}

impl WeightSource for ModelSource {
    fn read(
        &self,
        component: usize,
        layer: usize,
        tensor: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), SourceError> {
        let t = self
            .model
            .layout
            .components
            .get(component)
            .and_then(|c| c.layers.get(layer))
            .and_then(|l| l.tensors.get(tensor))
            .ok_or_else(|| SourceError {
                what: format!("tensor {component}/{layer}/{tensor}"),
                message: "not in the model's layout".into(),
            })?;
        if let Some(bytes) = self.in_memory(component, layer, tensor) {
            let src = offset
                .checked_add(dst.len())
                .and_then(|end| bytes.get(offset..end))
                .ok_or_else(|| SourceError {
                    what: format!("tensor {}", t.name),
                    message: format!(
                        "read of {} bytes at {offset} past its {} bytes",
                        dst.len(),
                        bytes.len()
                    ),
                })?;
            dst.copy_from_slice(src);
            return Ok(());
        }
        self.model
            .read_tensor_range_into(t, offset as u64, dst)
            .map_err(|e| SourceError {
                what: format!("tensor {}", t.name),
                message: e.to_string(),
            })
    }

    fn in_memory(&self, component: usize, layer: usize, tensor: usize) -> Option<&[u8]> {
        let held = self.held.as_ref()?;
        Some(held.get(component)?.get(layer)?.get(tensor)?.as_slice())
    }
}

/// The runtime's element type for a loader dtype.
pub fn dtype(d: Dtype) -> DType {
    match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::Bool => DType::Bool,
        Dtype::F8E4M3 => DType::F8E4M3,
        Dtype::F8E5M2 => DType::F8E5M2,
    }
}

/// Describe a layout for the runtime, components in the layout's order.
pub fn describe(name: &str, layout: &ModelLayout) -> ModelDesc {
    ModelDesc {
        name: name.to_string(),
        components: layout
            .components
            .iter()
            .map(|c| ComponentDesc {
                name: c.name.clone(),
                layers: c
                    .layers
                    .iter()
                    .map(|l| LayerDesc {
                        name: l.name.clone(),
                        tensors: l
                            .tensors
                            .iter()
                            .map(|t| TensorDesc {
                                name: t.name.clone(),
                                dtype: dtype(t.dtype),
                                shape: t.shape.iter().map(|&d| d as usize).collect(),
                                bytes: t.len as usize,
                            })
                            .collect(),
                    })
                    .collect(),
                pin: Pin::Auto,
            })
            .collect(),
    }
}

/// Component indices by role: text encoders, denoisers, VAEs, others.
pub fn roles(layout: &ModelLayout) -> (Vec<usize>, Vec<usize>, Vec<usize>, Vec<usize>) {
    let pick = |k: ComponentKind| {
        layout
            .components
            .iter()
            .enumerate()
            .filter(|(_, c)| c.kind == k)
            .map(|(i, _)| i)
            .collect::<Vec<_>>()
    };
    (
        pick(ComponentKind::TextEncoder),
        pick(ComponentKind::Denoiser),
        pick(ComponentKind::Vae),
        pick(ComponentKind::Other),
    )
}

/// Reads the factor tensors of a LoRA file for the runtime.
pub struct LoraFileSource {
    file: Arc<LoraFile>,
    tensors: Vec<TensorInfo>,
}

impl LoraSource for LoraFileSource {
    fn read(&self, factor: usize, dst: &mut [u8]) -> Result<(), SourceError> {
        let t = self.tensors.get(factor).ok_or_else(|| SourceError {
            what: format!("factor {factor} of {}", self.file.path().display()),
            message: "no such factor".into(),
        })?;
        self.file.read_factor_into(t, dst).map_err(|e| SourceError {
            what: format!("{} in {}", t.name, self.file.path().display()),
            message: e.to_string(),
        })
    }
}

/// The runtime's view of a LoRA resolved against `layout` (with tensor
/// indices as [`describe`] numbers them) and the source of its factors.
/// `resolved` must have been resolved with multiplier 1: the runtime
/// applies `multiplier` itself.
pub fn lora_binding(
    layout: &ModelLayout,
    file: Arc<LoraFile>,
    resolved: &ResolvedLora,
    multiplier: f32,
) -> Result<LoraBinding, String> {
    let mut index: HashMap<(usize, &str, u64), (usize, usize, usize)> = HashMap::new();
    for (ci, c) in layout.components.iter().enumerate() {
        for (li, l) in c.layers.iter().enumerate() {
            for (ti, t) in l.tensors.iter().enumerate() {
                index.insert((t.file, t.name.as_str(), t.data_offset), (ci, li, ti));
            }
        }
    }
    let mut factors: Vec<FactorDesc> = Vec::new();
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut factor = |t: &TensorInfo| -> usize {
        *by_name.entry(t.name.clone()).or_insert_with(|| {
            factors.push(FactorDesc {
                name: t.name.clone(),
                dtype: dtype(t.dtype),
                shape: t.shape.iter().map(|&d| d as usize).collect(),
            });
            tensors.push(t.clone());
            factors.len() - 1
        })
    };
    let mut patches = Vec::with_capacity(resolved.adapters.len());
    for a in &resolved.adapters {
        let t = &a.target;
        let &(component, layer, tensor) = index
            .get(&(t.file, t.name.as_str(), t.data_offset))
            .ok_or_else(|| {
                format!(
                    "{}: module {} targets {}, which is not in the model's layout",
                    file.path().display(),
                    a.key,
                    t.name
                )
            })?;
        let mut kron = |k: &KronFactor| match k {
            KronFactor::Full(m) => PatchKron::Full(factor(m)),
            KronFactor::LowRank { a, b } => PatchKron::LowRank {
                a: factor(a),
                b: factor(b),
            },
        };
        let delta = match &a.delta {
            Delta::LowRank { up, down } => PatchDelta::LowRank {
                up: factor(up),
                down: factor(down),
            },
            Delta::LoHa { w1a, w1b, w2a, w2b } => PatchDelta::LoHa {
                w1a: factor(w1a),
                w1b: factor(w1b),
                w2a: factor(w2a),
                w2b: factor(w2b),
            },
            Delta::LoKr { w1, w2 } => PatchDelta::LoKr {
                w1: kron(w1),
                w2: kron(w2),
            },
        };
        patches.push(Patch {
            key: a.key.clone(),
            component,
            layer,
            tensor,
            rows: a.rows.as_ref().map(|r| r.start as usize..r.end as usize),
            scale: a.scale,
            delta,
        });
    }
    Ok(LoraBinding {
        desc: Arc::new(LoraDesc {
            name: file.path().display().to_string(),
            factors,
            patches,
        }),
        source: Arc::new(LoraFileSource { file, tensors }),
        multiplier,
    })
}
