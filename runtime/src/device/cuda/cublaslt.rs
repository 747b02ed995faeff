//! [`Kernel::Matmul`](crate::device::Kernel::Matmul) through cuBLASLt, with
//! the algorithm chosen once per shape ([`MatmulLibrary::Lt`]).
//!
//! `cublasGemmEx` chooses an algorithm at every call (a lookup in cuBLAS's
//! heuristics cache, the heuristic itself on a miss). On the small products
//! of the benchmark's layers (16 tokens) an H200 run measured 11–15 µs of
//! the queueing thread's time a product, where a plain kernel launch cost
//! it about 3 µs, and at the default preset that queueing, not the GPU,
//! bounds a pass. How much of it is the choice has not been measured
//! (RAFT found it about half of a small product's host cost). cuBLASLt
//! separates choosing from running: a plan describes a
//! shape (operation, the three matrix layouts) and asks the heuristic once,
//! and each later product of that shape is one `cublasLtMatmul` with the
//! kept algorithm.
//!
//! The product is the same as [`super::cublas`]'s `cublasGemmEx` call
//! (same [`GemmArgs`], `CUBLAS_COMPUTE_32F`, f32 scale, f32 output, C = D),
//! so results stay within the same bound of the CPU's; cuBLASLt may pick
//! another kernel than `cublasGemmEx`, so they agree to a rounding, not bit
//! for bit. A shape for which the heuristic offers no algorithm goes to
//! `cublasGemmEx` (and is remembered, so it is asked once).
//!
//! Layered as cudarc is: the raw calls are `cudarc::cublaslt::sys`; this
//! module checks their statuses and owns the descriptors.
//!
//! [`MatmulLibrary::Lt`]: super::MatmulLibrary::Lt
//! [`GemmArgs`]: super::cublas::GemmArgs

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

use cudarc::cublaslt::sys as lt;
use offload_kernels::Dtype;

use super::cublas::{create_guarded, status_error, GemmArgs};
use crate::error::{Error, Result};

static CUBLASLT_PRESENT: OnceLock<bool> = OnceLock::new();

/// Whether a cuBLASLt library can be loaded; asked once per process.
pub fn cublaslt_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    *CUBLASLT_PRESENT.get_or_init(|| unsafe { lt::is_culib_present() })
}

/// The library names cudarc tries for cuBLASLt, in order
/// (`libcublasLt.so.13` is the CUDA 13 toolkit's).
pub fn library_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("cublasLt")
}

/// The most workspace an algorithm may ask for: what cuBLAS gives itself by
/// default (32 MiB from compute capability 9.0, 4 MiB before), so that the
/// heuristic has the choice `cublasGemmEx`'s has. Only what the chosen
/// algorithms need is allocated.
pub fn max_workspace(cc: (u32, u32)) -> usize {
    if cc.0 >= 9 {
        32 << 20
    } else {
        4 << 20
    }
}

/// `Ok` for `CUBLAS_STATUS_SUCCESS`, else an error naming the call and status.
fn check(call: &'static str, st: lt::cublasStatus_t) -> Result<()> {
    if st == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: only reached after the library was found present and a call
    // into it returned; cublasLtGetStatusName returns a static string or null.
    let p = unsafe { lt::cublasLtGetStatusName(st) };
    // SAFETY: null or a static NUL-terminated string (just above).
    Err(unsafe { status_error(call, st as i32, p) })
}

fn data_type(d: Dtype) -> lt::cudaDataType {
    match d {
        Dtype::F32 => lt::cudaDataType::CUDA_R_32F,
        Dtype::F16 => lt::cudaDataType::CUDA_R_16F,
        Dtype::BF16 => lt::cudaDataType::CUDA_R_16BF,
    }
}

/// The largest power of two up to 256 that divides `addr`: the alignment
/// cuBLASLt's heuristic is told an operand has (it assumes 256 bytes
/// unless told less, and may choose an algorithm that needs it).
pub(super) fn alignment(addr: u64) -> u32 {
    1u32 << addr.trailing_zeros().min(8)
}

/// What a plan is kept under: the product's arguments, operand types and
/// operand alignments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct PlanKey {
    pub(super) args: GemmArgs,
    /// Type of A and B.
    pub(super) ab_type: Dtype,
    /// Type of C (and D).
    pub(super) c_type: Dtype,
    /// [`alignment`] of A, B and C (also D's), in bytes.
    pub(super) align: [u32; 3],
}

