//! `FaultDevice`: a [`Device`] wrapper that injects faults, for reliability tests.
//!
//! It wraps any backend and, driven by a seed and a rate per kind of fault
//! ([`FaultRates`]), makes page allocations fail, copies fail (refused when
//! queued, or failing on the stream with the destination left undefined),
//! copies, event recordings and kernels run late, and kernel launches fail. Every
//! fault injected is counted by kind ([`FaultCounts`]), and injection can be
//! switched off at any time ([`FaultDevice::set_enabled`]) so that a test can
//! check that the code above recovers.
//!
//! Everything else is forwarded unchanged: handles (pages, ranges, streams,
//! events) are the inner device's, so a test may read device memory through
//! the inner device on the same streams without faults.
//!
//! Decisions are deterministic for a seed: the n-th call of each kind of
//! operation is faulted or not, and delayed by how much, as a pure function
//! of the seed, the kind and n. (Which call is the n-th depends on the
//! order in which threads call the device; with one thread it is fixed.)
//!
//! ```
//! use std::sync::Arc;
//! use offload_runtime::device::fault::{FaultConfig, FaultDevice, FaultKind, FaultRates};
//! use offload_runtime::device::{Device, HostConfig, HostDevice};
//!
//! # fn main() -> offload_runtime::Result<()> {
//! let host = Arc::new(HostDevice::new(HostConfig {
//!     capacity: 8 << 20,
//!     page_size: 64 << 10,
//!     link_gbps: None,
//! })?);
//! let dev = FaultDevice::new(
//!     host.clone(),
//!     FaultConfig {
//!         seed: 7,
//!         rates: FaultRates { alloc_page: 1.0, ..FaultRates::default() },
//!         ..FaultConfig::default()
//!     },
//! );
//! assert!(dev.alloc_page().unwrap_err().is_retryable_oom());
//! assert_eq!(dev.counts().get(FaultKind::AllocPage), 1);
//! dev.set_enabled(false);
//! let page = dev.alloc_page()?;
//! dev.free_page(page)?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use super::{
    Device, DeviceInfo, DevicePtr, EventId, HostFn, Kernel, KernelFamily, MemoryInfo, PhysPage,
    PinnedBuffer, StreamId, StreamPriority, VirtualRange,
};
use crate::error::{Error, Result};

/// The byte a copy that failed on the stream leaves in its destination.
pub const GARBAGE: u8 = 0xEE;

/// A kind of fault a [`FaultDevice`] injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// [`Device::alloc_page`] or [`Device::alloc_contiguous`] fails with
    /// [`Error::DeviceOutOfMemory`], as when another process took the memory.
    AllocPage,
    /// [`Device::copy_h2d_async`] refuses the copy: it returns
    /// [`Error::StreamFailed`] and queues nothing.
    CopySubmit,
    /// A host-to-device copy is queued but fails on the stream: the
    /// destination is filled with [`GARBAGE`] instead of the source bytes,
    /// and a host function that panics (with an [`InjectedFault`] payload) is
    /// queued after it, which the backend reports as a stream failure (on the
    /// host backend at the next event recorded on the stream, and at its next
    /// synchronisation; on CUDA at its next synchronisation).
    CopyStream,
    /// A host-to-device copy runs late: a host function that sleeps up to
    /// [`FaultConfig::max_delay`] is queued before it.
    CopyDelay,
    /// An event recording completes late: a host function that sleeps up to
    /// [`FaultConfig::max_delay`] is queued before it.
    EventDelay,
    /// [`Device::launch`] fails with [`Error::Kernel`] and queues nothing.
    Launch,
    /// A kernel runs late: a host function that sleeps up to
    /// [`FaultConfig::max_delay`] is queued before it.
    LaunchDelay,
}

