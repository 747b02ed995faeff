//! CUDA C sources for the merge, compiled at run time with NVRTC by the
//! runtime, and the layout of their launch parameters.
//!
//! This module does not talk to CUDA (it does not depend on cudarc): it
//! holds the source text, the entry-point names, and the `#[repr(C)]`
//! parameter blocks the kernels take by value ([`LowRankMergeParams`],
//! [`LowRankBatchParams`], [`MergeParams`]), so the runtime can compile,
//! launch and check them.
//!
//! Four kernels, each with an entry point per weight dtype (the source's
//! header comment describes them in detail):
//!
//! - **low-rank, fp32 FMA** ([`lowrank_merge_entry`], [`LowRankMergeParams`]):
//!   `Δ = up · down` (kohya, peft, LoCon) for up to [`MAX_ADAPTERS`] stacked
//!   adapters, any rank (chunks of 32 ranks in shared memory), any factor
//!   dtypes. Meant to be bound by memory bandwidth for rank ≤ 32.
//! - **low-rank, tensor cores** ([`lowrank_merge_mma_entry`], the same
//!   parameters): `mma.sync.m16n8k16` with fp32 accumulation, for adapters
//!   whose two factors are both f16 or both bf16 (their products are exact
//!   in fp32), on compute capability ≥ [`MMA_MIN_COMPUTE_CAPABILITY`]. Each
//!   adapter's product is scaled in fp32 after the product
//!   ([`LowRankMergeParams::tensor_cores`] says when to take it).
//! - **low-rank, pipelined tensor cores** ([`lowrank_merge_pipe_entry`], the
//!   same parameters and operands, [`LowRankMergeParams::pipe_launch_dims`]):
//!   the factors streamed through a three-slot `cp.async` pipeline in stages
//!   of 32 ranks (across tiles too), `ldmatrix` fragments from XOR-swizzled
//!   shared memory, 64 × 128 tiles, W read straight into the accumulators.
//!   Written for stacked adapters and ranks of 64 and more, where the
//!   tensor-core kernel waits on each stage's loads. The runtime's default
//!   tensor-core kernel since an H200 timed it faster than the other one at
//!   every rank and stack measured (docs/benchmarks.md;
//!   [`LowRankMergeParams::pipelined_tensor_cores`] says when to take it);
//!   a device opened with `OFFLOAD_MERGE_KERNEL=tensor-cores` takes the
//!   other one instead, with its own rule. Its form on 128 × 128 tiles
//!   ([`lowrank_merge_pipe_tall_entry`],
//!   [`LowRankMergeParams::pipe_tall_launch_dims`]: sixteen warps, one
//!   block per SM) reads each chunk of the down factors once per 128 rows
//!   of W instead of 64, and gives the same bits; a device opened with
//!   `OFFLOAD_PIPE_ROWS=128` takes it in the 64-row form's place. Not yet
//!   run on a GPU (the same bits in the CPU emulation below).
//! - **low-rank, streaming fp32 FMA** ([`StreamKernel`], the same
//!   parameters, [`LowRankMergeParams::stream_launch_dims`]): for stacks
//!   whose ranks add up to at most 8 or 32 ([`LowRankMergeParams::stream_kernel`]),
//!   the scaled down factors held in registers for a block's life and no
//!   block-wide barrier, each warp walking groups of rows of its block's
//!   column strip with the next group's W in flight. Written for the
//!   rank ≤ 32 target (within 1.5× of a copy of W), where the fp32 FMA
//!   kernel's per-tile staging and barriers keep too few bytes in flight;
//!   not timed on a GPU yet, so taken only when asked for. One tensor per
//!   launch.
//! - **batched low-rank**, the first three above ([`lowrank_merge_batch_entry`],
//!   [`lowrank_merge_mma_batch_entry`], [`lowrank_merge_pipe_batch_entry`],
//!   [`LowRankBatchParams`]): one launch
//!   merges up to [`BATCH_MAX_JOBS`] tensors ("jobs") of one W dtype, each
//!   with up to [`BATCH_MAX_ADAPTERS`] adapters (2504 bytes of parameters).
//!   Job `j` owns a contiguous range of the grid's blocks (a prefix sum in
//!   the parameters, [`LowRankBatchParams::push`]); a block finds its job by
//!   a linear scan and runs the one-tensor kernel's body with its index and
//!   count within the job, so every element is computed as in a launch of
//!   that tensor alone, bit for bit. The runtime gives each job the blocks
//!   that launch would have ([`LowRankMergeParams::launch_dims`]). It
//!   replaces one small launch per tensor (launch latency, ramp-up and tail
//!   each time) by one per layer.
//! - **general** ([`merge_entry`], [`MergeParams`]): every delta the CPU
//!   merges — low-rank, LoHa, LoKr with each side whole or low-rank — mixed,
//!   up to [`MERGE_MAX_ADAPTERS`] in one launch. Each delta is one matrix
//!   (a "term") or the element-wise product of two, read at mapped indices
//!   ([`MergeTermParams`]).
//!
//! All have the semantics of [`crate::merge`]: one pass, fp32
//! accumulation of every adapter of the launch, one rounding to W's dtype,
//! rows outside the slice untouched.
//!
//! **Status: run on an NVIDIA H200 (2026-11-27, and 2026-11-28 with the
//! batched kernels and the pipelined one)**, where every kernel matched the
//! CPU merge and an f64 reference, and each batched launch matched one
//! launch per tensor bit for bit (the runtime's `gpu_merge_*` tests);
//! figures in docs/benchmarks.md. They are also checked by NVRTC (they
//! compile) and by the CPU emulation below. The source includes only
//! `cuda_fp16.h` and `cuda_bf16.h`, and uses only their types and scalar
//! conversions (the tensor-core instruction is inline PTX). NVRTC 13.0 does
//! not bundle those headers, so the runtime gives NVRTC its own minimal
//! versions of both (`offload_runtime::device::cuda::nvrtc::HEADERS`); with
//! them the source compiles to cubins for sm_80, sm_90 and sm_121 with NVRTC
//! 13.0.88 in 2 to 4 seconds (the runtime's `nvrtc_compiles_the_kernel_sources`
//! test needs libnvrtc but no GPU). `--ptxas-options=-v` for sm_80 and sm_90:
//! no spills in the tensor-core and general kernels; the fp32 FMA low-rank
//! kernel, held to 80 registers for three blocks per SM, spills 12 bytes
//! for 16-bit W on sm_90 (none on sm_80) and 44 bytes for f32 W. The batched kernels (NVRTC 13.0.88, sm_80
//! and sm_90): fp32 FMA 80 registers, 12 bytes of spills for 16-bit W and 44
//! for f32; tensor cores 120 registers for 16-bit W and 128 for f32, no
//! spills. The pipelined kernel (same NVRTC, sm_80 and sm_90): 114 to 125
//! registers, no spills, 36 KiB of static shared memory a block; on
//! 128-row tiles (NVRTC 13.5, sm_90) 120 to 127 registers, no spills,
//! 48 KiB.
//!
//! What has been checked besides: g++ compiles the source against stand-in
//! headers and runs it on the CPU (one OS thread per CUDA thread, a barrier
//! for `__syncthreads()`, the warp-wide `mma` emulated from the PTX ISA's
//! fragment layout), and every element of random low-rank, LoHa and LoKr
//! merges from all three kernels matches the f64 reference within the CPU
//! tests' tolerance (`tests/cuda_emulation.rs`, ignored by default; grids of
//! one to many blocks per column strip, and blocks that must merge nothing);
//! so does every tensor of batched launches of 4 to 16 tensors of different
//! shapes and row slices, each with its own block count (blocks past a
//! job's whole strips and past the last job included), some of them
//! disjoint row slices of one W buffer (as in a fused qkv weight). Each
//! job's slice is also bit-identical (memcmp) to the same job launched
//! alone through the one-tensor kernel with its block count, and every row
//! outside all slices (and a guard row past the buffer) is unchanged bit
//! for bit. Mutants of the batched kernels' job lookup, in-job block index
//! and in-job block count fail it, and so do three that pass the f64 check
//! (a job's adapters reordered, the batched tensor-core kernel running the
//! FMA body, a slice's blocks writing back the row past it). For the
//! pipelined kernel the emulation also models `cp.async` (a copy poisons
//! its destination with NaNs when issued and lands only when a wait retires
//! its group) and `ldmatrix` (from the PTX ISA's layout, `.trans` too), and
//! counts as failures what a GPU would fault on or serialise: an address of
//! either that is not 16-byte aligned, and the eight rows of an `ldmatrix`
//! matrix sharing a bank group. Most of its cases take the copy path
//! (ranks and columns multiples of 8, factors 16-byte aligned), the rest its
//! plain loads, some adapters (the first included) have rank 0, some W
//! buffers are not 16-byte aligned, and nine mutants fail it (a wait one
//! stage short, A's or B's fragments read unswizzled, a copy into the slot
//! being multiplied, 16-bit W stored without its quad transpose back, the
//! copy path for rows that are not whole 16-byte units of A or of B,
//! 16-byte accesses to a W that is not 16-byte aligned, a leading adapter
//! of rank 0 taken as the start of the sum).
//! That emulation checks the kernels against our reading of the fragment
//! layout, not against the hardware: the runtime's GPU tests (`gpu_merge_*`)
//! do that on a GPU (`scripts/gpu-check`), and report the tensor cores'
//! TFLOP/s.

use std::mem::{offset_of, size_of};

use crate::dtype::Dtype;
use crate::error::KernelError;
use crate::merge::{Delta, Factor, KronFactor, MergeSpec};

/// CUDA C source of the merge kernels (one translation unit, thirty-six
/// `extern "C"` entry points; see [`lowrank_merge_entry`],
/// [`lowrank_merge_mma_entry`], [`lowrank_merge_pipe_entry`],
/// [`lowrank_merge_pipe_tall_entry`], [`lowrank_merge_pipe_tall_batch_entry`],
/// [`StreamKernel::entry`],
/// [`lowrank_merge_batch_entry`], [`lowrank_merge_mma_batch_entry`],
/// [`lowrank_merge_pipe_batch_entry`] and [`merge_entry`]).
pub const LOWRANK_MERGE_SRC: &str = include_str!("lowrank_merge.cu");

/// Entry point for f32 weights.
pub const LOWRANK_MERGE_F32: &str = "offload_lowrank_merge_f32";
/// Entry point for f16 weights.
pub const LOWRANK_MERGE_F16: &str = "offload_lowrank_merge_f16";
/// Entry point for bf16 weights.
pub const LOWRANK_MERGE_BF16: &str = "offload_lowrank_merge_bf16";

/// The entry point that merges into a weight of `dtype`.
pub const fn lowrank_merge_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_F32,
        Dtype::F16 => LOWRANK_MERGE_F16,
        Dtype::BF16 => LOWRANK_MERGE_BF16,
    }
}

