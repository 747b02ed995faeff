//! [`Kernel::Matmul`] on CUDA: `Y = X · Wᵀ` through cuBLAS; and
//! [`CudaDevice::gemm_accumulate`], `W += s · B · A` with one cuBLAS call
//! (the per-adapter baseline `offload bench merge` compares the stacked
//! merge kernel with).
//!
//! One `cublasGemmEx` per product, f32 accumulation (`CUBLAS_COMPUTE_32F`),
//! f32 output. The handle is the device's, created at the first product
//! (with the library loaded dynamically by cudarc, after checking that it
//! loads: cudarc panics otherwise) and pointed at the caller's stream before
//! every call, under a lock held from `cublasSetStream` until the product
//! is queued. With [`MatmulLibrary::Lt`] the same product goes through
//! cuBLASLt instead, one algorithm chosen per shape ([`super::cublaslt`]).
//!
//! cuBLAS multiplies A and B of one type only, so an f16 or bf16 weight is
//! multiplied with f32 activations rounded to its type (to nearest, ties
//! to even) by a small NVRTC kernel into a per-stream scratch buffer (a
//! second launch per product); activations already of the weight's type
//! (`x_dtype`) go to cuBLAS as they are, in one launch. The products are
//! exact in f32 and summed in f32. Compared with the CPU's
//! all-f32 [`offload_kernels::matmul_xwt`], each output then carries an
//! extra error of at most one rounding of X to the weight's type:
//! `2⁻¹¹ · Σ|x·w|` for f16 (plus `2⁻²⁴ · Σ|w|` for activations in f16's
//! subnormal range), `2⁻⁸ · Σ|x·w|` for bf16. An f32 weight is multiplied
//! as is, in full f32. Activations beyond f16's range (65504) become
//! infinite with an f16 weight.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::sys as cb;
use cudarc::driver::sys;
use offload_kernels::Dtype;

use super::cublaslt::{self, Lt, MatmulLaunches, PlanKey};
use super::handles::Context;
use super::memory::MemState;
use super::nvrtc::{self, Module};
use super::{lock, result, CudaDevice, MatmulLibrary};
use crate::device::{DevicePtr, Kernel, StreamId};
use crate::error::{Error, Result};

/// CUDA C source of the f32 → f16/bf16 conversion kernels.
pub const CONVERT_SRC: &str = include_str!("convert.cu");
const CONVERT_F16: &str = "offload_f32_to_f16";
const CONVERT_BF16: &str = "offload_f32_to_bf16";
const CONVERT_THREADS: u32 = 256;
const CONVERT_MAX_BLOCKS: u64 = 4096;
/// Smallest scratch buffer allocated (bytes).
const MIN_SCRATCH: usize = 64 << 10;

static CUBLAS_PRESENT: OnceLock<bool> = OnceLock::new();

/// Whether a cuBLAS library can be loaded; asked once per process.
pub fn cublas_present() -> bool {
    // SAFETY: is_culib_present only tries to dlopen the candidate library names.
    *CUBLAS_PRESENT.get_or_init(|| unsafe { cb::is_culib_present() })
}

/// The library names cudarc tries for cuBLAS, in order (`libcublas.so.13`
/// is the CUDA 13 toolkit's).
pub fn library_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("cublas")
}

/// The arguments of the one `cublasGemmEx` call that computes the row-major
/// `Y[tokens, n] = X[tokens, k] · W[n, k]ᵀ`, with A = W, B = X, C = Y.
///
/// cuBLAS is column-major: a row-major `[r, c]` matrix with row stride `c`
/// is, read column-major, the `c × r` matrix with leading dimension `c`,
/// its transpose. So the row-major Y is the column-major `n × tokens`
/// matrix `Yᵀ = (X · Wᵀ)ᵀ = W · Xᵀ`, and cuBLAS sees
/// - W's buffer as the `k × n` matrix `Wᵀ` (lda = k): `op(A) = Aᵀ = W`, so `transa = T`;
/// - X's buffer as the `k × tokens` matrix `Xᵀ` (ldb = k): `op(B) = B`, so `transb = N`;
/// - Y's buffer as the `n × tokens` matrix C (ldc = n);
///
/// and computes C (`m × n'` = `n × tokens`) as `op(A) · op(B)` over an inner
/// dimension of `k`. "TN" is also the layout cuBLAS's tensor-core kernels prefer.
///
/// The field documentation gives the values for `Y = X · Wᵀ` ([`gemm_args`]);
/// [`accumulate_args`] fills the same fields for `W += s · B · A`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmArgs {
    /// `op(A)` is `Aᵀ` (true) or `A`.
    pub transa: bool,
    /// `op(B)` is `Bᵀ` (true) or `B`.
    pub transb: bool,
    /// Rows of `op(A)` and C: `n`.
    pub m: i32,
    /// Columns of `op(B)` and C: `tokens`.
    pub n: i32,
    /// Inner dimension: `k`.
    pub k: i32,
    /// Leading dimension of A (W): `k`.
    pub lda: i32,
    /// Leading dimension of B (X): `k`.
    pub ldb: i32,
    /// Leading dimension of C (Y): `n`.
    pub ldc: i32,
}

/// `v` as a cuBLAS `int` in `1..=2³¹-1`, or an error naming `what` and `kernel`.
fn cublas_int(kernel: &'static str, v: usize, what: &str) -> Result<i32> {
    i32::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Kernel {
            kernel,
            message: format!("{what} = {v} must be in 1..=2^31-1 for cuBLAS"),
        })
}

