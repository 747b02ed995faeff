//! Host copies of the weights: pinned layer buffers read once at load, or a
//! ring of pinned staging buffers filled from the source on each upload.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::stats::{Counters, TimelineEntry};
use crate::device::{Device, DevicePtr, EventId, PinnedBuffer, StreamId};
use crate::error::{Error, Result};
use crate::model::WeightSource;

/// A layer's tensors as they are laid out in its device allocation.
#[derive(Clone, Debug)]
pub(crate) struct LayerBytes {
    /// (tensor index, offset in the layer, bytes) for each tensor.
    pub(crate) pieces: Vec<(usize, usize, usize)>,
    /// Bytes of the packed layer.
    pub(crate) total: usize,
}

/// Read a layer's tensors from `source` into `dst`, packed as `bytes` says.
pub(crate) fn read_layer(
    source: &dyn WeightSource,
    component: usize,
    layer: usize,
    bytes: &LayerBytes,
    dst: &mut [u8],
) -> Result<()> {
    for &(t, off, len) in &bytes.pieces {
        source.read(component, layer, t, 0, &mut dst[off..off + len])?;
    }
    Ok(())
}

/// Completion of an upload queued on the stager: set once its copies (and the
/// ready event) are queued on the copy stream, or once it failed.
#[derive(Default)]
pub(crate) struct JobDone {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl std::fmt::Debug for JobDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDone")
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl JobDone {
    fn finish(&self, r: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }

    /// True once the job has finished (either way).
    pub(crate) fn is_finished(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Wait until the job has finished; its error, if any.
    pub(crate) fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = &*g {
                return r.clone().map_err(|message| {
                    Error::Source(crate::model::SourceError {
                        what: "staged upload".into(),
                        message,
                    })
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    event: EventId(0),
                    waited_ms: timeout.as_millis() as u64,
                });
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One staged upload: read a layer from its source and copy it to `dst`.
pub(crate) struct Job {
    pub(crate) source: Arc<dyn WeightSource>,
    pub(crate) component: usize,
    pub(crate) layer: usize,
    pub(crate) name: String,
    pub(crate) bytes: LayerBytes,
    pub(crate) dst: DevicePtr,
    /// Events the copy stream waits for before the first copy (users of the previous contents).
    pub(crate) waits: Vec<EventId>,
    /// LoRA merges queued after the copies, before the ready event:
    /// (offset of the tensor in the layer, merge).
    pub(crate) merges: Vec<(usize, Arc<crate::device::MergeOp>)>,
    /// Recorded on the copy stream after the last copy.
    pub(crate) ready: EventId,
    pub(crate) done: Arc<JobDone>,
}

struct Staging {
    free: Mutex<Vec<(PinnedBuffer, Option<EventId>)>>,
    cv: Condvar,
}

/// Reader threads that fill a ring of pinned staging buffers and queue the copies.
pub(crate) struct Stager {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Stager {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        device: Arc<dyn Device>,
        copy: StreamId,
        buffers: usize,
        buffer_bytes: usize,
        threads: usize,
        counters: Arc<Counters>,
        wait_timeout: Duration,
        release_events: Sender<EventId>,
        gate: Arc<RwLock<()>>,
    ) -> Result<Stager> {
        if buffers == 0 || buffer_bytes == 0 || threads == 0 {
            return Err(Error::Config(format!(
                "staged host policy needs at least one buffer, one byte and one thread (got {buffers} × {buffer_bytes} bytes, {threads} threads)"
            )));
        }
        let mut free = Vec::with_capacity(buffers);
        for _ in 0..buffers {
            free.push((
                device.alloc_pinned(buffer_bytes)?,
                Some(device.create_event()?),
            ));
        }
        counters.host_alloc(buffers * buffer_bytes);
        let staging = Arc::new(Staging {
            free: Mutex::new(free),
            cv: Condvar::new(),
        });
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let mut handles = Vec::new();
        for i in 0..threads {
            let (device, rx, staging, counters) = (
                device.clone(),
                rx.clone(),
                staging.clone(),
                counters.clone(),
            );
            let release = release_events.clone();
            let gate = gate.clone();
            let h = std::thread::Builder::new()
                .name(format!("offload-stager-{i}"))
                .spawn(move || {
                    reader(
                        device,
                        copy,
                        rx,
                        staging,
                        counters,
                        (wait_timeout, release, gate),
                    )
                })
                .map_err(|e| Error::os("spawn stager thread", e))?;
            handles.push(h);
        }
        Ok(Stager {
            tx: Some(tx),
            threads: handles,
        })
    }

    /// Queue an upload.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let done = job.done.clone();
            if tx.send(job).is_err() {
                done.finish(Err("the stager has stopped".into()));
            }
        }
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reader(
    device: Arc<dyn Device>,
    copy: StreamId,
    rx: Receiver<Job>,
    staging: Arc<Staging>,
    counters: Arc<Counters>,
    (wait_timeout, release_events, gate): (Duration, Sender<EventId>, Arc<RwLock<()>>),
) {
    for job in rx {
        let start = Instant::now();
        // A failure of one of the job's chunks must reach its ready event:
        // no synchronisation (which clears the failure) may come between.
        let r = {
            let _queueing = gate.read().unwrap_or_else(|p| p.into_inner());
            run_job(&*device, copy, &job, &staging, &counters, wait_timeout)
        };
        // The waits are queued (or the job failed before using them): the events may be reused.
        for e in &job.waits {
            let _ = release_events.send(*e);
        }
        if r.is_ok() {
            counters.push_timeline(TimelineEntry {
                layer: job.name.clone(),
                kind: "stage",
                start_s: counters.since_epoch(start),
                end_s: counters.since_epoch(Instant::now()),
                bytes: job.bytes.total,
            });
        }
        job.done.finish(r.map_err(|e| e.to_string()));
    }
}

fn take_buffer(
    staging: &Staging,
    device: &dyn Device,
    timeout: Duration,
) -> Result<(PinnedBuffer, Option<EventId>)> {
    let deadline = Instant::now() + timeout;
    let mut free = staging.free.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some((buf, ev)) = free.pop() {
            drop(free);
            // The buffer's last copy must have run before we overwrite it. A
            // copy that failed has run too; only a timeout keeps the buffer busy.
            if let Some(e) = ev {
                if let Err(err @ Error::Timeout { .. }) = device.event_wait(e, Some(timeout)) {
                    put_buffer(staging, buf, ev);
                    return Err(err);
                }
            }
            return Ok((buf, ev));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                event: EventId(0),
                waited_ms: timeout.as_millis() as u64,
            });
        }
        free = staging
            .cv
            .wait_timeout(free, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

fn put_buffer(staging: &Staging, buf: PinnedBuffer, ev: Option<EventId>) {
    staging
        .free
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((buf, ev));
    staging.cv.notify_one();
}

/// Queue a job's copies and merges, then its ready event, which is
/// recorded even when queueing failed half-way: whoever drops the layer
/// frees its pages behind that event, so it must follow every queued copy.
fn run_job(
    device: &dyn Device,
    copy: StreamId,
    job: &Job,
    staging: &Staging,
    counters: &Counters,
    timeout: Duration,
) -> Result<()> {
    let queued = queue_job(device, copy, job, staging, counters, timeout);
    let ready = device.record_event(job.ready, copy);
    queued?;
    ready?;
    Counters::add(&counters.uploads, 1);
    Ok(())
}

fn queue_job(
    device: &dyn Device,
    copy: StreamId,
    job: &Job,
    staging: &Staging,
    counters: &Counters,
    timeout: Duration,
) -> Result<()> {
    for &e in &job.waits {
        device.stream_wait_event(copy, e)?;
    }
    for &(t, off, len) in &job.bytes.pieces {
        let mut done = 0;
        while done < len {
            let (mut buf, ev) = take_buffer(staging, device, timeout)?;
            let n = buf.len().min(len - done);
            let read = job.source.read(
                job.component,
                job.layer,
                t,
                done,
                &mut buf.as_mut_slice()[..n],
            );
            if let Err(e) = read {
                put_buffer(staging, buf, ev);
                return Err(e.into());
            }
            // SAFETY: the buffer is not handed out again before `ev`, recorded
            // right after this copy, has completed (take_buffer waits for it),
            // and it lives in the staging ring until the stager drops, after
            // its reader threads have joined; Drop of the runtime synchronises
            // the copy stream before freeing the ring.
            let r =
                unsafe { device.copy_h2d_async(job.dst.offset(off + done), buf.as_ptr(), n, copy) };
            let r = r.and_then(|()| match ev {
                Some(e) => device.record_event(e, copy),
                None => Ok(()),
            });
            put_buffer(staging, buf, ev);
            r?;
            Counters::add(&counters.bytes_h2d, n as u64);
            done += n;
        }
    }
    for (off, op) in &job.merges {
        device.launch(
            &crate::device::Kernel::Merge {
                w: job.dst.offset(*off),
                op: op.clone(),
            },
            copy,
        )?;
        Counters::add(&counters.merges, 1);
        Counters::add(&counters.merged_bytes, op.touched_bytes() as u64);
    }
    Ok(())
}