/// Tensor-core entry point for f32 weights.
pub const LOWRANK_MERGE_MMA_F32: &str = "offload_lowrank_merge_mma_f32";
/// Tensor-core entry point for f16 weights.
pub const LOWRANK_MERGE_MMA_F16: &str = "offload_lowrank_merge_mma_f16";
/// Tensor-core entry point for bf16 weights.
pub const LOWRANK_MERGE_MMA_BF16: &str = "offload_lowrank_merge_mma_bf16";

/// The tensor-core entry point that merges into a weight of `dtype` (same
/// parameters as [`lowrank_merge_entry`], block [`MMA_BLOCK_DIM`]).
pub const fn lowrank_merge_mma_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_MMA_F32,
        Dtype::F16 => LOWRANK_MERGE_MMA_F16,
        Dtype::BF16 => LOWRANK_MERGE_MMA_BF16,
    }
}

/// Batched fp32 FMA entry point for f32 weights.
pub const LOWRANK_MERGE_BATCH_F32: &str = "offload_lowrank_merge_batch_f32";
/// Batched fp32 FMA entry point for f16 weights.
pub const LOWRANK_MERGE_BATCH_F16: &str = "offload_lowrank_merge_batch_f16";
/// Batched fp32 FMA entry point for bf16 weights.
pub const LOWRANK_MERGE_BATCH_BF16: &str = "offload_lowrank_merge_batch_bf16";

/// The batched fp32 FMA entry point that merges into weights of `dtype`
/// ([`LowRankBatchParams`], block [`LOWRANK_BLOCK_DIM`]).
pub const fn lowrank_merge_batch_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_BATCH_F32,
        Dtype::F16 => LOWRANK_MERGE_BATCH_F16,
        Dtype::BF16 => LOWRANK_MERGE_BATCH_BF16,
    }
}

/// Batched tensor-core entry point for f32 weights.
pub const LOWRANK_MERGE_MMA_BATCH_F32: &str = "offload_lowrank_merge_mma_batch_f32";
/// Batched tensor-core entry point for f16 weights.
pub const LOWRANK_MERGE_MMA_BATCH_F16: &str = "offload_lowrank_merge_mma_batch_f16";
/// Batched tensor-core entry point for bf16 weights.
pub const LOWRANK_MERGE_MMA_BATCH_BF16: &str = "offload_lowrank_merge_mma_batch_bf16";

/// The batched tensor-core entry point that merges into weights of `dtype`
/// ([`LowRankBatchParams`], block [`MMA_BLOCK_DIM`]).
pub const fn lowrank_merge_mma_batch_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_MMA_BATCH_F32,
        Dtype::F16 => LOWRANK_MERGE_MMA_BATCH_F16,
        Dtype::BF16 => LOWRANK_MERGE_MMA_BATCH_BF16,
    }
}

/// Pipelined tensor-core entry point for f32 weights.
pub const LOWRANK_MERGE_PIPE_F32: &str = "offload_lowrank_merge_pipe_f32";
/// Pipelined tensor-core entry point for f16 weights.
pub const LOWRANK_MERGE_PIPE_F16: &str = "offload_lowrank_merge_pipe_f16";
/// Pipelined tensor-core entry point for bf16 weights.
pub const LOWRANK_MERGE_PIPE_BF16: &str = "offload_lowrank_merge_pipe_bf16";

/// The pipelined tensor-core entry point that merges into a weight of
/// `dtype` (same parameters and operands as [`lowrank_merge_mma_entry`],
/// block [`PIPE_BLOCK_DIM`], grid [`LowRankMergeParams::pipe_launch_dims`]).
pub const fn lowrank_merge_pipe_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_PIPE_F32,
        Dtype::F16 => LOWRANK_MERGE_PIPE_F16,
        Dtype::BF16 => LOWRANK_MERGE_PIPE_BF16,
    }
}

/// Batched pipelined tensor-core entry point for f32 weights.
pub const LOWRANK_MERGE_PIPE_BATCH_F32: &str = "offload_lowrank_merge_pipe_batch_f32";
/// Batched pipelined tensor-core entry point for f16 weights.
pub const LOWRANK_MERGE_PIPE_BATCH_F16: &str = "offload_lowrank_merge_pipe_batch_f16";
/// Batched pipelined tensor-core entry point for bf16 weights.
pub const LOWRANK_MERGE_PIPE_BATCH_BF16: &str = "offload_lowrank_merge_pipe_batch_bf16";

/// The batched pipelined tensor-core entry point that merges into weights
/// of `dtype` ([`LowRankBatchParams`], block [`PIPE_BLOCK_DIM`]; each job
/// given the blocks of [`LowRankMergeParams::pipe_launch_dims`]).
pub const fn lowrank_merge_pipe_batch_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_PIPE_BATCH_F32,
        Dtype::F16 => LOWRANK_MERGE_PIPE_BATCH_F16,
        Dtype::BF16 => LOWRANK_MERGE_PIPE_BATCH_BF16,
    }
}

/// Pipelined tensor-core entry point on 128-row tiles (kernel 2c) for f32
/// weights.
pub const LOWRANK_MERGE_PIPE_TALL_F32: &str = "offload_lowrank_merge_pipe_tall_f32";
/// Pipelined tensor-core entry point on 128-row tiles for f16 weights.
pub const LOWRANK_MERGE_PIPE_TALL_F16: &str = "offload_lowrank_merge_pipe_tall_f16";
/// Pipelined tensor-core entry point on 128-row tiles for bf16 weights.
pub const LOWRANK_MERGE_PIPE_TALL_BF16: &str = "offload_lowrank_merge_pipe_tall_bf16";

/// The pipelined tensor-core entry point on 128-row tiles that merges into
/// a weight of `dtype`: the same parameters, operands and results, bit for
/// bit, as [`lowrank_merge_pipe_entry`], with block [`PIPE_TALL_BLOCK_DIM`]
/// and grid [`LowRankMergeParams::pipe_tall_launch_dims`]. Each chunk of
/// the down factors is read once per 128 rows of W rather than per 64.
pub const fn lowrank_merge_pipe_tall_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_PIPE_TALL_F32,
        Dtype::F16 => LOWRANK_MERGE_PIPE_TALL_F16,
        Dtype::BF16 => LOWRANK_MERGE_PIPE_TALL_BF16,
    }
}

/// Batched pipelined tensor-core entry point on 128-row tiles for f32 weights.
pub const LOWRANK_MERGE_PIPE_TALL_BATCH_F32: &str = "offload_lowrank_merge_pipe_tall_batch_f32";
/// Batched pipelined tensor-core entry point on 128-row tiles for f16 weights.
pub const LOWRANK_MERGE_PIPE_TALL_BATCH_F16: &str = "offload_lowrank_merge_pipe_tall_batch_f16";
/// Batched pipelined tensor-core entry point on 128-row tiles for bf16 weights.
pub const LOWRANK_MERGE_PIPE_TALL_BATCH_BF16: &str = "offload_lowrank_merge_pipe_tall_batch_bf16";

/// The batched form of [`lowrank_merge_pipe_tall_entry`]
/// ([`LowRankBatchParams`], block [`PIPE_TALL_BLOCK_DIM`]; each job given
/// the blocks of [`LowRankMergeParams::pipe_tall_launch_dims`]).
pub const fn lowrank_merge_pipe_tall_batch_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => LOWRANK_MERGE_PIPE_TALL_BATCH_F32,
        Dtype::F16 => LOWRANK_MERGE_PIPE_TALL_BATCH_F16,
        Dtype::BF16 => LOWRANK_MERGE_PIPE_TALL_BATCH_BF16,
    }
}

/// The streaming fp32 FMA kernels (`offload_lowrank_merge_stream8_*` and
/// `offload_lowrank_merge_stream32_*`): low-rank stacks whose ranks add up
/// to at most 8 or at most 32, the down factors held in registers and no
/// block-wide barrier ([`LowRankMergeParams::stream_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKernel {
    /// Ranks adding up to at most 8: 8 columns per lane, 2 rows a group
    /// (1 for f32 W).
    Ranks8,
    /// Ranks adding up to at most 32: 2 columns per lane, 8 rows a group
    /// (4 for f32 W).
    Ranks32,
    /// Ranks adding up to at most 8 with the down factors in shared memory
    /// rather than registers: 8 columns per lane, 4 rows a group (2 for
    /// f32 W); the same results as [`StreamKernel::Ranks8`], bit for bit.
    /// Taken in place of it where the device is configured to
    /// (`OFFLOAD_STREAM8=shared` in the runtime).
    Ranks8Shared,
}

impl StreamKernel {
    /// The most the ranks of a launch may add up to.
    pub const fn max_rank(self) -> u32 {
        match self {
            StreamKernel::Ranks8 | StreamKernel::Ranks8Shared => 8,
            StreamKernel::Ranks32 => 32,
        }
    }

    /// Columns of W each lane owns.
    pub const fn cols_per_lane(self) -> u32 {
        match self {
            StreamKernel::Ranks8 | StreamKernel::Ranks8Shared => 8,
            StreamKernel::Ranks32 => 2,
        }
    }

    /// Rows of a group (one warp's unit of work) for a W of `dtype`.
    pub const fn group_rows(self, dtype: Dtype) -> u32 {
        let rows = match self {
            StreamKernel::Ranks8 => 2,
            StreamKernel::Ranks32 => 8,
            StreamKernel::Ranks8Shared => 4,
        };
        match dtype {
            Dtype::F32 => rows / 2,
            Dtype::F16 | Dtype::BF16 => rows,
        }
    }

    /// The entry point that merges into a weight of `dtype`
    /// ([`LowRankMergeParams`], block [`STREAM_BLOCK_DIM`], grid
    /// [`LowRankMergeParams::stream_launch_dims`]).
    pub const fn entry(self, dtype: Dtype) -> &'static str {
        match (self, dtype) {
            (StreamKernel::Ranks8, Dtype::F32) => "offload_lowrank_merge_stream8_f32",
            (StreamKernel::Ranks8, Dtype::F16) => "offload_lowrank_merge_stream8_f16",
            (StreamKernel::Ranks8, Dtype::BF16) => "offload_lowrank_merge_stream8_bf16",
            (StreamKernel::Ranks32, Dtype::F32) => "offload_lowrank_merge_stream32_f32",
            (StreamKernel::Ranks32, Dtype::F16) => "offload_lowrank_merge_stream32_f16",
            (StreamKernel::Ranks32, Dtype::BF16) => "offload_lowrank_merge_stream32_bf16",
            (StreamKernel::Ranks8Shared, Dtype::F32) => "offload_lowrank_merge_stream8s_f32",
            (StreamKernel::Ranks8Shared, Dtype::F16) => "offload_lowrank_merge_stream8s_f16",
            (StreamKernel::Ranks8Shared, Dtype::BF16) => "offload_lowrank_merge_stream8s_bf16",
        }
    }
}

/// General entry point (every delta kind) for f32 weights.
pub const MERGE_F32: &str = "offload_merge_f32";
/// General entry point for f16 weights.
pub const MERGE_F16: &str = "offload_merge_f16";
/// General entry point for bf16 weights.
pub const MERGE_BF16: &str = "offload_merge_bf16";

