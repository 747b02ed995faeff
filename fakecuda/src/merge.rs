//! The LoRA merge kernels of `offload-kernels` (`lowrank_merge.cu`), run on
//! the CPU from their launch parameters.
//!
//! This is an emulation of what each kernel computes, written from the
//! parameter blocks' documented meaning ([`offload_kernels::cuda`]), not a
//! copy of the CUDA code: for every element of W's row slice,
//! `W ← round(W + Σ scale · Δ)` with the sum taken in f64, rounded to f32
//! (as the kernels hold their sum) and then to W's dtype. It is within the tests' tolerance of what a GPU computes
//! (fp32 accumulation), not bit-identical to it, and it checks nothing of
//! the device code itself (its tiles, tensor-core fragments, pipelines:
//! the GPU tests and `kernels/tests/cuda_emulation.rs` do). What it checks
//! is the host side of a merge: which kernel is launched, with which
//! parameters, device addresses, block shape and grid, on which stream, and
//! that every byte it reads and writes is still device memory when the
//! stream gets to it.
//!
//! The grid is taken as a kernel takes it: each block of a low-rank kernel
//! merges the tiles of its column strip that the kernels' walk gives it
//! (`offload_lr_walk`), each block of a batched launch finds its job as
//! `offload_batch_job` does, and each block of the general kernel merges
//! one 64 × 64 tile; so a grid too small leaves tiles unmerged, as it
//! would on a GPU.
//!
//! A launch is refused (an error, and a message on standard error) where a
//! GPU would compute garbage, fault or race: a block shape that is not the
//! kernel's; dynamic shared memory (the kernels take none, and the
//! pipelined one's static 36 KiB leaves little); a dtype code out of range;
//! an operand not aligned to its element size; an adapter of a tensor-core
//! kernel whose two factors are not both f16 or both bf16 (those kernels
//! read both as the up factor's 16-bit type); a job with no columns (the
//! walk divides by the column strips); an index map of the general kernel
//! dividing by 0, or reading more columns than a row has; batched jobs
//! whose W slices overlap; W overlapping a factor. Stricter than a GPU, it
//! also refuses what a kernel would clamp or ignore: a low-rank grid that
//! is not one-dimensional, a general grid with z above 1, more adapters
//! (or jobs' adapters) than the parameter block holds, a term count other
//! than 1 or 2, a dtype code out of range on a rank-0 adapter, grids of
//! more than [`MAX_BLOCKS`] blocks (the emulation visits every block), and
//! a low-rank launch (or batched job) of a tile-walking kernel with more
//! blocks than its slice has tiles of that kernel's height (the runtime's
//! grids are at most one a tile, so more means a grid sized for another
//! kernel).

use std::ops::Range;

use offload_kernels::cuda::{
    self as k, LowRankAdapterParams, LowRankBatchParams, LowRankJobParams, LowRankMergeParams,
    MergeAdapterParams, MergeParams, MergeTermParams,
};
use offload_kernels::Dtype;

use half::{bf16, f16};

/// The most blocks a merge launch may have on the fake (its emulation
/// visits each block).
pub(crate) const MAX_BLOCKS: u64 = 1 << 24;

/// The body a low-rank kernel runs: they differ in tile height and in how
/// they compute, not in what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    Fma,
    Mma,
    Pipe,
    /// The pipelined one on 128-row tiles.
    PipeTall,
    /// A streaming kernel (one tensor per launch only).
    Stream(k::StreamKernel),
}

impl Body {
    fn tile_rows(self) -> u32 {
        match self {
            Body::Fma | Body::Mma => k::LOWRANK_TILE_ROWS,
            Body::Pipe => k::PIPE_TILE_ROWS,
            Body::PipeTall => k::PIPE_TALL_TILE_ROWS,
            // Walked by `walk_stream_block`, in groups of rows.
            Body::Stream(_) => 0,
        }
    }

    fn block_dim(self) -> (u32, u32, u32) {
        match self {
            Body::Fma => k::LOWRANK_BLOCK_DIM,
            Body::Mma => k::MMA_BLOCK_DIM,
            Body::Pipe => k::PIPE_BLOCK_DIM,
            Body::PipeTall => k::PIPE_TALL_BLOCK_DIM,
            Body::Stream(_) => k::STREAM_BLOCK_DIM,
        }
    }
}

/// Which merge kernel an entry point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    LowRank { body: Body, batch: bool, w: Dtype },
    General { w: Dtype },
}

