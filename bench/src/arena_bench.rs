//! `offload bench arena`: our page arena against `offset-allocator` on one seeded workload.
//!
//! The workload draws tensor sizes from the SDXL UNet's linear and conv
//! weights (fp16) and keeps the bytes it has requested near a target fill
//! of the capacity: while the live requested bytes are below the target it
//! allocates a random weight, at or above it it frees a random live one.
//! The decision depends only on the workload's own live bytes, never on an
//! allocator's accounting, so every allocator replays the same sequence of
//! requests and frees until its first failed allocation; a failure is
//! counted and a random live tensor is freed instead (evict, as a residency
//! engine would). At the end each reports how many bytes are free and the
//! largest single request that still fits: for offset-allocator its largest
//! free region, for our arena a real allocation of all free pages, tried and
//! freed.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use offload_loader::synth::{preset_specs, Preset, PresetOptions};
use offload_loader::{ComponentKind, Dtype, ModelLayout};
use offload_runtime::arena::{pack, AllocId, Arena, ArenaConfig, Tag};
use offload_runtime::device::{Device, HostConfig, HostDevice};
use offload_runtime::Error;

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
    /// Target fill (live requested bytes) as a fraction of capacity.
    pub fill: f64,
    /// Allocations plus frees to perform.
    pub ops: usize,
    /// Workload seed.
    pub seed: u64,
}

/// What one allocator did on the workload.
#[derive(Clone, Debug)]
pub struct ArenaBenchRow {
    /// Allocator name.
    pub name: &'static str,
    /// Allocations and frees performed per second (failed attempts not counted as operations).
    pub ops_per_sec: f64,
    /// Allocations that succeeded.
    pub allocs: usize,
    /// Frees performed.
    pub frees: usize,
    /// Allocation requests that failed.
    pub failed: usize,
    /// Failed requests that the allocator's free space covered (free pages
    /// for ours, free units for offset-allocator): failures due to
    /// fragmentation.
    pub failed_with_room: usize,
    /// Bytes requested by the allocations live at the end.
    pub live_bytes: usize,
    /// Bytes free at the end (capacity minus bytes held by live allocations, including rounding).
    pub free_bytes: usize,
    /// Largest single request that fits at the end.
    pub largest_fit: usize,
    /// Bytes held beyond what live allocations asked for (page tails, slab slots, unit rounding).
    pub waste: usize,
}

/// The outcome of one allocation attempt.
enum Attempt<H> {
    Placed(H),
    /// Refused; `room`: the allocator's free space covered the request.
    Refused {
        room: bool,
    },
}

/// An allocator under test.
trait BenchAlloc {
    type Handle;
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Attempt<Self::Handle>>;
    fn free(&mut self, h: Self::Handle) -> offload_runtime::Result<()>;
}

struct Outcome {
    secs: f64,
    allocs: usize,
    frees: usize,
    failed: usize,
    failed_with_room: usize,
    live_bytes: usize,
}

/// Replay the seeded workload until `cfg.ops` allocations and frees have
/// been performed. Every allocator sees the same random stream: the same
/// sizes in the same order and the same choices of which live tensor to
/// free; whether to allocate or free depends on the live bytes this
/// workload has requested, so until an allocation fails every allocator
/// performs exactly the same operations. A failed allocation is counted,
/// and a random live tensor is freed instead.
fn replay<A: BenchAlloc>(cfg: &ArenaBenchConfig, a: &mut A) -> offload_runtime::Result<Outcome> {
    let sizes = sdxl_unet_weight_bytes();
    let target = (cfg.capacity as f64 * cfg.fill) as usize;
    let mut rng = Rng::new(cfg.seed);
    let mut live: Vec<(A::Handle, usize)> = Vec::new();
    let (mut allocs, mut frees, mut failed, mut failed_with_room, mut live_bytes) = (0, 0, 0, 0, 0);
    let start = Instant::now();
    while allocs + frees < cfg.ops {
        let pick = rng.next_u64();
        if live_bytes < target || live.is_empty() {
            let size = sizes[(pick % sizes.len() as u64) as usize];
            match a.alloc(size)? {
                Attempt::Placed(h) => {
                    live.push((h, size));
                    live_bytes += size;
                    allocs += 1;
                    continue;
                }
                Attempt::Refused { room } => {
                    failed += 1;
                    failed_with_room += usize::from(room);
                }
            }
        }
        if live.is_empty() {
            return Err(Error::Config(format!(
                "a request failed in an empty allocator of {} bytes",
                cfg.capacity
            )));
        }
        let (h, size) = live.swap_remove((pick >> 32) as usize % live.len());
        a.free(h)?;
        live_bytes -= size;
        frees += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Outcome {
        secs,
        allocs,
        frees,
        failed,
        failed_with_room,
        live_bytes,
    })
}

struct Ours<D: Device + ?Sized>(Arena<D>);

