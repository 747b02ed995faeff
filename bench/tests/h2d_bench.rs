//! Tests of `offload bench h2d`, run through the built binary on small
//! sizes. They check that every row is measured for every size, with
//! positive finite rates and exact byte counts (the runtime rows' counts
//! are the runtime's own, so they also check that a steady-state pass
//! uploads every layer once), and that bad arguments fail cleanly. The
//! timing targets are not asserted here (docs/benchmarks.md has figures).

use std::collections::BTreeSet;
use std::process::{Command, Output};

use serde_json::Value;

/// The `offload` binary: `OFFLOAD_BIN` where set (scripts/gpu-check runs
/// these tests from a staged folder on another machine), else cargo's build.
fn offload_bin() -> std::ffi::OsString {
    std::env::var_os("OFFLOAD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_offload").into())
}

const MIB: u64 = 1 << 20;

/// The rows every size gets.
const ROWS: [&str; 5] = [
    "ceiling",
    "runtime_pinned",
    "pageable",
    "runtime_staged",
    "d2d",
];

fn h2d(args: &[&str]) -> Output {
    Command::new(offload_bin())
        .args(["bench", "h2d"])
        .args(args)
        .output()
        .expect("run the offload binary")
}

/// Runs `offload bench h2d ARGS --json` and returns the parsed document;
/// fails the test (with both streams) unless it succeeds.
fn bench_json(args: &[&str]) -> Value {
    let o = h2d(&[args, &["--json"]].concat());
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "offload bench h2d {} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.join(" "),
        o.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn positive(r: &Value, key: &str) -> f64 {
    let v = r[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {r}"));
    assert!(v.is_finite() && v > 0.0, "{key} = {v} in {r}");
    v
}

/// Checks every row of `doc`: one of each kind per size in `sizes_mib`,
/// `iters` samples of `max(min_layers, ⌈pass / size⌉)` copies each, exact
/// bytes, positive finite rates, and ratios and verdicts that agree.
fn check_rows(doc: &Value, sizes_mib: &[u64], pass_mib: u64, min_layers: u64, iters: u64) {
    let rows = doc["rows"].as_array().expect("a rows array");
    assert_eq!(rows.len(), sizes_mib.len() * ROWS.len(), "{doc}");
    let mut seen = BTreeSet::new();
    for r in rows {
        let size = r["size_bytes"].as_u64().expect("size_bytes");
        let kind = r["row"].as_str().expect("row").to_string();
        assert!(ROWS.contains(&kind.as_str()), "unknown row {kind}");
        assert!(seen.insert((size, kind.clone())), "{kind} at {size} twice");
        assert!(sizes_mib.contains(&(size / MIB)) && size % MIB == 0, "{r}");
        let copies = r["copies_per_sample"].as_u64().expect("copies_per_sample");
        assert_eq!(copies, pass_mib.div_ceil(size / MIB).max(min_layers), "{r}");
        assert_eq!(r["samples"], iters, "{r}");
        let per_sample = r["bytes_per_sample"].as_array().expect("bytes_per_sample");
        assert_eq!(per_sample.len() as u64, iters, "{r}");
        for b in per_sample {
            assert_eq!(b.as_u64(), Some(size * copies), "bytes per sample: {r}");
        }
        assert_eq!(
            r["bytes_moved"].as_u64(),
            Some(size * copies * iters),
            "{r}"
        );
        let secs = r["seconds"].as_array().expect("seconds");
        assert_eq!(secs.len() as u64, iters, "{r}");
        for t in secs {
            let t = t.as_f64().expect("a time");
            assert!(t.is_finite() && t > 0.0, "{r}");
        }
        let best = positive(r, "best_gbps");
        let median = positive(r, "median_gbps");
        assert!(best >= median, "best {best} < median {median}: {r}");
        assert!(!r["method"].as_str().expect("method").is_empty());
        let traffic = r["traffic_per_byte"].as_f64().expect("traffic_per_byte");
        let verdict = r["verdict"].as_str().expect("verdict");
        match kind.as_str() {
            "d2d" => {
                assert_eq!(traffic, 2.0, "{r}");
                assert!(r["ratio_to_ceiling"].is_null(), "{r}");
            }
            "ceiling" => {
                assert_eq!(traffic, 1.0, "{r}");
                assert!((positive(r, "ratio_to_ceiling") - 1.0).abs() < 1e-12, "{r}");
            }
            _ => {
                assert_eq!(traffic, 1.0, "{r}");
                positive(r, "ratio_to_ceiling");
            }
        }
        match kind.as_str() {
            "runtime_pinned" | "runtime_staged" => {
                // Each layer uploaded exactly once per pass, by the runtime's count.
                assert_eq!(r["uploads"].as_u64(), Some(copies * iters), "{r}");
                let target = positive(r, "target_ratio");
                let want = if kind == "runtime_pinned" { 0.9 } else { 0.5 };
                assert!((target - want).abs() < 1e-12, "{r}");
                let ratio = positive(r, "ratio_to_ceiling");
                let pass = if ratio >= target { "PASS" } else { "FAIL" };
                assert_eq!(verdict, pass, "{r}");
            }
            _ => {
                assert!(r["uploads"].is_null(), "{r}");
                assert!(r["target_ratio"].is_null(), "{r}");
                assert_eq!(verdict, "-", "{r}");
            }
        }
    }
    let all_met = rows.iter().all(|r| r["verdict"] != "FAIL");
    assert_eq!(doc["all_targets_met"], all_met, "{doc}");
}

#[test]
fn every_row_of_every_size_with_exact_bytes() {
    let doc = bench_json(&[
        "--sizes",
        "1,3",
        "--pass-mib",
        "8",
        "--iters",
        "2",
        "--map-pages",
        "16",
    ]);
    assert_eq!(doc["bench"], "h2d");
    let dev = &doc["device"];
    assert!(["host", "cuda"].contains(&dev["backend"].as_str().expect("backend")));
    assert!(!dev["name"].as_str().expect("name").is_empty());
    assert!(!dev["reason"].as_str().expect("reason").is_empty());
    positive(dev, "page_size");
    check_rows(&doc, &[1, 3], 8, 4, 2);
    assert_eq!(dev["maps_pages"], true, "{dev}");
    assert_eq!(doc["config"]["no_vmm"], false);
    assert_eq!(
        doc["config"]["source_memcpy"], false,
        "the source offers its memory"
    );
    assert_eq!(
        doc["config"]["staging_part_bytes"],
        MIB / 2,
        "the policy's default"
    );
    // The host fill rows: both methods, a sample of --pass-mib each.
    let f = &doc["host_fill"];
    assert_eq!(f["bytes_per_sample"], 8 * MIB, "{f}");
    assert_eq!(f["threads"], doc["config"]["staging_threads"], "{f}");
    assert_eq!(f["part_bytes"], MIB / 2, "{f}");
    let staging = &doc["config"];
    assert_eq!(
        f["ring_bytes"].as_u64(),
        Some(
            staging["staging_buffers"].as_u64().unwrap()
                * staging["staging_buffer_bytes"].as_u64().unwrap()
        ),
        "{f}"
    );
    let methods: Vec<_> = f["rows"]
        .as_array()
        .expect("host fill rows")
        .iter()
        .map(|r| {
            assert_eq!(r["seconds"].as_array().map(Vec::len), Some(2), "{r}");
            assert!(
                positive(r, "best_gbps") >= positive(r, "median_gbps"),
                "{r}"
            );
            r["method"].as_str().expect("method").to_string()
        })
        .collect();
    assert_eq!(methods, ["memcpy", "streaming stores"]);
    assert_eq!(
        f["thread_start_join_us"].as_array().map(Vec::len),
        Some(50),
        "{f}"
    );
    positive(f, "thread_start_join_us_median");
    let m = &doc["map_unmap"];
    assert_eq!(m["applicable"], true, "{m}");
    assert_eq!(m["pages"], 16, "{m}");
    assert_eq!(m["samples"], 2, "{m}");
    assert_eq!(m["page_size"], dev["page_size"], "{m}");
    for key in [
        "map_us_per_page_best",
        "map_us_per_page_median",
        "unmap_us_per_page_best",
        "unmap_us_per_page_median",
        "share_of_page_upload",
    ] {
        positive(m, key);
    }
    assert!(m["map_us_per_page_best"].as_f64() <= m["map_us_per_page_median"].as_f64());
    assert_eq!(m["map_seconds"].as_array().map(Vec::len), Some(2));
    assert_eq!(m["unmap_seconds"].as_array().map(Vec::len), Some(2));
}

#[test]
fn the_link_throttle_caps_every_upload_row() {
    let doc = bench_json(&[
        "--sizes",
        "2",
        "--pass-mib",
        "8",
        "--iters",
        "1",
        "--map-pages",
        "0",
        "--link-gbps",
        "1",
    ]);
    check_rows(&doc, &[2], 8, 4, 1);
    assert!(doc["map_unmap"].is_null(), "{doc}");
    if doc["device"]["backend"] != "host" {
        // A GPU ignores the throttle, and says so.
        assert!(!doc["notes"].as_array().expect("notes").is_empty());
        return;
    }
    assert_eq!(doc["device"]["link_gbps"], 1.0);
    for r in doc["rows"].as_array().unwrap() {
        if r["row"] != "d2d" {
            // Every host-to-device byte crosses the 1 GB/s link.
            let best = r["best_gbps"].as_f64().unwrap();
            assert!(
                best <= 1.1,
                "{} at {best} GB/s over a 1 GB/s link",
                r["row"]
            );
        }
    }
}

#[test]
fn a_deeper_prefetch_streams_more_layers_than_its_ring_holds() {
    // A ring of 6 slots: the model needs at least 7 layers, or it would stay
    // in the ring and a pass would upload nothing.
    let doc = bench_json(&[
        "--sizes",
        "1",
        "--pass-mib",
        "2",
        "--iters",
        "1",
        "--map-pages",
        "0",
        "--prefetch-depth",
        "5",
        "--staging-threads",
        "3",
        "--staging-buffers",
        "5",
        "--staging-buffer-mib",
        "1",
        "--staging-part-kib",
        "256",
        "--staging-write-combined",
        "--source-memcpy",
    ]);
    check_rows(&doc, &[1], 2, 7, 1);
    let cfg = &doc["config"];
    assert_eq!(cfg["slots"], 6, "{cfg}");
    assert_eq!(cfg["staging_threads"], 3, "{cfg}");
    assert_eq!(cfg["staging_buffers"], 5, "{cfg}");
    assert_eq!(cfg["staging_buffer_bytes"], MIB, "{cfg}");
    assert_eq!(cfg["staging_part_bytes"], 256 << 10, "{cfg}");
    assert_eq!(cfg["staging_write_combined"], true, "{cfg}");
    assert_eq!(cfg["source_memcpy"], true, "{cfg}");
    // The host fill rows run with the staging knobs.
    let f = &doc["host_fill"];
    assert_eq!(
        (&f["threads"], &f["part_bytes"], &f["ring_bytes"]),
        (&3.into(), &(256 << 10).into(), &(5 * MIB).into()),
        "{f}"
    );
}

#[test]
fn the_table_starts_with_the_device() {
    let o = h2d(&[
        "--sizes",
        "1",
        "--pass-mib",
        "4",
        "--iters",
        "1",
        "--map-pages",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.starts_with("device: using "), "{stdout}");
    for want in [
        "host fill of the staging ring (4 MiB of pageable memory into ",
        " MiB of plain pinned memory, ",
        "memcpy ",
        ", streaming stores ",
        "| 1 MiB | ceiling: pinned copy | 4 |",
        "| 1 MiB | runtime, pinned policy | 4 |",
        "| 1 MiB | pageable copy | 4 |",
        "| 1 MiB | runtime, staged policy | 4 |",
        "| 1 MiB | device to device (r+w) | 4 |",
        "map+unmap: 4 pages of",
        "fill parts of at least 512 KiB",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
}

#[test]
fn without_vmm_every_row_runs_on_plain_allocations_and_map_unmap_does_not_apply() {
    let doc = bench_json(&[
        "--sizes",
        "1,3",
        "--pass-mib",
        "8",
        "--iters",
        "2",
        "--map-pages",
        "16",
        "--no-vmm",
    ]);
    let dev = &doc["device"];
    assert_eq!(dev["maps_pages"], false, "{dev}");
    assert_eq!(doc["config"]["no_vmm"], true);
    let reason = dev["reason"].as_str().expect("reason");
    assert!(reason.contains("--no-vmm"), "{reason}");
    // The same rows and exact bytes as with page mapping: the runtime's
    // arena makes each ring slot one plain allocation.
    check_rows(&doc, &[1, 3], 8, 4, 2);
    let m = &doc["map_unmap"];
    assert_eq!(m["applicable"], false, "{m}");
    let why = m["reason"].as_str().expect("a reason");
    assert!(
        why.starts_with("not applicable (no VMM: plain allocations): "),
        "{why}"
    );
    assert!(m["map_us_per_page_median"].is_null(), "{m}");

    let o = h2d(&[
        "--sizes",
        "1",
        "--pass-mib",
        "4",
        "--iters",
        "1",
        "--map-pages",
        "4",
        "--no-vmm",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "| 1 MiB | runtime, pinned policy | 4 |",
        "| 1 MiB | device to device (r+w) | 4 |",
        "\nmap+unmap: not applicable (no VMM: plain allocations): ",
    ] {
        assert!(stdout.contains(want), "no {want:?} in:\n{stdout}");
    }
}

#[test]
fn bad_arguments_fail_with_a_message_and_no_panic() {
    for args in [
        &["--sizes", "0"][..],
        &["--sizes", "1,x"],
        &["--sizes", "99999999"],
        &["--iters", "0"],
        &["--pass-mib", "0"],
        &["--link-gbps", "-1"],
        &["--link-gbps", "NaN"],
        &["--staging-threads", "0"],
        &["--staging-buffer-mib", "0"],
        &["--staging-part-kib", "0"],
        &["--staging-part-kib", "4194305"],
        &["--prefetch-depth", "1000"],
        &["--map-pages", "99999999"],
    ] {
        let o = h2d(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            stderr.contains("error"),
            "{args:?}: no error message: {stderr}"
        );
        assert!(o.stdout.is_empty(), "{args:?} printed a result");
    }
}

/// A run that needs more host memory than the machine has is refused
/// before anything is allocated, with the numbers (here a staging ring of
/// 1024 buffers of 4 GiB).
#[test]
fn a_run_beyond_host_memory_is_refused_up_front() {
    let o = h2d(&[
        "--sizes",
        "1",
        "--staging-buffers",
        "1024",
        "--staging-buffer-mib",
        "4096",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("1024 staging buffers of 4096 MiB")
            && stderr.contains("GiB of host memory")
            && stderr.contains("MemAvailable"),
        "{stderr}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_rows_run_on_the_cuda_device() {
    let doc = bench_json(&[
        "--sizes",
        "2,64",
        "--pass-mib",
        "256",
        "--iters",
        "3",
        "--map-pages",
        "64",
    ]);
    let dev = &doc["device"];
    assert_eq!(dev["backend"], "cuda", "{doc}");
    assert!(
        dev["reason"]
            .as_str()
            .expect("reason")
            .starts_with("using CUDA device"),
        "{dev}"
    );
    check_rows(&doc, &[2, 64], 256, 4, 3);
    positive(&doc["map_unmap"], "map_us_per_page_median");
    for r in doc["rows"].as_array().unwrap() {
        println!(
            "{} MiB {:<15} median {:>8.2} GB/s, best {:>8.2}, ratio {} {}",
            r["size_bytes"].as_u64().unwrap() / MIB,
            r["row"].as_str().unwrap(),
            r["median_gbps"].as_f64().unwrap(),
            r["best_gbps"].as_f64().unwrap(),
            r["ratio_to_ceiling"],
            r["verdict"].as_str().unwrap(),
        );
    }
    println!("map+unmap: {}", doc["map_unmap"]);
}