/// The merge kernel named `name`, if it is one.
pub(crate) fn kernel(name: &str) -> Option<Kernel> {
    Dtype::ALL.into_iter().find_map(|w| {
        let low = |body, batch| Some(Kernel::LowRank { body, batch, w });
        match name {
            n if n == k::lowrank_merge_entry(w) => low(Body::Fma, false),
            n if n == k::lowrank_merge_mma_entry(w) => low(Body::Mma, false),
            n if n == k::lowrank_merge_pipe_entry(w) => low(Body::Pipe, false),
            n if n == k::lowrank_merge_batch_entry(w) => low(Body::Fma, true),
            n if n == k::lowrank_merge_mma_batch_entry(w) => low(Body::Mma, true),
            n if n == k::lowrank_merge_pipe_batch_entry(w) => low(Body::Pipe, true),
            n if n == k::lowrank_merge_pipe_tall_entry(w) => low(Body::PipeTall, false),
            n if n == k::lowrank_merge_pipe_tall_batch_entry(w) => low(Body::PipeTall, true),
            n if n == k::merge_entry(w) => Some(Kernel::General { w }),
            n if n == k::StreamKernel::Ranks8.entry(w) => {
                low(Body::Stream(k::StreamKernel::Ranks8), false)
            }
            n if n == k::StreamKernel::Ranks32.entry(w) => {
                low(Body::Stream(k::StreamKernel::Ranks32), false)
            }
            n if n == k::StreamKernel::Ranks8Shared.entry(w) => {
                low(Body::Stream(k::StreamKernel::Ranks8Shared), false)
            }
            _ => None,
        }
    })
}

/// One matrix a delta reads: `T[a, b]` is `base[a * stride + b]` (stored
/// whole) or `Σ_r L[a, r] · R[r, b]` (`rank` > 0).
#[derive(Clone, Copy, Debug)]
struct Term {
    left: Operand,
    right: Operand,
    rank: usize,
    cols: usize,
    row_div: usize,
    row_mod: usize,
    col_div: usize,
    col_mod: usize,
}

/// A matrix in device memory: its address, dtype, and the bytes it spans
/// (resolved to a host address when the stream runs the launch).
#[derive(Clone, Copy, Debug, Default)]
struct Operand {
    ptr: u64,
    dtype: u8,
    len: usize,
    /// Index into the launch's resolved ranges.
    slot: usize,
}

/// One adapter: `scale · (terms[0] or terms[0] ⊙ terms[1])`.
#[derive(Clone, Copy, Debug)]
struct AdapterJob {
    scale: f64,
    terms: [Term; 2],
    num_terms: usize,
}

/// One tensor's merge: W's row slice and its adapters.
#[derive(Clone, Debug)]
struct Job {
    w: Operand,
    cols: usize,
    adapters: Vec<AdapterJob>,
}

/// A rectangle of one job's slice that one block merges.
#[derive(Clone, Debug)]
struct Tile {
    job: usize,
    rows: Range<usize>,
    cols: Range<usize>,
}

/// A launch, checked and laid out: the device ranges it touches and the
/// tiles its blocks merge.
pub(crate) struct Launch {
    /// `(address, bytes)` of every operand, in slot order.
    pub ranges: Vec<(u64, usize)>,
    jobs: Vec<Job>,
    tiles: Vec<Tile>,
    w_dtype: u8,
}

type Refusal = String;

fn dtype_size(code: u8) -> usize {
    if code == 0 {
        4
    } else {
        2
    }
}

fn check_dtype(code: u32, what: &str) -> Result<u8, Refusal> {
    if code <= 2 {
        Ok(code as u8)
    } else {
        Err(format!("{what} has dtype code {code} (0, 1 or 2)"))
    }
}

/// Bytes of `elements` values of `dtype`, refusing an overflow.
fn bytes(elements: u64, dtype: u8, what: &str) -> Result<usize, Refusal> {
    elements
        .checked_mul(dtype_size(dtype) as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("{what}: {elements} elements overflow"))
}

