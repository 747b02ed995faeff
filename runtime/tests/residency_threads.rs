//! Several engine threads acquiring layers of two models at once under a
//! budget of a few layers: no deadlock (a watchdog fails the test), no wrong
//! byte, no leaked page. The LoRA variants swap each model's LoRA set
//! between its passes while the other model's threads keep going, and check
//! every tensor against the f64 reference merge.
//!
//! `OFFLOAD_STRESS_PASSES` (default 20) sets the passes of the LoRA
//! variants and `OFFLOAD_STRESS_SEED` the seed of their swaps, for longer
//! runs (see docs/reliability.md).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::lora::{bindings, check as lora_check, f16_model, lora, same_set, Kind, Set};
use common::{model, uniform, MemSource, PAGE};
use offload_runtime::device::{Device, DeviceExt, HostConfig, HostDevice};
use offload_runtime::lora::LoraMode;
use offload_runtime::model::ModelDesc;
use offload_runtime::residency::{
    HostPolicy, LayerGuard, LayerId, Mode, ModelId, Policy, Runtime, RuntimeConfig,
};
use offload_runtime::Error;

/// Acquire `id`, retrying for up to 10 s while other threads hold every
/// slot or the memory another component needs (counted in `busy`).
fn acquire_retrying(rt: &Runtime, id: LayerId, busy: &mut usize) -> Result<LayerGuard, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rt.acquire(id) {
            Ok(g) => return Ok(g),
            Err(e)
                if (matches!(e, Error::AllInUse { .. }) || e.is_retryable_oom())
                    && Instant::now() < deadline =>
            {
                *busy += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
}

fn stress(mode: Mode, policy: Policy, host_policy: HostPolicy) {
    stress_with(mode, policy, host_policy, None);
}

/// [`stress`] with `RuntimeConfig::upload_thread` set to `upload_thread`.
fn stress_with(mode: Mode, policy: Policy, host_policy: HostPolicy, upload_thread: Option<bool>) {
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 << 20,
            page_size: PAGE,
            link_gbps: Some(2.0),
        })
        .unwrap(),
    );
    let compute = dev.create_stream().unwrap();
    // Two models of 6 layers of 2 pages and one of 3; the device holds 14 pages.
    let (desc_a, src_a) = model(&[uniform(6, 2 * PAGE)]);
    let (desc_b, src_b) = model(&[vec![vec![PAGE, 100]; 3], uniform(4, 2 * PAGE)]);
    let cfg = RuntimeConfig {
        mode: Some(mode),
        policy,
        prefetch_depth: 1,
        device_memory: Some(14 * PAGE),
        high_watermark: Some(8 * PAGE),
        low_watermark: Some(0),
        host_policy,
        wait_timeout: Duration::from_secs(10),
        upload_thread,
        ..RuntimeConfig::default()
    };
    let rt = Arc::new(Runtime::new(dev.clone(), compute, cfg).unwrap());
    let a = rt.load(desc_a, src_a.clone()).unwrap();
    let b = rt.load(desc_b, src_b.clone()).unwrap();
    let jobs = [
        (a, 0, src_a.clone()),
        (a, 0, src_a),
        (b, 0, src_b.clone()),
        (b, 1, src_b),
    ];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for (t, (m, c, src)) in jobs.into_iter().enumerate() {
        let (rt, dev, tx) = (rt.clone(), dev.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            // Each thread reads back on its own stream after the compute stream's wait.
            let mine = dev.create_stream().unwrap();
            let mut checked = 0usize;
            let mut busy = 0usize;
            for pass in 0..12 {
                for l in 0..src.data[c].len() {
                    let id = LayerId {
                        model: m,
                        component: c,
                        layer: l,
                    };
                    let g = acquire_retrying(&rt, id, &mut busy)
                        .unwrap_or_else(|e| panic!("thread {t} pass {pass} layer {l}: {e}"));
                    dev.stream_wait_event(mine, g.ready_event()).unwrap();
                    for (i, v) in g.tensors().enumerate() {
                        let mut back = vec![0u8; v.bytes];
                        dev.read_blocking(v.ptr, &mut back, mine).unwrap();
                        assert!(
                            back == src.data[c][l][i],
                            "thread {t}: tensor {} differs",
                            v.name
                        );
                        checked += v.bytes;
                    }
                    drop(g);
                }
            }
            let _ = tx.send((t, checked, busy));
        }));
    }
    drop(tx);
    let mut total = 0;
    for _ in 0..4 {
        let (_, checked, _) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("an engine thread hung or panicked (deadlock?)");
        total += checked;
    }
    // Each thread has reported; joining also drops its handle on the runtime.
    for h in handles {
        h.join().expect("engine thread");
    }
    // 12 passes × (2 × 6 × 2 pages + 3 × (PAGE + 100) + 4 × 2 pages)
    assert_eq!(total, 12 * (2 * 12 * PAGE + 3 * (PAGE + 100) + 8 * PAGE));
    rt.synchronize().unwrap();
    let st = rt.stats();
    assert_eq!(st.bytes_h2d, dev.counters().bytes_h2d);
    assert!(st.peak_device_bytes <= 14 * PAGE);
    drop(rt);
    let c = dev.counters();
    assert_eq!((c.pages_allocated, c.pages_mapped), (0, 0), "leaked pages");
    assert_eq!(
        c.pinned_freed_in_use, 0,
        "a pinned buffer freed under a copy"
    );
}

