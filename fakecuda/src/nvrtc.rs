//! NVRTC: "compiling" a program records its name and the names of its
//! `extern "C" __global__` functions in an image that only this driver's
//! `cuModuleLoadData` accepts. Nothing is compiled; which of those kernels
//! can run is up to [`crate::kernels`].

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::sys::nvrtcResult as R;

use crate::lock;

/// How every image this NVRTC makes begins.
pub const MAGIC: &[u8] = b"OFFLOAD-FAKECUDA-IMAGE\n";

struct Program {
    name: String,
    source: String,
    image: Option<Vec<u8>>,
}

fn programs() -> &'static Mutex<HashMap<usize, Program>> {
    static P: OnceLock<Mutex<HashMap<usize, Program>>> = OnceLock::new();
    P.get_or_init(Default::default)
}

fn guard(f: impl FnOnce() -> Result<(), R>) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => R::NVRTC_SUCCESS,
        Ok(Err(e)) => e,
        Err(_) => R::NVRTC_ERROR_INTERNAL_ERROR,
    }
}

fn put<T>(p: *mut T, v: T) -> Result<(), R> {
    if p.is_null() {
        return Err(R::NVRTC_ERROR_INVALID_INPUT);
    }
    // SAFETY: the caller passes a valid out-pointer (the C API's contract).
    unsafe { p.write(v) };
    Ok(())
}

