//! Timing work on a GPU stream, shared by `offload bench merge` and
//! `offload bench h2d`: CUDA events around the work, an optional gate that
//! holds the stream until everything is queued, and a device-to-device copy
//! (the Device trait has none).

use std::ffi::c_uint;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use offload_runtime::device::cuda::CudaDevice;
use offload_runtime::device::{Device, DevicePtr, StreamId};

/// A driver call's result as ours: `call failed: CODE` unless it succeeded.
pub(crate) fn cuda(call: &str, r: sys::CUresult) -> Result<(), String> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call} failed: {r:?}"))
    }
}

/// Queues a device-to-device copy of `len` bytes on `stream`. Both ranges
/// must be live allocations of `d` of at least `len` bytes that stay valid
/// until the stream has been synchronised, and must not overlap.
pub(crate) fn copy_d2d(
    d: &CudaDevice,
    dst: DevicePtr,
    src: DevicePtr,
    len: usize,
    stream: StreamId,
) -> Result<(), String> {
    let raw = d.raw_stream(stream).map_err(|e| e.to_string())?;
    d.bind().map_err(|e| e.to_string())?;
    // SAFETY: the callers pass distinct live buffers of this device of at
    // least `len` bytes, freed only after the stream is synchronised (this
    // function's contract, upheld by both benches' buffer owners); the stream
    // is live in the current context.
    cuda("cuMemcpyDtoDAsync", unsafe {
        sys::cuMemcpyDtoDAsync_v2(dst.0, src.0, len, raw)
    })
}

/// How long a gate holds its stream at most.
const GATE_LIMIT: Duration = Duration::from_secs(10);

/// Opens its gate when dropped (also on an error path).
struct Gate(Arc<AtomicBool>);

impl Drop for Gate {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Two CUDA events with timing on, around work queued on one stream.
pub(crate) struct Timer {
    start: sys::CUevent,
    end: sys::CUevent,
}

impl Timer {
    /// Creates the events in `d`'s context.
    pub(crate) fn new(d: &CudaDevice) -> Result<Self, String> {
        d.bind().map_err(|e| e.to_string())?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT as c_uint;
        let mut start: sys::CUevent = std::ptr::null_mut();
        let mut end: sys::CUevent = std::ptr::null_mut();
        // SAFETY: the device opened, so the driver library is loaded and
        // initialised, and its context is current (bound above); out-pointers
        // to locals.
        cuda("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut start, flags)
        })?;
        // SAFETY: as above.
        let r = unsafe { sys::cuEventCreate(&mut end, flags) };
        if let Err(e) = cuda("cuEventCreate", r) {
            // SAFETY: `start` was created above, never recorded, and is
            // destroyed once.
            unsafe { sys::cuEventDestroy_v2(start) };
            return Err(e);
        }
        Ok(Timer { start, end })
    }

    /// Seconds the GPU took for what `queue` puts on `stream`: events
    /// recorded before and after, waited for, `cuEventElapsedTime`.
    ///
    /// With `gate`, the stream first runs a host function that waits until
    /// everything is queued, so that the time is the GPU's alone, without
    /// the gaps of a GPU waiting for the CPU to queue work. Only for a few
    /// hundred launches at most: a full launch queue would block the CPU
    /// behind the gate (the gate gives up after 10 s).
    pub(crate) fn time(
        &self,
        d: &CudaDevice,
        stream: StreamId,
        gate: bool,
        queue: impl FnOnce() -> Result<(), String>,
    ) -> Result<f64, String> {
        let raw = d.raw_stream(stream).map_err(|e| e.to_string())?;
        let open = Gate(Arc::new(AtomicBool::new(!gate)));
        if gate {
            let flag = open.0.clone();
            d.launch_host_fn(
                stream,
                Box::new(move || {
                    let t = Instant::now();
                    while !flag.load(Ordering::Acquire) && t.elapsed() < GATE_LIMIT {
                        std::hint::spin_loop();
                    }
                }),
            )
            .map_err(|e| format!("queueing the gate: {e}"))?;
        }
        d.bind().map_err(|e| e.to_string())?;
        // SAFETY: both events and the stream are live and of the device's
        // context, which is current.
        cuda("cuEventRecord", unsafe {
            sys::cuEventRecord(self.start, raw)
        })?;
        queue()?;
        drop(open);
        d.bind().map_err(|e| e.to_string())?;
        // SAFETY: as above.
        cuda("cuEventRecord", unsafe {
            sys::cuEventRecord(self.end, raw)
        })?;
        // SAFETY: a live event, recorded above.
        cuda("cuEventSynchronize", unsafe {
            sys::cuEventSynchronize(self.end)
        })?;
        let mut ms = 0f32;
        // SAFETY: both events recorded on one stream and complete; out-pointer
        // to a local.
        cuda("cuEventElapsedTime", unsafe {
            sys::cuEventElapsedTime_v2(&mut ms, self.start, self.end)
        })?;
        Ok(f64::from(ms) / 1e3)
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        // SAFETY: both events were created in `new` and are destroyed once,
        // here. An event may still be pending (a sample that failed after
        // recording it): cuEventDestroy allows that, releasing the event once
        // its work completes, and nothing uses it afterwards.
        unsafe {
            sys::cuEventDestroy_v2(self.start);
            sys::cuEventDestroy_v2(self.end);
        }
    }
}