/// The arguments of the one `cublasGemmEx` call that computes, in place, the
/// row-major `W[rows, cols] += s · B[rows, rank] · A[rank, cols]`, with
/// A = A's buffer (the LoRA "down" factor), B = B's buffer (the "up"
/// factor), C = W.
///
/// Read column-major (see [`GemmArgs`]), W's buffer is the `cols × rows`
/// matrix `Wᵀ` (ldc = cols), and `Wᵀ += s · (B · A)ᵀ = s · Aᵀ · Bᵀ`, where
/// A's buffer read column-major is `Aᵀ` (`cols × rank`, lda = cols) and B's
/// is `Bᵀ` (`rank × rows`, ldb = rank). So neither operand is transposed
/// ("NN"), `m = cols`, `n = rows`, `k = rank`. Every dimension must be
/// non-zero and fit cuBLAS's 32-bit `int`.
pub fn accumulate_args(rows: usize, cols: usize, rank: usize) -> Result<GemmArgs> {
    let k = "gemm_accumulate";
    let (rows, cols, rank) = (
        cublas_int(k, rows, "rows")?,
        cublas_int(k, cols, "cols")?,
        cublas_int(k, rank, "rank")?,
    );
    Ok(GemmArgs {
        transa: false,
        transb: false,
        m: cols,
        n: rows,
        k: rank,
        lda: cols,
        ldb: rank,
        ldc: cols,
    })
}

/// [`GemmArgs`] for `Y = X · Wᵀ`; every dimension must be non-zero and fit
/// cuBLAS's 32-bit `int`.
pub fn gemm_args(tokens: usize, n: usize, k: usize) -> Result<GemmArgs> {
    let int = |v: usize, what: &str| cublas_int("matmul", v, what);
    let (t, n, k) = (int(tokens, "tokens")?, int(n, "n")?, int(k, "k")?);
    Ok(GemmArgs {
        transa: true,
        transb: false,
        m: n,
        n: t,
        k,
        lda: k,
        ldb: k,
        ldc: n,
    })
}

fn cuda_type(d: Dtype) -> cb::cudaDataType {
    match d {
        Dtype::F32 => cb::cudaDataType::CUDA_R_32F,
        Dtype::F16 => cb::cudaDataType::CUDA_R_16F,
        Dtype::BF16 => cb::cudaDataType::CUDA_R_16BF,
    }
}

fn op(t: bool) -> cb::cublasOperation_t {
    if t {
        cb::cublasOperation_t::CUBLAS_OP_T
    } else {
        cb::cublasOperation_t::CUBLAS_OP_N
    }
}

fn kernel_error(message: String) -> Error {
    Error::Kernel {
        kernel: "matmul",
        message,
    }
}

/// The error for a cuBLAS or cuBLASLt `call` that returned status `code`,
/// whose name the library gave as `name`.
///
/// # Safety
/// `name` is null or points at a NUL-terminated string that lives for the
/// call (the libraries' status names are static).
pub(super) unsafe fn status_error(call: &str, code: i32, name: *const c_char) -> Error {
    let name = if name.is_null() {
        "unknown status".to_string()
    } else {
        // SAFETY: non-null and NUL-terminated (the caller's contract).
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    };
    kernel_error(format!("{call} failed with {name} ({code})"))
}

/// `create()`, the first call into a library cudarc loads on first use
/// (and panics on when a symbol is missing), with such a panic turned into
/// an error naming `library`.
pub(super) fn create_guarded<H>(library: &str, create: impl FnOnce() -> Result<H>) -> Result<H> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(create)).unwrap_or_else(|p| {
        Err(kernel_error(format!(
            "loading {library} panicked: {}",
            nvrtc::panic_message(p.as_ref())
        )))
    })
}

/// `Ok` for `CUBLAS_STATUS_SUCCESS`, else an error naming the call and status.
fn check(call: &'static str, st: cb::cublasStatus_t) -> Result<()> {
    if st == cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: only reached after the library was found present and a call
    // into it returned; cublasGetStatusName returns a static string or null.
    let p = unsafe { cb::cublasGetStatusName(st) };
    // SAFETY: null or a static NUL-terminated string (just above).
    Err(unsafe { status_error(call, st as i32, p) })
}

/// The conversion kernels, loaded into the device's context.
struct Convert {
    _module: Module,
    to_f16: sys::CUfunction,
    to_bf16: sys::CUfunction,
}

/// A stream's scratch buffer for converted activations.
#[derive(Default)]
struct Scratch {
    ptr: u64,
    len: usize,
    /// Smaller buffers it replaced, possibly still read by queued work on
    /// the stream: freed with the stream.
    retired: Vec<u64>,
}

impl Scratch {
    fn buffers(&self) -> impl Iterator<Item = u64> + '_ {
        self.retired
            .iter()
            .copied()
            .chain((self.ptr != 0).then_some(self.ptr))
    }
}

