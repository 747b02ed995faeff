//! cuBLAS: handles and `cublasGemmEx` (f32, f16 and bf16 matrices, f32
//! compute), run on the handle's stream on the CPU.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::{cublasHandle_t, cublasStatus_t, cudaStream_t};
use cudarc::driver::sys::CUstream;
use half::{bf16, f16};

use crate::{driver, lock, run_checked, Driver};

type Status = cublasStatus_t;

/// Handles and the stream each points at (0: the null stream).
fn handles() -> &'static Mutex<HashMap<usize, usize>> {
    static H: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    H.get_or_init(Default::default)
}

pub(crate) fn status(f: impl FnOnce() -> Result<(), Status>) -> Status {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Status::CUBLAS_STATUS_SUCCESS,
        Ok(Err(e)) => e,
        Err(_) => Status::CUBLAS_STATUS_INTERNAL_ERROR,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(h: *mut cublasHandle_t) -> Status {
    status(|| {
        let d = driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        if h.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        let id = d.id();
        lock(handles()).insert(id, 0);
        // SAFETY: checked non-null; the caller passes a valid out-pointer.
        unsafe { h.write(id as cublasHandle_t) };
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cublasDestroy_v2(h: cublasHandle_t) -> Status {
    status(|| {
        driver(false).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        lock(handles())
            .remove(&(h as usize))
            .map(|_| ())
            .ok_or(Status::CUBLAS_STATUS_NOT_INITIALIZED)
    })
}

/// Checks that the workspace is device memory of at least `len` bytes
/// (the fake's products need none).
#[no_mangle]
pub extern "C" fn cublasSetWorkspace_v2(h: cublasHandle_t, ws: *mut c_void, len: usize) -> Status {
    status(|| {
        let d = driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        if !lock(handles()).contains_key(&(h as usize)) {
            return Err(Status::CUBLAS_STATUS_NOT_INITIALIZED);
        }
        if len > 0 {
            if let Err(msg) = d.mem_read().resolve(ws as u64, len) {
                eprintln!("offload-fakecuda: cublasSetWorkspace: {msg}");
                return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
            }
        }
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cublasSetStream_v2(h: cublasHandle_t, s: cudaStream_t) -> Status {
    status(|| {
        let d = driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        d.stream_any(s.cast())
            .map_err(|_| Status::CUBLAS_STATUS_INVALID_VALUE)?;
        let mut hs = lock(handles());
        let slot = hs
            .get_mut(&(h as usize))
            .ok_or(Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        *slot = s as usize;
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn cublasGetStatusName(s: c_uint) -> *const c_char {
    let name: &'static CStr = match s {
        0 => c"CUBLAS_STATUS_SUCCESS",
        1 => c"CUBLAS_STATUS_NOT_INITIALIZED",
        7 => c"CUBLAS_STATUS_INVALID_VALUE",
        15 => c"CUBLAS_STATUS_NOT_SUPPORTED",
        _ => c"CUBLAS_STATUS_INTERNAL_ERROR",
    };
    name.as_ptr()
}

/// Element types `cublasGemmEx` takes here (`cudaDataType` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ty {
    F32,
    F16,
    Bf16,
}

impl Ty {
    pub(crate) fn of(v: c_uint) -> Result<Ty, Status> {
        match v {
            0 => Ok(Ty::F32),
            2 => Ok(Ty::F16),
            14 => Ok(Ty::Bf16),
            _ => Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        }
    }

    fn size(self) -> usize {
        match self {
            Ty::F32 => 4,
            Ty::F16 | Ty::Bf16 => 2,
        }
    }

    /// Reads element `i` of a device buffer.
    ///
    /// # Safety
    /// `p` points at at least `i + 1` elements of this type.
    unsafe fn get(self, p: usize, i: usize) -> f32 {
        // SAFETY: the caller's bound; unaligned reads are allowed.
        unsafe {
            match self {
                Ty::F32 => (p as *const f32).add(i).read_unaligned(),
                Ty::F16 => (p as *const f16).add(i).read_unaligned().to_f32(),
                Ty::Bf16 => (p as *const bf16).add(i).read_unaligned().to_f32(),
            }
        }
    }

    /// Writes element `i` of a device buffer (rounded to nearest).
    ///
    /// # Safety
    /// `p` points at at least `i + 1` writable elements of this type.
    unsafe fn set(self, p: usize, i: usize, v: f32) {
        // SAFETY: the caller's bound; unaligned writes are allowed.
        unsafe {
            match self {
                Ty::F32 => (p as *mut f32).add(i).write_unaligned(v),
                Ty::F16 => (p as *mut f16).add(i).write_unaligned(f16::from_f32(v)),
                Ty::Bf16 => (p as *mut bf16).add(i).write_unaligned(bf16::from_f32(v)),
            }
        }
    }
}

/// The bytes a column-major `rows × cols` matrix with leading dimension `ld` spans.
pub(crate) fn span(rows: usize, cols: usize, ld: usize, ty: Ty) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        ((cols - 1) * ld + rows) * ty.size()
    }
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasGemmEx(
    h: cublasHandle_t,
    transa: c_uint,
    transb: c_uint,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_uint,
    lda: c_int,
    b: *const c_void,
    b_type: c_uint,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_uint,
    ldc: c_int,
    compute: c_uint,
    _algo: c_int,
) -> Status {
    status(|| {
        let d = driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        let stream = *lock(handles())
            .get(&(h as usize))
            .ok_or(Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        // CUBLAS_COMPUTE_32F (68) and its pedantic form (69).
        if compute != 68 && compute != 69 {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        if transa > 1 || transb > 1 {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        let (ta, tb) = (transa == 1, transb == 1);
        let (a_ty, b_ty, c_ty) = (Ty::of(a_type)?, Ty::of(b_type)?, Ty::of(c_type)?);
        // cuBLAS's table for CUBLAS_COMPUTE_32F: A and B of one type, C of
        // that type or f32 (16-bit A and B), or all f32.
        let supported = matches!(
            (a_ty, b_ty, c_ty),
            (Ty::F32, Ty::F32, Ty::F32)
                | (Ty::F16, Ty::F16, Ty::F16 | Ty::F32)
                | (Ty::Bf16, Ty::Bf16, Ty::Bf16 | Ty::F32)
        );
        if !supported {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        if m < 0 || n < 0 || k < 0 || alpha.is_null() || beta.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let (lda, ldb, ldc) = (
            lda.max(0) as usize,
            ldb.max(0) as usize,
            ldc.max(0) as usize,
        );
        // Stored shapes (column-major): A is m×k (k×m when transposed), B k×n (n×k).
        let (ar, ac) = if ta { (k, m) } else { (m, k) };
        let (br, bc) = if tb { (n, k) } else { (k, n) };
        if lda < ar.max(1) || ldb < br.max(1) || ldc < m.max(1) {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            // C = beta · C: not needed by the backend (its products have k ≥ 1).
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        // SAFETY: with CUBLAS_COMPUTE_32F and the host pointer mode, alpha and
        // beta point at host f32 values (the API's contract).
        let (alpha, beta) = unsafe { (alpha.cast::<f32>().read(), beta.cast::<f32>().read()) };
        let ranges = vec![
            (a as u64, span(ar, ac, lda, a_ty)),
            (b as u64, span(br, bc, ldb, b_ty)),
            (c as u64, span(m, n, ldc, c_ty)),
        ];
        let p = Product {
            m,
            n,
            k,
            a: (a_ty, lda, ta),
            b: (b_ty, ldb, tb),
            c: (c_ty, ldc),
            alpha,
            beta,
        };
        queue_product(d, stream as _, "cublasGemmEx", p, ranges)
    })
}

/// One product as the fake runs it: `C = alpha · op(A) · op(B) + beta · C`
/// of `m × n` over `k`, each matrix's type and leading dimension (and for
/// A and B whether it is transposed).
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) a: (Ty, usize, bool),
    pub(crate) b: (Ty, usize, bool),
    pub(crate) c: (Ty, usize),
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
}

/// Checks that every range of `ranges` (A's, B's and C's first, then any
/// other the product uses) is device memory now, and queues the product on
/// stream `s`, which finds them again when it runs it (aborting if one is
/// gone). `call` names the API function in messages.
pub(crate) fn queue_product(
    d: &Driver,
    s: CUstream,
    call: &str,
    p: Product,
    ranges: Vec<(u64, usize)>,
) -> Result<(), Status> {
    {
        let mem = d.mem_read();
        for &(at, len) in &ranges {
            if let Err(msg) = mem.resolve(at, len) {
                eprintln!("offload-fakecuda: {call}: {msg}");
                return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
            }
        }
    }
    let st = d
        .stream_any(s)
        .map_err(|_| Status::CUBLAS_STATUS_INVALID_VALUE)?;
    let what = format!("{call} {}x{}x{}", p.m, p.n, p.k);
    st.submit(Arc::new(move || {
        let (what, ranges) = (what.clone(), ranges.clone());
        Box::new(move || {
            run_checked(&what, &ranges, |at| {
                // SAFETY: every element index below lies within the spans
                // resolved above to accessible device memory.
                unsafe {
                    gemm(
                        p.m,
                        p.n,
                        p.k,
                        (at[0], p.a.0, p.a.1, p.a.2),
                        (at[1], p.b.0, p.b.1, p.b.2),
                        (at[2], p.c.0, p.c.1),
                        p.alpha,
                        p.beta,
                    )
                }
            })
        })
    }));
    Ok(())
}

/// `C = alpha · op(A) · op(B) + beta · C`, column-major, in f32.
///
/// # Safety
/// The three matrices lie in readable (and, for C, writable) memory of the
/// spans given by their shapes and leading dimensions.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    (a, at, lda, ta): (usize, Ty, usize, bool),
    (b, bt, ldb, tb): (usize, Ty, usize, bool),
    (c, ct, ldc): (usize, Ty, usize),
    alpha: f32,
    beta: f32,
) {
    // op(A) by rows (m × k) and op(B) by columns (n × k), so each output is a
    // dot product of two contiguous vectors.
    let mut ar = vec![0f32; m * k];
    for i in 0..m {
        for l in 0..k {
            let idx = if ta { i * lda + l } else { l * lda + i };
            // SAFETY: within A's span (the caller's bound).
            ar[i * k + l] = unsafe { at.get(a, idx) };
        }
    }
    let mut bc = vec![0f32; n * k];
    for j in 0..n {
        for l in 0..k {
            let idx = if tb { l * ldb + j } else { j * ldb + l };
            // SAFETY: within B's span (the caller's bound).
            bc[j * k + l] = unsafe { bt.get(b, idx) };
        }
    }
    // Columns of C in parallel: each thread owns whole columns.
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n.max(1));
    let per = n.div_ceil(threads.max(1)).max(1);
    let (ar, bc) = (&ar, &bc);
    std::thread::scope(|s| {
        for first in (0..n).step_by(per) {
            s.spawn(move || {
                for j in first..(first + per).min(n) {
                    let col = &bc[j * k..(j + 1) * k];
                    for i in 0..m {
                        let d = dot(&ar[i * k..(i + 1) * k], col);
                        let idx = j * ldc + i;
                        // SAFETY: within C's span (the caller's bound); each
                        // thread writes its own columns only.
                        let old = if beta == 0.0 {
                            0.0
                        } else {
                            unsafe { ct.get(c, idx) }
                        };
                        // SAFETY: as above.
                        unsafe { ct.set(c, idx, alpha * d + beta * old) };
                    }
                }
            });
        }
    });
}

/// A dot product in eight f32 lanes (which the compiler vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