#[test]
fn threads_share_a_tiny_budget_sequential_planned() {
    stress(Mode::Sequential, Policy::Planned, HostPolicy::Pinned);
}

#[test]
fn threads_share_a_tiny_budget_balanced_lru_staged() {
    stress(
        Mode::Balanced,
        Policy::Lru,
        HostPolicy::Staged {
            buffers: 3,
            buffer_bytes: PAGE,
            threads: 2,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: false,
        },
    );
}

#[test]
fn threads_share_a_tiny_budget_model_mode() {
    stress(Mode::Model, Policy::Planned, HostPolicy::Pinned);
}

/// Pinned uploads queued by the uploader thread (a GPU's default) for
/// every engine thread.
#[test]
fn threads_share_a_tiny_budget_sequential_uploader() {
    stress_with(
        Mode::Sequential,
        Policy::Planned,
        HostPolicy::Pinned,
        Some(true),
    );
}

/// Where the threads of one model meet the coordinator between passes: each
/// thread arrives and waits to be let go; the coordinator waits until all
/// have arrived (so none holds a guard), swaps the model's LoRA set and lets
/// them go. Every wait has a timeout that fails the test; a thread that
/// panics poisons the gate, so the coordinator fails at once.
struct Gate {
    threads: usize,
    /// (arrived, generation, poisoned)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

const GATE_TIMEOUT: Duration = Duration::from_secs(60);

impl Gate {
    fn new(threads: usize) -> Self {
        Gate {
            threads,
            state: Mutex::new((0, 0, false)),
            cv: Condvar::new(),
        }
    }

    /// A thread: arrive, then wait until the coordinator lets this generation go.
    fn arrive_and_wait(&self, who: &str) {
        let mut g = self.state.lock().unwrap();
        g.0 += 1;
        let generation = g.1;
        self.cv.notify_all();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, GATE_TIMEOUT, |s| s.1 == generation && !s.2)
            .unwrap();
        assert!(!t.timed_out(), "{who}: never let go (deadlock?)");
        assert!(!g.2, "{who}: another thread panicked");
    }

    /// The coordinator: wait until every thread has arrived.
    fn wait_all(&self, what: &str) {
        let g = self.state.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, GATE_TIMEOUT, |s| s.0 < self.threads && !s.2)
            .unwrap();
        assert!(!g.2, "{what}: a thread panicked");
        assert!(!t.timed_out(), "{what}: threads never arrived (deadlock?)");
    }

    /// The coordinator: let the threads go.
    fn release(&self) {
        let mut g = self.state.lock().unwrap();
        g.0 = 0;
        g.1 += 1;
        self.cv.notify_all();
    }

    fn poison(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
        self.cv.notify_all();
    }
}

