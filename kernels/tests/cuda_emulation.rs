//! The CUDA merge kernel's source, run on the CPU.
//!
//! No GPU or CUDA toolkit is needed: `g++` compiles `src/cuda/lowrank_merge.cu`
//! against stand-in headers (`tests/cuda_emulation/include`) that run each
//! CUDA thread as an OS thread, one block at a time, with a barrier for
//! `__syncthreads()`; `tests/cuda_emulation/emulate.cpp` launches it on
//! random merges and checks every element against an f64 reference with the
//! same tolerance as the CPU tests, and rows outside the merged slice bit for
//! bit. The batched kernels' cases also check that each job's slice is
//! bit-identical (memcmp) to the same job launched alone through the
//! one-tensor kernel with the job's number of blocks, and include jobs that
//! merge disjoint row slices of one W buffer (a fused qkv weight), whose rows
//! outside every slice, and a guard row past its end, must stay as they were
//! bit for bit. This checks the indexing, tiling, synchronisation and
//! rounding of the source, and that it is valid C++; it does not check NVRTC,
//! the GPU memory model (blocks run one at a time, so a race between blocks
//! is not seen) or speed.
//!
//! A second test compiles mutants of the batched kernels (the job lookup,
//! the block numbering within a job, the adapters' order, the kernel body,
//! the row slice's extent) and checks that the emulation catches each of
//! them, three of them by the bit-identity or untouched-rows checks alone.
//!
//! Ignored by default (they need g++ ≥ 12 with C++20 and `_Float16`, and
//! take several minutes each): `cargo test -p offload-kernels --test
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