/// Lays out a launch of `kernel` with grid `grid` and block `block` from
/// its parameter block `param` (the bytes the one kernel argument points
/// to), or says why it is refused.
///
/// # Safety
/// `param` points to at least the kernel's parameter block's size in bytes.
pub(crate) unsafe fn plan(
    kernel: Kernel,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    param: *const u8,
) -> Result<Launch, Refusal> {
    if shared != 0 {
        return Err(format!(
            "{shared} bytes of dynamic shared memory (the merge kernels take none)"
        ));
    }
    let blocks = u64::from(grid.0) * u64::from(grid.1) * u64::from(grid.2);
    if blocks > MAX_BLOCKS {
        return Err(format!(
            "grid {grid:?}: {blocks} blocks (the fake takes at most {MAX_BLOCKS})"
        ));
    }
    let launch = match kernel {
        Kernel::LowRank { body, batch, w } => {
            if block != body.block_dim() {
                return Err(format!(
                    "block {block:?}, the kernel's is {:?}",
                    body.block_dim()
                ));
            }
            if grid.1 != 1 || grid.2 != 1 {
                return Err(format!(
                    "grid {grid:?}: the low-rank kernels take a one-dimensional grid"
                ));
            }
            let w_dtype = w;
            let w = k::dtype_code(w) as u8;
            if batch {
                // SAFETY: the caller's bound (the batched kernels' block);
                // the block is `Pod`, read unaligned.
                let p: LowRankBatchParams =
                    unsafe { param.cast::<LowRankBatchParams>().read_unaligned() };
                plan_batch(&p, grid.0, body, w)?
            } else {
                // SAFETY: the caller's bound (the one-tensor kernels'
                // block); the block is `Pod`, read unaligned.
                let p: LowRankMergeParams =
                    unsafe { param.cast::<LowRankMergeParams>().read_unaligned() };
                let mut l = empty(w);
                let n = p.num_adapters as usize;
                if n > k::MAX_ADAPTERS {
                    return Err(format!("{n} adapters (at most {})", k::MAX_ADAPTERS));
                }
                let job = l.lowrank_job(body, p.w, p.rows, p.cols, p.row0, &p.adapters[..n])?;
                at_most_a_block_a_tile(body, p.rows, p.cols, grid.0)?;
                for b in 0..grid.0 {
                    match body {
                        Body::Stream(sk) => {
                            let total: u64 =
                                p.adapters[..n].iter().map(|a| u64::from(a.rank)).sum();
                            if total > u64::from(sk.max_rank()) {
                                // The kernel would drop the ranks past its registers.
                                return Err(format!(
                                    "ranks adding up to {total} on the streaming kernel for at most {}",
                                    sk.max_rank()
                                ));
                            }
                            let rows = sk.group_rows(w_dtype);
                            l.walk_stream_block(job, p.rows, p.cols, b, grid.0, sk, rows);
                        }
                        _ => l.walk_block(job, p.rows, p.cols, b, grid.0, body.tile_rows()),
                    }
                }
                l
            }
        }
        Kernel::General { w } => {
            if block != k::BLOCK_DIM {
                return Err(format!(
                    "block {block:?}, the kernel's is {:?}",
                    k::BLOCK_DIM
                ));
            }
            if grid.2 != 1 {
                return Err(format!(
                    "grid {grid:?}: the general kernel's grid is two-dimensional"
                ));
            }
            // SAFETY: the caller's bound (the general kernel's block); the
            // block is `Pod`, read unaligned.
            let p: MergeParams = unsafe { param.cast::<MergeParams>().read_unaligned() };
            plan_general(&p, grid, k::dtype_code(w) as u8)?
        }
    };
    launch.check_overlaps()?;
    Ok(launch)
}

fn empty(w_dtype: u8) -> Launch {
    Launch {
        ranges: Vec::new(),
        jobs: Vec::new(),
        tiles: Vec::new(),
        w_dtype,
    }
}

fn plan_batch(p: &LowRankBatchParams, blocks: u32, body: Body, w: u8) -> Result<Launch, Refusal> {
    let mut l = empty(w);
    let n = (p.num_jobs as usize).min(k::BATCH_MAX_JOBS);
    let mut jobs = Vec::with_capacity(n);
    for (j, job) in p.jobs[..n].iter().enumerate() {
        let LowRankJobParams {
            w,
            rows,
            cols,
            row0,
            num_adapters,
            ref adapters,
        } = *job;
        let a = num_adapters as usize;
        if a > k::BATCH_MAX_ADAPTERS {
            return Err(format!(
                "job {j}: {a} adapters (at most {})",
                k::BATCH_MAX_ADAPTERS
            ));
        }
        jobs.push(
            l.lowrank_job(body, w, rows, cols, row0, &adapters[..a])
                .map_err(|e| format!("job {j}: {e}"))?,
        );
    }
    for (j, job) in p.jobs[..n].iter().enumerate() {
        let count = p.first_block[j + 1].wrapping_sub(p.first_block[j]);
        at_most_a_block_a_tile(body, job.rows, job.cols, count)
            .map_err(|e| format!("job {j}: {e}"))?;
    }
    // offload_batch_job: block b belongs to the last job k whose first
    // block is at most b; blocks at or past first_block[n] merge nothing.
    for b in 0..blocks {
        if n == 0 || b >= p.first_block[n] {
            continue;
        }
        let mut j = 0;
        for kk in 1..k::BATCH_MAX_JOBS {
            if kk < n && b >= p.first_block[kk] {
                j = kk;
            }
        }
        let count = p.first_block[j + 1].wrapping_sub(p.first_block[j]);
        let job = &p.jobs[j];
        l.walk_block(
            jobs[j],
            job.rows,
            job.cols,
            b.wrapping_sub(p.first_block[j]),
            count,
            body.tile_rows(),
        );
    }
    Ok(l)
}

