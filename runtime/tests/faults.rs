//! The residency engine under injected faults ([`FaultDevice`] around the
//! host backend), in every mode × policy × host policy.
//!
//! Each scenario runs rounds of load → passes → unload with faults on: page
//! allocations fail (pooled pages are trimmed between passes so that every
//! pass allocates afresh), copies are refused or run late, events complete
//! late, and the engine's own kernel launches fail. A pass that meets a
//! fault must end with a typed error (never a panic, never a hang: a
//! watchdog fails the test when a pass takes more than 60 s), and every
//! acquire that succeeds must hand out exactly the source's bytes (read on
//! the compute stream, after the wait the runtime queued). Then the faults
//! are switched off, and the next passes must all succeed with every byte
//! right. Throughout, peak device use stays within the budget; dropping the
//! runtime returns every page, mapping and range to the device; and every
//! fault kind the scenario claims was injected at least once.
//!
//! `OFFLOAD_FAULT_ROUNDS` (default 4) sets the faulted rounds per scenario,
//! and `OFFLOAD_FAULT_SEED` the seed, for longer runs (see docs/reliability.md).

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{model, MemSource, PAGE};
use offload_runtime::arena::{Arena, ArenaConfig, Tag};
use offload_runtime::device::fault::{
    silence_injected_panics, FaultConfig, FaultCounts, FaultDevice, FaultKind, FaultRates,
};
use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice, Kernel, StreamId};
use offload_runtime::residency::{
    HostPolicy, LayerId, Mode, ModelId, Policy, Runtime, RuntimeConfig,
};
use offload_runtime::Error;

/// Longest a single pass may take before the watchdog fails the test.
const PASS_LIMIT: Duration = Duration::from_secs(60);

/// The kinds every scenario injects and asserts.
const KINDS: [FaultKind; 5] = [
    FaultKind::AllocPage,
    FaultKind::CopySubmit,
    FaultKind::CopyDelay,
    FaultKind::EventDelay,
    FaultKind::Launch,
];

/// Tensor sizes: a small text encoder and a denoiser of mixed layers.
fn layout() -> Vec<Vec<Vec<usize>>> {
    vec![
        vec![
            vec![PAGE + 100, 300],
            vec![2 * PAGE],
            vec![PAGE, PAGE / 2 + 7],
        ],
        vec![
            vec![2 * PAGE + 40, 500],
            vec![3 * PAGE - 5],
            vec![2 * PAGE, 100],
            vec![2 * PAGE + 7],
            vec![3 * PAGE - 300],
            vec![2 * PAGE],
        ],
    ]
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    mode: Mode,
    policy: Policy,
    staged: bool,
}

impl Scenario {
    /// Device memory for weights, high watermark (pages) and prefetch depth.
    fn budget(&self) -> (usize, Option<usize>, usize) {
        match self.mode {
            // Everything resident: the ~23 pages of the model and some room.
            Mode::None => (32, None, 2),
            // Room for the denoiser alone: components swap.
            Mode::Model => (20, None, 2),
            // The denoiser streams beyond a high watermark of 10 pages.
            Mode::Balanced => (32, Some(10), 1),
            // A ring of two slots and little else.
            Mode::Sequential => (12, None, 1),
        }
    }

