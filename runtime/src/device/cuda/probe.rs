//! Finding out, without panicking, whether a CUDA driver and a GPU are present.

use std::ffi::{c_int, CStr};

use cudarc::driver::sys;

/// What the probe found: a usable GPU.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Ordinal of the GPU chosen (0).
    pub ordinal: u32,
    /// Number of GPUs the driver reports.
    pub device_count: u32,
    /// Driver version as reported by `cuDriverGetVersion` (e.g. 13000).
    pub driver_version: i32,
    /// Compute capability of the chosen GPU.
    pub compute_capability: (u32, u32),
    /// Name of the chosen GPU.
    pub name: String,
}

/// Why no GPU can be used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProbeError {
    /// libcuda could not be loaded.
    #[error("no CUDA driver library (libcuda.so) could be loaded")]
    NoDriver,
    /// A driver call failed.
    #[error("CUDA driver call {call} failed with code {code}")]
    Call {
        /// The call.
        call: &'static str,
        /// Raw `CUresult`.
        code: i32,
    },
    /// The driver reports no device.
    #[error("the CUDA driver reports no GPU")]
    NoDevice,
}

fn check(call: &'static str, r: sys::CUresult) -> Result<(), ProbeError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(ProbeError::Call {
            call,
            code: r as i32,
        })
    }
}

/// Look for the CUDA driver library and a GPU, touching nothing that can panic.
pub fn probe() -> Result<Probe, ProbeError> {
    // SAFETY: is_culib_present only tries to dlopen the library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(ProbeError::NoDriver);
    }
    // SAFETY: the library is present, so the symbol loads succeed; the calls
    // take plain out-pointers to locals.
    unsafe {
        check("cuInit", sys::cuInit(0))?;
        let mut version: c_int = 0;
        check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut version))?;
        let mut count: c_int = 0;
        check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
        if count <= 0 {
            return Err(ProbeError::NoDevice);
        }
        let mut dev: sys::CUdevice = 0;
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0))?;
        let mut major: c_int = 0;
        let mut minor: c_int = 0;
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut major,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                dev,
            ),
        )?;
        check(
            "cuDeviceGetAttribute",
            sys::cuDeviceGetAttribute(
                &mut minor,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                dev,
            ),
        )?;
        let mut name = [0 as std::ffi::c_char; 256];
        check(
            "cuDeviceGetName",
            sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev),
        )?;
        let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        Ok(Probe {
            ordinal: 0,
            device_count: count as u32,
            driver_version: version,
            compute_capability: (major as u32, minor as u32),
            name,
        })
    }
}
