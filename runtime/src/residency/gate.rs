//! The copy gate: upload jobs queue their copies under its shared side; a
//! synchronisation of the copy stream takes its exclusive side, with a
//! timeout.
//!
//! A staged or uploader job's copies, merges and ready event must not be
//! split by a synchronisation (which clears a failure left on the stream
//! before the ready event could carry it). `std::sync::RwLock` gives that,
//! but its exclusive side cannot time out: a job stuck while queueing (a
//! driver call that never returns, a test's held upload) would hang every
//! caller of `sync_copy` for good, among them `set_loras`, which must
//! instead report the stuck job and keep the LoRA factors it may still read.
//! Waiting writers go first: new jobs wait behind them, so a steady stream
//! of uploads cannot starve a synchronisation into a spurious timeout.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct GateState {
    /// Jobs queueing now.
    sharing: usize,
    /// Whether a synchronisation holds the gate.
    exclusive: bool,
    /// Synchronisations waiting for the gate.
    waiting: usize,
}

/// `timeout` from now; a century from now when that is past what an
/// `Instant` holds (a `wait_timeout` of `Duration::MAX`: wait for good;
/// adding it to an `Instant` panics).
pub(super) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// A reader-writer gate whose writers can give up after a timeout.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

/// The shared side, held while a job queues its work; released on drop.
pub(crate) struct SharedGuard<'a>(&'a Gate);

/// The exclusive side, held while the copy stream is synchronised; released on drop.
pub(crate) struct ExclusiveGuard<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        // The state is a few counters updated in one step each: a panic
        // elsewhere cannot leave them half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take the shared side, after every synchronisation holding or waiting for the gate.
    pub(crate) fn share(&self) -> SharedGuard<'_> {
        let mut st = self.lock();
        while st.exclusive || st.waiting > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.sharing += 1;
        SharedGuard(self)
    }

    /// Take the exclusive side once no job is queueing, or `None` if one
    /// still is after `timeout`.
    pub(crate) fn exclusive(&self, timeout: Duration) -> Option<ExclusiveGuard<'_>> {
        let deadline = deadline_after(timeout);
        let mut st = self.lock();
        st.waiting += 1;
        while st.exclusive || st.sharing > 0 {
            let now = Instant::now();
            if now >= deadline {
                st.waiting -= 1;
                drop(st);
                // Jobs held back by this waiter may go on.
                self.changed.notify_all();
                return None;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.waiting -= 1;
        st.exclusive = true;
        Some(ExclusiveGuard(self))
    }
}

impl Drop for SharedGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.sharing -= 1;
        if st.sharing == 0 {
            drop(st);
            self.0.changed.notify_all();
        }
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().exclusive = false;
        self.0.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_queueing_job_times_the_synchronisation_out_and_then_lets_it_in() {
        let gate = Gate::default();
        let job = gate.share();
        assert!(gate.exclusive(Duration::from_millis(20)).is_none());
        // The timed-out waiter is gone: a second job is not held back.
        let second = gate.share();
        drop(job);
        assert!(gate.exclusive(Duration::ZERO).is_none());
        drop(second);
        let sync = gate.exclusive(Duration::ZERO).expect("no job queueing");
        assert!(gate.exclusive(Duration::ZERO).is_none(), "one at a time");
        drop(sync);
        assert!(gate.exclusive(Duration::ZERO).is_some());
    }

    #[test]
    fn a_waiting_synchronisation_goes_before_new_jobs() {
        let gate = Arc::new(Gate::default());
        let job = gate.share();
        let synced = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (gate, synced) = (gate.clone(), synced.clone());
            std::thread::spawn(move || {
                let g = gate.exclusive(Duration::from_secs(60));
                synced.store(true, Ordering::SeqCst);
                g.is_some()
            })
        };
        // Wait until the writer is registered as waiting.
        while gate.lock().waiting == 0 {
            std::thread::yield_now();
        }
        let late = {
            let (gate, synced) = (gate.clone(), synced.clone());
            // The new job gets in only after the synchronisation.
            std::thread::spawn(move || {
                let _g = gate.share();
                synced.load(Ordering::SeqCst)
            })
        };
        // The new job is held back while the first one still queues.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !late.is_finished(),
            "a new job went before a waiting synchronisation"
        );
        drop(job);
        assert!(waiter.join().unwrap(), "the synchronisation got the gate");
        assert!(late.join().unwrap(), "the new job waited for it");
    }
}