impl<D: Device + ?Sized> BenchAlloc for Ours<D> {
    type Handle = AllocId;
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Attempt<AllocId>> {
        match self.0.alloc(size, Tag(0)) {
            Ok(id) => Ok(Attempt::Placed(id)),
            Err(Error::OutOfMemory {
                pages, free_pages, ..
            }) => Ok(Attempt::Refused {
                room: free_pages >= pages,
            }),
            Err(e) => Err(e),
        }
    }
    fn free(&mut self, h: AllocId) -> offload_runtime::Result<()> {
        self.0.free(h)
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
        ops_per_sec: (out.allocs + out.frees) as f64 / out.secs,
        allocs: out.allocs,
        frees: out.frees,
        failed: out.failed,
        failed_with_room: out.failed_with_room,
        live_bytes: out.live_bytes,
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
    // Poisoning fills every page given back to the device: on drop, that
    // would touch (and so allocate) the whole emulated memory.
    dev.set_poison(false);
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
    capacity_units: usize,
    held_units: usize,
}

impl BenchAlloc for Theirs {
    type Handle = (offset_allocator::Allocation, u32);
    fn alloc(&mut self, size: usize) -> offload_runtime::Result<Attempt<Self::Handle>> {
        let units = size.div_ceil(UNIT) as u32;
        Ok(match self.a.allocate(units) {
            Some(h) => {
                self.held_units += units as usize;
                Attempt::Placed((h, units))
            }
            None => Attempt::Refused {
                room: self.capacity_units - self.held_units >= units as usize,
            },
        })
    }
    fn free(&mut self, (h, units): Self::Handle) -> offload_runtime::Result<()> {
        self.a.free(h);
        self.held_units -= units as usize;
        Ok(())
    }
}

/// Run the workload through offset-allocator (bookkeeping only: it manages offsets, not memory).
pub fn run_offset_allocator(cfg: &ArenaBenchConfig) -> offload_runtime::Result<ArenaBenchRow> {
    let units = u32::try_from(cfg.capacity / UNIT).map_err(|_| {
        Error::Config(format!(
            "capacity {} bytes is too large for offset-allocator's u32 units of {UNIT} bytes",
            cfg.capacity
        ))
    })?;
    let mut t = Theirs {
        a: offset_allocator::Allocator::new(units),
        capacity_units: units as usize,
        held_units: 0,
    };
    let out = replay(cfg, &mut t)?;
    let report = t.a.storage_report();
    Ok(ArenaBenchRow {
        name: "offset-allocator 0.2",
        ops_per_sec: (out.allocs + out.frees) as f64 / out.secs,
        allocs: out.allocs,
        frees: out.frees,
        failed: out.failed,
        failed_with_room: out.failed_with_room,
        live_bytes: out.live_bytes,
        free_bytes: report.total_free_space as usize * UNIT,
        largest_fit: report.largest_free_region as usize * UNIT,
        waste: t.held_units * UNIT - out.live_bytes,
    })
}

/// The largest weight in the workload, in bytes.
pub fn largest_request() -> usize {
    sdxl_unet_weight_bytes().into_iter().max().unwrap_or(0)
}

/// The full-size SDXL UNet (fp16) placed as the runtime places a model: one
/// packed allocation per layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedUnet {
    /// Layers (one allocation each).
    pub layers: usize,
    /// Layers under a quarter page, which go to the slab instead of whole pages.
    pub slab_layers: usize,
    /// Bytes of all the UNet's tensors.
    pub bytes: usize,
    /// Bytes past the end of each page allocation up to its last page boundary.
    pub tail_waste: usize,
}

/// Lay the full-size SDXL UNet out per layer (the loader's preset and
/// layout) and pack each layer as [`Arena::alloc_packed`] would, for
/// `page_size` pages.
pub fn sdxl_unet_packed(page_size: usize) -> PackedUnet {
    let opts = PresetOptions {
        scale: 1,
        dtype: Dtype::F16,
        text_encoders: false,
        vae: false,
    };
    let specs = preset_specs(Preset::Sdxl, &opts);
    let layout = ModelLayout::from_specs(Path::new("sdxl_base.safetensors"), &specs);
    let mut out = PackedUnet {
        layers: 0,
        slab_layers: 0,
        bytes: 0,
        tail_waste: 0,
    };
    for comp in layout
        .components
        .iter()
        .filter(|c| c.kind == ComponentKind::Denoiser)
    {
        for layer in &comp.layers {
            let sizes: Vec<usize> = layer.tensors.iter().map(|t| t.len as usize).collect();
            let total = pack(&sizes).map_or(0, |p| p.total);
            out.layers += 1;
            out.bytes += sizes.iter().sum::<usize>();
            if total < page_size / 4 {
                out.slab_layers += 1;
            } else {
                out.tail_waste += total.div_ceil(page_size) * page_size - total;
            }
        }
    }
    out
}