    fn config(&self) -> RuntimeConfig {
        let (device, high, depth) = self.budget();
        RuntimeConfig {
            mode: Some(self.mode),
            policy: self.policy,
            prefetch_depth: depth,
            device_memory: Some(device * PAGE),
            high_watermark: high.map(|p| p * PAGE),
            low_watermark: Some(0),
            host_policy: if self.staged {
                HostPolicy::Staged {
                    buffers: 2,
                    buffer_bytes: 2 * PAGE,
                    threads: 2,
                }
            } else {
                HostPolicy::Pinned
            },
            wait_timeout: Duration::from_secs(10),
            ..RuntimeConfig::default()
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one scenario did.
#[derive(Debug, Default)]
struct Outcome {
    rounds: usize,
    passes_ok: usize,
    passes_failed: usize,
    recovery_passes: usize,
    /// Typed errors seen by the caller, by variant name.
    errors: BTreeMap<String, usize>,
    bytes_verified: u64,
    faults: FaultCounts,
    peak_device_bytes: usize,
    budget_bytes: usize,
}

fn variant(e: &Error) -> String {
    let s = format!("{e:?}");
    s.split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}

/// The scenario's world: the host device, the fault wrapper around it, the
/// engine's compute stream and a scratch allocation its "kernels" write.
struct World {
    host: Arc<HostDevice>,
    dev: Arc<FaultDevice<HostDevice>>,
    compute: StreamId,
    /// Keeps the scratch allocation mapped.
    _scratch_arena: Arena<HostDevice>,
    scratch: offload_runtime::device::DevicePtr,
}

/// One pass over every component: acquire each layer, check its bytes on
/// the compute stream, run a kernel, drop the guard. Stops at the first error.
fn pass(
    w: &World,
    rt: &Runtime,
    m: ModelId,
    src: &MemSource,
    verified: &mut u64,
) -> Result<(), Error> {
    for c in 0..src.data.len() {
        for l in 0..src.data[c].len() {
            let g = rt.acquire(LayerId {
                model: m,
                component: c,
                layer: l,
            })?;
            for (t, v) in g.tensors().enumerate() {
                let mut back = vec![0u8; v.bytes];
                // Read on the compute stream, after the wait the runtime queued, without faults.
                w.host.read_blocking(v.ptr, &mut back, w.compute)?;
                assert!(
                    back == src.data[c][l][t],
                    "tensor {} handed out with wrong bytes",
                    v.name
                );
                *verified += v.bytes as u64;
            }
            // The engine's kernel (through the fault wrapper); the guard
            // records its done event after it when dropped.
            w.dev.launch(
                &Kernel::Fill {
                    dst: w.scratch,
                    len: 256,
                    value: l as u8,
                },
                w.compute,
            )?;
            drop(g);
        }
    }
    Ok(())
}

/// The engine's side of a scenario; `beat` is told when each pass starts.
fn drive(
    s: Scenario,
    seed: u64,
    rounds: usize,
    rates: FaultRates,
    kinds: &[FaultKind],
    beat: mpsc::Sender<String>,
) -> (Outcome, Arc<HostDevice>) {
    silence_injected_panics();
    let host = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 16 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let dev = Arc::new(FaultDevice::new(
        host.clone(),
        FaultConfig {
            seed,
            rates,
            max_delay: Duration::from_millis(1),
        },
    ));
    dev.set_enabled(false);
    let compute = host.create_stream().unwrap();
    let scratch_arena = Arena::new(host.clone(), ArenaConfig::default()).unwrap();
    let scratch_id = scratch_arena.alloc(256, Tag(0)).unwrap();
    let scratch = scratch_arena.ptr(scratch_id).unwrap();
    let w = World {
        host: host.clone(),
        dev: dev.clone(),
        compute,
        _scratch_arena: scratch_arena,
        scratch,
    };
    let cfg = s.config();
    let budget = cfg.device_memory.unwrap();
    let mut out = Outcome {
        budget_bytes: budget,
        ..Outcome::default()
    };
    let (desc, src) = model(&layout());
    let within_budget = |rt: &Runtime| {
        let st = rt.stats();
        assert!(
            st.peak_device_bytes <= budget,
            "{s:?}: peak {} bytes over the budget of {budget}",
            st.peak_device_bytes
        );
    };
    {
        let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
        dev.set_enabled(true);
        let note = |out: &mut Outcome, e: &Error| {
            assert!(
                !matches!(e, Error::Timeout { .. }),
                "{s:?}: a wait timed out under faults: {e}"
            );
            *out.errors.entry(variant(e)).or_default() += 1;
        };
        // Faulted rounds: at least `rounds`, more until every kind was injected.
        let mut round = 0;
        while round < rounds || kinds.iter().any(|&k| dev.counts().get(k) == 0) {
            assert!(
                round < 50 * rounds.max(1),
                "{s:?}: some fault kind never injected: {}",
                dev.counts()
            );
            round += 1;
            let _ = beat.send(format!("round {round}: load"));
            let m = match rt.load(desc.clone(), src.clone()) {
                Ok(m) => m,
                Err(e) => {
                    note(&mut out, &e);
                    out.passes_failed += 1;
                    continue;
                }
            };
            for p in 0..3 {
                let _ = beat.send(format!("round {round} pass {p}"));
                // Pooled pages go back to the device, so the pass allocates afresh.
                rt.arena().trim();
                match pass(&w, &rt, m, &src, &mut out.bytes_verified) {
                    Ok(()) => out.passes_ok += 1,
                    Err(e) => {
                        note(&mut out, &e);
                        out.passes_failed += 1;
                    }
                }
                within_budget(&rt);
            }
            // An unload that fails leaves the model loaded: try again, as an engine would.
            let mut tries = 0;
            while let Err(e) = rt.unload(m) {
                note(&mut out, &e);
                tries += 1;
                assert!(tries < 5, "{s:?}: unload keeps failing: {e}");
            }
        }
        out.rounds = round;
        // Faults off: everything must work again.
        dev.set_enabled(false);
        out.faults = dev.counts();
        let _ = beat.send("recovery".into());
        let m = rt
            .load(desc.clone(), src.clone())
            .unwrap_or_else(|e| panic!("{s:?}: load after the faults cleared: {e}"));
        for p in 0..3 {
            let _ = beat.send(format!("recovery pass {p}"));
            rt.arena().trim();
            pass(&w, &rt, m, &src, &mut out.bytes_verified)
                .unwrap_or_else(|e| panic!("{s:?}: recovery pass {p}: {e}"));
            out.recovery_passes += 1;
            within_budget(&rt);
        }
        rt.synchronize()
            .unwrap_or_else(|e| panic!("{s:?}: synchronize after recovery: {e}"));
        let st = rt.stats();
        out.peak_device_bytes = st.peak_device_bytes;
        // Unload and load again: the host copy and device pages all come back.
        rt.unload(m)
            .unwrap_or_else(|e| panic!("{s:?}: unload after recovery: {e}"));
        assert_eq!(
            rt.stats().host_bytes,
            host_bytes_idle(&s),
            "{s:?}: host bytes after unload"
        );
        let m = rt.load(desc.clone(), src.clone()).unwrap();
        pass(&w, &rt, m, &src, &mut out.bytes_verified).unwrap();
        out.recovery_passes += 1;
        within_budget(&rt);
    }
    drop(w);
    (out, host)
}

/// Host bytes the runtime holds with no model loaded: the staging ring, if any.
fn host_bytes_idle(s: &Scenario) -> usize {
    if s.staged {
        2 * 2 * PAGE
    } else {
        0
    }
}

/// The rates of the scenarios: a few faults per pass.
const RATES: FaultRates = FaultRates {
    alloc_page: 0.05,
    copy_submit: 0.04,
    copy_stream: 0.0,
    copy_delay: 0.1,
    event_delay: 0.1,
    launch: 0.04,
};

fn run(s: Scenario) {
    run_with(s, RATES, &KINDS);
}

/// Run a scenario under a watchdog and check what it promised: every kind
/// in `kinds` injected, typed errors, recovery, no page leaked.
fn run_with(s: Scenario, rates: FaultRates, kinds: &'static [FaultKind]) {
    let seed = env_or("OFFLOAD_FAULT_SEED", 0x00ff_10ad)
        ^ ((s.mode as u64) << 8)
        ^ ((s.policy as u64) << 16)
        ^ ((s.staged as u64) << 24);
    let rounds = env_or("OFFLOAD_FAULT_ROUNDS", 4) as usize;
    let (beat_tx, beat_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("faults-{:?}-{:?}-{}", s.mode, s.policy, s.staged))
        .spawn(move || {
            let r = drive(s, seed, rounds, rates, kinds, beat_tx);
            let _ = done_tx.send(r);
        })
        .unwrap();
    // The watchdog: every pass must start within PASS_LIMIT of the previous one.
    let start = Instant::now();
    let mut last = String::from("start");
    loop {
        match beat_rx.recv_timeout(PASS_LIMIT) {
            Ok(b) => last = b,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{s:?}: no progress for {PASS_LIMIT:?} after `{last}`: the engine hung")
            }
        }
    }
    let (out, host) = match done_rx.recv_timeout(PASS_LIMIT) {
        Ok(r) => r,
        Err(_) => match worker.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{s:?}: the worker ended without a result"),
        },
    };
    worker.join().unwrap();
    eprintln!(
        "{s:?} seed {seed:#x}: {} rounds, passes ok {} failed {} recovery {}; errors {:?}; \
         faults {}; {} bytes verified; peak {} of {} bytes; {:.2} s",
        out.rounds,
        out.passes_ok,
        out.passes_failed,
        out.recovery_passes,
        out.errors,
        out.faults,
        out.bytes_verified,
        out.peak_device_bytes,
        out.budget_bytes,
        start.elapsed().as_secs_f64()
    );
    for &k in kinds {
        assert!(out.faults.get(k) > 0, "{s:?}: no {k} fault was injected");
    }
    // A copy that fails on the stream is recovered inside the runtime (it
    // uploads the layer again): the check is that no wrong byte came out.
    // Every other kind must reach some caller as an error.
    if kinds.iter().any(|k| *k != FaultKind::CopyStream) {
        assert!(
            out.passes_failed > 0,
            "{s:?}: faults were injected but no pass saw an error: {out:?}"
        );
    }
    assert!(out.recovery_passes >= 4);
    let c = host.counters();
    assert_eq!(
        (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
        (0, 0, 0),
        "{s:?}: pages, mappings or ranges leaked after dropping the runtime"
    );
}

macro_rules! scenarios {
    ($($name:ident: $mode:expr, $policy:expr, $staged:expr;)+) => {$(
        #[test]
        fn $name() {
            run(Scenario { mode: $mode, policy: $policy, staged: $staged });
        }
    )+};
}

scenarios! {
    none_planned_pinned: Mode::None, Policy::Planned, false;
    none_planned_staged: Mode::None, Policy::Planned, true;
    none_lru_pinned: Mode::None, Policy::Lru, false;
    none_lru_staged: Mode::None, Policy::Lru, true;
    model_planned_pinned: Mode::Model, Policy::Planned, false;
    model_planned_staged: Mode::Model, Policy::Planned, true;
    model_lru_pinned: Mode::Model, Policy::Lru, false;
    model_lru_staged: Mode::Model, Policy::Lru, true;
    balanced_planned_pinned: Mode::Balanced, Policy::Planned, false;
    balanced_planned_staged: Mode::Balanced, Policy::Planned, true;
    balanced_lru_pinned: Mode::Balanced, Policy::Lru, false;
    balanced_lru_staged: Mode::Balanced, Policy::Lru, true;
    sequential_planned_pinned: Mode::Sequential, Policy::Planned, false;
    sequential_planned_staged: Mode::Sequential, Policy::Planned, true;
    sequential_lru_pinned: Mode::Sequential, Policy::Lru, false;
    sequential_lru_staged: Mode::Sequential, Policy::Lru, true;
}

/// Copies that fail on the stream, in every mode × policy × host policy.
#[test]
fn copy_stream_failures_in_every_mode() {
    copy_stream_failures(&[false]);
}

/// The same with staged uploads. A staged upload copies in chunks, each
/// followed by its staging buffer's event; the host backend attaches a
/// stream failure to the events recorded after it until the stream is
/// synchronised, and the runtime's recovery synchronises the copy stream, so
/// a failure can be cleared before the ready event of the layer it hit is
/// recorded, and that layer is then handed out with the garbage.
#[test]
#[ignore = "known gap: a failed staged copy can escape the ready event (see the comment)"]
fn copy_stream_failures_in_every_mode_staged() {
    copy_stream_failures(&[true]);
}

fn copy_stream_failures(host_policies: &[bool]) {
    for mode in [Mode::None, Mode::Model, Mode::Balanced, Mode::Sequential] {
        for policy in [Policy::Planned, Policy::Lru] {
            for &staged in host_policies {
                run_with(
                    Scenario {
                        mode,
                        policy,
                        staged,
                    },
                    FaultRates {
                        copy_stream: 0.05,
                        ..FaultRates::default()
                    },
                    &[FaultKind::CopyStream],
                );
            }
        }
    }
}

/// A runtime on a fault device with injection off, and a model loaded.
struct Small {
    host: Arc<HostDevice>,
    dev: Arc<FaultDevice<HostDevice>>,
    compute: StreamId,
    rt: Runtime,
}

fn small(cfg: RuntimeConfig) -> Small {
    silence_injected_panics();
    let host = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 16 << 20,
            page_size: PAGE,
            link_gbps: None,
        })
        .unwrap(),
    );
    let dev = Arc::new(FaultDevice::new(host.clone(), FaultConfig::default()));
    let compute = host.create_stream().unwrap();
    let rt = Runtime::new(dev.clone(), compute, cfg).unwrap();
    Small {
        host,
        dev,
        compute,
        rt,
    }
}