/// The general entry point that merges into a weight of `dtype`
/// ([`MergeParams`], block [`BLOCK_DIM`]).
pub const fn merge_entry(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => MERGE_F32,
        Dtype::F16 => MERGE_F16,
        Dtype::BF16 => MERGE_BF16,
    }
}

/// Most adapters one low-rank launch merges (`OFFLOAD_MAX_ADAPTERS` in the
/// source).
pub const MAX_ADAPTERS: usize = 8;
/// Most tensors ("jobs") one batched low-rank launch merges
/// (`OFFLOAD_BATCH_MAX_JOBS`; see [`LowRankBatchParams`]).
pub const BATCH_MAX_JOBS: usize = 16;
/// Most adapters of one job of a batched low-rank launch
/// (`OFFLOAD_BATCH_MAX_ADAPTERS`): with 4, [`BATCH_MAX_JOBS`] jobs take
/// 2504 bytes of parameters, under the 4 KiB every driver takes. Tensors
/// with more adapters are merged by a launch of their own.
pub const BATCH_MAX_ADAPTERS: usize = 4;
/// Most adapters one launch of the general kernel merges
/// (`OFFLOAD_MERGE_MAX_ADAPTERS`; its parameter block, 3352 bytes, stays
/// under the 4 KiB every driver takes).
pub const MERGE_MAX_ADAPTERS: usize = 32;
/// With the unpipelined tensor-core kernel (`OFFLOAD_MERGE_KERNEL=tensor-cores`),
/// the fp32 FMA kernel takes stacks whose ranks are all below this and add
/// up to at most this; others go to the tensor cores where the factors allow
/// ([`LowRankMergeParams::tensor_cores`]). Also the ranks a kernel stages
/// at a time.
pub const FMA_MAX_RANK: u32 = 32;
/// With the pipelined tensor-core kernel, the fp32 FMA kernel takes stacks
/// whose ranks are all below this and add up to at most this
/// ([`LowRankMergeParams::pipelined_tensor_cores`]).
pub const PIPELINED_FMA_MAX_RANK: u32 = 16;
/// The oldest GPUs with `mma.sync.m16n8k16` for f16 and bf16 (Ampere).
pub const MMA_MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);
/// Rows of W one thread block of the general kernel covers.
pub const TILE_ROWS: u32 = 64;
/// Columns of W one thread block of the general kernel covers.
pub const TILE_COLS: u32 = 64;
/// Threads per block of the general kernel, `(x, y, z)`.
pub const BLOCK_DIM: (u32, u32, u32) = (16, 16, 1);
/// Rows of one tile of either low-rank kernel (a block merges several).
pub const LOWRANK_TILE_ROWS: u32 = 32;
/// Columns of one tile of either low-rank kernel.
pub const LOWRANK_TILE_COLS: u32 = 128;
/// Resident blocks per SM of the fp32 FMA low-rank kernel (its launch bounds).
pub const LOWRANK_BLOCKS_PER_SM: u32 = 3;
/// Resident blocks per SM of the tensor-core kernel (its launch bounds).
pub const MMA_BLOCKS_PER_SM: u32 = 2;
/// Threads per block of the fp32 FMA low-rank kernel, `(x, y, z)`: eight
/// warps, each lane 4 rows × 4 columns of a tile.
pub const LOWRANK_BLOCK_DIM: (u32, u32, u32) = (256, 1, 1);
/// Threads per block of the tensor-core kernel, `(x, y, z)`: eight warps,
/// the same layout of W as [`LOWRANK_BLOCK_DIM`].
pub const MMA_BLOCK_DIM: (u32, u32, u32) = (256, 1, 1);
/// Rows of one tile of the pipelined tensor-core kernel (columns:
/// [`LOWRANK_TILE_COLS`]).
pub const PIPE_TILE_ROWS: u32 = 64;
/// Resident blocks per SM of the pipelined tensor-core kernel (its launch
/// bounds; 36 KiB of shared memory each).
pub const PIPE_BLOCKS_PER_SM: u32 = 2;
/// Threads per block of the pipelined tensor-core kernel, `(x, y, z)`:
/// eight warps, each a 32 × 32 part of a 64 × 128 tile.
pub const PIPE_BLOCK_DIM: (u32, u32, u32) = (256, 1, 1);
/// Rows of one tile of the pipelined tensor-core kernel on 128-row tiles
/// ([`lowrank_merge_pipe_tall_entry`]; columns: [`LOWRANK_TILE_COLS`]).
pub const PIPE_TALL_TILE_ROWS: u32 = 128;
/// Resident blocks per SM of the pipelined kernel on 128-row tiles (its
/// launch bounds; 48 KiB of shared memory and 512 threads each).
pub const PIPE_TALL_BLOCKS_PER_SM: u32 = 1;
/// Threads per block of the pipelined kernel on 128-row tiles, `(x, y, z)`:
/// sixteen warps, each a 32 × 32 part of a 128 × 128 tile.
pub const PIPE_TALL_BLOCK_DIM: (u32, u32, u32) = (512, 1, 1);
/// Threads per block of the streaming kernels ([`StreamKernel`]): eight
/// warps, each walking groups of rows of the block's column strip.
pub const STREAM_BLOCK_DIM: (u32, u32, u32) = (256, 1, 1);
/// Resident blocks per SM of the streaming kernels (their launch bounds).
pub const STREAM_BLOCKS_PER_SM: u32 = 2;
/// Smallest W slice (rows × columns) that `auto` merges on the streaming
/// kernel ([`LowRankMergeParams::auto_streaming`]): 2²⁴ elements, between
/// the largest W the streaming kernel was measured slower on (6.6 M
/// elements) and the smallest it was faster on (26.2 M).
pub const AUTO_STREAM_MIN_ELEMENTS: u64 = 1 << 24;

/// The code of a dtype in the parameter block (`OFFLOAD_DTYPE_*`).
pub const fn dtype_code(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::BF16 => 2,
    }
}

/// One adapter in [`LowRankMergeParams`]; mirrors `OffloadLowRankAdapter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LowRankAdapterParams {
    /// Device address of the up factor B, row-major `[rows, rank]`.
    pub up: u64,
    /// Device address of the down factor A, row-major `[rank, cols]`.
    pub down: u64,
    /// The rank.
    pub rank: u32,
    /// [`dtype_code`] of B.
    pub up_dtype: u32,
    /// [`dtype_code`] of A.
    pub down_dtype: u32,
    /// The adapter's scale.
    pub scale: f32,
}

/// The kernels' only argument, passed by value; mirrors
/// `OffloadLowRankMergeParams` (the source checks the size with
/// `static_assert`, this crate checks sizes and offsets at compile time).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LowRankMergeParams {
    /// Device address of W's first element (row 0 of the whole weight).
    pub w: u64,
    /// Rows of the delta (the row slice's length).
    pub rows: u32,
    /// Columns of W viewed as a matrix.
    pub cols: u32,
    /// First row of W the delta applies to.
    pub row0: u32,
    /// Adapters in use, at most [`MAX_ADAPTERS`].
    pub num_adapters: u32,
    /// The adapters; entries past `num_adapters` are ignored.
    pub adapters: [LowRankAdapterParams; MAX_ADAPTERS],
}

const _: () = {
    assert!(size_of::<LowRankAdapterParams>() == 32);
    assert!(offset_of!(LowRankAdapterParams, up) == 0);
    assert!(offset_of!(LowRankAdapterParams, down) == 8);
    assert!(offset_of!(LowRankAdapterParams, rank) == 16);
    assert!(offset_of!(LowRankAdapterParams, up_dtype) == 20);
    assert!(offset_of!(LowRankAdapterParams, down_dtype) == 24);
    assert!(offset_of!(LowRankAdapterParams, scale) == 28);
    assert!(size_of::<LowRankMergeParams>() == 24 + 32 * MAX_ADAPTERS);
    assert!(offset_of!(LowRankMergeParams, w) == 0);
    assert!(offset_of!(LowRankMergeParams, rows) == 8);
    assert!(offset_of!(LowRankMergeParams, cols) == 12);
    assert!(offset_of!(LowRankMergeParams, row0) == 16);
    assert!(offset_of!(LowRankMergeParams, num_adapters) == 20);
    assert!(offset_of!(LowRankMergeParams, adapters) == 24);
};

/// One tensor of a batched low-rank launch; mirrors `OffloadLowRankJob`:
/// [`LowRankMergeParams`] with at most [`BATCH_MAX_ADAPTERS`] adapters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LowRankJobParams {
    /// Device address of W's first element (row 0 of the whole weight).
    pub w: u64,
    /// Rows of the delta (the row slice's length).
    pub rows: u32,
    /// Columns of W viewed as a matrix.
    pub cols: u32,
    /// First row of W the delta applies to.
    pub row0: u32,
    /// Adapters in use, at most [`BATCH_MAX_ADAPTERS`].
    pub num_adapters: u32,
    /// The adapters; entries past `num_adapters` are ignored.
    pub adapters: [LowRankAdapterParams; BATCH_MAX_ADAPTERS],
}

impl LowRankJobParams {
    /// The job that merges what `params` (one tensor's launch) merges, or
    /// `None` when it has more than [`BATCH_MAX_ADAPTERS`] adapters.
    pub fn from_params(params: &LowRankMergeParams) -> Option<LowRankJobParams> {
        let n = params.num_adapters as usize;
        if n > BATCH_MAX_ADAPTERS {
            return None;
        }
        let mut adapters = [LowRankAdapterParams::default(); BATCH_MAX_ADAPTERS];
        adapters[..n].copy_from_slice(&params.adapters[..n]);
        Some(LowRankJobParams {
            w: params.w,
            rows: params.rows,
            cols: params.cols,
            row0: params.row0,
            num_adapters: params.num_adapters,
            adapters,
        })
    }
}

/// The batched low-rank kernels' only argument, passed by value; mirrors
/// `OffloadLowRankBatchParams` (2504 bytes). Job `j` owns blocks
/// `first_block[j] .. first_block[j + 1]` of the one-dimensional grid; each
/// of its blocks merges what the block of the same index would in a launch
/// of that tensor alone on a grid of the job's block count, so the result
/// is bit-identical to one launch per tensor. The jobs' row slices must not
/// overlap each other's (their blocks run concurrently), nor any job's
/// factors. Build it with [`LowRankBatchParams::push`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LowRankBatchParams {
    /// Jobs in use, at most [`BATCH_MAX_JOBS`].
    pub num_jobs: u32,
    /// Prefix sum of the jobs' block counts: `first_block[0] = 0`,
    /// `first_block[j + 1] = first_block[j] + blocks of job j`; entries past
    /// `num_jobs` unused.
    pub first_block: [u32; BATCH_MAX_JOBS + 1],
    /// The jobs; entries past `num_jobs` are ignored.
    pub jobs: [LowRankJobParams; BATCH_MAX_JOBS],
}

