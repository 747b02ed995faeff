//! Quick CPU merge throughput check.
//!
//! ```text
//! cargo run --release -p offload-kernels --example merge_throughput -- \
//!     [rows] [cols] [rank] [adapters] [f32|f16|bf16] [threads] [reps]
//! ```
//!
//! Defaults: 4096 4096 32 1 f16, all threads, 10 repetitions. Low-rank
//! adapters with f16 factors. Prints the best time, the rate in GB/s of W
//! (size of W / time) and of W traffic (read + written, 2 × size / time),
//! and the same for a plain copy of W's bytes, the memory bound.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use offload_kernels::{merge_cpu, Adapter, Delta, Dtype, Factor, MergeSpec};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let rows = arg(&args, 1, 4096usize);
    let cols = arg(&args, 2, 4096usize);
    let rank = arg(&args, 3, 32usize);
    let count = arg(&args, 4, 1usize);
    let dtype = Dtype::from_name(&arg(&args, 5, "f16".to_string()).to_uppercase())?;
    let threads = NonZeroUsize::new(arg(&args, 6, 0usize));
    let reps = arg(&args, 7, 10usize);

    let fill = |n: usize, seed: u32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let x = ((i as u32).wrapping_mul(2_654_435_761) ^ seed) >> 16;
                half::f16::from_f32(x as f32 / 65536.0 - 0.5).to_le_bytes()
            })
            .collect()
    };
    let factors: Vec<(Vec<u8>, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                fill(rows * rank, 2 * i as u32),
                fill(rank * cols, 2 * i as u32 + 1),
            )
        })
        .collect();
    let adapters: Vec<Adapter<'_>> = factors
        .iter()
        .map(|(up, down)| Adapter {
            scale: 0.01,
            delta: Delta::LowRank {
                up: Factor::new(up, Dtype::F16, rows, rank),
                down: Factor::new(down, Dtype::F16, rank, cols),
            },
        })
        .collect();
    let spec = MergeSpec::new(dtype, &[rows, cols], None, &adapters)?;
    let bytes = spec.weight_bytes();
    let mut w = vec![0u8; bytes];
    let mut copy = vec![0u8; bytes];
    let src = w.clone();

    let merge = best_of(reps, || merge_cpu(&mut w, &spec, threads).expect("merge"));
    let memcpy = best_of(reps, || copy.copy_from_slice(std::hint::black_box(&src)));
    let gb = bytes as f64 / 1e9;
    let threads = threads.map_or(offload_kernels::default_threads().get(), |t| t.get());
    println!(
        "W {rows}x{cols} {dtype} ({:.1} MiB), {count} adapter(s) of rank {rank} (f16), {threads} thread(s)",
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "merge: {:8.2} ms  {:6.2} GB/s of W  {:6.2} GB/s read+written  {:6.1} GFLOP/s",
        merge.as_secs_f64() * 1e3,
        gb / merge.as_secs_f64(),
        2.0 * gb / merge.as_secs_f64(),
        2.0 * spec.multiply_adds() as f64 / merge.as_secs_f64() / 1e9
    );
    println!(
        "copy:  {:8.2} ms  {:6.2} GB/s of W  {:6.2} GB/s read+written",
        memcpy.as_secs_f64() * 1e3,
        gb / memcpy.as_secs_f64(),
        2.0 * gb / memcpy.as_secs_f64()
    );
    Ok(())
}