impl FaultKind {
    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::AllocPage,
        FaultKind::CopySubmit,
        FaultKind::CopyStream,
        FaultKind::CopyDelay,
        FaultKind::EventDelay,
        FaultKind::Launch,
        FaultKind::LaunchDelay,
    ];

    /// A short name for reports (`alloc_page`, `copy_submit`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::AllocPage => "alloc_page",
            FaultKind::CopySubmit => "copy_submit",
            FaultKind::CopyStream => "copy_stream",
            FaultKind::CopyDelay => "copy_delay",
            FaultKind::EventDelay => "event_delay",
            FaultKind::Launch => "launch",
            FaultKind::LaunchDelay => "launch_delay",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The probability, from 0 to 1, that each call of an operation gets a fault of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FaultRates {
    /// Of [`FaultKind::AllocPage`], per [`Device::alloc_page`] or
    /// [`Device::alloc_contiguous`] call.
    pub alloc_page: f64,
    /// Of [`FaultKind::CopySubmit`], per host-to-device copy.
    pub copy_submit: f64,
    /// Of [`FaultKind::CopyStream`], per host-to-device copy.
    pub copy_stream: f64,
    /// Of [`FaultKind::CopyDelay`], per host-to-device copy.
    pub copy_delay: f64,
    /// Of [`FaultKind::EventDelay`], per [`Device::record_event`] call.
    pub event_delay: f64,
    /// Of [`FaultKind::Launch`], per [`Device::launch`] call.
    pub launch: f64,
    /// Of [`FaultKind::LaunchDelay`], per [`Device::launch`] call.
    pub launch_delay: f64,
}

impl FaultRates {
    /// The rate of one kind.
    pub fn get(&self, kind: FaultKind) -> f64 {
        match kind {
            FaultKind::AllocPage => self.alloc_page,
            FaultKind::CopySubmit => self.copy_submit,
            FaultKind::CopyStream => self.copy_stream,
            FaultKind::CopyDelay => self.copy_delay,
            FaultKind::EventDelay => self.event_delay,
            FaultKind::Launch => self.launch,
            FaultKind::LaunchDelay => self.launch_delay,
        }
    }

    /// Set the rate of one kind.
    pub fn set(&mut self, kind: FaultKind, rate: f64) {
        let r = match kind {
            FaultKind::AllocPage => &mut self.alloc_page,
            FaultKind::CopySubmit => &mut self.copy_submit,
            FaultKind::CopyStream => &mut self.copy_stream,
            FaultKind::CopyDelay => &mut self.copy_delay,
            FaultKind::EventDelay => &mut self.event_delay,
            FaultKind::Launch => &mut self.launch,
            FaultKind::LaunchDelay => &mut self.launch_delay,
        };
        *r = rate;
    }
}

/// Configuration of a [`FaultDevice`].
#[derive(Clone, Debug)]
pub struct FaultConfig {
    /// Seed of every decision.
    pub seed: u64,
    /// Rate of each kind of fault. Default: all zero (nothing injected).
    pub rates: FaultRates,
    /// Longest injected delay. Default 2 ms.
    pub max_delay: Duration,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            rates: FaultRates::default(),
            max_delay: Duration::from_millis(2),
        }
    }
}

/// Faults injected so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// [`FaultKind::AllocPage`] faults.
    pub alloc_page: u64,
    /// [`FaultKind::CopySubmit`] faults.
    pub copy_submit: u64,
    /// [`FaultKind::CopyStream`] faults.
    pub copy_stream: u64,
    /// [`FaultKind::CopyDelay`] faults.
    pub copy_delay: u64,
    /// [`FaultKind::EventDelay`] faults.
    pub event_delay: u64,
    /// [`FaultKind::Launch`] faults.
    pub launch: u64,
    /// [`FaultKind::LaunchDelay`] faults.
    pub launch_delay: u64,
}

impl FaultCounts {
    /// The count of one kind.
    pub fn get(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::AllocPage => self.alloc_page,
            FaultKind::CopySubmit => self.copy_submit,
            FaultKind::CopyStream => self.copy_stream,
            FaultKind::CopyDelay => self.copy_delay,
            FaultKind::EventDelay => self.event_delay,
            FaultKind::Launch => self.launch,
            FaultKind::LaunchDelay => self.launch_delay,
        }
    }

    /// All faults.
    pub fn total(&self) -> u64 {
        FaultKind::ALL.iter().map(|&k| self.get(k)).sum()
    }

    /// The sum of two counts, kind by kind.
    pub fn add(&self, other: &FaultCounts) -> FaultCounts {
        FaultCounts {
            alloc_page: self.alloc_page + other.alloc_page,
            copy_submit: self.copy_submit + other.copy_submit,
            copy_stream: self.copy_stream + other.copy_stream,
            copy_delay: self.copy_delay + other.copy_delay,
            event_delay: self.event_delay + other.event_delay,
            launch: self.launch + other.launch,
            launch_delay: self.launch_delay + other.launch_delay,
        }
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in FaultKind::ALL.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {}", k.name(), self.get(*k))?;
        }
        Ok(())
    }
}

