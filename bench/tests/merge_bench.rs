//! Tests of `offload bench merge`, run through the built binary on tiny
//! weights. They check that every configuration is measured, with positive
//! finite rates, and that our merge agreed with the baseline; the timing
//! targets are not asserted here (docs/benchmarks.md has the figures).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

/// The `offload` binary: `OFFLOAD_BIN` where set (scripts/gpu-check runs
/// these tests from a staged folder on another machine), else cargo's build.
fn offload_bin() -> std::ffi::OsString {
    std::env::var_os("OFFLOAD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_offload").into())
}

/// Runs `offload bench merge ARGS --json` and returns the parsed document;
/// fails the test (with both streams) unless it succeeds.
fn bench_json(args: &[&str]) -> Value {
    let o = Command::new(offload_bin())
        .args(["bench", "merge", "--json"])
        .args(args)
        .output()
        .expect("run the offload binary");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "offload bench merge {} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.join(" "),
        o.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Checks the results of `backend`: one per (dtype, rank, adapters), each
/// with positive finite rates and times and a passed agreement check.
fn check_results(doc: &Value, backend: &str, dtypes: &[&str], ranks: &[u64], adapters: &[u64]) {
    let results: Vec<&Value> = doc["results"]
        .as_array()
        .expect("a results array")
        .iter()
        .filter(|r| r["backend"] == backend)
        .collect();
    let mut seen = BTreeSet::new();
    for r in &results {
        // Which kernel ran: the CPU's, or one of the GPU kernels.
        let kernel = r["kernel"].as_str().unwrap_or_default();
        if backend == "cpu" {
            assert_eq!(kernel, "cpu", "{r}");
        } else {
            assert!(
                ["fp32 FMA", "tensor cores", "pipelined tensor cores"].contains(&kernel),
                "{r}"
            );
        }
        for key in [
            "ours_gbps",
            "copy_gbps",
            "baseline_gbps",
            "ours_ms",
            "copy_ms",
            "baseline_ms",
            "ratio_to_copy",
            "speedup",
        ] {
            let v = r[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {r}");
        }
        assert_eq!(r["agree"], true, "ours and the baseline disagree: {r}");
        let diff = r["max_abs_diff"].as_f64().expect("max_abs_diff");
        let tol = r["tolerance"].as_f64().expect("tolerance");
        assert!(diff.is_finite() && diff <= tol && tol > 0.0, "{r}");
        assert!(r["copies"].as_u64().expect("copies") >= 2, "{r}");
        assert!(
            ["PASS", "FAIL", "-"].contains(&r["verdict"].as_str().expect("verdict")),
            "{r}"
        );
        let key = (
            r["dtype"].as_str().expect("dtype").to_string(),
            r["rank"].as_u64().expect("rank"),
            r["adapters"].as_u64().expect("adapters"),
        );
        assert!(seen.insert(key.clone()), "{key:?} measured twice");
    }
    let want: BTreeSet<_> = dtypes
        .iter()
        .flat_map(|d| {
            ranks
                .iter()
                .flat_map(move |&r| adapters.iter().map(move |&a| (d.to_string(), r, a)))
        })
        .collect();
    assert_eq!(seen, want, "{backend} configurations");
}

#[test]
fn cpu_rows_cover_every_configuration_and_agree_with_gemm() {
    let doc = bench_json(&[
        "--backend",
        "host",
        "--dtype",
        "all",
        "--rows",
        "40",
        "--cols",
        "72",
        "--iters",
        "2",
        "--pool-mib",
        "1",
        "--threads",
        "2",
    ]);
    assert_eq!(doc["rows"], 40);
    assert_eq!(doc["cols"], 72);
    let setups = doc["setups"].as_array().expect("setups");
    assert_eq!(setups.len(), 1, "{doc}");
    assert_eq!(setups[0]["backend"], "cpu");
    assert_eq!(setups[0]["threads"], 2);
    check_results(&doc, "cpu", &["F16", "BF16", "F32"], &[8, 32, 128], &[1, 4]);
    assert_eq!(doc["results"].as_array().unwrap().len(), 18);
}

#[test]
fn auto_always_has_the_cpu_rows() {
    // Without a GPU, auto gives the CPU rows and a note saying why there
    // are no GPU rows; with one, both.
    let doc = bench_json(&[
        "--rows",
        "24",
        "--cols",
        "40",
        "--ranks",
        "4",
        "--adapters",
        "1,3",
        "--iters",
        "1",
        "--pool-mib",
        "1",
    ]);
    check_results(&doc, "cpu", &["F16"], &[4], &[1, 3]);
    let has_gpu = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["backend"] == "cuda");
    if has_gpu {
        check_results(&doc, "cuda", &["F16"], &[4], &[1, 3]);
    } else {
        assert!(
            !doc["notes"].as_array().expect("notes").is_empty(),
            "no GPU rows and no note why: {doc}"
        );
    }
}

#[test]
fn bad_arguments_fail_without_a_panic() {
    for args in [
        &["--iters", "0"][..],
        &["--ranks", "0"],
        &["--adapters", "9"],
        &["--rows", "0"],
        &["--kernel", "tensor-cores"],
        // --tensors batches GPU launches: not for the CPU rows, never 0.
        &["--tensors", "4"],
        &["--tensors", "0"],
    ] {
        let o = Command::new(offload_bin())
            .args(["bench", "merge", "--backend", "host"])
            .args(args)
            .output()
            .expect("run the offload binary");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_rows_cover_every_configuration_and_agree_with_cublas() {
    let doc = bench_json(&[
        "--backend",
        "cuda",
        "--dtype",
        "all",
        "--rows",
        "96",
        "--cols",
        "160",
        "--iters",
        "2",
        "--pool-mib",
        "1",
        "--tensors",
        "3",
    ]);
    check_results(
        &doc,
        "cuda",
        &["F16", "BF16", "F32"],
        &[8, 32, 128],
        &[1, 4],
    );
    assert!(doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["backend"] == "cuda"));
    // --tensors 3: every row also merged three copies of W per batched
    // launch, bit for bit as one launch per copy.
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["tensors"], 3, "{r}");
        assert_eq!(r["batched_identical"], true, "{r}");
        let ms = r["batched_ms"].as_f64().expect("batched_ms");
        assert!(ms.is_finite() && ms > 0.0, "{r}");
    }
}

/// `--kernel pipelined`: every row ran the pipelined tensor-core kernel,
/// agreed with cuBLAS, and its batched launches (`--tensors 3`) were bit
/// for bit its one-tensor launches. 1000 × 2600 and rank 40 make partial
/// tiles (1000 = 15 · 64 + 40 rows, 2600 = 20 · 128 + 40 columns), a
/// partial rank chunk, and blocks that walk two tiles of their strip (21
/// strips of 16 tiles, 12 blocks a strip on a 132-SM GPU).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pipelined_rows_agree_with_cublas() {
    let doc = bench_json(&[
        "--backend",
        "cuda",
        "--kernel",
        "pipelined",
        "--dtype",
        "all",
        "--rows",
        "1000",
        "--cols",
        "2600",
        "--ranks",
        "8,40,128",
        "--iters",
        "2",
        "--pool-mib",
        "1",
        "--tensors",
        "3",
    ]);
    check_results(
        &doc,
        "cuda",
        &["F16", "BF16", "F32"],
        &[8, 40, 128],
        &[1, 4],
    );
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["kernel"], "pipelined tensor cores", "{r}");
        assert_eq!(r["batched_identical"], true, "{r}");
    }
}
