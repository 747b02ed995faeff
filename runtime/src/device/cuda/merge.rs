//! The LoRA low-rank merge on CUDA: the kernels of `offload_kernels::cuda`,
//! compiled by NVRTC for the device at first use ([`super::nvrtc`]) and
//! launched on a stream of the device.

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys;
use offload_kernels::cuda::{
    lowrank_merge_entry, LowRankMergeParams, LOWRANK_MERGE_SRC, MAX_ADAPTERS,
};
use offload_kernels::{Delta, Dtype, MergeSpec};

use super::nvrtc::{self, Image, Module, Target};
use super::{lock, result, CudaDevice};
use crate::device::{DevicePtr, StreamId};
use crate::error::{Error, Result};

/// The merge kernels loaded into a device's context.
pub(super) struct MergeKernels {
    _module: Module,
    f32: sys::CUfunction,
    f16: sys::CUfunction,
    bf16: sys::CUfunction,
    image: Arc<Image>,
}

// SAFETY: the functions are driver handles usable from any thread with the
// context bound (launches are thread-safe); we never dereference them.
unsafe impl Send for MergeKernels {}
// SAFETY: as above; shared use only reads the handles.
unsafe impl Sync for MergeKernels {}

impl MergeKernels {
    fn function(&self, dtype: Dtype) -> sys::CUfunction {
        match dtype {
            Dtype::F32 => self.f32,
            Dtype::F16 => self.f16,
            Dtype::BF16 => self.bf16,
        }
    }
}

/// How the merge kernels were built for a device, for reports.
#[derive(Clone, Debug)]
pub struct MergeKernelsInfo {
    /// What NVRTC built: `sm_XY` machine code, or PTX for the driver to compile.
    pub target: Target,
    /// NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// How long NVRTC took (once per process).
    pub compile_time: Duration,
    /// The options NVRTC was given.
    pub options: Vec<String>,
    /// NVRTC's log (warnings; usually empty).
    pub log: String,
    /// The NVRTC library loaded, as mapped in the process.
    pub library: Option<PathBuf>,
}

fn merge_error(message: String) -> Error {
    Error::Kernel {
        kernel: "lowrank_merge",
        message,
    }
}

/// A device region a merge touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) addr: DevicePtr,
    pub(super) len: usize,
    /// Required alignment of `addr` (the element size).
    pub(super) align: usize,
}

/// The regions a merge of `spec` into W at `w` with the factors at
/// `factors` touches: W's row slice first, then each adapter's up and down
/// factors. Errors if a factor count is wrong or an adapter is not low-rank.
pub(super) fn merge_regions(
    spec: &MergeSpec<'_>,
    w: DevicePtr,
    factors: &[(DevicePtr, DevicePtr)],
) -> Result<Vec<Region>> {
    let adapters = spec.adapters();
    if factors.len() != adapters.len() {
        return Err(merge_error(format!(
            "{} factor address pairs for {} adapters",
            factors.len(),
            adapters.len()
        )));
    }
    let size = spec.dtype().size_in_bytes();
    let row_bytes = spec.cols() * size;
    let mut regions = vec![Region {
        addr: w.offset(spec.row_range().start * row_bytes),
        len: spec.delta_rows() * row_bytes,
        align: size,
    }];
    for (i, (adapter, &(up_addr, down_addr))) in adapters.iter().zip(factors).enumerate() {
        let Delta::LowRank { up, down } = &adapter.delta else {
            return Err(merge_error(format!(
                "adapter {i} is LoHa or LoKr: the CUDA merge takes low-rank deltas only"
            )));
        };
        // MergeSpec::new checked that each factor's bytes match its shape.
        for (addr, f) in [(up_addr, up), (down_addr, down)] {
            regions.push(Region {
                addr,
                len: f.data.len(),
                align: f.dtype.size_in_bytes(),
            });
        }
    }
    Ok(regions)
}

