//! Modules and kernel launches: a module is an image of this driver's NVRTC
//! ([`crate::nvrtc`]); of its kernels, those matched in [`cuLaunchKernel`] run on the
//! CPU, and the others fail to launch with `CUDA_ERROR_NOT_SUPPORTED`.

use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUfunction, CUmodule, CUresult, CUstream};
use half::{bf16, f16};

use crate::{call, driver, lock, out, run_checked};

struct Module {
    kernels: Vec<String>,
}

#[derive(Default)]
struct Tables {
    modules: HashMap<usize, Module>,
    /// Function handle → (module, kernel name).
    functions: HashMap<usize, (usize, String)>,
}

fn tables() -> &'static Mutex<Tables> {
    static T: OnceLock<Mutex<Tables>> = OnceLock::new();
    T.get_or_init(Default::default)
}

/// The context that held every module was destroyed.
pub(crate) fn forget_modules() {
    let mut t = lock(tables());
    t.modules.clear();
    t.functions.clear();
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(m: *mut CUmodule, image: *const c_void) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if image.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // Compared byte by byte, stopping at the first difference or NUL, so
        // a short image is never read past its end.
        let magic = crate::nvrtc::MAGIC;
        for (i, &want) in magic.iter().enumerate() {
            // SAFETY: bytes before index `i` matched the magic, which has no
            // NUL, so the image (NUL-terminated text, or a binary longer
            // than its header) extends at least to `i`.
            let got = unsafe { *image.cast::<u8>().add(i) };
            if got != want {
                return Err(CUresult::CUDA_ERROR_INVALID_IMAGE);
            }
        }
        // SAFETY: an image of our NVRTC: NUL-terminated text after the magic.
        let text = unsafe { CStr::from_ptr(image.cast::<c_char>()) }.to_bytes_with_nul();
        let (_, kernels) =
            crate::nvrtc::parse_image(text).ok_or(CUresult::CUDA_ERROR_INVALID_IMAGE)?;
        let id = d.id();
        lock(tables()).modules.insert(id, Module { kernels });
        out(m, id as CUmodule)
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut CUfunction,
    m: CUmodule,
    name: *const c_char,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        if name.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // SAFETY: non-null, NUL-terminated (the C API's contract).
        let name = unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned();
        let mut t = lock(tables());
        let module = t
            .modules
            .get(&(m as usize))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        if !module.kernels.contains(&name) {
            return Err(CUresult::CUDA_ERROR_NOT_FOUND);
        }
        let id = d.id();
        t.functions.insert(id, (m as usize, name));
        out(f, id as CUfunction)
    })
}

#[no_mangle]
pub extern "C" fn cuModuleUnload(m: CUmodule) -> CUresult {
    call(|| {
        driver(true)?;
        let mut t = lock(tables());
        t.modules
            .remove(&(m as usize))
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        t.functions.retain(|_, (module, _)| *module != m as usize);
        Ok(())
    })
}

