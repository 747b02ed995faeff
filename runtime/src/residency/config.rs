//! How a [`super::Runtime`] places weights: mode, eviction policy, watermarks, host memory.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Offload mode (the semantics SD.Next's users know).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Everything resident; a model that does not fit is an error.
    None,
    /// Whole components on demand.
    Model,
    /// Each component keeps what fits under the high watermark resident and streams the rest.
    Balanced,
    /// Every layer streams, `prefetch_depth` ahead.
    Sequential,
}

/// Which resident layer to evict, and what to prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Least recently used (the baseline).
    Lru,
    /// Plan from the execution order, corrected by the acquire trace: the
    /// layers that fit stay resident, the rest stream through a fixed ring.
    Planned,
}

/// Where the host copy of the weights lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPolicy {
    /// Read once into pinned host memory at load; uploads copy from it.
    Pinned,
    /// Read from the source on each upload, through a ring of pinned staging buffers.
    Staged {
        /// Staging buffers in the ring.
        buffers: usize,
        /// Bytes per staging buffer.
        buffer_bytes: usize,
        /// Reader threads (each takes one layer at a time), and the threads
        /// that fill one staging buffer together (parts of at least
        /// `fill_part_bytes`).
        threads: usize,
        /// The least bytes one thread fills: a staging buffer's fill is split
        /// across up to `threads` threads into parts of at least this.
        fill_part_bytes: usize,
        /// Staging buffers in write-combined memory where the device has it
        /// ([`crate::device::Device::alloc_pinned_write_combined`]): the
        /// fills bypass the CPU caches and the copies need not snoop them.
        /// The source's [`crate::model::WeightSource::read`] then writes
        /// into such memory and must not read it back. Off by default
        /// until a GPU has timed it (docs/benchmarks.md).
        write_combined: bool,
    },
}

impl HostPolicy {
    /// Default least bytes one thread fills of a staging buffer (512 KiB).
    /// On the H200 machine (docs/benchmarks.md, third GPU session,
    /// 2026-11-28), with each reader's fill helpers kept from job to job
    /// and 8 readers, 512 KiB parts gave `bench h2d`'s staged uploads 0.52
    /// and 0.59 of the pinned ceiling at 2 MiB layers (1 MiB parts 0.39 and
    /// 0.42; 4 MiB parts with 4 readers, the defaults before, 0.32–0.37),
    /// and 0.53–0.54 and 0.65–0.70 at 64 and 256 MiB, the only setting at
    /// or above 0.50 at all three sizes in both runs. (When each part's
    /// thread was started for the fill, smaller parts were slower.)
    pub const DEFAULT_FILL_PART_BYTES: usize = 512 << 10;

    /// The staged policy with `threads` reader threads (at least one) and
    /// [`HostPolicy::staging_buffers_for`] 64 MiB staging buffers, filled
    /// in parts of at least [`HostPolicy::DEFAULT_FILL_PART_BYTES`].
    pub fn staged(threads: usize) -> HostPolicy {
        let threads = threads.max(1);
        HostPolicy::Staged {
            buffers: HostPolicy::staging_buffers_for(threads),
            buffer_bytes: 64 << 20,
            threads,
            fill_part_bytes: HostPolicy::DEFAULT_FILL_PART_BYTES,
            write_combined: false,
        }
    }

    /// The staged policy for this machine, with
    /// [`HostPolicy::default_staging_threads`] readers.
    pub fn staged_default() -> HostPolicy {
        HostPolicy::staged(HostPolicy::default_staging_threads())
    }

    /// Reader threads of the default staged policy: one per CPU, at most 8.
    /// On the H200 machine's 16 CPUs (docs/benchmarks.md, third GPU
    /// session) 8 readers gave 256 MiB layers 0.65–0.72 of the pinned
    /// ceiling in five runs, against 0.62–0.66 with 4, and left 64 MiB
    /// ones where 4 had them. The cost: twice as many 64 MiB pinned
    /// staging buffers (1 GiB with 8 readers), and each reader keeps up to
    /// 7 fill helper threads (64 threads in all with 8 readers, most of
    /// them idle); only the 16-CPU machine has timed it.
    pub fn default_staging_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .min(8)
    }

    /// Staging buffers for `threads` readers: twice as many, at least 4.
    pub fn staging_buffers_for(threads: usize) -> usize {
        (2 * threads).max(4)
    }
}

macro_rules! names {
    ($t:ty, $what:literal, $($v:path => $s:literal),+) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                #[allow(unreachable_patterns)]
                let s = match *self { $($v => $s,)+ };
                f.write_str(s)
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($v),)+
                    _ => Err(format!(concat!("unknown ", $what, " `{}` (expected one of: {})"), s, [$($s),+].join(", "))),
                }
            }
        }
    };
}

names!(Mode, "mode", Mode::None => "none", Mode::Model => "model", Mode::Balanced => "balanced", Mode::Sequential => "sequential");
names!(Policy, "policy", Policy::Lru => "lru", Policy::Planned => "planned");

impl fmt::Display for HostPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPolicy::Pinned => f.write_str("pinned"),
            HostPolicy::Staged { .. } => f.write_str("staged"),
        }
    }
}