/// A device's cuBLAS state: the handle, the conversion kernels, the scratch buffers.
pub(super) struct Blas {
    handle: cb::cublasHandle_t,
    ctx: Arc<Context>,
    /// The conversion kernels, or why NVRTC could not build them (f16 and
    /// bf16 weights then fail; f32 ones still work).
    convert: std::result::Result<Convert, String>,
    scratch: HashMap<u64, Scratch>,
    library: Option<PathBuf>,
    /// cuBLASLt, when the products go through it ([`MatmulLibrary::Lt`]).
    lt: Option<Lt>,
    /// Per stream, the cuBLASLt algorithms' workspace, and cuBLAS's own
    /// while a graph is captured (see [`Blas::gemm`]).
    workspace: HashMap<u64, Scratch>,
    /// The workspace cuBLAS gets while a graph is captured, in bytes
    /// ([`cublaslt::max_workspace`]).
    capture_workspace: usize,
    /// Products queued, by library.
    launches: MatmulLaunches,
}

// SAFETY: the handle, functions and buffers are driver/cuBLAS handles usable
// from any thread with the context bound; the device keeps `Blas` behind a
// mutex, so one thread at a time uses them.
unsafe impl Send for Blas {}

impl Blas {
    /// Create the handle in `ctx` (and cuBLASLt's, for
    /// [`MatmulLibrary::Lt`]) and build the conversion kernels for `cc`.
    pub(super) fn new(ctx: &Arc<Context>, cc: (u32, u32), library: MatmulLibrary) -> Result<Self> {
        if !cublas_present() {
            return Err(Error::Unsupported(
                "the matmul kernel on CUDA without the cuBLAS library (libcublas.so.13 could not be loaded)",
            ));
        }
        ctx.bind()?;
        let handle = create_guarded("cuBLAS", || {
            let mut h: cb::cublasHandle_t = std::ptr::null_mut();
            // SAFETY: the library is present (checked above); out-pointer to
            // a local; the device's context is current (bound above).
            check("cublasCreate", unsafe { cb::cublasCreate_v2(&mut h) })?;
            Ok(h)
        })?;
        let lt = match library {
            MatmulLibrary::GemmEx => None,
            MatmulLibrary::Lt => match Lt::new(cublaslt::max_workspace(cc)) {
                Ok(lt) => Some(lt),
                Err(e) => {
                    // SAFETY: created just above, destroyed once, nothing queued with it.
                    let _ = unsafe { cb::cublasDestroy_v2(handle) };
                    return Err(e);
                }
            },
        };
        let convert = nvrtc::compile("offload_convert.cu", CONVERT_SRC, cc)
            .map_err(|e| e.to_string())
            .and_then(|image| {
                let load = || -> Result<Convert> {
                    let module = Module::load(ctx, &image)?;
                    Ok(Convert {
                        to_f16: module.function(CONVERT_F16)?,
                        to_bf16: module.function(CONVERT_BF16)?,
                        _module: module,
                    })
                };
                load().map_err(|e| e.to_string())
            });
        Ok(Blas {
            handle,
            ctx: ctx.clone(),
            convert,
            scratch: HashMap::new(),
            library: nvrtc::loaded_library("libcublas.so"),
            lt,
            workspace: HashMap::new(),
            capture_workspace: cublaslt::max_workspace(cc),
            launches: MatmulLaunches::default(),
        })
    }

    /// The loaded cuBLASLt library's path, when the products go through it
    /// (`Some(None)` if its path could not be read).
    pub(super) fn lt_library(&self) -> Option<Option<&PathBuf>> {
        self.lt.as_ref().map(Lt::library)
    }

    /// The loaded cuBLAS library's path, if it could be read.
    pub(super) fn library(&self) -> Option<&PathBuf> {
        self.library.as_ref()
    }

    /// Why f16/bf16 weights cannot be multiplied, if they cannot.
    pub(super) fn convert_error(&self) -> Option<&str> {
        self.convert.as_ref().err().map(String::as_str)
    }

    /// A scratch buffer of at least `len` bytes for `stream`; the caller
    /// queues its use on that stream before letting go of the lock.
    fn scratch(&mut self, stream: u64, len: usize) -> Result<u64> {
        grow(&mut self.scratch, stream, len)
    }

    /// Make `stream`'s workspace as large as cuBLAS gets while a graph is
    /// captured on it (see [`Blas::gemm`]), so that the capture allocates nothing.
    pub(super) fn reserve_capture_workspace(&mut self, stream: u64) -> Result<()> {
        grow(&mut self.workspace, stream, self.capture_workspace).map(|_| ())
    }

    /// Take the scratch and workspace buffers of a stream being destroyed;
    /// the caller frees them with [`free_buffers`] once the stream has
    /// synchronised.
    pub(super) fn take_stream(&mut self, stream: u64) -> Vec<u64> {
        [self.scratch.remove(&stream), self.workspace.remove(&stream)]
            .into_iter()
            .flatten()
            .flat_map(|s| s.buffers().collect::<Vec<_>>())
            .collect()
    }

    /// Products queued so far, by library.
    pub(super) fn launches(&self) -> MatmulLaunches {
        self.launches
    }

