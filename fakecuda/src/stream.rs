//! Streams and events: each stream is a worker thread that runs its queued
//! operations in order; an event is a position in one stream's queue.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// One queued operation.
pub type Op = Box<dyn FnOnce() + Send>;

/// An operation a graph holds: makes a fresh [`Op`] at each launch.
pub type Replay = Arc<dyn Fn() -> Op + Send + Sync>;

/// A stream's capture state (`cuStreamBeginCapture` to `cuStreamEndCapture`).
pub enum Capture {
    /// Not capturing: operations run.
    Off,
    /// Capturing: the operations captured so far, in order.
    On(Vec<Replay>),
    /// Capturing, but an operation the fake cannot capture was queued: the
    /// capture ends with `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
    Invalidated,
}

struct Queue {
    ops: VecDeque<(u64, Op)>,
    /// Sequence number of the last operation queued (0: none yet).
    enqueued: u64,
    /// Sequence number of the last operation finished.
    completed: u64,
    /// Destroyed: the worker finishes what is queued and exits.
    closed: bool,
}

/// A stream: operations run one after another on the stream's own thread.
pub struct Stream {
    pub id: usize,
    /// Its priority (lower is greater; see `cuCtxGetStreamPriorityRange`);
    /// recorded and reported, and every stream runs alike.
    pub priority: i32,
    /// The flags it was made with (`CU_STREAM_NON_BLOCKING` or 0),
    /// recorded and reported.
    pub flags: u32,
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Whether operations are captured rather than run.
    pub capture: Mutex<Capture>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stream {
    /// A new stream of `(priority, flags)` and its worker thread.
    pub fn spawn(id: usize, (priority, flags): (i32, u32), delay: Option<Duration>) -> Arc<Stream> {
        let s = Arc::new(Stream {
            id,
            priority,
            flags,
            queue: Mutex::new(Queue {
                ops: VecDeque::new(),
                enqueued: 0,
                completed: 0,
                closed: false,
            }),
            cv: Condvar::new(),
            capture: Mutex::new(Capture::Off),
        });
        let worker = Arc::clone(&s);
        thread::Builder::new()
            .name(format!("fakecuda-stream-{id}"))
            .spawn(move || worker.run(delay))
            .expect("fakecuda: cannot start a stream thread");
        s
    }

    fn run(&self, delay: Option<Duration>) {
        loop {
            let (seq, op) = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(next) = q.ops.pop_front() {
                        break next;
                    }
                    if q.closed {
                        return;
                    }
                    q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Some(d) = delay {
                thread::sleep(d);
            }
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(op)).is_err() {
                // A waiter would never see this operation complete.
                crate::fatal(
                    &format!("operation {seq} of stream {:#x}", self.id),
                    "it panicked",
                );
            }
            let mut q = lock(&self.queue);
            q.completed = seq;
            drop(q);
            self.cv.notify_all();
        }
    }

    /// Queues `op`; returns its sequence number.
    pub fn enqueue(&self, op: Op) -> u64 {
        let mut q = lock(&self.queue);
        q.enqueued += 1;
        let seq = q.enqueued;
        q.ops.push_back((seq, op));
        drop(q);
        self.cv.notify_all();
        seq
    }

    /// Queues the operation `make` makes, or captures `make` while the
    /// stream is capturing (what `cuStreamBeginCapture` allows: the
    /// products and kernels a graph of the runtime holds).
    pub fn submit(&self, make: Replay) {
        match &mut *lock(&self.capture) {
            Capture::On(ops) => ops.push(make),
            Capture::Invalidated => {}
            Capture::Off => {
                self.enqueue(make());
            }
        }
    }

    /// Whether the stream is capturing; invalidates the capture when
    /// `invalidate` (an operation that cannot be captured was queued).
    pub fn capturing(&self, invalidate: bool) -> bool {
        let mut c = lock(&self.capture);
        match *c {
            Capture::Off => false,
            _ => {
                if invalidate {
                    *c = Capture::Invalidated;
                }
                true
            }
        }
    }

    /// Sequence number of the last operation queued so far.
    pub fn tail(&self) -> u64 {
        lock(&self.queue).enqueued
    }

    /// Whether operation `seq` has finished.
    pub fn is_done(&self, seq: u64) -> bool {
        lock(&self.queue).completed >= seq
    }

    /// Blocks until operation `seq` has finished.
    pub fn wait_for(&self, seq: u64) {
        let mut q = lock(&self.queue);
        while q.completed < seq {
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until everything queued so far has finished.
    pub fn synchronize(&self) {
        let tail = self.tail();
        self.wait_for(tail);
    }

    /// Lets the worker exit once the queue is empty (`cuStreamDestroy`: the
    /// queued work still completes).
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.cv.notify_all();
    }
}

/// Where an event was last recorded.
#[derive(Clone)]
pub struct Record {
    pub stream: Arc<Stream>,
    pub seq: u64,
    /// When the stream reached the record (set by the stream's thread).
    pub time: Arc<OnceLock<Instant>>,
}

impl Record {
    pub fn is_done(&self) -> bool {
        self.stream.is_done(self.seq)
    }
}

/// An event.
pub struct Event {
    pub timing: bool,
    pub last: Mutex<Option<Record>>,
}

impl Event {
    pub fn new(timing: bool) -> Event {
        Event {
            timing,
            last: Mutex::new(None),
        }
    }

    /// Records the event at the current end of `stream`.
    pub fn record(&self, stream: &Arc<Stream>) {
        let time = Arc::new(OnceLock::new());
        let t = Arc::clone(&time);
        let seq = stream.enqueue(Box::new(move || {
            let _ = t.set(Instant::now());
        }));
        *lock(&self.last) = Some(Record {
            stream: Arc::clone(stream),
            seq,
            time,
        });
    }

    /// The last record, if any.
    pub fn last(&self) -> Option<Record> {
        lock(&self.last).clone()
    }
}