/// Reads kernel parameter `i` as a `T`.
///
/// # Safety
/// `params` holds at least `i + 1` pointers, the `i`th to a `T`.
unsafe fn param<T: Copy>(params: *mut *mut c_void, i: usize) -> T {
    // SAFETY: the caller's bound.
    unsafe { (*params.add(i)).cast::<T>().read_unaligned() }
}

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuLaunchKernel(
    f: CUfunction,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    s: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    call(|| {
        let d = driver(true)?;
        let name = lock(tables())
            .functions
            .get(&(f as usize))
            .map(|(_, n)| n.clone())
            .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        if [gx, gy, gz, bx, by, bz].contains(&0) || params.is_null() || !extra.is_null() {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // The limits of every GPU since compute capability 3.0: a real
        // driver refuses the launch (the fake says which limit, too).
        let threads = u64::from(bx) * u64::from(by) * u64::from(bz);
        let limits = [
            (
                threads > 1024,
                format!("{threads} threads a block (at most 1024)"),
            ),
            (
                bx > 1024 || by > 1024 || bz > 64,
                format!("block ({bx}, {by}, {bz}) (at most 1024, 1024, 64)"),
            ),
            (
                gx > i32::MAX as u32 || gy > 65_535 || gz > 65_535,
                format!("grid ({gx}, {gy}, {gz}) (at most 2^31 - 1, 65535, 65535)"),
            ),
            (
                shared > 48 << 10,
                format!(
                    "{shared} bytes of dynamic shared memory (48 KiB without the opt-in attribute)"
                ),
            ),
        ];
        if let Some((_, why)) = limits.iter().find(|l| l.0) {
            eprintln!("offload-fakecuda: launch of {name} refused: {why}");
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        // The conversion kernels can be captured in a graph; the merges cannot.
        let st = d.stream_any(s)?;
        match name.as_str() {
            "offload_f32_to_f16" | "offload_f32_to_bf16" => {
                let to_f16 = name == "offload_f32_to_f16";
                // SAFETY: this kernel's parameters: (const float*, half*, unsigned long long).
                let (x, y, n) = unsafe {
                    (
                        param::<u64>(params, 0),
                        param::<u64>(params, 1),
                        param::<u64>(params, 2),
                    )
                };
                let n = usize::try_from(n).map_err(|_| CUresult::CUDA_ERROR_INVALID_VALUE)?;
                if n == 0 {
                    return Ok(());
                }
                let bytes = |size: usize| {
                    n.checked_mul(size)
                        .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)
                };
                let ranges: Vec<(u64, usize)> = [(x, bytes(4)?), (y, bytes(2)?)]
                    .into_iter()
                    .filter(|r| r.1 > 0)
                    .collect();
                {
                    let m = d.mem_read();
                    for &(p, len) in &ranges {
                        m.resolve(p, len).map_err(|msg| {
                            eprintln!("offload-fakecuda: {name}: {msg}");
                            CUresult::CUDA_ERROR_INVALID_VALUE
                        })?;
                    }
                }
                let what = format!("kernel {name} over {n} elements");
                st.submit(Arc::new(move || {
                    let (what, ranges) = (what.clone(), ranges.clone());
                    Box::new(move || {
                        run_checked(&what, &ranges, |at| {
                            let (xs, ys) = (at[0], at[1]);
                            for i in 0..n {
                                // SAFETY: x holds n f32 and y n 16-bit values,
                                // resolved to accessible device memory.
                                unsafe {
                                    let v = (xs as *const f32).add(i).read_unaligned();
                                    let bits = if to_f16 {
                                        f16::from_f32(v).to_bits()
                                    } else {
                                        bf16::from_f32(v).to_bits()
                                    };
                                    (ys as *mut u16).add(i).write_unaligned(bits);
                                }
                            }
                        })
                    })
                }));
                Ok(())
            }
            _ => {
                if st.capturing(true) {
                    return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED);
                }
                let Some(kernel) = crate::merge::kernel(&name) else {
                    eprintln!("offload-fakecuda: kernel {name} does not run on the fake driver");
                    return Err(CUresult::CUDA_ERROR_NOT_SUPPORTED);
                };
                // SAFETY: a merge kernel's one parameter is its parameter
                // block, passed by value: `params[0]` points to it (params
                // is not null, checked above).
                let launch = unsafe {
                    crate::merge::plan(
                        kernel,
                        (gx, gy, gz),
                        (bx, by, bz),
                        shared,
                        (*params).cast::<u8>(),
                    )
                }
                .map_err(|msg| {
                    eprintln!("offload-fakecuda: {name} refused: {msg}");
                    CUresult::CUDA_ERROR_INVALID_VALUE
                })?;
                {
                    let m = d.mem_read();
                    for &(p, len) in &launch.ranges {
                        m.resolve(p, len).map_err(|msg| {
                            eprintln!("offload-fakecuda: {name}: {msg}");
                            CUresult::CUDA_ERROR_INVALID_VALUE
                        })?;
                    }
                }
                let what = format!("kernel {name} with grid ({gx}, {gy}, {gz})");
                st.enqueue(Box::new(move || {
                    run_checked(&what, &launch.ranges, |at| {
                        // SAFETY: `at` resolves every range of the launch
                        // to accessible memory, and run_checked holds the
                        // memory read lock meanwhile, so nothing is
                        // unmapped or freed under it; this stream runs one
                        // operation at a time. An operation of another
                        // stream on the same bytes, not ordered with this
                        // one by an event, would race with it here as on a
                        // GPU: the fake does not detect that (the callers'
                        // ordering is what the tests check by the bytes).
                        unsafe { launch.run(at) }
                    })
                }));
                Ok(())
            }
        }
    })
}
