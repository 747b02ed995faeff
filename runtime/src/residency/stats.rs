//! Counters the runtime keeps, and the snapshot it reports.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::device::{Device, StreamId};
use crate::error::Result;

/// One entry of the per-layer timeline: an upload or a compute-side wait.
#[derive(Clone, Debug, PartialEq)]
pub struct TimelineEntry {
    /// `component/layer`.
    pub layer: String,
    /// What happened: `"upload"` (host→device copy), `"stage"` (a staged
    /// layer read and queued, its merges included), `"merge"` (fuse-on-upload
    /// merges of a layer running on the merge stream, with either host
    /// policy) or `"wait"` (compute waited for weights).
    pub kind: &'static str,
    /// Start, in seconds since the runtime was made.
    pub start_s: f64,
    /// End, in seconds since the runtime was made.
    pub end_s: f64,
    /// Bytes copied (uploads).
    pub bytes: usize,
}

/// A snapshot of what the runtime has done since it was made (counters) and
/// its memory use (current and peak since the last [`super::Runtime::reset_peaks`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeStats {
    /// Bytes copied host → device: counted as each copy is queued (an
    /// upload handed to the runtime's uploader thread, when it is handed
    /// over, so that a call's counts include what it queued).
    pub bytes_h2d: u64,
    /// Layer uploads (counted as `bytes_h2d` is).
    pub uploads: u64,
    /// Layers evicted from the device (ring slot reuse not counted).
    pub evictions: u64,
    /// Acquires.
    pub acquires: u64,
    /// Acquires that found the layer already on the device (or its upload already queued).
    pub hits: u64,
    /// Nanoseconds the compute stream waited for weights.
    pub stall_ns: u64,
    /// Waits for weights whose time the device could not give (a failed
    /// stream, or a driver that refused to time them): not in `stall_ns`.
    pub stall_unmeasured: u64,
    /// Device bytes in use for weights now (whole pages).
    pub device_bytes: usize,
    /// Peak device bytes for weights.
    pub peak_device_bytes: usize,
    /// Host bytes the runtime holds now (pinned copies, staging buffers).
    pub host_bytes: usize,
    /// Peak host bytes.
    pub peak_host_bytes: usize,
    /// Bytes past the end of resident layers up to their last page.
    pub page_waste_bytes: usize,
    /// LoRA merges run on the device (one per patched tensor and row slice
    /// per upload; counted as `bytes_h2d` is).
    pub merges: u64,
    /// Weight bytes those merges read and wrote (each byte once).
    pub merged_bytes: u64,
    /// Device bytes holding LoRA factors now.
    pub lora_device_bytes: usize,
}

impl RuntimeStats {
    /// Counters accumulated between `earlier` and `self` (memory figures are
    /// `self`'s; a counter that went down, from snapshots given in the wrong
    /// order, reads 0).
    pub fn since(&self, earlier: &RuntimeStats) -> RuntimeStats {
        RuntimeStats {
            bytes_h2d: self.bytes_h2d.saturating_sub(earlier.bytes_h2d),
            uploads: self.uploads.saturating_sub(earlier.uploads),
            evictions: self.evictions.saturating_sub(earlier.evictions),
            acquires: self.acquires.saturating_sub(earlier.acquires),
            hits: self.hits.saturating_sub(earlier.hits),
            stall_ns: self.stall_ns.saturating_sub(earlier.stall_ns),
            stall_unmeasured: self
                .stall_unmeasured
                .saturating_sub(earlier.stall_unmeasured),
            merges: self.merges.saturating_sub(earlier.merges),
            merged_bytes: self.merged_bytes.saturating_sub(earlier.merged_bytes),
            ..self.clone()
        }
    }

    /// The snapshot as a JSON object.
    pub fn to_json(&self) -> String {
        format!(
            concat!(
                "{{\"bytes_h2d\":{},\"uploads\":{},\"evictions\":{},\"acquires\":{},\"hits\":{},",
                "\"stall_s\":{},\"stall_unmeasured\":{},\"device_bytes\":{},\"peak_device_bytes\":{},\"host_bytes\":{},",
                "\"peak_host_bytes\":{},\"page_waste_bytes\":{},\"merges\":{},",
                "\"merged_bytes\":{},\"lora_device_bytes\":{}}}"
            ),
            self.bytes_h2d,
            self.uploads,
            self.evictions,
            self.acquires,
            self.hits,
            self.stall_ns as f64 * 1e-9,
            self.stall_unmeasured,
            self.device_bytes,
            self.peak_device_bytes,
            self.host_bytes,
            self.peak_host_bytes,
            self.page_waste_bytes,
            self.merges,
            self.merged_bytes,
            self.lora_device_bytes
        )
    }
}

