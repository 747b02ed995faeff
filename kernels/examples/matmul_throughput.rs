//! Quick CPU matrix product throughput check.
//!
//! ```text
//! cargo run --release -p offload-kernels --example matmul_throughput -- \
//!     [tokens] [n] [k] [f32|f16|bf16] [threads] [reps]
//! ```
//!
//! Defaults: 16 2048 2048 f16, all threads, 20 repetitions. Computes
//! `Y[tokens, n] = X[tokens, k] · W[n, k]ᵀ` and prints the best time, the
//! rate in GFLOP/s (`2 · tokens · n · k / time`) and the rate at which W's
//! bytes are consumed (GB/s).

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use offload_kernels::{matmul_flops, matmul_xwt, Dtype};

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
    let tokens = arg(&args, 1, 16usize);
    let n = arg(&args, 2, 2048usize);
    let k = arg(&args, 3, 2048usize);
    let dtype = Dtype::from_name(&arg(&args, 4, "f16".to_string()).to_uppercase())?;
    let threads = NonZeroUsize::new(arg(&args, 5, 0usize));
    let reps = arg(&args, 6, 20usize);

    let value = |i: usize, seed: u32| -> f32 {
        let x = ((i as u32).wrapping_mul(2_654_435_761) ^ seed) >> 16;
        x as f32 / 65536.0 - 0.5
    };
    let x: Vec<f32> = (0..tokens * k).map(|i| value(i, 1)).collect();
    let w: Vec<u8> = (0..n * k)
        .flat_map(|i| {
            let v = value(i, 2);
            match dtype {
                Dtype::F32 => v.to_le_bytes().to_vec(),
                Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            }
        })
        .collect();
    let mut y = vec![0f32; tokens * n];

    let best = best_of(reps, || {
        matmul_xwt(&x, tokens, &w, dtype, n, k, &mut y, threads).expect("matmul")
    });
    let secs = best.as_secs_f64();
    let threads = threads.map_or(offload_kernels::default_threads().get(), |t| t.get());
    println!(
        "tokens {tokens} n {n} k {k} W {dtype} threads {threads}: best {:.3} ms, \
         {:.1} GFLOP/s, W {:.2} GB/s",
        secs * 1e3,
        matmul_flops(tokens, n, k) as f64 / secs / 1e9,
        w.len() as f64 / secs / 1e9,
    );
    Ok(())
}
