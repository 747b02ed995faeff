//! Host copies of the weights: pinned layer buffers read once at load, or a
//! ring of pinned staging buffers filled from the source on each upload.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::fill_pool::FillHelpers;
use super::gate::{deadline_after, Gate};
use super::stats::{self, Counters, TimelineEntry};
use crate::device::{Device, DevicePtr, EventId, PinnedBuffer, StreamId};
use crate::error::{Error, Result};
use crate::model::{SourceError, WeightSource};

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
        read_piece(
            source,
            (component, layer),
            (t, len),
            0,
            &mut dst[off..off + len],
        )?;
    }
    Ok(())
}

/// Bytes `offset .. offset + dst.len()` of tensor `t` (of `len` bytes) of a
/// layer into `dst`: from the source's memory with streaming stores when it
/// holds the tensor there ([`WeightSource::in_memory`]; the destination is
/// a host buffer only the copy engine reads again), else by its `read`.
fn read_piece(
    source: &dyn WeightSource,
    (component, layer): (usize, usize),
    (t, len): (usize, usize),
    offset: usize,
    dst: &mut [u8],
) -> std::result::Result<(), SourceError> {
    let Some(held) = source.in_memory(component, layer, t) else {
        return source.read(component, layer, t, offset, dst);
    };
    // Checked when the model was added; checked again, as the source's
    // promise is all that keeps it so.
    let range = offset..offset + dst.len();
    match held.get(range.clone()) {
        Some(bytes) if held.len() == len => {
            crate::host_copy::copy_streaming(dst, bytes);
            Ok(())
        }
        _ => Err(SourceError {
            what: format!("tensor {t} of layer {layer} of component {component}"),
            message: format!(
                "bytes {range:?} of it asked for, the source holds {} in memory where the description says {len}",
                held.len()
            ),
        }),
    }
}

