//! CUDA C sources for the merge, compiled at run time with NVRTC by the
//! runtime, and the layout of their launch parameters.
//!
//! This module does not talk to CUDA (it does not depend on cudarc): it
//! holds the source text, the entry-point names, and [`LowRankMergeParams`],
//! the `#[repr(C)]` parameter block the kernels take by value, so the runtime
//! can compile, launch and check them.
//!
//! **Status: compiled by NVRTC, not yet run on a GPU.** The source includes
//! only `cuda_fp16.h` and `cuda_bf16.h`, and uses only their types and
//! scalar conversions. NVRTC 13.0 does not bundle those headers, so the
//! runtime gives NVRTC its own minimal versions of both
//! (`offload_runtime::device::cuda::nvrtc::HEADERS`); with them the source
//! compiles to cubins for sm_80, sm_90 and sm_121 with NVRTC 13.0.88 (the
//! runtime's `nvrtc_compiles_the_kernel_sources` test, which needs libnvrtc
//! but no GPU). What has been checked besides: g++ compiles it against
//! stand-in headers and runs it on the CPU (one OS thread per CUDA thread,
//! a barrier for `__syncthreads()`), and every element matches the f64
//! reference within the CPU tests' tolerance (`tests/cuda_emulation.rs`,
//! ignored by default). The runtime's GPU test
//! `gpu_merge_lowrank_matches_cpu_merge` must still compare it with the
//! reference on a GPU before it is trusted.
//!
//! What it covers: the low-rank merge (`Δ = up · down`: kohya, peft, LoCon)
//! for up to [`MAX_ADAPTERS`] stacked adapters in one pass, any rank (tiles
//! of 32 ranks; it is meant to be memory-bound for rank ≤ 32), W in
//! f32/f16/bf16 and each factor in f32/f16/bf16, with a row slice. LoHa and
//! LoKr deltas and the tensor-core path for large ranks are not here yet.

use std::mem::{offset_of, size_of};

use crate::dtype::Dtype;
use crate::error::KernelError;
use crate::merge::{Delta, MergeSpec};

/// CUDA C source of the low-rank merge kernels (one translation unit, three
/// `extern "C"` entry points; see [`lowrank_merge_entry`]).
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

/// Most adapters one launch merges (`OFFLOAD_MAX_ADAPTERS` in the source).
pub const MAX_ADAPTERS: usize = 8;
/// Rows of W one thread block covers.
pub const TILE_ROWS: u32 = 64;
/// Columns of W one thread block covers.
pub const TILE_COLS: u32 = 64;
/// Threads per block, `(x, y, z)`.
pub const BLOCK_DIM: (u32, u32, u32) = (16, 16, 1);

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
        if rows.div_ceil(TILE_ROWS) > 65_535 {
            return Err(unsupported(format!(
                "{rows} rows (grid y is at most 65535)"
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

    /// Grid and block dimensions for a launch with these parameters.
    pub fn launch_dims(&self) -> LaunchDims {
        (
            (
                self.cols.div_ceil(TILE_COLS),
                self.rows.div_ceil(TILE_ROWS),
                1,
            ),
            BLOCK_DIM,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{Adapter, Factor};

    #[test]
    fn source_declares_every_entry_point_and_the_layout() {
        for dtype in Dtype::ALL {
            let entry = lowrank_merge_entry(dtype);
            assert!(
                LOWRANK_MERGE_SRC.contains(&format!(
                    "extern \"C\" __global__ void __launch_bounds__(OFFLOAD_THREADS)\n{entry}("
                )),
                "{entry}"
            );
        }
        assert!(
            LOWRANK_MERGE_SRC.contains(&format!("#define OFFLOAD_MAX_ADAPTERS {MAX_ADAPTERS}\n"))
        );
        assert!(LOWRANK_MERGE_SRC.contains(&format!("#define OFFLOAD_TILE_ROWS {TILE_ROWS}\n")));
        assert!(LOWRANK_MERGE_SRC.contains(&format!("#define OFFLOAD_TILE_COLS {TILE_COLS}\n")));
        assert!(LOWRANK_MERGE_SRC.contains(&format!("#define OFFLOAD_BLOCK_X {}\n", BLOCK_DIM.0)));
        assert!(LOWRANK_MERGE_SRC.contains(&format!("#define OFFLOAD_BLOCK_Y {}\n", BLOCK_DIM.1)));
        for dtype in Dtype::ALL {
            assert!(LOWRANK_MERGE_SRC.contains(&format!(
                "#define OFFLOAD_DTYPE_{} {}u\n",
                dtype.name(),
                dtype_code(dtype)
            )));
        }
        // Only the two headers NVRTC bundles.
        let includes: Vec<&str> = LOWRANK_MERGE_SRC
            .lines()
            .filter(|l| l.starts_with("#include"))
            .collect();
        assert_eq!(
            includes,
            ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>"]
        );
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
        assert_eq!(p.launch_dims(), ((2, 3, 1), (16, 16, 1)));
        assert_eq!(bytemuck::bytes_of(&p).len(), 280);
        assert!(matches!(
            LowRankMergeParams::new(&spec, 0x1000, &[]),
            Err(KernelError::Unsupported { .. })
        ));
    }
}
