//! A list of products queued as one CUDA graph ([`CudaConfig::graphs`]).
//!
//! Queueing a product costs the calling thread far more than a kernel
//! launch (cuBLAS's own work at every call), and a small model's pass is
//! bound by that thread (docs/benchmarks.md). With graphs on,
//! [`Device::launch_all`] queues a list of products one by one the first
//! time it sees that list (the same operands at the same addresses, on the
//! same stream), captures it into a graph the second time, and launches
//! the kept graph from then on: one driver call for the whole list. The
//! first sighting runs what a first product builds (the cuBLAS handle, the
//! conversion kernels, cuBLASLt's plans, the scratch) and makes the
//! workspace cuBLAS gets while capturing, outside any capture, and a list
//! seen once is never captured.
//!
//! Every call checks each product as [`Device::launch`] would (types,
//! operands mapped now, alignment, overlap) before anything is queued. A
//! graph holds the addresses it was captured with: of the operands, which
//! are part of its key, and of the stream's activation scratch and
//! workspace (cuBLASLt's, or cuBLAS's own, which is bound to a buffer of
//! ours while a graph is captured), which the device frees only with the
//! stream (a buffer that grows retires the old one until then), so a kept
//! graph never reads freed memory. A stream's graphs go when it is
//! destroyed; at most [`MAX_GRAPHS`] are kept, all of them dropped when
//! there would be more.
//!
//! A capture or a graph launch that fails turns graphs off for the device,
//! with the reason ([`CudaDevice::graphs_off`]), and the list is queued
//! product by product, as every later one.
//!
//! [`CudaConfig::graphs`]: super::CudaConfig::graphs
//! [`Device::launch_all`]: crate::device::Device::launch_all
//! [`Device::launch`]: crate::device::Device::launch

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cudarc::driver::sys;

use super::handles::{Context, Stream};
use super::{lock, result, CudaDevice};
use crate::device::{Kernel, StreamId};
use crate::error::Result;

/// Most graphs a device keeps.
pub const MAX_GRAPHS: usize = 4096;

/// A product as a graph key: X, X's type, tokens, W, W's type, n, k, Y.
type ProductKey = [u64; 8];

/// Graph launches of [`Device::launch_all`](crate::device::Device::launch_all), cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphLaunches {
    /// Products queued one by one at their list's first sighting.
    pub first_seen: u64,
    /// Lists captured into a new graph (at their second sighting).
    pub captured: u64,
    /// Products queued while a graph was captured.
    pub captured_products: u64,
    /// Graphs launched (captured ones included).
    pub launched: u64,
    /// Products the launched graphs ran.
    pub products: u64,
    /// Times every kept graph was dropped to keep at most [`MAX_GRAPHS`].
    pub cleared: u64,
    /// Captures or graph launches that failed, turning graphs off.
    pub failed: u64,
}

/// The graphs a device keeps.
pub(super) struct Graphs {
    ctx: Arc<Context>,
    execs: HashMap<(u64, Vec<ProductKey>), sys::CUgraphExec>,
    /// Lists seen once (queued one by one), not yet captured.
    seen: HashSet<(u64, Vec<ProductKey>)>,
    counts: GraphLaunches,
    off: Option<String>,
}

// SAFETY: executable graphs are driver handles usable from any thread with
// the context bound; the device keeps `Graphs` behind a mutex.
unsafe impl Send for Graphs {}

impl Graphs {
    pub(super) fn new(ctx: &Arc<Context>) -> Self {
        Graphs {
            ctx: ctx.clone(),
            execs: HashMap::new(),
            seen: HashSet::new(),
            counts: GraphLaunches::default(),
            off: None,
        }
    }

    pub(super) fn counts(&self) -> GraphLaunches {
        self.counts
    }

    pub(super) fn off(&self) -> Option<&str> {
        self.off.as_deref()
    }

    /// Destroy the graphs whose key passes `drop_it`.
    fn destroy_where(&mut self, drop_it: impl Fn(u64) -> bool) {
        let _ = self.ctx.bind();
        self.execs.retain(|(stream, _), exec| {
            if !drop_it(*stream) {
                return true;
            }
            // SAFETY: a live executable graph, taken out of the table here
            // (never launched again); launches still queued finish first.
            let _ = unsafe { result::graph_exec_destroy(*exec) };
            false
        });
    }

    /// Destroy the graphs of a stream being destroyed.
    pub(super) fn forget_stream(&mut self, stream: u64) {
        self.destroy_where(|s| s == stream);
        self.seen.retain(|(s, _)| *s != stream);
    }

    /// Turn graphs off for good, saying why.
    fn turn_off(&mut self, why: String) {
        self.off = Some(why);
        self.counts.failed += 1;
        self.destroy_where(|_| true);
        self.seen.clear();
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        self.destroy_where(|_| true);
    }
}

/// A capture begun on a stream and not yet ended: ended (its graph
/// destroyed) when dropped while still holding the stream.
struct OpenCapture(Option<sys::CUstream>);

impl Drop for OpenCapture {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // SAFETY: the stream is live (its owner's Arc outlives this
            // guard, a local of `capture`) and capturing since
            // `stream_begin_capture` on this thread; the graph, if any, is
            // destroyed once.
            unsafe {
                if let Ok(g) = result::stream_end_capture(s) {
                    if !g.is_null() {
                        let _ = result::graph_destroy(g);
                    }
                }
            }
        }
    }
}