/// Refuses `blocks` blocks of a tile-walking low-rank body for a slice of
/// `rows` × `cols` with fewer tiles: a GPU would leave the extra blocks
/// idle, but the runtime's grids are at most one block a tile of the body
/// they are sized for (`lowrank_grid` in `offload_kernels::cuda`), so more
/// means a grid sized for another body (such as 64-row tiles for the
/// 128-row pipelined kernel). The streaming bodies walk groups of rows, not
/// tiles, and are not checked.
fn at_most_a_block_a_tile(body: Body, rows: u32, cols: u32, blocks: u32) -> Result<(), Refusal> {
    let tile_rows = body.tile_rows();
    if tile_rows == 0 {
        return Ok(());
    }
    let tiles = u64::from(cols.div_ceil(k::LOWRANK_TILE_COLS).max(1))
        * u64::from(rows.div_ceil(tile_rows).max(1));
    if u64::from(blocks) > tiles {
        return Err(format!(
            "{blocks} blocks for {rows} x {cols}, {tiles} tiles of {tile_rows} x {} on the {body:?} kernel (the runtime's grids are at most one block a tile)",
            k::LOWRANK_TILE_COLS
        ));
    }
    Ok(())
}

fn plan_general(p: &MergeParams, grid: (u32, u32, u32), w: u8) -> Result<Launch, Refusal> {
    let mut l = empty(w);
    let n = p.num_adapters as usize;
    if n > k::MERGE_MAX_ADAPTERS {
        return Err(format!("{n} adapters (at most {})", k::MERGE_MAX_ADAPTERS));
    }
    let (rows, cols) = (p.rows as usize, p.cols as usize);
    let wo = l.w_operand(p.w, p.rows, p.cols, p.row0)?;
    let mut adapters = Vec::with_capacity(n);
    for (i, a) in p.adapters[..n].iter().enumerate() {
        let MergeAdapterParams {
            terms,
            num_terms,
            scale,
        } = *a;
        if !(1..=2).contains(&num_terms) {
            return Err(format!("adapter {i}: {num_terms} terms (1 or 2)"));
        }
        let first = l.term(&terms[0], i)?;
        let second = if num_terms == 2 {
            l.term(&terms[1], i)?
        } else {
            first
        };
        adapters.push(AdapterJob {
            scale: f64::from(scale),
            terms: [first, second],
            num_terms: num_terms as usize,
        });
    }
    l.jobs.push(Job {
        w: wo,
        cols,
        adapters,
    });
    // One 64 x 64 tile per block: (blockIdx.x, blockIdx.y) at
    // (column x * 64, row y * 64); blocks past the slice merge nothing.
    let (tr, tc) = (k::TILE_ROWS as usize, k::TILE_COLS as usize);
    for by in 0..grid.1 as usize {
        for bx in 0..grid.0 as usize {
            let (r0, c0) = (by * tr, bx * tc);
            if r0 < rows && c0 < cols {
                l.tiles.push(Tile {
                    job: 0,
                    rows: r0..(r0 + tr).min(rows),
                    cols: c0..(c0 + tc).min(cols),
                });
            }
        }
    }
    Ok(l)
}

impl Launch {
    /// An operand of `len` bytes at `ptr`; one of no bytes has no range
    /// (nothing reads it).
    fn operand(&mut self, ptr: u64, dtype: u8, len: usize) -> Result<Operand, Refusal> {
        if len == 0 {
            return Ok(Operand::default());
        }
        if ptr % dtype_size(dtype) as u64 != 0 {
            return Err(format!(
                "an operand at {ptr:#x} is not aligned to its {}-byte elements",
                dtype_size(dtype)
            ));
        }
        ptr.checked_add(len as u64)
            .ok_or_else(|| format!("an operand at {ptr:#x} + {len} bytes overflows"))?;
        let slot = self.ranges.len();
        self.ranges.push((ptr, len));
        Ok(Operand {
            ptr,
            dtype,
            len,
            slot,
        })
    }