const _: () = {
    assert!(size_of::<LowRankJobParams>() == 24 + 32 * BATCH_MAX_ADAPTERS);
    assert!(offset_of!(LowRankJobParams, w) == 0);
    assert!(offset_of!(LowRankJobParams, rows) == 8);
    assert!(offset_of!(LowRankJobParams, cols) == 12);
    assert!(offset_of!(LowRankJobParams, row0) == 16);
    assert!(offset_of!(LowRankJobParams, num_adapters) == 20);
    assert!(offset_of!(LowRankJobParams, adapters) == 24);
    assert!(offset_of!(LowRankBatchParams, num_jobs) == 0);
    assert!(offset_of!(LowRankBatchParams, first_block) == 4);
    assert!(offset_of!(LowRankBatchParams, jobs) == 4 * (BATCH_MAX_JOBS + 2));
    assert!(
        size_of::<LowRankBatchParams>()
            == 4 * (BATCH_MAX_JOBS + 2) + size_of::<LowRankJobParams>() * BATCH_MAX_JOBS
    );
    assert!(size_of::<LowRankBatchParams>() == 2504);
    // Kernel parameters are limited to 4 KiB on every driver.
    assert!(size_of::<LowRankBatchParams>() <= 4096);
    assert!(BATCH_MAX_ADAPTERS <= MAX_ADAPTERS);
};

impl LowRankBatchParams {
    /// Jobs in the batch.
    pub fn len(&self) -> usize {
        self.num_jobs as usize
    }

    /// Whether the batch has no job (nothing to launch).
    pub fn is_empty(&self) -> bool {
        self.num_jobs == 0
    }

    /// Blocks of the whole batch (the grid's size).
    pub fn blocks(&self) -> u32 {
        self.first_block[self.len().min(BATCH_MAX_JOBS)]
    }

    /// Adds `job` with `blocks` blocks of its own; for the result of one
    /// launch per tensor, `blocks` is the grid that launch would have
    /// ([`LowRankMergeParams::launch_dims`] for the fp32 FMA kernel,
    /// [`LowRankMergeParams::mma_launch_dims`] for the tensor cores: as
    /// many blocks as fill the GPU, at most one per tile). Returns `false`,
    /// and leaves the batch as it was, when the batch is full
    /// ([`BATCH_MAX_JOBS`]), `blocks` is 0, the job has no column (the
    /// kernels' walk divides by the number of column strips), or the grid
    /// would pass `i32::MAX` blocks.
    pub fn push(&mut self, job: LowRankJobParams, blocks: u32) -> bool {
        let n = self.len();
        let total = u64::from(self.blocks()) + u64::from(blocks);
        if n >= BATCH_MAX_JOBS || blocks == 0 || job.cols == 0 || total > i32::MAX as u64 {
            return false;
        }
        self.jobs[n] = job;
        self.first_block[n + 1] = total as u32;
        self.num_jobs += 1;
        true
    }

    /// Grid and block dimensions for a launch of a batched kernel on
    /// 256-thread blocks ([`lowrank_merge_batch_entry`],
    /// [`lowrank_merge_mma_batch_entry`], [`lowrank_merge_pipe_batch_entry`]):
    /// one block per block of every job. The 128-row pipelined one
    /// ([`lowrank_merge_pipe_tall_batch_entry`]) takes the same grid with
    /// [`PIPE_TALL_BLOCK_DIM`].
    pub fn launch_dims(&self) -> LaunchDims {
        ((self.blocks(), 1, 1), LOWRANK_BLOCK_DIM)
    }
}

/// Launch dimensions: `(grid, block)`, each `(x, y, z)`.
pub type LaunchDims = ((u32, u32, u32), (u32, u32, u32));

impl LowRankMergeParams {
    /// The parameter block for `spec`, with W at device address `w` and the
    /// adapters' factors at `factors[i] = (up, down)` device addresses, in
    /// the order of `spec.adapters()`.
    ///
    /// Errors: [`KernelError::Unsupported`] if an adapter is not low-rank, if
    /// there are more than [`MAX_ADAPTERS`], if `factors` does not have one
    /// entry per adapter, or if a dimension does not fit the kernel's
    /// 32-bit indices or its grid.
    pub fn new(
        spec: &MergeSpec<'_>,
        w: u64,
        factors: &[(u64, u64)],
    ) -> Result<LowRankMergeParams, KernelError> {
        let unsupported = |what: String| KernelError::Unsupported {
            what: format!("CUDA low-rank merge: {what}"),
        };
        let adapters = spec.adapters();
        if adapters.len() > MAX_ADAPTERS {
            return Err(unsupported(format!(
                "{} adapters in one launch (at most {MAX_ADAPTERS})",
                adapters.len()
            )));
        }
        if factors.len() != adapters.len() {
            return Err(unsupported(format!(
                "{} factor addresses for {} adapters",
                factors.len(),
                adapters.len()
            )));
        }
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| unsupported(format!("{what} {v} does not fit in u32")))
        };
        let rows = to_u32(spec.delta_rows(), "rows")?;
        // The grid is one-dimensional: at most one block per 32 x 128 tile.
        let tiles = u64::from(rows.div_ceil(LOWRANK_TILE_ROWS))
            * u64::from(to_u32(spec.cols(), "columns")?.div_ceil(LOWRANK_TILE_COLS));
        if tiles > i32::MAX as u64 {
            return Err(unsupported(format!(
                "{tiles} tiles of 32 x 128 (a grid holds at most {} blocks)",
                i32::MAX
            )));
        }
        let mut params = LowRankMergeParams {
            w,
            rows,
            cols: to_u32(spec.cols(), "columns")?,
            row0: to_u32(spec.row_range().start, "first row")?,
            num_adapters: to_u32(adapters.len(), "adapters")?,
            adapters: [LowRankAdapterParams::default(); MAX_ADAPTERS],
        };
        for (index, (adapter, &(up_addr, down_addr))) in adapters.iter().zip(factors).enumerate() {
            let Delta::LowRank { up, down } = &adapter.delta else {
                return Err(unsupported(format!(
                    "adapter {index} is LoHa or LoKr (only low-rank deltas)"
                )));
            };
            params.adapters[index] = LowRankAdapterParams {
                up: up_addr,
                down: down_addr,
                rank: to_u32(up.cols, "rank")?,
                up_dtype: dtype_code(up.dtype),
                down_dtype: dtype_code(down.dtype),
                scale: adapter.scale,
            };
        }
        Ok(params)
    }

    /// Grid and block dimensions for a launch of the fp32 FMA kernel
    /// ([`lowrank_merge_entry`]) with these parameters on a GPU of
    /// `multiprocessors` SMs.
    pub fn launch_dims(&self, multiprocessors: u32) -> LaunchDims {
        (
            lowrank_grid(
                self.rows,
                self.cols,
                multiprocessors,
                LOWRANK_BLOCKS_PER_SM,
                LOWRANK_TILE_ROWS,
            ),
            LOWRANK_BLOCK_DIM,
        )
    }

    /// Grid and block dimensions for a launch of the tensor-core kernel
    /// ([`lowrank_merge_mma_entry`]) with these parameters on a GPU of
    /// `multiprocessors` SMs.
    pub fn mma_launch_dims(&self, multiprocessors: u32) -> LaunchDims {
        (
            lowrank_grid(
                self.rows,
                self.cols,
                multiprocessors,
                MMA_BLOCKS_PER_SM,
                LOWRANK_TILE_ROWS,
            ),
            MMA_BLOCK_DIM,
        )
    }

    /// Grid and block dimensions for a launch of the pipelined tensor-core
    /// kernel ([`lowrank_merge_pipe_entry`]) with these parameters on a GPU
    /// of `multiprocessors` SMs: whole blocks per column strip of
    /// [`PIPE_TILE_ROWS`] × [`LOWRANK_TILE_COLS`] tiles, as many as fill the
    /// SMs [`PIPE_BLOCKS_PER_SM`] deep, at most one per tile.
    pub fn pipe_launch_dims(&self, multiprocessors: u32) -> LaunchDims {
        (
            lowrank_grid(
                self.rows,
                self.cols,
                multiprocessors,
                PIPE_BLOCKS_PER_SM,
                PIPE_TILE_ROWS,
            ),
            PIPE_BLOCK_DIM,
        )
    }

    /// Grid and block dimensions for a launch of the pipelined tensor-core
    /// kernel on 128-row tiles ([`lowrank_merge_pipe_tall_entry`]) with
    /// these parameters on a GPU of `multiprocessors` SMs: whole blocks per
    /// column strip of [`PIPE_TALL_TILE_ROWS`] × [`LOWRANK_TILE_COLS`]
    /// tiles, one per SM ([`PIPE_TALL_BLOCKS_PER_SM`]), at most one per tile.
    pub fn pipe_tall_launch_dims(&self, multiprocessors: u32) -> LaunchDims {
        (
            lowrank_grid(
                self.rows,
                self.cols,
                multiprocessors,
                PIPE_TALL_BLOCKS_PER_SM,
                PIPE_TALL_TILE_ROWS,
            ),
            PIPE_TALL_BLOCK_DIM,
        )
    }

    /// The streaming kernel that takes these adapters: at least one, with
    /// ranks adding up to at most 8 ([`StreamKernel::Ranks8`]) or 32
    /// ([`StreamKernel::Ranks32`]); `None` for larger stacks.
    pub fn stream_kernel(&self) -> Option<StreamKernel> {
        let used = &self.adapters[..(self.num_adapters as usize).min(MAX_ADAPTERS)];
        let total: u64 = used.iter().map(|a| u64::from(a.rank)).sum();
        if used.is_empty() {
            None
        } else if total <= 8 {
            Some(StreamKernel::Ranks8)
        } else if total <= 32 {
            Some(StreamKernel::Ranks32)
        } else {
            None
        }
    }

    /// Grid and block dimensions for a launch of the streaming kernel `k`
    /// into a W of `dtype` on a GPU of `multiprocessors` SMs: whole blocks
    /// per column strip of 32 × [`StreamKernel::cols_per_lane`] columns,
    /// as many as fill the SMs [`STREAM_BLOCKS_PER_SM`] deep, at most one
    /// per eight groups of rows (a group a warp).
    pub fn stream_launch_dims(
        &self,
        k: StreamKernel,
        dtype: Dtype,
        multiprocessors: u32,
    ) -> LaunchDims {
        let strips = self.cols.div_ceil(32 * k.cols_per_lane()).max(1);
        let groups = self.rows.div_ceil(k.group_rows(dtype)).max(1);
        let per_strip = (multiprocessors.max(1).saturating_mul(STREAM_BLOCKS_PER_SM) / strips)
            .clamp(1, groups.div_ceil(STREAM_BLOCK_DIM.0 / 32));
        ((strips.saturating_mul(per_strip), 1, 1), STREAM_BLOCK_DIM)
    }

    /// Whether the tensor-core kernel can take these adapters: at least one,
    /// and every adapter's two factors both f16 or both bf16 (the instruction
    /// takes one 16-bit type for both operands, and their products are exact
    /// in fp32).
    pub fn tensor_core_operands(&self) -> bool {
        let used = &self.adapters[..(self.num_adapters as usize).min(MAX_ADAPTERS)];
        !used.is_empty()
            && used
                .iter()
                .all(|a| a.up_dtype == a.down_dtype && a.up_dtype != dtype_code(Dtype::F32))
    }

    /// Whether these adapters should go to the tensor-core kernel: its
    /// operands fit ([`Self::tensor_core_operands`]), and some adapter has
    /// rank [`FMA_MAX_RANK`] or more, or the ranks add up to more than it.
    /// Measured on an H200 (docs/benchmarks.md): one rank-32 adapter merges
    /// faster on the tensor cores (1257 against 988 GB/s), four rank-8
    /// adapters faster in fp32 FMA (869 against 605 GB/s: the tensor-core
    /// kernel pads each adapter's rank to 16 and stages each on its own).
    /// The caller also checks the device's compute capability against
    /// [`MMA_MIN_COMPUTE_CAPABILITY`].
    pub fn tensor_cores(&self) -> bool {
        self.tensor_core_operands() && self.ranks_reach(FMA_MAX_RANK)
    }

    /// Whether these adapters should go to the pipelined tensor-core kernel
    /// rather than to fp32 FMA: its operands fit
    /// ([`Self::tensor_core_operands`]), and some adapter has rank
    /// [`PIPELINED_FMA_MAX_RANK`] or more, or the ranks add up to more than
    /// it. Measured on an H200 (docs/benchmarks.md, W [1280, 5120] f16, GB/s
    /// of W): FMA is faster for one rank-8 adapter (1736 against 1507) and
    /// two (1319 against 1252), the pipelined kernel for one rank-16 adapter
    /// (1518 against 1446), two (1291 against 990), four rank-8 ones (971
    /// against 871) and every larger rank. The caller also checks the
    /// device's compute capability against [`MMA_MIN_COMPUTE_CAPABILITY`].
    pub fn pipelined_tensor_cores(&self) -> bool {
        self.tensor_core_operands() && self.ranks_reach(PIPELINED_FMA_MAX_RANK)
    }

    /// Whether the runtime's own choice (`auto`) should merge these
    /// adapters into a W of `dtype` on the streaming kernel: their ranks
    /// add up to at most 8 ([`StreamKernel::Ranks8`]), W is f16 or bf16 and
    /// the slice has at least [`AUTO_STREAM_MIN_ELEMENTS`] elements.
    /// Measured on an H200 (docs/benchmarks.md, fourth GPU session, one
    /// adapter of rank 8, f16, GB/s of W read + written, one run each): the
    /// streaming kernel against fp32 FMA 2291 against 2137 on W [5120,
    /// 5120], 2661 against 2239 on W [10240, 5120], but 1397 against 1739 on
    /// W [1280, 5120].
    pub fn auto_streaming(&self, dtype: Dtype) -> bool {
        dtype != Dtype::F32
            && self.stream_kernel() == Some(StreamKernel::Ranks8)
            && u64::from(self.rows) * u64::from(self.cols) >= AUTO_STREAM_MIN_ELEMENTS
    }

    /// Some adapter has rank `limit` or more, or the ranks add up to more.
    fn ranks_reach(&self, limit: u32) -> bool {
        let used = &self.adapters[..(self.num_adapters as usize).min(MAX_ADAPTERS)];
        used.iter().any(|a| a.rank >= limit)
            || used.iter().map(|a| u64::from(a.rank)).sum::<u64>() > u64::from(limit)
    }
}