/// The names of the `extern "C" __global__` functions defined in `source`.
pub fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__global__") {
        rest = &rest[at + "__global__".len()..];
        // Skip `__launch_bounds__(...)` between the qualifier and the name.
        let mut from = 0;
        let paren = loop {
            let Some(p) = rest[from..].find('(').map(|p| p + from) else {
                break None;
            };
            if rest[from..p].trim_end().ends_with("__launch_bounds__") {
                match rest[p..].find(')') {
                    Some(close) => from = p + close + 1,
                    None => break None,
                }
            } else {
                break Some(p);
            }
        };
        let Some(paren) = paren else { break };
        let head = &rest[from..paren];
        if head.contains(';') || head.contains('{') {
            continue;
        }
        if let Some(name) = head.split_whitespace().last() {
            let name = name.trim_start_matches('*');
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// The program name and kernel names an image of this NVRTC holds.
pub fn parse_image(image: &[u8]) -> Option<(String, Vec<String>)> {
    let body = image.strip_prefix(MAGIC)?;
    let end = body.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&body[..end]).ok()?;
    let mut lines = text.lines();
    let name = lines.next()?.to_string();
    Some((name, lines.map(str::to_string).collect()))
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcVersion(major: *mut c_int, minor: *mut c_int) -> R {
    guard(|| {
        put(major, 13)?;
        put(minor, 0)
    })
}

const ARCHS: [c_int; 7] = [75, 80, 86, 89, 90, 100, 120];

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetNumSupportedArchs(n: *mut c_int) -> R {
    guard(|| put(n, ARCHS.len() as c_int))
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetSupportedArchs(archs: *mut c_int) -> R {
    guard(|| {
        if archs.is_null() {
            return Err(R::NVRTC_ERROR_INVALID_INPUT);
        }
        // SAFETY: the caller's array holds nvrtcGetNumSupportedArchs entries.
        unsafe { std::ptr::copy_nonoverlapping(ARCHS.as_ptr(), archs, ARCHS.len()) };
        Ok(())
    })
}

/// A C string the caller passed, or an error.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn text(p: *const c_char) -> Result<String, R> {
    if p.is_null() {
        return Err(R::NVRTC_ERROR_INVALID_INPUT);
    }
    // SAFETY: non-null and NUL-terminated (the caller's contract).
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcCreateProgram(
    prog: *mut usize,
    src: *const c_char,
    name: *const c_char,
    _headers: c_int,
    _texts: *const *const c_char,
    _names: *const *const c_char,
) -> R {
    guard(|| {
        // SAFETY: the C API's strings (or null, rejected).
        let source = unsafe { text(src)? };
        let name = if name.is_null() {
            "default_program".to_string()
        } else {
            // SAFETY: as above.
            unsafe { text(name)? }
        };
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0x7000);
        let id = NEXT.fetch_add(16, std::sync::atomic::Ordering::Relaxed);
        lock(programs()).insert(
            id,
            Program {
                name,
                source,
                image: None,
            },
        );
        put(prog, id)
    })
}

#[no_mangle]
pub extern "C" fn nvrtcCompileProgram(prog: usize, _n: c_int, _options: *const *const c_char) -> R {
    guard(|| {
        let mut ps = lock(programs());
        let p = ps.get_mut(&prog).ok_or(R::NVRTC_ERROR_INVALID_PROGRAM)?;
        let mut image = MAGIC.to_vec();
        image.extend_from_slice(p.name.as_bytes());
        for k in kernel_names(&p.source) {
            image.push(b'\n');
            image.extend_from_slice(k.as_bytes());
        }
        image.push(0);
        p.image = Some(image);
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLogSize(prog: usize, n: *mut usize) -> R {
    guard(|| {
        lock(programs())
            .get(&prog)
            .ok_or(R::NVRTC_ERROR_INVALID_PROGRAM)?;
        put(n, 1)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetProgramLog(prog: usize, log: *mut c_char) -> R {
    guard(|| {
        lock(programs())
            .get(&prog)
            .ok_or(R::NVRTC_ERROR_INVALID_PROGRAM)?;
        put(log, 0)
    })
}

/// Runs `f` on a compiled program's image.
fn with_image(prog: usize, f: impl FnOnce(&[u8]) -> Result<(), R>) -> R {
    guard(|| {
        let ps = lock(programs());
        let image = ps
            .get(&prog)
            .ok_or(R::NVRTC_ERROR_INVALID_PROGRAM)?
            .image
            .as_ref()
            .ok_or(R::NVRTC_ERROR_INVALID_INPUT)?;
        f(image)
    })
}

fn image_size(prog: usize, n: *mut usize) -> R {
    with_image(prog, |image| put(n, image.len()))
}

fn image_copy(prog: usize, out: *mut c_char) -> R {
    with_image(prog, |image| {
        if out.is_null() {
            return Err(R::NVRTC_ERROR_INVALID_INPUT);
        }
        // SAFETY: the caller's buffer holds the size the size call returned.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), out.cast::<u8>(), image.len()) };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBINSize(prog: usize, n: *mut usize) -> R {
    image_size(prog, n)
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetCUBIN(prog: usize, out: *mut c_char) -> R {
    image_copy(prog, out)
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTXSize(prog: usize, n: *mut usize) -> R {
    image_size(prog, n)
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcGetPTX(prog: usize, out: *mut c_char) -> R {
    image_copy(prog, out)
}

#[no_mangle]
pub unsafe extern "C" fn nvrtcDestroyProgram(prog: *mut usize) -> R {
    guard(|| {
        if prog.is_null() {
            return Err(R::NVRTC_ERROR_INVALID_INPUT);
        }
        // SAFETY: non-null out-pointer holding a program handle.
        let id = unsafe { prog.read() };
        lock(programs())
            .remove(&id)
            .ok_or(R::NVRTC_ERROR_INVALID_PROGRAM)?;
        put(prog, 0)
    })
}

#[no_mangle]
pub extern "C" fn nvrtcGetErrorString(r: u32) -> *const c_char {
    let s: &'static CStr = match r {
        0 => c"NVRTC_SUCCESS",
        3 => c"NVRTC_ERROR_INVALID_INPUT",
        4 => c"NVRTC_ERROR_INVALID_PROGRAM",
        _ => c"NVRTC_ERROR_INTERNAL_ERROR",
    };
    s.as_ptr()
}
