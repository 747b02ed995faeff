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