/// The panic payload of the host function a [`FaultKind::CopyStream`] fault
/// queues. [`silence_injected_panics`] keeps the panic hook quiet about it.
#[derive(Clone, Copy, Debug)]
pub struct InjectedFault(pub FaultKind);

/// Install (once per process) a panic hook that prints nothing for panics
/// whose payload is an [`InjectedFault`] and hands every other panic to the
/// hook that was there before. Stream workers catch those panics and report
/// them as stream failures; without this, each prints a message.
pub fn silence_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<InjectedFault>() {
                previous(info);
            }
        }));
    });
}

/// A [`Device`] that forwards to `inner` and injects faults; see the module documentation.
pub struct FaultDevice<D: Device + ?Sized> {
    inner: Arc<D>,
    seed: u64,
    max_delay: Duration,
    /// Rates as f64 bits, by [`FaultKind::index`].
    rates: [AtomicU64; 7],
    enabled: AtomicBool,
    /// Calls that could have been faulted, by kind (the decision index).
    calls: [AtomicU64; 7],
    /// Faults injected, by kind.
    injected: [AtomicU64; 7],
}

impl<D: Device + ?Sized> fmt::Debug for FaultDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultDevice")
            .field("inner", &self.inner)
            .field("seed", &self.seed)
            .field("enabled", &self.is_enabled())
            .field("rates", &self.rates())
            .field("counts", &self.counts())
            .finish()
    }
}