/// Poisons its gate if the thread that holds it panics.
struct PoisonOnPanic(Arc<Gate>);

impl Drop for PoisonOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poison();
        }
    }
}

/// One model of the LoRA stress: its weights and the sets it switches between.
struct LoraModel {
    desc: ModelDesc,
    src: Arc<MemSource>,
    sets: Vec<Set>,
}

fn lora_models() -> [LoraModel; 2] {
    // A: 6 layers of 2 pages. B: a text encoder of 3 small layers and a denoiser of 4.
    let (da, sa) = f16_model("stress-a", 1, &[vec![vec![vec![64, 64]]; 6]]);
    let (db, sb) = f16_model(
        "stress-b",
        2,
        &[
            vec![vec![vec![32, 64], vec![64]]; 3],
            vec![vec![vec![64, 64]]; 4],
        ],
    );
    let a1 = lora(
        201,
        &da,
        &[(0, 0, 0), (0, 2, 0), (0, 5, 0)],
        Kind::LowRank(4),
    );
    let a2 = lora(202, &da, &[(0, 1, 0), (0, 2, 0)], Kind::LoKr);
    let a3 = lora(203, &da, &[(0, 3, 0), (0, 4, 0)], Kind::Slice(4));
    let a4 = lora(204, &da, &[(0, 3, 0)], Kind::LoHa(2));
    let b1 = lora(
        211,
        &db,
        &[(0, 0, 0), (1, 1, 0), (1, 3, 0)],
        Kind::LowRank(2),
    );
    let b2 = lora(212, &db, &[(1, 0, 0), (1, 2, 0)], Kind::LoKr);
    let b3 = lora(213, &db, &[(0, 2, 0), (1, 1, 0)], Kind::LoHa(2));
    [
        LoraModel {
            desc: da,
            src: sa,
            sets: vec![
                vec![],
                vec![(a1.clone(), 0.8)],
                vec![(a2, -1.0), (a1.clone(), 0.3)],
                vec![(a3, 1.0), (a4, 0.5), (a1, -0.6)],
            ],
        },
        LoraModel {
            desc: db,
            src: sb,
            sets: vec![
                vec![],
                vec![(b1.clone(), 1.0)],
                vec![(b2, 0.5), (b3.clone(), 1.0)],
                vec![(b3, -0.7), (b1, 0.25)],
            ],
        },
    ]
}

/// Several engine threads acquiring layers of two models at once under a
/// budget of a few layers, while a coordinator swaps each model's LoRA set
/// between that model's passes (the other model's threads keep going). No
/// deadlock (every wait has a timeout), no wrong byte (every tensor against
/// the f64 reference merge of the set in force, and bit-identical to every
/// other time it was handed out under that set), no leaked page.
fn lora_stress(mode: Mode, policy: Policy, host_policy: HostPolicy) {
    lora_stress_with(mode, policy, host_policy, None);
}