/// A shape's descriptors and the algorithm the heuristic chose for it.
pub(super) struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    a: lt::cublasLtMatrixLayout_t,
    b: lt::cublasLtMatrixLayout_t,
    /// C's layout, also D's (the product is written in place of C).
    c: lt::cublasLtMatrixLayout_t,
    algo: lt::cublasLtMatmulAlgo_t,
    /// Bytes of workspace the algorithm needs.
    pub(super) workspace: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by this plan (null ones were
        // never made) and is destroyed once; no call uses them after the
        // plan is gone (plans live in the Lt state, dropped only after the
        // device has synchronised its context).
        unsafe {
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

impl Plan {
    /// Queue `C = alpha · op(A) · op(B) + beta · C` for this plan's shape, with
    /// the handle of the [`Lt`] that made it.
    ///
    /// # Safety
    /// `s` is a live stream of the device's context, which is current; the
    /// matrices at `a`, `b`, `c` are those the plan's key describes, valid
    /// until the product has run, C overlapping neither input and
    /// initialised unless `beta` is 0; `workspace` is device memory of at
    /// least `self.workspace` bytes (or 0 when that is 0) used by this
    /// stream alone, in order.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(
        &self,
        handle: LtHandle,
        a: u64,
        b: u64,
        c: u64,
        alpha: f32,
        beta: f32,
        workspace: u64,
        s: lt::cudaStream_t,
    ) -> Result<()> {
        // SAFETY: alpha and beta are f32 host values (the default host
        // pointer mode, f32 scale type) living for the call; the plan's
        // descriptors and the handle are live; C doubles as D with the same layout, which
        // cuBLASLt allows; the rest is the caller's contract.
        check("cublasLtMatmul", unsafe {
            lt::cublasLtMatmul(
                handle.0,
                self.desc,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                self.a,
                b as *const c_void,
                self.b,
                (&beta as *const f32).cast(),
                c as *const c_void,
                self.c,
                c as *mut c_void,
                self.c,
                &self.algo,
                workspace as *mut c_void,
                self.workspace,
                s,
            )
        })
    }
}

/// Products queued by a device, by library ([`super::CudaDevice::matmul_launches`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulLaunches {
    /// Products queued with `cublasGemmEx`.
    pub gemm_ex: u64,
    /// Products queued with `cublasLtMatmul`.
    pub lt: u64,
    /// Shapes cuBLASLt's heuristic was asked about (once each).
    pub lt_plans: u64,
    /// Of those, shapes it offered no algorithm for (their products go to
    /// `cublasGemmEx`).
    pub lt_no_algorithm: u64,
}

/// A cuBLASLt handle borrowed from its [`Lt`] for one call.
#[derive(Clone, Copy)]
pub(super) struct LtHandle(lt::cublasLtHandle_t);

/// A device's cuBLASLt state: the handle, the preference the heuristic is
/// asked with, and the plans made so far.
pub(super) struct Lt {
    handle: lt::cublasLtHandle_t,
    pref: lt::cublasLtMatmulPreference_t,
    /// `None`: the heuristic offered no algorithm for the shape.
    plans: HashMap<PlanKey, Option<Plan>>,
    library: Option<PathBuf>,
}

// SAFETY: the handle, preference and descriptors are cuBLASLt objects usable
// from any thread; the device keeps `Lt` inside its cuBLAS state, behind a
// mutex, so one thread at a time uses them.
unsafe impl Send for Lt {}

