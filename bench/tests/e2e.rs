//! `offload bench e2e` on a small synthetic SDXL: the JSON rows carry the
//! fixed field names, and the byte counts keep the bounds the modes promise.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn run_e2e(extra: &[&str]) -> Vec<Value> {
    // One folder per call: tests run in parallel.
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let out_dir = std::env::temp_dir().join(format!(
        "offload-e2e-test-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&out_dir).unwrap();
    let json: PathBuf = out_dir.join("rows.json");
    let out = Command::new(env!("CARGO_BIN_EXE_offload"))
        .args([
            "bench", "e2e", "--scale", "32", "--steps", "4", "--tokens", "1", "--json",
        ])
        .arg(&json)
        .args(extra)
        .output()
        .expect("run offload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "offload failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mode") && stdout.contains("it/s"),
        "no table: {stdout}"
    );
    let rows = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let _ = std::fs::remove_dir_all(&out_dir);
    rows
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("field {k} missing or not an integer in {v}"))
}

fn row<'a>(rows: &'a [Value], mode: &str, policy: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["mode"] == mode && r["policy"] == policy)
        .unwrap_or_else(|| panic!("no {mode}/{policy} row"))
}

/// `--rounds 3`: the plain offload rows carry their ratio in each round,
/// the first of them the row's own `pass_over_bound`.
#[test]
fn rounds_give_a_ratio_per_round() {
    let rows = run_e2e(&["--no-lora", "--mode", "sequential", "--rounds", "3"]);
    assert_eq!(rows.len(), 2, "the first round's rows only");
    let seq = row(&rows, "sequential", "planned");
    let per_round = seq["pass_over_bound_rounds"]
        .as_array()
        .unwrap_or_else(|| panic!("no pass_over_bound_rounds in {seq}"));
    assert_eq!(per_round.len(), 3, "{seq}");
    assert!(
        per_round
            .iter()
            .all(|x| x.as_f64().is_some_and(|x| x > 0.0)),
        "{seq}"
    );
    assert_eq!(per_round[0], seq["pass_over_bound"], "{seq}");
    assert!(row(&rows, "none", "planned")
        .get("pass_over_bound_rounds")
        .is_none());
}

#[test]
fn the_table_keeps_the_bounds_of_each_mode() {
    // The plain rows only: the LoRA rows have their own tests (e2e_lora.rs).
    let rows = run_e2e(&["--no-lora"]);
    assert_eq!(
        rows.len(),
        5,
        "none, model, balanced planned, balanced lru, sequential"
    );
    for r in &rows {
        for k in [
            "mode",
            "lora_mode",
            "policy",
            "prefetch_depth",
            "model_bytes",
            "denoiser_bytes",
            "device_mem_bytes",
            "high_watermark_bytes",
            "largest_layer_bytes",
            "link_gbps",
            "device",
        ] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
        if r["fits"] == true {
            for k in [
                "it_per_s",
                "page_waste_bytes",
                "bytes_h2d_per_pass",
                "bytes_h2d_first_pass",
                "bytes_h2d_per_generation",
                "peak_device_bytes",
                "peak_host_bytes",
                "stall_fraction",
                "compute_s_per_pass",
            ] {
                assert!(!r[k].is_null(), "{k} missing in {r}");
            }
        }
    }
    let model = u(&rows[0], "model_bytes");
    let d = u(&rows[0], "denoiser_bytes");
    let largest = u(&rows[0], "largest_layer_bytes");

    let none = row(&rows, "none", "planned");
    assert_eq!(
        u(none, "bytes_h2d_per_generation"),
        0,
        "mode none moves nothing after load"
    );
    assert!(u(none, "peak_device_bytes") >= model);

    // Model mode at half the model: the denoiser alone is larger.
    let m = row(&rows, "model", "planned");
    assert_eq!(m["fits"], false);
    assert!(m["error"].as_str().unwrap().contains("does not fit"));

    let lru = row(&rows, "balanced", "lru");
    let seq = row(&rows, "sequential", "planned");
    let planned = row(&rows, "balanced", "planned");
    // LRU over a cyclic pass larger than its budget moves the whole denoiser, as sequential does.
    assert_eq!(u(lru, "bytes_h2d_per_pass"), u(seq, "bytes_h2d_per_pass"));
    assert!(u(seq, "bytes_h2d_per_pass") >= d);
    // Planned: (D − B) + (depth + 1) × largest layer + page waste, where D is
    // the denoiser as uploaded (its layers packed, = what sequential moves per
    // pass), each ring slot is whole pages, and the resident set may leave a
    // gap of at most one layer in its budget.
    let page = 64 << 10;
    let d_packed = u(seq, "bytes_h2d_per_pass");
    let b = u(planned, "high_watermark_bytes");
    let bound = (d_packed - b.min(d_packed))
        + 3 * (largest + page)
        + u(planned, "page_waste_bytes")
        + largest;
    let moved = u(planned, "bytes_h2d_per_pass");
    assert!(
        moved <= bound,
        "balanced planned moved {moved} per pass, bound {bound}"
    );
    assert!(
        moved < u(lru, "bytes_h2d_per_pass"),
        "planned must beat LRU"
    );
    // Sequential keeps only the ring.
    assert!(u(seq, "peak_device_bytes") <= 3 * (largest + page), "{seq}");
    // Pinned host copy: about the model's bytes, not twice.
    for r in [planned, lru, seq] {
        assert!(u(r, "peak_host_bytes") as f64 <= 1.1 * model as f64, "{r}");
        assert!(u(r, "peak_device_bytes") <= u(r, "device_mem_bytes"), "{r}");
    }
}

