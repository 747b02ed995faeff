//! The runtime's view of a loader model, for tests: a [`ModelDesc`] and a
//! [`WeightSource`] that reads tensor bytes with the loader's checked
//! positional reads (never through a memory map).

use std::sync::Arc;

use offload_loader::{Dtype, Model, ModelLayout};
use offload_runtime::model::{
    ComponentDesc, DType, LayerDesc, ModelDesc, Pin, SourceError, TensorDesc, WeightSource,
};

/// Reads the tensors of an open loader [`Model`].
pub struct LoaderSource {
    model: Arc<Model>,
}

impl LoaderSource {
    /// Wrap an open model.
    pub fn new(model: Arc<Model>) -> Self {
        LoaderSource { model }
    }
}

impl WeightSource for LoaderSource {
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
        self.model
            .read_tensor_range_into(t, offset as u64, dst)
            .map_err(|e| SourceError {
                what: format!("tensor {}", t.name),
                message: e.to_string(),
            })
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

/// Describe a layout for the runtime, components and layers in the layout's order.
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