    /// W's row slice `row0 .. row0 + rows` of a `cols`-wide matrix.
    fn w_operand(&mut self, w: u64, rows: u32, cols: u32, row0: u32) -> Result<Operand, Refusal> {
        let size = dtype_size(self.w_dtype) as u64;
        let ptr = (u64::from(row0) * u64::from(cols))
            .checked_mul(size)
            .and_then(|start| w.checked_add(start))
            .ok_or_else(|| format!("W {w:#x} + row {row0} of {cols} columns overflows"))?;
        let len = bytes(u64::from(rows) * u64::from(cols), self.w_dtype, "W")?;
        self.operand(ptr, self.w_dtype, len)
    }

    /// A low-rank job: `Δ = up · down`, up `[rows, rank]`, down `[rank, cols]`.
    fn lowrank_job(
        &mut self,
        body: Body,
        w: u64,
        rows: u32,
        cols: u32,
        row0: u32,
        adapters: &[LowRankAdapterParams],
    ) -> Result<usize, Refusal> {
        if cols == 0 {
            return Err(
                "a job with no columns (the kernels' walk divides by its column strips)".into(),
            );
        }
        let wo = self.w_operand(w, rows, cols, row0)?;
        let mut list = Vec::with_capacity(adapters.len());
        for (i, a) in adapters.iter().enumerate() {
            // The tensor-core kernels read both factors as the up factor's
            // 16-bit type (bf16, else f16).
            if matches!(body, Body::Mma | Body::Pipe | Body::PipeTall)
                && a.rank > 0
                && !(a.up_dtype == a.down_dtype && (1..=2).contains(&a.up_dtype))
            {
                return Err(format!(
                    "adapter {i}: factors of dtype codes {} and {} on the {body:?} kernel (both f16 or both bf16)",
                    a.up_dtype, a.down_dtype
                ));
            }
            let (ud, dd) = (
                check_dtype(a.up_dtype, &format!("adapter {i}'s up factor"))?,
                check_dtype(a.down_dtype, &format!("adapter {i}'s down factor"))?,
            );
            let rank = u64::from(a.rank);
            // A rank-0 adapter reads nothing and adds nothing.
            let (up, down) = if rank == 0 {
                (Operand::default(), Operand::default())
            } else {
                let ul = bytes(u64::from(rows) * rank, ud, "up factor")?;
                let dl = bytes(rank * u64::from(cols), dd, "down factor")?;
                (self.operand(a.up, ud, ul)?, self.operand(a.down, dd, dl)?)
            };
            let term = Term {
                left: up,
                right: down,
                rank: a.rank as usize,
                cols: cols as usize,
                row_div: 1,
                row_mod: rows.max(1) as usize,
                col_div: 1,
                col_mod: cols.max(1) as usize,
            };
            list.push(AdapterJob {
                scale: f64::from(a.scale),
                terms: [term, term],
                num_terms: 1,
            });
        }
        self.jobs.push(Job {
            w: wo,
            cols: cols as usize,
            adapters: list,
        });
        Ok(self.jobs.len() - 1)
    }

    /// A term of the general kernel.
    fn term(&mut self, t: &MergeTermParams, adapter: usize) -> Result<Term, Refusal> {
        let what = format!("adapter {adapter}");
        if t.row_div == 0 || t.row_mod == 0 || t.col_div == 0 || t.col_mod == 0 {
            return Err(format!("{what}: an index map divides by 0 ({t:?})"));
        }
        if t.col_mod > t.cols {
            return Err(format!(
                "{what}: {} columns read from rows of {} ({t:?})",
                t.col_mod, t.cols
            ));
        }
        let ld = check_dtype(t.left_dtype, &what)?;
        let (rows, cols, rank) = (u64::from(t.row_mod), u64::from(t.cols), u64::from(t.rank));
        let (left, right) = if t.rank == 0 {
            let len = bytes((rows - 1) * cols + u64::from(t.col_mod), ld, &what)?;
            (self.operand(t.left, ld, len)?, Operand::default())
        } else {
            let rd = check_dtype(t.right_dtype, &what)?;
            let ll = bytes(rows * rank, ld, &what)?;
            let rl = bytes((rank - 1) * cols + u64::from(t.col_mod), rd, &what)?;
            (
                self.operand(t.left, ld, ll)?,
                self.operand(t.right, rd, rl)?,
            )
        };
        Ok(Term {
            left,
            right,
            rank: t.rank as usize,
            cols: t.cols as usize,
            row_div: t.row_div as usize,
            row_mod: t.row_mod as usize,
            col_div: t.col_div as usize,
            col_mod: t.col_mod as usize,
        })
    }

