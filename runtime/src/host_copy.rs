//! Copies into host buffers that only the copy engine reads again (staging
//! buffers, pinned layer copies), with stores that bypass the CPU caches:
//! what the runtime fills its host buffers with from a source that holds
//! its tensors in memory ([`crate::model::WeightSource::in_memory`]), and
//! what a source's own `read` may use.
//!
//! An ordinary copy into memory that is not in cache first reads every
//! destination line into the cache (to own it), then writes it back: three
//! passes over memory for two of data. Non-temporal (streaming) stores
//! write whole lines without reading them, and leave nothing in the caches
//! for the copy engine to snoop. On the 2-core AMD EPYC CI machine, 4 MiB
//! parts copied into a staging ring larger than the L3 moved 1.5–1.7× the
//! bytes per second of `memcpy` (medians, 2 threads), 1.35× with one
//! (`offload bench h2d`'s host fill rows; docs/benchmarks.md, "Filling
//! staging buffers").

/// Copies below this go through `copy_from_slice`: too short for the
/// streaming stores' fence to pay off.
const STREAM_MIN: usize = 4096;

/// Copies `src` into `dst` (of the same length) with streaming stores where
/// the target has them (x86-64), else as `copy_from_slice`; the stores are
/// fenced before it returns, so whatever the caller publishes afterwards
/// (a buffer handed to the thread that queues its copy) follows them.
///
/// # Panics
/// If the lengths differ, as `copy_from_slice`.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(
        dst.len(),
        src.len(),
        "copy_streaming: destination and source lengths differ"
    );
    if dst.len() < STREAM_MIN {
        dst.copy_from_slice(src);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    x86::copy(dst, src);
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Makes this thread's earlier stores visible before any later one: the
/// stores of a fill into write-combined memory, which are weakly ordered
/// like streaming stores, before the buffer is handed on (`sfence` on
/// x86-64, a full fence elsewhere).
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence only orders stores; SSE is part of x86-64.
    unsafe {
        core::arch::x86_64::_mm_sfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};

    /// Bytes one iteration of the streaming loop moves (a cache line).
    const LINE: usize = 64;

    /// [`super::copy_streaming`] on x86-64 (SSE2, part of the base ISA):
    /// the head up to dst's first 16-byte boundary and the tail past its
    /// last whole line with ordinary stores, the lines between with
    /// `movntdq`, then `sfence`.
    pub(super) fn copy(dst: &mut [u8], src: &[u8]) {
        let len = dst.len();
        let head = dst.as_ptr().align_offset(16).min(len);
        dst[..head].copy_from_slice(&src[..head]);
        let body = (len - head) / LINE * LINE;
        let d = dst[head..head + body].as_mut_ptr();
        let s = src[head..head + body].as_ptr();
        let mut i = 0;
        while i < body {
            // SAFETY: i + LINE <= body, so the 64 bytes at s + i and d + i
            // lie inside the two sub-slices just taken (src and dst are
            // distinct borrows, so they do not overlap; when `align_offset`
            // gives up, head = len and body = 0, so no iteration runs);
            // d + i is 16-byte aligned (d is, by `head`, and i is a
            // multiple of 64), as movntdq needs; loadu takes any
            // alignment. SSE2 is part of x86-64, so the instructions exist
            // on every target this compiles for.
            unsafe {
                let a = _mm_loadu_si128(s.add(i).cast::<__m128i>());
                let b = _mm_loadu_si128(s.add(i + 16).cast::<__m128i>());
                let c = _mm_loadu_si128(s.add(i + 32).cast::<__m128i>());
                let e = _mm_loadu_si128(s.add(i + 48).cast::<__m128i>());
                _mm_stream_si128(d.add(i).cast::<__m128i>(), a);
                _mm_stream_si128(d.add(i + 16).cast::<__m128i>(), b);
                _mm_stream_si128(d.add(i + 32).cast::<__m128i>(), c);
                _mm_stream_si128(d.add(i + 48).cast::<__m128i>(), e);
            }
            i += LINE;
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        // Streaming stores are weakly ordered: the fence makes them visible
        // before any store the caller makes after this returns.
        // SAFETY: sfence only orders stores; SSE is part of x86-64.
        unsafe { _mm_sfence() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    /// Copies `len` bytes from offset `so` of a source into offset `dof` of
    /// a destination and checks every byte, the guard bytes around the
    /// destination included.
    fn check(len: usize, so: usize, dof: usize) {
        let src = pattern(so + len, 7);
        let mut dst = vec![0xA5u8; dof + len + 64];
        copy_streaming(&mut dst[dof..dof + len], &src[so..so + len]);
        assert!(dst[..dof].iter().all(|&b| b == 0xA5), "bytes before dst");
        assert_eq!(&dst[dof..dof + len], &src[so..so + len]);
        assert!(
            dst[dof + len..].iter().all(|&b| b == 0xA5),
            "bytes after dst"
        );
    }

    #[test]
    fn every_alignment_and_length_around_the_thresholds_copies_exactly() {
        for len in [
            0,
            1,
            15,
            63,
            4095,
            4096,
            4097,
            4096 + 63,
            4096 + 64,
            65_536 + 13,
        ] {
            for so in 0..17 {
                for dof in 0..17 {
                    check(len, so, dof);
                }
            }
        }
    }

    #[test]
    fn a_length_mismatch_is_refused() {
        let r = std::panic::catch_unwind(|| {
            let mut d = vec![0u8; 8192];
            copy_streaming(&mut d, &[1u8; 8191]);
        });
        assert!(r.is_err());
    }

    proptest! {
        #[test]
        fn copies_any_slice_exactly(len in 0usize..40_000, so in 0usize..64, dof in 0usize..64) {
            check(len, so, dof);
        }
    }
}
