//! The residency engine: keeps the right weights on the device, streams the
//! rest ahead of use, and counts what it moved.
//!
//! An engine builds a [`Runtime`] on a device with its compute stream,
//! [`Runtime::load`]s a model (a [`ModelDesc`] and a [`WeightSource`]), then
//! for each layer it runs calls [`Runtime::acquire`], which returns a
//! [`LayerGuard`] with a device pointer per tensor. The runtime has already
//! made the compute stream wait for the layer's upload; the engine queues
//! its kernels and drops the guard (or hands it back with
//! [`Runtime::release`] and its own done event), after which the layer may
//! be evicted once that work has run.
//!
//! Modes ([`Mode`]) and policies ([`Policy`]) decide what stays resident.
//! With the planned policy each component gets a plan before its first pass
//! (from the layout's execution order, corrected later by the acquire trace):
//! the layers that fit stay resident, the rest stream through a ring of
//! `prefetch_depth + 1` slots that stay mapped, so a steady-state pass moves
//! only the streamed layers' bytes.
//!
//! Locks: each component has its own lock, taken on every acquire; a
//! scheduler lock is taken only to start a component (plan, ring, making
//! room by offloading others), never on the hot path. No thread ever holds
//! two component locks at once.

mod component;
mod config;
mod fill_pool;
mod gate;
mod host;
mod lora;
mod plan;
mod stall;
mod stats;
mod uploader;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use dashmap::DashMap;

pub use config::{HostPolicy, Mode, Policy, Resolved, RuntimeConfig};
pub use stall::StallCheckpoint;
pub use stats::{RuntimeStats, TimelineEntry};

use crate::arena::{pack, Arena, ArenaConfig, Tag};
use crate::device::MergeOp;
use crate::device::{BackendKind, Device, DevicePtr, EventId, StreamId};
use crate::error::{Error, Result};
use crate::lora::{LoraBinding, LoraMode, LoraReport};
use crate::model::{DType, ModelDesc, Pin, WeightSource};
use component::{CompRt, CompState, DoneSource, LayerState, Place, Slot};
use gate::Gate;
use host::{Job, JobDone, LayerBytes, Stager};
use stall::StallLog;
use stats::Counters;
use uploader::{HostSrc, UploadJob, Uploader};

/// A loaded model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

/// A layer of a loaded model: component and layer indices as in its [`ModelDesc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId {
    /// The model.
    pub model: ModelId,
    /// Component index.
    pub component: usize,
    /// Layer index within the component.
    pub layer: usize,
}

struct ModelRt {
    id: ModelId,
    desc: ModelDesc,
    source: Arc<dyn WeightSource>,
    comps: Vec<CompRt>,
    /// The LoRA set applied to the model; taken before any component lock.
    lora: Mutex<lora::LoraState>,
}

/// Why an acquire attempt stopped short.
enum Attempt {
    /// The component has no plan and ring yet (or was offloaded).
    NotStarted,
    /// The model's LoRA set is being changed: try again shortly.
    Swapping,
    /// Other components must give up this many pages.
    NeedRoom(usize, Option<Error>),
    /// A real error.
    Fail(Error),
}

impl From<Error> for Attempt {
    fn from(e: Error) -> Self {
        Attempt::Fail(e)
    }
}

struct Shared {
    device: Arc<dyn Device>,
    arena: Arena<dyn Device>,
    page: usize,
    compute: StreamId,
    copy: StreamId,
    /// Fuse-on-upload merges run here, each after its layer's copy (an
    /// event hands over), so the copy stream moves on to the next upload
    /// while a layer is merged.
    merge: StreamId,
    fence: StreamId,
    cfg: RuntimeConfig,
    res: Resolved,
    models: DashMap<u32, Arc<ModelRt>>,
    next_model: AtomicU32,
    /// Serialises component starts and cross-component eviction; holds the start counter.
    sched: Mutex<u64>,
    pool_tx: Sender<EventId>,
    pool_rx: Receiver<EventId>,
    /// Copy-to-merge hand-off events, apart from `pool_tx` (see `handoff_event`).
    handoff_tx: Sender<EventId>,
    handoff_rx: Receiver<EventId>,
    /// Debug builds: the events `recycle` put in the pool and `event` has
    /// not taken out, to catch an event given back twice (two owners).
    #[cfg(debug_assertions)]
    pooled: Mutex<std::collections::HashSet<EventId>>,
    created_events: Mutex<Vec<EventId>>,
    counters: Arc<Counters>,
    /// Timing events around the compute stream's waits for weights.
    stalls: StallLog,
    stager: Option<Stager>,
    /// Queues pinned uploads, their copies and merges (see `uploader`),
    /// where `RuntimeConfig::upload_thread` says so.
    uploader: Option<Uploader>,
    /// How LoRAs are applied (changed by `set_lora_mode`).
    lora_mode: Mutex<LoraMode>,
    /// Pages of LoRA factors on the device, all models together.
    lora_pages: AtomicUsize,
    /// Staged and uploader jobs queue their copies under the shared side;
    /// a synchronisation of the copy stream (which clears a failure on it)
    /// takes the exclusive side, so it never falls between a layer's
    /// failed chunk and its ready event (see `gate`).
    copy_gate: Arc<Gate>,
}

/// The residency engine; see the module documentation.
pub struct Runtime {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("resolved", &self.sh.res)
            .field("config", &self.sh.cfg)
            .finish_non_exhaustive()
    }
}

/// One tensor of an acquired layer.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    /// Name in the checkpoint.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: &'a [usize],
    /// Device address of the first byte (a host address on the host backend).
    pub ptr: DevicePtr,
    /// Size in bytes.
    pub bytes: usize,
}

/// A layer on the device, usable by work queued on the compute stream until
/// the guard is dropped (which records a done event on the compute stream) or
/// handed back with [`Runtime::release`].
pub struct LayerGuard {
    sh: Arc<Shared>,
    model: Arc<ModelRt>,
    id: LayerId,
    base: DevicePtr,
    ready: EventId,
    armed: bool,
    /// Unfused LoRA mode: (tensor index, its adapters' factors on the device).
    lora: Vec<(usize, Arc<MergeOp>)>,
}

impl std::fmt::Debug for LayerGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerGuard")
            .field("id", &self.id)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl LayerGuard {
    /// The layer.
    pub fn id(&self) -> LayerId {
        self.id
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.model.desc.components[self.id.component].layers[self.id.layer].name
    }

    /// The event that fires when the layer's upload has completed (work
    /// queued on the compute stream after the acquire is already ordered
    /// after it).
    pub fn ready_event(&self) -> EventId {
        self.ready
    }

    /// Device address of the layer's packed block.
    pub fn base(&self) -> DevicePtr {
        self.base
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.model.desc.components[self.id.component].layers[self.id.layer]
            .tensors
            .len()
    }

    /// True for a layer without tensors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tensor `i` (in the order of the model description).
    pub fn tensor(&self, i: usize) -> Option<TensorView<'_>> {
        let t = self.model.desc.components[self.id.component].layers[self.id.layer]
            .tensors
            .get(i)?;
        let off = self.model.comps[self.id.component].layer_bytes[self.id.layer].pieces[i].1;
        Some(TensorView {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            ptr: self.base.offset(off),
            bytes: t.bytes,
        })
    }

    /// All tensors.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        (0..self.len()).filter_map(|i| self.tensor(i))
    }

    /// In the unfused LoRA mode, the adapters of tensor `i` that the engine
    /// must add itself: each [`MergeOp`] gives a row slice and, per adapter,
    /// its scale and its factors' device addresses (resident, ready before
    /// the layer's ready event). Empty in the other modes and for tensors
    /// without adapters.
    pub fn lora(&self, i: usize) -> impl Iterator<Item = &MergeOp> {
        self.lora
            .iter()
            .filter(move |(t, _)| *t == i)
            .map(|(_, op)| &**op)
    }
}

impl Drop for LayerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let sh = &self.sh;
        let done = sh
            .event()
            .and_then(|e| sh.device.record_event(e, sh.compute).map(|()| e));
        match done {
            Ok(e) => sh.finish_release(&self.model, self.id, Some((DoneSource::Compute, e))),
            Err(_) => {
                // No event to track the engine's work: wait for it instead.
                let _ = sh.device.stream_synchronize(sh.compute);
                sh.finish_release(&self.model, self.id, None);
            }
        }
    }
}

