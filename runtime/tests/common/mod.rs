//! Helpers shared by the residency tests: an in-memory weight source, a
//! model built from tensor sizes, and a runtime on a host device with a
//! pass that checks every tensor.
#![allow(dead_code)]

pub mod lora;

use std::sync::Arc;
use std::time::Duration;

use offload_runtime::device::{Device, DeviceExt, HostDevice, StreamId};
use offload_runtime::model::{
    ComponentDesc, DType, LayerDesc, ModelDesc, Pin, SourceError, TensorDesc, WeightSource,
};
use offload_runtime::residency::{LayerId, Mode, ModelId, Policy, Runtime, RuntimeConfig};

pub const PAGE: usize = 4096;

/// Weights held in memory: component → layer → tensor bytes; offered to
/// the runtime as memory (`WeightSource::in_memory`, which the runtime
/// copies from itself) when `in_memory`, else only read.
pub struct MemSource {
    pub data: Vec<Vec<Vec<Vec<u8>>>>,
    pub in_memory: bool,
    /// `read` calls so far.
    pub reads: std::sync::atomic::AtomicUsize,
}

impl MemSource {
    /// Weights that are only read.
    pub fn new(data: Vec<Vec<Vec<Vec<u8>>>>) -> Self {
        MemSource {
            data,
            in_memory: false,
            reads: Default::default(),
        }
    }

    /// The same weights, offered as memory.
    pub fn offering_memory(&self) -> Arc<MemSource> {
        Arc::new(MemSource {
            in_memory: true,
            ..MemSource::new(self.data.clone())
        })
    }

    /// `read` calls so far.
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl WeightSource for MemSource {
    fn read(
        &self,
        c: usize,
        l: usize,
        t: usize,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), SourceError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let src = self
            .data
            .get(c)
            .and_then(|c| c.get(l))
            .and_then(|l| l.get(t))
            .ok_or_else(|| SourceError {
                what: format!("tensor {c}/{l}/{t}"),
                message: "no such tensor".into(),
            })?;
        let end = offset + dst.len();
        if end > src.len() {
            return Err(SourceError {
                what: format!("tensor {c}/{l}/{t}"),
                message: format!("read {offset}..{end} past its {} bytes", src.len()),
            });
        }
        dst.copy_from_slice(&src[offset..end]);
        Ok(())
    }

    fn in_memory(&self, c: usize, l: usize, t: usize) -> Option<&[u8]> {
        if !self.in_memory {
            return None;
        }
        Some(self.data.get(c)?.get(l)?.get(t)?.as_slice())
    }
}

pub fn bytes_for(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A model from tensor sizes: `comps[c][l]` lists the tensor byte sizes of layer l of component c.
pub fn model(comps: &[Vec<Vec<usize>>]) -> (ModelDesc, Arc<MemSource>) {
    let mut data = Vec::new();
    let mut components = Vec::new();
    for (ci, c) in comps.iter().enumerate() {
        let mut cd = Vec::new();
        let mut layers = Vec::new();
        for (li, l) in c.iter().enumerate() {
            let mut ld = Vec::new();
            let mut tensors = Vec::new();
            for (ti, &n) in l.iter().enumerate() {
                ld.push(bytes_for((ci * 1000 + li * 10 + ti) as u64 + 1, n));
                tensors.push(TensorDesc {
                    name: format!("c{ci}.l{li}.t{ti}"),
                    dtype: DType::U8,
                    shape: vec![n],
                    bytes: n,
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
            name: "test".into(),
            components,
        },
        Arc::new(MemSource::new(data)),
    )
}

/// Layers of one tensor of `bytes` bytes each.
pub fn uniform(layers: usize, bytes: usize) -> Vec<Vec<usize>> {
    vec![vec![bytes]; layers]
}

/// A runtime on a host device, with the engine's compute stream.
pub struct Setup {
    pub dev: Arc<HostDevice>,
    pub compute: StreamId,
    pub rt: Runtime,
}

/// A runtime with `cfg` on `dev`.
pub fn setup_on(dev: Arc<HostDevice>, cfg: RuntimeConfig) -> Setup {
    let compute = dev.create_stream().unwrap();
    let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
    Setup { dev, compute, rt }
}

/// A configuration in `PAGE` units: no low watermark, a 20 s wait limit.
pub fn cfg(
    mode: Mode,
    policy: Policy,
    depth: usize,
    device_pages: usize,
    high_pages: Option<usize>,
) -> RuntimeConfig {
    RuntimeConfig {
        mode: Some(mode),
        policy,
        prefetch_depth: depth,
        device_memory: Some(device_pages * PAGE),
        high_watermark: high_pages.map(|p| p * PAGE),
        low_watermark: Some(0),
        wait_timeout: Duration::from_secs(20),
        ..RuntimeConfig::default()
    }
}

/// Acquire every layer of component `c` in order, check each tensor's bytes
/// as the compute stream sees them, and return the bytes uploaded meanwhile.
pub fn pass(s: &Setup, m: ModelId, src: &MemSource, c: usize) -> u64 {
    s.rt.synchronize().unwrap();
    let before = s.rt.stats().bytes_h2d;
    for l in 0..src.data[c].len() {
        let g =
            s.rt.acquire(LayerId {
                model: m,
                component: c,
                layer: l,
            })
            .unwrap();
        for (t, view) in g.tensors().enumerate() {
            let mut back = vec![0u8; view.bytes];
            // Read on the compute stream, after the wait the runtime queued.
            s.dev.read_blocking(view.ptr, &mut back, s.compute).unwrap();
            assert!(
                back == src.data[c][l][t],
                "tensor {} differs when the compute stream reads it",
                view.name
            );
        }
        drop(g);
    }
    s.rt.synchronize().unwrap();
    s.rt.stats().bytes_h2d - before
}
