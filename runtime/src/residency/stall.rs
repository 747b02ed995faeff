//! Stall measurement: how long the compute stream waits for weights.
//!
//! Each measured wait is bracketed on the compute stream by two timing
//! events, and the device time between them is read on the host later, once
//! the stream has passed them ([`StallLog::resolve`]). Events cost the
//! stream nothing it would notice. Host functions, which this used to queue
//! around each wait, hold a GPU stream until a driver thread has run them
//! on the CPU (tens of microseconds each), and a streamed layer is almost
//! never ready when the engine queues its compute, so that cost fell on
//! nearly every layer of a pass.
//!
//! Pairs are queued and resolved in compute-stream order, which lets a
//! [`StallCheckpoint`] name a point of that order: the stall queued before
//! it, known once every pair before it is resolved.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use super::stats::Counters;
use crate::device::{Device, EventId, StreamId};
use crate::error::Result;

/// Pairs of timing events around the compute stream's waits, not yet read.
#[derive(Default)]
pub(crate) struct StallLog {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// (before the wait, after it), in the order queued on the compute stream.
    pending: VecDeque<(EventId, EventId)>,
    /// Timing events free for the next pair.
    free: Vec<EventId>,
    /// Every timing event made, destroyed with the runtime.
    created: Vec<EventId>,
    /// Pairs queued so far.
    queued: u64,
    /// Pairs resolved so far (always a prefix of those queued).
    resolved: u64,
    /// Checkpoints not yet reached by `resolved`: (pairs before it, its cell).
    checkpoints: VecDeque<(u64, Arc<OnceLock<u64>>)>,
}

impl Inner {
    fn take(&mut self, device: &dyn Device) -> Result<EventId> {
        if let Some(e) = self.free.pop() {
            return Ok(e);
        }
        let e = device.create_timing_event()?;
        self.created.push(e);
        Ok(e)
    }

    /// A timing event recorded on `stream`, or `None` if one cannot be.
    fn record(&mut self, device: &dyn Device, stream: StreamId) -> Option<EventId> {
        let e = self.take(device).ok()?;
        if device.record_event(e, stream).is_err() {
            self.free.push(e);
            return None;
        }
        Some(e)
    }

    /// Fill the checkpoints that every resolved pair now covers.
    fn settle(&mut self, counters: &Counters) {
        while let Some((seq, _)) = self.checkpoints.front() {
            if *seq > self.resolved {
                break;
            }
            if let Some((_, cell)) = self.checkpoints.pop_front() {
                let _ = cell.set(counters.stall_ns.load(Ordering::Relaxed));
            }
        }
    }
}

impl StallLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `stream` wait for `ready`, timing the wait. The timing is best
    /// effort: without timing events the wait is queued alone; only a
    /// failure to queue the wait itself is an error.
    pub(crate) fn wait(
        &self,
        device: &dyn Device,
        counters: &Counters,
        stream: StreamId,
        ready: EventId,
    ) -> Result<()> {
        let mut g = self.lock();
        // Under the lock, so that pairs are queued on the stream in the
        // order they are listed.
        let Some(before) = g.record(device, stream) else {
            drop(g);
            return device.stream_wait_event(stream, ready);
        };
        if let Err(e) = device.stream_wait_event(stream, ready) {
            g.free.push(before);
            return Err(e);
        }
        match g.record(device, stream) {
            Some(after) => {
                g.pending.push_back((before, after));
                g.queued += 1;
            }
            None => g.free.push(before),
        }
        Self::resolve_locked(&mut g, device, counters);
        Ok(())
    }

    /// Add the time of every pair the stream has passed to the stall
    /// counter, in order, stopping at the first it has not. Never blocks.
    pub(crate) fn resolve(&self, device: &dyn Device, counters: &Counters) {
        Self::resolve_locked(&mut self.lock(), device, counters);
    }

    fn resolve_locked(g: &mut Inner, device: &dyn Device, counters: &Counters) {
        while let Some(&(a, b)) = g.pending.front() {
            match device.event_elapsed(a, b) {
                Ok(Some(d)) => {
                    counters
                        .stall_ns
                        .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
                }
                Ok(None) => break,
                // A failed stream (its failure is reported where the weights
                // are used) or a driver that will not time the pair: counted
                // apart, so a stall of zero is never a silent failure.
                Err(_) => {
                    counters.stall_unmeasured.fetch_add(1, Ordering::Relaxed);
                }
            }
            g.pending.pop_front();
            g.free.extend([a, b]);
            g.resolved += 1;
            g.settle(counters);
        }
    }

    /// A point in compute-stream order: the waits queued so far are before it.
    pub(crate) fn checkpoint(&self, counters: &Counters) -> StallCheckpoint {
        let mut g = self.lock();
        let cell = Arc::new(OnceLock::new());
        let seq = g.queued;
        g.checkpoints.push_back((seq, cell.clone()));
        g.settle(counters);
        StallCheckpoint(cell)
    }

    /// Destroy the timing events (the compute stream must be idle).
    pub(crate) fn destroy(&self, device: &dyn Device) {
        let mut g = self.lock();
        g.pending.clear();
        g.free.clear();
        for e in std::mem::take(&mut g.created) {
            let _ = device.destroy_event(e);
        }
    }
}

/// A point in the order of the compute stream's waits for weights, taken
/// with [`super::Runtime::stall_checkpoint`]: the total stall of the waits
/// queued before it.
#[derive(Clone, Debug)]
pub struct StallCheckpoint(Arc<OnceLock<u64>>);

impl StallCheckpoint {
    /// Nanoseconds the compute stream waited for weights before this point;
    /// `None` until the device has passed every wait queued before it and
    /// the runtime has read their times (which [`super::Runtime::stats`]
    /// does: after the compute stream is synchronised, it is `Some`).
    pub fn ns(&self) -> Option<u64> {
        self.0.get().copied()
    }
}