    /// Queue the rounding of `count` f32 values at `src` into `dtype` at `dst`.
    ///
    /// # Safety
    /// `s` is a live stream of the context; `src` holds `count` f32 and
    /// `dst` `count` elements of `dtype`, both valid until the kernel has run.
    unsafe fn convert(
        &self,
        src: u64,
        dst: u64,
        count: usize,
        dtype: Dtype,
        s: sys::CUstream,
    ) -> Result<()> {
        let c = self.convert.as_ref().map_err(|e| {
            kernel_error(format!(
                "an {dtype} weight needs the activation conversion kernel, which NVRTC could not build: {e}"
            ))
        })?;
        let f = match dtype {
            Dtype::F16 => c.to_f16,
            Dtype::BF16 => c.to_bf16,
            Dtype::F32 => return Err(kernel_error("no conversion to f32".into())),
        };
        let mut x = src;
        let mut y = dst;
        let mut n = count as u64;
        let blocks = n
            .div_ceil(u64::from(CONVERT_THREADS))
            .clamp(1, CONVERT_MAX_BLOCKS) as u32;
        let mut params: [*mut c_void; 3] = [
            (&mut x as *mut u64).cast(),
            (&mut y as *mut u64).cast(),
            (&mut n as *mut u64).cast(),
        ];
        // SAFETY: `f` belongs to a module loaded in this context; the three
        // parameters are (const float*, half/bf16*, unsigned long long), each
        // passed as a pointer to a local u64 of the same size and layout;
        // the buffers are the caller's contract.
        unsafe { result::launch_kernel(f, (blocks, 1, 1), (CONVERT_THREADS, 1, 1), s, &mut params) }
    }

    /// Queue `C = op(A) · op(B)` (see [`GemmArgs`]) with f32 accumulation
    /// and an f32 C: through cuBLASLt with the shape's kept algorithm when
    /// the products go through it and the heuristic offered one, else with
    /// `cublasGemmEx` (with a workspace of ours bound when `capturing`: the
    /// stream is being captured into a graph).
    ///
    /// # Safety
    /// `s` is the live stream whose handle is `stream`, of the context,
    /// which is current; `a`, `b`, `c` hold the matrices `args` describes,
    /// of types `ab_type` (A and B) and f32 (C), valid until the product
    /// has run; C overlaps neither input.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &mut self,
        args: GemmArgs,
        a: u64,
        b: u64,
        ab_type: Dtype,
        c: u64,
        stream: u64,
        s: sys::CUstream,
        capturing: bool,
    ) -> Result<()> {
        let mats = GemmMatrices {
            a,
            b,
            ab_type,
            c,
            c_type: Dtype::F32,
        };
        let Blas {
            lt,
            workspace,
            launches,
            ..
        } = self;
        if let Some(lt) = lt.as_mut() {
            let key = PlanKey {
                args,
                ab_type,
                c_type: Dtype::F32,
                align: [a, b, c].map(cublaslt::alignment),
            };
            let handle = lt.handle();
            if let Some(plan) = lt.plan(key, launches)? {
                let ws = match plan.workspace {
                    0 => 0,
                    len => grow(workspace, stream, len)?,
                };
                // SAFETY: the caller's contract; the workspace holds at least
                // the plan's bytes and belongs to this stream, whose work is
                // ordered; with beta = 0, C is only written.
                unsafe { plan.run(handle, a, b, c, 1.0, 0.0, ws, s.cast())? };
                launches.lt += 1;
                return Ok(());
            }
        }
        // While a graph is captured, cuBLAS works in a buffer of ours that
        // lives as long as the stream (as the graph may), not in one it
        // would allocate for each graph.
        let ws = match capturing {
            true => {
                let len = self.capture_workspace;
                Some((grow(&mut self.workspace, stream, len)?, len))
            }
            false => None,
        };
        // SAFETY: the caller's contract; with beta = 0, C is only written;
        // the workspace (if any) is this stream's and holds `len` bytes.
        unsafe { self.gemm_ex(args, mats, 1.0, 0.0, s, ws)? };
        self.launches.gemm_ex += 1;
        Ok(())
    }

    /// Queue `C = alpha · op(A) · op(B) + beta · C` (see [`GemmArgs`]) with
    /// f32 accumulation (`CUBLAS_COMPUTE_32F`), rounded once to C's type.
    ///
    /// # Safety
    /// `s` is a live stream of the context; the matrices of `m` are those
    /// `args` describes, of the types `m` names (a combination cuBLAS
    /// accepts for `CUBLAS_COMPUTE_32F`, see [`accumulate_types_supported`]),
    /// valid until the product has run; C overlaps neither input, and C is
    /// initialised unless `beta` is 0.
    unsafe fn gemm_ex(
        &self,
        args: GemmArgs,
        m: GemmMatrices,
        alpha: f32,
        beta: f32,
        s: sys::CUstream,
        workspace: Option<(u64, usize)>,
    ) -> Result<()> {
        let GemmMatrices {
            a,
            b,
            ab_type,
            c,
            c_type,
        } = m;
        let t = cuda_type(ab_type);
        // SAFETY: the handle is live and ours (we hold the device's lock);
        // the stream is live and of the handle's context (the caller).
        check("cublasSetStream", unsafe {
            cb::cublasSetStream_v2(self.handle, s as cb::cudaStream_t)
        })?;
        if let Some((ptr, len)) = workspace {
            // SAFETY: the handle is live and ours (the lock); the buffer is
            // device memory of `len` bytes used by this stream's work alone
            // (the caller), kept until the stream goes. `cublasSetStream`
            // above put the default workspace back, so this binds ours
            // for this product only.
            check("cublasSetWorkspace", unsafe {
                cb::cublasSetWorkspace_v2(self.handle, ptr as *mut c_void, len)
            })?;
        }
        // SAFETY: alpha and beta are f32 host values (pointer mode host,
        // scale type f32 for CUBLAS_COMPUTE_32F) living for the call; the
        // matrices, their types and C's contents are the caller's contract
        // (with beta = 0, C is not read).
        check("cublasGemmEx", unsafe {
            cb::cublasGemmEx(
                self.handle,
                op(args.transa),
                op(args.transb),
                args.m,
                args.n,
                args.k,
                (&alpha as *const f32).cast(),
                a as *const c_void,
                t,
                args.lda,
                b as *const c_void,
                t,
                args.ldb,
                (&beta as *const f32).cast(),
                c as *mut c_void,
                cuda_type(c_type),
                args.ldc,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        })
    }
}

