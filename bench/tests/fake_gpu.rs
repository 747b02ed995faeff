//! The `offload` tool on the CUDA backend without a GPU: each test runs the
//! binary with `offload-fakecuda` (a CUDA driver, cuBLAS and NVRTC that run
//! on the CPU) first on `LD_LIBRARY_PATH`, so the CUDA backend's host-side
//! paths (VMM and fallback memory, streams, events, pinned and staged
//! uploads, cuBLAS products, kernel builds) run on every machine. The fake
//! keeps device memory in host memory and runs no GPU code, so timings mean
//! nothing here; byte counts and peaks are exact and must equal the host
//! backend's for the same page size.
//!
//! Built with the `cuda` feature only: without it `offload` has no CUDA backend.

#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

const FAKE_NAME: &str = "Offload fake CUDA device (host memory)";

/// A folder holding `libcuda.so`, `libcublas.so` and `libnvrtc.so` links to
/// the fake, removed on drop.
struct FakeLibs(PathBuf);

impl FakeLibs {
    fn new(tag: &str) -> FakeLibs {
        let exe = std::env::current_exe().unwrap();
        let lib = offload_fakecuda::find_library(&exe).unwrap_or_else(|| {
            panic!(
                "liboffload_fakecuda.so is not beside {} (cargo builds it as a dev-dependency)",
                exe.display()
            )
        });
        let dir =
            std::env::temp_dir().join(format!("offload-fakecuda-{tag}-{}", std::process::id()));
        offload_fakecuda::install(&lib, &dir).unwrap();
        FakeLibs(dir)
    }
}