impl CudaDevice {
    fn merge_kernels(&self) -> Result<Arc<MergeKernels>> {
        let mut slot = lock(&self.merge);
        if let Some(k) = slot.as_ref() {
            return Ok(k.clone());
        }
        let cc = self.info.compute_capability.unwrap_or((0, 0));
        let image = nvrtc::compile("lowrank_merge.cu", LOWRANK_MERGE_SRC, cc)?;
        let module = Module::load(&self.ctx, &image)?;
        let k = Arc::new(MergeKernels {
            f32: module.function(lowrank_merge_entry(Dtype::F32))?,
            f16: module.function(lowrank_merge_entry(Dtype::F16))?,
            bf16: module.function(lowrank_merge_entry(Dtype::BF16))?,
            _module: module,
            image,
        });
        *slot = Some(k.clone());
        Ok(k)
    }

    /// Build (NVRTC, once per process) and load the merge kernels now rather
    /// than at the first merge, and say how they were built.
    ///
    /// Errors: [`Error::Unsupported`] when no NVRTC library loads;
    /// [`Error::Kernel`] with NVRTC's log when the source does not compile.
    pub fn prepare_merge(&self) -> Result<MergeKernelsInfo> {
        let k = self.merge_kernels()?;
        Ok(MergeKernelsInfo {
            target: k.image.target,
            nvrtc_version: k.image.nvrtc_version,
            compile_time: k.image.compile_time,
            options: k.image.options.clone(),
            log: k.image.log.clone(),
            library: nvrtc::loaded_library("libnvrtc.so"),
        })
    }

    /// Queue the low-rank LoRA merge `W[rows] += Σₐ sₐ · upₐ · downₐ` on
    /// `stream` (semantics of [`offload_kernels::merge`]: one pass, f32
    /// accumulation, one rounding to W's dtype; rows outside the spec's row
    /// slice untouched).
    ///
    /// `spec` gives W's dtype and shape, the row slice and the adapters
    /// (scales, factor shapes and dtypes; the factors' host bytes are not
    /// read). `w` is the device address of W's first element (row 0 of the
    /// whole weight); `factors[i]` the device addresses of adapter `i`'s
    /// `(up, down)` factors, row-major as in the spec. Every region the
    /// kernel touches must be mapped, each address aligned to its element
    /// size, and the factors must not overlap W's row slice. At most
    /// [`MAX_ADAPTERS`] adapters, all low-rank.
    ///
    /// [`Kernel::Merge`](crate::device::Kernel::Merge) on this device: the
    /// low-rank kernel, in chunks of [`MAX_ADAPTERS`] adapters when more are
    /// stacked (each chunk rounds once). LoHa and LoKr deltas are refused
    /// with an error naming the adapter.
    pub(super) fn launch_merge(
        &self,
        w: DevicePtr,
        op: &crate::device::MergeOp,
        stream: StreamId,
    ) -> Result<()> {
        let adapters = op.adapters_with(&mut |f| &f.host);
        let spec = MergeSpec::new(op.dtype, &op.shape, op.rows.clone(), &adapters)
            .map_err(|e| merge_error(e.to_string()))?;
        let mut factors = Vec::with_capacity(op.adapters.len());
        for (i, a) in op.adapters.iter().enumerate() {
            match &a.delta {
                crate::device::MergeDelta::LowRank { up, down } => factors.push((up.ptr, down.ptr)),
                _ => {
                    return Err(merge_error(format!(
                        "adapter {i} is LoHa or LoKr: the CUDA merge takes low-rank deltas only"
                    )))
                }
            }
        }
        for (chunk, addrs) in adapters
            .chunks(MAX_ADAPTERS)
            .zip(factors.chunks(MAX_ADAPTERS))
        {
            let spec = MergeSpec::new(op.dtype, &op.shape, Some(spec.row_range()), chunk)
                .map_err(|e| merge_error(e.to_string()))?;
            self.merge_lowrank(&spec, w, addrs, stream)?;
        }
        Ok(())
    }