/// The grid for a slice of `rows` × `cols`: one block per 64 × 64 tile.
fn grid(rows: u32, cols: u32) -> (u32, u32, u32) {
    (cols.div_ceil(TILE_COLS), rows.div_ceil(TILE_ROWS), 1)
}

/// The low-rank kernels' grid for a slice of `rows` × `cols`: a block walks
/// the `tile_rows` × 128 tiles of one column strip (`offload_lr_walk` in the
/// source), so the grid is a whole number of blocks per strip, as many as
/// fill the GPU's SMs `per_sm` deep and at most one per tile.
fn lowrank_grid(
    rows: u32,
    cols: u32,
    multiprocessors: u32,
    per_sm: u32,
    tile_rows: u32,
) -> (u32, u32, u32) {
    let tiles_x = cols.div_ceil(LOWRANK_TILE_COLS).max(1);
    let tiles_y = rows.div_ceil(tile_rows).max(1);
    let per_strip = (multiprocessors.max(1).saturating_mul(per_sm) / tiles_x).clamp(1, tiles_y);
    (tiles_x.saturating_mul(per_strip), 1, 1)
}

/// The factors of a delta in the order the kernels' callers give their
/// device addresses: `up, down` (low-rank); `w1a, w1b, w2a, w2b` (LoHa);
/// for LoKr `w1` (or `w1a, w1b`) then `w2` (or `w2a, w2b`).
pub fn delta_factors<'a>(delta: &Delta<'a>) -> Vec<Factor<'a>> {
    let side = |k: &KronFactor<'a>| match *k {
        KronFactor::Full(m) => vec![m],
        KronFactor::LowRank { a, b } => vec![a, b],
    };
    match *delta {
        Delta::LowRank { up, down } => vec![up, down],
        Delta::LoHa { w1a, w1b, w2a, w2b } => vec![w1a, w1b, w2a, w2b],
        Delta::LoKr { ref w1, ref w2 } => {
            let mut v = side(w1);
            v.extend(side(w2));
            v
        }
    }
}

/// One matrix `T` of a delta in [`MergeAdapterParams`]; mirrors
/// `OffloadMergeTerm`. The delta's element `[i, j]` (relative to the row
/// slice) reads `T[(i / row_div) % row_mod, (j / col_div) % col_mod]`; `T`
/// is stored whole (`rank` 0, at `left`) or as the product `L · R` of
/// `L = left` (`[T's rows, rank]`) and `R = right` (`[rank, cols]`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeTermParams {
    /// Device address of `T` (rank 0) or of `L`.
    pub left: u64,
    /// Device address of `R` (unused, 0, when rank is 0).
    pub right: u64,
    /// The rank of `L · R`; 0 when `T` is stored whole.
    pub rank: u32,
    /// [`dtype_code`] of `T` or `L`.
    pub left_dtype: u32,
    /// [`dtype_code`] of `R` (0 when rank is 0).
    pub right_dtype: u32,
    /// Columns of `T` (the row stride of `T`, or of `R`).
    pub cols: u32,
    /// Row map: divisor.
    pub row_div: u32,
    /// Row map: modulus (`T`'s rows).
    pub row_mod: u32,
    /// Column map: divisor.
    pub col_div: u32,
    /// Column map: modulus (`T`'s columns).
    pub col_mod: u32,
}

/// One adapter in [`MergeParams`]; mirrors `OffloadMergeAdapter`.
/// `Δ = terms[0]` (one term) or `terms[0] ⊙ terms[1]` (two).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeAdapterParams {
    /// The delta's terms; the second is unused with one term.
    pub terms: [MergeTermParams; 2],
    /// 1 or 2.
    pub num_terms: u32,
    /// The adapter's scale.
    pub scale: f32,
}

/// The general kernel's only argument, passed by value; mirrors
/// `OffloadMergeParams` (the source checks the size with `static_assert`,
/// this crate checks sizes and offsets at compile time).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MergeParams {
    /// Device address of W's first element (row 0 of the whole weight).
    pub w: u64,
    /// Rows of the delta (the row slice's length).
    pub rows: u32,
    /// Columns of W viewed as a matrix.
    pub cols: u32,
    /// First row of W the delta applies to.
    pub row0: u32,
    /// Adapters in use, at most [`MERGE_MAX_ADAPTERS`].
    pub num_adapters: u32,
    /// The adapters; entries past `num_adapters` are ignored.
    pub adapters: [MergeAdapterParams; MERGE_MAX_ADAPTERS],
}

const _: () = {
    assert!(size_of::<MergeTermParams>() == 48);
    assert!(offset_of!(MergeTermParams, left) == 0);
    assert!(offset_of!(MergeTermParams, right) == 8);
    assert!(offset_of!(MergeTermParams, rank) == 16);
    assert!(offset_of!(MergeTermParams, left_dtype) == 20);
    assert!(offset_of!(MergeTermParams, right_dtype) == 24);
    assert!(offset_of!(MergeTermParams, cols) == 28);
    assert!(offset_of!(MergeTermParams, row_div) == 32);
    assert!(offset_of!(MergeTermParams, row_mod) == 36);
    assert!(offset_of!(MergeTermParams, col_div) == 40);
    assert!(offset_of!(MergeTermParams, col_mod) == 44);
    assert!(size_of::<MergeAdapterParams>() == 104);
    assert!(offset_of!(MergeAdapterParams, terms) == 0);
    assert!(offset_of!(MergeAdapterParams, num_terms) == 96);
    assert!(offset_of!(MergeAdapterParams, scale) == 100);
    assert!(size_of::<MergeParams>() == 24 + 104 * MERGE_MAX_ADAPTERS);
    assert!(offset_of!(MergeParams, w) == 0);
    assert!(offset_of!(MergeParams, rows) == 8);
    assert!(offset_of!(MergeParams, cols) == 12);
    assert!(offset_of!(MergeParams, row0) == 16);
    assert!(offset_of!(MergeParams, num_adapters) == 20);
    assert!(offset_of!(MergeParams, adapters) == 24);
    // Kernel parameters are limited to 4 KiB on every driver.
    assert!(size_of::<MergeParams>() <= 4096);
};

