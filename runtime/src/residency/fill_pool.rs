//! A staged reader's helper threads: they fill parts of its staging
//! buffers, and stay for the stager's life instead of being started for
//! every fill (starting and joining a thread took 59–150 µs on the 2-core
//! CI VM, medians of `offload bench h2d`'s "thread start + join" line: a
//! quarter to a half of what one thread there needs to fill 2 MiB).

use std::panic::{self, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

/// A part of a fill, its borrows erased to `'static` by [`FillHelpers::scope`].
type Task = Box<dyn FnOnce() + Send + 'static>;

/// The helper threads of one reader, started when a fill first needs them.
#[derive(Default)]
pub(crate) struct FillHelpers {
    /// Names the threads: `{name}-{i}` (`offload-fill-{i}` when empty).
    name: String,
    workers: Vec<(Sender<Task>, JoinHandle<()>)>,
}

impl FillHelpers {
    /// Helpers whose threads are named `{name}-0`, `{name}-1`, ...
    pub(crate) fn named(name: String) -> Self {
        FillHelpers {
            name,
            workers: Vec::new(),
        }
    }

    /// Runs `parts[0]` on the caller's thread and each other part on a
    /// helper of its own (started if need be; on the caller's thread, after
    /// its own, if a helper cannot be started), and returns every part's
    /// result in order once all have finished. A part that panicked is
    /// resumed on the caller once every part has finished.
    pub(crate) fn scope<'a, R: Send + 'a>(
        &mut self,
        parts: Vec<Box<dyn FnOnce() -> R + Send + 'a>>,
    ) -> Vec<R> {
        let n = parts.len();
        let mut parts = parts.into_iter();
        let Some(first) = parts.next() else {
            return Vec::new();
        };
        type Done<R> = (usize, std::thread::Result<R>);
        // The parts' results come back over a channel whose senders are
        // the tasks' (and, until every task is handed out, this one's).
        // Dropping it, also while a panic unwinds, drops that first sender
        // and then waits until every task given to a helper has been
        // dropped (run or not): only then does the channel disconnect.
        struct WaitAll<R> {
            tx: Option<Sender<Done<R>>>,
            rx: Receiver<Done<R>>,
            got: Vec<Done<R>>,
        }
        impl<R> WaitAll<R> {
            fn finish(&mut self) {
                self.tx = None;
                while let Ok(r) = self.rx.recv() {
                    self.got.push(r);
                }
            }
        }
        impl<R> Drop for WaitAll<R> {
            fn drop(&mut self) {
                self.finish();
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded::<Done<R>>();
        let mut wait = WaitAll {
            tx: Some(tx),
            rx,
            got: Vec::with_capacity(n),
        };
        let mut inline = Vec::new();
        for (i, part) in parts.enumerate() {
            let Some(tx) = wait.tx.clone() else {
                unreachable!("the sender stays until every part is handed out")
            };
            let task: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
                let r = panic::catch_unwind(AssertUnwindSafe(part));
                let _ = tx.send((i + 1, r));
            });
            // SAFETY: the task borrows only what 'a outlives (the caller's
            // data, which outlives this call), and this function neither
            // returns nor unwinds before the task has been dropped: `wait`
            // is finished before the results are read, and its Drop, which
            // runs on any unwind out of here, finishes it too; finishing
            // drops its own sender and blocks until every other sender is
            // gone, and each task owns one, dropped only with the task
            // (after it ran, or unrun when a helper's channel is dropped).
            // The transmute changes only the trait object's lifetime bound,
            // not its layout.
            let task: Task =
                unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Task>(task) };
            if let Some(task) = self.give(i, task) {
                inline.push(task);
            }
        }
        wait.tx = None;
        let r0 = panic::catch_unwind(AssertUnwindSafe(first));
        for task in inline {
            task();
        }
        wait.finish();
        let mut results: Vec<Option<std::thread::Result<R>>> = (0..n).map(|_| None).collect();
        results[0] = Some(r0);
        for (i, r) in wait.got.drain(..) {
            results[i] = Some(r);
        }
        let mut out = Vec::with_capacity(n);
        let mut panicked = None;
        for r in results {
            match r {
                Some(Ok(v)) => out.push(v),
                Some(Err(p)) => {
                    panicked.get_or_insert(p);
                }
                // Dropped unrun: only if a helper thread died, which a
                // task's own panic (caught above) cannot make happen.
                None => {
                    panicked.get_or_insert(Box::new("a fill helper thread stopped"));
                }
            }
        }
        if let Some(p) = panicked {
            panic::resume_unwind(p);
        }
        out
    }

    /// Hands `task` to helper `i` (started if need be); the task back if no
    /// helper can take it.
    fn give(&mut self, i: usize, task: Task) -> Option<Task> {
        while self.workers.len() <= i {
            let (tx, rx) = crossbeam_channel::unbounded::<Task>();
            let h = std::thread::Builder::new()
                .name(format!(
                    "{}-{}",
                    if self.name.is_empty() {
                        "offload-fill"
                    } else {
                        &self.name
                    },
                    self.workers.len()
                ))
                .spawn(move || {
                    for task in rx {
                        task();
                    }
                });
            match h {
                Ok(h) => self.workers.push((tx, h)),
                Err(_) => return Some(task),
            }
        }
        self.workers[i].0.send(task).err().map(|e| e.0)
    }

    /// Helper threads started so far.
    #[cfg(test)]
    pub(crate) fn threads(&self) -> usize {
        self.workers.len()
    }
}