/// SplitMix64: a well-mixed 64-bit hash of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl<D: Device + ?Sized> FaultDevice<D> {
    /// Wrap `inner`; injection starts enabled.
    pub fn new(inner: Arc<D>, config: FaultConfig) -> Self {
        let rates = FaultKind::ALL.map(|k| AtomicU64::new(config.rates.get(k).to_bits()));
        FaultDevice {
            inner,
            seed: config.seed,
            max_delay: config.max_delay,
            rates,
            enabled: AtomicBool::new(true),
            calls: Default::default(),
            injected: Default::default(),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<D> {
        &self.inner
    }

    /// Switch injection on or off (calls made while off do not advance the decision sequence).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Whether faults are being injected.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// The rates in force.
    pub fn rates(&self) -> FaultRates {
        let mut r = FaultRates::default();
        for k in FaultKind::ALL {
            r.set(
                k,
                f64::from_bits(self.rates[k.index()].load(Ordering::Relaxed)),
            );
        }
        r
    }

    /// Change the rate of one kind from now on.
    pub fn set_rate(&self, kind: FaultKind, rate: f64) {
        self.rates[kind.index()].store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Change every rate from now on.
    pub fn set_rates(&self, rates: FaultRates) {
        for k in FaultKind::ALL {
            self.set_rate(k, rates.get(k));
        }
    }

    /// Faults injected so far, by kind.
    pub fn counts(&self) -> FaultCounts {
        let n = |k: FaultKind| self.injected[k.index()].load(Ordering::Relaxed);
        FaultCounts {
            alloc_page: n(FaultKind::AllocPage),
            copy_submit: n(FaultKind::CopySubmit),
            copy_stream: n(FaultKind::CopyStream),
            copy_delay: n(FaultKind::CopyDelay),
            event_delay: n(FaultKind::EventDelay),
            launch: n(FaultKind::Launch),
            launch_delay: n(FaultKind::LaunchDelay),
        }
    }

    /// The hash of the next call of `kind`, or `None` when injection is off
    /// or the kind's rate is zero.
    fn next(&self, kind: FaultKind) -> Option<u64> {
        if !self.is_enabled() {
            return None;
        }
        let rate = f64::from_bits(self.rates[kind.index()].load(Ordering::Relaxed));
        if rate <= 0.0 {
            return None;
        }
        let n = self.calls[kind.index()].fetch_add(1, Ordering::Relaxed);
        let h = mix(self.seed ^ mix(((kind.index() as u64) << 56) ^ n));
        // 53 random bits as a fraction in [0, 1).
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        (u < rate).then_some(h)
    }

    /// Whether to inject a fault of `kind` now (counted if so).
    fn roll(&self, kind: FaultKind) -> bool {
        let hit = self.next(kind).is_some();
        if hit {
            self.injected[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// A delay of `kind` to inject now, if any (counted if so).
    fn delay(&self, kind: FaultKind) -> Option<Duration> {
        let h = self.next(kind)?;
        self.injected[kind.index()].fetch_add(1, Ordering::Relaxed);
        let micros = self.max_delay.as_micros() as u64;
        Some(Duration::from_micros(mix(h) % (micros + 1)))
    }

    /// Queue a host function on `stream` that sleeps for `d`.
    fn queue_sleep(&self, stream: StreamId, d: Duration) -> Result<()> {
        self.inner
            .launch_host_fn(stream, Box::new(move || std::thread::sleep(d)))
    }
}

impl<D: Device + ?Sized> Device for FaultDevice<D> {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }

    fn memory(&self) -> Result<MemoryInfo> {
        self.inner.memory()
    }

    fn alloc_page(&self) -> Result<PhysPage> {
        if self.roll(FaultKind::AllocPage) {
            return Err(Error::DeviceOutOfMemory {
                wanted: self.inner.info().page_size,
                available: 0,
            });
        }
        self.inner.alloc_page()
    }

    fn free_page(&self, page: PhysPage) -> Result<()> {
        self.inner.free_page(page)
    }

    fn reserve(&self, len: usize) -> Result<VirtualRange> {
        self.inner.reserve(len)
    }

    fn release(&self, range: VirtualRange) -> Result<()> {
        self.inner.release(range)
    }

    fn map(&self, addr: DevicePtr, page: PhysPage) -> Result<()> {
        self.inner.map(addr, page)
    }

    fn unmap(&self, addr: DevicePtr) -> Result<()> {
        self.inner.unmap(addr)
    }

    fn maps_pages(&self) -> bool {
        self.inner.maps_pages()
    }

    fn alloc_contiguous(&self, len: usize) -> Result<DevicePtr> {
        if self.roll(FaultKind::AllocPage) {
            return Err(Error::DeviceOutOfMemory {
                wanted: len,
                available: 0,
            });
        }
        self.inner.alloc_contiguous(len)
    }

    fn free_contiguous(&self, ptr: DevicePtr) -> Result<()> {
        self.inner.free_contiguous(ptr)
    }

    fn alloc_pinned(&self, len: usize) -> Result<PinnedBuffer> {
        self.inner.alloc_pinned(len)
    }

    fn alloc_pinned_write_combined(&self, len: usize) -> Result<PinnedBuffer> {
        self.inner.alloc_pinned_write_combined(len)
    }

    fn create_stream(&self) -> Result<StreamId> {
        self.inner.create_stream()
    }

    fn create_stream_with_priority(&self, priority: StreamPriority) -> Result<StreamId> {
        self.inner.create_stream_with_priority(priority)
    }

    fn stream_priority_range(&self) -> Result<Option<(i32, i32)>> {
        self.inner.stream_priority_range()
    }

    fn destroy_stream(&self, stream: StreamId) -> Result<()> {
        self.inner.destroy_stream(stream)
    }

    fn create_event(&self) -> Result<EventId> {
        self.inner.create_event()
    }

    fn create_timing_event(&self) -> Result<EventId> {
        self.inner.create_timing_event()
    }

    fn destroy_event(&self, event: EventId) -> Result<()> {
        self.inner.destroy_event(event)
    }

    fn record_event(&self, event: EventId, stream: StreamId) -> Result<()> {
        if let Some(d) = self.delay(FaultKind::EventDelay) {
            self.queue_sleep(stream, d)?;
        }
        self.inner.record_event(event, stream)
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId) -> Result<()> {
        self.inner.stream_wait_event(stream, event)
    }

    fn event_query(&self, event: EventId) -> Result<bool> {
        self.inner.event_query(event)
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> Result<Option<Duration>> {
        self.inner.event_elapsed(start, end)
    }

    fn event_wait(&self, event: EventId, timeout: Option<Duration>) -> Result<()> {
        self.inner.event_wait(event, timeout)
    }

    fn stream_synchronize(&self, stream: StreamId) -> Result<()> {
        self.inner.stream_synchronize(stream)
    }

    unsafe fn copy_h2d_async(
        &self,
        dst: DevicePtr,
        src: *const u8,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        // Every kind is decided for every copy, so each kind's sequence of
        // decisions depends only on the number of copies.
        let refuse = self.next(FaultKind::CopySubmit).is_some();
        let fail = self.next(FaultKind::CopyStream).is_some();
        let delay = self.next(FaultKind::CopyDelay).map(|h| {
            let micros = self.max_delay.as_micros() as u64;
            Duration::from_micros(mix(h) % (micros + 1))
        });
        let count = |k: FaultKind| {
            self.injected[k.index()].fetch_add(1, Ordering::Relaxed);
        };
        if refuse {
            count(FaultKind::CopySubmit);
            return Err(Error::StreamFailed {
                stream,
                message: format!("injected fault: copy of {len} bytes to {dst} refused"),
            });
        }
        if let Some(d) = delay {
            count(FaultKind::CopyDelay);
            self.queue_sleep(stream, d)?;
        }
        if fail {
            // A copy that fails on the way leaves its destination undefined:
            // fill it with garbage, then fail the stream.
            self.inner.launch(
                &Kernel::Fill {
                    dst,
                    len,
                    value: GARBAGE,
                },
                stream,
            )?;
            self.inner.launch_host_fn(
                stream,
                Box::new(|| std::panic::panic_any(InjectedFault(FaultKind::CopyStream))),
            )?;
            count(FaultKind::CopyStream);
            return Ok(());
        }
        // SAFETY: forwarded unchanged; our caller upholds the contract of
        // `copy_h2d_async` for `src..src+len`.
        unsafe { self.inner.copy_h2d_async(dst, src, len, stream) }
    }

    unsafe fn copy_d2h_async(
        &self,
        dst: *mut u8,
        src: DevicePtr,
        len: usize,
        stream: StreamId,
    ) -> Result<()> {
        // SAFETY: forwarded unchanged; our caller upholds the contract of
        // `copy_d2h_async` for `dst..dst+len`.
        unsafe { self.inner.copy_d2h_async(dst, src, len, stream) }
    }

    fn launch(&self, kernel: &Kernel, stream: StreamId) -> Result<()> {
        // Both kinds are decided for every launch, as for copies.
        let fail = self.next(FaultKind::Launch).is_some();
        let delay = self.next(FaultKind::LaunchDelay).map(|h| {
            let micros = self.max_delay.as_micros() as u64;
            Duration::from_micros(mix(h) % (micros + 1))
        });
        if fail {
            self.injected[FaultKind::Launch.index()].fetch_add(1, Ordering::Relaxed);
            return Err(Error::Kernel {
                kernel: kernel.name(),
                message: "injected fault: launch failed".into(),
            });
        }
        if let Some(d) = delay {
            self.injected[FaultKind::LaunchDelay.index()].fetch_add(1, Ordering::Relaxed);
            self.queue_sleep(stream, d)?;
        }
        self.inner.launch(kernel, stream)
    }

    fn launch_host_fn(&self, stream: StreamId, f: HostFn) -> Result<()> {
        self.inner.launch_host_fn(stream, f)
    }

    fn prepare(&self, family: KernelFamily) -> Result<Option<String>> {
        self.inner.prepare(family)
    }

    fn launch_counts(&self) -> Vec<(&'static str, u64)> {
        self.inner.launch_counts()
    }

    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceExt, HostConfig, HostDevice};

    fn host() -> Arc<HostDevice> {
        Arc::new(
            HostDevice::new(HostConfig {
                capacity: 4 << 20,
                page_size: 64 << 10,
                link_gbps: None,
            })
            .unwrap(),
        )
    }

    fn rates(kind: FaultKind, rate: f64) -> FaultConfig {
        let mut r = FaultRates::default();
        r.set(kind, rate);
        FaultConfig {
            seed: 42,
            rates: r,
            ..FaultConfig::default()
        }
    }

    #[test]
    fn decisions_are_deterministic_for_a_seed_and_follow_the_rate() {
        let pattern = |seed: u64| {
            let dev = FaultDevice::new(
                host(),
                FaultConfig {
                    seed,
                    ..rates(FaultKind::AllocPage, 0.3)
                },
            );
            let v: Vec<bool> = (0..2000)
                .map(|_| match dev.alloc_page() {
                    Ok(p) => {
                        dev.free_page(p).unwrap();
                        false
                    }
                    Err(e) => {
                        assert!(e.is_retryable_oom(), "{e}");
                        true
                    }
                })
                .collect();
            let n = v.iter().filter(|&&b| b).count() as u64;
            assert_eq!(dev.counts().alloc_page, n);
            assert_eq!(dev.counts().total(), n);
            v
        };
        let a = pattern(1);
        assert_eq!(a, pattern(1), "same seed, same faults");
        assert_ne!(a, pattern(2), "another seed, other faults");
        let hits = a.iter().filter(|&&b| b).count();
        assert!(
            (500..700).contains(&hits),
            "{hits} faults of 2000 at rate 0.3"
        );
    }

    #[test]
    fn a_disabled_device_injects_nothing() {
        let dev = FaultDevice::new(host(), rates(FaultKind::AllocPage, 1.0));
        assert!(dev.alloc_page().is_err());
        dev.set_enabled(false);
        assert!(!dev.is_enabled());
        let p = dev.alloc_page().unwrap();
        dev.free_page(p).unwrap();
        assert_eq!(dev.counts().alloc_page, 1);
        dev.set_enabled(true);
        dev.set_rate(FaultKind::AllocPage, 0.0);
        let p = dev.alloc_page().unwrap();
        dev.free_page(p).unwrap();
        assert_eq!(dev.rates(), FaultRates::default());
    }

    #[test]
    fn contiguous_allocations_are_forwarded_and_faulted() {
        let inner = Arc::new(
            HostDevice::without_vmm(HostConfig {
                capacity: 4 << 20,
                page_size: 64 << 10,
                link_gbps: None,
            })
            .unwrap(),
        );
        let dev = FaultDevice::new(inner.clone(), rates(FaultKind::AllocPage, 1.0));
        assert!(!dev.maps_pages());
        let ps = dev.info().page_size;
        let e = dev.alloc_contiguous(2 * ps).unwrap_err();
        assert!(
            matches!(e, Error::DeviceOutOfMemory { wanted, available: 0 } if wanted == 2 * ps),
            "{e}"
        );
        assert_eq!(dev.counts().alloc_page, 1);
        dev.set_enabled(false);
        let p = dev.alloc_contiguous(2 * ps).unwrap();
        let s = dev.create_stream().unwrap();
        // Across the page boundary: one contiguous allocation.
        dev.write_blocking(p.offset(ps - 1), &[1, 2], s).unwrap();
        let mut back = [0u8; 2];
        dev.read_blocking(p.offset(ps - 1), &mut back, s).unwrap();
        assert_eq!(back, [1, 2]);
        assert_eq!(inner.counters().contiguous_allocations, 1);
        dev.free_contiguous(p).unwrap();
        assert_eq!(inner.counters().contiguous_allocations, 0);
        assert!(matches!(
            dev.free_contiguous(p),
            Err(Error::BadAddress { .. })
        ));
        dev.destroy_stream(s).unwrap();
    }

    fn one_page(dev: &FaultDevice<HostDevice>) -> VirtualRange {
        let ps = dev.info().page_size;
        let range = dev.reserve(ps).unwrap();
        let p = dev.alloc_page().unwrap();
        dev.map(range.base, p).unwrap();
        range
    }

    #[test]
    fn refused_copies_and_launches_are_errors_that_queue_nothing() {
        let dev = FaultDevice::new(host(), rates(FaultKind::CopySubmit, 1.0));
        dev.set_rate(FaultKind::Launch, 1.0);
        let range = one_page(&dev);
        let s = dev.create_stream().unwrap();
        let r = dev.write_blocking(range.base, &[1, 2, 3], s);
        assert!(matches!(r, Err(Error::StreamFailed { .. })), "{r:?}");
        let r = dev.launch(
            &Kernel::Fill {
                dst: range.base,
                len: 3,
                value: 9,
            },
            s,
        );
        assert!(matches!(r, Err(Error::Kernel { .. })), "{r:?}");
        dev.stream_synchronize(s).unwrap();
        let mut back = [0u8; 3];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert_eq!(back, [0, 0, 0], "nothing ran");
        let c = dev.counts();
        assert_eq!((c.copy_submit, c.launch, c.total()), (1, 1, 2));
    }

    #[test]
    fn a_merge_batch_is_one_launch() {
        use crate::device::{MergeAdapter, MergeDelta, MergeFactor, MergeOp};
        use offload_kernels::Dtype;
        let dev = FaultDevice::new(host(), rates(FaultKind::Launch, 1.0));
        let range = one_page(&dev);
        let s = dev.create_stream().unwrap();
        let factor = |at: usize, rows, cols| MergeFactor {
            ptr: range.base.offset(at),
            host: vec![0u8; rows * cols * 4].into(),
            dtype: Dtype::F32,
            rows,
            cols,
        };
        let op = |f: usize| {
            Arc::new(MergeOp {
                dtype: Dtype::F32,
                shape: vec![4, 4],
                rows: None,
                adapters: vec![MergeAdapter {
                    scale: 1.0,
                    delta: MergeDelta::LowRank {
                        up: factor(f, 4, 1),
                        down: factor(f + 16, 1, 4),
                    },
                }],
            })
        };
        let batch = Kernel::MergeBatch {
            base: range.base,
            ops: vec![(0, op(1024)), (64, op(2048)), (128, op(3072))].into(),
        };
        let r = dev.launch(&batch, s);
        assert!(
            matches!(
                &r,
                Err(Error::Kernel {
                    kernel: "merge batch",
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(dev.counts().launch, 1, "one decision for the whole batch");
        dev.set_rate(FaultKind::Launch, 0.0);
        dev.launch(&batch, s).unwrap();
        dev.stream_synchronize(s).unwrap();
        assert_eq!(dev.counts().total(), 1);
    }

    #[test]
    fn a_copy_failing_on_the_stream_leaves_garbage_and_fails_the_stream_once() {
        silence_injected_panics();
        let dev = FaultDevice::new(host(), rates(FaultKind::CopyStream, 1.0));
        let range = one_page(&dev);
        let s = dev.create_stream().unwrap();
        let ev = dev.create_event().unwrap();
        let src = [5u8; 100];
        // SAFETY: `src` outlives the copy: the event is waited for below.
        unsafe {
            dev.copy_h2d_async(range.base, src.as_ptr(), 100, s)
                .unwrap()
        };
        dev.record_event(ev, s).unwrap();
        let r = dev.event_wait(ev, Some(Duration::from_secs(10)));
        assert!(matches!(r, Err(Error::StreamFailed { .. })), "{r:?}");
        assert!(matches!(
            dev.stream_synchronize(s),
            Err(Error::StreamFailed { .. })
        ));
        dev.stream_synchronize(s).unwrap();
        let mut back = [0u8; 100];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert_eq!(back, [GARBAGE; 100]);
        assert_eq!(dev.counts().copy_stream, 1);
        // Off: the same copy works.
        dev.set_enabled(false);
        dev.write_blocking(range.base, &src, s).unwrap();
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn delays_are_bounded_and_keep_the_order() {
        let dev = FaultDevice::new(
            host(),
            FaultConfig {
                seed: 3,
                rates: FaultRates {
                    copy_delay: 1.0,
                    event_delay: 1.0,
                    ..FaultRates::default()
                },
                max_delay: Duration::from_millis(5),
            },
        );
        let range = one_page(&dev);
        let s = dev.create_stream().unwrap();
        let ev = dev.create_event().unwrap();
        let start = std::time::Instant::now();
        for i in 0..10u8 {
            dev.write_blocking(range.base, &[i; 64], s).unwrap();
            dev.record_event(ev, s).unwrap();
        }
        dev.event_wait(ev, Some(Duration::from_secs(10))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut back = [0u8; 64];
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert_eq!(back, [9; 64], "the last copy landed last");
        let c = dev.counts();
        assert_eq!((c.copy_delay, c.event_delay), (10, 10));
        // Late kernels keep their order on the stream too.
        dev.set_rate(FaultKind::LaunchDelay, 1.0);
        for i in 0..10u8 {
            let fill = Kernel::Fill {
                dst: range.base,
                len: 64,
                value: 100 + i,
            };
            dev.launch(&fill, s).unwrap();
        }
        dev.read_blocking(range.base, &mut back, s).unwrap();
        assert_eq!(back, [109; 64], "the last kernel ran last");
        assert_eq!(dev.counts().launch_delay, 10);
    }
}
