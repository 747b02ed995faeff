//! `offload bench h2d`'s host fill rows: how fast the staged policy's
//! reader threads can fill a ring of pinned staging buffers from pageable
//! memory, with `memcpy` and with the runtime's streaming stores
//! ([`offload_runtime::host_copy::copy_streaming`]), no device copy
//! involved: the host-side ceiling of the staged policy, which copies every
//! byte twice through host memory.
//!
//! A sample: `threads` threads copy the source (`--pass-mib` of distinct
//! bytes in a `Vec`) in parts of `--staging-part-kib`, thread k taking
//! parts k, k + threads, ... into its own share of one pinned allocation
//! the size of the staging ring (`--staging-buffers` × `--staging-buffer-mib`),
//! round and round. After each sample the last part every thread copied
//! is compared with the source. Then [`SPAWNS`] scoped threads are
//! started and joined one after another, each timed: what a fill split
//! across threads started for it would pay per part, and what the staged
//! readers' kept helper threads save. The ring is plain pinned memory, also
//! with `--staging-write-combined` (reading a part back from
//! write-combined memory to check it is what that memory is bad at).

use std::time::Instant;

use offload_runtime::device::Device;
use offload_runtime::host_copy::copy_streaming;

/// One method's samples.
#[derive(Clone, Debug)]
pub(crate) struct FillRow {
    /// True: streaming stores; false: `copy_from_slice` (memcpy).
    pub(crate) streaming: bool,
    /// Seconds per sample.
    pub(crate) secs: Vec<f64>,
}

/// Both methods' rows and what they ran with.
#[derive(Clone, Debug)]
pub(crate) struct Fill {
    /// Threads that fill (the staging threads).
    pub(crate) threads: usize,
    /// Bytes of one part (the staging part size, or less to fit a share).
    pub(crate) part_bytes: usize,
    /// Bytes of the pinned ring (plain pinned memory, whatever
    /// `--staging-write-combined` says).
    pub(crate) ring_bytes: usize,
    /// Bytes one sample copies.
    pub(crate) bytes: usize,
    /// memcpy's, then streaming stores'.
    pub(crate) rows: Vec<FillRow>,
    /// Microseconds to start and join one scoped thread, each of
    /// [`SPAWNS`] in turn: what the staged readers' kept helper threads
    /// save per part of a split fill.
    pub(crate) spawn_us: Vec<f64>,
}

/// Threads started and joined, one after another, for `Fill::spawn_us`.
pub(crate) const SPAWNS: usize = 50;

impl FillRow {
    /// GB/s of the best and the median sample.
    pub(crate) fn gbps(&self, bytes: usize) -> (f64, f64) {
        let r: Vec<f64> = self.secs.iter().map(|s| bytes as f64 / s / 1e9).collect();
        let best = r.iter().copied().fold(f64::NAN, f64::max);
        (best, crate::h2d_bench::median(r))
    }

    /// The method's name in the table and the JSON.
    pub(crate) fn method(&self) -> &'static str {
        if self.streaming {
            "streaming stores"
        } else {
            "memcpy"
        }
    }
}

/// Measures both methods: a warm-up, then `iters` samples each, memcpy first.
pub(crate) fn measure(
    dev: &dyn Device,
    threads: usize,
    part_bytes: usize,
    ring_bytes: usize,
    bytes: usize,
    iters: usize,
) -> Result<Fill, String> {
    let threads = threads.max(1);
    let share = ring_bytes / threads;
    let part = part_bytes.min(share);
    if part == 0 {
        return Err(format!(
            "host fill: a staging ring of {ring_bytes} bytes has no part for each of {threads} threads"
        ));
    }
    let mut src = Vec::new();
    src.try_reserve_exact(bytes)
        .map_err(|e| format!("host fill: allocating {bytes} bytes of host memory: {e}"))?;
    src.extend((0..bytes).map(|i| (i as u8).wrapping_mul(31) ^ (i >> 12) as u8));
    let mut ring = dev
        .alloc_pinned(ring_bytes)
        .map_err(|e| format!("host fill: allocating a {ring_bytes}-byte pinned ring: {e}"))?;
    let mut rows = Vec::new();
    for streaming in [false, true] {
        let mut secs = Vec::with_capacity(iters);
        for i in 0..=iters {
            let t = Instant::now();
            let last = sample(&src, ring.as_mut_slice(), threads, part, streaming);
            let dt = t.elapsed().as_secs_f64();
            check(&src, ring.as_slice(), share, part, &last, streaming)?;
            if i > 0 {
                secs.push(dt);
            }
        }
        rows.push(FillRow { streaming, secs });
    }
    let spawn_us = (0..SPAWNS)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|s| {
                let _ = s.spawn(|| ()).join();
            });
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    Ok(Fill {
        threads,
        part_bytes: part,
        ring_bytes,
        bytes,
        rows,
        spawn_us,
    })
}

/// Parts `k, k + threads, ...` of `src` into thread k's share of `ring`,
/// round and round; for each thread, the last part it copied and where.
fn sample(
    src: &[u8],
    ring: &mut [u8],
    threads: usize,
    part: usize,
    streaming: bool,
) -> Vec<Option<(usize, usize)>> {
    let share = ring.len() / threads;
    let slots = share / part;
    let parts = src.len().div_ceil(part);
    std::thread::scope(|scope| {
        let handles: Vec<_> = ring
            .chunks_mut(share)
            .take(threads)
            .enumerate()
            .map(|(k, mine)| {
                scope.spawn(move || {
                    let mut last = None;
                    for (j, p) in (k..parts).step_by(threads).enumerate() {
                        let from = &src[p * part..((p + 1) * part).min(src.len())];
                        let at = (j % slots) * part;
                        let to = &mut mine[at..at + from.len()];
                        if streaming {
                            copy_streaming(to, from);
                        } else {
                            to.copy_from_slice(from);
                        }
                        last = Some((p, at));
                    }
                    last
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Every thread's last part is in its share of the ring, byte for byte.
fn check(
    src: &[u8],
    ring: &[u8],
    share: usize,
    part: usize,
    last: &[Option<(usize, usize)>],
    streaming: bool,
) -> Result<(), String> {
    for (k, l) in last.iter().enumerate() {
        let Some((p, at)) = *l else { continue };
        let from = &src[p * part..((p + 1) * part).min(src.len())];
        let landed = &ring[k * share + at..k * share + at + from.len()];
        if landed != from {
            return Err(format!(
                "host fill ({}): part {p} of the source did not land in thread {k}'s share of the ring",
                if streaming { "streaming stores" } else { "memcpy" }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_lands_every_threads_last_part_and_a_broken_ring_is_caught() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for streaming in [false, true] {
            let mut ring = vec![0u8; 3 * 3 * 5000];
            let last = sample(&src, &mut ring, 3, 5000, streaming);
            // 20 parts: thread 0 takes 0, 3, ..., 18 (its 7th and last at slot 6 % 3 = 0
            // of 3), thread 1 ends with part 19 (slot 0), thread 2 with 17 (slot 5 % 3 = 2).
            assert_eq!(last, vec![Some((18, 0)), Some((19, 0)), Some((17, 10_000))]);
            check(&src, &ring, 15_000, 5000, &last, streaming).unwrap();
            ring[15_000 + 2] ^= 1;
            let e = check(&src, &ring, 15_000, 5000, &last, streaming).unwrap_err();
            assert!(e.contains("part 19") && e.contains("thread 1"), "{e}");
        }
    }
}
