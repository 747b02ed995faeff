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
//! A second test compiles mutants of the batched kernels' job lookup and
//! block numbering and checks that the emulation catches each of them.
//!
//! Ignored by default (they need g++ ≥ 12 with C++20 and `_Float16`, and
//! take a minute or two): `cargo test -p offload-kernels --test
//! cuda_emulation -- --ignored`.
#![cfg(feature = "cuda")]

use std::path::Path;
use std::process::{Command, Output};

/// Compiles `emulate.cpp` into `exe`, with the kernel source
/// `lowrank_merge.cu` taken from `source_dir`.
fn compile(exe: &Path, source_dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/cuda_emulation");
    let mut g = Command::new("g++");
    g.args([
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
    .arg(source_dir);
    let compile = g
        .arg(dir.join("emulate.cpp"))
        .arg("-o")
        .arg(exe)
        .arg("-pthread")
        .output()
        .expect("run g++");
    assert!(
        compile.status.success(),
        "g++ failed:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
}

fn run(exe: &Path, args: &[&str]) -> Output {
    let out = Command::new(exe)
        .args(args)
        .output()
        .expect("run the emulation");
    let _ = std::fs::remove_file(exe);
    out
}

#[test]
#[ignore = "needs g++ (C++20, _Float16); run with --ignored"]
fn cuda_source_matches_reference_in_cpu_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::temp_dir().join(format!("offload-cuda-emulation-{}", std::process::id()));
    compile(&exe, &root.join("src/cuda"));
    let run = run(&exe, &["20"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "emulation failed:\n{stdout}");
    eprintln!("{stdout}");
    for group in [
        "lowrank: 20 cases",
        "mma: 20 cases",
        "general: 40 cases",
        "batch: 10 cases",
        "batch-mma: 10 cases",
    ] {
        assert!(stdout.contains(group), "{group}:\n{stdout}");
    }
    assert!(stdout.contains("all: 100 cases, 0 failures"), "{stdout}");
}

/// Each mutant of the batched kernels (a job lookup one block off, a block
/// index or block count not taken within the job) makes both batched groups
/// of the emulation fail; the unmutated source passes them.
#[test]
#[ignore = "needs g++ (C++20, _Float16); run with --ignored"]
fn batched_kernel_mutants_fail_the_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/cuda/lowrank_merge.cu")).unwrap();
    let mutants = [
        (
            "job lookup: the first block of a job taken as the previous job's",
            "if (k < n && b >= p.first_block[k])",
            "if (k < n && b > p.first_block[k])",
            1,
        ),
        (
            "block index: the grid's, not the job's",
            "blockIdx.x - p.first_block[j],",
            "blockIdx.x,",
            2,
        ),
        (
            "block count: the grid's, not the job's",
            "p.first_block[j + 1] - p.first_block[j])",
            "gridDim.x)",
            2,
        ),
    ];
    let tmp = std::env::temp_dir().join(format!("offload-cuda-mutants-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("emulate");
    for (what, from, to, count) in mutants {
        // Every batched entry point (fp32 FMA and tensor cores) is mutated:
        // the job lookup is shared, the rest is written out in each.
        assert_eq!(source.matches(from).count(), count, "{what}: `{from}`");
        std::fs::write(tmp.join("lowrank_merge.cu"), source.replace(from, to)).unwrap();
        compile(&exe, &tmp);
        let out = run(&exe, &["4", "batch"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("mutant ({what}):\n{stdout}");
        assert!(!out.status.success(), "{what}: not caught:\n{stdout}");
        for group in ["batch: ", "batch-mma: "] {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(group))
                .unwrap_or_else(|| panic!("{what}: no `{group}` line:\n{stdout}"));
            assert!(!line.ends_with(" 0 failures"), "{what}: {line}");
        }
    }
    // The same run on the unmutated source passes.
    std::fs::write(tmp.join("lowrank_merge.cu"), &source).unwrap();
    compile(&exe, &tmp);
    let out = run(&exe, &["4", "batch"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "unmutated:\n{stdout}");
    let _ = std::fs::remove_dir_all(&tmp);
}
