//! cuBLASLt: handles, matmul descriptors, matrix layouts, preferences, the
//! algorithm heuristic and `cublasLtMatmul`, run on the given stream on the
//! CPU with [`blas::gemm`](crate::blas).
//!
//! The heuristic "finds" one algorithm that records the shape, types,
//! transposes and leading dimensions it was found for, so that
//! `cublasLtMatmul` with an algorithm of another fails, and that asks for
//! [`WORKSPACE`] bytes of workspace (twice that for larger products) when
//! the preference allows it, so that `cublasLtMatmul` checks the workspace
//! handed to it (its size and memory when queued, its memory again when
//! the stream runs the product). The algorithm also records the operand alignments
//! its preference allowed (256 bytes unless told less, as the real one
//! assumes), and `cublasLtMatmul` refuses operands less aligned.
//! With `OFFLOAD_FAKECUDA_LT_NO_ALGORITHM=1` (read at each call) it finds
//! none, as the real one may for a shape it cannot run.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use cudarc::cublas::sys::cublasStatus_t;
use cudarc::cublaslt::sys::{
    cublasLtHandle_t, cublasLtMatmulAlgo_t, cublasLtMatmulDesc_t, cublasLtMatmulHeuristicResult_t,
    cublasLtMatmulPreference_t, cublasLtMatrixLayout_t, cudaStream_t,
};

use crate::blas::{queue_product, span, status, Product, Ty};
use crate::{driver, lock};

type Status = cublasStatus_t;

/// Bytes of workspace the fake's algorithms ask for, when allowed: this
/// much for products of up to 1024 outputs, twice as much for larger ones
/// (so that a stream's workspace has to grow).
pub const WORKSPACE: usize = 96 << 10;

fn workspace_for(m: usize, n: usize) -> usize {
    if m * n <= 1 << 10 {
        WORKSPACE
    } else {
        2 * WORKSPACE
    }
}

/// What an algorithm is for besides its shape: the transposes, the three
/// types and the leading dimensions, in one word (checked at
/// `cublasLtMatmul`, so an algorithm found for another layout fails).
fn layout_word(d: Desc, a: Layout, b: Layout, c: Layout) -> u64 {
    let ty = |t: Ty| match t {
        Ty::F32 => 0u64,
        Ty::F16 => 1,
        Ty::Bf16 => 2,
    };
    let mut h = u64::from(d.transa) | u64::from(d.transb) << 1;
    h |= ty(a.ty) << 2 | ty(b.ty) << 4 | ty(c.ty) << 6;
    for ld in [a.ld, b.ld, c.ld] {
        h = h.rotate_left(17) ^ ld as u64;
    }
    h
}

/// Marks an algorithm the fake's heuristic made (its first word).
const ALGO_TAG: u64 = 0x0ff1_0ad0_a160_0001;

// Attribute numbers (cublasLt.h).
const DESC_TRANSA: u32 = 3;
const DESC_TRANSB: u32 = 4;
const PREF_MAX_WORKSPACE_BYTES: u32 = 1;
/// `CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES`; B, C and D follow.
const PREF_MIN_ALIGNMENT_A_BYTES: u32 = 5;
const COMPUTE_32F: u32 = 68;
const COMPUTE_32F_PEDANTIC: u32 = 69;
const R_32F: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    ty: Ty,
    rows: usize,
    cols: usize,
    ld: usize,
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    compute: u32,
    scale: u32,
    transa: bool,
    transb: bool,
}

#[derive(Clone, Copy, Debug)]
enum Object {
    Handle,
    Desc(Desc),
    Layout(Layout),
    Pref(Pref),
}

/// A preference: the workspace allowed and the operands' alignments (A, B,
/// C, D; 256 bytes unless set, as cuBLASLt assumes).
#[derive(Clone, Copy, Debug)]
struct Pref {
    max_workspace: u64,
    align: [u64; 4],
}

/// Live objects by the address handed out.
fn objects() -> &'static Mutex<HashMap<usize, Object>> {
    static O: OnceLock<Mutex<HashMap<usize, Object>>> = OnceLock::new();
    O.get_or_init(Default::default)
}

