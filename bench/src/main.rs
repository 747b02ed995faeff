//! `offload`: the command line of the Offload runtime.
//!
//! With no arguments it runs the main job, `offload bench e2e` on the
//! default preset: it picks the device (a GPU when one answers, else the
//! host backend), says which and why, and prints the offload table.

mod arena_bench;
mod cmd_inspect;
mod cmd_merge;
mod cmd_synth;
#[cfg(feature = "cuda")]
mod cuda_timing;
mod e2e;
mod h2d_bench;
mod h2d_fill;
mod merge_bench;
mod null_device;
mod rng;
mod sdxl;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use offload_runtime::device::{self, HostConfig, KernelFamily};

/// Offload: run models larger than GPU memory by paging weights.
#[derive(Parser, Debug)]
#[command(name = "offload", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a benchmark.
    #[command(subcommand)]
    Bench(Box<Bench>),
    /// Print the device that would be used, and why.
    Device(DeviceArgs),
    /// Print the layout of model files and what LoRA files are and match.
    Inspect(cmd_inspect::InspectArgs),
    /// Bake LoRAs into a new checkpoint.
    Merge(cmd_merge::MergeArgs),
    /// Write a synthetic checkpoint (and optionally a LoRA) for benchmarks.
    Synth(cmd_synth::SynthArgs),
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Our page arena against offset-allocator on a seeded SDXL-sized workload.
    Arena(ArenaArgs),
    /// One generation per offload mode with real compute per layer: the offload table.
    E2e(Box<e2e::E2eArgs>),
    /// Upload rates: pinned, pageable and the runtime's own (pinned and
    /// staged) host-to-device copies against a plain pinned copy, the
    /// device-to-device rate, and the cost of mapping pages.
    H2d(h2d_bench::H2dBenchArgs),
    /// Merge throughput: our stacked LoRA merge against a plain copy and a per-adapter gemm.
    Merge(merge_bench::MergeBenchArgs),
}

#[derive(Args, Debug, Clone)]
struct ArenaArgs {
    /// Arena capacity in MiB.
    #[arg(long, default_value_t = 4096)]
    capacity_mib: usize,
    /// Page size of our arena in KiB.
    #[arg(long, default_value_t = 2048)]
    page_kib: usize,
    /// Target fill, as a fraction of capacity.
    #[arg(long, default_value_t = 0.84)]
    fill: f64,
    /// Allocations plus frees to run.
    #[arg(long, default_value_t = 2_000_000)]
    ops: usize,
    /// Workload seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl ArenaArgs {
    fn config(&self) -> Result<arena_bench::ArenaBenchConfig, String> {
        if !(self.fill > 0.0 && self.fill < 1.0) {
            return Err(format!("--fill {} must be between 0 and 1", self.fill));
        }
        let capacity = self
            .capacity_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| format!("--capacity-mib {} is too large", self.capacity_mib))?;
        let page_size = self
            .page_kib
            .checked_mul(1 << 10)
            .ok_or_else(|| format!("--page-kib {} is too large", self.page_kib))?;
        Ok(arena_bench::ArenaBenchConfig {
            capacity,
            page_size,
            fill: self.fill,
            ops: self.ops,
            seed: self.seed,
        })
    }
}

fn bench_arena(args: &ArenaArgs) -> Result<(), String> {
    let cfg = args.config()?;
    let host =
        arena_bench::run_ours_host(&cfg).map_err(|e| format!("offload arena (host): {e}"))?;
    let null =
        arena_bench::run_ours_null(&cfg).map_err(|e| format!("offload arena (null): {e}"))?;
    let theirs =
        arena_bench::run_offset_allocator(&cfg).map_err(|e| format!("offset-allocator: {e}"))?;
    arena_bench::print_table(&cfg, &[host, null, theirs]);
    Ok(())
}

fn main_job() -> Result<(), String> {
    e2e::run(&e2e::E2eArgs::default())
}

#[derive(Args, Debug)]
struct DeviceArgs {
    /// Also build the device's kernels now (on CUDA: cuBLAS, and the merge
    /// kernels with NVRTC, which fills the kernel disk cache so later runs
    /// load them) and say how each was built; an error, after trying every
    /// one, if one cannot be.
    #[arg(long)]
    prepare: bool,
}

fn run_device(a: &DeviceArgs) -> Result<(), String> {
    let selected = device::auto(&HostConfig::default()).map_err(|e| e.to_string())?;
    println!("{}", selected.reason);
    if !a.prepare {
        return Ok(());
    }
    // Every family is tried (and said) even when one fails.
    let mut failed = Vec::new();
    for (family, name) in [
        (KernelFamily::Matmul, "matrix products"),
        (KernelFamily::Merge, "merge kernels"),
    ] {
        match selected.device.prepare(family) {
            Ok(Some(line)) => println!("{line}"),
            Ok(None) => println!("{name}: nothing to build on this device"),
            Err(e) => {
                println!("{name}: cannot be built: {e}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} cannot be built on this device",
            failed.join(" and ")
        ))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        None => main_job(),
        Some(Command::Device(a)) => run_device(a),
        Some(Command::Bench(b)) => match b.as_ref() {
            Bench::Arena(a) => bench_arena(a),
            Bench::E2e(a) => e2e::run(a),
            Bench::H2d(a) => h2d_bench::run(a),
            Bench::Merge(a) => merge_bench::run(a),
        },
        Some(Command::Inspect(a)) => cmd_inspect::run(a),
        Some(Command::Merge(a)) => cmd_merge::run(a),
        Some(Command::Synth(a)) => cmd_synth::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("offload: error: {e}");
            ExitCode::FAILURE
        }
    }
}