fn small_cfg(
    mode: Mode,
    policy: Policy,
    device_pages: usize,
    host_policy: HostPolicy,
) -> RuntimeConfig {
    RuntimeConfig {
        mode: Some(mode),
        policy,
        prefetch_depth: 1,
        device_memory: Some(device_pages * PAGE),
        high_watermark: None,
        low_watermark: Some(0),
        host_policy,
        wait_timeout: Duration::from_secs(2),
        ..RuntimeConfig::default()
    }
}

/// Acquire a layer and read its tensors on the compute stream: `Ok(true)`
/// when every byte is right, `Ok(false)` when the layer was handed out with
/// wrong bytes and nothing reported an error.
fn acquire_and_check(
    s: &Small,
    m: ModelId,
    src: &MemSource,
    c: usize,
    l: usize,
) -> Result<bool, Error> {
    let g = s.rt.acquire(LayerId {
        model: m,
        component: c,
        layer: l,
    })?;
    let mut right = true;
    for (t, v) in g.tensors().enumerate() {
        let mut back = vec![0u8; v.bytes];
        s.host.read_blocking(v.ptr, &mut back, s.compute)?;
        right &= back == src.data[c][l][t];
    }
    Ok(right)
}

/// Engine bug, found by `copy_stream_failures_in_every_mode`: a layer whose
/// upload failed on the copy stream is handed out as if it had arrived,
/// and, once resident, handed out again after the fault has cleared.
#[test]
fn a_copy_that_fails_on_the_stream_is_never_handed_out() {
    let (desc, src) = model(&[vec![vec![2 * PAGE], vec![2 * PAGE]]]);
    let s = small(small_cfg(
        Mode::None,
        Policy::Planned,
        16,
        HostPolicy::Pinned,
    ));
    s.dev.set_rate(FaultKind::CopyStream, 1.0);
    // Mode none uploads at load: both uploads fail on the stream.
    let loaded = s.rt.load(desc, src.clone());
    s.dev.set_enabled(false);
    assert_eq!(s.dev.counts().copy_stream, 2);
    if let Ok(m) = loaded {
        for pass in 0..2 {
            for l in 0..2 {
                match acquire_and_check(&s, m, &src, 0, l) {
                    // An error is a right answer while the failed upload is current.
                    Err(e) => assert!(pass == 0, "pass {pass}, after the fault cleared: {e}"),
                    Ok(right) => assert!(
                        right,
                        "pass {pass}: layer {l} handed out with the bytes of a failed copy"
                    ),
                }
            }
        }
    }
}