impl Runtime {
    /// Make a runtime on `device`; the engine queues its kernels on `compute`.
    pub fn new(device: Arc<dyn Device>, compute: StreamId, cfg: RuntimeConfig) -> Result<Runtime> {
        let info = device.info().clone();
        let res = cfg.resolve(info.total_memory);
        let cfg_lora_mode = cfg.lora_mode;
        if cfg_lora_mode.fuses_host_copy() && cfg.host_policy != HostPolicy::Pinned {
            return Err(Error::Config(format!(
                "LoRA mode {cfg_lora_mode} keeps a fused host copy and needs the pinned host policy, not {}",
                cfg.host_policy
            )));
        }
        let page = info.page_size;
        if res.device_memory < page {
            return Err(Error::Config(format!(
                "device memory for weights ({} bytes) is less than one page ({page} bytes)",
                res.device_memory
            )));
        }
        let arena = Arena::new(
            device.clone(),
            ArenaConfig {
                capacity: Some(res.device_memory),
            },
        )?;
        // The compute stream must exist: the runtime records events on it.
        let probe = device.create_event()?;
        let recorded = device.record_event(probe, compute);
        let _ = device.destroy_event(probe);
        recorded?;
        // The runtime's own streams; on a failure below, those made are destroyed.
        let mut streams: Vec<StreamId> = Vec::with_capacity(3);
        let undo = |streams: &[StreamId]| {
            for &s in streams {
                let _ = device.destroy_stream(s);
            }
        };
        for _ in 0..3 {
            match device.create_stream() {
                Ok(s) => streams.push(s),
                Err(e) => {
                    undo(&streams);
                    return Err(e);
                }
            }
        }
        let (copy, merge, fence) = (streams[0], streams[1], streams[2]);
        let (pool_tx, pool_rx) = crossbeam_channel::unbounded();
        let (handoff_tx, handoff_rx) = crossbeam_channel::unbounded();
        let counters = Arc::new(Counters::new(cfg.timeline));
        let copy_gate = Arc::new(Gate::default());
        let stager = match cfg.host_policy {
            HostPolicy::Pinned => None,
            HostPolicy::Staged {
                buffers,
                buffer_bytes,
                threads,
                fill_part_bytes,
                write_combined,
            } => {
                let stager = Stager::new(
                    device.clone(),
                    (copy, merge),
                    host::Ring {
                        buffers,
                        buffer_bytes,
                        threads,
                        fill_part_bytes,
                        write_combined,
                    },
                    counters.clone(),
                    cfg.wait_timeout,
                    (pool_tx.clone(), handoff_tx.clone()),
                    copy_gate.clone(),
                );
                match stager {
                    Ok(s) => Some(s),
                    Err(e) => {
                        undo(&streams);
                        return Err(e);
                    }
                }
            }
        };
        let uploader = match &stager {
            Some(_) => None,
            None if !cfg.upload_thread.unwrap_or(info.kind == BackendKind::Cuda) => None,
            None => match Uploader::new(
                device.clone(),
                (copy, merge),
                counters.clone(),
                (pool_tx.clone(), handoff_tx.clone()),
                copy_gate.clone(),
                cfg.wait_timeout,
            ) {
                Ok(u) => Some(u),
                Err(e) => {
                    undo(&streams);
                    return Err(e);
                }
            },
        };
        Ok(Runtime {
            sh: Arc::new(Shared {
                device,
                arena,
                page,
                compute,
                copy,
                merge,
                fence,
                cfg,
                res,
                models: DashMap::new(),
                next_model: AtomicU32::new(0),
                sched: Mutex::new(0),
                pool_tx,
                pool_rx,
                handoff_tx,
                handoff_rx,
                #[cfg(debug_assertions)]
                pooled: Mutex::new(std::collections::HashSet::new()),
                created_events: Mutex::new(Vec::new()),
                counters,
                stalls: StallLog::default(),
                stager,
                uploader,
                lora_mode: Mutex::new(cfg_lora_mode),
                lora_pages: AtomicUsize::new(0),
                copy_gate,
            }),
        })
    }

    /// The configuration with its defaults resolved for this device.
    pub fn resolved(&self) -> &Resolved {
        &self.sh.res
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.sh.device
    }

    /// The arena holding the weights (for accounting).
    pub fn arena(&self) -> &Arena<dyn Device> {
        &self.sh.arena
    }

    /// The runtime's copy stream (uploads run on it).
    pub fn copy_stream(&self) -> StreamId {
        self.sh.copy
    }

    /// Load a model: validate it, read the host copy (pinned policy), and in
    /// mode `none` upload everything. On error nothing stays allocated.
    pub fn load(&self, desc: ModelDesc, source: Arc<dyn WeightSource>) -> Result<ModelId> {
        self.load_with_progress(desc, source, &mut |_, _| {})
    }