    /// `offload_lr_walk`: block `block` of `blocks` takes column strip
    /// `block % tiles_x` and in it row tiles `y, y + step, ...` from
    /// `y = block / tiles_x`, `step = blocks / tiles_x`; blocks past the
    /// last whole multiple of `tiles_x` take none.
    fn walk_block(
        &mut self,
        job: usize,
        rows: u32,
        cols: u32,
        block: u32,
        blocks: u32,
        tile_rows: u32,
    ) {
        let tc = k::LOWRANK_TILE_COLS;
        let tiles_x = cols.div_ceil(tc);
        if tiles_x == 0 {
            // A GPU divides by zero here: no launch has an empty row.
            return;
        }
        let tiles_y = rows.div_ceil(tile_rows);
        let step = blocks / tiles_x;
        if step == 0 || block >= tiles_x * step {
            return;
        }
        let c0 = (block % tiles_x) * tc;
        let mut y = block / tiles_x;
        while y < tiles_y {
            let r0 = y * tile_rows;
            self.tiles.push(Tile {
                job,
                rows: r0 as usize..r0.saturating_add(tile_rows).min(rows) as usize,
                cols: c0 as usize..c0.saturating_add(tc).min(cols) as usize,
            });
            y += step;
        }
    }

    /// The groups of rows the streaming kernel's block `block` of `blocks`
    /// merges (`offload_lowrank_merge_stream`): warp w of the block takes
    /// the groups 8 · (block / strips) + w, then every 8 · (blocks / strips),
    /// of the strip block % strips.
    #[allow(clippy::too_many_arguments)]
    fn walk_stream_block(
        &mut self,
        job: usize,
        rows: u32,
        cols: u32,
        block: u32,
        blocks: u32,
        sk: k::StreamKernel,
        group_rows: u32,
    ) {
        let sw = 32 * sk.cols_per_lane();
        let strips = cols.div_ceil(sw);
        if strips == 0 {
            return;
        }
        let per_strip = blocks / strips;
        if per_strip == 0 || block >= strips * per_strip {
            return;
        }
        let warps = k::STREAM_BLOCK_DIM.0 / 32;
        let groups = rows.div_ceil(group_rows);
        let c0 = (block % strips) * sw;
        for w in 0..warps {
            let mut g = (block / strips) * warps + w;
            while g < groups {
                let r0 = g * group_rows;
                self.tiles.push(Tile {
                    job,
                    rows: r0 as usize..r0.saturating_add(group_rows).min(rows) as usize,
                    cols: c0 as usize..c0.saturating_add(sw).min(cols) as usize,
                });
                g = g.saturating_add(per_strip * warps);
            }
        }
    }

