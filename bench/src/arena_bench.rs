//! `offload bench arena`: our page arena against `offset-allocator` on one seeded workload.
//!
//! The workload draws tensor sizes from the SDXL UNet's linear and conv
//! weights (fp16) and keeps the arena near a target fill: below it, allocate;
//! at or above it, free a random live tensor. Both allocators replay exactly
//! the same sequence of requests (a request that fails is counted and
//! skipped). At the end each reports how many bytes are free and the largest
//! single request that still fits: for offset-allocator its largest free
//! region, for our arena a real allocation of all free pages, tried and
//! freed.

use std::sync::Arc;
use std::time::Instant;

use offload_runtime::arena::{AllocId, Arena, ArenaConfig, Tag};
use offload_runtime::device::{Device, HostConfig, HostDevice};

use crate::null_device::NullDevice;
use crate::rng::Rng;
use crate::sdxl::sdxl_unet_weight_bytes;

/// Parameters of the arena benchmark.
#[derive(Clone, Debug)]
pub struct ArenaBenchConfig {
    /// Arena capacity in bytes.
    pub capacity: usize,
    /// Page size of our arena in bytes.
    pub page_size: usize,
    /// Target fill as a fraction of capacity.
    pub fill: f64,
    /// Allocation plus free operations to run.
    pub ops: usize,
    /// Workload seed.
    pub seed: u64,
}

/// What one allocator did on the workload.
#[derive(Clone, Debug)]
pub struct ArenaBenchRow {
    /// Allocator name.
    pub name: &'static str,
    /// Allocations and frees per second.
    pub ops_per_sec: f64,
    /// Allocation requests that failed.
    pub failed: usize,
    /// Allocations that succeeded.
    pub allocs: usize,
    /// Bytes free at the end (capacity minus bytes held by live allocations, including rounding).
    pub free_bytes: usize,
    /// Largest single request that fits at the end.
    pub largest_fit: usize,
    /// Bytes held beyond what live allocations asked for (page tails, slab slots, unit rounding).
    pub waste: usize,
}

/// An allocator under test.
trait BenchAlloc {
    type Handle;
    /// Allocate; `None` when it does not fit now.
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Option<Self::Handle>>;
    fn free(&mut self, h: Self::Handle) -> offload_runtime::Result<()>;
    /// Bytes of capacity held now (requested bytes plus rounding and page tails).
    fn held(&self) -> usize;
}

struct Outcome {
    secs: f64,
    allocs: usize,
    failed: usize,
    live_bytes: usize,
}

