//! The uploader: a thread of the runtime that queues the uploads of the
//! pinned host policy (the copy of a layer from its pinned host copy, and
//! its fuse-on-upload merges), so that the thread that acquires layers does
//! not make those driver calls. That thread is the engine's, which also
//! queues the layers' compute: at small layers a GPU pass is bound by it
//! (at the default preset's scale 4 the H200 ran a sequential pass in 11.2
//! ms against 10.0 for the same products with every weight resident, and
//! the merges of the default LoRA set added 0.9–1.9 ms more).
//!
//! The acquiring thread hands over the job (where from, where to, the
//! events of the slot's previous users, the merges) and goes on; the
//! uploader makes the copy stream wait for those events, queues the copy,
//! hands it over to the merge stream through an event when there are
//! merges, queues them there, and records the layer's ready event after the
//! last of it. The layer carries the job's [`JobDone`] as a staged upload
//! does, and every path that waits for a staged job (acquire, eviction, a
//! slot changing hands, `set_loras`, `synchronize`, unload) waits for it
//! the same way.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::gate::Gate;
use super::host::{finish_upload, EventReturns, JobDone, LayerMerges};
use super::stats::{self, Counters};
use crate::device::{Device, DevicePtr, EventId, MergeOp, StreamId};
use crate::error::{Error, Result};

/// The address of a layer's pinned host copy, as a job carries it to the
/// uploader thread.
pub(crate) struct HostSrc(pub(crate) *const u8);

// SAFETY: the address is only read by the copy the uploader queues, and
// the buffer behind it outlives that copy: a component's host copies are
// freed only at unload (which waits for every job of the model, refuses
// the model while one is still queueing, and synchronises the copy
// stream) or when the runtime drops (which joins
// the uploader and synchronises the copy stream first), and backup and
// fuse change a layer's host copy only after waiting for that layer's job
// and synchronising the copy stream, under the component's lock.
unsafe impl Send for HostSrc {}

/// One pinned upload: a layer's copy and its merges.
pub(crate) struct UploadJob {
    /// The layer's name (timeline entries).
    pub(crate) name: String,
    /// The layer's pinned host copy and its bytes.
    pub(crate) src: HostSrc,
    pub(crate) len: usize,
    /// Where the layer goes.
    pub(crate) dst: DevicePtr,
    /// Events the copy stream waits for before the copy (users of the
    /// previous contents); given back to the runtime's pool afterwards.
    pub(crate) waits: Vec<EventId>,
    /// (offset of the tensor in the layer, merge), as for a staged job.
    pub(crate) merges: Vec<(usize, Arc<MergeOp>)>,
    /// With merges: the event that hands the copy over to the merge
    /// stream; given back to the runtime's hand-off pool afterwards.
    pub(crate) handoff: Option<EventId>,
    /// Recorded after the copy (on the copy stream) or after the merges
    /// (on the merge stream), whatever fails.
    pub(crate) ready: EventId,
    /// Finished once everything is queued, or failed.
    pub(crate) done: Arc<JobDone>,
}

/// The uploader thread and its queue; dropping it finishes the jobs already
/// submitted and joins the thread.
pub(crate) struct Uploader {
    tx: Option<Sender<UploadJob>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader").finish_non_exhaustive()
    }
}

impl Uploader {
    /// Start the thread. `streams` are the runtime's (copy, merge) streams;
    /// `returns` take the wait and hand-off events back; jobs are queued
    /// under the shared side of `gate` (see `Shared::copy_gate`); a failed
    /// job waits up to `wait_timeout` for the users of its slot.
    pub(crate) fn new(
        device: Arc<dyn Device>,
        streams: (StreamId, StreamId),
        counters: Arc<Counters>,
        (release_events, release_handoffs): EventReturns,
        gate: Arc<Gate>,
        wait_timeout: std::time::Duration,
    ) -> Result<Uploader> {
        let (tx, rx) = crossbeam_channel::unbounded::<UploadJob>();
        let thread = std::thread::Builder::new()
            .name("offload-uploader".into())
            .spawn(move || {
                for job in rx {
                    // A panic (a bug below) must not leave the job, and every
                    // layer waiting for it, pending for good.
                    let mut waits_queued = false;
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _queueing = gate.share();
                        run(&*device, streams, &job, &counters, &mut waits_queued)
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Kernel {
                            kernel: "upload",
                            message: format!("queueing the upload of {} panicked", job.name),
                        })
                    });
                    // Queued, the waits captured the recordings and the
                    // events may be reused (the ready event, recorded on the
                    // copy stream after them or after merges that follow
                    // them, covers them). Not queued, the ready event may
                    // not follow them: their users are waited for here
                    // first (the pages may be reused behind it).
                    for &e in &job.waits {
                        if !waits_queued {
                            let _ = device.event_wait(e, Some(wait_timeout));
                        }
                        let _ = release_events.send(e);
                    }
                    if let Some(h) = job.handoff {
                        let _ = release_handoffs.send(h);
                    }
                    job.done.finish(r);
                }
            })
            .map_err(|e| Error::os("spawn uploader thread", e))?;
        Ok(Uploader {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queue a job; the job back if the thread has stopped (nothing of it
    /// was queued).
    pub(crate) fn submit(&self, job: UploadJob) -> std::result::Result<(), Box<UploadJob>> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Queue a job: the waits and the copy on the copy stream, then its merges
/// on the merge stream after a hand-off, then the ready event, which is
/// recorded even when queueing failed half-way (after the copy if it was
/// queued): whoever drops the layer frees its pages behind it.
fn run(
    device: &dyn Device,
    (copy, merge): (StreamId, StreamId),
    job: &UploadJob,
    counters: &Arc<Counters>,
    waits_queued: &mut bool,
) -> Result<()> {
    let copied = job
        .waits
        .iter()
        .try_for_each(|&e| device.stream_wait_event(copy, e))
        .inspect(|()| *waits_queued = true)
        .and_then(|()| {
            let mark = stats::timeline_mark(device, counters, copy);
            // SAFETY: `src` holds `len` bytes of the layer's pinned host
            // copy, which outlives the copy (see `HostSrc`); `dst` is the
            // layer's allocation or ring slot, at least `len` bytes, whose
            // pages are freed only behind the ready event recorded below,
            // after this copy, or, if that recording fails, behind the
            // previous one, when every later writer of those pages queues
            // on this same copy stream, after this copy.
            unsafe { device.copy_h2d_async(job.dst, job.src.0, job.len, copy) }.map(|()| mark)
        });
    let copied = copied.map(|mark| {
        if let Some(mark) = mark {
            let _ = stats::end_on(
                device,
                counters,
                copy,
                mark,
                job.name.clone(),
                "upload",
                job.len,
            );
        }
    });
    let finished = finish_upload(
        device,
        (copy, merge),
        counters,
        copied.is_ok(),
        LayerMerges {
            merges: &job.merges,
            handoff: job.handoff,
            dst: job.dst,
            name: &job.name,
            count: false,
        },
        job.ready,
    );
    copied.and(finished)
}