impl MergeParams {
    /// The parameter block for `spec` (any delta kinds, mixed), with W at
    /// device address `w` and adapter `i`'s factors at the device addresses
    /// `factors[i]`, in the order of [`delta_factors`].
    ///
    /// Errors: [`KernelError::Unsupported`] if there are more than
    /// [`MERGE_MAX_ADAPTERS`] adapters, if `factors` does not have one entry
    /// per adapter and one address per factor, or if a dimension does not fit
    /// the kernel's 32-bit indices or its grid.
    pub fn new(
        spec: &MergeSpec<'_>,
        w: u64,
        factors: &[Vec<u64>],
    ) -> Result<MergeParams, KernelError> {
        let unsupported = |what: String| KernelError::Unsupported {
            what: format!("CUDA merge: {what}"),
        };
        let adapters = spec.adapters();
        if adapters.len() > MERGE_MAX_ADAPTERS {
            return Err(unsupported(format!(
                "{} adapters in one launch (at most {MERGE_MAX_ADAPTERS})",
                adapters.len()
            )));
        }
        if factors.len() != adapters.len() {
            return Err(unsupported(format!(
                "{} factor address lists for {} adapters",
                factors.len(),
                adapters.len()
            )));
        }
        let to_u32 = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| unsupported(format!("{what} {v} does not fit in u32")))
        };
        let rows = to_u32(spec.delta_rows(), "rows")?;
        if rows.div_ceil(TILE_ROWS) > 65_535 {
            return Err(unsupported(format!(
                "{rows} rows (grid y is at most 65535)"
            )));
        }
        let cols = to_u32(spec.cols(), "columns")?;
        let mut params = MergeParams {
            w,
            rows,
            cols,
            row0: to_u32(spec.row_range().start, "first row")?,
            num_adapters: to_u32(adapters.len(), "adapters")?,
            adapters: [MergeAdapterParams::default(); MERGE_MAX_ADAPTERS],
        };
        for (index, (adapter, addrs)) in adapters.iter().zip(factors).enumerate() {
            let expected = delta_factors(&adapter.delta).len();
            if addrs.len() != expected {
                return Err(unsupported(format!(
                    "adapter {index}: {} factor addresses for {expected} factors",
                    addrs.len()
                )));
            }
            // A term from a factor stored whole or a product of two, read
            // through the maps `(div, mod)` of rows and columns.
            let term = |l: (&Factor<'_>, u64),
                        r: Option<(&Factor<'_>, u64)>,
                        (row_div, row_mod): (usize, usize),
                        (col_div, col_mod): (usize, usize)|
             -> Result<MergeTermParams, KernelError> {
                let (cols_of_t, right, rank, right_dtype) = match r {
                    Some((rf, ra)) => (rf.cols, ra, l.0.cols, dtype_code(rf.dtype)),
                    None => (l.0.cols, 0, 0, 0),
                };
                Ok(MergeTermParams {
                    left: l.1,
                    right,
                    rank: to_u32(rank, "rank")?,
                    left_dtype: dtype_code(l.0.dtype),
                    right_dtype,
                    cols: to_u32(cols_of_t, "factor columns")?,
                    row_div: to_u32(row_div, "row divisor")?,
                    row_mod: to_u32(row_mod, "factor rows")?,
                    col_div: to_u32(col_div, "column divisor")?,
                    col_mod: to_u32(col_mod, "factor columns")?,
                })
            };
            let (n, c) = (spec.delta_rows(), spec.cols());
            let p = &mut params.adapters[index];
            p.scale = adapter.scale;
            match &adapter.delta {
                Delta::LowRank { up, down } => {
                    p.num_terms = 1;
                    p.terms[0] = term((up, addrs[0]), Some((down, addrs[1])), (1, n), (1, c))?;
                }
                Delta::LoHa { w1a, w1b, w2a, w2b } => {
                    p.num_terms = 2;
                    p.terms[0] = term((w1a, addrs[0]), Some((w1b, addrs[1])), (1, n), (1, c))?;
                    p.terms[1] = term((w2a, addrs[2]), Some((w2b, addrs[3])), (1, n), (1, c))?;
                }
                Delta::LoKr { w1, w2 } => {
                    // Δ[i, j] = w1[i / c2, j / d2] · w2[i % c2, j % d2].
                    let ([a1, b1], [c2, d2]) = (w1.shape(), w2.shape());
                    let mut next = addrs.iter().copied();
                    let mut side = |k: &KronFactor<'_>, rows, cols| match k {
                        KronFactor::Full(m) => {
                            term((m, next.next().unwrap_or(0)), None, rows, cols)
                        }
                        KronFactor::LowRank { a, b } => {
                            let (la, lb) = (next.next().unwrap_or(0), next.next().unwrap_or(0));
                            term((a, la), Some((b, lb)), rows, cols)
                        }
                    };
                    p.num_terms = 2;
                    p.terms[0] = side(w1, (c2, a1), (d2, b1))?;
                    p.terms[1] = side(w2, (1, c2), (1, d2))?;
                }
            }
        }
        Ok(params)
    }

    /// Grid and block dimensions for a launch with these parameters.
    pub fn launch_dims(&self) -> LaunchDims {
        (grid(self.rows, self.cols), BLOCK_DIM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Adapter;

    #[test]
    fn source_declares_every_entry_point_and_the_layout() {
        for dtype in Dtype::ALL {
            for (entry, threads) in [
                (
                    lowrank_merge_entry(dtype),
                    format!("OFFLOAD_LR_THREADS, {LOWRANK_BLOCKS_PER_SM}"),
                ),
                (
                    lowrank_merge_mma_entry(dtype),
                    format!("OFFLOAD_LR_THREADS, {MMA_BLOCKS_PER_SM}"),
                ),
                (merge_entry(dtype), "OFFLOAD_THREADS, 2".to_string()),
            ] {
                assert!(
                    LOWRANK_MERGE_SRC.contains(&format!(
                        "extern \"C\" __global__ void __launch_bounds__({threads})\n{entry}("
                    )),
                    "{entry}"
                );
            }
            // The batched entry points: the same launch bounds as their
            // one-tensor kernels, the batch parameters.
            for (entry, per_sm) in [
                (lowrank_merge_batch_entry(dtype), LOWRANK_BLOCKS_PER_SM),
                (lowrank_merge_mma_batch_entry(dtype), MMA_BLOCKS_PER_SM),
            ] {
                assert!(
                    LOWRANK_MERGE_SRC.contains(&format!(
                        "extern \"C\" __global__ void __launch_bounds__(OFFLOAD_LR_THREADS, {per_sm})\n{entry}(const OffloadLowRankBatchParams p)"
                    )),
                    "{entry}"
                );
            }
            let cu_type = match dtype {
                Dtype::F32 => "float",
                Dtype::F16 => "__half",
                Dtype::BF16 => "__nv_bfloat16",
            };
            // The streaming kernels.
            for k in [
                StreamKernel::Ranks8,
                StreamKernel::Ranks32,
                StreamKernel::Ranks8Shared,
            ] {
                let entry = k.entry(dtype);
                assert!(
                    LOWRANK_MERGE_SRC.contains(&format!(
                        "extern \"C\" __global__ void __launch_bounds__(OFFLOAD_ST_THREADS, {STREAM_BLOCKS_PER_SM})\n{entry}(const OffloadLowRankMergeParams p)"
                    )),
                    "{entry}"
                );
                // The template arguments: columns per lane, rows a group
                // (for 16-bit W), the most ranks.
                let rows16 = k.group_rows(Dtype::F16);
                assert_eq!(k.group_rows(Dtype::F32), rows16 / 2);
                let call = match k {
                    StreamKernel::Ranks8Shared => {
                        // Columns per lane and ranks are the source's constants.
                        for (name, v) in [
                            ("OFFLOAD_ST8S_CPT", k.cols_per_lane()),
                            ("OFFLOAD_ST8S_KMAX", k.max_rank()),
                        ] {
                            assert!(
                                LOWRANK_MERGE_SRC.contains(&format!("#define {name} {v}\n")),
                                "{name}"
                            );
                        }
                        format!("    offload_lowrank_merge_stream8s<{cu_type}, {rows16}>(p, blockIdx.x, gridDim.x);")
                    }
                    _ => format!(
                        "    offload_lowrank_merge_stream<{cu_type}, {}, {rows16}, {}>(p, blockIdx.x, gridDim.x);",
                        k.cols_per_lane(),
                        k.max_rank()
                    ),
                };
                assert!(
                    LOWRANK_MERGE_SRC.contains(&call),
                    "{entry}: template arguments"
                );
            }
            // The pipelined kernel on both tile heights, alone and batched.
            for (entry, params, threads, per_sm, rows) in [
                (
                    lowrank_merge_pipe_entry(dtype),
                    "OffloadLowRankMergeParams",
                    "OFFLOAD_PIPE_THREADS",
                    PIPE_BLOCKS_PER_SM,
                    "OFFLOAD_PIPE_TILE_ROWS",
                ),
                (
                    lowrank_merge_pipe_batch_entry(dtype),
                    "OffloadLowRankBatchParams",
                    "OFFLOAD_PIPE_THREADS",
                    PIPE_BLOCKS_PER_SM,
                    "OFFLOAD_PIPE_TILE_ROWS",
                ),
                (
                    lowrank_merge_pipe_tall_entry(dtype),
                    "OffloadLowRankMergeParams",
                    "OFFLOAD_PIPE_TALL_THREADS",
                    PIPE_TALL_BLOCKS_PER_SM,
                    "OFFLOAD_PIPE_TALL_TILE_ROWS",
                ),
                (
                    lowrank_merge_pipe_tall_batch_entry(dtype),
                    "OffloadLowRankBatchParams",
                    "OFFLOAD_PIPE_TALL_THREADS",
                    PIPE_TALL_BLOCKS_PER_SM,
                    "OFFLOAD_PIPE_TALL_TILE_ROWS",
                ),
            ] {
                let head = format!(
                    "extern \"C\" __global__ void __launch_bounds__({threads}, {per_sm})\n{entry}(const {params} p) {{\n"
                );
                let at = LOWRANK_MERGE_SRC
                    .find(&head)
                    .unwrap_or_else(|| panic!("{entry}: declaration"));
                // The body's tile height and W type.
                let body = &LOWRANK_MERGE_SRC[at + head.len()..];
                let body = &body[..body.find('}').unwrap()];
                assert!(
                    body.contains(&format!("<{cu_type}, {rows}>(p")),
                    "{entry}: template arguments: {body}"
                );
            }
        }
        let defines = [
            ("OFFLOAD_MAX_ADAPTERS", MAX_ADAPTERS as u32),
            ("OFFLOAD_BATCH_MAX_JOBS", BATCH_MAX_JOBS as u32),
            ("OFFLOAD_BATCH_MAX_ADAPTERS", BATCH_MAX_ADAPTERS as u32),
            ("OFFLOAD_MERGE_MAX_ADAPTERS", MERGE_MAX_ADAPTERS as u32),
            ("OFFLOAD_TILE_ROWS", TILE_ROWS),
            ("OFFLOAD_TILE_COLS", TILE_COLS),
            ("OFFLOAD_TILE_K", FMA_MAX_RANK),
            ("OFFLOAD_BLOCK_X", BLOCK_DIM.0),
            ("OFFLOAD_BLOCK_Y", BLOCK_DIM.1),
            ("OFFLOAD_LR_TILE_ROWS", LOWRANK_TILE_ROWS),
            ("OFFLOAD_LR_TILE_COLS", LOWRANK_TILE_COLS),
            ("OFFLOAD_LR_THREADS", LOWRANK_BLOCK_DIM.0),
            ("OFFLOAD_LR_K", FMA_MAX_RANK),
            ("OFFLOAD_PIPE_TILE_ROWS", PIPE_TILE_ROWS),
            ("OFFLOAD_PIPE_THREADS", PIPE_BLOCK_DIM.0),
            ("OFFLOAD_PIPE_TALL_TILE_ROWS", PIPE_TALL_TILE_ROWS),
            ("OFFLOAD_PIPE_TALL_THREADS", PIPE_TALL_BLOCK_DIM.0),
            ("OFFLOAD_ST_THREADS", STREAM_BLOCK_DIM.0),
        ];
        for (name, value) in defines {
            assert!(
                LOWRANK_MERGE_SRC.contains(&format!("#define {name} {value}\n")),
                "{name}"
            );
        }
        assert_eq!((BLOCK_DIM.2, MMA_BLOCK_DIM.1, MMA_BLOCK_DIM.2), (1, 1, 1));
        assert_eq!(LOWRANK_BLOCK_DIM, MMA_BLOCK_DIM);
        assert_eq!(PIPE_BLOCK_DIM, MMA_BLOCK_DIM);
        assert!(LOWRANK_MERGE_SRC.contains("#define OFFLOAD_PIPE_TILE_COLS OFFLOAD_LR_TILE_COLS\n"));
        for dtype in Dtype::ALL {
            assert!(LOWRANK_MERGE_SRC.contains(&format!(
                "#define OFFLOAD_DTYPE_{} {}u\n",
                dtype.name(),
                dtype_code(dtype)
            )));
        }
        // Only the two headers NVRTC is given.
        let includes: Vec<&str> = LOWRANK_MERGE_SRC
            .lines()
            .filter(|l| l.starts_with("#include"))
            .collect();
        assert_eq!(
            includes,
            ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>"]
        );
        // The tensor-core instruction, for both 16-bit types, only where it exists.
        for t in ["f16", "bf16"] {
            assert!(LOWRANK_MERGE_SRC.contains(&format!(
                "mma.sync.aligned.m16n8k16.row.col.f32.{t}.{t}.f32 "
            )));
        }
        assert!(LOWRANK_MERGE_SRC.contains("#if __CUDA_ARCH__ >= 800\n"));
    }

    #[test]
    fn params_from_spec() {
        let up = vec![0u8; 130 * 4 * 2];
        let down = vec![0u8; 4 * 70 * 4];
        let adapters = [Adapter {
            scale: 0.5,
            delta: Delta::LowRank {
                up: Factor::new(&up, Dtype::BF16, 130, 4),
                down: Factor::new(&down, Dtype::F32, 4, 70),
            },
        }];
        let spec = MergeSpec::new(Dtype::F16, &[200, 70], Some(10..140), &adapters).unwrap();
        let p = LowRankMergeParams::new(&spec, 0x1000, &[(0x2000, 0x3000)]).unwrap();
        assert_eq!((p.rows, p.cols, p.row0, p.num_adapters), (130, 70, 10, 1));
        assert_eq!(
            p.adapters[0],
            LowRankAdapterParams {
                up: 0x2000,
                down: 0x3000,
                rank: 4,
                up_dtype: 2,
                down_dtype: 0,
                scale: 0.5
            }
        );
        // 130 rows x 70 columns: one column strip of five 32 x 128 tiles;
        // as many blocks as fill the GPU, at most one per tile.
        assert_eq!(p.launch_dims(132), ((5, 1, 1), (256, 1, 1)));
        assert_eq!(p.launch_dims(1), ((3, 1, 1), (256, 1, 1)));
        assert_eq!(p.mma_launch_dims(1), ((2, 1, 1), (256, 1, 1)));
        // The pipelined kernel: three 64-row tiles, two blocks per SM.
        assert_eq!(p.pipe_launch_dims(132), ((3, 1, 1), (256, 1, 1)));
        assert_eq!(p.pipe_launch_dims(1), ((2, 1, 1), (256, 1, 1)));
        // On 128-row tiles: two tiles, one block per SM.
        assert_eq!(p.pipe_tall_launch_dims(132), ((2, 1, 1), (512, 1, 1)));
        assert_eq!(p.pipe_tall_launch_dims(1), ((1, 1, 1), (512, 1, 1)));
        // The streaming kernels: 70 columns are one strip of 256 (two of
        // 64); 130 rows are 65 groups of 2 (at most 9 blocks of 8 warps),
        // or 17 of 8 (3 blocks a strip).
        assert_eq!(p.stream_kernel(), Some(StreamKernel::Ranks8));
        let k8 = StreamKernel::Ranks8;
        assert_eq!(
            p.stream_launch_dims(k8, Dtype::F16, 132),
            ((9, 1, 1), (256, 1, 1))
        );
        assert_eq!(
            p.stream_launch_dims(k8, Dtype::F16, 1),
            ((2, 1, 1), (256, 1, 1))
        );
        // f32 W: groups of 1 row, 130 of them.
        assert_eq!(
            p.stream_launch_dims(k8, Dtype::F32, 132),
            ((17, 1, 1), (256, 1, 1))
        );
        assert_eq!(
            p.stream_launch_dims(StreamKernel::Ranks32, Dtype::BF16, 132),
            ((6, 1, 1), (256, 1, 1))
        );
        // W [1280, 5120] (the bench's): 20 strips of 256 columns, 13 blocks
        // each on 132 SMs; 80 strips of 64, 3 blocks each.
        let mut wide = p;
        (wide.rows, wide.cols) = (1280, 5120);
        assert_eq!(
            wide.stream_launch_dims(k8, Dtype::F16, 132),
            ((260, 1, 1), (256, 1, 1))
        );
        assert_eq!(
            wide.stream_launch_dims(StreamKernel::Ranks32, Dtype::F16, 132),
            ((240, 1, 1), (256, 1, 1))
        );
        // A wide weight: whole strips only (40 strips of 5120 columns).
        assert_eq!(lowrank_grid(1280, 5120, 132, 3, 32), (360, 1, 1));
        assert_eq!(lowrank_grid(1280, 5120, 10, 3, 32), (40, 1, 1));
        assert_eq!(lowrank_grid(1, 1, 0, 3, 32), (1, 1, 1));
        // 64-row tiles: 20 down each strip, 6 blocks per strip on 132 SMs.
        assert_eq!(lowrank_grid(1280, 5120, 132, 2, 64), (240, 1, 1));
        assert_eq!(bytemuck::bytes_of(&p).len(), 280);
        assert!(matches!(
            LowRankMergeParams::new(&spec, 0x1000, &[]),
            Err(KernelError::Unsupported { .. })
        ));
        // Mixed factor dtypes and rank 4: not for the tensor cores.
        assert!(!p.tensor_cores());
    }

    #[test]
    fn batch_params_hold_jobs_and_their_blocks() {
        use Dtype::{F16, F32};
        let one = lowrank_params(&[(8, F16, F32), (40, F16, F16)]);
        let job = LowRankJobParams::from_params(&one).unwrap();
        assert_eq!(
            (job.w, job.rows, job.cols, job.row0, job.num_adapters),
            (one.w, one.rows, one.cols, one.row0, 2)
        );
        assert_eq!(job.adapters[..2], one.adapters[..2]);
        assert_eq!(job.adapters[2..], [LowRankAdapterParams::default(); 2]);
        // More adapters than a job holds: a launch of its own.
        let five = lowrank_params(&[(4, F16, F16); BATCH_MAX_ADAPTERS + 1]);
        assert!(LowRankJobParams::from_params(&five).is_none());
        let four = lowrank_params(&[(4, F16, F16); BATCH_MAX_ADAPTERS]);
        assert!(LowRankJobParams::from_params(&four).is_some());

        let mut b = LowRankBatchParams::default();
        assert!(b.is_empty());
        assert_eq!(b.blocks(), 0);
        assert!(b.push(job, 3));
        assert!(!b.push(job, 0), "a job needs a block");
        let no_cols = LowRankJobParams { cols: 0, ..job };
        assert!(!b.push(no_cols, 1), "a job needs a column");
        assert!(b.push(job, 7));
        assert_eq!((b.len(), b.blocks()), (2, 10));
        assert_eq!(b.first_block[..3], [0, 3, 10]);
        assert_eq!(b.launch_dims(), ((10, 1, 1), (256, 1, 1)));
        for _ in 2..BATCH_MAX_JOBS {
            assert!(b.push(job, 1));
        }
        let full = b;
        assert!(!b.push(job, 1), "full");
        assert_eq!(b, full, "a refused push changes nothing");
        assert_eq!(b.blocks(), 10 + (BATCH_MAX_JOBS as u32 - 2));
        // The grid stays within i32::MAX blocks.
        let mut big = LowRankBatchParams::default();
        assert!(big.push(job, i32::MAX as u32 - 1));
        assert!(!big.push(job, 2));
        assert!(big.push(job, 1));
        assert_eq!(big.blocks(), i32::MAX as u32);
        assert_eq!(bytemuck::bytes_of(&b).len(), 2504);
    }

    fn lowrank_params(adapters: &[(usize, Dtype, Dtype)]) -> LowRankMergeParams {
        let bytes: Vec<(Vec<u8>, Vec<u8>)> = adapters
            .iter()
            .map(|&(r, u, d)| {
                (
                    vec![0u8; 8 * r * u.size_in_bytes()],
                    vec![0u8; r * 8 * d.size_in_bytes()],
                )
            })
            .collect();
        let list: Vec<Adapter<'_>> = adapters
            .iter()
            .zip(&bytes)
            .map(|(&(r, u, d), (ub, db))| Adapter {
                scale: 1.0,
                delta: Delta::LowRank {
                    up: Factor::new(ub, u, 8, r),
                    down: Factor::new(db, d, r, 8),
                },
            })
            .collect();
        let spec = MergeSpec::new(Dtype::F32, &[8, 8], None, &list).unwrap();
        let addrs = vec![(0x100, 0x200); list.len()];
        LowRankMergeParams::new(&spec, 0x10, &addrs).unwrap()
    }

    #[test]
    fn tensor_cores_for_large_ranks_of_16_bit_factors() {
        use Dtype::{BF16, F16, F32};
        assert!(lowrank_params(&[(64, F16, F16)]).tensor_cores());
        assert!(lowrank_params(&[(33, BF16, BF16), (4, F16, F16)]).tensor_cores());
        // Small ranks adding up to 32 or less: fp32 FMA.
        assert!(!lowrank_params(&[(24, F16, F16), (8, BF16, BF16)]).tensor_cores());
        assert!(!lowrank_params(&[(8, F16, F16); 4]).tensor_cores());
        assert!(!lowrank_params(&[(31, F16, F16)]).tensor_cores());
        // One adapter of rank 32: the tensor cores.
        assert!(lowrank_params(&[(32, F16, F16)]).tensor_cores());
        // The stack counts: four rank-16 adapters are a rank-64 product.
        assert!(lowrank_params(&[(16, F16, F16); 4]).tensor_cores());
        assert!(lowrank_params(&[(32, F16, F16), (8, BF16, BF16)]).tensor_cores());
        // The operands alone.
        assert!(lowrank_params(&[(8, BF16, BF16)]).tensor_core_operands());
        assert!(!lowrank_params(&[(8, BF16, F16)]).tensor_core_operands());
        // One operand type per instruction; no f32 operands.
        assert!(!lowrank_params(&[(64, F16, BF16)]).tensor_cores());
        assert!(!lowrank_params(&[(64, F32, F32)]).tensor_cores());
        assert!(!lowrank_params(&[(64, F16, F16), (64, F32, F16)]).tensor_cores());
        assert!(!lowrank_params(&[]).tensor_cores());
    }

    #[test]
    fn streaming_kernels_by_the_ranks_sum() {
        use Dtype::{BF16, F16, F32};
        assert_eq!(lowrank_params(&[]).stream_kernel(), None);
        assert_eq!(
            lowrank_params(&[(8, F16, F16)]).stream_kernel(),
            Some(StreamKernel::Ranks8)
        );
        assert_eq!(
            lowrank_params(&[(3, F32, BF16), (5, F16, F16)]).stream_kernel(),
            Some(StreamKernel::Ranks8)
        );
        assert_eq!(
            lowrank_params(&[(9, F16, F16)]).stream_kernel(),
            Some(StreamKernel::Ranks32)
        );
        assert_eq!(
            lowrank_params(&[(8, F16, F16); 4]).stream_kernel(),
            Some(StreamKernel::Ranks32)
        );
        assert_eq!(lowrank_params(&[(33, F16, F16)]).stream_kernel(), None);
        assert_eq!(
            lowrank_params(&[(16, F16, F16), (17, F32, F32)]).stream_kernel(),
            None
        );
    }

    #[test]
    fn auto_streams_small_ranks_into_large_16_bit_weights() {
        use Dtype::{BF16, F16, F32};
        let sized = |adapters: &[(usize, Dtype, Dtype)], rows: u32, cols: u32| {
            let mut p = lowrank_params(adapters);
            (p.rows, p.cols) = (rows, cols);
            p
        };
        // 2²⁴ elements and more, ranks adding up to 8, f16 or bf16 W.
        let big = sized(&[(8, F16, F16)], 4096, 4096);
        assert!(big.auto_streaming(F16) && big.auto_streaming(BF16));
        assert!(sized(&[(4, F32, F16), (4, BF16, BF16)], 10240, 5120).auto_streaming(F16));
        // One element fewer, an f32 W, or ranks past 8: not.
        assert!(!sized(&[(8, F16, F16)], 4096, 4095).auto_streaming(F16));
        assert!(!big.auto_streaming(F32));
        assert!(!sized(&[(9, F16, F16)], 4096, 4096).auto_streaming(F16));
        assert!(!sized(&[(8, F16, F16); 2], 10240, 5120).auto_streaming(F16));
        assert!(!sized(&[], 10240, 5120).auto_streaming(F16));
        // No overflow at the largest slice.
        assert!(sized(&[(1, F16, F16)], u32::MAX, u32::MAX).auto_streaming(F16));
    }

    #[test]
    fn pipelined_tensor_cores_from_rank_16() {
        use Dtype::{BF16, F16, F32};
        // Below 16 and adding up to 16 or less: fp32 FMA.
        assert!(!lowrank_params(&[(8, F16, F16)]).pipelined_tensor_cores());
        assert!(!lowrank_params(&[(8, F16, F16); 2]).pipelined_tensor_cores());
        assert!(!lowrank_params(&[(15, BF16, BF16)]).pipelined_tensor_cores());
        assert!(!lowrank_params(&[(4, F16, F16); 4]).pipelined_tensor_cores());
        // One rank-16 adapter, a stack past 16, or any larger rank.
        assert!(lowrank_params(&[(16, F16, F16)]).pipelined_tensor_cores());
        assert!(lowrank_params(&[(8, F16, F16), (9, BF16, BF16)]).pipelined_tensor_cores());
        assert!(lowrank_params(&[(8, F16, F16); 4]).pipelined_tensor_cores());
        assert!(lowrank_params(&[(128, BF16, BF16)]).pipelined_tensor_cores());
        // The same operand rule as the other tensor-core kernel.
        assert!(!lowrank_params(&[(64, F16, BF16)]).pipelined_tensor_cores());
        assert!(!lowrank_params(&[(64, F32, F32)]).pipelined_tensor_cores());
        assert!(!lowrank_params(&[]).pipelined_tensor_cores());
        // Where the two rules differ: a rank-16 adapter.
        assert!(!lowrank_params(&[(16, F16, F16)]).tensor_cores());
    }

    #[test]
    fn general_params_map_every_delta_kind() {
        // W [40, 30], rows 4..28 (n = 24), cols 30.
        let (n, cols) = (24usize, 30usize);
        let b = |rows: usize, c: usize, dt: Dtype| vec![0u8; rows * c * dt.size_in_bytes()];
        let (up, down) = (b(n, 3, Dtype::F16), b(3, cols, Dtype::BF16));
        let (w1a, w1b) = (b(n, 2, Dtype::F32), b(2, cols, Dtype::F16));
        let (w2a, w2b) = (b(n, 5, Dtype::BF16), b(5, cols, Dtype::F32));
        // LoKr: w1 [4, 3] whole, w2 [6, 10] = a [6, 2] · b [2, 10].
        let k1 = b(4, 3, Dtype::BF16);
        let (k2a, k2b) = (b(6, 2, Dtype::F16), b(2, 10, Dtype::F32));
        // LoKr: w1 [2, 5] = a [2, 1] · b [1, 5], w2 [12, 6] whole.
        let (k3a, k3b) = (b(2, 1, Dtype::F32), b(1, 5, Dtype::F32));
        let k4 = b(12, 6, Dtype::F16);
        let adapters = [
            Adapter {
                scale: 0.5,
                delta: Delta::LowRank {
                    up: Factor::new(&up, Dtype::F16, n, 3),
                    down: Factor::new(&down, Dtype::BF16, 3, cols),
                },
            },
            Adapter {
                scale: -1.0,
                delta: Delta::LoHa {
                    w1a: Factor::new(&w1a, Dtype::F32, n, 2),
                    w1b: Factor::new(&w1b, Dtype::F16, 2, cols),
                    w2a: Factor::new(&w2a, Dtype::BF16, n, 5),
                    w2b: Factor::new(&w2b, Dtype::F32, 5, cols),
                },
            },
            Adapter {
                scale: 2.0,
                delta: Delta::LoKr {
                    w1: KronFactor::Full(Factor::new(&k1, Dtype::BF16, 4, 3)),
                    w2: KronFactor::LowRank {
                        a: Factor::new(&k2a, Dtype::F16, 6, 2),
                        b: Factor::new(&k2b, Dtype::F32, 2, 10),
                    },
                },
            },
            Adapter {
                scale: 0.25,
                delta: Delta::LoKr {
                    w1: KronFactor::LowRank {
                        a: Factor::new(&k3a, Dtype::F32, 2, 1),
                        b: Factor::new(&k3b, Dtype::F32, 1, 5),
                    },
                    w2: KronFactor::Full(Factor::new(&k4, Dtype::F16, 12, 6)),
                },
            },
        ];
        let spec = MergeSpec::new(Dtype::BF16, &[40, 30], Some(4..28), &adapters).unwrap();
        let addrs = vec![
            vec![0x10, 0x20],
            vec![0x30, 0x40, 0x50, 0x60],
            vec![0x70, 0x80, 0x90],
            vec![0xa0, 0xb0, 0xc0],
        ];
        for (a, list) in adapters.iter().zip(&addrs) {
            assert_eq!(delta_factors(&a.delta).len(), list.len());
        }
        let p = MergeParams::new(&spec, 0x1000, &addrs).unwrap();
        assert_eq!(
            (p.w, p.rows, p.cols, p.row0, p.num_adapters),
            (0x1000, 24, 30, 4, 4)
        );
        assert_eq!(p.launch_dims(), ((1, 1, 1), (16, 16, 1)));
        assert_eq!(bytemuck::bytes_of(&p).len(), 3352);
        let t = |left, right, rank, ld: Dtype, rd: u32, cols, row: (u32, u32), col: (u32, u32)| {
            MergeTermParams {
                left,
                right,
                rank,
                left_dtype: dtype_code(ld),
                right_dtype: rd,
                cols,
                row_div: row.0,
                row_mod: row.1,
                col_div: col.0,
                col_mod: col.1,
            }
        };
        let (f32c, f16c, bf16c) = (0, 1, 2);
        let id = ((1, 24), (1, 30));
        let a0 = p.adapters[0];
        assert_eq!((a0.num_terms, a0.scale), (1, 0.5));
        assert_eq!(
            a0.terms[0],
            t(0x10, 0x20, 3, Dtype::F16, bf16c, 30, id.0, id.1)
        );
        let a1 = p.adapters[1];
        assert_eq!((a1.num_terms, a1.scale), (2, -1.0));
        assert_eq!(
            a1.terms[0],
            t(0x30, 0x40, 2, Dtype::F32, f16c, 30, id.0, id.1)
        );
        assert_eq!(
            a1.terms[1],
            t(0x50, 0x60, 5, Dtype::BF16, f32c, 30, id.0, id.1)
        );
        // kron([4, 3], [6, 10]): w1[i / 6, j / 10] · w2[i % 6, j % 10].
        let a2 = p.adapters[2];
        assert_eq!((a2.num_terms, a2.scale), (2, 2.0));
        assert_eq!(
            a2.terms[0],
            t(0x70, 0, 0, Dtype::BF16, 0, 3, (6, 4), (10, 3))
        );
        assert_eq!(
            a2.terms[1],
            t(0x80, 0x90, 2, Dtype::F16, f32c, 10, (1, 6), (1, 10))
        );
        // kron([2, 5], [12, 6]).
        let a3 = p.adapters[3];
        assert_eq!(
            a3.terms[0],
            t(0xa0, 0xb0, 1, Dtype::F32, f32c, 5, (12, 2), (6, 5))
        );
        assert_eq!(
            a3.terms[1],
            t(0xc0, 0, 0, Dtype::F16, 0, 6, (1, 12), (1, 6))
        );
        assert_eq!(p.adapters[4], MergeAdapterParams::default());

        // Wrong address counts.
        assert!(matches!(
            MergeParams::new(&spec, 0x1000, &addrs[..3]),
            Err(KernelError::Unsupported { .. })
        ));
        let mut short = addrs.clone();
        short[2].pop();
        assert!(matches!(
            MergeParams::new(&spec, 0x1000, &short),
            Err(KernelError::Unsupported { .. })
        ));
    }

    #[test]
    fn general_params_take_up_to_the_launch_limit() {
        let (up, down) = (vec![0u8; 4 * 2 * 4], vec![0u8; 2 * 6 * 4]);
        let one = Adapter {
            scale: 1.0,
            delta: Delta::LowRank {
                up: Factor::new(&up, Dtype::F32, 4, 2),
                down: Factor::new(&down, Dtype::F32, 2, 6),
            },
        };
        let many = vec![one; MERGE_MAX_ADAPTERS + 1];
        let addrs = vec![vec![0x10u64, 0x20]; MERGE_MAX_ADAPTERS + 1];
        let spec = MergeSpec::new(Dtype::F32, &[4, 6], None, &many[..MERGE_MAX_ADAPTERS]).unwrap();
        let p = MergeParams::new(&spec, 0, &addrs[..MERGE_MAX_ADAPTERS]).unwrap();
        assert_eq!(p.num_adapters as usize, MERGE_MAX_ADAPTERS);
        let spec = MergeSpec::new(Dtype::F32, &[4, 6], None, &many).unwrap();
        assert!(matches!(
            MergeParams::new(&spec, 0, &addrs),
            Err(KernelError::Unsupported { .. })
        ));
    }
}