fn key(kernel: &Kernel) -> ProductKey {
    match *kernel {
        Kernel::Matmul {
            x,
            x_dtype,
            tokens,
            w,
            w_dtype,
            n,
            k,
            y,
        } => [
            x.0,
            x_dtype as u64,
            tokens as u64,
            w.0,
            w_dtype as u64,
            n as u64,
            k as u64,
            y.0,
        ],
        // Only lists of products reach here (`launch_all`).
        _ => [u64::MAX; 8],
    }
}

impl CudaDevice {
    /// Queue `kernels`, every one a [`Kernel::Matmul`], on `stream` as one
    /// graph (see the module's documentation).
    pub(super) fn launch_graph(&self, kernels: &[Kernel], stream: StreamId) -> Result<()> {
        {
            let mem = lock(&self.mem);
            for k in kernels {
                self.check_matmul(k, &mem)?;
            }
        }
        let s = self.stream(stream)?;
        let key = (stream.0, kernels.iter().map(key).collect::<Vec<_>>());
        let n = kernels.len() as u64;
        let mut g = lock(&self.graphs);
        if g.off.is_some() {
            drop(g);
            return self.queue_each(kernels, stream);
        }
        let exec = match g.execs.get(&key) {
            Some(&exec) => exec,
            None if !g.seen.contains(&key) => {
                // First sighting: one by one, outside any capture.
                if g.seen.len() >= MAX_GRAPHS {
                    g.seen.clear();
                }
                g.seen.insert(key);
                drop(g);
                self.queue_each(kernels, stream)?;
                // The workspace cuBLAS gets while capturing, made now, outside any capture.
                let reserved = self.reserve_capture_workspace(stream);
                let mut g = lock(&self.graphs);
                g.counts.first_seen += n;
                if let Err(e) = reserved {
                    g.turn_off(format!(
                        "reserving cuBLAS's workspace for graphs failed: {e}"
                    ));
                }
                return Ok(());
            }
            None => {
                self.ctx.bind()?;
                match self.capture(kernels, stream, &s) {
                    Ok(exec) => {
                        if g.execs.len() >= MAX_GRAPHS {
                            g.destroy_where(|_| true);
                            g.counts.cleared += 1;
                        }
                        g.seen.remove(&key);
                        g.execs.insert(key, exec);
                        g.counts.captured += 1;
                        g.counts.captured_products += n;
                        exec
                    }
                    Err(e) => {
                        g.turn_off(format!("capturing {n} products failed: {e}"));
                        drop(g);
                        return self.queue_each(kernels, stream);
                    }
                }
            }
        };
        self.ctx.bind()?;
        // SAFETY: a live executable graph of this context (kept in the
        // table, which the lock holds) and a live stream (Arc); the
        // products' operands were checked mapped above and the trait makes
        // callers keep them mapped until the queued work has run; the
        // scratch and workspaces the graph uses live as long as the stream.
        match unsafe { result::graph_launch(exec, s.raw) } {
            Ok(()) => {
                g.counts.launched += 1;
                g.counts.products += n;
                Ok(())
            }
            Err(e) => {
                g.turn_off(format!("launching a graph of {n} products failed: {e}"));
                drop(g);
                self.queue_each(kernels, stream)
            }
        }
    }

    /// Queue each product of `kernels` on its own (all checked by the caller).
    fn queue_each(&self, kernels: &[Kernel], stream: StreamId) -> Result<()> {
        kernels
            .iter()
            .try_for_each(|k| self.queue_matmul(k, stream, false))
    }

    /// Capture `kernels` on `s` into an executable graph; the stream is
    /// out of capture mode again whatever happens.
    fn capture(
        &self,
        kernels: &[Kernel],
        stream: StreamId,
        s: &Stream,
    ) -> Result<sys::CUgraphExec> {
        // SAFETY: a live stream of the current context (bound by the
        // caller); the graphs lock, held by the caller, keeps other
        // captures off it, and the trait leaves the stream to its caller
        // for the length of this call.
        unsafe { result::stream_begin_capture(s.raw)? };
        // Ends the capture (and drops what it captured) if a product
        // panics, so the stream is never left capturing.
        let mut open = OpenCapture(Some(s.raw));
        let queued = kernels
            .iter()
            .try_for_each(|k| self.queue_matmul(k, stream, true));
        open.0 = None;
        // SAFETY: capturing since just above, on this thread.
        let graph = unsafe { result::stream_end_capture(s.raw) };
        let graph = match (queued, graph) {
            (Ok(()), Ok(g)) => g,
            (Err(e), Ok(g)) => {
                if !g.is_null() {
                    // SAFETY: the graph just captured, destroyed once.
                    let _ = unsafe { result::graph_destroy(g) };
                }
                return Err(e);
            }
            (Err(e), Err(_)) | (Ok(()), Err(e)) => return Err(e),
        };
        // SAFETY: the graph just captured, in the current context.
        let exec = unsafe { result::graph_instantiate(graph) };
        // SAFETY: destroyed once; the executable graph does not need it.
        let _ = unsafe { result::graph_destroy(graph) };
        exec
    }

    /// Graph launches so far ([`CudaConfig::graphs`](super::CudaConfig::graphs)).
    pub fn graph_launches(&self) -> GraphLaunches {
        lock(&self.graphs).counts()
    }

    /// Graphs kept now.
    #[cfg(test)]
    pub(super) fn graphs_kept(&self) -> usize {
        lock(&self.graphs).execs.len()
    }

    /// Why graphs are off, when a capture, a graph launch or the workspace
    /// for captures failed; `None` while they work (or were never asked for).
    pub fn graphs_off(&self) -> Option<String> {
        lock(&self.graphs).off().map(str::to_string)
    }
}
