//! Stream capture and graphs: what the runtime's graph of a layer's
//! products needs (`cuStreamBeginCapture_v2` to `cuGraphLaunch`).
//!
//! A capturing stream keeps the operations the fake can capture (the
//! products of cuBLAS and cuBLASLt, the activation conversion kernels,
//! memsets) instead of running them; any other operation queued on it is
//! refused with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and invalidates the
//! capture, as a real driver does with what it cannot capture. A launched
//! graph queues its operations again, each checking its device ranges when
//! it runs (so a graph that outlives the memory it was captured with
//! aborts, where a GPU might read freed memory silently).
//!
//! `cuMemAlloc` on a thread with a capture open is refused: relaxed mode
//! allows it, but the runtime means to allocate nothing inside a capture
//! (its buffers are made at a list's first sighting).
//!
//! With `OFFLOAD_FAKECUDA_NO_CAPTURE=1` (read at each call),
//! `cuStreamBeginCapture_v2` fails with `CUDA_ERROR_NOT_SUPPORTED`, for
//! the tests of what the runtime does when a capture fails.

use std::collections::HashMap;
use std::ffi::c_ulonglong;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUgraph, CUgraphExec, CUresult, CUstream, CUstreamCaptureMode};

use crate::stream::{Capture, Replay};
use crate::{call, driver, lock, out};

thread_local! {
    /// Captures this thread has begun and not ended.
    static OPEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether this thread has a capture open (`cuMemAlloc` refuses then).
pub(crate) fn capturing_here() -> bool {
    OPEN.with(|o| o.get() > 0)
}

#[derive(Default)]
struct Tables {
    graphs: HashMap<usize, Arc<Vec<Replay>>>,
    execs: HashMap<usize, Arc<Vec<Replay>>>,
}

fn tables() -> &'static Mutex<Tables> {
    static T: std::sync::OnceLock<Mutex<Tables>> = std::sync::OnceLock::new();
    T.get_or_init(|| Mutex::new(Tables::default()))
}

/// What graphs and executable graphs are left (for the leak check), and
/// forgets them (the context is gone).
pub(crate) fn forget() -> Option<String> {
    let mut t = lock(tables());
    let (g, e) = (t.graphs.len(), t.execs.len());
    t.graphs.clear();
    t.execs.clear();
    (g + e > 0).then(|| format!("{g} graphs and {e} executable graphs"))
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(s: CUstream, mode: CUstreamCaptureMode) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if s.is_null() {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
        }
        if mode as u32 > 2 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        if std::env::var("OFFLOAD_FAKECUDA_NO_CAPTURE").is_ok_and(|v| v == "1") {
            return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
        }
        let st = d.stream_any(s)?;
        let mut c = lock(&st.capture);
        if !matches!(*c, Capture::Off) {
            return Err(CUresult::CUDA_ERROR_ILLEGAL_STATE);
        }
        *c = Capture::On(Vec::new());
        OPEN.with(|o| o.set(o.get() + 1));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(s: CUstream, graph: *mut CUgraph) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if graph.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let st = d.stream_any(s)?;
        let ops = match std::mem::replace(&mut *lock(&st.capture), Capture::Off) {
            Capture::Off => return Err(CUresult::CUDA_ERROR_ILLEGAL_STATE),
            other => {
                OPEN.with(|o| o.set(o.get().saturating_sub(1)));
                other
            }
        };
        let ops = match ops {
            Capture::Off => return Err(CUresult::CUDA_ERROR_ILLEGAL_STATE),
            Capture::Invalidated => {
                out(graph, std::ptr::null_mut())?;
                return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
            }
            Capture::On(ops) => ops,
        };
        let id = d.id();
        lock(tables()).graphs.insert(id, Arc::new(ops));
        out(graph, id as CUgraph)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut CUgraphExec,
    graph: CUgraph,
    flags: c_ulonglong,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if exec.is_null() || flags != 0 {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let mut t = lock(tables());
        let ops = t
            .graphs
            .get(&(graph as usize))
            .cloned()
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        let id = d.id();
        t.execs.insert(id, ops);
        out(exec, id as CUgraphExec)
    })
}

#[no_mangle]
pub extern "C" fn cuGraphLaunch(exec: CUgraphExec, s: CUstream) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let ops = lock(tables())
            .execs
            .get(&(exec as usize))
            .cloned()
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        let st = d.stream(s)?;
        for make in ops.iter() {
            st.enqueue(make());
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cuGraphDestroy(graph: CUgraph) -> CUresult {
    call(|| {
        driver(true)?;
        lock(tables())
            .graphs
            .remove(&(graph as usize))
            .map(|_| ())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    })
}

/// Destroying an executable graph with launches still queued is allowed
/// (the driver frees it once they finish): the queued operations hold
/// what they need.
#[no_mangle]
pub extern "C" fn cuGraphExecDestroy(exec: CUgraphExec) -> CUresult {
    call(|| {
        driver(true)?;
        lock(tables())
            .execs
            .remove(&(exec as usize))
            .map(|_| ())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)
    })
}