    /// The kernels are compiled at the first call (see [`Self::prepare_merge`]).
    pub fn merge_lowrank(
        &self,
        spec: &MergeSpec<'_>,
        w: DevicePtr,
        factors: &[(DevicePtr, DevicePtr)],
        stream: StreamId,
    ) -> Result<()> {
        if spec.adapters().len() > MAX_ADAPTERS {
            return Err(merge_error(format!(
                "{} adapters in one merge (at most {MAX_ADAPTERS})",
                spec.adapters().len()
            )));
        }
        let regions = merge_regions(spec, w, factors)?;
        {
            let mem = lock(&self.mem);
            for r in &regions {
                mem.check_access(r.addr, r.len)?;
            }
        }
        for r in &regions {
            if r.addr.0 % r.align as u64 != 0 {
                return Err(merge_error(format!(
                    "operand at {} is not aligned to its {}-byte elements",
                    r.addr, r.align
                )));
            }
        }
        let out = regions[0];
        for r in &regions[1..] {
            let apart = r.addr.0.saturating_add(r.len as u64) <= out.addr.0
                || out.addr.0.saturating_add(out.len as u64) <= r.addr.0;
            if !apart {
                return Err(merge_error(format!(
                    "a factor at {} (+{} bytes) overlaps W's row slice",
                    r.addr, r.len
                )));
            }
        }
        let addrs: Vec<(u64, u64)> = factors.iter().map(|(u, d)| (u.0, d.0)).collect();
        let mut params =
            LowRankMergeParams::new(spec, w.0, &addrs).map_err(|e| merge_error(e.to_string()))?;
        let s = self.stream(stream)?;
        if spec.adapters().is_empty() {
            return Ok(());
        }
        let kernels = self.merge_kernels()?;
        let (grid, block) = params.launch_dims();
        self.ctx.bind()?;
        let mut args: [*mut c_void; 1] = [(&mut params as *mut LowRankMergeParams).cast()];
        // SAFETY: the function belongs to a module loaded in this context and
        // takes one parameter, OffloadLowRankMergeParams by value, whose
        // layout LowRankMergeParams mirrors (checked in offload-kernels);
        // every region the kernel touches is mapped and aligned (checked
        // above) and the trait makes callers keep it mapped until the
        // queued kernel has run; the stream is live (Arc).
        unsafe {
            result::launch_kernel(
                kernels.function(spec.dtype()),
                grid,
                block,
                s.raw,
                &mut args,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use offload_kernels::{Adapter, Factor};

    #[test]
    fn regions_cover_the_row_slice_and_every_factor() {
        let up = vec![0u8; 30 * 4 * 2];
        let down = vec![0u8; 4 * 70 * 4];
        let adapters = [Adapter {
            scale: 0.5,
            delta: Delta::LowRank {
                up: Factor::new(&up, Dtype::BF16, 30, 4),
                down: Factor::new(&down, Dtype::F32, 4, 70),
            },
        }];
        let spec = MergeSpec::new(Dtype::F16, &[100, 70], Some(10..40), &adapters).unwrap();
        let r = merge_regions(
            &spec,
            DevicePtr(0x10000),
            &[(DevicePtr(0x20000), DevicePtr(0x30000))],
        )
        .unwrap();
        assert_eq!(
            r,
            vec![
                Region {
                    addr: DevicePtr(0x10000 + 10 * 70 * 2),
                    len: 30 * 70 * 2,
                    align: 2
                },
                Region {
                    addr: DevicePtr(0x20000),
                    len: 30 * 4 * 2,
                    align: 2
                },
                Region {
                    addr: DevicePtr(0x30000),
                    len: 4 * 70 * 4,
                    align: 4
                },
            ]
        );
        assert!(merge_regions(&spec, DevicePtr(0), &[]).is_err());
    }
}