/// The device addresses and types of one product's operands.
#[derive(Clone, Copy, Debug)]
struct GemmMatrices {
    a: u64,
    b: u64,
    /// Type of A and B.
    ab_type: Dtype,
    c: u64,
    c_type: Dtype,
}

/// Whether cuBLAS multiplies factors of `factor_dtype` into a weight of
/// `w_dtype` with `CUBLAS_COMPUTE_32F`: A and B of one type, and C of that
/// type or f32 (f16 · f16 → f16 or f32, bf16 · bf16 → bf16 or f32,
/// f32 · f32 → f32). f32 factors into a 16-bit weight are not accepted.
pub fn accumulate_types_supported(w_dtype: Dtype, factor_dtype: Dtype) -> bool {
    w_dtype == factor_dtype || w_dtype == Dtype::F32
}

/// The buffer of `map` for `stream`, grown to at least `len` bytes (and
/// [`MIN_SCRATCH`]); a smaller one it replaces is kept, as queued work may
/// still use it, until the stream goes ([`Blas::take_stream`]).
fn grow(map: &mut HashMap<u64, Scratch>, stream: u64, len: usize) -> Result<u64> {
    let s = map.entry(stream).or_default();
    if s.len < len {
        let want = len.next_power_of_two().max(MIN_SCRATCH);
        let p = result::mem_alloc(want)?;
        if s.ptr != 0 {
            s.retired.push(s.ptr);
        }
        s.ptr = p;
        s.len = want;
    }
    Ok(s.ptr)
}

/// Free scratch buffers taken with [`Blas::take_stream`].
///
/// # Safety
/// The buffers came from `cuMemAlloc` in the current context, are freed once,
/// and no queued work uses them.
pub(super) unsafe fn free_buffers(buffers: Vec<u64>) {
    for p in buffers {
        // SAFETY: the caller's contract.
        let _ = unsafe { result::mem_free(p) };
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // cuBLASLt's plans and handle first.
        self.lt = None;
        // SAFETY: the device drops its Blas only after synchronising the
        // context, so no product or conversion is queued; the handle is
        // destroyed once and the buffers freed once.
        unsafe {
            let _ = cb::cublasDestroy_v2(self.handle);
            let buffers: Vec<u64> = self
                .scratch
                .drain()
                .chain(self.workspace.drain())
                .flat_map(|(_, s)| s.buffers().collect::<Vec<_>>())
                .collect();
            free_buffers(buffers);
        }
    }
}

/// `W[rows, cols] += scale · up[rows, rank] · down[rank, cols]` in place,
/// all row-major and dense: the operands of
/// [`CudaDevice::gemm_accumulate`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmAccumulate {
    /// Device address of W's first element.
    pub w: DevicePtr,
    /// W's element type.
    pub w_dtype: Dtype,
    /// Rows of W and of `up`.
    pub rows: usize,
    /// Columns of W and of `down`.
    pub cols: usize,
    /// Device address of `up` (B, `[rows, rank]`).
    pub up: DevicePtr,
    /// Device address of `down` (A, `[rank, cols]`).
    pub down: DevicePtr,
    /// Element type of both factors (see [`accumulate_types_supported`]).
    pub factor_dtype: Dtype,
    /// Inner dimension.
    pub rank: usize,
    /// The scale `s` (cuBLAS's alpha); must be finite.
    pub scale: f32,
}

impl GemmAccumulate {
    /// The device regions the product touches, as (address, length,
    /// alignment): W, then `up`, then `down`. Errors on overflow.
    fn regions(&self) -> Result<[(DevicePtr, usize, usize); 3]> {
        let overflow = || Error::Kernel {
            kernel: "gemm_accumulate",
            message: "operand size overflows".into(),
        };
        let bytes = |a: usize, b: usize, d: Dtype| {
            a.checked_mul(b)
                .and_then(|e| e.checked_mul(d.size_in_bytes()))
                .ok_or_else(overflow)
        };
        let (ws, fs) = (
            self.w_dtype.size_in_bytes(),
            self.factor_dtype.size_in_bytes(),
        );
        Ok([
            (self.w, bytes(self.rows, self.cols, self.w_dtype)?, ws),
            (self.up, bytes(self.rows, self.rank, self.factor_dtype)?, fs),
            (
                self.down,
                bytes(self.rank, self.cols, self.factor_dtype)?,
                fs,
            ),
        ])
    }
}

