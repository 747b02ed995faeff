//! `device::auto()` picks the CUDA backend when a GPU answers, else the host
//! backend, and says which and why.
//!
//! Which branch applies is decided independently of `auto`: by this crate's
//! `cuda` feature and, with it, by `cuda::probe()`. Each branch asserts what
//! `auto` must then return.

use offload_runtime::device::{self, BackendKind, HostConfig};

fn small_host() -> HostConfig {
    HostConfig {
        capacity: 8 << 20,
        page_size: 64 << 10,
        link_gbps: None,
    }
}

/// The host backend was chosen, built from `small_host()`, for `why`.
fn assert_host(selected: &device::Selected, why: &str) {
    let info = selected.device.info();
    assert_eq!(info.kind, BackendKind::Host, "{}", selected.reason);
    assert_eq!(info.total_memory, 8 << 20);
    assert_eq!(info.page_size, 64 << 10);
    assert!(
        selected.reason.contains("host backend"),
        "the reason names the backend: {}",
        selected.reason
    );
    assert!(
        selected.reason.contains("8 MiB") && selected.reason.contains("64 KiB pages"),
        "the reason gives the emulated memory and page size: {}",
        selected.reason
    );
    assert!(
        selected.reason.ends_with(why),
        "the reason says why ({why:?}): {}",
        selected.reason
    );
}

#[test]
fn auto_says_which_backend_and_why() {
    let selected = device::auto(&small_host()).unwrap();
    println!("{}", selected.reason);
    if cfg!(feature = "cuda") {
        #[cfg(feature = "cuda")]
        assert_choice_with_cuda_built_in(&selected);
    } else {
        assert_host(&selected, "built without the `cuda` feature");
    }
}

/// With the `cuda` feature the probe decides: a GPU answers, or it says why not.
#[cfg(feature = "cuda")]
fn assert_choice_with_cuda_built_in(selected: &device::Selected) {
    match device::cuda::probe() {
        Ok(probe) => {
            // A GPU answers: auto must use it and name it.
            let info = selected.device.info();
            assert_eq!(info.kind, BackendKind::Cuda, "{}", selected.reason);
            assert_eq!(info.name, probe.name);
            assert!(
                selected
                    .reason
                    .starts_with(&format!("using CUDA device {}: ", probe.ordinal)),
                "{}",
                selected.reason
            );
            assert!(
                selected.reason.contains(&probe.name),
                "the reason names the GPU {:?}: {}",
                probe.name,
                selected.reason
            );
            let (major, minor) = probe.compute_capability;
            assert!(
                selected
                    .reason
                    .contains(&format!("compute capability {major}.{minor}")),
                "{}",
                selected.reason
            );
        }
        Err(why) => {
            // No driver library (or no GPU): the host backend, with the probe's own message.
            assert_host(selected, &why.to_string());
            if matches!(why, device::cuda::ProbeError::NoDriver) {
                assert!(
                    selected.reason.contains("no CUDA driver library"),
                    "{}",
                    selected.reason
                );
            }
        }
    }
}

#[test]
fn auto_through_dyn_device_is_the_same_choice() {
    let a = device::auto(&small_host()).unwrap();
    let b = <dyn device::Device>::auto(&small_host()).unwrap();
    assert_eq!(a.device.info().kind, b.device.info().kind);
    assert_eq!(a.reason, b.reason);
}