/// Engine bug: the failure of an upload queued at load surfaces, unreported
/// until then, as the failure of a later, unrelated `Runtime::unload`
/// (its `stream_synchronize(copy)`), which then does not unload.
#[test]
fn unload_after_a_failed_upload_releases_the_host_copy() {
    let (desc, src) = model(&[vec![vec![2 * PAGE], vec![2 * PAGE], vec![2 * PAGE]]]);
    let s = small(small_cfg(
        Mode::None,
        Policy::Planned,
        16,
        HostPolicy::Pinned,
    ));
    // Mode none uploads at load; the uploads fail on the stream.
    s.dev.set_rate(FaultKind::CopyStream, 1.0);
    let m = s.rt.load(desc, src).unwrap();
    s.dev.set_enabled(false);
    assert!(s.dev.counts().copy_stream > 0);
    assert!(s.rt.stats().host_bytes > 0);
    let first = s.rt.unload(m);
    if first.is_err() {
        // The model must at least still be loaded, so that unloading again frees it.
        let again = s.rt.unload(m);
        assert!(again.is_ok(), "unload failed twice: {first:?}, {again:?}");
    }
    assert_eq!(s.rt.stats().host_bytes, 0, "the host copy is still counted");
    assert!(
        first.is_ok(),
        "the failure belonged to the uploads at load, not to the unload: {first:?}"
    );
}