/// The emulation's output `stdout` for mutant `what` has `message`, and
/// the f64 check (whose message is `got .., exact .., allowed ..`) passed:
/// only the check that prints `message` caught it.
fn caught_only_by(what: &str, stdout: &str, message: &str) {
    assert!(
        stdout.contains(message),
        "{what}: no `{message}`:\n{stdout}"
    );
    assert!(
        !stdout.contains(", allowed "),
        "{what}: the f64 check fails:\n{stdout}"
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
        "pipe: 20 cases",
        "pipe-tall: 20 cases",
        "general: 40 cases",
        "batch: 10 cases",
        "batch-mma: 10 cases",
        "batch-pipe: 10 cases",
        "batch-pipe-tall: 10 cases",
        "stream8: 20 cases",
        "stream32: 20 cases",
        "stream8s: 20 cases",
    ] {
        assert!(stdout.contains(group), "{group}:\n{stdout}");
    }
    assert!(stdout.contains("all: 220 cases, 0 failures"), "{stdout}");
    // The pipelined kernels' groups took their cp.async path (most of their
    // cases), not only their plain loads.
    for group in ["pipe: ", "batch-pipe: ", "pipe-tall: ", "batch-pipe-tall: "] {
        let line = stdout.lines().find(|l| l.starts_with(group)).unwrap();
        let copies: u64 = line
            .split(", ")
            .find_map(|f| f.strip_suffix(" cp.async copies"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no copy count: {line}"));
        assert!(copies > 10_000, "{line}");
    }
}

/// Each mutant of the batched kernels makes the batched groups of the
/// emulation it touches fail, and the other one (if any) pass; the unmutated
/// source passes. A job lookup one block off, or a block index or block
/// count not taken within the job, fails every check. Three mutants pass the
/// f64 check and are caught only by one of the others: a job's adapters
/// merged in another order, or the batched tensor-core kernel running the
/// fp32 FMA body (not bit-identical to the job launched alone), and W's
/// place one row longer than the slice (the row past it is written back
/// with zero added: only the negative zeros outside every slice see it).
#[test]
#[ignore = "needs g++ (C++20, _Float16); run with --ignored"]
fn batched_kernel_mutants_fail_the_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/cuda/lowrank_merge.cu")).unwrap();
    const ALL: &[&str] = &[
        "batch: ",
        "batch-mma: ",
        "batch-pipe: ",
        "batch-pipe-tall: ",
    ];
    const NOT_ALONE: &str = "not bit-identical to the job launched alone";
    struct Mutant {
        what: &'static str,
        from: &'static str,
        to: &'static str,
        count: usize,
        /// The groups it must fail; the other batched group must pass.
        fails: &'static [&'static str],
        /// The only check that catches it (not the f64 one), by a message
        /// only that check prints.
        caught_by: Option<&'static str>,
    }
    let mutants = [
        Mutant {
            what: "job lookup: the first block of a job taken as the previous job's",
            from: "if (k < n && b >= p.first_block[k])",
            to: "if (k < n && b > p.first_block[k])",
            count: 1,
            fails: ALL,
            caught_by: None,
        },
        Mutant {
            what: "block index: the grid's, not the job's",
            from: "blockIdx.x - p.first_block[j],",
            to: "blockIdx.x,",
            count: 3,
            fails: ALL,
            caught_by: None,
        },
        Mutant {
            what: "block count: the grid's, not the job's",
            from: "p.first_block[j + 1] - p.first_block[j])",
            to: "gridDim.x)",
            count: 3,
            fails: ALL,
            caught_by: None,
        },
        Mutant {
            what: "adapter order: a job's first two adapters swapped",
            from: "p.jobs[j], blockIdx.x",
            to: "[&] { OffloadLowRankJob q = p.jobs[j]; if (q.num_adapters > 1) { \
                 const OffloadLowRankAdapter t = q.adapters[0]; q.adapters[0] = q.adapters[1]; \
                 q.adapters[1] = t; } return q; }(), blockIdx.x",
            count: 3,
            fails: ALL,
            caught_by: Some(NOT_ALONE),
        },
        Mutant {
            what: "kernel body: the batched tensor-core kernel runs the fp32 FMA one",
            from: "offload_lowrank_merge_mma<T>(p.jobs[j]",
            to: "offload_lowrank_merge<T>(p.jobs[j]",
            count: 1,
            fails: &["batch-mma: "],
            caught_by: Some(NOT_ALONE),
        },
        Mutant {
            // Adds zero to the row past the slice and stores it: on a GPU, a
            // race with the job that owns that row in a fused weight.
            what: "row slice: W's place one row longer than the slice",
            from: "offload_w_place<T>(p.w, p.rows, ",
            to: "offload_w_place<T>(p.w, p.rows + 1, ",
            count: 4,
            fails: &["batch: ", "batch-mma: "],
            caught_by: Some("outside every slice changed"),
        },
        Mutant {
            what: "row slice: the pipelined kernel's W one row longer than the slice",
            from: "p.w, p.rows, p.cols, p.row0, tile_row, tile_col, wr",
            to: "p.w, p.rows + 1, p.cols, p.row0, tile_row, tile_col, wr",
            count: 2,
            fails: &["batch-pipe: ", "batch-pipe-tall: "],
            caught_by: Some("outside every slice changed"),
        },
    ];
    let tmp = std::env::temp_dir().join(format!("offload-cuda-mutants-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("emulate");
    for m in mutants {
        let Mutant {
            what,
            from,
            to,
            count,
            fails,
            caught_by,
        } = m;
        // Every occurrence is mutated: the job lookup is shared,
        // the rest is written out in each batched entry point (fp32 FMA,
        // tensor cores, pipelined; the pipelined one's serves both tile
        // heights), and W's place in each kernel body.
        assert_eq!(source.matches(from).count(), count, "{what}: `{from}`");
        std::fs::write(tmp.join("lowrank_merge.cu"), source.replace(from, to)).unwrap();
        compile(&exe, &tmp);
        let out = run(&exe, &["4", "batch"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("mutant ({what}):\n{stdout}");
        assert!(!out.status.success(), "{what}: not caught:\n{stdout}");
        for group in ALL {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(group))
                .unwrap_or_else(|| panic!("{what}: no `{group}` line:\n{stdout}"));
            let passed = line.ends_with(" 0 failures");
            assert_eq!(passed, !fails.contains(group), "{what}: {line}");
        }
        if let Some(message) = caught_by {
            caught_only_by(what, &stdout, message);
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

/// The emulation's model of `cp.async` (a copy lands only when a wait
/// retires its group; until then its destination holds NaNs; its addresses
/// must be 16-byte aligned) and of `ldmatrix` (aligned rows, the eight rows
/// of a matrix in eight bank groups) catches the pipelined kernel's own
/// kinds of bugs: a wait one stage short (reading a stage before its copies
/// land), fragments of A or of B read without the swizzle the copies were
/// written with, the next stage's copies issued into the slot being
/// multiplied, 16-bit W stored without the quad transpose that puts it back
/// in row order (the shuffles are emulated too), the copy path taken for
/// factors whose rows are not whole 16-byte units and 16-byte accesses to a
/// W that is not 16-byte aligned (misaligned-address faults on a GPU, which
/// the values alone do not show), and a leading adapter of rank 0 taken as
/// the start of the sum; the code is shared, and most fail on both tile
/// heights (each on the groups it names). Three fail the 128-row kernel only, the 64-row groups passing:
/// B's rows copied from 64-row tiles, half its threads not copying A, and
/// the first adapter's scaled product added to W by a multiply and an add
/// instead of an fma (within the tolerance, and the same batched as alone:
/// caught only by the comparison with the 64-row kernel). Each fails the
/// groups it names; the unmutated source passes them.
#[test]
#[ignore = "needs g++ (C++20, _Float16); run with --ignored"]
fn pipelined_kernel_mutants_fail_the_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(root.join("src/cuda/lowrank_merge.cu")).unwrap();
    // Both tile heights (kernels 2b and 2c) share this code.
    const BOTH: &[&str] = &["pipe: ", "batch-pipe: ", "pipe-tall: ", "batch-pipe-tall: "];
    // (what, from, to, the groups it must fail)
    let mutants: [(&str, &str, &str, &[&str]); 9] = [
        (
            "wait: one stage short",
            "offload_cp_async_wait<OFFLOAD_PIPE_STAGES - 2>();",
            "offload_cp_async_wait<OFFLOAD_PIPE_STAGES - 1>();",
            BOTH,
        ),
        (
            "swizzle: A's fragments read unswizzled",
            "offload_ldmatrix_x4_trans(m, sa + offload_pipe_a_at(k, c));",
            "offload_ldmatrix_x4_trans(m, sa + k * OFFLOAD_PIPE_TILE_COLS + c);",
            BOTH,
        ),
        (
            "swizzle: B's fragments read unswizzled",
            "offload_ldmatrix_x4(af[mi], sb + offload_pipe_b_at(r, k));",
            "offload_ldmatrix_x4(af[mi], sb + r * OFFLOAD_PIPE_K + k);",
            BOTH,
        ),
        (
            "slot: the next stage copied into the slot being multiplied",
            "// The stage two ahead, into the slot read last.\n            offload_pipe_issue<ROWS>(sh, st.issued % ",
            "// The stage two ahead, into the slot read last.\n            offload_pipe_issue<ROWS>(sh, (st.issued + 1) % ",
            BOTH,
        ),
        (
            "W: 16-bit rows stored without the quad's transpose back",
            "                    offload_quad_transpose(x, t);\n                    const unsigned int r = tile_row",
            "                    const unsigned int r = tile_row",
            BOTH,
        ),
        (
            "copy path: A copied in 16-byte units whatever the column count",
            "c.a_vec = p.cols % 8 == 0 && ad.down % 16 == 0;",
            "c.a_vec = ad.down % 16 == 0;",
            BOTH,
        ),
        (
            "copy path: B copied in 16-byte units whatever the rank",
            "c.b_vec = ad.rank % 8 == 0 && ad.up % 16 == 0;",
            "c.b_vec = ad.up % 16 == 0;",
            BOTH,
        ),
        // The batched cases have more leading adapters of rank 0.
        (
            "adapters: the second taken as the first's follower when the first has rank 0",
            "for (unsigned int a = first + 1; a < n; ++a) {",
            "for (unsigned int a = 1; a < n; ++a) {",
            &["batch-pipe: ", "batch-pipe-tall: "],
        ),
        // Only the one-tensor cases put W off a 16-byte boundary.
        (
            "W: 16-byte accesses for a W that is not 16-byte aligned",
            "return sizeof(T) == 2 && cols % 8 == 0 && w % 16 == 0;",
            "return sizeof(T) == 2 && cols % 8 == 0 && w % 2 == 0;",
            &["pipe: "],
        ),
    ];
    const TALL: &[&str] = &["pipe-tall: ", "batch-pipe-tall: "];
    // Kernel 2c's own, which must leave the 64-row groups passing: (what,
    // from, to, the groups it must fail, the only check that catches it).
    type TallOnly<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], Option<&'a str>);
    let tall_only: [TallOnly<'_>; 3] = [
        (
            "tall: B's rows copied from 64-row tiles",
            "const unsigned int tile_row = c.y * ROWS;",
            "const unsigned int tile_row = c.y * OFFLOAD_PIPE_TILE_ROWS;",
            TALL,
            None,
        ),
        (
            "tall: only the first 256 threads copy A",
            "for (unsigned int q = 0; q < OFFLOAD_PIPE_K * 16 / kThreads; ++q) {",
            "for (unsigned int q = 0; q < 512 / kThreads; ++q) {\n        if (tid >= 256) break;",
            TALL,
            None,
        ),
        // Within the tolerance, and the same in a batch as alone: only the
        // one-tensor group's comparison with the 64-row kernel sees it.
        (
            "tall: the first adapter's scaled product added to W by a multiply and an add",
            "sum[mi][ni][e] =\n                            __fmaf_rn(scale, prod[mi][ni][e], wbits.get(mi, ni, e / 2, e % 2));",
            "sum[mi][ni][e] = ROWS == OFFLOAD_PIPE_TALL_TILE_ROWS\n                            ? scale * prod[mi][ni][e] + wbits.get(mi, ni, e / 2, e % 2)\n                            : __fmaf_rn(scale, prod[mi][ni][e], wbits.get(mi, ni, e / 2, e % 2));",
            &["pipe-tall: "],
            Some("not bit-identical to pipe on the same merge"),
        ),
    ];
    let tmp = std::env::temp_dir().join(format!("offload-pipe-mutants-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("emulate");
    // Runs the emulation's pipelined groups on the source with `from`
    // replaced by `to`; checks that it fails, and each group of `fails`
    // with it; gives its output.
    let mutant = |what: &str, from: &str, to: &str, fails: &[&str]| -> String {
        assert_eq!(source.matches(from).count(), 1, "{what}: `{from}`");
        std::fs::write(tmp.join("lowrank_merge.cu"), source.replace(from, to)).unwrap();
        compile(&exe, &tmp);
        let out = run(&exe, &["4", "pipe"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("mutant ({what}):\n{stdout}");
        assert!(!out.status.success(), "{what}: not caught:\n{stdout}");
        for group in fails {
            let line = stdout
                .lines()
                .find(|l| l.starts_with(group))
                .unwrap_or_else(|| panic!("{what}: no `{group}` line:\n{stdout}"));
            assert!(!line.ends_with(" 0 failures"), "{what}: {line}");
        }
        stdout
    };
    for (what, from, to, fails) in mutants {
        mutant(what, from, to, fails);
    }
    for (what, from, to, fails, caught_by) in tall_only {
        let stdout = mutant(what, from, to, fails);
        for group in BOTH.iter().filter(|g| !fails.contains(g)) {
            let line = stdout.lines().find(|l| l.starts_with(group)).unwrap();
            assert!(line.ends_with(" 0 failures"), "{what}: {line}");
        }
        if let Some(message) = caught_by {
            caught_only_by(what, &stdout, message);
        }
    }
    std::fs::write(tmp.join("lowrank_merge.cu"), &source).unwrap();
    compile(&exe, &tmp);
    let out = run(&exe, &["4", "pipe"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "unmutated:\n{stdout}");
    let _ = std::fs::remove_dir_all(&tmp);
}
