//! One component's residency state and the decisions made under its lock:
//! what to load, which ring slot or resident allocation it goes to, what to
//! prefetch, what to evict.

use std::sync::{Arc, Mutex, MutexGuard};

use super::host::{JobDone, LayerBytes};
use super::plan::{Order, Plan};
use crate::arena::AllocId;
use crate::device::{DevicePtr, EventId, MergeOp};
use crate::model::Pin;

/// Where a layer's device copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// Only on the host.
    Host,
    /// In its own allocation.
    Alloc(AllocId, DevicePtr),
    /// In a ring slot.
    Slot(usize),
}

/// Where a done event came from: events from one source complete in the
/// order they were recorded, so only the latest of each needs keeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DoneSource {
    /// Recorded on the engine's compute stream (a dropped guard).
    Compute,
    /// Recorded on the runtime's fence stream after an engine-given event.
    Fence,
}

#[derive(Debug)]
pub(crate) struct LayerState {
    pub(crate) place: Place,
    /// Live guards.
    pub(crate) users: usize,
    /// Events that fire when the users so far are done with the device copy.
    pub(crate) done: Vec<(DoneSource, EventId)>,
    pub(crate) last_use: u64,
    /// An upload being queued by one of the runtime's threads: a staged
    /// upload, or a pinned one on the uploader thread.
    pub(crate) job: Option<Arc<JobDone>>,
    /// The last recording of the layer's ready event was queued on the
    /// merge stream (after fuse-on-upload merges), not on the copy stream:
    /// the copy stream must wait for it before it writes where that merge
    /// wrote, or records the event again.
    pub(crate) ready_on_merge: bool,
    /// The last recording of the layer's ready event has been seen
    /// complete, without a failure, by an acquire: later acquires of the
    /// same device copy neither query nor wait for it. Cleared wherever the
    /// event is recorded again (`upload`, a LoRA set re-deriving the copy).
    pub(crate) ready_seen: bool,
}

impl LayerState {
    pub(crate) fn new() -> Self {
        LayerState {
            place: Place::Host,
            users: 0,
            done: Vec::new(),
            last_use: 0,
            job: None,
            ready_on_merge: false,
            ready_seen: false,
        }
    }

    /// Whether the layer's upload job (staged, or on the uploader) is still
    /// being queued.
    pub(crate) fn job_pending(&self) -> bool {
        self.job.as_ref().is_some_and(|j| !j.is_finished())
    }
}

#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) alloc: AllocId,
    pub(crate) ptr: DevicePtr,
    pub(crate) holds: Option<usize>,
    /// The layer uploaded into the slot last (its ready event covers every copy into it).
    pub(crate) last: Option<usize>,
}

/// Mutable state of a component, behind its own lock.
#[derive(Debug)]
pub(crate) struct CompState {
    pub(crate) started: bool,
    pub(crate) plan: Option<Plan>,
    pub(crate) order: Order,
    pub(crate) layers: Vec<LayerState>,
    pub(crate) ring: Vec<Slot>,
    /// Pages of this component's resident allocations and ring slots.
    pub(crate) pages: usize,
    /// Most pages the component may hold (LRU policy and model mode).
    pub(crate) cap_pages: usize,
    /// Every layer stays resident (mode none or model, or pinned resident).
    pub(crate) all_resident: bool,
    /// The model is being unloaded: acquires are refused.
    pub(crate) unloading: bool,
    /// The model's LoRA set is being changed: acquires wait.
    pub(crate) swapping: bool,
    pub(crate) clock: u64,
    pub(crate) last_start: u64,
    /// Pinned host copy of each layer, packed as on the device (pinned
    /// policy); fused with the LoRA set in the backup and fuse modes.
    pub(crate) host: Vec<Option<crate::device::PinnedBuffer>>,
    /// Per layer, the LoRA merges each upload runs (fuse-on-upload):
    /// (offset of the tensor in the layer, merge).
    pub(crate) merges: Vec<Vec<(usize, Arc<MergeOp>)>>,
    /// Per layer, the LoRA factors handed to the engine (unfused): (tensor index, merge).
    pub(crate) unfused: Vec<Vec<(usize, Arc<MergeOp>)>>,
}

/// A component of a loaded model.
pub(crate) struct CompRt {
    pub(crate) name: String,
    pub(crate) pin: Pin,
    pub(crate) layer_names: Vec<String>,
    pub(crate) layer_bytes: Vec<LayerBytes>,
    pub(crate) layer_pages: Vec<usize>,
    pub(crate) ready: Vec<EventId>,
    pub(crate) state: Mutex<CompState>,
}

impl CompRt {
    pub(crate) fn lock(&self) -> MutexGuard<'_, CompState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn pages_total(&self) -> usize {
        self.layer_pages.iter().sum()
    }
}