/// Facts about the device's cuBLAS state, for reports.
#[derive(Clone, Debug)]
pub struct BlasInfo {
    /// The cuBLAS library loaded, as mapped in the process.
    pub library: Option<PathBuf>,
    /// The interface that queues the products.
    pub interface: MatmulLibrary,
    /// With [`MatmulLibrary::Lt`], the cuBLASLt library loaded, as mapped
    /// in the process.
    pub lt_library: Option<PathBuf>,
    /// Why f16/bf16 weights cannot be multiplied (NVRTC could not build the
    /// activation conversion), if they cannot.
    pub convert_error: Option<String>,
}

impl CudaDevice {
    /// Create the cuBLAS handle (and build the activation conversion kernels)
    /// now rather than at the first product, and say what was loaded.
    pub fn prepare_matmul(&self) -> Result<BlasInfo> {
        let mut guard = lock(&self.blas);
        let blas = self.blas_in(&mut guard)?;
        Ok(BlasInfo {
            library: blas.library().cloned(),
            interface: self.matmul,
            lt_library: blas.lt_library().flatten().cloned(),
            convert_error: blas.convert_error().map(str::to_string),
        })
    }

    fn blas_in<'a>(&self, slot: &'a mut Option<Blas>) -> Result<&'a mut Blas> {
        if slot.is_none() {
            let cc = self.info.compute_capability.unwrap_or((0, 0));
            *slot = Some(Blas::new(&self.ctx, cc, self.matmul)?);
        }
        Ok(slot.as_mut().expect("set just above"))
    }

    /// The products ([`Kernel::Matmul`]) this device has queued so far, by
    /// cuBLAS interface, and the cuBLASLt plans it made.
    pub fn matmul_launches(&self) -> MatmulLaunches {
        lock(&self.blas)
            .as_ref()
            .map(Blas::launches)
            .unwrap_or_default()
    }

    /// The streams holding matmul buffers (activation scratch or cuBLASLt
    /// workspace), sorted.
    #[cfg(test)]
    pub(super) fn matmul_buffer_streams(&self) -> Vec<u64> {
        let guard = lock(&self.blas);
        let mut v: Vec<u64> = guard
            .as_ref()
            .map(|b| {
                b.scratch
                    .keys()
                    .chain(b.workspace.keys())
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// [`Kernel::Matmul`] on this device (see the module documentation).
    pub(super) fn launch_matmul(&self, kernel: &Kernel, stream: StreamId) -> Result<()> {
        self.check_matmul(kernel, &lock(&self.mem))?;
        self.queue_matmul(kernel, stream, false)
    }

    /// The checks of a [`Kernel::Matmul`] before it is queued: the operand
    /// types, every operand in memory mapped now (`mem`, the device's
    /// table, locked by the caller), alignment, no overlap of Y with an input.
    pub(super) fn check_matmul(&self, kernel: &Kernel, mem: &MemState) -> Result<()> {
        let Kernel::Matmul {
            x, w, w_dtype, y, ..
        } = *kernel
        else {
            return Err(kernel_error(format!(
                "launch_matmul got the {} kernel",
                kernel.name()
            )));
        };
        kernel.check_types()?;
        let regions = kernel.regions()?;
        for &(addr, len) in &regions {
            mem.check_access(addr, len)?;
        }
        let size = w_dtype.size_in_bytes() as u64;
        if x.0 % 4 != 0 || y.0 % 4 != 0 || w.0 % size != 0 {
            return Err(kernel_error(format!(
                "misaligned operand: X at {x} and Y at {y} must be 4-byte aligned, W at {w} {size}-byte aligned"
            )));
        }
        let (xl, wl, yl) = (regions[0].1, regions[1].1, regions[2].1);
        if overlaps(y, yl, x, xl) || overlaps(y, yl, w, wl) {
            return Err(kernel_error("the output overlaps an input".into()));
        }
        Ok(())
    }

    /// Queue a [`Kernel::Matmul`] that [`Self::check_matmul`] passed (with
    /// its operands still mapped) on `stream`; `capturing` while `stream`
    /// is captured into a graph.
    pub(super) fn queue_matmul(
        &self,
        kernel: &Kernel,
        stream: StreamId,
        capturing: bool,
    ) -> Result<()> {
        let Kernel::Matmul {
            x,
            x_dtype,
            tokens,
            w,
            w_dtype,
            n,
            k,
            y,
        } = *kernel
        else {
            return Err(kernel_error(format!(
                "launch_matmul got the {} kernel",
                kernel.name()
            )));
        };
        let s = self.stream(stream)?;
        if tokens == 0 || n == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        if k == 0 {
            // An empty sum: Y = 0, as on the host backend. Y's f32 bytes
            // (`check_matmul` found `regions` in range, so no overflow).
            let yl = tokens * n * 4;
            // SAFETY: the stream is live (Arc) and Y is mapped (checked
            // by `check_matmul`).
            return unsafe { result::memset_d8_async(y.0, 0, yl, s.raw) };
        }
        let args = gemm_args(tokens, n, k)?;
        let mut guard = lock(&self.blas);
        let blas = self.blas_in(&mut guard)?;
        // `destroy_stream` takes the stream out of the table before it takes
        // this lock to collect the stream's scratch: a stream still in the
        // table here has its scratch freed only after this work is queued.
        if !self.streams.contains_key(&stream.0) {
            return Err(Error::UnknownStream(stream));
        }
        let b = match (x_dtype, w_dtype) {
            // X already of W's type (f32 with f32, or 16-bit activations,
            // which check_types above allowed with W of their own type only).
            (Dtype::F32, Dtype::F32) | (Dtype::F16 | Dtype::BF16, _) => x.0,
            (Dtype::F32, Dtype::F16 | Dtype::BF16) => {
                let count = tokens * k;
                let scratch = blas.scratch(stream.0, count * 2)?;
                // SAFETY: the stream is live; X holds `count` f32 (checked
                // mapped above); the scratch holds at least `count` 2-byte
                // elements and is used by this stream alone, in order.
                unsafe { blas.convert(x.0, scratch, count, w_dtype, s.raw)? };
                scratch
            }
        };
        // SAFETY: the stream is live; W, X (or its conversion) and Y are
        // mapped with the sizes `args` implies (checked above); Y overlaps
        // neither input (checked); the trait makes callers keep them mapped
        // until the queued product has run.
        unsafe { blas.gemm(args, w.0, b, w_dtype, y.0, stream.0, s.raw, capturing) }
    }

    /// Queue `W += scale · up · down` ([`GemmAccumulate`]) on `stream` as
    /// one `cublasGemmEx` with alpha = `scale` and beta = 1 (arguments from
    /// [`accumulate_args`]), accumulating in f32 (`CUBLAS_COMPUTE_32F`) and
    /// rounding once to W's dtype, like the merge kernel does for one
    /// adapter.
    ///
    /// This is what a user without a merge kernel runs, one call per
    /// adapter: `offload bench merge` measures it against the stacked merge
    /// ([`CudaDevice::merge_lowrank`]). Rows and columns are whole (no row
    /// slice), and cuBLAS may pick a different summation order than the
    /// merge kernel, so results agree to a rounding, not bit for bit.
    ///
    /// Checks, before queueing anything, that the type pair is one cuBLAS
    /// takes ([`accumulate_types_supported`]), that every dimension fits
    /// cuBLAS's `int`, that the scale is finite, that each operand lies in
    /// mapped memory of this device and is aligned to its element size, and
    /// that W overlaps neither factor. As with [`Device::launch`], the
    /// caller keeps the operands mapped until the queued product has run.
    /// The cuBLAS handle is created at the first product (see
    /// [`Self::prepare_matmul`]).
    ///
    /// [`Device::launch`]: crate::device::Device::launch
    pub fn gemm_accumulate(&self, op: &GemmAccumulate, stream: StreamId) -> Result<()> {
        let err = |message: String| Error::Kernel {
            kernel: "gemm_accumulate",
            message,
        };
        if !accumulate_types_supported(op.w_dtype, op.factor_dtype) {
            return Err(err(format!(
                "cuBLAS does not multiply {} factors into an {} weight",
                op.factor_dtype, op.w_dtype
            )));
        }
        if !op.scale.is_finite() {
            return Err(err(format!("the scale {} is not finite", op.scale)));
        }
        let args = accumulate_args(op.rows, op.cols, op.rank)?;
        let regions = op.regions()?;
        {
            let mem = lock(&self.mem);
            for &(addr, len, _) in &regions {
                mem.check_access(addr, len)?;
            }
        }
        for &(addr, _, align) in &regions {
            if addr.0 % align as u64 != 0 {
                return Err(err(format!(
                    "operand at {addr} is not aligned to its {align}-byte elements"
                )));
            }
        }
        let (w, wl, _) = regions[0];
        for &(f, fl, _) in &regions[1..] {
            if overlaps(w, wl, f, fl) {
                return Err(err(format!("a factor at {f} (+{fl} bytes) overlaps W")));
            }
        }
        let s = self.stream(stream)?;
        self.ctx.bind()?;
        let mut guard = lock(&self.blas);
        let blas = self.blas_in(&mut guard)?;
        let mats = GemmMatrices {
            a: op.down.0,
            b: op.up.0,
            ab_type: op.factor_dtype,
            c: op.w.0,
            c_type: op.w_dtype,
        };
        // SAFETY: the stream is live (Arc held); W, up and down are mapped
        // with the sizes `args` implies and aligned (checked above), their
        // types are a pair cuBLAS accepts for CUBLAS_COMPUTE_32F (checked),
        // W overlaps neither factor (checked), and W, read because beta = 1,
        // is initialised memory of the caller's; callers keep the operands
        // mapped until the queued product has run (as for `launch`).
        unsafe { blas.gemm_ex(args, mats, op.scale, 1.0, s.raw, None) }
    }

    /// [`Blas::reserve_capture_workspace`] of `stream` (the handle made first if need be).
    pub(super) fn reserve_capture_workspace(&self, stream: StreamId) -> Result<()> {
        let mut guard = lock(&self.blas);
        let blas = self.blas_in(&mut guard)?;
        self.ctx.bind()?;
        // `destroy_stream` takes the stream out of the table before it takes
        // this lock to collect the stream's buffers: a stream still in the
        // table here has this one collected too.
        if !self.streams.contains_key(&stream.0) {
            return Err(Error::UnknownStream(stream));
        }
        blas.reserve_capture_workspace(stream.0)
    }

    /// Collect and free the scratch buffers of a stream being destroyed:
    /// takes them under the cuBLAS lock, then synchronises the stream, then frees.
    pub(super) fn release_stream_scratch(&self, raw: sys::CUstream, stream: u64) {
        let buffers = match lock(&self.blas).as_mut() {
            Some(b) => b.take_stream(stream),
            None => return,
        };
        if buffers.is_empty() {
            return;
        }
        // SAFETY: the stream is kept alive by the caller for this call.
        let _ = unsafe { result::stream_synchronize(raw) };
        // SAFETY: the stream's queued work has run and no new work can use
        // the buffers (taken out of the table under the lock); freed once.
        unsafe { free_buffers(buffers) };
    }
}

fn overlaps(a: DevicePtr, al: usize, b: DevicePtr, bl: usize) -> bool {
    al > 0 && bl > 0 && a.0 < b.0.saturating_add(bl as u64) && b.0 < a.0.saturating_add(al as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Column-major `C = op(A) · op(B)` exactly as BLAS defines it.
    fn gemm_colmajor(g: GemmArgs, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        for j in 0..n {
            for i in 0..m {
                let mut acc = 0f64;
                for l in 0..k {
                    let av = if g.transa {
                        a[l + i * lda]
                    } else {
                        a[i + l * lda]
                    };
                    let bv = if g.transb {
                        b[j + l * ldb]
                    } else {
                        b[l + j * ldb]
                    };
                    acc += f64::from(av) * f64::from(bv);
                }
                c[i + j * ldc] = acc as f32;
            }
        }
    }

    #[test]
    fn gemm_arguments_compute_x_times_w_transposed() {
        let (tokens, n, k) = (5, 7, 11);
        let x: Vec<f32> = (0..tokens * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
        let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut want = vec![0f32; tokens * n];
        offload_kernels::matmul_xwt(&x, tokens, &wb, Dtype::F32, n, k, &mut want, None).unwrap();
        let g = gemm_args(tokens, n, k).unwrap();
        assert_eq!(
            g,
            GemmArgs {
                transa: true,
                transb: false,
                m: 7,
                n: 5,
                k: 11,
                lda: 11,
                ldb: 11,
                ldc: 7
            }
        );
        // A = W's buffer, B = X's buffer, C = Y's buffer, as launch_matmul passes them.
        let mut got = vec![f32::NAN; tokens * n];
        gemm_colmajor(g, &w, &x, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn accumulate_arguments_add_up_times_down_to_w() {
        let (rows, cols, rank) = (6, 9, 4);
        let up: Vec<f32> = (0..rows * rank).map(|i| (i % 5) as f32 - 2.0).collect();
        let down: Vec<f32> = (0..rank * cols).map(|i| (i % 7) as f32 * 0.25).collect();
        let w0: Vec<f32> = (0..rows * cols).map(|i| (i % 3) as f32).collect();
        let scale = 0.5f32;
        let g = accumulate_args(rows, cols, rank).unwrap();
        assert_eq!(
            g,
            GemmArgs {
                transa: false,
                transb: false,
                m: 9,
                n: 6,
                k: 4,
                lda: 9,
                ldb: 4,
                ldc: 9
            }
        );
        // A = down's buffer, B = up's buffer, C = W's buffer, as
        // gemm_accumulate passes them; C = alpha · op(A) · op(B) + 1 · C.
        let mut prod = vec![0f32; rows * cols];
        gemm_colmajor(g, &down, &up, &mut prod);
        let got: Vec<f32> = w0.iter().zip(&prod).map(|(w, p)| w + scale * p).collect();
        for i in 0..rows {
            for j in 0..cols {
                let d: f32 = (0..rank)
                    .map(|l| up[i * rank + l] * down[l * cols + j])
                    .sum();
                assert_eq!(
                    got[i * cols + j],
                    w0[i * cols + j] + scale * d,
                    "({i}, {j})"
                );
            }
        }
        assert!(accumulate_args(0, 1, 1).is_err());
        assert!(accumulate_args(1, 1, 0).is_err());
        assert!(accumulate_args(1, 1 << 31, 1).is_err());
    }

    #[test]
    fn accumulate_type_pairs_are_those_cublas_takes() {
        use Dtype::*;
        for (w, f, ok) in [
            (F16, F16, true),
            (BF16, BF16, true),
            (F32, F32, true),
            (F32, F16, true),
            (F32, BF16, true),
            (F16, BF16, false),
            (BF16, F16, false),
            (F16, F32, false),
            (BF16, F32, false),
        ] {
            assert_eq!(accumulate_types_supported(w, f), ok, "{w} += {f} · {f}");
        }
    }

    #[test]
    fn gemm_arguments_reject_what_cublas_cannot_take() {
        assert!(gemm_args(0, 1, 1).is_err());
        assert!(gemm_args(1, 1 << 31, 1).is_err());
        assert!(gemm_args(1, 1, 0).is_err());
        assert!(gemm_args(i32::MAX as usize, 1, 1).is_ok());
    }

    #[test]
    fn overlap_rule() {
        let p = |a| DevicePtr(a);
        assert!(overlaps(p(100), 10, p(105), 10));
        assert!(!overlaps(p(100), 10, p(110), 10));
        assert!(!overlaps(p(100), 0, p(100), 10));
    }

    #[test]
    fn candidates_include_the_cuda_13_soname() {
        let c = library_candidates();
        eprintln!("{c:?}");
        assert!(c.iter().any(|n| n == "libcublas.so.13"), "{c:?}");
    }

    #[test]
    fn without_cublas_presence_is_false_not_a_panic() {
        // Here only that the probe returns; on a machine with the library it is true.
        let _ = cublas_present();
    }
}