impl Lt {
    /// Create the handle and a preference allowing `max_workspace` bytes.
    /// The device's context must be current on the calling thread.
    pub(super) fn new(max_workspace: usize) -> Result<Lt> {
        if !cublaslt_present() {
            return Err(Error::Unsupported(
                "matrix products through cuBLASLt (OFFLOAD_MATMUL=lt) without the cuBLASLt library: neither libcublasLt.so.13 nor another of cudarc's names for it could be loaded; unset OFFLOAD_MATMUL for cublasGemmEx",
            ));
        }
        let handle = create_guarded("cuBLASLt", || {
            let mut h: lt::cublasLtHandle_t = std::ptr::null_mut();
            // SAFETY: the library is present (checked above); out-pointer to a local.
            check("cublasLtCreate", unsafe { lt::cublasLtCreate(&mut h) })?;
            Ok(h)
        })?;
        // Owned from here, so an error below destroys the handle.
        let mut me = Lt {
            handle,
            pref: std::ptr::null_mut(),
            plans: HashMap::new(),
            library: super::nvrtc::loaded_library("libcublasLt.so"),
        };
        // SAFETY: out-pointer to a field; the library is loaded.
        check("cublasLtMatmulPreferenceCreate", unsafe {
            lt::cublasLtMatmulPreferenceCreate(&mut me.pref)
        })?;
        let bytes = max_workspace as u64;
        // SAFETY: the attribute is a uint64_t, passed as a pointer to a local
        // u64 with its size; the preference is live.
        check("cublasLtMatmulPreferenceSetAttribute", unsafe {
            lt::cublasLtMatmulPreferenceSetAttribute(
                me.pref,
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        })?;
        Ok(me)
    }

    /// The handle, for [`Plan::run`].
    pub(super) fn handle(&self) -> LtHandle {
        LtHandle(self.handle)
    }

    /// The loaded cuBLASLt library's path, if it could be read.
    pub(super) fn library(&self) -> Option<&PathBuf> {
        self.library.as_ref()
    }

    /// The plan for `key`, made (and the heuristic asked) at the first
    /// product of that shape; `None` when the heuristic offers no
    /// algorithm. `launches` counts the plans made.
    pub(super) fn plan(
        &mut self,
        key: PlanKey,
        launches: &mut MatmulLaunches,
    ) -> Result<Option<&Plan>> {
        let (handle, pref) = (self.handle, self.pref);
        let plan = match self.plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let plan = Self::make_plan(handle, pref, key)?;
                launches.lt_plans += 1;
                if plan.is_none() {
                    launches.lt_no_algorithm += 1;
                }
                v.insert(plan)
            }
        };
        Ok(plan.as_ref())
    }

    /// Describe `key`'s product and ask the heuristic of `handle`, with the
    /// preference `pref` (the Lt state's, its lock held), for an algorithm.
    fn make_plan(
        handle: lt::cublasLtHandle_t,
        pref: lt::cublasLtMatmulPreference_t,
        key: PlanKey,
    ) -> Result<Option<Plan>> {
        let g = key.args;
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            algo: lt::cublasLtMatmulAlgo_t { data: [0; 8] },
            workspace: 0,
        };
        // SAFETY: out-pointer to a field of a plan that destroys it on drop.
        check("cublasLtMatmulDescCreate", unsafe {
            lt::cublasLtMatmulDescCreate(
                &mut plan.desc,
                lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt::cudaDataType::CUDA_R_32F,
            )
        })?;
        for (attr, t) in [
            (
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                g.transa,
            ),
            (
                lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                g.transb,
            ),
        ] {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (an int32_t attribute).
            let op: i32 = i32::from(t);
            // SAFETY: the attribute is an int32_t, passed as a pointer to a
            // local i32 with its size; the descriptor is live.
            check("cublasLtMatmulDescSetAttribute", unsafe {
                lt::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    attr,
                    (&op as *const i32).cast(),
                    std::mem::size_of::<i32>(),
                )
            })?;
        }
        // Stored shapes (column-major), before op(): A is m × k (k × m when
        // transposed), B k × n (n × k), C m × n.
        let (m, n, k) = (g.m as u64, g.n as u64, g.k as u64);
        let (ar, ac) = if g.transa { (k, m) } else { (m, k) };
        let (br, bc) = if g.transb { (n, k) } else { (k, n) };
        for (slot, ty, rows, cols, ld) in [
            (&mut plan.a, key.ab_type, ar, ac, g.lda),
            (&mut plan.b, key.ab_type, br, bc, g.ldb),
            (&mut plan.c, key.c_type, m, n, g.ldc),
        ] {
            // SAFETY: out-pointer to a field of the plan, which destroys it.
            check("cublasLtMatrixLayoutCreate", unsafe {
                lt::cublasLtMatrixLayoutCreate(slot, data_type(ty), rows, cols, i64::from(ld))
            })?;
        }
        // Only algorithms that work at the operands' alignments (the
        // preference is the Lt state's, and its lock is held).
        let [a, b, c] = key.align;
        for (attr, bytes) in [
            (
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                a,
            ),
            (
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                b,
            ),
            (
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                c,
            ),
            (
                lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                c,
            ),
        ] {
            // SAFETY: the attribute is a uint32_t, passed as a pointer to a
            // local u32 with its size; the preference is live.
            check("cublasLtMatmulPreferenceSetAttribute", unsafe {
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    attr,
                    (&bytes as *const u32).cast(),
                    std::mem::size_of::<u32>(),
                )
            })?;
        }
        // SAFETY: a zeroed result is a valid value of this plain C struct.
        let mut found: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut count: i32 = 0;
        // SAFETY: every descriptor is live; room for the one result asked
        // for; out-pointers to locals.
        let st = unsafe {
            lt::cublasLtMatmulAlgoGetHeuristic(
                handle, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &mut found, &mut count,
            )
        };
        if st == lt::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
            return Ok(None);
        }
        check("cublasLtMatmulAlgoGetHeuristic", st)?;
        if count < 1 || found.state != lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Ok(None);
        }
        plan.algo = found.algo;
        plan.workspace = found.workspaceSize;
        Ok(Some(plan))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // Descriptors before the handle.
        self.plans.clear();
        // SAFETY: created in `new` and destroyed once; the device drops its
        // cuBLAS state only after synchronising the context, so no product
        // queued with them is pending.
        unsafe {
            if !self.pref.is_null() {
                let _ = lt::cublasLtMatmulPreferenceDestroy(self.pref);
            }
            let _ = lt::cublasLtDestroy(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_the_cuda_13_soname() {
        let c = library_candidates();
        assert!(c.iter().any(|n| n == "libcublasLt.so.13"), "{c:?}");
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0), 256);
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
        assert_eq!(alignment(4), 4);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(7), 1);
    }

    #[test]
    fn workspace_is_cublas_own_default() {
        assert_eq!(max_workspace((9, 0)), 32 << 20);
        assert_eq!(max_workspace((8, 9)), 4 << 20);
    }
}