/// Configuration of a [`super::Runtime`]. `Default` gives the documented defaults.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Offload mode; `None`: sequential on devices of 4 GiB or less, balanced above.
    pub mode: Option<Mode>,
    /// Eviction policy (default planned).
    pub policy: Policy,
    /// Layers uploaded ahead of the one in use (default 2).
    pub prefetch_depth: usize,
    /// Device memory the runtime may use for weights; `None`: the device's total.
    /// The watermarks are fractions of this.
    pub device_memory: Option<usize>,
    /// Most device bytes one component's weights may use; `None`: 70% of device memory.
    pub high_watermark: Option<usize>,
    /// Other components are offloaded down to this when a component starts;
    /// `None`: 20% of device memory above 12 GiB, else 0.
    pub low_watermark: Option<usize>,
    /// Host memory policy (default pinned).
    pub host_policy: HostPolicy,
    /// Most host bytes the runtime may hold (pinned host copies and the
    /// staging ring); a model that would exceed it is refused at load,
    /// before anything is allocated. `None`: no limit.
    pub host_memory_limit: Option<usize>,
    /// Longest wait for an event, an upload job or the copy stream before
    /// an operation fails with a timeout (`Duration::MAX`: wait for good).
    pub wait_timeout: Duration,
    /// Measure how long the compute stream waits for weights (two timing
    /// events around each wait for a layer not yet ready). The query this
    /// takes also spares the wait for a layer whose upload has completed;
    /// with it off, every acquire of a device copy not yet seen ready
    /// queues a wait. (A copy an earlier acquire saw ready is neither
    /// queried nor waited for, either way.)
    pub measure_stall: bool,
    /// Record a per-layer timeline of uploads and waits. Each entry costs
    /// its stream two host functions, which on a GPU hold the stream until
    /// a CPU thread has run them: for looking, not for timing.
    pub timeline: bool,
    /// How LoRA sets are applied (default fuse-on-upload); backup and fuse
    /// need the pinned host policy.
    pub lora_mode: crate::lora::LoraMode,
    /// Who queues the uploads of the pinned policy (each layer's copy and
    /// its fuse-on-upload merges): `Some(true)` the runtime's uploader
    /// thread, so that the thread that acquires layers (the engine's, which
    /// also queues their compute) makes none of those calls; `Some(false)`
    /// the acquiring thread. `None` (default): the uploader on a GPU, where
    /// the CPUs are free while the device works, the acquiring thread on
    /// the host backend, whose streams run copies and merges on the CPUs
    /// the uploader would wait for (on a 2-core machine a thread of its own
    /// made LoRA passes slower). The staged policy's threads queue their
    /// own uploads either way.
    pub upload_thread: Option<bool>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            mode: None,
            policy: Policy::Planned,
            prefetch_depth: 2,
            device_memory: None,
            high_watermark: None,
            low_watermark: None,
            host_policy: HostPolicy::Pinned,
            host_memory_limit: None,
            wait_timeout: Duration::from_secs(60),
            measure_stall: true,
            timeline: false,
            lora_mode: crate::lora::LoraMode::FuseOnUpload,
            upload_thread: None,
        }
    }
}

/// The configuration with every default filled in for a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Mode.
    pub mode: Mode,
    /// Device memory for weights in bytes.
    pub device_memory: usize,
    /// High watermark in bytes.
    pub high: usize,
    /// Low watermark in bytes.
    pub low: usize,
}

impl RuntimeConfig {
    /// Fill in the defaults for a device of `device_total` bytes.
    pub fn resolve(&self, device_total: usize) -> Resolved {
        let mem = self.device_memory.unwrap_or(device_total).min(device_total);
        let mode = self.mode.unwrap_or(if mem <= 4 << 30 {
            Mode::Sequential
        } else {
            Mode::Balanced
        });
        let high = self.high_watermark.unwrap_or(mem / 10 * 7).min(mem);
        let low = self
            .low_watermark
            .unwrap_or(if mem > 12 << 30 { mem / 5 } else { 0 })
            .min(high);
        Resolved {
            mode,
            device_memory: mem,
            high,
            low,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_policies_get_twice_the_threads_in_buffers() {
        let parts = |p: HostPolicy| match p {
            HostPolicy::Staged {
                buffers,
                buffer_bytes,
                threads,
                fill_part_bytes,
                write_combined,
            } => {
                assert!(!write_combined, "write-combined staging is off by default");
                (buffers, buffer_bytes, threads, fill_part_bytes)
            }
            HostPolicy::Pinned => panic!("not staged"),
        };
        assert_eq!(parts(HostPolicy::staged(0)), (4, 64 << 20, 1, 512 << 10));
        assert_eq!(parts(HostPolicy::staged(3)), (6, 64 << 20, 3, 512 << 10));
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let (_, _, threads, part) = parts(HostPolicy::staged_default());
        assert_eq!(part, HostPolicy::DEFAULT_FILL_PART_BYTES);
        assert_eq!(threads, cpus.min(8));
    }

    #[test]
    fn defaults_follow_the_device_size() {
        let c = RuntimeConfig::default();
        let small = c.resolve(4 << 30);
        assert_eq!(small.mode, Mode::Sequential);
        assert_eq!(small.low, 0);
        let big = c.resolve(24 << 30);
        assert_eq!(big.mode, Mode::Balanced);
        assert_eq!(big.high, (24 << 30) / 10 * 7);
        assert_eq!(big.low, (24 << 30) / 5);
        let capped = RuntimeConfig {
            device_memory: Some(1 << 30),
            ..RuntimeConfig::default()
        }
        .resolve(24 << 30);
        assert_eq!(capped.device_memory, 1 << 30);
        assert_eq!(capped.mode, Mode::Sequential);
    }

    #[test]
    fn names_round_trip() {
        for m in [Mode::None, Mode::Model, Mode::Balanced, Mode::Sequential] {
            assert_eq!(m.to_string().parse::<Mode>().unwrap(), m);
        }
        assert!("fast".parse::<Mode>().unwrap_err().contains("balanced"));
        assert_eq!("lru".parse::<Policy>().unwrap(), Policy::Lru);
    }
}