impl Drop for FakeLibs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `offload ARGS`, on the fake driver when `fake` is given (with a
/// 64 KiB granularity, the host backend's page at `--scale 16`).
fn offload(args: &[&str], fake: Option<&FakeLibs>, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_offload"));
    c.args(args).env("OFFLOAD_KERNEL_CACHE", "off");
    if let Some(f) = fake {
        c.env("LD_LIBRARY_PATH", &f.0)
            .env("OFFLOAD_FAKECUDA_GRANULARITY_KIB", "64")
            .env("OFFLOAD_FAKECUDA_MARK", f.0.join("loaded"));
        let _ = std::fs::remove_file(f.0.join("loaded"));
    }
    c.envs(env.iter().copied());
    let out = c.output().expect("run the offload binary");
    if let Some(f) = fake {
        // The fake, not a real driver elsewhere on the library path, answered.
        let loaded = std::fs::read_to_string(f.0.join("loaded")).unwrap_or_default();
        assert_eq!(
            loaded, FAKE_NAME,
            "offload {args:?} did not load the fake driver"
        );
    }
    out
}

fn ok(o: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    stdout
}

/// `offload bench e2e ARGS --json` rows, on the fake or the host backend.
fn e2e_rows(args: &[&str], fake: Option<&FakeLibs>, tag: &str) -> Vec<Value> {
    e2e_rows_env(args, fake, tag, &[]).1
}

/// [`e2e_rows`] with `env` set; also gives the run's standard output.
fn e2e_rows_env(
    args: &[&str],
    fake: Option<&FakeLibs>,
    tag: &str,
    env: &[(&str, &str)],
) -> (String, Vec<Value>) {
    let json = std::env::temp_dir().join(format!(
        "offload-fake-e2e-{tag}-{}.json",
        std::process::id()
    ));
    let backend = if fake.is_some() { "cuda" } else { "host" };
    let path = json.to_str().unwrap();
    let all = [
        &[
            "bench",
            "e2e",
            "--scale",
            "16",
            "--steps",
            "2",
            "--backend",
            backend,
            "--json",
            path,
        ][..],
        args,
    ]
    .concat();
    let stdout = ok(&offload(&all, fake, env), &all.join(" "));
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    let rows = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (stdout, rows)
}

/// The fields of an e2e row that are counts, not times: equal on any
/// backend with the same page size.
const EXACT: [&str; 17] = [
    "mode",
    "policy",
    "lora_mode",
    "fits",
    "model_bytes",
    "denoiser_bytes",
    "largest_layer_bytes",
    "device_mem_bytes",
    "high_watermark_bytes",
    "bytes_h2d_first_pass",
    "bytes_h2d_per_pass",
    "bytes_h2d_per_generation",
    "page_waste_bytes",
    "peak_device_bytes",
    "peak_host_bytes",
    "merges_per_pass",
    "lora_factor_device_bytes",
];

fn same_counts(args: &[&str], tag: &str) {
    same_counts_but(args, tag, &[]);
}

/// Compares the runs' [`EXACT`] fields but those in `skip`.
fn same_counts_but(args: &[&str], tag: &str, skip: &[&str]) {
    let fake = FakeLibs::new(tag);
    let on_fake = e2e_rows(args, Some(&fake), &format!("{tag}-fake"));
    same_as_host(&on_fake, args, tag, skip);
}

/// Compares rows the fake gave for `args` with a host backend run's, on
/// the [`EXACT`] fields but those in `skip`.
fn same_as_host(on_fake: &[Value], args: &[&str], tag: &str, skip: &[&str]) {
    let on_host = e2e_rows(args, None, &format!("{tag}-host"));
    assert_eq!(on_fake.len(), on_host.len(), "{on_fake:?}\n{on_host:?}");
    assert!(!on_fake.is_empty());
    for (f, h) in on_fake.iter().zip(on_host.iter()) {
        assert_eq!(f["device"], format!("Cuda: {FAKE_NAME}"), "{f}");
        assert!(h["device"].as_str().unwrap().starts_with("Host"), "{h}");
        assert_eq!(f["error"], h["error"], "{f}\n{h}");
        for k in EXACT.iter().filter(|k| !skip.contains(k)) {
            assert_eq!(f[k], h[k], "{k} differs: fake CUDA {f}\nhost {h}");
        }
    }
}

/// Every offload mode with the pinned host policy: a generation on the CUDA
/// backend moves, allocates and peaks exactly as on the host backend.
#[test]
fn e2e_on_cuda_moves_exactly_the_host_backends_bytes() {
    let rows = e2e_rows(&["--no-lora"], Some(&FakeLibs::new("modes")), "modes");
    let done: Vec<_> = rows.iter().filter(|r| r["error"].is_null()).collect();
    assert!(done.len() >= 4, "{rows:?}");
    // By default every product is a cublasGemmEx.
    for r in &done {
        let c = &r["device_counts"];
        assert!(c["products_gemm_ex"].as_u64() > Some(0), "{r}");
        assert_eq!(c["products_lt"], 0, "{r}");
    }
    same_counts(&["--no-lora"], "modes");
}

/// The benchmark's products through cuBLASLt (`OFFLOAD_MATMUL=lt`): the
/// device line says so, every row's products went through cuBLASLt (the
/// device's counts in the JSON), and the run moves, allocates and peaks
/// exactly as on the host backend.
#[test]
fn e2e_on_cuda_with_products_through_cublaslt() {
    let args = ["--no-lora", "--mode", "sequential"];
    let fake = FakeLibs::new("lt");
    let (stdout, rows) = e2e_rows_env(&args, Some(&fake), "lt", &[("OFFLOAD_MATMUL", "lt")]);
    assert!(
        stdout.contains(
            "matrix products through cuBLASLt, one algorithm a shape (OFFLOAD_MATMUL=lt)"
        ),
        "{stdout}"
    );
    assert!(rows.iter().all(|r| r["error"].is_null()), "{rows:?}");
    // Every product of every row went through cuBLASLt.
    for r in &rows {
        let c = &r["device_counts"];
        assert!(c["products_lt"].as_u64() > Some(0), "{r}");
        assert_eq!(c["products_gemm_ex"], 0, "{r}");
        assert_eq!(c["lt_plans_without_algorithm"], 0, "{r}");
    }
    assert!(
        stdout.contains("device counts (each row's generation):"),
        "{stdout}"
    );
    same_as_host(&rows, &args, "lt", &[]);
    // A value it does not know is an error on any machine, before any driver is asked.
    let bad = offload(&["device"], None, &[("OFFLOAD_MATMUL", "cublas-lt")]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("OFFLOAD_MATMUL=\"cublas-lt\": expected `gemm-ex` or `lt`"),
        "{stderr}"
    );
}

/// A graph a layer (`OFFLOAD_GRAPHS=on`): the device line says so, no
/// row's products went around the graphs (each was queued at its list's
/// first sighting or into a capture), none failed, the sequential row's
/// layers come back in its second pass (the ring's slots at the same
/// addresses) and run as graphs, and the run moves, allocates and peaks
/// exactly as on the host backend; on a driver that will not capture, the
/// run says graphs went off and why, and runs as without them.
#[test]
fn e2e_on_cuda_with_a_graph_a_layer() {
    let args = ["--no-lora", "--mode", "sequential"];
    let fake = FakeLibs::new("graphs");
    let (stdout, rows) = e2e_rows_env(&args, Some(&fake), "graphs", &[("OFFLOAD_GRAPHS", "on")]);
    assert!(
        stdout.contains("each list of products as one CUDA graph (OFFLOAD_GRAPHS=on)"),
        "{stdout}"
    );
    assert!(rows.iter().all(|r| r["error"].is_null()), "{rows:?}");
    for r in &rows {
        let c = &r["device_counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        let (captured, launched) = (n("graphs_captured"), n("graph_launches"));
        assert_eq!(n("graph_failures"), 0, "{r}");
        // cuBLAS queued a product only at its layer's first sighting or
        // into a graph being captured; none went around the graphs.
        assert_eq!(
            n("products_gemm_ex"),
            n("products_first_seen") + n("products_captured"),
            "{r}"
        );
        assert!(captured > 0 && launched >= captured, "{r}");
        if r["mode"] == "sequential" {
            // The denoiser's second pass is the ring's second round: its
            // layers' lists come back, and are captured and launched.
            assert!(n("products_in_graphs") > 0, "{r}");
        }
    }
    same_as_host(&rows, &args, "graphs", &[]);
    // A driver that will not capture: graphs go off at the first capture,
    // the run says why and goes on with the products one by one.
    let (stdout, rows) = e2e_rows_env(
        &args,
        Some(&fake),
        "graphs-refused",
        &[
            ("OFFLOAD_GRAPHS", "on"),
            ("OFFLOAD_FAKECUDA_NO_CAPTURE", "1"),
        ],
    );
    assert!(
        stdout.contains("device warning: OFFLOAD_GRAPHS=on, but graphs are off: capturing"),
        "{stdout}"
    );
    let failures: u64 = rows
        .iter()
        .map(|r| r["device_counts"]["graph_failures"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(failures, 1, "{rows:?}");
    assert!(rows.iter().all(|r| r["error"].is_null()), "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["device_counts"]["graph_launches"].as_u64().unwrap_or(0) == 0),
        "{rows:?}"
    );
    same_as_host(&rows, &args, "graphs-refused", &[]);
    let bad = offload(&["device"], None, &[("OFFLOAD_GRAPHS", "yes")]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("OFFLOAD_GRAPHS=\"yes\": expected `off` or `on`"),
        "{stderr}"
    );
}

/// The staged host policy (reader threads filling pinned staging buffers)
/// on CUDA streams and events.
#[test]
fn e2e_staged_on_cuda_moves_exactly_the_host_backends_bytes() {
    // With staged uploads a pass's share of the bytes depends on when the
    // reader threads let the next pass's first uploads start (the host
    // backend alone varies by a few KB); the generation's total does not.
    same_counts_but(
        &[
            "--no-lora",
            "--host-policy",
            "staged",
            "--mode",
            "sequential",
        ],
        "staged",
        &["bytes_h2d_first_pass", "bytes_h2d_per_pass"],
    );
}

/// Every LoRA mode in sequential offload, where fuse-on-upload merges each
/// layer on the merge stream as it arrives (the merge kernels run on the
/// fake from their launch parameters): each row runs, its read-back check
/// finds the merged weights within 1 ulp of the host merge (the pristine
/// weights and the adapters handed out, unfused), the device counts merge
/// launches in fuse-on-upload only, and the run moves, allocates, merges
/// and peaks exactly as on the host backend.
#[test]
fn e2e_lora_on_cuda() {
    // Room for the layers in flight and every adapter's factors.
    let args = ["--mode", "sequential", "--device-mem", "36MiB"];
    let fake = FakeLibs::new("lora");
    let rows = e2e_rows(&args, Some(&fake), "lora");
    let modes: Vec<&str> = rows
        .iter()
        .filter(|r| r["mode"] == "sequential")
        .map(|r| r["lora_mode"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        modes,
        ["none", "fuse-on-upload", "backup", "fuse", "unfused"],
        "{rows:?}"
    );
    for r in rows.iter().filter(|r| r["lora_mode"] != "none") {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["lora_check"]["passed"], true, "{r}");
    }
    let fused = rows
        .iter()
        .find(|r| r["mode"] == "sequential" && r["lora_mode"] == "fuse-on-upload")
        .unwrap();
    assert!(fused["merges_per_pass"].as_f64() > Some(0.0), "{fused}");
    // The device's own count of merge launches agrees: some in
    // fuse-on-upload (one batched launch a layer at least), none in the
    // plain row nor unfused.
    let merges = |r: &serde_json::Value| -> u64 {
        r["device_counts"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| k.starts_with("merges_"))
                    .map(|(_, v)| v.as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    };
    assert!(merges(fused) > 0, "{fused}");
    for r in rows
        .iter()
        .filter(|r| r["lora_mode"] == "none" || r["lora_mode"] == "unfused")
    {
        assert_eq!(merges(r), 0, "{r}");
    }
    same_as_host(&rows, &args, "lora", &[]);
}

/// Fuse-on-upload with the pipelined merges on 128-row tiles
/// (`OFFLOAD_PIPE_ROWS=128`): the device line says so, every pipelined
/// launch (one batched launch a layer) is on 128-row tiles, the merged
/// weights pass the read-back check, and the run moves, allocates, merges
/// and peaks exactly as on the host backend. Any other value is refused.
#[test]
fn e2e_lora_on_cuda_with_128_row_merge_tiles() {
    let args = [
        "--mode",
        "sequential",
        "--device-mem",
        "36MiB",
        "--lora-modes",
        "fuse-on-upload",
    ];
    let fake = FakeLibs::new("pipe-tall");
    let (stdout, rows) = e2e_rows_env(
        &args,
        Some(&fake),
        "pipe-tall",
        &[("OFFLOAD_PIPE_ROWS", "128")],
    );
    assert!(
        stdout.contains("pipelined tensor-core merges on 128-row tiles (OFFLOAD_PIPE_ROWS=128)"),
        "{stdout}"
    );
    let fused = rows
        .iter()
        .find(|r| r["mode"] == "sequential" && r["lora_mode"] == "fuse-on-upload")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert!(fused["error"].is_null(), "{fused}");
    assert_eq!(fused["lora_check"]["passed"], true, "{fused}");
    let count = |k: &str| fused["device_counts"][k].as_u64().unwrap_or(0);
    let tall = count("merges_pipelined_tall");
    assert!(tall > 0, "{fused}");
    assert_eq!(
        tall,
        count("merges_pipelined") + count("merges_pipelined_batched"),
        "{fused}"
    );
    same_as_host(&rows, &args, "pipe-tall", &[]);
    let bad = offload(&["device"], None, &[("OFFLOAD_PIPE_ROWS", "256")]);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success()
            && stderr.contains("OFFLOAD_PIPE_ROWS=\"256\": expected `64` or `128`"),
        "{stderr}"
    );
}

fn h2d(extra: &[&str], fake: &FakeLibs) -> Value {
    h2d_env(extra, fake, &[])
}

fn h2d_env(extra: &[&str], fake: &FakeLibs, env: &[(&str, &str)]) -> Value {
    let args = [
        &[
            "bench",
            "h2d",
            "--sizes",
            "1",
            "--pass-mib",
            "8",
            "--iters",
            "2",
            "--json",
        ][..],
        extra,
    ]
    .concat();
    let out = ok(&offload(&args, Some(fake), env), &args.join(" "));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// A device without the virtual memory API, or without host registration:
/// the backend finds out at start, says so, and every row still runs.
#[test]
fn h2d_on_cuda_without_vmm_or_host_registration() {
    let fake = FakeLibs::new("h2d-env");
    let doc = h2d_env(
        &["--map-pages", "8"],
        &fake,
        &[("OFFLOAD_FAKECUDA_NO_VMM", "1")],
    );
    assert_eq!(doc["device"]["maps_pages"], false, "{doc}");
    assert_eq!(doc["map_unmap"]["applicable"], false, "{doc}");
    let reason = doc["device"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("virtual memory"), "{reason}");
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(5), "{doc}");
    let doc = h2d_env(
        &["--map-pages", "0"],
        &fake,
        &[("OFFLOAD_FAKECUDA_NO_HOST_REGISTER", "1")],
    );
    assert_eq!(doc["device"]["backend"], "cuda", "{doc}");
    assert_eq!(doc["rows"].as_array().map(Vec::len), Some(5), "{doc}");
}

/// `offload bench h2d` on CUDA, with and without the virtual memory API:
/// every row moves exactly its bytes, and the runtime's rows upload each
/// layer once per pass.
#[test]
fn h2d_on_cuda_with_and_without_vmm() {
    let fake = FakeLibs::new("h2d");
    for no_vmm in [false, true] {
        let doc = if no_vmm {
            h2d(&["--map-pages", "8", "--no-vmm"], &fake)
        } else {
            h2d(&["--map-pages", "8"], &fake)
        };
        let dev = &doc["device"];
        assert_eq!(dev["backend"], "cuda", "{dev}");
        assert_eq!(dev["name"], FAKE_NAME, "{dev}");
        assert_eq!(dev["maps_pages"], !no_vmm, "{dev}");
        assert_eq!(doc["map_unmap"]["applicable"], !no_vmm, "{doc}");
        let rows = doc["rows"].as_array().expect("rows");
        let kinds: Vec<&str> = rows.iter().map(|r| r["row"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "ceiling",
                "runtime_pinned",
                "pageable",
                "runtime_staged",
                "d2d"
            ],
            "{doc}"
        );
        for r in rows {
            let copies = r["copies_per_sample"].as_u64().unwrap();
            assert_eq!(copies, 8, "{r}");
            assert_eq!(
                r["bytes_moved"].as_u64(),
                Some((1 << 20) * copies * 2),
                "{r}"
            );
            if r["row"].as_str().unwrap().starts_with("runtime") {
                assert_eq!(r["uploads"].as_u64(), Some(copies * 2), "{r}");
            }
            let gbps = r["median_gbps"].as_f64().unwrap();
            assert!(gbps.is_finite() && gbps > 0.0, "{r}");
        }
    }
}

/// `offload device --prepare` on CUDA builds cuBLAS and the merge kernels
/// (through NVRTC) and says how.
#[test]
fn device_prepare_on_cuda() {
    let fake = FakeLibs::new("device");
    let out = ok(
        &offload(&["device", "--prepare"], Some(&fake), &[]),
        "offload device --prepare",
    );
    assert!(out.contains(FAKE_NAME), "{out}");
    assert!(out.contains("matrix products: cuBLAS"), "{out}");
    assert!(
        out.contains("merge kernels for sm_90: compiled by NVRTC 13.0"),
        "{out}"
    );
}

/// The device line says when the merges run on the unpipelined tensor-core
/// kernel (`OFFLOAD_MERGE_KERNEL=tensor-cores`), and says nothing of it by
/// default or with `pipelined`, the default's own name.
#[test]
fn device_line_names_the_unpipelined_merge_kernel() {
    let fake = FakeLibs::new("merge-kernel");
    let note = "tensor-core merges on the unpipelined kernel (OFFLOAD_MERGE_KERNEL=tensor-cores)";
    for (value, named) in [
        (None, false),
        (Some("pipelined"), false),
        (Some("tensor-cores"), true),
    ] {
        let env: Vec<(&str, &str)> = value
            .map(|v| ("OFFLOAD_MERGE_KERNEL", v))
            .into_iter()
            .collect();
        let out = ok(&offload(&["device"], Some(&fake), &env), "offload device");
        assert!(out.contains(FAKE_NAME), "{out}");
        assert_eq!(out.contains(note), named, "{value:?}: {out}");
    }
}