/// Replay the seeded workload. Every allocator sees the same random stream:
/// the same sizes in the same order and the same choices of which live
/// tensor to free; below the target fill (by its own accounting) it
/// allocates, at or above it, it frees. A failed allocation is counted, and
/// a random live tensor is freed instead (evict, as a residency engine would).
fn replay<A: BenchAlloc>(cfg: &ArenaBenchConfig, a: &mut A) -> offload_runtime::Result<Outcome> {
    let sizes = sdxl_unet_weight_bytes();
    let target = (cfg.capacity as f64 * cfg.fill) as usize;
    let mut rng = Rng::new(cfg.seed);
    let mut live: Vec<(A::Handle, usize)> = Vec::new();
    let (mut allocs, mut failed, mut live_bytes) = (0, 0, 0);
    let start = Instant::now();
    for _ in 0..cfg.ops {
        let pick = rng.next_u64();
        if a.held() < target || live.is_empty() {
            let size = sizes[(pick % sizes.len() as u64) as usize];
            match a.alloc(size)? {
                Some(h) => {
                    live.push((h, size));
                    live_bytes += size;
                    allocs += 1;
                    continue;
                }
                None => failed += 1,
            }
        }
        if !live.is_empty() {
            let (h, size) = live.swap_remove((pick >> 32) as usize % live.len());
            a.free(h)?;
            live_bytes -= size;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Outcome {
        secs,
        allocs,
        failed,
        live_bytes,
    })
}

struct Ours<D: Device + ?Sized>(Arena<D>);

impl<D: Device + ?Sized> BenchAlloc for Ours<D> {
    type Handle = AllocId;
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Option<AllocId>> {
        match self.0.alloc(size, Tag(0)) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.is_retryable_oom() => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn free(&mut self, h: AllocId) -> offload_runtime::Result<()> {
        self.0.free(h)
    }
    fn held(&self) -> usize {
        self.0.pages_used() * self.0.page_size()
    }
}

fn run_arena<D: Device + ?Sized>(
    name: &'static str,
    cfg: &ArenaBenchConfig,
    arena: Arena<D>,
) -> offload_runtime::Result<ArenaBenchRow> {
    let mut a = Ours(arena);
    let out = replay(cfg, &mut a)?;
    let arena = a.0;
    let stats = arena.stats();
    let free_bytes = stats.pages_free * stats.page_size;
    // Prove the largest fit by allocating it.
    let largest_fit = if free_bytes == 0 {
        0
    } else {
        let id = arena.alloc(free_bytes, Tag(1))?;
        arena.free(id)?;
        free_bytes
    };
    assert_eq!(
        stats.bytes_live, out.live_bytes,
        "arena and workload disagree on live bytes"
    );
    Ok(ArenaBenchRow {
        name,
        ops_per_sec: cfg.ops as f64 / out.secs,
        failed: out.failed,
        allocs: out.allocs,
        free_bytes,
        largest_fit,
        waste: stats.tail_waste + stats.slab_waste,
    })
}

/// Our arena on a host device: real page mappings (mmap), so the time includes the system calls.
pub fn run_ours_host(cfg: &ArenaBenchConfig) -> offload_runtime::Result<ArenaBenchRow> {
    let dev = Arc::new(HostDevice::new(HostConfig {
        capacity: cfg.capacity,
        page_size: cfg.page_size,
        link_gbps: None,
    })?);
    let arena = Arena::new(dev, ArenaConfig::default())?;
    run_arena("offload arena (host)", cfg, arena)
}

/// Our arena on the bookkeeping-only device: the arena's own cost.
pub fn run_ours_null(cfg: &ArenaBenchConfig) -> offload_runtime::Result<ArenaBenchRow> {
    let dev = Arc::new(NullDevice::new(cfg.capacity, cfg.page_size));
    let arena = Arena::new(dev, ArenaConfig::default())?;
    run_arena("offload arena (null)", cfg, arena)
}

/// offset-allocator counts in u32 units; 256-byte units cover up to 1 TiB.
const UNIT: usize = 256;

struct Theirs {
    a: offset_allocator::Allocator,
    held_units: usize,
}

impl BenchAlloc for Theirs {
    type Handle = (offset_allocator::Allocation, u32);
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Option<Self::Handle>> {
        let units = size.div_ceil(UNIT) as u32;
        Ok(self.a.allocate(units).map(|h| {
            self.held_units += units as usize;
            (h, units)
        }))
    }
    fn free(&mut self, (h, units): Self::Handle) -> offload_runtime::Result<()> {
        self.a.free(h);
        self.held_units -= units as usize;
        Ok(())
    }
    fn held(&self) -> usize {
        self.held_units * UNIT
    }
}

/// Run the workload through offset-allocator (bookkeeping only: it manages offsets, not memory).
pub fn run_offset_allocator(cfg: &ArenaBenchConfig) -> offload_runtime::Result<ArenaBenchRow> {
    let units = u32::try_from(cfg.capacity / UNIT).map_err(|_| {
        offload_runtime::Error::Config(format!(
            "capacity {} bytes is too large for offset-allocator's u32 units of {UNIT} bytes",
            cfg.capacity
        ))
    })?;
    let mut t = Theirs {
        a: offset_allocator::Allocator::new(units),
        held_units: 0,
    };
    let out = replay(cfg, &mut t)?;
    let report = t.a.storage_report();
    Ok(ArenaBenchRow {
        name: "offset-allocator 0.2",
        ops_per_sec: cfg.ops as f64 / out.secs,
        failed: out.failed,
        allocs: out.allocs,
        free_bytes: report.total_free_space as usize * UNIT,
        largest_fit: report.largest_free_region as usize * UNIT,
        waste: t.held() - out.live_bytes,
    })
}

/// The largest weight in the workload, in bytes.
pub fn largest_request() -> usize {
    sdxl_unet_weight_bytes().into_iter().max().unwrap_or(0)
}

/// Print the side-by-side table.
pub fn print_table(cfg: &ArenaBenchConfig, rows: &[ArenaBenchRow]) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "arena benchmark: {} ops, seed {}, capacity {:.0} MiB, target fill {:.0}%, SDXL UNet fp16 weight sizes (largest {:.1} MiB), our page size {} KiB",
        cfg.ops,
        cfg.seed,
        mib(cfg.capacity),
        cfg.fill * 100.0,
        mib(largest_request()),
        cfg.page_size >> 10
    );
    println!(
        "{:<22} {:>12} {:>10} {:>8} {:>12} {:>16} {:>12}",
        "allocator", "ops/s", "allocs", "failed", "free MiB", "largest fit MiB", "waste MiB"
    );
    for r in rows {
        println!(
            "{:<22} {:>12.0} {:>10} {:>8} {:>12.1} {:>16.1} {:>12.1}",
            r.name,
            r.ops_per_sec,
            r.allocs,
            r.failed,
            mib(r.free_bytes),
            mib(r.largest_fit),
            mib(r.waste)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_arena_never_fails_while_free_pages_cover_the_request() {
        // At 84% fill of 512 MiB at least 81 MiB are free, more than the largest
        // SDXL weight (56.25 MiB): a page arena must place every request.
        let cfg = ArenaBenchConfig {
            capacity: 512 << 20,
            page_size: 2 << 20,
            fill: 0.84,
            ops: 20_000,
            seed: 7,
        };
        let host = run_ours_host(&cfg).unwrap();
        let null = run_ours_null(&cfg).unwrap();
        assert_eq!(host.failed, 0);
        assert_eq!(
            (host.allocs, host.free_bytes, host.waste),
            (null.allocs, null.free_bytes, null.waste)
        );
        assert_eq!(host.largest_fit, host.free_bytes);
        // An allocation starts below the target, so at most one largest request overshoots it.
        let target = (cfg.capacity as f64 * cfg.fill) as usize;
        assert!(host.free_bytes + largest_request() + cfg.page_size >= cfg.capacity - target);
        // The same stream through offset-allocator: it ends fragmented.
        let theirs = run_offset_allocator(&cfg).unwrap();
        assert!(theirs.largest_fit <= theirs.free_bytes);
        assert!(theirs.allocs > 0);
    }
}
