//! The merger: a thread of the runtime that queues the fuse-on-upload merges
//! of pinned uploads, so that building and launching a layer's merges does
//! not add to the thread that acquires layers (the engine's, which on a GPU
//! also queues the layer compute: at small layers a pass is bound by that
//! thread, and a LoRA set's merges would add to it).
//!
//! The engine's thread still queues the layer's copy and records a hand-off
//! event after it on the copy stream; the merger makes the merge stream wait
//! for that event, queues the merges there and records the layer's ready
//! event after them. The layer carries the job's [`JobDone`] as a staged
//! upload does, and every path that waits for a staged job (acquire,
//! eviction, a slot changing hands, `set_loras`, `synchronize`, unload)
//! waits for it the same way.

use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::host::{queue_merges, JobDone};
use super::stats::Counters;
use crate::device::{Device, DevicePtr, EventId, MergeOp, StreamId};
use crate::error::{Error, Result};

/// One layer's merges, after its copy.
pub(crate) struct MergeJob {
    /// The layer's name (timeline entries).
    pub(crate) name: String,
    /// Where the layer was copied to.
    pub(crate) dst: DevicePtr,
    /// (offset of the tensor in the layer, merge), as for a staged job.
    pub(crate) merges: Vec<(usize, Arc<MergeOp>)>,
    /// Recorded on the copy stream after the layer's copy; given back to
    /// the runtime's hand-off pool once the merge stream waits for it.
    pub(crate) handoff: EventId,
    /// Recorded after the merges on the merge stream (after the copy on the
    /// copy stream if the hand-over cannot be queued).
    pub(crate) ready: EventId,
    /// Finished once the merges and the ready event are queued, or failed.
    pub(crate) done: Arc<JobDone>,
}

/// The merger thread and its queue; dropping it finishes the jobs already
/// submitted and joins the thread.
pub(crate) struct Merger {
    tx: Option<Sender<MergeJob>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Merger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger").finish_non_exhaustive()
    }
}

impl Merger {
    /// Start the thread. `streams` are the runtime's (copy, merge) streams;
    /// `handoffs` takes the hand-off events back; jobs are queued under the
    /// read side of `gate` (see `Shared::copy_gate`).
    pub(crate) fn new(
        device: Arc<dyn Device>,
        streams: (StreamId, StreamId),
        counters: Arc<Counters>,
        handoffs: Sender<EventId>,
        gate: Arc<RwLock<()>>,
    ) -> Result<Merger> {
        let (tx, rx) = crossbeam_channel::unbounded::<MergeJob>();
        let thread = std::thread::Builder::new()
            .name("offload-merger".into())
            .spawn(move || {
                for job in rx {
                    // A panic (a bug below) must not leave the job, and every
                    // layer waiting for it, pending for good.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _queueing = gate.read().unwrap_or_else(|p| p.into_inner());
                        run(&*device, streams, &job, &counters)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Kernel {
                            kernel: "merge",
                            message: format!("queueing the merges of {} panicked", job.name),
                        })
                    });
                    let _ = handoffs.send(job.handoff);
                    job.done.finish(r);
                }
            })
            .map_err(|e| Error::os("spawn merger thread", e))?;
        Ok(Merger {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queue a job; the job back if the thread has stopped (nothing of it
    /// was queued).
    pub(crate) fn submit(&self, job: MergeJob) -> std::result::Result<(), Box<MergeJob>> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }
}

impl Drop for Merger {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hand the copy over to the merge stream, queue the merges there and
/// record the ready event after them. The ready event is recorded whatever
/// fails, after the copy: whoever drops the layer frees its pages behind it.
fn run(
    device: &dyn Device,
    (copy, merge): (StreamId, StreamId),
    job: &MergeJob,
    counters: &Arc<Counters>,
) -> Result<()> {
    let (ready_on, merged) = match device.stream_wait_event(merge, job.handoff) {
        Ok(()) => (
            merge,
            queue_merges(device, counters, merge, &job.merges, job.dst, &job.name),
        ),
        // The copy stream runs the copy before anything queued after it.
        Err(e) => (copy, Err(e)),
    };
    let ready = device.record_event(job.ready, ready_on);
    if ready.is_err() && ready_on == merge {
        // The pages would be freed behind an older recording than the
        // merges just queued: let them run first.
        let _ = device.stream_synchronize(merge);
    }
    merged.and(ready)
}