#[test]
fn staged_host_memory_is_the_staging_ring() {
    let rows = run_e2e(&[
        "--mode",
        "sequential",
        "--host-policy",
        "staged",
        "--no-lora",
    ]);
    assert_eq!(rows.len(), 2);
    let seq = row(&rows, "sequential", "planned");
    // The default ring: twice the readers (a CPU each, at most 8), at least 4.
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let buffers = (2 * readers).max(4) as u64;
    assert_eq!(
        u(seq, "peak_host_bytes"),
        buffers * (64 << 20),
        "{buffers} × 64 MiB staging buffers"
    );
    assert!(u(seq, "bytes_h2d_per_generation") > 0);
    assert_eq!(seq["staging_write_combined"], false, "{seq}");
    assert_eq!(seq["compute_priority"], "high", "the default");
}

/// The checkpoint held in memory (`--source memory`: the runtime fills its
/// staging buffers from it with streaming stores) moves exactly the bytes
/// of positional reads of the file in a generation, and the runtime holds
/// the same host memory.
#[test]
fn a_source_held_in_memory_moves_the_same_bytes() {
    let base = [
        "--mode",
        "sequential",
        "--host-policy",
        "staged",
        "--no-lora",
    ];
    let file = run_e2e(&base);
    let memory = run_e2e(&[&base[..], &["--source", "memory"]].concat());
    let (f, m) = (
        row(&file, "sequential", "planned"),
        row(&memory, "sequential", "planned"),
    );
    assert_eq!(
        (&f["source"], &m["source"]),
        (&"file".into(), &"memory".into())
    );
    // (Per pass, the bytes depend on when the readers let the next pass's
    // first uploads start; a generation's do not.)
    for key in [
        "bytes_h2d_per_generation",
        "peak_host_bytes",
        "peak_device_bytes",
    ] {
        assert_eq!(u(f, key), u(m, key), "{key}: {f}\n{m}");
    }
}

#[test]
fn write_combined_staging_is_a_staged_policy_knob() {
    let rows = run_e2e(&[
        "--mode",
        "sequential",
        "--host-policy",
        "staged",
        "--staging-write-combined",
        "--compute-priority",
        "normal",
        "--no-lora",
    ]);
    let seq = row(&rows, "sequential", "planned");
    assert_eq!(seq["staging_write_combined"], true, "{seq}");
    assert_eq!(seq["compute_priority"], "normal", "{seq}");
    // The default ring: twice the readers (a CPU each, at most 8), at least 4.
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let buffers = (2 * readers).max(4) as u64;
    assert_eq!(u(seq, "peak_host_bytes"), buffers * (64 << 20), "{seq}");
}

#[test]
fn bad_flags_are_clear_errors() {
    for args in [
        vec!["--mode", "fast"],
        vec!["--policy", "mru"],
        vec!["--host-policy", "mmap"],
        vec!["--staging-write-combined"],
        vec!["--device-mem", "lots"],
        vec!["--preset", "sd9"],
        vec!["--tokens", "0"],
        vec!["--high", "foo"],
        vec!["--low", "lots"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_offload"))
            .args(["bench", "e2e", "--scale", "32", "--steps", "1"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("offload: error:"), "{args:?}: {err}");
    }
}