/// Engine bug: a staging buffer whose last copy failed on the stream is
/// dropped from the ring instead of going back to it; once every buffer is
/// gone, every staged upload times out, for good.
#[test]
fn a_failed_staging_copy_does_not_shrink_the_staging_ring() {
    let (desc, src) = model(&[vec![vec![PAGE]; 4]]);
    let s = small(small_cfg(
        Mode::Sequential,
        Policy::Planned,
        16,
        HostPolicy::Staged {
            buffers: 1,
            buffer_bytes: PAGE,
            threads: 1,
        },
    ));
    let m = s.rt.load(desc, src.clone()).unwrap();
    s.dev.set_rate(FaultKind::CopyStream, 1.0);
    let _ = acquire_and_check(&s, m, &src, 0, 0);
    s.dev.set_enabled(false);
    assert!(s.dev.counts().copy_stream > 0);
    // Faults are off: within a couple of tries every layer must come back right.
    for l in 1..4 {
        let mut last = None;
        for _ in 0..3 {
            match acquire_and_check(&s, m, &src, 0, l) {
                Ok(true) => {
                    last = None;
                    break;
                }
                other => last = Some(other),
            }
        }
        assert!(
            last.is_none(),
            "layer {l} after the fault cleared: {last:?}"
        );
    }
}

