//! Shared helpers for the integration tests.

use std::path::{Path, PathBuf};

/// The runtime's view of a loader model (shared with the `offload` command line).
pub mod source {
    pub use offload_bench::source::{describe, dtype, ModelSource as LoaderSource};
}

/// Path of a file in the shared real-data folder (`../shared/data` beside the repo).
///
/// Panics with a pointer to the data README when the file is missing, so a
/// test that needs it fails loudly instead of passing without it.
pub fn shared_data(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data")
        .join(rel);
    assert!(
        p.exists(),
        "test data {} is missing: see ../shared/data/README.md",
        p.display()
    );
    p
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty scratch directory named after `name` and the process.
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("offload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch directory");
        Scratch(p)
    }

    /// A path inside the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sequential, planned runtime on a 64 MiB host device with pages of
/// `page` bytes and 16 MiB for weights, streaming uploads from the source
/// through `buffers` staging buffers of `buffer_bytes` on `threads` readers
/// (so every read of the file is checked as it happens).
pub fn streaming_runtime(
    page: usize,
    buffers: usize,
    buffer_bytes: usize,
    threads: usize,
) -> (
    std::sync::Arc<offload_runtime::device::HostDevice>,
    offload_runtime::device::StreamId,
    offload_runtime::residency::Runtime,
) {
    use offload_runtime::device::{Device, HostConfig, HostDevice};
    use offload_runtime::residency::{HostPolicy, Mode, Policy, Runtime, RuntimeConfig};
    let dev = std::sync::Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 << 20,
            page_size: page,
            link_gbps: None,
        })
        .expect("host device"),
    );
    let compute = dev.create_stream().expect("compute stream");
    let rt = Runtime::new(
        dev.clone(),
        compute,
        RuntimeConfig {
            mode: Some(Mode::Sequential),
            policy: Policy::Planned,
            prefetch_depth: 1,
            device_memory: Some(16 << 20),
            host_policy: HostPolicy::Staged {
                buffers,
                buffer_bytes,
                threads,
                fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
                write_combined: false,
            },
            wait_timeout: std::time::Duration::from_secs(20),
            ..RuntimeConfig::default()
        },
    )
    .expect("runtime");
    (dev, compute, rt)
}

/// The bytes of every tensor of `layout`, by component, layer and tensor,
/// cut from `raw`, the whole single checkpoint file as read from disk.
pub fn tensor_bytes(layout: &offload_loader::ModelLayout, raw: &[u8]) -> Vec<Vec<Vec<Vec<u8>>>> {
    layout
        .components
        .iter()
        .map(|c| {
            c.layers
                .iter()
                .map(|l| {
                    l.tensors
                        .iter()
                        .map(|t| {
                            raw[t.data_offset as usize..(t.data_offset + t.len) as usize].to_vec()
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}
