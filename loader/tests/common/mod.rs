//! Shared helpers for the loader's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a file in `../shared/data`, failing loudly if it is missing.
pub fn data(rel: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")).join(rel);
    assert!(
        p.exists(),
        "missing test data file {}: the real test files live in ../shared/data beside the \
         repository (see shared/data/README.md); they are required, not optional",
        p.display()
    );
    p
}

/// A fresh, empty temporary directory for one test.
pub fn tmpdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("offload-loader-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