/// Engine bug (reporting): when the device refuses a page while a
/// component that must be whole-resident is uploaded, the caller gets
/// `OutOfMemory` with the arena's free count, which is larger than the
/// request, instead of the device's `DeviceOutOfMemory`.
#[test]
#[ignore = "engine bug: residency/mod.rs start_component maps Attempt::NeedRoom to Error::OutOfMemory with the arena's free pages, hiding the device's DeviceOutOfMemory"]
fn a_device_refusal_is_reported_as_such() {
    let (desc, src) = model(&[vec![vec![2 * PAGE]; 3]]);
    let s = small(small_cfg(
        Mode::None,
        Policy::Planned,
        16,
        HostPolicy::Pinned,
    ));
    s.dev.set_rate(FaultKind::AllocPage, 1.0);
    let e = s.rt.load(desc, src).unwrap_err();
    assert!(e.is_retryable_oom(), "{e}");
    if let Error::OutOfMemory {
        requested, free, ..
    } = e
    {
        assert!(
            free < requested,
            "`out of memory` with {free} bytes free for a request of {requested}: the device refused, say so"
        );
    }
}

/// Out of memory on allocation is met by evicting and retrying: with the
/// device refusing every new page, LRU passes still succeed by reusing the
/// pages of the layers they evict.
#[test]
fn device_out_of_memory_is_met_by_evicting_and_retrying() {
    for mode in [Mode::Balanced, Mode::Sequential] {
        let (desc, src) = model(&layout());
        let mut cfg = small_cfg(mode, Policy::Lru, 32, HostPolicy::Pinned);
        cfg.high_watermark = Some(14 * PAGE);
        let s = small(cfg);
        let m = s.rt.load(desc, src.clone()).unwrap();
        // Warm up on the first layer of the text encoder (and its prefetch):
        // the arena holds 4 pages, less than the passes below need.
        assert!(acquire_and_check(&s, m, &src, 0, 0).unwrap());
        let held = s.rt.arena().pages_held();
        // From now on the device gives no page at all.
        s.dev.set_rate(FaultKind::AllocPage, 1.0);
        let before = s.rt.stats();
        for pass in 0..4 {
            for c in [1, 0, 1] {
                for l in 0..src.data[c].len() {
                    let right = acquire_and_check(&s, m, &src, c, l)
                        .unwrap_or_else(|e| panic!("{mode}: pass {pass} layer {c}/{l}: {e}"));
                    assert!(right, "{mode}: pass {pass} layer {c}/{l}: wrong bytes");
                }
            }
        }
        let st = s.rt.stats().since(&before);
        assert!(
            s.dev.counts().alloc_page > 0,
            "{mode}: the device was never asked"
        );
        assert!(st.evictions > 0, "{mode}: nothing was evicted");
        assert_eq!(
            s.rt.arena().pages_held(),
            held,
            "{mode}: pages came from nowhere"
        );
        drop(s.rt);
        let c = s.host.counters();
        assert_eq!(
            (c.pages_allocated, c.pages_mapped, c.ranges_reserved),
            (0, 0, 0)
        );
    }
}
