//! The CUDA merge kernel's source, run on the CPU.
//!
//! No GPU or CUDA toolkit is needed: `g++` compiles `src/cuda/lowrank_merge.cu`
//! against stand-in headers (`tests/cuda_emulation/include`) that run each
//! CUDA thread as an OS thread, one block at a time, with a barrier for
//! `__syncthreads()`; `tests/cuda_emulation/emulate.cpp` launches it on
//! random merges and checks every element against an f64 reference with the
//! same tolerance as the CPU tests. This checks the indexing, tiling,
//! synchronisation and rounding of the source, and that it is valid C++; it
//! does not check NVRTC, the GPU memory model or speed.
//!
//! Ignored by default (it needs g++ ≥ 12 with C++20 and `_Float16`, and
//! takes a few seconds): `cargo test -p offload-kernels --test cuda_emulation
//! -- --ignored`.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs g++ (C++20, _Float16); run with --ignored"]
fn cuda_source_matches_reference_in_cpu_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emulation");
    let exe = std::env::temp_dir().join(format!("offload-cuda-emulation-{}", std::process::id()));
    let compile = Command::new("g++")
        .args([
            "-std=c++20",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-pragmas",
            // The kernels read W and shared tiles through vector structs, as
            // CUDA code does; CUDA has no strict-aliasing rule to break.
            "-fno-strict-aliasing",
        ])
        .arg("-I")
        .arg(dir.join("include"))
        .arg("-I")
        .arg(root.join("src/cuda"))
        .arg(dir.join("emulate.cpp"))
        .arg("-o")
        .arg(&exe)
        .arg("-pthread")
        .output()
        .expect("run g++");
    assert!(
        compile.status.success(),
        "g++ failed:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let run = Command::new(&exe)
        .arg("20")
        .output()
        .expect("run the emulation");
    let _ = std::fs::remove_file(&exe);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "emulation failed:\n{stdout}");
    eprintln!("{stdout}");
    for group in ["lowrank: 20 cases", "mma: 20 cases", "general: 40 cases"] {
        assert!(stdout.contains(group), "{group}:\n{stdout}");
    }
    assert!(stdout.contains("all: 80 cases, 0 failures"), "{stdout}");
}