    /// [`Runtime::load`], calling `progress(bytes_done, bytes_total)` as the host copy is read.
    pub fn load_with_progress(
        &self,
        desc: ModelDesc,
        source: Arc<dyn WeightSource>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ModelId> {
        let sh = &self.sh;
        let id = ModelId(sh.next_model.fetch_add(1, Ordering::Relaxed));
        let mut comps = Vec::with_capacity(desc.components.len());
        let total_bytes: usize = desc.bytes();
        let mut done_bytes = 0usize;
        let capacity_pages = sh.arena.capacity() / sh.page;
        let mut must_fit = 0usize;
        for (ci, c) in desc.components.iter().enumerate() {
            let mut layer_bytes = Vec::with_capacity(c.layers.len());
            let mut layer_pages = Vec::with_capacity(c.layers.len());
            for (li, l) in c.layers.iter().enumerate() {
                for (ti, t) in l.tensors.iter().enumerate() {
                    if let Some(held) = source.in_memory(ci, li, ti) {
                        if held.len() != t.bytes {
                            return Err(Error::Config(format!(
                                "model {}: tensor {} of layer {}/{}: the source holds {} bytes of it in memory, the description says {}",
                                desc.name, t.name, c.name, l.name, held.len(), t.bytes
                            )));
                        }
                    }
                    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                    let expect = numel.and_then(|n| n.checked_mul(t.dtype.size()));
                    if expect != Some(t.bytes) {
                        return Err(Error::Config(format!(
                            "model {}: tensor {} of layer {}/{}: shape {:?} × {} is {:?} bytes, the description says {}",
                            desc.name, t.name, c.name, l.name, t.shape, t.dtype, expect, t.bytes
                        )));
                    }
                }
                let sizes: Vec<usize> = l.tensors.iter().map(|t| t.bytes).collect();
                let packed = pack(&sizes).ok_or_else(|| {
                    Error::Config(format!(
                        "model {}: layer {}/{} is too large",
                        desc.name, c.name, l.name
                    ))
                })?;
                let total = packed.total.max(1);
                layer_pages.push(total.div_ceil(sh.page));
                layer_bytes.push(LayerBytes {
                    pieces: (0..sizes.len())
                        .map(|i| (i, packed.offsets[i], sizes[i]))
                        .collect(),
                    total,
                });
            }
            let pages: usize = layer_pages.iter().sum();
            if (sh.res.mode == Mode::None && c.pin != Pin::NeverResident)
                || c.pin == Pin::AlwaysResident
            {
                must_fit += pages;
            }
            comps.push((ci, layer_bytes, layer_pages));
        }
        if let Some(limit) = sh.cfg.host_memory_limit {
            // Pinned: the packed host copy of every layer; staged: the staging ring (already held).
            let model_host: usize = match sh.stager {
                None => comps.iter().flat_map(|c| &c.1).map(|lb| lb.total).sum(),
                Some(_) => 0,
            };
            let needed = sh.counters.host_bytes().0.saturating_add(model_host);
            if needed > limit {
                return Err(Error::HostMemory {
                    what: format!(
                        "model {} ({} host policy, with what the runtime already holds)",
                        desc.name, sh.cfg.host_policy
                    ),
                    needed,
                    limit,
                });
            }
        }
        if must_fit > capacity_pages {
            return Err(Error::DoesNotFit {
                what: format!("model {} (everything that must stay resident)", desc.name),
                needed: must_fit * sh.page,
                available: capacity_pages * sh.page,
                mode: sh.res.mode.to_string(),
            });
        }
        let mut built = Vec::with_capacity(comps.len());
        let mut host_bytes = 0usize;
        let cleanup_events = |built: &Vec<CompRt>| {
            for c in built {
                for &e in &c.ready {
                    let _ = sh.device.destroy_event(e);
                }
            }
        };
        for (ci, layer_bytes, layer_pages) in comps {
            let c = &desc.components[ci];
            let mut host = Vec::with_capacity(c.layers.len());
            let mut ready = Vec::with_capacity(c.layers.len());
            let result = (|| -> Result<()> {
                for (li, lb) in layer_bytes.iter().enumerate() {
                    ready.push(sh.device.create_event()?);
                    if sh.stager.is_none() {
                        let mut buf = sh.device.alloc_pinned(lb.total)?;
                        host_bytes += lb.total;
                        sh.counters.host_alloc(lb.total);
                        host::read_layer(&*source, ci, li, lb, buf.as_mut_slice())?;
                        done_bytes += c.layers[li].bytes();
                        progress(done_bytes, total_bytes);
                        host.push(Some(buf));
                    } else {
                        host.push(None);
                    }
                }
                Ok(())
            })();
            let rt = CompRt {
                name: c.name.clone(),
                pin: c.pin,
                layer_names: c
                    .layers
                    .iter()
                    .map(|l| format!("{}/{}", c.name, l.name))
                    .collect(),
                layer_bytes,
                layer_pages,
                ready,
                state: Mutex::new(CompState {
                    started: false,
                    plan: None,
                    order: plan::Order::new(c.layers.len()),
                    layers: (0..c.layers.len()).map(|_| LayerState::new()).collect(),
                    ring: Vec::new(),
                    pages: 0,
                    cap_pages: 0,
                    all_resident: false,
                    unloading: false,
                    swapping: false,
                    clock: 0,
                    last_start: 0,
                    merges: vec![Vec::new(); c.layers.len()],
                    unfused: vec![Vec::new(); c.layers.len()],
                    host,
                }),
            };
            built.push(rt);
            if let Err(e) = result {
                cleanup_events(&built);
                sh.counters.host_free(host_bytes);
                return Err(e);
            }
        }
        let model = Arc::new(ModelRt {
            id,
            desc,
            source,
            comps: built,
            lora: Mutex::new(lora::LoraState::default()),
        });
        sh.models.insert(id.0, model.clone());
        // Components that stay resident are uploaded now.
        for ci in 0..model.comps.len() {
            let pin = model.comps[ci].pin;
            if (sh.res.mode == Mode::None && pin != Pin::NeverResident)
                || pin == Pin::AlwaysResident
            {
                if let Err(e) = sh.start_component(&model, ci) {
                    let _ = self.unload(id);
                    return Err(e);
                }
            }
        }
        Ok(id)
    }

    /// Unload a model: every guard on it must have been dropped. Frees its device and host memory.
    pub fn unload(&self, model: ModelId) -> Result<()> {
        let sh = &self.sh;
        let m = sh.model(model)?;
        // Mark every component under its lock, so no acquire gets through once
        // its component is checked; undo the marks if a layer is in use.
        let unmark = |upto: usize| {
            for c in &m.comps[..upto] {
                c.lock().unloading = false;
            }
        };
        for (ci, c) in m.comps.iter().enumerate() {
            let mut st = c.lock();
            if let Some(l) = st.layers.iter().position(|l| l.users > 0) {
                drop(st);
                unmark(ci);
                return Err(Error::UnknownLayer {
                    model: model.0,
                    component: ci,
                    layer: l,
                    why: "cannot unload: the layer is still acquired".into(),
                });
            }
            st.unloading = true;
        }
        let mut offloaded = Ok(());
        for c in &m.comps {
            let mut st = c.lock();
            if let Err(e) = sh.offload_locked(c, &mut st, true) {
                offloaded = Err(e);
                break;
            }
            // A job still being queued after its wait timed out (offload
            // leaves it be) will still use the layer's host copy, ready
            // event and LoRA factors: the model stays until it is over.
            if let Some(l) = st.layers.iter().position(|x| x.job_pending()) {
                offloaded = Err(Error::Timeout {
                    event: c.ready[l],
                    waited_ms: sh.cfg.wait_timeout.as_millis() as u64,
                });
                break;
            }
        }
        // Queued copies from the host copy must finish before it can be freed;
        // a copy that failed earlier has finished too. (Not after a failure:
        // a job still queueing holds the gate the synchronisation takes.)
        let synced = offloaded.and_then(|()| match sh.sync_copy() {
            Err(Error::StreamFailed { .. }) => Ok(()),
            other => other,
        });
        if let Err(e) = synced {
            unmark(m.comps.len());
            return Err(e);
        }
        sh.drop_loras(&m);
        sh.arena.reclaim_all(Some(sh.cfg.wait_timeout))?;
        sh.models.remove(&model.0);
        for c in &m.comps {
            for &e in &c.ready {
                let _ = sh.device.destroy_event(e);
            }
            let bytes: usize = c.lock().host.iter().flatten().map(|b| b.len()).sum();
            sh.counters.host_free(bytes);
        }
        Ok(())
    }

    /// Acquire a layer: upload it if needed (evicting by policy), prefetch
    /// what follows, order the compute stream's later work after its upload
    /// (a stream wait, unless the upload has already completed), and return
    /// its pointers.
    pub fn acquire(&self, id: LayerId) -> Result<LayerGuard> {
        let sh = &self.sh;
        let model = sh.model(id.model)?;
        let Some(comp) = model.comps.get(id.component) else {
            return Err(Error::UnknownLayer {
                model: id.model.0,
                component: id.component,
                layer: id.layer,
                why: format!("the model has {} components", model.comps.len()),
            });
        };
        if id.layer >= comp.layer_pages.len() {
            return Err(Error::UnknownLayer {
                model: id.model.0,
                component: id.component,
                layer: id.layer,
                why: format!(
                    "component {} has {} layers",
                    comp.name,
                    comp.layer_pages.len()
                ),
            });
        }
        Counters::add(&sh.counters.acquires, 1);
        let mut recorded = false;
        let mut room_tries = 0;
        // Once other components cannot make room, this one's own idle layers may go.
        let mut squeeze = false;
        let mut swap_wait: Option<Instant> = None;
        loop {
            match sh.try_acquire(&model, id, &mut recorded, squeeze) {
                Ok(g) => return Ok(g),
                Err(Attempt::Swapping) => {
                    // `set_loras` is changing the model's weights: wait for it.
                    let since = *swap_wait.get_or_insert_with(Instant::now);
                    if since.elapsed() > sh.cfg.wait_timeout {
                        return Err(Error::Timeout {
                            event: sh.model(id.model)?.comps[id.component].ready[id.layer],
                            waited_ms: sh.cfg.wait_timeout.as_millis() as u64,
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(Attempt::NotStarted) => sh.start_component(&model, id.component)?,
                Err(Attempt::NeedRoom(pages, cause)) => {
                    room_tries += 1;
                    if room_tries > 3 {
                        // The device's own refusal, if that is what stopped us.
                        if let Some(e @ Error::DeviceOutOfMemory { .. }) = cause {
                            return Err(e);
                        }
                        let free = sh.arena.pages_free();
                        return Err(Error::OutOfMemory {
                            requested: pages * sh.page,
                            pages,
                            free: free * sh.page,
                            free_pages: free,
                        });
                    }
                    match sh.make_room(pages, Some((id.model, id.component))) {
                        Ok(()) => {}
                        Err(e) if e.is_retryable_oom() && !squeeze => squeeze = true,
                        Err(e) => return Err(e),
                    }
                }
                Err(Attempt::Fail(e)) => return Err(e),
            }
        }
    }

    /// Hand a guard back: the layer may be evicted once `done` (an event the
    /// engine recorded after its last use of the layer) has fired.
    pub fn release(&self, mut guard: LayerGuard, done: EventId) -> Result<()> {
        guard.armed = false;
        let sh = &self.sh;
        let fenced = (|| -> Result<EventId> {
            sh.device.stream_wait_event(sh.fence, done)?;
            let e = sh.event()?;
            sh.device.record_event(e, sh.fence)?;
            Ok(e)
        })();
        match fenced {
            Ok(e) => {
                sh.finish_release(&guard.model, guard.id, Some((DoneSource::Fence, e)));
                Ok(())
            }
            Err(err) => {
                // Without a fence, wait for the engine's event here.
                let r = sh.device.event_wait(done, Some(sh.cfg.wait_timeout));
                sh.finish_release(&guard.model, guard.id, None);
                r.and(Err(err))
            }
        }
    }

    /// Wait until every upload queued so far (staged reads included) has completed.
    pub fn synchronize(&self) -> Result<()> {
        let sh = &self.sh;
        let models: Vec<Arc<ModelRt>> = sh.models.iter().map(|m| m.clone()).collect();
        for m in models {
            for c in &m.comps {
                let jobs: Vec<Arc<JobDone>> = c
                    .lock()
                    .layers
                    .iter()
                    .filter_map(|l| l.job.clone())
                    .collect();
                for j in jobs {
                    // A failed upload is reported to the acquire that needs it, not here.
                    if let Err(e @ Error::Timeout { .. }) = j.wait(sh.cfg.wait_timeout) {
                        return Err(e);
                    }
                }
            }
        }
        sh.sync_copy()
    }

    /// Apply a LoRA set to `model`, replacing its current set, in the
    /// runtime's [`LoraMode`]; call it between passes (no layer of the model
    /// may be acquired). The whole set is checked before anything changes
    /// (multipliers, targets, factor shapes, the host policy, the device
    /// budget for the factors) and a bad set is an [`Error::Lora`] or
    /// [`Error::DoesNotFit`] that leaves the current set in place. In
    /// fuse-on-upload, a set that patches some tensor also has the device
    /// build its merge kernels first ([`crate::device::Device::prepare`]:
    /// seconds on CUDA when the kernel disk cache does not hold them); a
    /// device that cannot is an error ([`Error::Kernel`], or
    /// [`Error::Unsupported`] without NVRTC) that changes nothing. Only the
    /// tensors whose adapters or multipliers change are re-derived, always
    /// from their pristine bytes; an empty set restores every weight
    /// bit for bit. Blocks until the device copies it changed are ready;
    /// acquires of the model's layers from other threads wait meanwhile.
    ///
    /// A failure after the checks (a device copy or kernel that fails, a
    /// checkpoint that changed on disk while the fuse mode re-reads it)
    /// returns the error with every tensor whole: on the device, the
    /// layers it touched are dropped and derived again at their next
    /// upload; in the backup and fuse modes, the tensors it reached carry
    /// the new set and the rest the old one (each tensor's state is
    /// recorded), and [`Runtime::loras`] reports the new set, so calling
    /// again with it finishes the job.
    pub fn set_loras(&self, model: ModelId, loras: &[LoraBinding]) -> Result<LoraReport> {
        let m = self.sh.model(model)?;
        if self.lora_mode() == LoraMode::FuseOnUpload {
            // Build the merge kernels (seconds on CUDA the first time)
            // before taking the mode lock, which `lora_mode()` and every
            // model's `set_loras` wait on. Errors are left to the checks
            // under the lock, in the mode the call runs in.
            let _ = self.sh.check_lora_set(&m, loras, LoraMode::FuseOnUpload);
        }
        // Held for the call: the mode cannot change under it.
        let mode = self.sh.lora_mode.lock().unwrap_or_else(|p| p.into_inner());
        self.sh.set_loras(&m, loras, *mode)
    }

    /// The LoRA set applied to `model`.
    pub fn loras(&self, model: ModelId) -> Result<Vec<LoraBinding>> {
        let m = self.sh.model(model)?;
        let st = m.lora.lock().unwrap_or_else(|p| p.into_inner());
        Ok(st.bindings.clone())
    }

    /// How LoRA sets are applied now.
    pub fn lora_mode(&self) -> LoraMode {
        *self.sh.lora_mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change how LoRA sets are applied (between passes): each model's set
    /// is taken off in the old mode and applied again in the new one. The
    /// backup and fuse modes need the pinned host policy; unfused takes
    /// low-rank adapters only. Checked for every model before anything
    /// changes; should applying a set in the new mode still fail (factors
    /// that do not fit the device budget), the old mode and sets are put
    /// back and the error returned.
    pub fn set_lora_mode(&self, mode: LoraMode) -> Result<()> {
        let sh = &self.sh;
        let mut current = sh.lora_mode.lock().unwrap_or_else(|p| p.into_inner());
        if *current == mode {
            return Ok(());
        }
        if mode.fuses_host_copy() && sh.stager.is_some() {
            return Err(Error::Config(format!(
                "LoRA mode {mode} keeps a fused host copy and needs the pinned host policy, not {}",
                sh.cfg.host_policy
            )));
        }
        let models: Vec<Arc<ModelRt>> = sh.models.iter().map(|m| m.value().clone()).collect();
        let sets: Vec<Vec<LoraBinding>> = models
            .iter()
            .map(|m| {
                m.lora
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .bindings
                    .clone()
            })
            .collect();
        // Every set checked in the new mode (and, for fuse-on-upload, the
        // merge kernels built) before any is taken off.
        for (m, set) in models.iter().zip(&sets) {
            sh.check_lora_set(m, set, mode)?;
        }
        let old = *current;
        let switched = (|| -> Result<()> {
            for m in &models {
                sh.set_loras(m, &[], old)?;
            }
            *current = mode;
            for (m, set) in models.iter().zip(&sets) {
                sh.set_loras(m, set, mode)?;
            }
            Ok(())
        })();
        if let Err(e) = switched {
            // Back to the old mode and the old sets, as far as they go.
            for m in &models {
                let _ = sh.set_loras(m, &[], *current);
            }
            *current = old;
            for (m, set) in models.iter().zip(&sets) {
                let _ = sh.set_loras(m, set, old);
            }
            return Err(e);
        }
        Ok(())
    }

    /// A snapshot of the counters and memory use. The stall counts the
    /// waits the compute stream has finished (all of them once it has been
    /// synchronised).
    pub fn stats(&self) -> RuntimeStats {
        let sh = &self.sh;
        sh.stalls.resolve(&*sh.device, &sh.counters);
        let a = sh.arena.stats();
        let (host_bytes, peak_host_bytes) = sh.counters.host_bytes();
        let c = &sh.counters;
        RuntimeStats {
            bytes_h2d: c.bytes_h2d.load(Ordering::Relaxed),
            uploads: c.uploads.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            acquires: c.acquires.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            stall_ns: c.stall_ns.load(Ordering::Relaxed),
            stall_unmeasured: c.stall_unmeasured.load(Ordering::Relaxed),
            device_bytes: a.pages_used * a.page_size,
            peak_device_bytes: sh.arena.peak_pages_used() * a.page_size,
            host_bytes,
            peak_host_bytes,
            page_waste_bytes: a.tail_waste,
            merges: c.merges.load(Ordering::Relaxed),
            merged_bytes: c.merged_bytes.load(Ordering::Relaxed),
            lora_device_bytes: sh.lora_pages.load(Ordering::Relaxed) * sh.page,
        }
    }

    /// The instant the timeline's times count from.
    pub fn epoch(&self) -> Instant {
        self.sh.counters.epoch
    }

    /// A point in the compute stream's order: its [`StallCheckpoint::ns`]
    /// is the stall of the waits for weights queued before this call, once
    /// the device has run them and the runtime has read their times (at
    /// [`Runtime::stats`], or at a later acquire that waits). Taken at the
    /// same point as a mark of the engine's own (a timing event, a host
    /// function on the compute stream), it splits the stall as the mark
    /// splits time.
    pub fn stall_checkpoint(&self) -> StallCheckpoint {
        self.sh.stalls.checkpoint(&self.sh.counters)
    }

    /// Restart the peak device and host measurements from the current use.
    pub fn reset_peaks(&self) {
        self.sh.arena.reset_peak();
        self.sh.counters.reset_host_peak();
    }

    /// The per-layer timeline recorded so far (empty unless `timeline` was configured), and clear it.
    pub fn take_timeline(&self) -> Vec<TimelineEntry> {
        match &self.sh.counters.timeline {
            Some(t) => std::mem::take(&mut *t.lock().unwrap_or_else(|p| p.into_inner())),
            None => Vec::new(),
        }
    }

    /// The plan of a component, if it has one: (resident per layer, ring slots, bytes per slot).
    pub fn plan_of(
        &self,
        model: ModelId,
        component: usize,
    ) -> Result<Option<(Vec<bool>, usize, usize)>> {
        let m = self.sh.model(model)?;
        let c = m.comps.get(component).ok_or_else(|| Error::UnknownLayer {
            model: model.0,
            component,
            layer: 0,
            why: "no such component".into(),
        })?;
        let st = c.lock();
        Ok(st
            .plan
            .as_ref()
            .map(|p| (p.resident.clone(), p.slots, p.slot_pages * self.sh.page)))
    }
}

impl Shared {
    /// Synchronise the copy stream and the merge stream, reporting (and
    /// clearing) a failure of work queued on them; never while a job is
    /// queueing its copies: one still queueing after `wait_timeout` is
    /// [`Error::UploadsStuck`], and nothing is synchronised.
    fn sync_copy(&self) -> Result<()> {
        let _gate = self
            .copy_gate
            .exclusive(self.cfg.wait_timeout)
            .ok_or(Error::UploadsStuck {
                waited_ms: self.cfg.wait_timeout.as_millis() as u64,
            })?;
        let copy = self.device.stream_synchronize(self.copy);
        let merge = self.device.stream_synchronize(self.merge);
        copy.and(merge)
    }

    fn model(&self, id: ModelId) -> Result<Arc<ModelRt>> {
        self.models
            .get(&id.0)
            .map(|m| m.clone())
            .ok_or_else(|| Error::UnknownLayer {
                model: id.0,
                component: 0,
                layer: 0,
                why: "the model is not loaded (never loaded, or unloaded)".into(),
            })
    }

    fn event(&self) -> Result<EventId> {
        if let Ok(e) = self.pool_rx.try_recv() {
            #[cfg(debug_assertions)]
            self.pooled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&e);
            return Ok(e);
        }
        self.new_event()
    }

    /// A new event, destroyed with the runtime.
    fn new_event(&self) -> Result<EventId> {
        let e = self.device.create_event()?;
        self.created_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
        Ok(e)
    }

    fn recycle(&self, e: EventId) {
        #[cfg(debug_assertions)]
        assert!(
            self.pooled
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(e),
            "{e:?} went into the event pool twice"
        );
        let _ = self.pool_tx.send(e);
    }

    /// An event for a copy-to-merge hand-off. Hand-offs have their own pool:
    /// they are recorded on the copy stream, and an event from the main pool
    /// may still be watched by the arena (`Arena::free_after`), which relies
    /// on its next recording following the work it covers.
    fn handoff_event(&self) -> Result<EventId> {
        match self.handoff_rx.try_recv() {
            Ok(e) => Ok(e),
            Err(_) => self.new_event(),
        }
    }

    fn recycle_handoff(&self, e: EventId) {
        let _ = self.handoff_tx.send(e);
    }

    fn finish_release(&self, model: &ModelRt, id: LayerId, done: Option<(DoneSource, EventId)>) {
        let comp = &model.comps[id.component];
        let mut st = comp.lock();
        let l = &mut st.layers[id.layer];
        l.users = l.users.saturating_sub(1);
        if let Some((src, e)) = done {
            // A later event of the same source covers the earlier one.
            if let Some(slot) = l.done.iter_mut().find(|(s, _)| *s == src) {
                let old = std::mem::replace(&mut slot.1, e);
                drop(st);
                self.recycle(old);
            } else {
                l.done.push((src, e));
            }
        }
    }

    fn try_acquire(
        self: &Arc<Self>,
        model: &Arc<ModelRt>,
        id: LayerId,
        recorded: &mut bool,
        squeeze: bool,
    ) -> Result<LayerGuard, Attempt> {
        let comp = &model.comps[id.component];
        let mut st = comp.lock();
        if st.unloading {
            return Err(Attempt::Fail(Error::UnknownLayer {
                model: id.model.0,
                component: id.component,
                layer: id.layer,
                why: "the model is being unloaded".into(),
            }));
        }
        if st.swapping {
            return Err(Attempt::Swapping);
        }
        if !st.started {
            return Err(Attempt::NotStarted);
        }
        let l = id.layer;
        if !*recorded {
            *recorded = true;
            let change = st.order.record(l);
            let replan = change == plan::Change::Used
                && self.cfg.policy == Policy::Planned
                && st.plan.is_some()
                && st.layers.iter().all(|x| x.users == 0);
            if replan {
                // Other layers are in use now: plan again from the observed order at the next start.
                self.offload_locked(comp, &mut st, true)?;
                return Err(Attempt::NotStarted);
            }
        }
        st.clock += 1;
        let now = st.clock;
        let depth = self.cfg.prefetch_depth;
        // Wrap around to the next pass only once the component has been seen to repeat.
        let wrap = st.order.passes() > 0;
        let st_ref = &*st;
        let upcoming: Vec<usize> = match &st_ref.plan {
            Some(p) if self.cfg.policy == Policy::Planned => {
                st_ref.order.next_after(l, depth, wrap, |x| !p.resident[x])
            }
            _ => {
                let n = comp.layer_pages.len();
                (1..n)
                    .filter(|d| wrap || l + d < n)
                    .map(|d| (l + d) % n)
                    .take(depth)
                    .collect()
            }
        };
        let mut protected = upcoming.clone();
        protected.push(l);
        // A layer the plan left out (it was skipped when the plan was made)
        // and that fits neither the resident set nor a ring slot: plan again with it.
        let unplanned = st.plan.as_ref().is_some_and(|p| {
            !p.resident[l] && (p.slots == 0 || comp.layer_pages[l] > p.slot_pages)
        });
        if unplanned && st.layers[l].place == Place::Host && st.layers.iter().all(|x| x.users == 0)
        {
            st.order.include(l);
            self.offload_locked(comp, &mut st, true)?;
            return Err(Attempt::NotStarted);
        }
        // A device copy whose upload failed on the copy stream is never handed
        // out: clear the stream's failure, forget the copy, upload again.
        // The same for a staged upload (a prefetch) that failed before.
        // A copy already seen ready (`ready_seen`) has nothing left to check.
        let settled = st.layers[l].place != Place::Host && !st.layers[l].job_pending();
        if settled && !st.layers[l].ready_seen && st.layers[l].users == 0 {
            let job_failed = st.layers[l]
                .job
                .as_ref()
                .is_some_and(|j| j.is_finished() && j.wait(std::time::Duration::ZERO).is_err());
            let failed = job_failed
                || match self.device.event_query(comp.ready[l]) {
                    Ok(done) => {
                        st.layers[l].ready_seen = done;
                        false
                    }
                    Err(e) => matches!(e, Error::StreamFailed { .. }),
                };
            if failed {
                let _ = self.sync_copy();
                self.drop_device_copy(comp, &mut st, l);
            }
        }
        let hit = st.layers[l].place != Place::Host;
        self.ensure_loaded(model, id.component, &mut st, l, &protected, squeeze)?;
        if hit {
            Counters::add(&self.counters.hits, 1);
        }
        st.layers[l].users += 1;
        st.layers[l].last_use = now;
        // Prefetch, best effort: the streamed layers that come next, then resident ones not loaded yet.
        for &u in &upcoming {
            if self
                .ensure_loaded(model, id.component, &mut st, u, &protected, false)
                .is_err()
            {
                break;
            }
            st.layers[u].last_use = now;
        }
        let st_ref = &*st;
        if let Some(p) = &st_ref.plan {
            let pending: Vec<usize> = st_ref.order.next_after(l, depth, wrap, |x| {
                p.resident[x] && st_ref.layers[x].place == Place::Host
            });
            for u in pending {
                if self
                    .ensure_loaded(model, id.component, &mut st, u, &protected, false)
                    .is_err()
                {
                    break;
                }
            }
        }
        let base = match st.layers[l].place {
            Place::Alloc(_, p) => p,
            Place::Slot(s) => st.ring[s].ptr,
            Place::Host => unreachable!("ensure_loaded placed the layer"),
        };
        let job = st.layers[l].job.clone();
        let lora = st.unfused[l].clone();
        // Its upload and merges have completed: no wait to queue. (No
        // recording can come before the guard is dropped: a LoRA set is
        // refused while a guard is out, and eviction skips held layers.)
        let seen = st.layers[l].ready_seen;
        drop(st);
        if let Some(job) = job {
            if let Err(e) = job.wait(self.cfg.wait_timeout) {
                let mut st = comp.lock();
                st.layers[l].users -= 1;
                // A job that failed is over: forget its partial copy, once, if nobody
                // else holds the layer. A job that timed out may still be writing:
                // leave the layer where it is (later waits wait for it again).
                let current = st.layers[l]
                    .job
                    .as_ref()
                    .is_some_and(|j| Arc::ptr_eq(j, &job));
                if job.is_finished() && current && st.layers[l].users == 0 {
                    self.drop_device_copy(comp, &mut st, l);
                }
                return Err(Attempt::Fail(e));
            }
        }
        let ready = comp.ready[l];
        if !seen {
            if let Err(e) = self.wait_on_compute(ready, &comp.layer_names[l]) {
                comp.lock().layers[l].users -= 1;
                return Err(Attempt::Fail(e));
            }
        }
        Ok(LayerGuard {
            sh: self.clone(),
            model: model.clone(),
            id,
            base,
            ready,
            armed: true,
            lora,
        })
    }

    /// Order the compute stream's later work after `ready`, measuring the
    /// wait if configured: timed by events (see `stall`), and with the timeline on,
    /// also bracketed by host functions for its entry, which a GPU stream
    /// pays for (the timeline is for looking, not for timing).
    ///
    /// With the measurement on, a `ready` that has completed is not waited
    /// for at all: the upload and its merges are done on the device, and
    /// work queued after this sees them on every stream; a layer uploaded
    /// ahead of its use then costs the engine's thread one driver call (the
    /// query) instead of two. (An acquire of a copy an earlier acquire saw
    /// ready does not come here: `LayerState::ready_seen`.)
    fn wait_on_compute(&self, ready: EventId, name: &str) -> Result<()> {
        if !self.cfg.measure_stall {
            return self.device.stream_wait_event(self.compute, ready);
        }
        if self.device.event_query(ready).unwrap_or(false) {
            return Ok(());
        }
        let mark = stats::timeline_mark(&*self.device, &self.counters, self.compute);
        self.stalls
            .wait(&*self.device, &self.counters, self.compute, ready)?;
        match mark {
            Some(start) => self.timeline_end(self.compute, start, name.to_string(), "wait", 0),
            None => Ok(()),
        }
    }

    /// Put layer `l` on the device if it is not: into a ring slot (streamed
    /// under a plan) or its own allocation, uploading it.
    fn ensure_loaded(
        &self,
        model: &ModelRt,
        ci: usize,
        st: &mut CompState,
        l: usize,
        protected: &[usize],
        squeeze: bool,
    ) -> Result<(), Attempt> {
        if st.layers[l].place != Place::Host {
            return Ok(());
        }
        let comp = &model.comps[ci];
        let streamed = st
            .plan
            .as_ref()
            .is_some_and(|p| !p.resident[l] && p.slots > 0 && comp.layer_pages[l] <= p.slot_pages);
        if streamed {
            let s = self.pick_slot(comp, st, l, protected)?;
            let mut waits = Vec::new();
            if let Some(job) = st.ring[s].holds.and_then(|o| st.layers[o].job.clone()) {
                // Our own upload into the slot must be queued before the next one;
                // if it is still running the slot cannot be reused.
                let _ = job.wait(self.cfg.wait_timeout);
                if !job.is_finished() {
                    return Err(Attempt::Fail(Error::Timeout {
                        event: comp.ready[st.ring[s].holds.unwrap_or(l)],
                        waited_ms: self.cfg.wait_timeout.as_millis() as u64,
                    }));
                }
            }
            // The last upload into the slot may have merges still running on
            // the merge stream. A user's done event follows them (it was
            // recorded after the compute stream waited for the ready event,
            // or after the host saw that event complete),
            // so the copy stream's wait for it orders the copy; with no
            // user, wait here, before the slot changes hands.
            if let Some(o) = st.ring[s].last.filter(|&o| o != l) {
                let used = st.ring[s].holds == Some(o) && !st.layers[o].done.is_empty();
                if st.layers[o].ready_on_merge && !used {
                    self.wait_merged(comp.ready[o]).map_err(Attempt::Fail)?;
                }
            }
            if let Some(o) = st.ring[s].holds.take() {
                waits = st.layers[o].done.drain(..).map(|(_, e)| e).collect();
                st.layers[o].place = Place::Host;
                st.layers[o].job = None;
            }
            st.ring[s].holds = Some(l);
            // From here the slot's last writer is `l`: whatever its upload
            // queues, even if it fails part-way, comes before `l`'s ready event.
            st.ring[s].last = Some(l);
            st.layers[l].place = Place::Slot(s);
            let dst = st.ring[s].ptr;
            if let Err(e) = self.upload(model, ci, st, l, dst, waits) {
                st.ring[s].holds = None;
                st.layers[l].place = Place::Host;
                return Err(Attempt::Fail(e));
            }
            return Ok(());
        }
        let pages = comp.layer_pages[l];
        let mut cause = None;
        loop {
            let over_cap = st.cap_pages > 0 && st.pages + pages > st.cap_pages;
            let attempt = if over_cap {
                None
            } else {
                match self.arena.alloc(comp.layer_bytes[l].total, Tag(model.id.0)) {
                    Ok(a) => Some(a),
                    Err(e) if e.is_retryable_oom() => {
                        cause = Some(e);
                        None
                    }
                    Err(e) => return Err(Attempt::Fail(e)),
                }
            };
            if let Some(a) = attempt {
                let ptr = self.arena.ptr(a)?;
                st.pages += pages;
                st.layers[l].place = Place::Alloc(a, ptr);
                if let Err(e) = self.upload(model, ci, st, l, ptr, Vec::new()) {
                    self.drop_device_copy(comp, st, l);
                    return Err(Attempt::Fail(e));
                }
                return Ok(());
            }
            // No room: evict this component's least recently used idle layer;
            // for the layer being acquired, a prefetched one if nothing else.
            let current = protected.last() == Some(&l);
            let unused = |v: usize| {
                let s = &st.layers[v];
                v != l && matches!(s.place, Place::Alloc(..)) && s.users == 0
            };
            let idle = |v: usize| unused(v) && !st.layers[v].job_pending();
            let lru = |f: &dyn Fn(usize) -> bool| {
                (0..st.layers.len())
                    .filter(|&v| f(v))
                    .min_by_key(|&v| st.layers[v].last_use)
            };
            // Then, for the layer being acquired: a prefetched layer, and last
            // a layer whose staged upload is still being queued (evict waits for it).
            let victim = lru(&|v| idle(v) && !protected.contains(&v))
                .or_else(|| if current { lru(&idle) } else { None })
                .or_else(|| if current { lru(&unused) } else { None });
            let own_evict =
                over_cap || squeeze || (self.cfg.policy == Policy::Lru && !st.all_resident);
            match victim {
                Some(v) if own_evict => self.evict(comp, st, v)?,
                _ if over_cap => {
                    return Err(Attempt::Fail(Error::AllInUse {
                        component: comp.name.clone(),
                        in_use: st.layers.iter().filter(|s| s.users > 0).count(),
                    }))
                }
                _ => return Err(Attempt::NeedRoom(pages, cause)),
            }
        }
    }

    /// A ring slot for streamed layer `l`: an empty one, else the one whose
    /// layer is needed farthest in the future among those not in use and not
    /// about to be used. For the layer being acquired (not a prefetch), a
    /// prefetched layer that is not in use may be displaced as a last resort.
    fn pick_slot(
        &self,
        comp: &CompRt,
        st: &CompState,
        l: usize,
        protected: &[usize],
    ) -> Result<usize, Attempt> {
        if let Some(s) = st.ring.iter().position(|s| s.holds.is_none()) {
            return Ok(s);
        }
        let idle = |o: usize| st.layers[o].users == 0 && !st.layers[o].job_pending();
        let farthest = |allow_protected: bool| {
            st.ring
                .iter()
                .enumerate()
                .filter_map(|(s, slot)| slot.holds.map(|o| (s, o)))
                .filter(|&(_, o)| o != l && idle(o) && (allow_protected || !protected.contains(&o)))
                .max_by_key(|&(_, o)| st.order.distance(l, o))
                .map(|(s, _)| s)
        };
        let current = protected.last() == Some(&l);
        // Last resort for the layer being acquired: a slot whose staged upload
        // is still being queued (the caller waits for it).
        let queued = || {
            st.ring
                .iter()
                .enumerate()
                .filter_map(|(s, slot)| slot.holds.map(|o| (s, o)))
                .filter(|&(_, o)| o != l && st.layers[o].users == 0)
                .max_by_key(|&(_, o)| st.order.distance(l, o))
                .map(|(s, _)| s)
        };
        farthest(false)
            .or_else(|| if current { farthest(true) } else { None })
            .or_else(|| if current { queued() } else { None })
            .ok_or_else(|| {
                Attempt::Fail(Error::AllInUse {
                    component: comp.name.clone(),
                    in_use: st
                        .ring
                        .iter()
                        .filter(|s| s.holds.is_some_and(|o| !idle(o)))
                        .count(),
                })
            })
    }

    /// Queue the upload of layer `l` to `dst` after `waits` (events of the
    /// previous contents' users). `waits` are this call's on every path: queued
    /// on the copy stream and recycled, handed to the staged job, or, on a
    /// failure before they are queued, waited for on the host and recycled.
    ///
    /// Without merges the ready event is recorded on the copy stream after
    /// the copy. With fuse-on-upload merges the copy hands over to the merge
    /// stream through an event, the merges run there and the ready event is
    /// recorded after them, so the next upload does not wait for this
    /// layer's merges. With a stager or an uploader, their thread queues
    /// all of it, not this one, and the layer's job says when it has.
    fn upload(
        &self,
        model: &ModelRt,
        ci: usize,
        st: &mut CompState,
        l: usize,
        dst: DevicePtr,
        waits: Vec<EventId>,
    ) -> Result<()> {
        let comp = &model.comps[ci];
        let ready = comp.ready[l];
        let total = comp.layer_bytes[l].total;
        // The event is recorded again below (or by a job).
        let seen = std::mem::replace(&mut st.layers[l].ready_seen, false);
        // Each recording of a ready event must follow the previous one (the
        // arena frees pages behind it). Waited for here, not by the copy
        // stream: a merge that failed is over too, and a stream that waits
        // for a failed recording would fail with it. (Nothing to wait for
        // where an acquire saw the previous one complete.)
        if st.layers[l].ready_on_merge && !seen {
            if let Err(e) = self.wait_merged(ready) {
                self.give_back(waits);
                return Err(e);
            }
        }
        let merges = !st.merges[l].is_empty();
        // A stager's or the uploader's job hands its copies over to the merge
        // stream through an event of its own.
        let queued_elsewhere = self.stager.is_some() || self.uploader.is_some();
        let handoff = match (merges && queued_elsewhere)
            .then(|| self.handoff_event())
            .transpose()
        {
            Ok(h) => h,
            Err(e) => {
                self.give_back(waits);
                return Err(e);
            }
        };
        if let Some(stager) = &self.stager {
            let done = Arc::new(JobDone::default());
            st.layers[l].job = Some(done.clone());
            st.layers[l].ready_on_merge = merges;
            stager.submit(Job {
                source: model.source.clone(),
                component: ci,
                layer: l,
                name: comp.layer_names[l].clone(),
                bytes: comp.layer_bytes[l].clone(),
                dst,
                waits,
                merges: st.merges[l].clone(),
                handoff,
                ready,
                done,
            });
            return Ok(());
        }
        if let Some(up) = &self.uploader {
            let host = st.host[l]
                .as_ref()
                .expect("pinned policy keeps a host copy of every layer");
            let done = Arc::new(JobDone::default());
            let job = UploadJob {
                name: comp.layer_names[l].clone(),
                src: HostSrc(host.as_ptr()),
                len: total,
                dst,
                waits,
                merges: st.merges[l].clone(),
                handoff,
                ready,
                done: done.clone(),
            };
            if let Err(job) = up.submit(job) {
                // The uploader stops only when the runtime drops; nothing of
                // the job was queued.
                if let Some(h) = job.handoff {
                    self.recycle_handoff(h);
                }
                self.give_back(job.waits);
                return Err(Error::Kernel {
                    kernel: "upload",
                    message: "the runtime's uploader thread has stopped".into(),
                });
            }
            st.layers[l].job = Some(done);
            st.layers[l].ready_on_merge = merges;
            // Counted as queued here, as on this thread, so that the
            // counters after a call include what it queued.
            Counters::add(&self.counters.bytes_h2d, total as u64);
            Counters::add(&self.counters.uploads, 1);
            lora::count_merges(&self.counters, &st.merges[l]);
            return Ok(());
        }
        if let Some(e) = waits
            .iter()
            .find_map(|&e| self.device.stream_wait_event(self.copy, e).err())
        {
            self.give_back(waits);
            return Err(e);
        }
        // Queued: the waits captured the recordings, so the events may be
        // reused, and any copy into `dst` from now on follows them.
        for e in waits {
            self.recycle(e);
        }
        let host = st.host[l]
            .as_ref()
            .expect("pinned policy keeps a host copy of every layer");
        let start = match self.counters.timeline {
            Some(_) => Some(stats::stream_mark(&*self.device, self.copy)?),
            None => None,
        };
        // SAFETY: the host copy lives in the model, which outlives every
        // upload from it: unloading and dropping the runtime synchronise the
        // copy stream before freeing host copies.
        unsafe {
            self.device
                .copy_h2d_async(dst, host.as_ptr(), total, self.copy)?
        };
        // The ready event must follow the copy even when the merges cannot
        // be handed over: the caller frees the pages behind it.
        st.layers[l].ready_on_merge = merges;
        let queued = if merges {
            self.merge_after_copy(&st.merges[l], dst, ready, &comp.layer_names[l])
        } else {
            self.device.record_event(ready, self.copy)
        };
        if let Some(start) = start {
            let name = comp.layer_names[l].clone();
            let ended = self.timeline_end(self.copy, start, name, "upload", total);
            queued.and(ended)?;
        } else {
            queued?;
        }
        Counters::add(&self.counters.bytes_h2d, total as u64);
        Counters::add(&self.counters.uploads, 1);
        Ok(())
    }

    /// Events of users that no queued work waits for: wait for them on the
    /// host (whatever the outcome), then reuse them.
    fn give_back(&self, waits: Vec<EventId>) {
        for w in waits {
            let _ = self.device.event_wait(w, Some(self.cfg.wait_timeout));
            self.recycle(w);
        }
    }

    /// Wait on the host until the work behind ready event `e` is over. A
    /// failed recording counts as over (the failure is the upload's, which
    /// is handled where it is used); only a timeout is an error.
    fn wait_merged(&self, e: EventId) -> Result<()> {
        match self.device.event_wait(e, Some(self.cfg.wait_timeout)) {
            Ok(()) | Err(Error::StreamFailed { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Queue a host function on `stream` that adds a timeline entry from the
    /// time `start` holds (set by an earlier host function) to when it runs.
    fn timeline_end(
        &self,
        stream: StreamId,
        start: stats::StreamMark,
        layer: String,
        kind: &'static str,
        bytes: usize,
    ) -> Result<()> {
        stats::end_on(
            &*self.device,
            &self.counters,
            stream,
            start,
            layer,
            kind,
            bytes,
        )
    }

    /// After the copy just queued on the copy stream (on this thread: no
    /// uploader, see `RuntimeConfig::upload_thread`), queue `merges` on
    /// `dst` on the merge stream and record `ready` there; `ready` is
    /// recorded after the copy whatever fails (on the copy stream if the
    /// hand-over could not be queued).
    fn merge_after_copy(
        &self,
        merges: &[(usize, Arc<MergeOp>)],
        dst: DevicePtr,
        ready: EventId,
        layer: &str,
    ) -> Result<()> {
        let h = match self.handoff_event() {
            Ok(h) => h,
            Err(e) => {
                self.device.record_event(ready, self.copy)?;
                return Err(e);
            }
        };
        let r = host::finish_upload(
            &*self.device,
            (self.copy, self.merge),
            &self.counters,
            true,
            host::LayerMerges {
                merges,
                handoff: Some(h),
                dst,
                name: layer,
                count: true,
            },
            ready,
        );
        // Queued (or never recorded): the event may be reused.
        self.recycle_handoff(h);
        r
    }

    /// Wait for the users of layer `l` (its own allocation) and free it.
    fn evict(&self, comp: &CompRt, st: &mut CompState, l: usize) -> Result<()> {
        // A staged upload still being queued must be queued before the pages
        // are freed behind its ready event.
        if let Some(j) = st.layers[l].job.clone() {
            let _ = j.wait(self.cfg.wait_timeout);
            if !j.is_finished() {
                return Err(Error::Timeout {
                    event: comp.ready[l],
                    waited_ms: self.cfg.wait_timeout.as_millis() as u64,
                });
            }
        }
        for (_, e) in std::mem::take(&mut st.layers[l].done) {
            self.device.event_wait(e, Some(self.cfg.wait_timeout))?;
            self.recycle(e);
        }
        self.drop_device_copy(comp, st, l);
        Counters::add(&self.counters.evictions, 1);
        Ok(())
    }

    /// Forget layer `l`'s device copy (its users must be done; a queued upload may still run).
    /// A job still queueing its upload is waited for first; if it is still
    /// queueing after the wait times out, the copy stays (the job will
    /// write its pages, read its host copy and record the ready event they
    /// are freed behind), and whoever meets the job later waits again.
    /// Returns whether the copy was dropped.
    fn drop_device_copy(&self, comp: &CompRt, st: &mut CompState, l: usize) -> bool {
        if let Some(j) = st.layers[l].job.clone() {
            let _ = j.wait(self.cfg.wait_timeout);
            if !j.is_finished() {
                return false;
            }
        }
        debug_assert_eq!(
            st.layers[l].users, 0,
            "{}: a held layer's device copy is never dropped",
            comp.layer_names[l]
        );
        // Users that may still read the copy are waited for: nothing else would
        // carry their events to whatever goes there next.
        for (_, e) in std::mem::take(&mut st.layers[l].done) {
            let _ = self.device.event_wait(e, Some(self.cfg.wait_timeout));
            self.recycle(e);
        }
        match st.layers[l].place {
            Place::Alloc(a, _) => {
                // Its upload may still be queued: the pages are reused only
                // after the ready event (recorded after the copy and its
                // merges) fires. Later recordings of that event fire after
                // this one: on the same stream, or, before one moves from the
                // merge stream to the copy stream, `upload` waits for it.
                if self.arena.free_after(a, comp.ready[l]).is_err() {
                    let _ = self
                        .device
                        .event_wait(comp.ready[l], Some(self.cfg.wait_timeout));
                    let _ = self.arena.free(a);
                }
                st.pages -= comp.layer_pages[l];
            }
            Place::Slot(s) => st.ring[s].holds = None,
            Place::Host => {}
        }
        st.layers[l].place = Place::Host;
        st.layers[l].job = None;
        true
    }

    /// Give back a component's device memory: idle layers, and the ring if
    /// no slot is in use. `all` also forgets its plan, so the next acquire re-plans.
    fn offload_locked(&self, comp: &CompRt, st: &mut CompState, all: bool) -> Result<()> {
        // Staged uploads still being queued are ours, not users': let them finish.
        for l in 0..st.layers.len() {
            if let Some(j) = st.layers[l].job.clone() {
                let failed = j.wait(self.cfg.wait_timeout).is_err();
                // A failed job is over and its copy useless; one still running stays busy.
                if failed && j.is_finished() && st.layers[l].users == 0 {
                    self.drop_device_copy(comp, st, l);
                }
            }
        }
        let busy = |s: &LayerState| s.users > 0 || s.job_pending();
        for l in 0..st.layers.len() {
            if matches!(st.layers[l].place, Place::Alloc(..)) && !busy(&st.layers[l]) {
                self.evict(comp, st, l)?;
            }
        }
        let ring_busy = st
            .ring
            .iter()
            .any(|s| s.holds.is_some_and(|o| busy(&st.layers[o])));
        if !ring_busy {
            for s in 0..st.ring.len() {
                if let Some(o) = st.ring[s].holds.take() {
                    for (_, e) in std::mem::take(&mut st.layers[o].done) {
                        self.device.event_wait(e, Some(self.cfg.wait_timeout))?;
                        self.recycle(e);
                    }
                    st.layers[o].place = Place::Host;
                    st.layers[o].job = None;
                }
            }
            for slot in std::mem::take(&mut st.ring) {
                // The last upload into the slot may still be queued: free after its ready event.
                let freed = match slot.last {
                    Some(o) => self.arena.free_after(slot.alloc, comp.ready[o]),
                    None => self.arena.free(slot.alloc),
                };
                if freed.is_err() {
                    // Behind that upload all the same: its ready event, or
                    // the whole copy stream.
                    let waited = slot.last.is_some_and(|o| {
                        self.device
                            .event_wait(comp.ready[o], Some(self.cfg.wait_timeout))
                            .is_ok()
                    });
                    if !waited {
                        let _ = self.sync_copy();
                    }
                    let _ = self.arena.free(slot.alloc);
                }
                st.pages -= st.plan.as_ref().map_or(0, |p| p.slot_pages);
            }
        }
        let anything_left =
            st.ring.len() + st.layers.iter().filter(|s| s.place != Place::Host).count();
        let ring_gone = st.plan.as_ref().is_some_and(|p| p.slots > 0) && st.ring.is_empty();
        if (anything_left == 0 && (all || comp.pin != Pin::AlwaysResident)) || ring_gone {
            // The next acquire plans again and allocates a new ring; layers
            // still resident stay (and count in `pages`).
            st.started = false;
            st.plan = None;
        }
        Ok(())
    }

    /// Offload other components (least recently started first) until `pages` pages are free.
    fn make_room(&self, pages: usize, except: Option<(ModelId, usize)>) -> Result<()> {
        let _g = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        self.make_room_locked(pages, except, None)
    }

    fn victims(&self, except: Option<(ModelId, usize)>) -> Vec<(u64, Arc<ModelRt>, usize)> {
        let mut v = Vec::new();
        for m in self.models.iter() {
            for (ci, c) in m.comps.iter().enumerate() {
                if Some((m.id, ci)) == except
                    || c.pin == Pin::AlwaysResident
                    || self.res.mode == Mode::None
                {
                    continue;
                }
                let st = c.lock();
                if st.pages > 0 {
                    v.push((st.last_start, m.clone(), ci));
                }
            }
        }
        v.sort_by_key(|(t, m, ci)| (*t, m.id, *ci));
        v
    }

    /// With the scheduler lock held: offload others until `pages` are free
    /// (or, with `down_to`, until use is at most that many pages).
    fn make_room_locked(
        &self,
        pages: usize,
        except: Option<(ModelId, usize)>,
        down_to: Option<usize>,
    ) -> Result<()> {
        let done = |s: &Self| match down_to {
            Some(limit) => s.arena.pages_used() <= limit,
            None => s.arena.pages_free() >= pages,
        };
        if done(self) {
            return Ok(());
        }
        for (_, m, ci) in self.victims(except) {
            let c = &m.comps[ci];
            let mut st = c.lock();
            self.offload_locked(c, &mut st, false)?;
            drop(st);
            if done(self) {
                return Ok(());
            }
            // Pages whose uploads are still queued come back when those finish.
            if self.arena.pages_deferred() > 0 {
                self.arena.reclaim_all(Some(self.cfg.wait_timeout))?;
                if done(self) {
                    return Ok(());
                }
            }
        }
        // Pages freed behind uploads still in flight come back when those finish.
        if down_to.is_some() {
            if self.arena.pages_deferred() > 0 {
                self.arena.reclaim_all(Some(self.cfg.wait_timeout))?;
            }
            return Ok(());
        }
        if self.arena.pages_deferred() > 0 {
            self.arena.reclaim_all(Some(self.cfg.wait_timeout))?;
            if done(self) {
                return Ok(());
            }
        }
        let free = self.arena.pages_free();
        Err(Error::OutOfMemory {
            requested: pages * self.page,
            pages,
            free: free * self.page,
            free_pages: free,
        })
    }

    /// Plan component `ci` and allocate its ring (and, in model mode or when
    /// pinned resident, upload all of it), making room by offloading others.
    fn start_component(&self, model: &Arc<ModelRt>, ci: usize) -> Result<()> {
        let mut clock = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        let comp = &model.comps[ci];
        let st = comp.lock();
        if st.started {
            return Ok(());
        }
        // LoRA factors on the device come out of every component's budget.
        let lora_pages = self.lora_pages.load(Ordering::Relaxed);
        let capacity = (self.arena.capacity() / self.page).saturating_sub(lora_pages);
        // A never-resident component streams in every mode, an always-resident one never does.
        let all_resident = (matches!(self.res.mode, Mode::None | Mode::Model)
            && comp.pin != Pin::NeverResident)
            || comp.pin == Pin::AlwaysResident;
        let total = comp.pages_total();
        let (plan, cap) = if all_resident {
            if total > capacity {
                return Err(Error::DoesNotFit {
                    what: format!("component {} of model {}", comp.name, model.desc.name),
                    needed: total * self.page,
                    available: capacity * self.page,
                    mode: self.res.mode.to_string(),
                });
            }
            (None, total)
        } else {
            let sequential = self.res.mode == Mode::Sequential || comp.pin == Pin::NeverResident;
            let budget = if sequential {
                capacity
            } else {
                (self.res.high / self.page).min(capacity)
            };
            let depth = self.cfg.prefetch_depth;
            match self.cfg.policy {
                Policy::Planned => {
                    let p = plan::plan(
                        &comp.layer_pages,
                        &st.order.used(),
                        budget,
                        depth,
                        sequential,
                        self.page,
                    )?;
                    // Layers outside the plan (a changed order) get their own
                    // allocations within the same budget.
                    (Some(p), budget)
                }
                Policy::Lru => {
                    let largest = comp.layer_pages.iter().copied().max().unwrap_or(0);
                    if largest > budget {
                        return Err(Error::BudgetTooSmall {
                            budget: budget * self.page,
                            largest_layer: largest * self.page,
                        });
                    }
                    let cap = if sequential {
                        depth.saturating_add(1).saturating_mul(largest).min(budget)
                    } else {
                        budget
                    };
                    (None, cap)
                }
            }
        };
        let ring_pages = plan.as_ref().map_or(0, |p| p.slots * p.slot_pages);
        let need_now = if all_resident { total } else { ring_pages };
        drop(st);
        // Offload others: down to the low watermark (balanced), everything idle (sequential), then what this start needs.
        let me = Some((model.id, ci));
        match self.res.mode {
            Mode::Balanced if self.arena.pages_used() * self.page > self.res.low => {
                self.make_room_locked(0, me, Some(self.res.low / self.page))?
            }
            Mode::Sequential => self.make_room_locked(0, me, Some(0))?,
            _ => {}
        }
        self.make_room_locked(need_now, me, None)?;
        let mut st = comp.lock();
        if st.started {
            return Ok(());
        }
        let mut ring = Vec::new();
        if let Some(p) = &plan {
            for _ in 0..p.slots {
                match self.arena.alloc(p.slot_pages * self.page, Tag(model.id.0)) {
                    Ok(a) => ring.push(Slot {
                        alloc: a,
                        ptr: self.arena.ptr(a)?,
                        holds: None,
                        last: None,
                    }),
                    Err(e) => {
                        for s in ring {
                            let _ = self.arena.free(s.alloc);
                        }
                        return Err(e);
                    }
                }
            }
        }
        *clock += 1;
        st.pages += ring_pages;
        st.ring = ring;
        st.plan = plan;
        st.cap_pages = cap;
        st.all_resident = all_resident;
        st.last_start = *clock;
        st.started = true;
        if all_resident {
            for l in 0..comp.layer_pages.len() {
                match self.ensure_loaded(model, ci, &mut st, l, &[], false) {
                    Ok(()) => {}
                    Err(Attempt::Fail(e)) => return Err(e),
                    Err(Attempt::NeedRoom(_, Some(e @ Error::DeviceOutOfMemory { .. }))) => {
                        return Err(e)
                    }
                    Err(_) => {
                        let free = self.arena.pages_free();
                        return Err(Error::OutOfMemory {
                            requested: comp.layer_pages[l] * self.page,
                            pages: comp.layer_pages[l],
                            free: free * self.page,
                            free_pages: free,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Work queued on our memory must finish before it is freed.
        let _ = self.device.stream_synchronize(self.compute);
        let _ = self.device.stream_synchronize(self.fence);
        self.stalls.destroy(&*self.device);
        let _ = self.sync_copy();
        self.stager = None;
        self.uploader = None;
        let _ = self.sync_copy();
        for m in self.models.iter() {
            for c in &m.comps {
                for &e in &c.ready {
                    let _ = self.device.destroy_event(e);
                }
            }
        }
        self.models.clear();
        for e in std::mem::take(
            &mut *self
                .created_events
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            let _ = self.device.destroy_event(e);
        }
        let _ = self.device.destroy_stream(self.copy);
        let _ = self.device.destroy_stream(self.merge);
        let _ = self.device.destroy_stream(self.fence);
    }
}