/// A new object's address: distinct from every other, never dereferenced.
fn create<T>(out: *mut *mut T, o: Object) -> Result<(), Status> {
    static NEXT: AtomicUsize = AtomicUsize::new(0x17_0000);
    if out.is_null() {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    let id = NEXT.fetch_add(16, Ordering::Relaxed);
    lock(objects()).insert(id, o);
    // SAFETY: checked non-null; the caller passes a valid out-pointer.
    unsafe { out.write(id as *mut T) };
    Ok(())
}

fn destroy<T>(p: *mut T) -> Status {
    status(|| {
        lock(objects())
            .remove(&(p as usize))
            .map(|_| ())
            .ok_or(Status::CUBLAS_STATUS_INVALID_VALUE)
    })
}

fn get<T>(p: *mut T) -> Result<Object, Status> {
    lock(objects())
        .get(&(p as usize))
        .copied()
        .ok_or(Status::CUBLAS_STATUS_INVALID_VALUE)
}

fn handle(h: cublasLtHandle_t) -> Result<(), Status> {
    match get(h)? {
        Object::Handle => Ok(()),
        _ => Err(Status::CUBLAS_STATUS_INVALID_VALUE),
    }
}

fn desc(d: cublasLtMatmulDesc_t) -> Result<Desc, Status> {
    match get(d)? {
        Object::Desc(d) => Ok(d),
        _ => Err(Status::CUBLAS_STATUS_INVALID_VALUE),
    }
}

fn layout(l: cublasLtMatrixLayout_t) -> Result<Layout, Status> {
    match get(l)? {
        Object::Layout(l) => Ok(l),
        _ => Err(Status::CUBLAS_STATUS_INVALID_VALUE),
    }
}

/// Reads an attribute value of `size` bytes (4 or 8) as an integer.
///
/// # Safety
/// `buf` points at `size` readable bytes.
unsafe fn read_int(buf: *const c_void, size: usize) -> Result<u64, Status> {
    if buf.is_null() {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    // SAFETY: the caller's bound, for the size checked here.
    unsafe {
        match size {
            4 => Ok(u64::from(buf.cast::<u32>().read_unaligned())),
            8 => Ok(buf.cast::<u64>().read_unaligned()),
            _ => Err(Status::CUBLAS_STATUS_INVALID_VALUE),
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(h: *mut cublasLtHandle_t) -> Status {
    status(|| {
        driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        create(h, Object::Handle)
    })
}

#[no_mangle]
pub extern "C" fn cublasLtDestroy(h: cublasLtHandle_t) -> Status {
    destroy(h)
}

#[no_mangle]
pub extern "C" fn cublasLtGetStatusName(s: u32) -> *const c_char {
    crate::blas::cublasGetStatusName(s)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    d: *mut cublasLtMatmulDesc_t,
    compute: u32,
    scale: u32,
) -> Status {
    status(|| {
        create(
            d,
            Object::Desc(Desc {
                compute,
                scale,
                transa: false,
                transb: false,
            }),
        )
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulDescDestroy(d: cublasLtMatmulDesc_t) -> Status {
    destroy(d)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    d: cublasLtMatmulDesc_t,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> Status {
    status(|| {
        let mut v = desc(d)?;
        // SAFETY: the caller passes `size` readable bytes at `buf`.
        let x = unsafe { read_int(buf, size)? };
        let op = |x: u64| match x {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        };
        match attr {
            DESC_TRANSA => v.transa = op(x)?,
            DESC_TRANSB => v.transb = op(x)?,
            _ => return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        }
        lock(objects()).insert(d as usize, Object::Desc(v));
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    l: *mut cublasLtMatrixLayout_t,
    ty: u32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> Status {
    status(|| {
        let ty = Ty::of(ty)?;
        if ld < 1 || (ld as u64) < rows {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        create(
            l,
            Object::Layout(Layout {
                ty,
                rows: rows as usize,
                cols: cols as usize,
                ld: ld as usize,
            }),
        )
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatrixLayoutDestroy(l: cublasLtMatrixLayout_t) -> Status {
    destroy(l)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(
    p: *mut cublasLtMatmulPreference_t,
) -> Status {
    status(|| {
        create(
            p,
            Object::Pref(Pref {
                max_workspace: 0,
                align: [256; 4],
            }),
        )
    })
}

#[no_mangle]
pub extern "C" fn cublasLtMatmulPreferenceDestroy(p: cublasLtMatmulPreference_t) -> Status {
    destroy(p)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    p: cublasLtMatmulPreference_t,
    attr: u32,
    buf: *const c_void,
    size: usize,
) -> Status {
    status(|| {
        let Object::Pref(mut pref) = get(p)? else {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        };
        // SAFETY: the caller passes `size` readable bytes at `buf`.
        let v = unsafe { read_int(buf, size)? };
        match (attr, size) {
            (PREF_MAX_WORKSPACE_BYTES, 8) => pref.max_workspace = v,
            (a, 4) if (PREF_MIN_ALIGNMENT_A_BYTES..PREF_MIN_ALIGNMENT_A_BYTES + 4).contains(&a) => {
                if !v.is_power_of_two() {
                    return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
                }
                pref.align[(a - PREF_MIN_ALIGNMENT_A_BYTES) as usize] = v;
            }
            _ => return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED),
        }
        lock(objects()).insert(p as usize, Object::Pref(pref));
        Ok(())
    })
}

/// The product a descriptor and its layouts describe: (m, n, k), after
/// checking that they agree with each other and with cuBLAS's type table.
fn shape(
    d: Desc,
    a: Layout,
    b: Layout,
    c: Layout,
    dl: Layout,
) -> Result<(usize, usize, usize), Status> {
    if d.compute != COMPUTE_32F && d.compute != COMPUTE_32F_PEDANTIC || d.scale != R_32F {
        return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let supported = matches!(
        (a.ty, b.ty, c.ty),
        (Ty::F32, Ty::F32, Ty::F32)
            | (Ty::F16, Ty::F16, Ty::F16 | Ty::F32)
            | (Ty::Bf16, Ty::Bf16, Ty::Bf16 | Ty::F32)
    );
    if !supported || c != dl {
        return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
    }
    let (m, k) = if d.transa {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (kb, n) = if d.transb {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if kb != k || c.rows != m || c.cols != n {
        return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
    }
    Ok((m, n, k))
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    h: cublasLtHandle_t,
    d: cublasLtMatmulDesc_t,
    a: cublasLtMatrixLayout_t,
    b: cublasLtMatrixLayout_t,
    c: cublasLtMatrixLayout_t,
    dl: cublasLtMatrixLayout_t,
    p: cublasLtMatmulPreference_t,
    requested: c_int,
    results: *mut cublasLtMatmulHeuristicResult_t,
    returned: *mut c_int,
) -> Status {
    status(|| {
        handle(h)?;
        let Object::Pref(pref) = get(p)? else {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        };
        let (dv, al, bl, cl) = (desc(d)?, layout(a)?, layout(b)?, layout(c)?);
        let (m, n, k) = shape(dv, al, bl, cl, layout(dl)?)?;
        if requested < 1 || results.is_null() || returned.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        if std::env::var("OFFLOAD_FAKECUDA_LT_NO_ALGORITHM").is_ok_and(|v| v == "1") {
            // SAFETY: checked non-null; the caller's out-pointer.
            unsafe { returned.write(0) };
            return Ok(());
        }
        let asks = workspace_for(m, n);
        let workspace = if pref.max_workspace >= asks as u64 {
            asks
        } else {
            0
        };
        // SAFETY: a zeroed result is a valid value of this plain C struct.
        let mut r: cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        r.algo = cublasLtMatmulAlgo_t {
            data: [
                ALGO_TAG,
                m as u64,
                n as u64,
                k as u64,
                workspace as u64,
                pref.align[0] | pref.align[1] << 16 | pref.align[2] << 32 | pref.align[3] << 48,
                layout_word(dv, al, bl, cl),
                0,
            ],
        };
        r.workspaceSize = workspace;
        r.wavesCount = 1.0;
        // SAFETY: checked non-null; room for `requested` ≥ 1 results.
        unsafe {
            results.write(r);
            returned.write(1);
        }
        Ok(())
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cublasLtMatmul(
    h: cublasLtHandle_t,
    d: cublasLtMatmulDesc_t,
    alpha: *const c_void,
    a: *const c_void,
    ad: cublasLtMatrixLayout_t,
    b: *const c_void,
    bd: cublasLtMatrixLayout_t,
    beta: *const c_void,
    c: *const c_void,
    cd: cublasLtMatrixLayout_t,
    dp: *mut c_void,
    dd: cublasLtMatrixLayout_t,
    algo: *const cublasLtMatmulAlgo_t,
    workspace: *mut c_void,
    workspace_size: usize,
    s: cudaStream_t,
) -> Status {
    status(|| {
        let drv = driver(true).map_err(|_| Status::CUBLAS_STATUS_NOT_INITIALIZED)?;
        handle(h)?;
        let v = desc(d)?;
        let (al, bl, cl) = (layout(ad)?, layout(bd)?, layout(cd)?);
        let (m, n, k) = shape(v, al, bl, cl, layout(dd)?)?;
        if alpha.is_null() || beta.is_null() || algo.is_null() {
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        // SAFETY: checked non-null; the caller passes an algorithm.
        let algo = unsafe { algo.read() };
        if algo.data[..4] != [ALGO_TAG, m as u64, n as u64, k as u64]
            || algo.data[6] != layout_word(v, al, bl, cl)
        {
            eprintln!(
                "offload-fakecuda: cublasLtMatmul {m}x{n}x{k}: an algorithm not found for this shape, types and layout ({:x?})",
                &algo.data[..4]
            );
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        // The alignments the algorithm was chosen for (256 bytes each
        // unless the preference said less).
        for (i, (name, p)) in [
            ("A", a as u64),
            ("B", b as u64),
            ("C", c as u64),
            ("D", dp as u64),
        ]
        .into_iter()
        .enumerate()
        {
            let need = (algo.data[5] >> (16 * i)) & 0xffff;
            if need == 0 || p % need != 0 {
                eprintln!(
                    "offload-fakecuda: cublasLtMatmul {m}x{n}x{k}: {name} at {p:#x} is not aligned to the {need} bytes its algorithm was chosen for"
                );
                return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
            }
        }
        // Only C = D in place (what the backend passes).
        if c != dp.cast_const() {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        if m == 0 || n == 0 || k == 0 {
            return Err(Status::CUBLAS_STATUS_NOT_SUPPORTED);
        }
        // SAFETY: the default host pointer mode and f32 scale type: alpha
        // and beta point at host f32 values (the API's contract).
        let (alpha, beta) = unsafe { (alpha.cast::<f32>().read(), beta.cast::<f32>().read()) };
        let mut ranges = vec![
            (a as u64, span(al.rows, al.cols, al.ld, al.ty)),
            (b as u64, span(bl.rows, bl.cols, bl.ld, bl.ty)),
            (c as u64, span(cl.rows, cl.cols, cl.ld, cl.ty)),
        ];
        // The algorithm's workspace: at least what it asked for, in device memory.
        if (workspace_size as u64) < algo.data[4] {
            eprintln!(
                "offload-fakecuda: cublasLtMatmul {m}x{n}x{k}: {workspace_size} bytes of workspace, the algorithm needs {}",
                algo.data[4]
            );
            return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
        }
        if workspace_size > 0 {
            if workspace.is_null() {
                return Err(Status::CUBLAS_STATUS_INVALID_VALUE);
            }
            ranges.push((workspace as u64, workspace_size));
        }
        let p = Product {
            m,
            n,
            k,
            a: (al.ty, al.ld, v.transa),
            b: (bl.ty, bl.ld, v.transb),
            c: (cl.ty, cl.ld),
            alpha,
            beta,
        };
        queue_product(drv, s.cast(), "cublasLtMatmul", p, ranges)
    })
}