impl Drop for FillHelpers {
    fn drop(&mut self) {
        for (tx, h) in self.workers.drain(..) {
            drop(tx);
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Part<'a> = Box<dyn FnOnce() -> usize + Send + 'a>;

    /// Parts that write their index into their own slot of a borrowed
    /// buffer and record the thread they ran on.
    fn parts<'a>(
        slots: &'a mut [usize],
        threads: &'a Mutex<Vec<std::thread::ThreadId>>,
    ) -> Vec<Part<'a>> {
        slots
            .iter_mut()
            .enumerate()
            .map(|(i, slot)| {
                Box::new(move || {
                    *slot = i + 100;
                    threads.lock().unwrap().push(std::thread::current().id());
                    i
                }) as Part<'a>
            })
            .collect()
    }

    #[test]
    fn parts_run_on_helpers_that_stay_and_results_come_back_in_order() {
        let mut h = FillHelpers::default();
        let threads = Mutex::new(Vec::new());
        let mut seen = std::collections::HashSet::new();
        for round in 0..3 {
            let mut slots = vec![0usize; 4];
            assert_eq!(h.scope(parts(&mut slots, &threads)), [0, 1, 2, 3]);
            assert_eq!(slots, [100, 101, 102, 103], "round {round}");
            let ran = std::mem::take(&mut *threads.lock().unwrap());
            assert_eq!(ran.len(), 4);
            assert!(
                ran.contains(&std::thread::current().id()),
                "part 0 on the caller"
            );
            seen.extend(ran);
        }
        // Three helpers for three rounds of four parts: started once, reused.
        assert_eq!(h.threads(), 3);
        assert_eq!(seen.len(), 4);
        // Fewer parts use the helpers already there; none is no work.
        let mut slots = vec![0usize; 2];
        assert_eq!(h.scope(parts(&mut slots, &threads)), [0, 1]);
        assert_eq!(h.threads(), 3);
        assert!(h.scope(Vec::<Part<'_>>::new()).is_empty());
    }

    #[test]
    fn a_panicking_part_is_resumed_after_every_part_has_finished() {
        let mut h = FillHelpers::default();
        let done = Mutex::new(Vec::new());
        let r = panic::catch_unwind(AssertUnwindSafe(|| {
            let jobs: Vec<Box<dyn FnOnce() + Send + '_>> = (0..4)
                .map(|i| {
                    let done = &done;
                    Box::new(move || {
                        if i == 2 {
                            panic!("part 2 fails");
                        }
                        // The others finish after the panic, yet before the scope returns.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        done.lock().unwrap().push(i);
                    }) as Box<dyn FnOnce() + Send + '_>
                })
                .collect();
            h.scope(jobs);
        }));
        let p = r.expect_err("the part's panic reaches the caller");
        assert_eq!(p.downcast_ref::<&str>(), Some(&"part 2 fails"));
        let mut d = done.lock().unwrap().clone();
        d.sort_unstable();
        assert_eq!(d, [0, 1, 3]);
        // The helpers survive it.
        let threads = Mutex::new(Vec::new());
        let mut slots = vec![0usize; 4];
        assert_eq!(h.scope(parts(&mut slots, &threads)), [0, 1, 2, 3]);
        assert_eq!(h.threads(), 3);
    }
}