    /// Refuses what would race on a GPU: two jobs' W slices that overlap,
    /// or W overlapping a factor.
    fn check_overlaps(&self) -> Result<(), Refusal> {
        // (No overflow: `operand` checked every end.)
        let span = |o: &Operand| o.ptr..o.ptr + o.len as u64;
        let meets = |a: &Range<u64>, b: &Range<u64>| a.start < b.end && b.start < a.end;
        for (i, a) in self.jobs.iter().enumerate() {
            let wa = span(&a.w);
            for (j, b) in self.jobs.iter().enumerate().skip(i + 1) {
                if meets(&wa, &span(&b.w)) {
                    return Err(format!(
                        "jobs {i} and {j} write overlapping W ({wa:#x?} and {:#x?})",
                        span(&b.w)
                    ));
                }
            }
            for (j, b) in self.jobs.iter().enumerate() {
                for ad in &b.adapters {
                    for t in &ad.terms[..ad.num_terms] {
                        for o in [&t.left, &t.right] {
                            if o.len > 0 && meets(&wa, &span(o)) {
                                return Err(format!(
                                    "job {i}'s W {wa:#x?} overlaps a factor of job {j} ({:#x?})",
                                    span(o)
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the launch on the resolved host addresses `at` (one per range).
    ///
    /// # Safety
    /// `at[i]` is where `ranges[i]`'s bytes live, readable and writable,
    /// and they stay mapped during the call; no other thread writes them,
    /// nor reads what the launch writes, during the call (on a GPU, work
    /// of another stream not ordered with the launch would race the same
    /// way).
    pub(crate) unsafe fn run(&self, at: &[usize]) {
        // A thread for every 8 tiles at most: most merges of a pass are a
        // few tiles, which the stream's own thread runs sooner than spawning.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let threads = threads.min(self.tiles.len().div_ceil(8)).max(1);
        if threads == 1 {
            let mut scratch = Scratch::default();
            for tile in &self.tiles {
                // SAFETY: the caller's bound; one thread.
                unsafe { self.merge_tile(tile, at, &mut scratch) };
            }
            return;
        }
        std::thread::scope(|s| {
            for t in 0..threads {
                s.spawn(move || {
                    let mut scratch = Scratch::default();
                    for tile in self.tiles.iter().skip(t).step_by(threads) {
                        // SAFETY: the caller's bound; tiles are disjoint
                        // (the walk gives a tile to one block, jobs'
                        // slices do not overlap), so no element is written
                        // by two threads.
                        unsafe { self.merge_tile(tile, at, &mut scratch) };
                    }
                });
            }
        });
    }

    /// `W ← round(W + Σ scale · Δ)` over one tile, the sum in f64.
    ///
    /// # Safety
    /// As [`Self::run`].
    unsafe fn merge_tile(&self, tile: &Tile, at: &[usize], s: &mut Scratch) {
        let job = &self.jobs[tile.job];
        let (ni, nj) = (tile.rows.len(), tile.cols.len());
        s.delta.clear();
        s.delta.resize(ni * nj, 0.0);
        for a in &job.adapters {
            // SAFETY: the caller's bound; the tile is within the slice, so
            // every index the maps give is within the terms' extents
            // (checked by `plan`).
            unsafe { a.terms[0].tile(tile, at, &mut s.term, &mut s.left, &mut s.right) };
            if a.num_terms == 2 {
                // SAFETY: as above.
                unsafe { a.terms[1].tile(tile, at, &mut s.other, &mut s.left, &mut s.right) };
                for (t, o) in s.term.iter_mut().zip(&s.other) {
                    *t *= o;
                }
            }
            for (d, t) in s.delta.iter_mut().zip(&s.term) {
                *d += a.scale * t;
            }
        }
        let w = at[job.w.slot];
        for (ii, i) in tile.rows.clone().enumerate() {
            for (jj, j) in tile.cols.clone().enumerate() {
                let e = i * job.cols + j;
                // SAFETY: element e of W's slice (i < rows, j < cols).
                unsafe {
                    let old = load(self.w_dtype, w, e);
                    store(self.w_dtype, w, e, old + s.delta[ii * nj + jj]);
                }
            }
        }
    }
}

/// One thread's buffers for [`Launch::merge_tile`].
#[derive(Default)]
struct Scratch {
    delta: Vec<f64>,
    term: Vec<f64>,
    other: Vec<f64>,
    left: Vec<f64>,
    right: Vec<f64>,
}

impl Term {
    /// Writes `T[(i / row_div) % row_mod, (j / col_div) % col_mod]` for the
    /// tile's elements into `out` (row-major, the tile's shape); `left` and
    /// `right` are scratch for the factors' rows and columns.
    ///
    /// # Safety
    /// As [`Launch::run`].
    unsafe fn tile(
        &self,
        tile: &Tile,
        at: &[usize],
        out: &mut Vec<f64>,
        left: &mut Vec<f64>,
        right: &mut Vec<f64>,
    ) {
        let (ni, nj) = (tile.rows.len(), tile.cols.len());
        out.clear();
        out.resize(ni * nj, 0.0);
        if self.left.len == 0 {
            // A rank-0 adapter: no factor bytes, no delta.
            return;
        }
        let a = |i: usize| (i / self.row_div) % self.row_mod;
        let b = |j: usize| (j / self.col_div) % self.col_mod;
        let l = at[self.left.slot];
        if self.rank == 0 {
            for (ii, i) in tile.rows.clone().enumerate() {
                for (jj, j) in tile.cols.clone().enumerate() {
                    // SAFETY: within the operand (a < row_mod, b < col_mod).
                    out[ii * nj + jj] =
                        unsafe { load(self.left.dtype, l, a(i) * self.cols + b(j)) };
                }
            }
            return;
        }
        let (r, rank) = (at[self.right.slot], self.rank);
        // L's rows and R's columns that the tile reads, decoded once.
        left.clear();
        for i in tile.rows.clone() {
            // SAFETY: within L (a < row_mod, q < rank).
            left.extend((0..rank).map(|q| unsafe { load(self.left.dtype, l, a(i) * rank + q) }));
        }
        right.clear();
        for q in 0..rank {
            // SAFETY: within R (q < rank, b < col_mod).
            right.extend(
                tile.cols
                    .clone()
                    .map(|j| unsafe { load(self.right.dtype, r, q * self.cols + b(j)) }),
            );
        }
        for ii in 0..ni {
            let row = &mut out[ii * nj..(ii + 1) * nj];
            for q in 0..rank {
                let lv = left[ii * rank + q];
                for (o, rv) in row.iter_mut().zip(&right[q * nj..(q + 1) * nj]) {
                    *o += lv * rv;
                }
            }
        }
    }
}

/// Element `i` of an array of dtype `code` at host address `base`.
///
/// # Safety
/// The element is readable.
unsafe fn load(code: u8, base: usize, i: usize) -> f64 {
    // SAFETY: the caller's bound.
    unsafe {
        match code {
            0 => f64::from((base as *const f32).add(i).read_unaligned()),
            1 => f64::from(f16::from_bits((base as *const u16).add(i).read_unaligned())),
            _ => f64::from(bf16::from_bits(
                (base as *const u16).add(i).read_unaligned(),
            )),
        }
    }
}

/// Stores `v` rounded to dtype `code` as element `i` at `base`: through
/// f32, as the kernels round their fp32 sum.
///
/// # Safety
/// The element is writable.
unsafe fn store(code: u8, base: usize, i: usize, v: f64) {
    let v = v as f32;
    // SAFETY: the caller's bound.
    unsafe {
        match code {
            0 => (base as *mut f32).add(i).write_unaligned(v),
            1 => (base as *mut u16)
                .add(i)
                .write_unaligned(f16::from_f32(v).to_bits()),
            _ => (base as *mut u16)
                .add(i)
                .write_unaligned(bf16::from_f32(v).to_bits()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_a_merge_kernel() {
        let mut n = 0;
        for w in Dtype::ALL {
            for name in [
                k::lowrank_merge_entry(w),
                k::lowrank_merge_mma_entry(w),
                k::lowrank_merge_pipe_entry(w),
                k::lowrank_merge_batch_entry(w),
                k::lowrank_merge_mma_batch_entry(w),
                k::lowrank_merge_pipe_batch_entry(w),
                k::lowrank_merge_pipe_tall_entry(w),
                k::lowrank_merge_pipe_tall_batch_entry(w),
                k::merge_entry(w),
                k::StreamKernel::Ranks8.entry(w),
                k::StreamKernel::Ranks32.entry(w),
                k::StreamKernel::Ranks8Shared.entry(w),
            ] {
                assert!(kernel(name).is_some(), "{name}");
                assert!(k::LOWRANK_MERGE_SRC.contains(name), "{name}");
                n += 1;
            }
        }
        assert_eq!(n, 36);
        assert_eq!(kernel("offload_f32_to_f16"), None);
    }

    /// The streaming kernels' walk, as the fake models it, merges every
    /// element of the slice exactly once: one block per strip, several,
    /// more than the groups need, the launch's own grid, and blocks past
    /// the last whole multiple of the strips.
    #[test]
    fn the_streaming_walk_covers_every_element_once() {
        for (rows, cols) in [(1u32, 1u32), (130, 70), (300, 517), (1280, 640)] {
            for sk in [
                k::StreamKernel::Ranks8,
                k::StreamKernel::Ranks32,
                k::StreamKernel::Ranks8Shared,
            ] {
                for dtype in Dtype::ALL {
                    let group_rows = sk.group_rows(dtype);
                    let strips = cols.div_ceil(32 * sk.cols_per_lane());
                    let mut p = LowRankMergeParams {
                        rows,
                        cols,
                        ..Default::default()
                    };
                    p.num_adapters = 1;
                    let grid = p.stream_launch_dims(sk, dtype, 132).0 .0;
                    for blocks in [
                        strips,
                        3 * strips,
                        3 * strips + strips / 2,
                        1000 * strips,
                        grid,
                    ] {
                        let mut l = empty(0);
                        for b in 0..blocks {
                            l.walk_stream_block(0, rows, cols, b, blocks, sk, group_rows);
                        }
                        let mut seen = vec![0u8; (rows * cols) as usize];
                        for t in &l.tiles {
                            for r in t.rows.clone() {
                                for c in t.cols.clone() {
                                    seen[r * cols as usize + c] += 1;
                                }
                            }
                        }
                        assert!(
                            seen.iter().all(|&n| n == 1),
                            "{sk:?} {dtype} [{rows}, {cols}] on {blocks} blocks"
                        );
                    }
                }
            }
        }
    }
}