/// Print the side-by-side table, then the page-tail waste of the same UNet placed one packed allocation per layer.
pub fn print_table(cfg: &ArenaBenchConfig, rows: &[ArenaBenchRow]) {
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "arena benchmark: {} ops, seed {}, capacity {:.0} MiB, target fill {:.0}% of requested bytes, SDXL UNet fp16 weight sizes (largest {:.1} MiB), our page size {} KiB",
        cfg.ops,
        cfg.seed,
        mib(cfg.capacity),
        cfg.fill * 100.0,
        mib(largest_request()),
        cfg.page_size >> 10
    );
    println!(
        "{:<22} {:>12} {:>9} {:>9} {:>8} {:>14} {:>9} {:>9} {:>16} {:>10}",
        "allocator",
        "ops/s",
        "allocs",
        "frees",
        "failed",
        "failed w/ room",
        "live MiB",
        "free MiB",
        "largest fit MiB",
        "waste MiB"
    );
    for r in rows {
        println!(
            "{:<22} {:>12.0} {:>9} {:>9} {:>8} {:>14} {:>9.1} {:>9.1} {:>16.1} {:>10.1}",
            r.name,
            r.ops_per_sec,
            r.allocs,
            r.frees,
            r.failed,
            r.failed_with_room,
            mib(r.live_bytes),
            mib(r.free_bytes),
            mib(r.largest_fit),
            mib(r.waste)
        );
    }
    let unet = sdxl_unet_packed(cfg.page_size);
    let slab = if unet.slab_layers > 0 {
        format!(", {} of them in slab slots", unet.slab_layers)
    } else {
        String::new()
    };
    println!(
        "SDXL UNet packed per layer ({} layers, {} pages{slab}): tail waste {:.1} MiB ({:.1}%)",
        unet.layers,
        page_label(cfg.page_size),
        mib(unet.tail_waste),
        unet.tail_waste as f64 * 100.0 / unet.bytes.max(1) as f64
    );
}

fn page_label(page_size: usize) -> String {
    if page_size >= 1 << 20 && page_size % (1 << 20) == 0 {
        format!("{} MiB", page_size >> 20)
    } else {
        format!("{} KiB", page_size >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_arena_places_every_request_its_free_pages_cover() {
        // 84% of 512 MiB requested, plus our page tails: the free pages run
        // short at times, and then, and only then, a request fails.
        let cfg = ArenaBenchConfig {
            capacity: 512 << 20,
            page_size: 2 << 20,
            fill: 0.84,
            ops: 20_000,
            seed: 7,
        };
        let host = run_ours_host(&cfg).unwrap();
        let null = run_ours_null(&cfg).unwrap();
        let theirs = run_offset_allocator(&cfg).unwrap();
        // No external fragmentation: every refusal had too few free pages.
        assert_eq!(host.failed_with_room, 0);
        assert_eq!(host.largest_fit, host.free_bytes);
        assert!(host.free_bytes > 0);
        // The two devices under our arena see the same workload and outcome.
        assert_eq!(
            (
                host.allocs,
                host.frees,
                host.failed,
                host.live_bytes,
                host.free_bytes,
                host.waste
            ),
            (
                null.allocs,
                null.frees,
                null.failed,
                null.live_bytes,
                null.free_bytes,
                null.waste
            )
        );
        for r in [&host, &null, &theirs] {
            // Operations are what was performed.
            assert_eq!(r.allocs + r.frees, cfg.ops, "{}", r.name);
            // Free, waste and live bytes account for the whole capacity.
            assert_eq!(
                r.free_bytes + r.waste + r.live_bytes,
                cfg.capacity,
                "{}",
                r.name
            );
            // The workload allocates only below its target.
            let target = (cfg.capacity as f64 * cfg.fill) as usize;
            assert!(r.live_bytes < target + largest_request(), "{}", r.name);
        }
        // The same stream through offset-allocator: it ends fragmented, and
        // refuses requests its free space covers.
        assert!(theirs.largest_fit < theirs.free_bytes);
        assert!(theirs.failed_with_room > 0);
        assert!(theirs.allocs > 0);
    }

    #[test]
    fn every_allocator_replays_one_workload() {
        // Room to spare: nobody fails, so all perform the same operations.
        let cfg = ArenaBenchConfig {
            capacity: 1 << 30,
            page_size: 2 << 20,
            fill: 0.3,
            ops: 5_000,
            seed: 3,
        };
        let rows = [
            run_ours_host(&cfg).unwrap(),
            run_ours_null(&cfg).unwrap(),
            run_offset_allocator(&cfg).unwrap(),
        ];
        for r in &rows {
            assert_eq!(r.failed, 0, "{}", r.name);
            assert_eq!(
                (r.allocs, r.frees, r.live_bytes),
                (rows[0].allocs, rows[0].frees, rows[0].live_bytes),
                "{}",
                r.name
            );
        }
        assert!(rows[0].frees > 0);
    }

    #[test]
    fn the_packed_unet_wastes_under_a_page_per_layer() {
        let unet = sdxl_unet_packed(2 << 20);
        assert!(unet.layers > 100, "{unet:?}");
        assert!(unet.tail_waste < (unet.layers - unet.slab_layers) * (2 << 20));
        // 2,567,463,684 fp16 parameters.
        assert_eq!(unet.bytes, 2 * 2_567_463_684);
    }
}