/// The live counters.
pub(crate) struct Counters {
    pub(crate) bytes_h2d: AtomicU64,
    pub(crate) uploads: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) acquires: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) stall_ns: AtomicU64,
    pub(crate) stall_unmeasured: AtomicU64,
    pub(crate) merges: AtomicU64,
    pub(crate) merged_bytes: AtomicU64,
    host_bytes: AtomicUsize,
    peak_host_bytes: AtomicUsize,
    pub(crate) epoch: Instant,
    pub(crate) timeline: Option<Mutex<Vec<TimelineEntry>>>,
}

impl Counters {
    pub(crate) fn new(timeline: bool) -> Self {
        Counters {
            bytes_h2d: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            acquires: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            stall_ns: AtomicU64::new(0),
            stall_unmeasured: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            merged_bytes: AtomicU64::new(0),
            host_bytes: AtomicUsize::new(0),
            peak_host_bytes: AtomicUsize::new(0),
            epoch: Instant::now(),
            timeline: timeline.then(|| Mutex::new(Vec::new())),
        }
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn host_alloc(&self, n: usize) {
        let now = self.host_bytes.fetch_add(n, Ordering::Relaxed) + n;
        self.peak_host_bytes.fetch_max(now, Ordering::Relaxed);
    }

    pub(crate) fn host_free(&self, n: usize) {
        self.host_bytes.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn host_bytes(&self) -> (usize, usize) {
        (
            self.host_bytes.load(Ordering::Relaxed),
            self.peak_host_bytes.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn reset_host_peak(&self) {
        self.peak_host_bytes
            .store(self.host_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn since_epoch(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.epoch).as_secs_f64()
    }

    pub(crate) fn push_timeline(&self, e: TimelineEntry) {
        if let Some(t) = &self.timeline {
            t.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        }
    }
}

/// When a stream reached a point of its queue: set by a host function queued
/// there ([`stream_mark`]), read by a later one ([`end_on`]).
pub(crate) type StreamMark = Arc<Mutex<Option<Instant>>>;

/// Queues a host function on `stream` that notes when the stream reaches
/// it; an error if it cannot be queued.
pub(crate) fn stream_mark(device: &dyn Device, stream: StreamId) -> Result<StreamMark> {
    let mark: StreamMark = Arc::new(Mutex::new(None));
    let set = mark.clone();
    device.launch_host_fn(
        stream,
        Box::new(move || *set.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now())),
    )?;
    Ok(mark)
}

/// [`stream_mark`] for a best-effort timeline entry: `None` when the
/// timeline is off or the host function could not be queued.
pub(crate) fn timeline_mark(
    device: &dyn Device,
    counters: &Counters,
    stream: StreamId,
) -> Option<StreamMark> {
    counters.timeline.as_ref()?;
    stream_mark(device, stream).ok()
}

/// Queues a host function on `stream` that adds a timeline entry `kind` for
/// `layer` (`bytes` bytes) from the time `mark` holds to when it runs.
pub(crate) fn end_on(
    device: &dyn Device,
    counters: &Arc<Counters>,
    stream: StreamId,
    mark: StreamMark,
    layer: String,
    kind: &'static str,
    bytes: usize,
) -> Result<()> {
    let counters = counters.clone();
    device.launch_host_fn(
        stream,
        Box::new(move || {
            let end = Instant::now();
            if let Some(t0) = *mark.lock().unwrap_or_else(|p| p.into_inner()) {
                counters.push_timeline(TimelineEntry {
                    layer,
                    kind,
                    start_s: counters.since_epoch(t0),
                    end_s: counters.since_epoch(end),
                    bytes,
                });
            }
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_differences() {
        let a = RuntimeStats {
            bytes_h2d: 100,
            uploads: 2,
            stall_ns: 1_500_000_000,
            device_bytes: 4096,
            ..RuntimeStats::default()
        };
        let b = RuntimeStats {
            bytes_h2d: 350,
            uploads: 5,
            stall_ns: 2_000_000_000,
            stall_unmeasured: 1,
            peak_device_bytes: 8192,
            ..a.clone()
        };
        let d = b.since(&a);
        assert_eq!(
            (d.bytes_h2d, d.uploads, d.stall_ns, d.peak_device_bytes),
            (250, 3, 500_000_000, 8192)
        );
        assert_eq!(
            d.to_json(),
            "{\"bytes_h2d\":250,\"uploads\":3,\"evictions\":0,\"acquires\":0,\"hits\":0,\"stall_s\":0.5,\
             \"stall_unmeasured\":1,\"device_bytes\":4096,\"peak_device_bytes\":8192,\"host_bytes\":0,\"peak_host_bytes\":0,\
             \"page_waste_bytes\":0,\"merges\":0,\"merged_bytes\":0,\"lora_device_bytes\":0}"
        );
    }
}