/// Completion of an upload queued by one of the runtime's threads (a
/// staged upload, or a pinned one on the uploader): set once its work (and
/// the ready event) is queued on the streams, or once it failed, with the
/// error every waiter gets.
#[derive(Default)]
pub(crate) struct JobDone {
    state: Mutex<Option<Result<()>>>,
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
    pub(crate) fn finish(&self, r: Result<()>) {
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
        let deadline = deadline_after(timeout);
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = &*g {
                return r.clone();
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
    /// Events the copy stream waits for before the first copy (users of the
    /// previous contents); given back to the runtime's pool once queued.
    pub(crate) waits: Vec<EventId>,
    /// LoRA merges queued on the merge stream after the copies, before the
    /// ready event: (offset of the tensor in the layer, merge).
    pub(crate) merges: Vec<(usize, Arc<crate::device::MergeOp>)>,
    /// With merges: the event that hands the copies over to the merge
    /// stream; given back to the runtime's pool once queued.
    pub(crate) handoff: Option<EventId>,
    /// Recorded after the last copy (on the copy stream), or after the
    /// merges (on the merge stream).
    pub(crate) ready: EventId,
    pub(crate) done: Arc<JobDone>,
}

struct Staging {
    /// Buffers not being filled, each with the event recorded after its
    /// last copy, oldest copy first: a reader takes the front, whose copy is
    /// the likeliest to have run, so fills overlap the copies queued before.
    /// (Taking the buffer just given back would wait for the copy just
    /// queued, behind every other, and leave one buffer per reader in use.)
    free: Mutex<std::collections::VecDeque<(PinnedBuffer, EventId)>>,
    /// Buffers whose last copy was queued but whose event could not be
    /// recorded after it: out of the ring until their event is recorded on
    /// the copy stream later (which, the stream running in order, follows
    /// that copy; see `revive`), or until the stager drops.
    retired: Mutex<Vec<(PinnedBuffer, EventId)>>,
    cv: Condvar,
    /// Threads that fill one staging buffer together (the policy's reader
    /// threads: one thread copies about 5.6 GB/s on the H200 machine, a
    /// tenth of a PCIe 5 link, and a layer's chunks would otherwise go
    /// through one thread).
    fill_parts: usize,
    /// A staging buffer's fill is split only into parts of at least this
    /// (the policy's `fill_part_bytes`).
    fill_part_min: usize,
}

/// Fills `dst` with bytes `start .. start + dst.len()` of a layer as it is
/// packed on the device (`pieces`: tensor, offset in the layer, bytes, in
/// offset order): each tensor's bytes read from `source`, the alignment gaps
/// between tensors zeroed.
fn fill_range(
    source: &dyn WeightSource,
    (component, layer): (usize, usize),
    pieces: &[(usize, usize, usize)],
    start: usize,
    dst: &mut [u8],
) -> std::result::Result<(), SourceError> {
    let end = start + dst.len();
    let mut at = start;
    for &(t, off, len) in pieces {
        let (lo, hi) = (off.max(start), (off + len).min(end));
        if lo >= hi {
            continue;
        }
        dst[at - start..lo - start].fill(0);
        read_piece(
            source,
            (component, layer),
            (t, len),
            lo - off,
            &mut dst[lo - start..hi - start],
        )?;
        at = hi;
    }
    dst[at - start..].fill(0);
    // A source's own stores into write-combined memory are weakly ordered:
    // fenced here, on the thread that made them, before the buffer goes on.
    crate::host_copy::store_fence();
    Ok(())
}

/// [`fill_range`] split into up to `parts` parts of at least `min_part`
/// bytes, the first filled on the caller's thread and each other on one of
/// its `helpers`. The first error is returned; a panic of a part's read is
/// resumed on the caller.
fn fill_split(
    source: &dyn WeightSource,
    at: (usize, usize),
    pieces: &[(usize, usize, usize)],
    start: usize,
    dst: &mut [u8],
    (parts, min_part): (usize, usize),
    helpers: &mut FillHelpers,
) -> std::result::Result<(), SourceError> {
    let k = parts.min(dst.len() / min_part.max(1)).max(1);
    if k == 1 {
        return fill_range(source, at, pieces, start, dst);
    }
    let piece = dst.len().div_ceil(k);
    type Part<'a> = Box<dyn FnOnce() -> std::result::Result<(), SourceError> + Send + 'a>;
    let jobs: Vec<Part<'_>> = dst
        .chunks_mut(piece)
        .enumerate()
        .map(|(i, part)| {
            Box::new(move || fill_range(source, at, pieces, start + i * piece, part)) as Part<'_>
        })
        .collect();
    helpers.scope(jobs).into_iter().collect()
}

/// Where a job's events go back once queued: the runtime's main event pool
/// (the waits) and its pool of hand-off events.
pub(crate) type EventReturns = (Sender<EventId>, Sender<EventId>);

/// The staging ring of a staged host policy (the fields of
/// [`super::HostPolicy::Staged`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ring {
    pub(crate) buffers: usize,
    pub(crate) buffer_bytes: usize,
    pub(crate) threads: usize,
    pub(crate) fill_part_bytes: usize,
    pub(crate) write_combined: bool,
}

/// Reader threads that fill a ring of pinned staging buffers and queue the copies.
pub(crate) struct Stager {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    /// Kept here, not only by the readers, so that the ring outlives them
    /// until the copies they queued last have run.
    staging: Arc<Staging>,
    device: Arc<dyn Device>,
    copy: StreamId,
}

impl Stager {
    pub(crate) fn new(
        device: Arc<dyn Device>,
        streams: (StreamId, StreamId),
        ring: Ring,
        counters: Arc<Counters>,
        wait_timeout: Duration,
        (release_events, release_handoffs): EventReturns,
        gate: Arc<Gate>,
    ) -> Result<Stager> {
        let Ring {
            buffers,
            buffer_bytes,
            threads,
            fill_part_bytes,
            write_combined,
        } = ring;
        if buffers == 0 || buffer_bytes == 0 || threads == 0 {
            return Err(Error::Config(format!(
                "staged host policy needs at least one buffer, one byte and one thread (got {buffers} × {buffer_bytes} bytes, {threads} threads)"
            )));
        }
        if fill_part_bytes == 0 {
            return Err(Error::Config(
                "staged host policy needs fill parts of at least one byte (got fill_part_bytes 0)"
                    .into(),
            ));
        }
        let mut free = std::collections::VecDeque::with_capacity(buffers);
        for _ in 0..buffers {
            let buf = if write_combined {
                device.alloc_pinned_write_combined(buffer_bytes)?
            } else {
                device.alloc_pinned(buffer_bytes)?
            };
            free.push_back((buf, device.create_event()?));
        }
        counters.host_alloc(buffers * buffer_bytes);
        let staging = Arc::new(Staging {
            free: Mutex::new(free),
            retired: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            fill_parts: threads,
            fill_part_min: fill_part_bytes,
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
            let release = (release_events.clone(), release_handoffs.clone());
            let gate = gate.clone();
            let h = std::thread::Builder::new()
                .name(format!("offload-stager-{i}"))
                .spawn(move || {
                    reader(
                        device,
                        streams,
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
            staging,
            copy: streams.0,
            device,
        })
    }

    /// Queue an upload.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            let done = job.done.clone();
            if tx.send(job).is_err() {
                done.finish(Err(Error::Source(SourceError {
                    what: "staged upload".into(),
                    message: "the stager has stopped".into(),
                })));
            }
        }
    }
}

impl Drop for Stager {
    fn drop(&mut self) {
        self.tx = None;
        // The readers finish the jobs already submitted, queueing their copies.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // A copy engine reads the ring until those copies have run (or
        // failed, which ends them too): only then may it be freed.
        let _ = self.device.stream_synchronize(self.copy);
        let free =
            std::mem::take(&mut *self.staging.free.lock().unwrap_or_else(|p| p.into_inner()));
        let retired = std::mem::take(
            &mut *self
                .staging
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (_, e) in free.iter().chain(&retired) {
            let _ = self.device.destroy_event(*e);
        }
    }
}

fn reader(
    device: Arc<dyn Device>,
    streams: (StreamId, StreamId),
    rx: Receiver<Job>,
    staging: Arc<Staging>,
    counters: Arc<Counters>,
    (wait_timeout, (release_events, release_handoffs), gate): (Duration, EventReturns, Arc<Gate>),
) {
    // Started by the first fill split into parts, kept until the stager stops.
    let mut helpers = FillHelpers::named(format!(
        "{}-fill",
        std::thread::current().name().unwrap_or("offload-stager")
    ));
    for job in rx {
        let start = Instant::now();
        // A failure of one of the job's chunks must reach its ready event:
        // no synchronisation (which clears the failure) may come between.
        let r = {
            let _queueing = gate.share();
            run_job(
                &*device,
                streams,
                (&job, &mut helpers),
                &staging,
                &counters,
                wait_timeout,
            )
        };
        // The waits are queued (or the job failed before using them): the events may be reused.
        for e in &job.waits {
            let _ = release_events.send(*e);
        }
        if let Some(h) = job.handoff {
            let _ = release_handoffs.send(h);
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
        job.done.finish(r);
    }
}

fn take_buffer(
    staging: &Staging,
    device: &dyn Device,
    timeout: Duration,
) -> Result<(PinnedBuffer, EventId)> {
    let deadline = deadline_after(timeout);
    let mut free = staging.free.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some((buf, ev)) = free.pop_front() {
            drop(free);
            // The buffer's last copy must have run before we overwrite it. A
            // copy that failed has run too; only a timeout keeps the buffer busy.
            if let Err(err @ Error::Timeout { .. }) = device.event_wait(ev, Some(timeout)) {
                put_back(staging, buf, ev);
                return Err(err);
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

/// Give back a buffer whose copy was just queued: it goes behind every other.
fn put_buffer(staging: &Staging, buf: PinnedBuffer, ev: EventId) {
    give_back(staging, buf, ev, false);
}

/// Give back a buffer whose event says as much as when it was taken (no
/// copy from it queued since): it keeps its place at the front.
fn put_back(staging: &Staging, buf: PinnedBuffer, ev: EventId) {
    give_back(staging, buf, ev, true);
}

fn give_back(staging: &Staging, buf: PinnedBuffer, ev: EventId, front: bool) {
    let mut free = staging.free.lock().unwrap_or_else(|p| p.into_inner());
    if front {
        free.push_front((buf, ev));
    } else {
        free.push_back((buf, ev));
    }
    drop(free);
    staging.cv.notify_one();
}

/// Put retired buffers back in the ring, each behind a new recording of its
/// event on the copy stream: the stream runs in order, so that recording
/// completes after the copy that was queued from the buffer without one.
/// A buffer whose event still cannot be recorded stays retired.
fn revive(staging: &Staging, device: &dyn Device, copy: StreamId) {
    let mut retired = staging.retired.lock().unwrap_or_else(|p| p.into_inner());
    let mut kept = Vec::new();
    for (buf, ev) in retired.drain(..) {
        if device.record_event(ev, copy).is_ok() {
            put_buffer(staging, buf, ev);
        } else {
            kept.push((buf, ev));
        }
    }
    *retired = kept;
}

/// Queue a job's copies on the copy stream and its merges on the merge
/// stream, then its ready event, which is recorded even when queueing
/// failed half-way: whoever drops the layer frees its pages behind that
/// event, so it must follow every queued copy.
fn run_job(
    device: &dyn Device,
    (copy, merge): (StreamId, StreamId),
    (job, helpers): (&Job, &mut FillHelpers),
    staging: &Staging,
    counters: &Arc<Counters>,
    timeout: Duration,
) -> Result<()> {
    let queued = queue_job(device, copy, (job, helpers), staging, counters, timeout);
    let finished = finish_upload(
        device,
        (copy, merge),
        counters,
        queued.is_ok(),
        LayerMerges {
            merges: &job.merges,
            handoff: job.handoff,
            dst: job.dst,
            name: &job.name,
            count: true,
        },
        job.ready,
    );
    queued.and(finished)?;
    Counters::add(&counters.uploads, 1);
    Ok(())
}

/// A layer's merges as an upload job carries them.
#[derive(Clone, Copy)]
pub(crate) struct LayerMerges<'a> {
    /// (offset of the tensor in the layer, merge).
    pub(crate) merges: &'a [(usize, Arc<crate::device::MergeOp>)],
    /// The copy-to-merge hand-off event (with merges).
    pub(crate) handoff: Option<EventId>,
    /// Where the layer was copied to.
    pub(crate) dst: DevicePtr,
    /// The layer's name (timeline entries).
    pub(crate) name: &'a str,
    /// Count them in `merges` and `merged_bytes` once queued (the
    /// uploader's were counted when its job was handed over).
    pub(crate) count: bool,
}

/// The end of an upload job whose copies were queued on the copy stream
/// (`copied`: all of them, without an error): hand them over to the merge
/// stream and queue the layer's merges there, when it has any, then record
/// the ready event, after the copies whatever fails (whoever drops the
/// layer frees its pages behind it). The merges' error first, then the
/// recording's. Staged jobs and the uploader's jobs both end here.
pub(crate) fn finish_upload(
    device: &dyn Device,
    (copy, merge): (StreamId, StreamId),
    counters: &Arc<Counters>,
    copied: bool,
    m: LayerMerges<'_>,
    ready: EventId,
) -> Result<()> {
    let (ready_on, merged) = match m.handoff {
        Some(h) if copied && !m.merges.is_empty() => {
            let handed = device
                .record_event(h, copy)
                .and_then(|()| device.stream_wait_event(merge, h));
            match handed {
                Ok(()) => (merge, queue_merges(device, counters, merge, &m)),
                // The copy stream runs the copies before anything queued after them.
                Err(e) => (copy, Err(e)),
            }
        }
        _ => (copy, Ok(())),
    };
    let recorded = device.record_event(ready, ready_on);
    if recorded.is_err() && ready_on == merge {
        // The pages would be freed behind an older recording than the
        // merges just queued: let them run first.
        let _ = device.stream_synchronize(merge);
    }
    merged.and(recorded)
}

/// A layer's merges (`merges` on the layer at `dst`): one
/// [`Kernel::MergeBatch`](crate::device::Kernel::MergeBatch) on `stream`,
/// with its `"merge"` timeline entry for `name` (best effort: a failure to
/// queue one shows in the launch or the recording that follows). Staged
/// jobs, the uploader's jobs and the acquiring thread all queue merges here.
pub(crate) fn queue_merges(
    device: &dyn Device,
    counters: &Arc<Counters>,
    stream: StreamId,
    m: &LayerMerges<'_>,
) -> Result<()> {
    let LayerMerges {
        merges, dst, name, ..
    } = *m;
    let mark = stats::timeline_mark(device, counters, stream);
    super::lora::launch_uncounted(device, merges, dst, stream)?;
    if m.count {
        super::lora::count_merges(counters, merges);
    }
    if let Some(mark) = mark {
        let bytes = merges.iter().map(|(_, op)| op.touched_bytes()).sum();
        let _ = stats::end_on(
            device,
            counters,
            stream,
            mark,
            name.to_string(),
            "merge",
            bytes,
        );
    }
    Ok(())
}

fn queue_job(
    device: &dyn Device,
    copy: StreamId,
    (job, helpers): (&Job, &mut FillHelpers),
    staging: &Staging,
    counters: &Counters,
    timeout: Duration,
) -> Result<()> {
    for &e in &job.waits {
        device.stream_wait_event(copy, e)?;
    }
    // The layer's packed bytes (as the pinned policy copies them), a staging
    // buffer at a time: its tensors and the alignment gaps between them go
    // in one copy per buffer, not one per tensor.
    let end = job.bytes.total;
    let mut done = 0;
    while done < end {
        let (mut buf, ev) = take_buffer(staging, device, timeout)?;
        let n = buf.len().min(end - done);
        let read = fill_split(
            &*job.source,
            (job.component, job.layer),
            &job.bytes.pieces,
            done,
            &mut buf.as_mut_slice()[..n],
            (staging.fill_parts, staging.fill_part_min),
            helpers,
        );
        if let Err(e) = read {
            // Its last copy has run (take_buffer waited): first in line.
            put_back(staging, buf, ev);
            return Err(SourceError {
                what: format!("{} (layer {})", e.what, job.name),
                message: e.message,
            }
            .into());
        }
        // SAFETY: the buffer is handed out again only after `ev`, recorded
        // on the copy stream after this copy, has completed (take_buffer
        // waits for it); until `ev` is recorded, never (it is retired). It
        // is freed only when the stager drops, after its reader threads
        // have joined and the copy stream has been synchronised.
        let r = unsafe { device.copy_h2d_async(job.dst.offset(done), buf.as_ptr(), n, copy) };
        if let Err(e) = r {
            // Nothing queued: the buffer is as it was.
            put_back(staging, buf, ev);
            return Err(e);
        }
        if let Err(e) = device.record_event(ev, copy) {
            // The copy is queued but nothing tells when it has run.
            staging
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((buf, ev));
            return Err(e);
        }
        put_buffer(staging, buf, ev);
        revive(staging, device, copy);
        Counters::add(&counters.bytes_h2d, n as u64);
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residency::HostPolicy;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_job_waited_for_without_end_gives_its_result() {
        let job = JobDone::default();
        assert!(matches!(
            job.wait(Duration::from_millis(1)),
            Err(Error::Timeout { waited_ms: 1, .. })
        ));
        job.finish(Err(Error::Config("x".into())));
        // A timeout past what an Instant holds is no panic.
        assert!(matches!(job.wait(Duration::MAX), Err(Error::Config(_))));
    }

    /// One tensor whose byte i is `i % 251`; counts reads, and records the
    /// threads they ran on and the ranges they read (offset, bytes).
    struct Bytes {
        len: usize,
        reads: AtomicUsize,
        threads: Mutex<Vec<std::thread::ThreadId>>,
        ranges: Mutex<Vec<(usize, usize)>>,
        fail_at: Option<usize>,
    }

    impl WeightSource for Bytes {
        fn read(
            &self,
            _component: usize,
            _layer: usize,
            _tensor: usize,
            offset: usize,
            dst: &mut [u8],
        ) -> std::result::Result<(), SourceError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let id = std::thread::current().id();
            let mut t = self.threads.lock().unwrap();
            if !t.contains(&id) {
                t.push(id);
            }
            drop(t);
            self.ranges.lock().unwrap().push((offset, dst.len()));
            if offset + dst.len() > self.len || self.fail_at == Some(offset) {
                return Err(SourceError {
                    what: format!("bytes {offset}..{}", offset + dst.len()),
                    message: "refused".into(),
                });
            }
            for (i, b) in dst.iter_mut().enumerate() {
                *b = ((offset + i) % 251) as u8;
            }
            Ok(())
        }
    }

    fn source(len: usize, fail_at: Option<usize>) -> Bytes {
        Bytes {
            len,
            reads: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
            ranges: Mutex::new(Vec::new()),
            fail_at,
        }
    }

    #[test]
    fn a_fill_is_split_across_threads_and_every_byte_lands() {
        // 1000 bytes from offset 37, in up to 4 parts of at least 100: 4
        // parts of 250 bytes, on 4 threads.
        let src = source(2000, None);
        let mut dst = vec![0u8; 1000];
        fill_split(
            &src,
            (0, 0),
            &[(0, 0, 2000)],
            37,
            &mut dst,
            (4, 100),
            &mut FillHelpers::default(),
        )
        .unwrap();
        for (i, &b) in dst.iter().enumerate() {
            assert_eq!(b, ((37 + i) % 251) as u8, "byte {i}");
        }
        assert_eq!(src.reads.load(Ordering::Relaxed), 4);
        assert_eq!(src.threads.lock().unwrap().len(), 4);
        // Parts no smaller than the minimum: 1000 bytes, minimum 400 -> 2 parts.
        let src = source(2000, None);
        fill_split(
            &src,
            (0, 0),
            &[(0, 0, 2000)],
            0,
            &mut dst,
            (4, 400),
            &mut FillHelpers::default(),
        )
        .unwrap();
        assert_eq!(src.reads.load(Ordering::Relaxed), 2);
        // One part: one read on the caller's thread.
        let src = source(2000, None);
        fill_split(
            &src,
            (0, 0),
            &[(0, 0, 2000)],
            0,
            &mut dst,
            (1, 1),
            &mut FillHelpers::default(),
        )
        .unwrap();
        assert_eq!(src.reads.load(Ordering::Relaxed), 1);
        assert_eq!(
            src.threads.lock().unwrap().as_slice(),
            &[std::thread::current().id()]
        );
    }

    #[test]
    fn a_small_fill_is_split_into_parts_of_the_policy_minimum() {
        // 2 MiB in up to 4 parts of at least 512 KiB: 4 parts of 512 KiB,
        // on 4 threads.
        const K: usize = 1 << 10;
        let src = source(4 << 20, None);
        let mut dst = vec![0u8; 2 << 20];
        fill_split(
            &src,
            (0, 0),
            &[(0, 0, 4 << 20)],
            0,
            &mut dst,
            (4, 512 * K),
            &mut FillHelpers::default(),
        )
        .unwrap();
        for (i, &b) in dst.iter().enumerate() {
            assert_eq!(b, (i % 251) as u8, "byte {i}");
        }
        assert_eq!(src.reads.load(Ordering::Relaxed), 4);
        assert_eq!(src.threads.lock().unwrap().len(), 4);
        let mut ranges = src.ranges.lock().unwrap().clone();
        ranges.sort_unstable();
        assert_eq!(
            ranges,
            [
                (0, 512 * K),
                (512 * K, 512 * K),
                (1024 * K, 512 * K),
                (1536 * K, 512 * K)
            ]
        );
        // With a 4 MiB minimum the same fill is one part.
        let src = source(4 << 20, None);
        fill_split(
            &src,
            (0, 0),
            &[(0, 0, 4 << 20)],
            0,
            &mut dst,
            (4, 4 << 20),
            &mut FillHelpers::default(),
        )
        .unwrap();
        assert_eq!(*src.ranges.lock().unwrap(), [(0, 2 << 20)]);
    }

    /// A staged policy with fill parts of 0 bytes is refused.
    #[test]
    fn fill_parts_of_zero_bytes_are_refused() {
        use crate::device::{HostConfig, HostDevice};
        let dev = Arc::new(
            HostDevice::new(HostConfig {
                capacity: 1 << 20,
                page_size: 64 << 10,
                link_gbps: None,
            })
            .unwrap(),
        );
        let (copy, merge) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
        let (etx, _erx) = crossbeam_channel::unbounded();
        let (htx, _hrx) = crossbeam_channel::unbounded();
        let r = Stager::new(
            dev,
            (copy, merge),
            Ring {
                buffers: 2,
                buffer_bytes: 1 << 16,
                threads: 1,
                fill_part_bytes: 0,
                write_combined: false,
            },
            Arc::new(Counters::new(false)),
            Duration::from_secs(5),
            (etx, htx),
            Arc::new(Gate::default()),
        );
        assert!(
            matches!(&r, Err(Error::Config(m)) if m.contains("fill_part_bytes")),
            "{:?}",
            r.err()
        );
    }

    /// The staging ring is a queue: a reader gets the buffer whose copy was
    /// queued first (the one most likely to have run), not the one it just
    /// gave back, whose copy is behind every other; a buffer given back
    /// untouched keeps its turn.
    #[test]
    fn the_ring_hands_out_the_buffer_whose_copy_was_queued_first() {
        use crate::device::{HostConfig, HostDevice};
        let dev = HostDevice::new(HostConfig {
            capacity: 1 << 20,
            page_size: 64 << 10,
            link_gbps: None,
        })
        .unwrap();
        let staging = Staging {
            free: Mutex::new(
                (0..3)
                    .map(|_| (dev.alloc_pinned(16).unwrap(), dev.create_event().unwrap()))
                    .collect(),
            ),
            retired: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            fill_parts: 1,
            fill_part_min: HostPolicy::DEFAULT_FILL_PART_BYTES,
        };
        let ptrs: Vec<*const u8> = staging
            .free
            .lock()
            .unwrap()
            .iter()
            .map(|(b, _)| b.as_ptr())
            .collect();
        let take = || take_buffer(&staging, &dev, Duration::from_secs(5)).unwrap();
        let (a, ev) = take();
        assert_eq!(a.as_ptr(), ptrs[0]);
        put_buffer(&staging, a, ev);
        let (b, ev) = take();
        assert_eq!(b.as_ptr(), ptrs[1], "not the buffer just given back");
        put_back(&staging, b, ev);
        let order: Vec<_> = (0..3).map(|_| take()).collect();
        assert_eq!(
            order.iter().map(|(b, _)| b.as_ptr()).collect::<Vec<_>>(),
            [ptrs[1], ptrs[2], ptrs[0]]
        );
        // The front buffer's copy has not run (its stream is held): a take
        // times out and leaves it at the front, where the next take, once
        // the copy has run, finds it.
        let mut order = order.into_iter();
        let (first, _) = order.next().unwrap();
        let s = dev.create_stream().unwrap();
        let e = dev.create_event().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        dev.launch_host_fn(
            s,
            Box::new(move || {
                let _ = rx.recv_timeout(Duration::from_secs(20));
            }),
        )
        .unwrap();
        dev.record_event(e, s).unwrap();
        put_buffer(&staging, first, e);
        for (b, ev) in order {
            put_buffer(&staging, b, ev);
        }
        let late = take_buffer(&staging, &dev, Duration::from_millis(30));
        assert!(matches!(late, Err(Error::Timeout { .. })), "{late:?}");
        tx.send(()).unwrap();
        dev.stream_synchronize(s).unwrap();
        let (b, ev) = take();
        assert_eq!((b.as_ptr(), ev), (ptrs[1], e));
        // A buffer retired (its copy queued, its event not recorded) comes
        // back behind a new recording of its event; one whose event cannot
        // be recorded stays out.
        put_buffer(&staging, b, ev);
        let extra = dev.alloc_pinned(16).unwrap();
        let extra_ptr = extra.as_ptr();
        let gone = dev.alloc_pinned(16).unwrap();
        staging.retired.lock().unwrap().extend([
            (extra, dev.create_event().unwrap()),
            (gone, EventId(u64::MAX)),
        ]);
        revive(&staging, &dev, s);
        let retired = staging.retired.lock().unwrap();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].1, EventId(u64::MAX));
        drop(retired);
        let free = staging.free.lock().unwrap();
        assert_eq!(free.back().map(|(b, _)| b.as_ptr()), Some(extra_ptr));
    }

    /// A stager on `dev` with `ring`, and its copy stream.
    fn stager_on(dev: &Arc<crate::device::HostDevice>, ring: Ring) -> (Stager, StreamId) {
        let (copy, merge) = (dev.create_stream().unwrap(), dev.create_stream().unwrap());
        let (etx, _erx) = crossbeam_channel::unbounded();
        let (htx, _hrx) = crossbeam_channel::unbounded();
        let stager = Stager::new(
            dev.clone(),
            (copy, merge),
            ring,
            Arc::new(Counters::new(false)),
            Duration::from_secs(20),
            (etx, htx),
            Arc::new(Gate::default()),
        )
        .unwrap();
        (stager, copy)
    }

    /// Submits `n` one-tensor layers of `bytes` from `src` (each the
    /// tensor's first `bytes`), layer l to `dst + l · bytes`.
    fn submit_layers(
        stager: &Stager,
        dev: &crate::device::HostDevice,
        src: &Arc<dyn WeightSource>,
        dst: DevicePtr,
        (n, bytes): (usize, usize),
    ) -> Vec<Arc<JobDone>> {
        (0..n)
            .map(|l| {
                let done = Arc::new(JobDone::default());
                stager.submit(Job {
                    source: src.clone(),
                    component: 0,
                    layer: l,
                    name: format!("layer{l}"),
                    bytes: LayerBytes {
                        pieces: vec![(0, 0, bytes)],
                        total: bytes,
                    },
                    dst: dst.offset(l * bytes),
                    waits: Vec::new(),
                    merges: Vec::new(),
                    handoff: None,
                    ready: dev.create_event().unwrap(),
                    done: done.clone(),
                });
                done
            })
            .collect()
    }

    /// Dropping the stager frees its ring only after the copies its readers
    /// queued last have run (the host backend counts a pinned buffer freed
    /// under a queued copy, and keeps it).
    #[test]
    fn the_ring_outlives_the_copies_queued_from_it() {
        use crate::device::{HostConfig, HostDevice};
        let dev = Arc::new(
            HostDevice::new(HostConfig {
                capacity: 16 << 20,
                page_size: 64 << 10,
                // 1 MiB in 4 ms.
                link_gbps: Some(0.25),
            })
            .unwrap(),
        );
        let (stager, _) = stager_on(
            &dev,
            Ring {
                buffers: 2,
                buffer_bytes: 1 << 20,
                threads: 1,
                fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
                write_combined: false,
            },
        );
        let src: Arc<dyn WeightSource> = Arc::new(source(3 << 20, None));
        let dst = dev.alloc_contiguous(3 << 20).unwrap();
        let done = submit_layers(&stager, &dev, &src, dst, (3, 1 << 20));
        drop(stager);
        assert!(done.iter().all(|d| d.is_finished()));
        let c = dev.counters();
        assert_eq!((c.pinned_freed_in_use, c.bytes_h2d), (0, 3 << 20));
    }

    /// A reader splits each fill between itself and its helper threads,
    /// which it keeps from job to job: 8 jobs of one buffer each, filled
    /// in 2 parts by 2 readers, run on at most 4 threads, where starting
    /// a thread per split fill would take up to 10.
    #[test]
    fn readers_keep_their_fill_helpers_from_job_to_job() {
        use crate::device::{DeviceExt, HostConfig, HostDevice};
        const K: usize = 1 << 10;
        let dev = Arc::new(
            HostDevice::new(HostConfig {
                capacity: 1 << 20,
                page_size: 64 * K,
                link_gbps: None,
            })
            .unwrap(),
        );
        let (stager, copy) = stager_on(
            &dev,
            Ring {
                buffers: 4,
                buffer_bytes: 64 * K,
                threads: 2,
                fill_part_bytes: 16 * K,
                write_combined: false,
            },
        );
        let bytes = Arc::new(source(64 * K, None));
        let src: Arc<dyn WeightSource> = bytes.clone();
        let dst = dev.alloc_contiguous(8 * 64 * K).unwrap();
        let done = submit_layers(&stager, &dev, &src, dst, (8, 64 * K));
        drop(stager);
        for d in &done {
            d.wait(Duration::from_secs(1)).unwrap();
        }
        // Two reads (parts) per job, every byte copied.
        assert_eq!(bytes.reads.load(Ordering::Relaxed), 16);
        assert_eq!(dev.counters().bytes_h2d, (8 * 64 * K) as u64);
        let mut back = vec![0u8; 64 * K];
        dev.read_blocking(dst.offset(7 * 64 * K), &mut back, copy)
            .unwrap();
        assert!(back.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        let threads = bytes.threads.lock().unwrap().len();
        assert!(
            (2..=4).contains(&threads),
            "{threads} threads filled the parts"
        );
    }

    #[test]
    fn a_failed_part_fails_the_fill() {
        // The third of four parts (offset 500) fails.
        let src = source(2000, Some(500));
        let mut dst = vec![0u8; 1000];
        let e = fill_split(
            &src,
            (0, 0),
            &[(0, 0, 2000)],
            0,
            &mut dst,
            (4, 100),
            &mut FillHelpers::default(),
        )
        .unwrap_err();
        assert_eq!(e.what, "bytes 500..750");
        // Past the end of the source.
        let src = source(900, None);
        assert!(fill_split(
            &src,
            (0, 0),
            &[(0, 0, 2000)],
            0,
            &mut dst,
            (4, 100),
            &mut FillHelpers::default()
        )
        .is_err());
    }

    /// Tensor `t`'s byte `i` is `(7 t + i) % 251 + 1` (never 0).
    struct Tensors(Vec<usize>);

    impl WeightSource for Tensors {
        fn read(
            &self,
            _component: usize,
            _layer: usize,
            tensor: usize,
            offset: usize,
            dst: &mut [u8],
        ) -> std::result::Result<(), SourceError> {
            if offset + dst.len() > self.0[tensor] {
                return Err(SourceError {
                    what: format!("tensor {tensor}"),
                    message: "read past its end".into(),
                });
            }
            for (i, b) in dst.iter_mut().enumerate() {
                *b = ((7 * tensor + offset + i) % 251 + 1) as u8;
            }
            Ok(())
        }
    }

    /// A layer's tensors go into a staging buffer as they lie on the device
    /// (packed, aligned, the gaps zeroed), whatever the window and its parts.
    #[test]
    fn windows_of_a_packed_layer_hold_its_tensors_and_zero_gaps() {
        let sizes = [300, 10, 0, 1000, 5];
        let packed = crate::arena::pack(&sizes).unwrap();
        let pieces: Vec<_> = (0..sizes.len())
            .map(|t| (t, packed.offsets[t], sizes[t]))
            .collect();
        let src = Tensors(sizes.to_vec());
        let mut want = vec![0u8; packed.total];
        read_layer(
            &src,
            0,
            0,
            &LayerBytes {
                pieces: pieces.clone(),
                total: packed.total,
            },
            &mut want,
        )
        .unwrap();
        for (window, parts) in [(packed.total, 1), (400, 3), (97, 2), (1, 1)] {
            // Parts of at least 40 bytes: a 97-byte window splits in two.
            let mut start = 0;
            while start < packed.total {
                let n = window.min(packed.total - start);
                let mut dst = vec![0xAAu8; n];
                fill_split(
                    &src,
                    (0, 0),
                    &pieces,
                    start,
                    &mut dst,
                    (parts, 40),
                    &mut FillHelpers::default(),
                )
                .unwrap();
                assert!(
                    dst == want[start..start + n],
                    "window {window} at {start}, {parts} parts"
                );
                start += n;
            }
        }
        // A gap really is zero and a tensor byte is not.
        assert_eq!(want[300..512], [0u8; 212]);
        assert!(want[512..522].iter().all(|&b| b != 0));
    }
}