/// [`lora_stress`] with `RuntimeConfig::upload_thread` set to `upload_thread`.
fn lora_stress_with(
    mode: Mode,
    policy: Policy,
    host_policy: HostPolicy,
    upload_thread: Option<bool>,
) {
    let passes = std::env::var("OFFLOAD_STRESS_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20usize);
    let seed: u64 = std::env::var("OFFLOAD_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let start = Instant::now();
    let dev = Arc::new(
        HostDevice::new(HostConfig {
            capacity: 64 << 20,
            page_size: PAGE,
            link_gbps: Some(2.0),
        })
        .unwrap(),
    );
    let compute = dev.create_stream().unwrap();
    let budget = 20 * PAGE;
    let cfg = RuntimeConfig {
        mode: Some(mode),
        policy,
        prefetch_depth: 1,
        device_memory: Some(budget),
        high_watermark: Some(8 * PAGE),
        low_watermark: Some(0),
        host_policy,
        wait_timeout: Duration::from_secs(10),
        lora_mode: LoraMode::FuseOnUpload,
        upload_thread,
        ..RuntimeConfig::default()
    };
    let rt = Arc::new(Runtime::new(dev.clone(), compute, cfg).unwrap());
    let models = Arc::new(lora_models());
    let ids: Vec<ModelId> = models
        .iter()
        .map(|lm| rt.load(lm.desc.clone(), lm.src.clone()).unwrap())
        .collect();
    // The set of each model in each pass, drawn from the seed.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut draw = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let plans: Arc<Vec<Vec<usize>>> = Arc::new(
        models
            .iter()
            .map(|lm| (0..passes).map(|_| draw(lm.sets.len())).collect())
            .collect(),
    );
    // (model, component) per thread: two on A, one on each component of B.
    let jobs = [(0usize, 0usize), (0, 0), (1, 0), (1, 1)];
    let gates: Vec<Arc<Gate>> = (0..2)
        .map(|mi| Arc::new(Gate::new(jobs.iter().filter(|j| j.0 == mi).count())))
        .collect();
    // Bytes of each tensor under each set, as first handed out: (model, set, c, l, t).
    type Key = (usize, usize, usize, usize, usize);
    let seen: Arc<Mutex<HashMap<Key, Vec<u8>>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut handles = Vec::new();
    for (t, &(mi, c)) in jobs.iter().enumerate() {
        let (rt, dev, tx) = (rt.clone(), dev.clone(), tx.clone());
        let (models, plans, seen, gate) = (
            models.clone(),
            plans.clone(),
            seen.clone(),
            gates[mi].clone(),
        );
        let m = ids[mi];
        handles.push(std::thread::spawn(move || {
            let _poison = PoisonOnPanic(gate.clone());
            let lm = &models[mi];
            let mine = dev.create_stream().unwrap();
            let (mut checked, mut busy) = (0usize, 0usize);
            for pass in 0..passes {
                gate.arrive_and_wait(&format!("thread {t} pass {pass}"));
                let si = plans[mi][pass];
                let set = &lm.sets[si];
                for l in 0..lm.desc.components[c].layers.len() {
                    let id = LayerId {
                        model: m,
                        component: c,
                        layer: l,
                    };
                    let g = acquire_retrying(&rt, id, &mut busy)
                        .unwrap_or_else(|e| panic!("thread {t} pass {pass} layer {l}: {e}"));
                    dev.stream_wait_event(mine, g.ready_event()).unwrap();
                    for (i, v) in g.tensors().enumerate() {
                        let mut back = vec![0u8; v.bytes];
                        dev.read_blocking(v.ptr, &mut back, mine).unwrap();
                        let key = (mi, si, c, l, i);
                        let first = seen.lock().unwrap().get(&key).cloned();
                        match first {
                            Some(f) => assert!(
                                f == back,
                                "thread {t} pass {pass}: {} under set {si} differs from an earlier read",
                                v.name
                            ),
                            None => {
                                lora_check(&lm.desc, &lm.src, set, (c, l, i), &back)
                                    .unwrap_or_else(|e| {
                                        panic!("thread {t} pass {pass}: {} under set {si}: {e}", v.name)
                                    });
                                seen.lock().unwrap().entry(key).or_insert(back);
                            }
                        }
                        checked += v.bytes;
                    }
                    drop(g);
                }
            }
            let _ = tx.send((t, checked, busy));
        }));
    }
    drop(tx);
    // The coordinator: before each pass of each model, swap that model's set.
    let mut swaps = 0;
    let mut oom_retries = 0;
    let mut current = [0usize; 2];
    for pass in 0..passes {
        // Alternate which model goes first, so swaps of one overlap passes of the other.
        let order = if pass % 2 == 0 { [0, 1] } else { [1, 0] };
        for mi in order {
            gates[mi].wait_all(&format!("model {mi} before pass {pass}"));
            let si = plans[mi][pass];
            if si != current[mi] {
                // The other model's threads may take the pages this call makes
                // room for: a retryable out-of-memory that changes nothing; try again.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match rt.set_loras(ids[mi], &bindings(&models[mi].sets[si])) {
                        Ok(_) => break,
                        Err(e) if e.is_retryable_oom() && Instant::now() < deadline => {
                            let now = rt.loras(ids[mi]).unwrap();
                            assert!(
                                same_set(&now, &bindings(&models[mi].sets[current[mi]])),
                                "model {mi} pass {pass}: a failed set_loras changed the set: {e}"
                            );
                            oom_retries += 1;
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        Err(e) => panic!("model {mi} pass {pass}: set_loras({si}): {e}"),
                    }
                }
                current[mi] = si;
                swaps += 1;
            }
            gates[mi].release();
        }
    }
    let mut total = 0;
    for _ in 0..jobs.len() {
        let (_, checked, _) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("an engine thread hung or panicked (deadlock?)");
        total += checked;
    }
    for h in handles {
        h.join().expect("engine thread");
    }
    assert!(swaps > 0, "the plan never changed a set");
    rt.synchronize().unwrap();
    let st = rt.stats();
    assert!(
        st.peak_device_bytes <= budget,
        "{} bytes over the budget",
        st.peak_device_bytes
    );
    assert!(st.merges > 0);
    // Everything off again: every tensor is the file's, bit for bit.
    for (mi, lm) in models.iter().enumerate() {
        rt.set_loras(ids[mi], &[]).unwrap();
        for (c, comp) in lm.desc.components.iter().enumerate() {
            for l in 0..comp.layers.len() {
                let g = rt
                    .acquire(LayerId {
                        model: ids[mi],
                        component: c,
                        layer: l,
                    })
                    .unwrap();
                for (i, v) in g.tensors().enumerate() {
                    let mut back = vec![0u8; v.bytes];
                    dev.read_blocking(v.ptr, &mut back, compute).unwrap();
                    assert!(
                        back == lm.src.data[c][l][i],
                        "{} after removing every LoRA",
                        v.name
                    );
                }
            }
        }
    }
    for &m in &ids {
        rt.unload(m).unwrap();
    }
    assert_eq!(
        rt.arena().pages_used(),
        0,
        "pages in use after unloading both models"
    );
    assert_eq!(
        rt.stats().lora_device_bytes,
        0,
        "factors left on the device"
    );
    eprintln!(
        "{mode:?} {policy:?} {host_policy:?}: {passes} passes, {swaps} swaps \
         ({oom_retries} retried after an out-of-memory), {} tensors × sets seen, \
         {total} bytes checked, {} merges, {:.2} s",
        seen.lock().unwrap().len(),
        st.merges,
        start.elapsed().as_secs_f64()
    );
    drop(rt);
    let c = dev.counters();
    assert_eq!((c.pages_allocated, c.pages_mapped), (0, 0), "leaked pages");
    assert_eq!(
        c.pinned_freed_in_use, 0,
        "a pinned buffer freed under a copy"
    );
}

#[test]
fn lora_swaps_between_passes_of_threads_sequential_planned() {
    lora_stress(Mode::Sequential, Policy::Planned, HostPolicy::Pinned);
}

#[test]
fn lora_swaps_between_passes_of_threads_balanced_lru_staged() {
    lora_stress(
        Mode::Balanced,
        Policy::Lru,
        HostPolicy::Staged {
            buffers: 3,
            buffer_bytes: PAGE,
            threads: 2,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: false,
        },
    );
}

#[test]
fn lora_swaps_between_passes_of_threads_model_mode() {
    lora_stress(Mode::Model, Policy::Planned, HostPolicy::Pinned);
}

/// Pinned uploads and their merges queued by the uploader thread.
#[test]
fn lora_swaps_between_passes_of_threads_sequential_uploader() {
    lora_stress_with(
        Mode::Sequential,
        Policy::Planned,
        HostPolicy::Pinned,
        Some(true),
    );
}
